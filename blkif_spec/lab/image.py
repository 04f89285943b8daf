"""Building dom0's image as cached layers, and each run's small layer with the project and `/init`.

Layers (each a gzip cpio, cached under its own key, see cache.py):
  rootfs   debootstrap minbase + Xen tools, python3, QEMU's xen backend   (slow: ~1.5 min)
  pydeps   the project's Python dependencies, pip-installed on the host   (/opt/pydeps)
  kernel   dom0's bzImage and the modules it needs, depmod'ed in the rootfs chroot
  xen      the hypervisor, gunzipped for QEMU's multiboot loader (not in the initramfs)
  qemu     an optional replacement for QEMU's xen backend (--qemu)
The per-run archive (/init and the project) is project.py's.
"""

from __future__ import annotations

import gzip
import os
import shutil
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from blkif_spec.lab import cache, cpio, debian, modules
from blkif_spec.lab.proc import run, say

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
DOM0_PACKAGES = ("xen-utils-4.17", "xenstore-utils", "python3", "kmod", "util-linux", "iproute2", "procps",
                 "qemu-system-xen")  # fmt: skip
# Nothing in dom0 reads these (~210 MB of the root): docs, apt's lists, udev's hardware database
# (no udev runs), Xen's PV shim and the OCaml xenstored.
TRIM = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale", "var/cache/apt",
        "var/lib/apt/lists", "usr/lib/udev/hwdb.d", "usr/lib/udev/hwdb.bin", "usr/lib/xen-4.17/boot",
        "usr/lib/xen-4.17/bin/oxenstored")  # fmt: skip
PYDEPS_DEFAULT = ("pytest>=8.0,<9", "hypothesis>=6.100,<7", "construct>=2.10,<2.11", "pyxs>=0.4.1,<0.5")
GUEST_QEMU = "usr/local/lib/blkif-lab/qemu"


@dataclass(frozen=True)
class Inputs:
    """What the user chose; None means Debian's package."""

    cache_dir: Path
    project: Path
    kernel: Path | None = None
    modules: Path | None = None
    xen: Path | None = None
    qemu: Path | None = None
    mirror: str = MIRROR


@dataclass
class Image:
    """The built layers (in initramfs order) and what they hold."""

    xen: Path
    kernel: Path
    layers: list[Path] = field(default_factory=list)
    hits: dict[str, bool] = field(default_factory=dict)
    built_seconds: dict[str, float] = field(default_factory=dict)  # the layers built by this run
    versions: dict[str, str] = field(default_factory=dict)
    rootfs: Path = Path()


def pydeps_requirements(project: Path) -> list[str]:
    """The project's own runtime dependencies (pyproject.toml), so the guest tests what CI tests."""
    try:
        data = tomllib.loads((project / "pyproject.toml").read_text())
        deps = data["project"]["dependencies"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return list(PYDEPS_DEFAULT)
    return [str(d) for d in deps]


def _rootfs(inputs: Inputs) -> tuple[Path, bool]:
    key = cache.cache_key({"suite": SUITE, "packages": DOM0_PACKAGES, "mirror": inputs.mirror, "trim": TRIM})

    def build(tmp: Path) -> None:
        tree = tmp / "tree"
        debs = inputs.cache_dir / "debootstrap-debs"
        debs.mkdir(parents=True, exist_ok=True)
        say(f"debootstrap --variant=minbase {SUITE} (+ {', '.join(DOM0_PACKAGES)}): about 1.5 min")
        argv = ["debootstrap", "--variant=minbase", f"--include={','.join(DOM0_PACKAGES)}",
                f"--cache-dir={debs}", SUITE, tree, inputs.mirror]  # fmt: skip
        run(argv, phase="build", timeout=1200, what="debootstrap of dom0's root (Debian mirror reachable?)")
        for rel in TRIM:
            path = tree / rel
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)
        (tree / "etc" / "hostname").write_text("dom0\n")
        say("packing rootfs.cpio.gz")
        cpio.pack(tree, tmp / "rootfs.cpio.gz", cpio.entries(tree), root_owner=False)

    return cache.layer(inputs.cache_dir, "rootfs", key, build)


