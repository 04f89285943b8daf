"""blkif_spec.bounded: a command's time bound holds even for a child that cannot be killed."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from blkif_spec import bounded


def test_output_and_exit_status_come_back() -> None:
    done = bounded.run([sys.executable, "-c", "import sys; print('out'); sys.exit(3)"], 30)
    assert (done.returncode, done.stdout) == (3, "out\n")


def test_a_child_that_will_not_die_is_abandoned(monkeypatch: pytest.MonkeyPatch) -> None:
    """A child stuck in the kernel ignores SIGKILL; here kill() is made a no-op to play one. The call
    must still end (well before the child's 30 s), with TimeoutExpired naming the command."""
    spawned: list[subprocess.Popen[str]] = []
    real_init = subprocess.Popen.__init__

    def recording_init(self, *args, **kwargs) -> None:
        real_init(self, *args, **kwargs)
        spawned.append(self)

    monkeypatch.setattr(subprocess.Popen, "__init__", recording_init)
    monkeypatch.setattr(subprocess.Popen, "kill", lambda self: None)
    monkeypatch.setattr(bounded, "GRACE_S", 0.1)
    t0 = time.monotonic()
    try:
        with pytest.raises(subprocess.TimeoutExpired) as raised:
            bounded.run([sys.executable, "-c", "import time; time.sleep(30)"], 0.2)
        assert time.monotonic() - t0 < 15, "the bound did not hold for an unkillable child"
        assert raised.value.cmd[0] == sys.executable
    finally:
        for proc in spawned:
            proc.send_signal(9)
            proc.wait(10)
