"""Which kernel modules go into dom0's image: the ones the lab loads, and what they depend on.

A whole Debian modules tree is ~400 MB; dom0 needs a few dozen. The kernel .deb
ships no `modules.dep`, so dependencies are read from each module's `.modinfo`
strings (`depends=`, `softdep=`); `depmod` then runs in the dom0 root's chroot.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path

# Loaded by the init script or by jobs; missing ones may be built in (modules.builtin covers them).
WANTED: tuple[str, ...] = (
    "xenfs", "xen-evtchn", "xen-gntdev", "xen-gntalloc", "xen-privcmd",
    "xen-blkback", "xen-blkfront", "loop", "null_blk", "configfs",
    "virtio_pci", "9pnet_virtio", "9p",
)  # fmt: skip

_SUFFIX = re.compile(r"\.ko(\.xz|\.zst|\.gz)?$")


def norm(name: str) -> str:
    """Module names treat '-' and '_' alike (as modprobe does)."""
    return name.replace("-", "_")


def index(paths: Iterable[str]) -> dict[str, str]:
    """Module name → path (relative to lib/modules/<version>) for every `.ko[.xz|.zst|.gz]`."""
    out: dict[str, str] = {}
    for path in paths:
        base = path.rsplit("/", 1)[-1]
        if _SUFFIX.search(base):
            out[norm(_SUFFIX.sub("", base))] = path
    return out


def modinfo_deps(blob: bytes) -> set[str]:
    """Names in a module's `depends=` and `softdep=` strings (found anywhere in the uncompressed .ko)."""
    deps: set[str] = set()
    for m in re.finditer(rb"(?:^|\0)depends=([^\0]*)", blob):
        deps.update(norm(d) for d in m.group(1).decode(errors="replace").split(",") if d)
    for m in re.finditer(rb"(?:^|\0)softdep=([^\0]*)", blob):
        words = m.group(1).decode(errors="replace").split()
        deps.update(norm(w) for w in words if not w.endswith(":"))
    return deps


def closure(wanted: Iterable[str], deps_of: Callable[[str], set[str] | None]) -> set[str]:
    """`wanted` plus everything they need, transitively; `deps_of` → None drops a name (built in, absent).

    A callable, so only the modules reached are read (reading all 4000 takes half a minute).
    """
    todo = [norm(w) for w in wanted]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        deps = deps_of(name)
        if deps is None:
            continue
        seen.add(name)
        todo.extend(deps)
    return seen


def needed(tree: Path, wanted: Iterable[str] = WANTED) -> list[str]:
    """Paths (relative to `tree` = lib/modules/<version>) of the modules `wanted` needs, sorted."""
    names = index(str(p.relative_to(tree)) for p in tree.rglob("*.ko*"))

    def deps_of(name: str) -> set[str] | None:
        return modinfo_deps(_read_module(tree / names[name])) if name in names else None

    return sorted(names[n] for n in closure(wanted, deps_of))


def _read_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix == ".xz":
        import lzma

        return lzma.decompress(data)
    if path.suffix == ".gz":
        import gzip

        return gzip.decompress(data)
    if path.suffix == ".zst":
        import subprocess

        return subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=True, timeout=60).stdout
    return data
