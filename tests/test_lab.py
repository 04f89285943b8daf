"""The lab's pure parts (blkif_spec/lab): command lines, the plan's script, cache keys, result reading.

Nothing here boots QEMU or calls apt: `python -m blkif_spec.lab run` is the real
test of the lab, and needs minutes. The generated job script is run under the
host's /bin/sh with a fake share, since its behaviour (rc, log, timeout) is
what the live jobs rely on.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from blkif_spec.lab import cache, cli, cpio, debian, image, modules, plan, project, qemu, results, vm

CPUINFO = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu vme de pse {extra} sse2\n\n"


# ---- KVM detection and the QEMU command line


@pytest.mark.parametrize(("extra", "dev_ok", "want"), [
    ("vmx", True, True), ("svm", True, True), ("vmx", False, False), ("hypervisor", True, False),
    ("", True, False),
])  # fmt: skip
def test_kvm_only_with_hardware_virtualisation(extra: str, dev_ok: bool, want: bool) -> None:
    assert qemu.kvm_usable(CPUINFO.format(extra=extra), dev_ok) is want


def test_kvm_flag_must_be_a_whole_word() -> None:
    assert not qemu.kvm_usable(CPUINFO.format(extra="vmxfoo svm_lock"), True)


def _spec(tmp_path: Path, **kw: object) -> qemu.VmSpec:
    return qemu.VmSpec(xen=tmp_path / "xen", kernel=tmp_path / "vmlinuz", initrd=tmp_path / "initrd.gz",
                       share=tmp_path / "out", serial_log=tmp_path / "out" / "serial.log", **kw)  # type: ignore[arg-type]  # fmt: skip


def _opt(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_tcg_command_line(tmp_path: Path) -> None:
    argv = qemu.qemu_argv(_spec(tmp_path))
    assert argv[0] == "qemu-system-x86_64"
    assert _opt(argv, "-accel") == "tcg,thread=multi"
    assert _opt(argv, "-cpu") == "max,-smap"  # without -smap dom0 faults in create_bounce_frame under TCG
    assert _opt(argv, "-smp") == "2" and _opt(argv, "-m") == "2048"
    assert "-no-reboot" in argv
    assert _opt(argv, "-serial") == f"file:{tmp_path}/out/serial.log"
    assert _opt(argv, "-virtfs") == f"local,path={tmp_path}/out,mount_tag=host0,security_model=none,id=host0"
    assert _opt(argv, "-kernel") == str(tmp_path / "xen")
    xen = _opt(argv, "-append")
    assert "dom0_mem=1024M,max:1024M" in xen and "console=com1" in xen and "noreboot" not in xen
    kernel, initrd = _opt(argv, "-initrd").split(",")
    assert kernel.startswith(f"{tmp_path}/vmlinuz ") and "console=hvc0" in kernel
    assert initrd == str(tmp_path / "initrd.gz")


def test_kvm_command_line_and_extra_args(tmp_path: Path) -> None:
    argv = qemu.qemu_argv(_spec(tmp_path, kvm=True, xen_args=("smap=0",), kernel_args=("quiet",)))
    assert _opt(argv, "-accel") == "kvm" and _opt(argv, "-cpu") == "host"
    assert _opt(argv, "-append").endswith(" smap=0")
    assert _opt(argv, "-initrd").split(",")[0].endswith(" quiet")


def test_initrd_module_commas_are_doubled(tmp_path: Path) -> None:
    spec = _spec(tmp_path, kernel_args=("opt=a,b",))
    assert "opt=a,,b" in _opt(qemu.qemu_argv(spec), "-initrd")


def test_share_path_with_comma_is_refused(tmp_path: Path) -> None:
    spec = qemu.VmSpec(xen=tmp_path, kernel=tmp_path, initrd=tmp_path, share=tmp_path / "a,b",
                       serial_log=tmp_path / "s")  # fmt: skip
    with pytest.raises(ValueError, match="cannot hold"):
        qemu.qemu_argv(spec)


# ---- the plan and its script


def test_default_plan_has_smoke_running_the_smoke_module() -> None:
    smoke = {j.name: j for j in plan.DEFAULT_PLAN}["smoke"]
    assert smoke.command == "python3 -m blkif_spec.lab.smoke --without-xl" and smoke.timeout > 0
    assert {j.name: j for j in plan.plan_for("full")}["smoke"].command == "python3 -m blkif_spec.lab.smoke"
    import blkif_spec.lab.smoke as mod  # importing it must not need dom0

    assert set(mod.XL_CHECKS) < set(mod.CHECKS)
    assert mod.main(["--bogus"]) == 2


@pytest.mark.parametrize("scope", plan.SCOPES)
def test_backend_role_jobs_run_before_the_kernel_blkfront_is_loaded(scope: str) -> None:
    """dom0's xen-blkfront attaches to every new device/vbd of dom0, so a backend-role job after the
    blkfront job would be refused (or, before the refusal existed, raced: the bench lost its rings)."""
    names = [job.name for job in plan.plan_for(scope)]
    first_blkfront = min(names.index("live-blkfront"), names.index("record"))
    for name in ("live-blkback", "live-qdisk", "bench-iops"):
        assert names.index(name) < first_blkfront, f"{scope}: {name} after the kernel blkfront: {names}"


@pytest.mark.parametrize("scope", plan.SCOPES)
def test_only_the_last_job_may_crash_dom0(scope: str) -> None:
    """Tests marked host_hazard (a kernel oops in dom0 leaves the host unusable) run only in the full
    scope's last job, which allows them and selects nothing else."""
    jobs = plan.plan_for(scope)
    allowed = [job for job in jobs if "--xen-allow-host-crash" in job.command]
    assert allowed == ([jobs[-1]] if scope == "full" else []), [job.name for job in allowed]
    if allowed:
        assert "-m host_hazard" in allowed[0].command


