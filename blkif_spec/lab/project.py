"""The per-run part of dom0's initramfs (`/init` and the project), and the concatenation of all layers.

Rebuilt every run: it is small, and the project changes; the cached layers come from image.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from blkif_spec.lab import LabError, cpio
from blkif_spec.lab.image import compile_in_chroot

PROJECT_DIRS = ("blkif_spec", "tests", "fixtures", "conftest.py", "pytest.ini", "pyproject.toml")
GUEST_PROJECT = "opt/blkif-conformance"
INIT_SH = Path(__file__).with_name("guest") / "init.sh"


def project_files(project: Path, exclude: tuple[Path, ...] = ()) -> list[str]:
    """Files of the project to copy: git's tracked and untracked-but-not-ignored ones, else the known dirs;
    none under `exclude` (an --out or --cache folder inside the checkout)."""
    try:
        argv = ["git", "-C", str(project), "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
        out = subprocess.run(argv, capture_output=True, timeout=60, check=True).stdout
        names = [n for n in out.decode().split("\0") if n]
    except (OSError, subprocess.SubprocessError):
        names = []
        for top in PROJECT_DIRS:
            path = project / top
            if path.is_file():
                names.append(top)
            elif path.is_dir():
                names += [str(p.relative_to(project)) for p in path.rglob("*") if p.is_file()]
    root = project.resolve()
    skip = [str(p.resolve().relative_to(root)) + "/" for p in exclude if p.resolve().is_relative_to(root)]
    return sorted(n for n in names if (project / n).is_file() and "__pycache__" not in n
                  and not any(n.startswith(s) for s in skip))  # fmt: skip


def run_layer(project: Path, work: Path, rootfs_tree: Path, exclude: tuple[Path, ...] = ()) -> Path:
    """This run's archive: `/init` and the project files (byte-compiled); small, so rebuilt every run."""
    stage = rootfs_tree / "tmp" / f"lab-run-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    try:
        dest = stage / GUEST_PROJECT
        dest.mkdir(parents=True)
        for rel in project_files(project, exclude):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(project / rel, dest / rel)
        compile_in_chroot(rootfs_tree, stage, GUEST_PROJECT)
        shutil.copyfile(INIT_SH, stage / "init")
        (stage / "init").chmod(0o755)
        out = work / "run.cpio.gz"
        cpio.pack(stage, out, cpio.entries(stage, cpio.in_base(rootfs_tree)), root_owner=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out


def concatenate(parts: list[Path], out: Path) -> int:
    """The initramfs QEMU hands to Xen as dom0's module: the archives one after the other."""
    with out.open("wb") as sink:
        for part in parts:
            with part.open("rb") as src:
                shutil.copyfileobj(src, sink, 1 << 20)
    if not parts:
        raise LabError("build", "no initramfs layers")
    return out.stat().st_size
