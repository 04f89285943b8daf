"""Where built images are kept between runs, and the keys that say when one must be rebuilt.

Each layer of the image (dom0 root, Python deps, kernel, Xen, QEMU override) has
its own key, so changing `--kernel` reuses the slow debootstrap root. A key is a
digest of every input that changes the layer's bytes: Debian package versions,
digests of user-supplied files, the recipe version below. A layer is a folder
`<name>-<key>` built under a lock into a temporary folder and renamed when done;
the two last used builds of each layer are kept.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from blkif_spec.lab import LabError

# Bump when a build step changes what a layer holds (the init script is not in a cached layer).
RECIPE = "1"
KEEP_LAYERS = 2  # builds kept per layer, so switching between two kernels does not rebuild


def default_cache_dir(env: Mapping[str, str], home: Path) -> Path:
    """`$BLKIF_LAB_CACHE`, else `~/.cache/blkif-conformance/lab`."""
    if env.get("BLKIF_LAB_CACHE"):
        return Path(env["BLKIF_LAB_CACHE"])
    return home / ".cache" / "blkif-conformance" / "lab"


def cache_key(parts: Mapping[str, object]) -> str:
    """A short stable digest of the inputs (order of keys does not matter)."""
    blob = json.dumps({"recipe": RECIPE, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes: user-supplied Xen, kernel and QEMU are keyed by content."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tree_fingerprint(root: Path) -> str:
    """Digest of a tree's names, sizes and mtimes: cheap for a 400 MB modules tree, yet sees a rebuild."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath, name)
            st = path.lstat()
            h.update(f"{path.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def layer(cache_dir: Path, name: str, key: str, build: Callable[[Path], None]) -> tuple[Path, bool]:
    """The layer's folder, built into a temporary one renamed when complete (a crash leaves no half
    layer); its `ok` file's mtime records the last use, for pruning."""
    final = cache_dir / f"{name}-{key}"
    ok = final / "ok"
    with _locked(cache_dir / f".{name}.lock"):  # two runs sharing a cache build a layer once
        if ok.exists():
            ok.touch()
            return final, True
        tmp = cache_dir / f"{name}-{key}.tmp{os.getpid()}"
        remove_tree(tmp)
        tmp.mkdir(parents=True)
        try:
            t0 = time.monotonic()
            build(tmp)
            (tmp / "seconds").write_text(f"{time.monotonic() - t0:.1f}\n")  # how long a miss costs
            (tmp / "ok").write_text("")
            remove_tree(final)
            tmp.rename(final)
        finally:
            remove_tree(tmp)
        _prune(cache_dir, name)
    return final, False


@contextlib.contextmanager
def _locked(path: Path, timeout: float = 1800.0) -> Iterator[None]:
    """An exclusive flock, waited for at most `timeout` s (another run may be building the same layer)."""
    with path.open("a") as f:
        end = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > end:
                    message = f"{path} stayed locked for {timeout:.0f} s by another lab run"
                    raise LabError("build", message) from None
                time.sleep(1)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _prune(cache_dir: Path, name: str, keep: int = KEEP_LAYERS) -> None:
    """Drop all but the `keep` last-used builds of a layer (a rootfs is ~270 MB), and temporary folders
    left by runs that died (their process is gone)."""
    built = sorted(cache_dir.glob(f"{name}-*/ok"), key=lambda p: p.stat().st_mtime, reverse=True)
    for ok in built[keep:]:
        remove_tree(ok.parent)
    for tmp in cache_dir.glob(f"{name}-*.tmp*"):
        pid = tmp.name.rpartition(".tmp")[2]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            remove_tree(tmp)
    for work in cache_dir.glob("run-*"):  # a run's initramfs, left by a lab killed with SIGKILL
        if time.time() - work.stat().st_mtime > 86400:
            remove_tree(work)


def remove_tree(path: Path) -> None:
    """rm -rf that first unmounts whatever a failed debootstrap left mounted inside (proc, sys)."""
    if not path.exists():
        return
    real = str(path.resolve())
    with open("/proc/mounts") as f:
        mounts = [line.split()[1] for line in f]
    for mnt in sorted((m for m in mounts if m.startswith(real + "/")), reverse=True):
        subprocess.run(["umount", "-l", mnt], timeout=30, check=False)
    shutil.rmtree(path, ignore_errors=True)