@pytest.mark.parametrize("loaded_after", [True, False])
def test_with_module_reloads_with_parameters_and_puts_it_back(tmp_path: Path, loaded_after: bool) -> None:
    """The command runs with the module loaded with the parameters; its exit status is kept, and the
    module is then unloaded (and loaded with its defaults again, when it was loaded before)."""
    log = tmp_path / "modprobe.log"
    fake = tmp_path / "bin" / "modprobe"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$*" >> {log}\n')
    fake.chmod(0o755)
    script = plan.with_module("xen-testmod", "a=1 b=2", "echo ran >> " + str(log) + "; exit 7",
                              loaded_after=loaded_after)  # fmt: skip
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}"}
    run = subprocess.run(["sh", "-c", script], env=env, timeout=30)
    assert run.returncode == 7
    want = ["-rq xen-testmod", "xen-testmod a=1 b=2", "ran", "-r xen-testmod"] + (
        ["xen-testmod"] if loaded_after else []
    )
    assert log.read_text().splitlines() == want


@pytest.mark.parametrize("name", ["", "a b", "../x", ".hidden", "x/y", "a" * 65])
def test_job_names_are_plain_words(name: str) -> None:
    with pytest.raises(ValueError):
        plan.Job(name, "true")


def test_job_timeout_positive() -> None:
    with pytest.raises(ValueError):
        plan.Job("x", "true", timeout=0)


def test_select_keeps_plan_order_and_rejects_unknown() -> None:
    jobs = [plan.Job("a", "true"), plan.Job("b", "true"), plan.Job("c", "true")]
    assert plan.select(jobs) == jobs
    assert [j.name for j in plan.select(jobs, ["c", "a", "c"])] == ["a", "c"]
    with pytest.raises(ValueError, match="no job named zz"):
        plan.select(jobs, ["zz"])


def test_script_quotes_commands() -> None:
    script = plan.jobs_script([plan.Job("q", "echo 'it''s' \"$LAB_OUT\"; exit 3", timeout=7)])
    assert script.startswith("#!/bin/sh\n")
    assert "lab_job q 7 'echo '\"'\"'it'\"'\"''\"'\"'s'\"'\"' \"$LAB_OUT\"; exit 3'" in script


@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils timeout")
def test_script_runs_jobs_into_the_share(tmp_path: Path) -> None:
    share, project = tmp_path / "share", tmp_path / "project"
    share.mkdir()
    project.mkdir()
    (project / "marker").write_text("here")
    jobs = [
        plan.Job("ok", 'cat marker; echo "$LAB_OUT $LAB_JOB"; echo err >&2'),
        plan.Job("fails", "exit 3"),
        plan.Job("slow", "sleep 30", timeout=1),
    ]
    script = tmp_path / "jobs.sh"
    script.write_text(plan.jobs_script(jobs, share=str(share), project=str(project)))
    proc = subprocess.run(["sh", str(script)], capture_output=True, text=True, timeout=60)
    assert "LAB-JOB-END ok rc=0" in proc.stdout and "LAB-JOB-END slow rc=124" in proc.stdout
    assert (share / "ok" / "log.txt").read_text() == f"here{share}/ok ok\nerr\n"
    found = {r.name: r for r in results.collect(share, jobs)}
    assert (found["ok"].rc, found["fails"].rc, found["slow"].rc) == (0, 3, 124)
    assert found["slow"].seconds is not None and 0.5 < found["slow"].seconds < 20


