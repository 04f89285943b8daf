"""What the lab runs in dom0: a list of jobs, and the shell script that runs them.

The script travels through the 9p share, not the image, so a new plan needs no
rebuild. Each job runs from the project copy with the guest's PYTHONPATH, writes
its output to `$LAB_OUT` (= `/mnt/host0/<name>`, created), and leaves `log.txt`
(stdout and stderr), `rc` and `seconds` there; `timeout` bounds it (rc 124).
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

SHARE = "/mnt/host0"  # where dom0 mounts the host's results directory
PROJECT = "/opt/blkif-conformance"  # where the run layer puts the project
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


@dataclass(frozen=True)
class Job:
    """One command run in dom0; `name` is also its results directory, so it is a plain word."""

    name: str
    command: str
    timeout: int = 300  # seconds, enforced inside dom0 by timeout(1)

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"job name {self.name!r}: letters, digits, '-' and '_' only")
        if self.timeout <= 0:
            raise ValueError(f"job {self.name}: timeout must be positive, not {self.timeout}")


LIVE_OPTIONS = (
    "-p no:cacheprovider -q -rfE --hypothesis-profile=live --blkif-timeout=20 "
    "--known-failures=fixtures/known-failures-live.toml "
    "--junitxml=$LAB_OUT/junit.xml --conformance-report=$LAB_OUT"
)


# The quick scope (CI): a few tests per area, each a whole handshake and I/O, so that a run under
# TCG stays within minutes; the full scope runs every test of the role (15-20 minutes a job).
QUICK = {
    "backend": ("test_operation_codes", "test_unknown_operations_are_refused_once",
                "test_answers_carry_indirect_op", "test_requests_outside_the_disk_fail",
                "test_frontend_without_persistent_grants", "test_flush_makes_completed_writes_durable",
                "test_the_backend_notifies_when_asked", "test_response_padding_never_leaks",
                "test_close_handshake", "test_every_queue_count_serves_each_queue"),
    "frontend": ("test_the_frontend_initialises_the_ring_page", "test_never_more_than_ring_size_outstanding",
                 "test_frontend_persistent_with_either_backend", "test_a_status_outside_the_spec_is_an_error",
                 "test_a_failed_read_delivers_no_data", "test_hostile_responses_stop_the_device"),
}  # fmt: skip
SCOPES = ("quick", "full")


def live_suite(role: str, target: str, scope: str = "full") -> str:
    """The conformance suite of one role against a live target, as a dom0 shell command."""
    extra = os.environ.get("BLKIF_LAB_PYTEST_ARGS", "")  # e.g. "-x -k persistent" while developing
    if scope == "quick":
        extra = f"-k '{' or '.join(QUICK[role])}' {extra}"
    return f"python3 -m pytest tests/conformance --blkif-role={role} {target} {LIVE_OPTIONS} {extra}".strip()


# bench iops against the live blkback: a smoke test (TCG figures mean little); dom0 has 2 vCPUs, so
# blkback offers 2 queues. Its check of every response and the data check make it a test too.
BENCH = Job(
    "bench-iops",
    "python3 -m blkif_spec.bench iops --backend=live --xen-device=/dev/loop3 "
    "--xen-vdev=xvdi --seconds 1 --queues 1 2 --json > $LAB_OUT/iops.json",
    timeout=300,
)


# Module parameters that change what the real drivers negotiate (conventions §7): the full scope
# runs each role again with the drivers at their smallest offer.
BLKBACK_MIN = "max_queues=1 max_ring_page_order=0 feature_persistent=0"
BLKFRONT_MIN = "max_queues=1 max_ring_page_order=0 max_indirect_segments=0 feature_persistent=0"


def with_module(module: str, params: str, command: str, *, loaded_after: bool) -> str:
    """`command` with `module` (re)loaded with `params`, then put back as it was: loaded with its
    defaults, or unloaded. The command's exit status is the job's."""
    name = module.replace("-", "_")  # as /proc/modules spells it
    unload = f"modprobe -rq {module}; ! grep -q '^{name} ' /proc/modules"  # gone, or the job fails
    restore = f"modprobe -r {module}" + (f"; modprobe {module}" if loaded_after else "")
    return f"{unload} && modprobe {module} {params} && ( {command} ); rc=$?; {restore}; exit $rc"


def plan_for(scope: str = "quick") -> tuple[Job, ...]:
    """The lab's jobs: the smoke test, the suite against the three real drivers, the recorded trees."""
    if scope not in SCOPES:
        raise ValueError(f"scope {scope!r}: one of {', '.join(SCOPES)}")
    limit = 600 if scope == "quick" else 5400
    blkback = "--backend=live --xen-backend-kind=vbd --xen-device=/dev/loop0 --xen-vdev=xvdf"
    qdisk = "--backend=live --xen-backend-kind=qdisk --xen-device=/dev/loop1 --xen-vdev=xvdg"
    jobs = [
        # Proves the pieces from inside dom0: Python deps, XenStore, /dev/xen, and in the full scope
        # xl with blkback and qdisk (in the quick scope the record job is what uses xl).
        Job(
            "smoke",
            "python3 -m blkif_spec.lab.smoke" + (" --without-xl" if scope == "quick" else ""),
            timeout=180,
        ),
        # The live conformance runs against dom0's real drivers, each on its own loop device and
        # virtual device (the init script made /dev/loop0..3). Reports and JUnit land in $LAB_OUT.
        Job("live-blkback", live_suite("backend", blkback, scope), timeout=limit),
        Job("live-qdisk", live_suite("backend", qdisk, scope), timeout=limit),
        BENCH,  # before the blkfront job, which loads xen-blkfront (and unloads it when done)
    ]
    blkfront = "--frontend=live --xen-vdev=xvdh"
    backend_min = with_module("xen-blkback", BLKBACK_MIN, live_suite("backend", blkback, scope),
                              loaded_after=True)  # fmt: skip
    frontend_min = with_module("xen-blkfront", BLKFRONT_MIN, live_suite("frontend", blkfront, scope),
                               loaded_after=False)  # fmt: skip
    if scope == "full":
        jobs.append(Job("live-blkback-min", backend_min, timeout=limit))
    jobs.append(Job("live-blkfront", live_suite("frontend", blkfront, scope), timeout=limit))
    if scope == "full":
        jobs.append(Job("live-blkfront-min", frontend_min, timeout=limit))
    # The trees the real drivers write, recorded as fixtures (xl block-attach + kernel blkfront).
    record = "python3 -m blkif_spec.lab.record --device /dev/loop2 --out $LAB_OUT"
    jobs.append(Job("record", record, timeout=240))
    if scope == "full":
        # Tests that have crashed a driver in dom0's kernel (marker host_hazard) run last of all:
        # the host may be unusable afterwards, and the VM is thrown away.
        hazards = live_suite("frontend", blkfront, scope) + " -m host_hazard --xen-allow-host-crash"
        jobs.append(Job("live-blkfront-hazards", hazards, timeout=600))
    return tuple(jobs)


