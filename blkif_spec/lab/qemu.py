"""The QEMU command line that boots Xen with a PV dom0 (pure: no process is started here).

Facts from the prototype (shared/research/xenlab-notes.md): TCG works, KVM only
where the CPU has VMX/SVM (a software `/dev/kvm` makes Xen die); `-cpu max` needs
`-smap` under TCG or dom0 faults in `create_bounce_frame`; Xen is loaded by QEMU's
multiboot loader, so it must be the gunzipped ELF; dom0 needs ≥ 900 MB for the
unpacked initramfs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path


def kvm_usable(cpuinfo: str, dev_kvm_ok: bool) -> bool:
    """KVM only with hardware virtualisation: the `vmx`/`svm` flag, and a `/dev/kvm` we can open."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags" and {"vmx", "svm"} & set(value.split()):
            return dev_kvm_ok
    return False


@dataclass(frozen=True)
class VmSpec:
    """Everything one boot needs; paths are host paths."""

    xen: Path  # uncompressed multiboot ELF
    kernel: Path  # PV-capable bzImage
    initrd: Path  # concatenated gzip cpio archives
    share: Path  # host directory seen as 9p tag host0 (results)
    serial_log: Path
    qemu: str = "qemu-system-x86_64"
    kvm: bool = False
    memory_mib: int = 2048
    dom0_mem_mib: int = 1024
    cpus: int = 2
    xen_args: tuple[str, ...] = ()  # appended to the Xen command line
    kernel_args: tuple[str, ...] = ()  # appended to dom0's command line


def xen_cmdline(spec: VmSpec) -> str:
    """Xen's command line: fixed dom0 memory, console on COM1 (the serial log), all log levels.

    No `noreboot`: a Xen panic or a dom0 crash then reboots, which `-no-reboot` turns into QEMU's exit.
    No boot-time scrub of free memory: slow under TCG, and nothing here needs it.
    """
    mem = f"{spec.dom0_mem_mib}M"
    args = [f"dom0_mem={mem},max:{mem}", "console=com1", "com1=115200", "loglvl=all", "guest_loglvl=all",
            "console_timestamps=boot", "bootscrub=false"]  # fmt: skip
    return " ".join([*args, *spec.xen_args])


def dom0_cmdline(spec: VmSpec) -> str:
    """dom0's command line: console through Xen (hvc0 → COM1), reboot 5 s after a panic."""
    return " ".join(["console=hvc0", "earlyprintk=xen", "panic=5", *spec.kernel_args])


def _module(path: Path, cmdline: str = "") -> str:
    """One multiboot module for `-initrd`: QEMU splits modules on ',' and reads ',,' as a literal comma."""
    text = f"{path} {cmdline}".rstrip()
    return text.replace(",", ",,")


def qemu_argv(spec: VmSpec) -> list[str]:
    """The full argv; `-no-reboot` makes any reboot (panic, Xen restart) end QEMU, and dom0's poweroff too."""
    if spec.kvm:
        accel = ["-accel", "kvm", "-cpu", "host"]
    else:
        accel = ["-accel", "tcg,thread=multi", "-cpu", "max,-smap"]
    share, serial = str(spec.share), str(spec.serial_log)
    for path in (share, serial):
        if re.search(r"[,\s]", path):
            raise ValueError(f"{path!r}: QEMU's -virtfs and -serial options cannot hold ',' or spaces")
    modules = ",".join([_module(spec.kernel, dom0_cmdline(spec)), _module(spec.initrd)])
    return [
        spec.qemu, *accel,
        "-m", str(spec.memory_mib), "-smp", str(spec.cpus),
        "-nodefaults", "-no-reboot", "-display", "none", "-monitor", "none", "-parallel", "none",
        "-serial", f"file:{serial}",
        "-virtfs", f"local,path={share},mount_tag=host0,security_model=none,id=host0",
        "-kernel", str(spec.xen), "-append", xen_cmdline(spec),
        "-initrd", modules,
    ]  # fmt: skip
