"""Running QEMU once: bounded by a deadline, watched through the serial log, never left running.

The guest's init prints `LAB-<WHAT> <uptime>` markers (guest/init.sh, plan.py);
the host times the phases by when it first sees them: boot = QEMU start to
`LAB-READY`, jobs = `LAB-READY` to `LAB-JOBS-END`. QEMU exits by itself after
dom0's poweroff (`-no-reboot`); past the deadline it is killed, with its group.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from blkif_spec.lab.proc import say

GRACE_S = 30.0  # after LAB-DONE, time for dom0's poweroff to end QEMU


@dataclass
class Boot:
    """What one QEMU run did: when each marker was first seen (s after QEMU started) and how it ended."""

    markers: dict[str, float] = field(default_factory=dict)
    exit_code: int | None = None
    timed_out: bool = False
    seconds: float = 0.0


def scan(text: str) -> list[tuple[str, str]]:
    """(marker, rest of line) for every `LAB-…` line, e.g. ('LAB-JOB-END', 'smoke rc=0')."""
    out = []
    for line in text.splitlines():
        start = line.find("LAB-")
        if start >= 0:
            word, _, rest = line[start:].partition(" ")
            out.append((word, rest.strip()))
    return out


def last_lines(path: Path, count: int = 25) -> str:
    """The end of the serial log, for failure messages."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no serial log)"
    lines = [line for line in text.replace("\r", "").split("\n") if line.strip()]  # Xen's console: \r\r\n
    return "\n".join(lines[-count:])


def boot(argv: list[str], serial_log: Path, qemu_log: Path, timeout: float) -> Boot:
    """Run QEMU until it exits or `timeout` seconds pass; print the guest's markers as they come."""
    result = Boot()
    serial_log.unlink(missing_ok=True)
    t0 = time.monotonic()
    with qemu_log.open("wb") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=_die_with_parent)  # fmt: skip
    offset, pending = 0, ""
    try:
        while True:
            now = time.monotonic() - t0
            offset, pending = _read_markers(serial_log, offset, pending, result, now)
            if proc.poll() is not None:
                break
            done_at = result.markers.get("LAB-DONE")
            if now > timeout or (done_at is not None and now > done_at + GRACE_S):
                result.timed_out = now > timeout
                break
            time.sleep(0.25)
    finally:
        _stop(proc)
        result.seconds = time.monotonic() - t0
        _read_markers(serial_log, offset, pending + "\n", result, result.seconds)
    result.exit_code = proc.returncode
    return result


def _read_markers(path: Path, offset: int, pending: str, result: Boot, now: float) -> tuple[int, str]:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return offset, pending
    text = pending + data.decode(errors="replace")
    complete, _, pending = text.rpartition("\n")
    for word, rest in scan(complete):
        key = f"{word} {rest.split()[0]}" if word.startswith("LAB-JOB-") and rest else word
        result.markers.setdefault(key, now)
        say(f"[{now:6.1f} s] {word} {rest}".rstrip())
    return offset + len(data), pending


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL QEMU when the lab dies, even by SIGKILL (no finally runs then)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """TERM then KILL QEMU's whole process group; bounded."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def phase_times(result: Boot) -> dict[str, float]:
    """boot: QEMU start → dom0 ready; jobs: ready → jobs done; poweroff: jobs done → QEMU exit."""
    ready, end = result.markers.get("LAB-READY"), result.markers.get("LAB-JOBS-END")
    times = {"boot": ready if ready is not None else result.seconds}
    if ready is not None:
        times["jobs"] = (end if end is not None else result.seconds) - ready
    if end is not None:
        times["poweroff"] = result.seconds - end
    return times


def diagnose(result: Boot, timeout: float, serial_log: Path) -> str | None:
    """None when dom0 ran the jobs and powered off; else what went wrong, in which phase, log's end."""
    if "LAB-DONE" in result.markers and not result.timed_out and "LAB-ERROR" not in result.markers:
        return None
    phase = "jobs" if "LAB-READY" in result.markers else "boot"
    running = [k.split(" ", 1)[1] for k in result.markers if k.startswith("LAB-JOB-START ")]
    finished = {k.split(" ", 1)[1] for k in result.markers if k.startswith("LAB-JOB-END ")}
    unfinished = [name for name in running if name not in finished]
    if result.timed_out:
        what = f"timeout: QEMU killed after {timeout:.0f} s"
        if unfinished:
            what += f", while job {unfinished[-1]} was running"
        elif phase == "boot":
            what += " before dom0 was ready (LAB-READY)"
    elif "LAB-ERROR" in result.markers:
        what = "dom0's init reported LAB-ERROR"
    elif "LAB-DONE" in result.markers:
        what = "dom0 powered off but QEMU did not exit"
    else:
        what = f"QEMU exited (code {result.exit_code}) before dom0 finished: a crash or reboot"
    return f"lab {phase} failed: {what}\n--- last lines of {serial_log}:\n{last_lines(serial_log)}"
