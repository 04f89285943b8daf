"""`python -m blkif_spec.lab run`: build (cached), boot, run the plan's jobs in dom0, report.

Exit code: 0 when every job's rc is 0; 1 when a job failed; 2 when the lab itself
failed (build, boot, timeout), with a message naming the phase.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from blkif_spec.lab import LabError, debian, image, interop, plan, project, qemu, results, vm
from blkif_spec.lab.cache import default_cache_dir
from blkif_spec.lab.proc import say

PROJECT = Path(__file__).resolve().parents[2]  # the checkout holding blkif_spec/
BOOT_ALLOWANCE_S = 120  # QEMU start to dom0 ready under TCG, plus poweroff
# Files the lab itself writes into OUT (job folders are the plan's names).
LAB_FILES = ("serial.log", "qemu.log", "lab.json", "jobs.sh", "guest-info.txt", "dmesg.txt", "xen-dmesg.txt",
             "xenstored-trace.log")  # fmt: skip


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m blkif_spec.lab", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="build, boot and run the plan's jobs in a Xen dom0 under QEMU")
    r.add_argument("--out", type=Path, required=True, help="results folder (shared with dom0 over 9p)")
    r.add_argument("--kernel", type=Path, help="a PV-capable dom0 bzImage instead of Debian's")
    r.add_argument("--modules", type=Path, help="its lib/modules/<version> tree (with --kernel)")
    r.add_argument("--xen", type=Path, help="the hypervisor (xen.gz or ELF) instead of Debian's 4.17")
    r.add_argument("--qemu", type=Path, help="QEMU binary used in dom0 for the qdisk backend")
    r.add_argument("--timeout", type=float,
                   help="bound on boot + jobs, s (default: the jobs' limits plus boot)")  # fmt: skip
    r.add_argument("--cache", type=Path, help="default $BLKIF_LAB_CACHE or ~/.cache/blkif-conformance/lab")
    r.add_argument("--job", action="append", default=[], metavar="NAME", help="run only this job (repeated)")
    r.add_argument("--scope", choices=plan.SCOPES, default="quick",
                   help="quick (default, CI): a few tests per area; full: all, ~20 min a job")  # fmt: skip
    r.add_argument("--no-reference", action="store_true",
                   help="leave the reference columns out of the interop matrix (no host runs)")  # fmt: skip
    return p


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through vm.boot's finally, which stops QEMU


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    p = parser()
    args = p.parse_args(argv)
    if args.modules and not args.kernel:
        p.error("--modules goes with --kernel")
    for opt in ("kernel", "modules", "xen", "qemu"):
        path = getattr(args, opt)
        if path is not None and not path.exists():
            p.error(f"--{opt} {path}: no such file or folder")
    try:
        jobs = plan.select(plan.plan_for(args.scope), args.job)
    except ValueError as e:
        p.error(str(e))
    return run(args, jobs)


def _prepare_share(out: Path, jobs: list[plan.Job]) -> None:
    """Clear what this run will write (stale results would pass for new ones), then write the plan."""
    out.mkdir(parents=True, exist_ok=True)
    for name in LAB_FILES:
        (out / name).unlink(missing_ok=True)
    for job in jobs:
        folder = out / job.name
        if folder.is_dir():
            for path in sorted(folder.rglob("*"), reverse=True):
                path.rmdir() if path.is_dir() and not path.is_symlink() else path.unlink()
            folder.rmdir()
    (out / "jobs.sh").write_text(plan.jobs_script(jobs))


def _host_qemu_version(binary: str) -> str:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.splitlines()[0] if out else "unknown"


def _kvm() -> bool:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return qemu.kvm_usable(cpuinfo, os.access("/dev/kvm", os.R_OK | os.W_OK))


def run(args: argparse.Namespace, jobs: list[plan.Job]) -> int:
    """One lab run; always writes OUT/lab.json and prints the summary, whatever failed."""
    out = args.out.resolve()
    cache_dir = (args.cache or default_cache_dir(os.environ, Path.home())).resolve()
    host_qemu = "qemu-system-x86_64"
    phases: dict[str, float] = {}
    hits: dict[str, bool] = {}
    versions: dict[str, str] = {}
    extra: dict[str, object] = {"out": str(out), "cache_dir": str(cache_dir), "timeout_s": args.timeout,
                                "jobs_selected": [j.name for j in jobs]}  # fmt: skip
    error: str | None = None
    needed = BOOT_ALLOWANCE_S + sum(j.timeout for j in jobs)
    if args.timeout is None:
        args.timeout = float(needed)
    elif needed > args.timeout:
        say(f"note: with boot, the jobs' own timeouts add up to {needed:.0f} s; "
            f"--timeout {args.timeout:.0f} s may end the run first")  # fmt: skip
    t0 = time.monotonic()
    phase = "build"
    try:
        _prepare_share(out, jobs)
        installed = debian.ensure_host_tools(host_qemu)
        extra["host_packages_installed"] = installed
        inputs = image.Inputs(cache_dir=cache_dir, project=PROJECT, kernel=args.kernel, modules=args.modules,
                              xen=args.xen, qemu=args.qemu)  # fmt: skip
        img = image.build(inputs)
        hits, versions = img.hits, dict(img.versions)
        extra["layers_built_s"] = img.built_seconds
        versions["qemu (host)"] = _host_qemu_version(host_qemu)
        with tempfile.TemporaryDirectory(dir=cache_dir, prefix="run-") as tmp:
            work = Path(tmp)
            parts = [*img.layers, project.run_layer(PROJECT, work, img.rootfs, (out, cache_dir))]
            initrd = work / "initrd.cpio.gz"
            size = project.concatenate(parts, initrd)
            extra["image"] = {"initrd_bytes": size, "layers": {p.name: p.stat().st_size for p in parts}}
            phases["build"] = time.monotonic() - t0
            kvm = _kvm()
            extra["accel"] = "kvm" if kvm else "tcg"
            spec = qemu.VmSpec(xen=img.xen, kernel=img.kernel, initrd=initrd, share=out,
                               serial_log=out / "serial.log", qemu=host_qemu, kvm=kvm)  # fmt: skip
            try:
                argv = qemu.qemu_argv(spec)
            except ValueError as e:
                raise LabError("boot", str(e)) from e
            extra["qemu_argv"] = argv
            say(f"booting Xen + dom0 under QEMU ({extra['accel']}, initramfs {size / 2**20:.0f} MiB), "
                f"timeout {args.timeout:.0f} s")  # fmt: skip
            phase = "boot"
            boot = vm.boot(argv, out / "serial.log", out / "qemu.log", args.timeout)
        phases.update(vm.phase_times(boot))
        extra["qemu_exit_code"] = boot.exit_code
        error = vm.diagnose(boot, args.timeout, out / "serial.log")
    except (LabError, OSError) as e:  # OSError: a full disk, a folder we may not write
        error = str(e) if isinstance(e, LabError) else f"lab {phase} failed: {e}"
        phases.setdefault("build", time.monotonic() - t0)
    out.mkdir(parents=True, exist_ok=True)
    info = results.guest_info(out)
    versions.update({f"guest {k}": v for k, v in info.items()})
    found = results.collect(out, jobs)
    if error is None:
        try:
            interop.build(PROJECT, out, reference=not args.no_reference, scope=args.scope)
        except (OSError, ValueError) as e:  # the matrix is a view of the reports: say so, do not fail the run
            say(f"interop: no matrix: {e}")
    rec = results.record(phases=phases, hits=hits, versions=versions, results=found, error=error, extra=extra)
    (out / "lab.json").write_text(json.dumps(rec, indent=2) + "\n")
    print(results.summary(rec, found))
    sys.stdout.flush()
    if error is not None:
        return 2
    return 0 if rec["ok"] else 1
