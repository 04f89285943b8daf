"""gzip'd newc cpio archives: dom0's initramfs is several of them, concatenated.

Linux unpacks concatenated compressed archives in order, later entries over
earlier ones; that is what lets the big dom0 root stay cached while each run
appends a small archive with the project and `/init`. An overlay archive must
not name a directory the base has as a symlink (merged /usr: `lib` → `usr/lib`):
the kernel would replace the symlink with a directory. So overlays use real
paths, and leave out directories the base already has.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path

from blkif_spec.lab import LabError


def entries(tree: Path, skip_dir: Callable[[str], bool] = lambda rel: False) -> list[str]:
    """Every path under `tree`, relative, parents before children; directories `skip_dir` accepts are left out
    (their contents are not)."""
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(tree):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, tree)
        if rel_dir != "." and not skip_dir(rel_dir):
            out.append(rel_dir)
        for name in sorted(filenames):
            out.append(name if rel_dir == "." else f"{rel_dir}/{name}")
        # os.walk does not descend into symlinked directories but lists them in dirnames: archive the link.
        for name in dirnames:
            if Path(dirpath, name).is_symlink():
                out.append(name if rel_dir == "." else f"{rel_dir}/{name}")
    return out


def in_base(base: Path) -> Callable[[str], bool]:
    """A `skip_dir` for overlays: true for what the base root has as a directory or a symlink."""
    return lambda rel: os.path.lexists(base / rel)


def pack(tree: Path, out: Path, names: Iterable[str], *, root_owner: bool, timeout: float = 600) -> int:
    """Write `names` (relative to `tree`) as a gzip newc cpio to `out`; return its size in bytes."""
    listing = "".join(f"{n}\n" for n in names).encode()
    owner = ["-R", "0:0"] if root_owner else []
    tmp = out.with_name(out.name + ".part")
    with tmp.open("wb") as sink:
        pipe = subprocess.PIPE
        cpio = subprocess.Popen(["cpio", "--quiet", "-o", "-H", "newc", *owner], cwd=tree, stdin=pipe,
                                stdout=pipe, stderr=pipe)  # fmt: skip
        gz = subprocess.Popen(["gzip", "-6", "-n"], stdin=cpio.stdout, stdout=sink, stderr=pipe)
        assert cpio.stdout is not None
        cpio.stdout.close()
        try:
            _, cpio_err = cpio.communicate(listing, timeout=timeout)
            _, gz_err = gz.communicate(timeout=timeout)
        except subprocess.TimeoutExpired as e:
            cpio.kill()
            gz.kill()
            cpio.wait()
            gz.wait()
            raise LabError("build", f"packing {out.name} took over {timeout:.0f} s") from e
    if cpio.returncode or gz.returncode:
        raise LabError("build", f"packing {out.name}: cpio {cpio.returncode}, gzip {gz.returncode}: "
                                f"{(cpio_err or gz_err).decode(errors='replace')[-500:]}")  # fmt: skip
    tmp.rename(out)
    return out.stat().st_size
