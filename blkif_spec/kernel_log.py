"""The dmesg oracle of live runs (conventions §7, after blktests): what dom0's kernel and Xen logged
while a test ran.

A WARN, BUG or Oops (or Xen's own assertion or crash report) fails the test
whatever it expected. An error line of a Xen block or grant driver fails it
unless the test declared that it provokes that line (`@pytest.mark.provokes`,
regular expressions): blkback rightly complains about the hostile requests
some tests send, and a complaint nobody asked for is a finding. Either way the
lines are quoted in the test's output. Pure judging here; `KernelLog` reads
/dev/kmsg and `xl dmesg` on a live host.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from blkif_spec import bounded

# A crash report or kernel warning, in dom0's log or Xen's console ring.
FATAL = re.compile(
    r"WARNING:|\bBUG[: ]|\bOops\b|general protection fault|kernel BUG at|Kernel panic|UBSAN:|KASAN:"
    r"|Assertion '.*' failed|FATAL TRAP|Xen BUG at|Xen WARN at|Xen call trace"
    r"|segfault at"  # a user-space backend (QEMU) crashed
)
# The drivers whose complaints are about the protocol under test.
DRIVERS = re.compile(
    r"xen-blkback|xen-blkfront|\bblkfront\b|\bblkback\b|\bvbd[- ]|xen-block|xen_blkif|xenbus|gntdev|gntalloc"
    r"|grant[ -]table|evtchn"
)
KERN_WARNING = 4  # syslog levels 0..4 (emerg .. warning) count as complaints from those drivers


@dataclass(frozen=True)
class Line:
    source: str  # "dom0" or "xen"
    level: int  # syslog level (Xen's ring has none: 4)
    text: str

    def __str__(self) -> str:
        return f"[{self.source} <{self.level}>] {self.text}"


@dataclass
class Judgement:
    lines: list[Line] = field(default_factory=list)  # everything logged in the window
    fatal: list[Line] = field(default_factory=list)
    undeclared: list[Line] = field(default_factory=list)  # driver complaints the test did not expect

    @property
    def failed(self) -> bool:
        return bool(self.fatal or self.undeclared)

    def message(self) -> str:
        parts = []
        if self.fatal:
            parts.append("a kernel or Xen crash report (fails whatever the test expected):")
            parts += [f"  {line}" for line in self.fatal]
        if self.undeclared:
            parts.append("driver complaints the test did not declare (@pytest.mark.provokes):")
            parts += [f"  {line}" for line in self.undeclared]
        return "dmesg oracle: " + "\n".join(parts)


def judge(lines: Sequence[Line], provoked: Iterable[str] = ()) -> Judgement:
    """Sort a window's lines into crash reports and undeclared driver complaints."""
    expected = [re.compile(p) for p in provoked]
    verdict = Judgement(list(lines))
    for line in lines:
        if FATAL.search(line.text):
            verdict.fatal.append(line)
        elif line.level <= KERN_WARNING and DRIVERS.search(line.text):
            if not any(p.search(line.text) for p in expected):
                verdict.undeclared.append(line)
    return verdict


def parse_kmsg(record: str) -> Line | None:
    """One /dev/kmsg record, `prio,seq,usec,flags[,...];text` (continuation lines dropped)."""
    head, sep, text = record.partition(";")
    if not sep:
        return None
    try:
        level = int(head.split(",", 1)[0]) & 7
    except ValueError:
        return None
    return Line("dom0", level, text.split("\n", 1)[0].rstrip())


def new_console_lines(before: list[str], after: list[str], anchor: int = 5) -> list[str]:
    """The lines of a console ring's second read that the first did not have: the ring grows at the
    end and loses lines at the start, so the new ones follow the last place where the first read's
    final lines (as many as are still there, up to `anchor`) appear."""
    for k in range(min(anchor, len(before)), 0, -1):
        tail = before[-k:]
        for i in range(len(after) - k, -1, -1):
            if after[i : i + k] == tail:
                return after[i + k :]
    return after  # nothing read before, or the ring turned over entirely: all of it is new


class KernelLog:
    """dom0's /dev/kmsg from now on, and Xen's console ring (`xl dmesg`, never cleared: `-c` would
    take the host's log away)."""

    def __init__(self, xl_timeout: float = 10.0) -> None:
        self.xl_timeout = xl_timeout
        self._fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        os.lseek(self._fd, 0, os.SEEK_END)
        self._xen = self._xl_dmesg()

    def _xl_dmesg(self) -> list[str]:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            run = bounded.run(["xl", "dmesg"], self.xl_timeout)
            return run.stdout.splitlines()
        return []

    def read(self, xen: bool = True) -> list[Line]:
        """What was logged since the last read; Xen's ring only when `xen` (`xl dmesg` costs about
        a second under TCG, so a test reads it once, at its end)."""
        lines = []
        while True:
            try:
                record = os.read(self._fd, 8192).decode(errors="replace")
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EPIPE:  # overwritten before we read it: say so, go on
                    lines.append(Line("dom0", 4, "(kernel log records lost: the ring overwrote them)"))
                    continue
                raise
            line = parse_kmsg(record)
            if line is not None:
                lines.append(line)
        if xen:
            ring = self._xl_dmesg()
            lines += [Line("xen", KERN_WARNING, text) for text in new_console_lines(self._xen, ring)]
            self._xen = ring
        return lines

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
