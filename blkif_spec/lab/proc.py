"""Running the host tools the build needs: every call bounded, every failure named by its phase."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from blkif_spec.lab import LabError


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def run(argv: Sequence[str | Path], *, phase: str, timeout: float, what: str, cwd: Path | None = None,
        env: Mapping[str, str] | None = None, check: bool = True) -> str:  # fmt: skip
    """Run to completion and return stdout; a timeout, or a non-zero exit when `check`, raises LabError
    saying `what` failed."""
    args = [str(a) for a in argv]
    try:
        proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)  # fmt: skip
    except subprocess.TimeoutExpired as e:
        raise LabError(phase, f"{what}: no answer within {timeout:.0f} s ({' '.join(args[:4])} …)") from e
    except FileNotFoundError as e:
        raise LabError(phase, f"{what}: {args[0]} not found") from e
    if check and proc.returncode != 0:
        out = _tail(proc.stderr or proc.stdout)
        raise LabError(phase, f"{what}: exit {proc.returncode} from {' '.join(args[:4])} …\n{out}")
    return proc.stdout


def say(message: str) -> None:
    """Progress goes to stderr, so stdout keeps only the summary."""
    print(f"lab: {message}", file=sys.stderr, flush=True)