def test_init_script_is_valid_sh() -> None:
    assert subprocess.run(["sh", "-n", str(project.INIT_SH)], timeout=10).returncode == 0
    text = project.INIT_SH.read_text()
    assert "jobs.sh" in text and "sysrq-trigger" in text and "blkfront" not in text.split("modprobe")[-1]


# ---- cache keys


def test_cache_key_is_stable_and_order_free() -> None:
    a = cache.cache_key({"kernel": "1", "xen": "2"})
    assert a == cache.cache_key({"xen": "2", "kernel": "1"})
    assert a != cache.cache_key({"kernel": "1", "xen": "3"})
    assert len(a) == 16


def test_default_cache_dir(tmp_path: Path) -> None:
    assert cache.default_cache_dir({"BLKIF_LAB_CACHE": "/c"}, tmp_path) == Path("/c")
    assert cache.default_cache_dir({}, tmp_path) == tmp_path / ".cache/blkif-conformance/lab"


def test_fingerprints_see_changes(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    f = tmp_path / "d" / "m.ko"
    f.write_bytes(b"one")
    fp, digest = cache.tree_fingerprint(tmp_path), cache.file_digest(f)
    f.write_bytes(b"three")
    assert cache.tree_fingerprint(tmp_path) != fp and cache.file_digest(f) != digest


def test_layer_is_built_once_and_old_builds_are_pruned(tmp_path: Path) -> None:
    calls: list[Path] = []

    def build(folder: Path) -> None:
        calls.append(folder)
        (folder / "data").write_text("x")

    first, hit = cache.layer(tmp_path, "rootfs", "k1", build)
    again, hit_again = cache.layer(tmp_path, "rootfs", "k1", build)
    assert (hit, hit_again, first, len(calls)) == (False, True, again, 1)
    assert (first / "data").read_text() == "x" and float((first / "seconds").read_text()) >= 0

    def broken(folder: Path) -> None:
        raise RuntimeError("debootstrap failed")

    with pytest.raises(RuntimeError):
        cache.layer(tmp_path, "rootfs", "k2", broken)
    assert not list(tmp_path.glob("rootfs-k2*"))  # no half layer, no temporary folder
    os.utime(first / "ok", (1, 1))  # k1 was last used long ago
    cache.layer(tmp_path, "rootfs", "k3", build)
    cache.layer(tmp_path, "rootfs", "k4", build)
    assert sorted(p.name for p in tmp_path.glob("rootfs-*")) == ["rootfs-k3", "rootfs-k4"]


# ---- kernel modules


def test_modinfo_deps_and_closure() -> None:
    blob = b"\x7fELF...\0license=GPL\0depends=9pnet,netfs\0softdep=pre: crc32c\0name=9p\0"
    assert modules.modinfo_deps(blob) == {"9pnet", "netfs", "crc32c"}
    assert modules.modinfo_deps(b"\0depends=\0") == set()
    deps = {"9p": {"9pnet", "netfs"}, "9pnet": set(), "netfs": {"fscache"}, "fscache": set(), "loop": set()}
    assert modules.closure(["9p", "builtin-one"], deps.get) == {"9p", "9pnet", "netfs", "fscache"}


def test_module_index_normalises_names() -> None:
    idx = modules.index(["kernel/drivers/xen/xen-evtchn.ko", "kernel/fs/9p/9p.ko.xz", "modules.order"])
    assert idx == {"xen_evtchn": "kernel/drivers/xen/xen-evtchn.ko", "9p": "kernel/fs/9p/9p.ko.xz"}


def test_needed_reads_only_reached_modules(tmp_path: Path) -> None:
    (tmp_path / "kernel").mkdir()
    (tmp_path / "kernel" / "xen-blkback.ko").write_bytes(b"\0depends=\0")
    (tmp_path / "kernel" / "loop.ko").write_bytes(b"\0depends=\0")
    (tmp_path / "kernel" / "other.ko").write_bytes(b"\0depends=missing\0")
    assert modules.needed(tmp_path, ["xen_blkback"]) == ["kernel/xen-blkback.ko"]


# ---- cpio overlays


def test_entries_leave_out_base_directories(tmp_path: Path) -> None:
    base, tree = tmp_path / "base", tmp_path / "tree"
    (base / "usr" / "lib").mkdir(parents=True)
    (base / "lib").symlink_to("usr/lib")
    (tree / "usr" / "lib" / "modules" / "v").mkdir(parents=True)
    (tree / "usr" / "lib" / "modules" / "v" / "a.ko").write_bytes(b"")
    (tree / "init").write_text("")
    assert cpio.entries(tree, cpio.in_base(base)) == [
        "init", "usr/lib/modules", "usr/lib/modules/v", "usr/lib/modules/v/a.ko",
    ]  # fmt: skip
    assert cpio.entries(tree)[:2] == ["init", "usr"]


def test_entries_keep_symlinked_directories(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to("real")
    assert cpio.entries(tmp_path) == ["link", "real"]


@pytest.mark.skipif(shutil.which("cpio") is None, reason="needs cpio")
def test_pack_writes_a_gzip_newc_archive(tmp_path: Path) -> None:
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "hello").write_text("hi")
    size = cpio.pack(tmp_path / "t", tmp_path / "a.cpio.gz", ["hello"], root_owner=True)
    data = (tmp_path / "a.cpio.gz").read_bytes()
    assert size == len(data) and data[:2] == b"\x1f\x8b"
    import gzip

    assert gzip.decompress(data).startswith(b"070701")


# ---- Debian package helpers


def test_control_fields_and_kernel_choice() -> None:
    image_name = "linux-image-6.1.0-56-amd64"
    stanza = f"Package: linux-image-amd64\nVersion: 6.1.192-2\nDepends: {image_name} (= 6.1.192-2)\n"
    assert debian.control_field(stanza, "Version") == "6.1.192-2"
    assert debian.control_field(stanza, "Missing") is None
    assert debian.kernel_from_depends(debian.control_field(stanza, "Depends") or "") == image_name
    assert debian.kernel_from_depends("linux-image-6.12.0-1-amd64") is None


def test_dpkg_versions() -> None:
    status = "Package: python3\nStatus: install ok\nVersion: 3.11.2-1\n\nPackage: other\nVersion: 1\n"
    assert debian.dpkg_versions(status, {"python3", "absent"}) == {"python3": "3.11.2-1"}


def test_missing_host_packages() -> None:
    have = {"cpio", "gzip", "dpkg-deb"}

    def which(tool: str) -> str | None:
        return f"/usr/bin/{tool}" if tool in have else None

    assert debian.missing_packages("qemu-system-x86_64", which) == ["debootstrap", "qemu-system-x86"]
    assert debian.missing_packages("/opt/my-qemu", which) == ["debootstrap"]


# ---- what goes into the image


def test_guest_requirements_come_from_pyproject(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\ndependencies = ["pytest>=8", "pyxs"]\n')
    assert image.pydeps_requirements(tmp_path) == ["pytest>=8", "pyxs"]
    assert image.pydeps_requirements(tmp_path / "none") == list(image.PYDEPS_DEFAULT)


def test_project_files_without_git_and_excluding_out(tmp_path: Path) -> None:
    for rel in ["blkif_spec/a.py", "blkif_spec/__pycache__/a.pyc", "tests/t.py", "pytest.ini", "junk/x",
                "tests/out/serial.log"]:  # fmt: skip
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("")
    names = project.project_files(tmp_path, exclude=(tmp_path / "tests" / "out", Path("/elsewhere")))
    assert names == ["blkif_spec/a.py", "pytest.ini", "tests/t.py"]


# ---- results


def test_collect_from_a_fake_share(tmp_path: Path) -> None:
    jobs = [plan.Job("smoke", "x"), plan.Job("live", "y"), plan.Job("never", "z")]
    (tmp_path / "smoke").mkdir()
    (tmp_path / "smoke" / "rc").write_text("0\n")
    (tmp_path / "smoke" / "seconds").write_text("12.50\n")
    (tmp_path / "smoke" / "log.txt").write_text("PASS a\nPASS b\n")
    (tmp_path / "live").mkdir()
    (tmp_path / "live" / "rc").write_text("1\n")
    (tmp_path / "live" / "log.txt").write_text("".join(f"line {i}\n" for i in range(40)))
    (tmp_path / "guest-info.txt").write_text("kernel=6.1.0-56-amd64\nxen=4.17.7\njunk\n")
    found = results.collect(tmp_path, jobs)
    assert [(r.name, r.rc, r.seconds) for r in found] == [
        ("smoke", 0, 12.5), ("live", 1, None), ("never", None, None),
    ]  # fmt: skip
    assert found[1].log_tail.splitlines()[0] == "line 25"
    info = results.guest_info(tmp_path)
    assert info == {"kernel": "6.1.0-56-amd64", "xen": "4.17.7"}
    rec = results.record(phases={"build": 1.234}, hits={"rootfs": True, "kernel": False}, versions=info,
                         results=found, error=None, extra={"accel": "tcg"})  # fmt: skip
    assert rec["ok"] is False and rec["phases"] == {"build": 1.2} and rec["accel"] == "tcg"
    assert rec["cache"] == {"hit": False, "layers": {"rootfs": "hit", "kernel": "miss"}}
    assert rec["jobs"] == {"smoke": {"rc": 0, "seconds": 12.5}, "live": {"rc": 1, "seconds": None},
                           "never": {"rc": None, "seconds": None}}  # fmt: skip
    text = results.summary(rec, found)
    assert "job smoke: ok (12.5 s)" in text and "job live: FAILED rc=1" in text and "| line 39" in text
    assert "job never: did not finish" in text


def test_record_ok_only_when_every_job_passed() -> None:
    ok = [results.JobResult("a", 0, 1.0, "")]
    assert results.record(phases={}, hits={}, versions={}, results=ok, error=None, extra={})["ok"] is True
    assert results.record(phases={}, hits={}, versions={}, results=ok, error="boom", extra={})["ok"] is False
    assert results.record(phases={}, hits={}, versions={}, results=[], error=None, extra={})["ok"] is False


# ---- watching the serial log


def test_scan_markers_amid_kernel_output() -> None:
    text = "[ 1.0] xen: boot\nLAB-READY 51.90 \n(XEN) x LAB-JOB-END smoke rc=0\nno marker\n"
    assert vm.scan(text) == [("LAB-READY", "51.90"), ("LAB-JOB-END", "smoke rc=0")]


def test_phase_times_and_success() -> None:
    boot = vm.Boot(markers={"LAB-READY": 60.0, "LAB-JOBS-END": 100.0, "LAB-DONE": 101.0}, exit_code=0,
                   seconds=103.0)  # fmt: skip
    assert vm.phase_times(boot) == {"boot": 60.0, "jobs": 40.0, "poweroff": 3.0}
    assert vm.diagnose(boot, 480, Path("/nonexistent")) is None


def test_diagnose_names_the_phase(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)) + "Kernel panic - not syncing\n")
    early = vm.Boot(markers={"LAB-INIT": 30.0}, timed_out=True, seconds=480.0)
    msg = vm.diagnose(early, 480, log)
    assert msg is not None and msg.startswith("lab boot failed: timeout") and "before dom0 was ready" in msg
    assert msg.endswith("Kernel panic - not syncing") and "line 70" not in msg
    stuck = vm.Boot(markers={"LAB-READY": 50.0, "LAB-JOB-START smoke": 51.0, "LAB-JOB-END smoke": 60.0,
                             "LAB-JOB-START live": 61.0}, timed_out=True, seconds=480.0)  # fmt: skip
    msg = vm.diagnose(stuck, 480, log)
    assert msg is not None and msg.startswith("lab jobs failed: timeout") and "job live was running" in msg
    crashed = vm.Boot(markers={}, exit_code=0, seconds=20.0)
    msg = vm.diagnose(crashed, 480, log)
    assert msg is not None and "QEMU exited (code 0) before dom0 finished" in msg
    assert "LAB-ERROR" in (vm.diagnose(vm.Boot(markers={"LAB-ERROR": 3.0, "LAB-DONE": 4.0}), 480, log) or "")


# ---- the command line


def test_cli_rejects_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["run", "--out", str(tmp_path), "--modules", str(tmp_path)])
    with pytest.raises(SystemExit):
        cli.main(["run", "--out", str(tmp_path), "--job", "nope"])
    with pytest.raises(SystemExit):
        cli.main(["run", "--out", str(tmp_path), "--xen", str(tmp_path / "missing")])
    err = capsys.readouterr().err
    assert "--modules goes with --kernel" in err and "no job named nope" in err and "no such file" in err


def test_prepare_share_clears_stale_results(tmp_path: Path) -> None:
    (tmp_path / "smoke" / "sub").mkdir(parents=True)
    (tmp_path / "smoke" / "sub" / "old").write_text("")
    (tmp_path / "smoke" / "rc").write_text("0")
    (tmp_path / "serial.log").write_text("old")
    (tmp_path / "keep.txt").write_text("mine")
    cli._prepare_share(tmp_path, [plan.Job("smoke", "true")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jobs.sh", "keep.txt"]
    assert "lab_job smoke 300 true" in (tmp_path / "jobs.sh").read_text()
