"""The dmesg oracle's pure parts: reading /dev/kmsg records and Xen's console ring, and judging."""

from __future__ import annotations

import pytest

from blkif_spec import pytest_plugin
from blkif_spec.kernel_log import Line, judge, new_console_lines, parse_kmsg

BOGUS = "xen-blkback: Frontend provided bogus ring requests (33 - 0 = 33). Halting ring processing"
ORDER = "vbd vbd-0-51792: 22 requested ring page order 9 exceed max:4"


def test_kmsg_records_give_level_and_text() -> None:
    line = parse_kmsg(f"4,1234,5678,-;{BOGUS}\n SUBSYSTEM=xen-backend\n")
    assert line == Line("dom0", 4, BOGUS)
    assert parse_kmsg("30,1,2,-;systemd[1]: started") == Line("dom0", 6, "systemd[1]: started")  # facility 3
    assert parse_kmsg("no separator") is None


@pytest.mark.parametrize(
    "text",
    ["WARNING: CPU: 1 PID: 77 at drivers/block/xen-blkback/blkback.c:1200 xen_blkbk_map+0x1/0x2",
     "BUG: kernel NULL pointer dereference, address: 0000000000000008",
     "Oops: 0000 [#1] PREEMPT SMP NOPTI", "(XEN) Assertion 'i < nr' failed at grant_table.c:1234",
     "xen-qemu-system[226]: segfault at 7f9ce326d040 ip 0000561bb808a590 sp 00007f9c9e9f7f70 error 6"],
)  # fmt: skip
def test_a_crash_report_fails_even_when_declared(text: str) -> None:
    found = judge([Line("dom0", 6, text)], provoked=[".*"])
    assert found.failed and found.fatal and "crash report" in found.message()


def test_a_driver_complaint_fails_unless_declared() -> None:
    lines = [Line("dom0", 4, BOGUS), Line("dom0", 3, ORDER), Line("dom0", 6, "xen-blkback: using 2 queues")]
    found = judge(lines)
    assert found.undeclared == lines[:2] and "did not declare" in found.message()
    assert not judge(lines, provoked=["bogus ring requests", r"vbd vbd-\d+-\d+: \d+ "]).failed


def test_complaints_of_other_subsystems_and_chatter_pass() -> None:
    lines = [
        Line("dom0", 3, "operation not supported error, dev loop0, sector 0 op 0x9:(WRITE_ZEROES)"),
        Line("dom0", 6, "blkfront: xvdh: flush diskcache: enabled; persistent grants: enabled"),
    ]
    found = judge(lines)
    assert not found.failed and found.lines == lines


def test_new_console_lines_follow_the_last_read_even_when_the_ring_scrolled() -> None:
    before = ["a", "b", "c", "d"]
    assert new_console_lines(before, ["a", "b", "c", "d", "e", "f"]) == ["e", "f"]
    assert new_console_lines(before, ["c", "d", "e"]) == ["e"]  # "a", "b" scrolled out
    assert new_console_lines(before, before) == []
    assert new_console_lines(before, ["x", "y"]) == ["x", "y"]  # turned over entirely
    assert new_console_lines([], ["x"]) == ["x"]
    assert new_console_lines(["d"], ["d", "e", "d", "f"]) == ["f"]  # the last place it appears


class _Log:
    def __init__(self, *lines: Line) -> None:
        self.lines = list(lines)

    def read(self, xen: bool = True) -> list[Line]:
        return self.lines


class _Item:
    def __init__(self) -> None:
        self.stash = pytest.Stash()

    def iter_markers(self, name: str) -> list:
        return []


def _report(outcome: str, when: str = "call") -> pytest.TestReport:
    longrepr = None if outcome == "passed" else "boom"
    return pytest.TestReport("t.py::t", ("t.py", 0, "t"), {}, outcome, longrepr, when)


OOPS = Line("dom0", 4, "BUG: kernel NULL pointer dereference, address: 0000000000000000")
COMPLAINT = Line("dom0", 4, "blkfront: xvdh: flush op failed")


@pytest.mark.parametrize("outcome", ["passed", "failed"])
def test_a_crash_in_the_log_makes_the_phase_a_crash_whatever_else_failed(outcome: str) -> None:
    """A teardown that timed out because the kernel oopsed is judged on the oops (verdict fail)."""
    report = _report(outcome, "teardown")
    pytest_plugin._dmesg_oracle(_Log(OOPS), _Item(), report)
    assert report.failed and report.blkif_dmesg == "crash"
    assert pytest_plugin._verdict(_Item(), None, report) == "fail"


def test_an_undeclared_complaint_is_a_complaint_not_a_crash() -> None:
    report = _report("passed")
    pytest_plugin._dmesg_oracle(_Log(COMPLAINT), _Item(), report)
    assert report.failed and report.blkif_dmesg == "complaint"
