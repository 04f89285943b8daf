"""Debian packages: the host tools the lab needs, and the Xen and kernel .debs it unpacks (never installs).

Versions come from `apt-cache` before anything is downloaded, so they can key the
cache: a new kernel in the archive rebuilds the kernel layer and nothing else.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from blkif_spec.lab import LabError
from blkif_spec.lab.proc import run, say

XEN_PACKAGE = "xen-hypervisor-4.17-amd64"
# bookworm's current 6.1 kernel is the linux-image-6.1.0-NN-amd64 this depends on
KERNEL_META = "linux-image-amd64"
HOST_TOOLS = {"debootstrap": "debootstrap", "cpio": "cpio", "gzip": "gzip", "dpkg-deb": "dpkg"}
QEMU_HOST_PACKAGE = "qemu-system-x86"


def missing_packages(qemu: str, which: Callable[[str], str | None] = shutil.which) -> list[str]:
    """Debian packages to install for the tools not on PATH (QEMU only when the default binary is used)."""
    tools = dict(HOST_TOOLS)
    if qemu == "qemu-system-x86_64":
        tools[qemu] = QEMU_HOST_PACKAGE
    return sorted({pkg for tool, pkg in tools.items() if which(tool) is None})


def _apt_update() -> None:
    run(["apt-get", "update", "-qq"], phase="build", timeout=300, what="apt-get update (mirror reachable?)")


def ensure_host_tools(qemu: str) -> list[str]:
    """Install what is missing with apt-get (as root) and say so; return the packages installed."""
    missing = missing_packages(qemu)
    if not missing:
        return []
    if os.geteuid() != 0:
        raise LabError("build", f"missing host tools; as root run: apt-get install {' '.join(missing)}")
    say(f"installing host packages: {' '.join(missing)}")
    _apt_update()
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], phase="build", timeout=900,
        what="apt-get install of host tools", env=env)  # fmt: skip
    return missing


def control_field(text: str, field: str) -> str | None:
    """The first `Field: value` of an apt-cache/dpkg stanza."""
    m = re.search(rf"^{re.escape(field)}:\s*(.*)$", text, flags=re.MULTILINE)
    return m.group(1).strip() if m else None


def kernel_from_depends(depends: str) -> str | None:
    """The versioned image a linux-image-amd64 `Depends:` names (e.g. linux-image-6.1.0-56-amd64)."""
    m = re.search(r"\b(linux-image-6\.1\.0-\d+-amd64)\b", depends)
    return m.group(1) if m else None


def dpkg_versions(status: str, names: set[str]) -> dict[str, str]:
    """Installed versions of `names` from a dpkg status file (what the dom0 root really holds)."""
    out: dict[str, str] = {}
    for stanza in status.split("\n\n"):
        name = control_field(stanza, "Package")
        if name in names and (version := control_field(stanza, "Version")):
            out[name] = version
    return out


def _show(package: str) -> str:
    return run(["apt-cache", "show", "--no-all-versions", package], phase="build", timeout=60,
               what=f"apt-cache show {package}")  # fmt: skip


def candidate(package: str) -> str:
    """The version apt would fetch; refreshes the package lists once when they do not know the package."""
    try:
        text = _show(package)
    except LabError:
        if os.geteuid() != 0:
            raise
        _apt_update()
        text = _show(package)
    version = control_field(text, "Version")
    if not version:
        raise LabError("build", f"apt knows no version of {package}")
    return version


def kernel_package() -> str:
    """linux-image-6.1.0-NN-amd64 that bookworm's linux-image-amd64 currently points at."""
    candidate(KERNEL_META)  # refreshes the lists if needed
    depends = control_field(_show(KERNEL_META), "Depends") or ""
    name = kernel_from_depends(depends)
    if not name:
        raise LabError("build", f"{KERNEL_META} depends on no linux-image-6.1.0-*-amd64: {depends!r}")
    return name


def fetch(package: str, version: str, debs: Path) -> Path:
    """The .deb of `package=version`, downloaded once into `debs/` (kept: the kernel is 70 MB)."""
    folder = debs / f"{package}_{version.replace(':', '%3a')}"
    found = sorted(folder.glob("*.deb")) if folder.is_dir() else []
    if found:
        return found[0]
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    say(f"apt-get download {package}={version}")
    run(["apt-get", "download", "-q", f"{package}={version}"], cwd=tmp, phase="build", timeout=600,
        what=f"apt-get download {package} (is the Debian mirror reachable?)")  # fmt: skip
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return sorted(folder.glob("*.deb"))[0]


def extract(deb: Path, dest: Path) -> None:
    """Unpack a .deb's files (dpkg -x: no maintainer scripts, nothing installed on the host)."""
    dest.mkdir(parents=True, exist_ok=True)
    run(["dpkg-deb", "-x", deb, dest], phase="build", timeout=300, what=f"dpkg-deb -x {deb.name}")