DEFAULT_PLAN: tuple[Job, ...] = plan_for("quick")


def select(plan: Sequence[Job], names: Iterable[str] = ()) -> list[Job]:
    """The jobs named (in plan order), or the whole plan when none are; an unknown name is an error."""
    wanted = list(dict.fromkeys(names))
    if not wanted:
        return list(plan)
    known = {job.name for job in plan}
    if len(known) != len(plan):
        raise ValueError("the plan has two jobs with the same name")
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise ValueError(f"no job named {', '.join(unknown)} in the plan (known: {', '.join(sorted(known))})")
    return [job for job in plan if job.name in wanted]


_RUNNER = """\
#!/bin/sh
# Generated by blkif_spec.lab (plan.py): runs the selected jobs in dom0, one after the other.
# Each job: cwd {project}, LAB_OUT={share}/<job>; log.txt, rc and seconds land in LAB_OUT.
sync_bounded() {{  # at most 30 s: a device wedged by a host_hazard test can hang sync for good
    sync & s=$!
    n=0
    while kill -0 "$s" 2>/dev/null && [ "$n" -lt 300 ]; do sleep 0.1; n=$((n + 1)); done
}}
lab_job() {{
    name=$1; limit=$2; cmd=$3
    out={share}/$name
    mkdir -p "$out"
    echo "LAB-JOB-START $name"
    t0=$(cut -d' ' -f1 /proc/uptime)
    (cd {project} && LAB_OUT=$out LAB_JOB=$name exec timeout -k 10 "$limit" sh -c "$cmd") \\
        >"$out/log.txt" 2>&1 </dev/null
    rc=$?
    t1=$(cut -d' ' -f1 /proc/uptime)
    echo "$rc" >"$out/rc"
    awk "BEGIN {{ printf \\"%.2f\\\\n\\", $t1 - $t0 }}" >"$out/seconds"
    sync_bounded
    echo "LAB-JOB-END $name rc=$rc"
}}
"""


def jobs_script(jobs: Sequence[Job], *, share: str = SHARE, project: str = PROJECT) -> str:
    """The script the guest's init runs; every job's words are shell-quoted, so any command is safe."""
    lines = [_RUNNER.format(share=share, project=project)]
    lines += [f"lab_job {job.name} {job.timeout} {shlex.quote(job.command)}" for job in jobs]
    return "\n".join(lines) + "\n"
