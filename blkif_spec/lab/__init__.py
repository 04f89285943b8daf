"""The lab: a real Xen 4.17 host with a Linux 6.1 PV dom0, booted in QEMU, that runs jobs in dom0.

`python -m blkif_spec.lab run --out DIR` builds (and caches) the images from Debian
bookworm packages, boots them, runs the plan's jobs (`plan.py`) in dom0 and brings
their logs back through a 9p share. Modules split the pure parts (command lines,
scripts, keys, result reading) from the ones that run programs, so the first are
unit-tested without QEMU. This module imports nothing: `smoke.py` runs in dom0.

What a job finds in dom0 (set up by guest/init.sh; jobs run one after the other):
  cwd              /opt/blkif-conformance (the project files, byte-compiled; copied every run)
  PYTHONPATH       /opt/blkif-conformance:/opt/site-packages (= /opt/pydeps: pytest, hypothesis, pyxs…)
  python3          Debian 12's 3.11
  LAB_OUT          /mnt/host0/<job>: the job's results folder on the host (OUT/<job>)
  LAB_JOB          the job's name
  LAB_SHARE        /mnt/host0 (= OUT on the host)
  LAB_LOOPS        "/dev/loop0 /dev/loop1 /dev/loop2 /dev/loop3": 64 MiB sparse files in tmpfs
  LAB_XS_TRACE     /tmp/xenstored-trace.log, xenstored's -T trace (copied to OUT at the end)
  LAB_QDISK        1 when QEMU's xen backend runs for dom0 (device-model-pid written), else 0
  LAB_QEMU_DM      that QEMU binary; LAB_GUEST=1
Also: /dev/nullb0 (null_blk, 1 GB), configfs at /sys/kernel/config, /dev/xen/*, XenStore at
/var/run/xenstored/socket, `xl` on PATH; xen-blkback loaded, xen-blkfront not (a job may load it).

What OUT holds afterwards: <job>/{log.txt,rc,seconds,…}, lab.json (phases, cache, versions, each
job's rc), serial.log (Xen + dom0 console), guest-info.txt, dmesg.txt, xen-dmesg.txt,
xenstored-trace.log, jobs.sh (the plan as run), qemu.log.
"""

from __future__ import annotations


class LabError(Exception):
    """A lab failure, named by the phase it happened in (build, boot, jobs) so the message says where."""

    def __init__(self, phase: str, message: str) -> None:
        super().__init__(f"lab {phase} failed: {message}")
        self.phase = phase