def compile_in_chroot(rootfs_tree: Path, stage: Path, rel: str) -> None:
    """Byte-compile `stage/rel` with dom0's own python3 in the chroot: under TCG, compiling pytest and
    hypothesis at import took ~25 s per job. pip itself runs with --no-compile (the host's Python is not
    dom0's). A file that does not compile is left to the guest; it does not fail the build."""
    inside = f"/tmp/{stage.name}"
    argv = ["chroot", rootfs_tree, "python3", "-m", "compileall", "-q", "-s", inside, "-p", "/",
            f"{inside}/{rel}"]  # fmt: skip
    run(argv, phase="build", timeout=600, what="byte-compiling in the dom0 root's chroot", check=False)


def _pydeps(inputs: Inputs, rootfs: Path) -> tuple[Path, bool]:
    reqs = pydeps_requirements(inputs.project)
    key = cache.cache_key({"requirements": reqs, "python": sys.version_info[:2], "rootfs": rootfs.name})
    rootfs_tree = rootfs / "tree"

    def build(tmp: Path) -> None:
        stage = rootfs_tree / "tmp" / f"lab-pydeps-{os.getpid()}"
        try:
            say(f"pip install --target /opt/pydeps {' '.join(reqs)}")
            run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-compile",
                 "--target", stage / "opt" / "pydeps", *reqs], phase="build", timeout=600,
                what="pip install of the guest's Python dependencies (is PyPI reachable?)")  # fmt: skip
            compile_in_chroot(rootfs_tree, stage, "opt/pydeps")
            tree = tmp / "tree"
            tree.mkdir()
            shutil.move(stage / "opt", tree / "opt")
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        cpio.pack(tree, tmp / "pydeps.cpio.gz", cpio.entries(tree, lambda rel: rel == "opt"), root_owner=True)

    return cache.layer(inputs.cache_dir, "pydeps", key, build)


def _kernel(inputs: Inputs, rootfs_tree: Path) -> tuple[Path, bool, str]:
    if inputs.kernel:
        source = {"kernel": cache.file_digest(inputs.kernel),
                  "modules": cache.tree_fingerprint(inputs.modules) if inputs.modules else None}  # fmt: skip
        label = f"custom {inputs.kernel.name}"
    else:
        package = debian.kernel_package()
        version = debian.candidate(package)
        source = {"package": package, "version": version}
        label = f"{package} {version}"
    key = cache.cache_key({**source, "wanted": modules.WANTED})

    def build(tmp: Path) -> None:
        if inputs.kernel:
            shutil.copyfile(inputs.kernel, tmp / "vmlinuz")
            tree = inputs.modules
        else:
            deb = debian.fetch(source["package"], source["version"], inputs.cache_dir / "debs")
            debian.extract(deb, tmp / "deb")
            shutil.copyfile(next((tmp / "deb" / "boot").glob("vmlinuz-*")), tmp / "vmlinuz")
            tree = next((tmp / "deb" / "lib" / "modules").iterdir())
        release = tree.name if tree else "none"
        (tmp / "release").write_text(release + "\n")
        out = tmp / "tree"
        if tree:
            _install_modules(tree, out / "usr" / "lib" / "modules" / release, rootfs_tree)
        else:
            say("no --modules: every driver the lab needs must be built into the kernel")
            (out / "usr").mkdir(parents=True)
        shutil.rmtree(tmp / "deb", ignore_errors=True)
        skip = cpio.in_base(rootfs_tree)
        cpio.pack(out, tmp / "modules.cpio.gz", cpio.entries(out, skip), root_owner=True)

    path, hit = cache.layer(inputs.cache_dir, "kernel", key, build)
    return path, hit, f"{label} ({(path / 'release').read_text().strip()})"


