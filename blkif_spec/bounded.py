"""Commands whose time bound holds even when the kernel never lets go of the child.

`subprocess.run(timeout=…)` kills the child on timeout and then waits for it
without a bound. A child blocked in the kernel (uninterruptible, as a write to
xen-blkfront's `unbind` is once dom0's xenwatch thread has oopsed holding its
locks) never dies, so that wait would hang the whole run. Here the child gets a
short grace after SIGKILL and is then abandoned: the caller learns of the
timeout either way.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

GRACE_S = 2.0  # after SIGKILL: long enough for a normal child to be reaped


def run(argv: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run `argv` (stdin closed, output captured as text); raise `subprocess.TimeoutExpired` after
    at most `timeout` + GRACE_S seconds, whether or not the child could be killed."""
    proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        try:
            proc.communicate(timeout=GRACE_S)
        except subprocess.TimeoutExpired:  # unkillable (D state): abandoned, its pipes closed
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
        raise subprocess.TimeoutExpired(list(argv), timeout) from None
    return subprocess.CompletedProcess(list(argv), proc.returncode, out, err)