def _install_modules(tree: Path, dest: Path, rootfs_tree: Path) -> None:
    """Copy the needed modules and run depmod in the dom0 root's chroot (its kmod; the host may have none)."""
    needed = modules.needed(tree)
    say(f"{len(needed)} kernel modules from {tree}")
    stage = rootfs_tree / "tmp" / f"lab-modules-{os.getpid()}"
    staged = stage / "lib" / "modules" / tree.name
    try:
        for rel in [*needed, "modules.builtin", "modules.builtin.modinfo", "modules.order"]:
            if (tree / rel).exists():
                (staged / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(tree / rel, staged / rel)
        argv = ["chroot", rootfs_tree, "depmod", "-b", f"/tmp/{stage.name}", tree.name]
        run(argv, phase="build", timeout=120, what="depmod in the dom0 root's chroot")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(staged, dest)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _xen(inputs: Inputs) -> tuple[Path, bool, str]:
    if inputs.xen:
        source = {"xen": cache.file_digest(inputs.xen)}
        label = f"custom {inputs.xen.name}"
    else:
        version = debian.candidate(debian.XEN_PACKAGE)
        source = {"package": debian.XEN_PACKAGE, "version": version}
        label = f"{debian.XEN_PACKAGE} {version}"

    def build(tmp: Path) -> None:
        if inputs.xen:
            image = inputs.xen
        else:
            deb = debian.fetch(debian.XEN_PACKAGE, source["version"], inputs.cache_dir / "debs")
            debian.extract(deb, tmp / "deb")
            image = next((tmp / "deb" / "boot").glob("xen-*-amd64.gz"))
        data = image.read_bytes()
        (tmp / "xen").write_bytes(gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data)
        shutil.rmtree(tmp / "deb", ignore_errors=True)

    path, hit = cache.layer(inputs.cache_dir, "xen", cache.cache_key(source), build)
    return path, hit, label


def _qemu(inputs: Inputs, rootfs_tree: Path) -> tuple[Path, bool]:
    assert inputs.qemu is not None

    def build(tmp: Path) -> None:
        target = tmp / "tree" / GUEST_QEMU
        target.parent.mkdir(parents=True)
        shutil.copyfile(inputs.qemu, target)
        target.chmod(0o755)
        cpio.pack(tmp / "tree", tmp / "qemu.cpio.gz", cpio.entries(tmp / "tree", cpio.in_base(rootfs_tree)),
                  root_owner=True)  # fmt: skip

    key = cache.cache_key({"qemu": cache.file_digest(inputs.qemu)})
    return cache.layer(inputs.cache_dir, "qemu", key, build)


def build(inputs: Inputs) -> Image:
    """Every cached layer, built when its key is new."""
    inputs.cache_dir.mkdir(parents=True, exist_ok=True)
    rootfs, hit = _rootfs(inputs)
    xen, xen_hit, xen_label = _xen(inputs)
    kernel, kernel_hit, kernel_label = _kernel(inputs, rootfs / "tree")
    pydeps, pydeps_hit = _pydeps(inputs, rootfs)
    image = Image(xen=xen / "xen", kernel=kernel / "vmlinuz", rootfs=rootfs / "tree")
    image.layers = [rootfs / "rootfs.cpio.gz", pydeps / "pydeps.cpio.gz", kernel / "modules.cpio.gz"]
    image.hits = {"rootfs": hit, "xen": xen_hit, "kernel": kernel_hit, "pydeps": pydeps_hit}
    status = (image.rootfs / "var" / "lib" / "dpkg" / "status").read_text()
    dom0 = debian.dpkg_versions(status, {"xen-utils-4.17", "qemu-system-xen", "python3"})
    image.versions = {"xen": xen_label, "kernel": kernel_label, **{f"dom0 {k}": v for k, v in dom0.items()}}
    dirs = {"rootfs": rootfs, "xen": xen, "kernel": kernel, "pydeps": pydeps}
    if inputs.qemu:
        qemu, image.hits["qemu"] = _qemu(inputs, image.rootfs)
        image.layers.append(qemu / "qemu.cpio.gz")
        image.versions["qemu-dm"] = f"custom {inputs.qemu.name}"
        dirs["qemu"] = qemu
    built = [name for name, hit in image.hits.items() if not hit]
    image.built_seconds = {name: float((dirs[name] / "seconds").read_text()) for name in built}
    return image
