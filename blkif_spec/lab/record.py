"""Record, in the lab's dom0, the XenStore trees real drivers write, as fixtures (conventions §6).

    python3 -m blkif_spec.lab.record --out DIR [--device /dev/loop2]

For each real backend (Linux blkback; QEMU qdisk when its device model runs)
`xl block-attach` creates a vbd for dom0 itself, the kernel blkfront connects,
and both trees are written to DIR as `<driver>-<version>-connected.json`, then
the device is detached. Every recorded tree goes through the validator: a
fixture records `{"valid": true}` only when the validator found nothing, and
otherwise lists the rules it names, so a real driver's disagreement with the
suite shows up as a fixture to look at, not a silent pass.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from blkif_spec import bounded
from blkif_spec.drivers import xsutil
from blkif_spec.live import DEVICE_MODEL_PID, kernel_frontend_attaches
from blkif_spec.xen.live import LiveDomain
from blkif_spec.xenbus.validate import validate

ATTACH_TIMEOUT = 60.0


def _sh(*argv: str, timeout: float = 60) -> str:
    run = bounded.run(argv, timeout)
    if run.returncode:
        raise RuntimeError(f"{' '.join(argv)}: rc {run.returncode}: {run.stderr.strip()[-400:]}")
    return run.stdout


def _wait_connected(store, path: str) -> None:
    deadline = time.monotonic() + ATTACH_TIMEOUT
    while store.read(f"{path}/state") != "4":
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} not Connected within {ATTACH_TIMEOUT:g} s")
        time.sleep(0.1)


def record(store, kind: str, vdev: str, device: str, source: str) -> dict:
    """Attach with xl, wait for both sides Connected, read both trees, detach."""
    backend = "backendtype=qdisk," if kind == "qdisk" else ""
    spec = f"format=raw,vdev={vdev},access=rw,{backend}target={device}"  # target= must come last (xl)
    _sh("xl", "block-attach", "0", spec)
    devid = (202 << 8) | ((ord(vdev[-1]) - ord("a")) << 4)
    fe = f"/local/domain/0/device/vbd/{devid}"
    be = f"/local/domain/0/backend/{kind}/0/{devid}"
    try:
        _wait_connected(store, fe)
        _wait_connected(store, be)
        backend, frontend = xsutil.read_tree(store, be), xsutil.read_tree(store, fe)
    finally:
        _sh("xl", "block-detach", "0", vdev, timeout=90)
    findings = validate(frontend, backend)
    rules = sorted({f.rule for f in findings})
    expect = {"valid": False, "rules": rules} if rules else {"valid": True}
    return {"source": source, "provenance": "recorded", "paths": {"backend": be, "frontend": fe},
            "backend": backend, "frontend": frontend, "expect": expect}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m blkif_spec.lab.record")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("LAB_OUT", ".")))
    parser.add_argument("--device", default="/dev/loop2", help="for blkback")
    parser.add_argument("--qdisk-device", default="/dev/loop3",
                        help="for qdisk: another device, as blkback may still hold the first")  # fmt: skip
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if not kernel_frontend_attaches():
        _sh("modprobe", "xen-blkfront")
    release = os.uname().release
    dom = LiveDomain(0, timeout=10.0)
    failed = 0
    try:
        kinds = [("vbd", "xvdi", f"linux-{release}-blkback", args.device)]
        if dom.store.read(DEVICE_MODEL_PID):
            kinds.append(("qdisk", "xvdj", f"qemu-qdisk-linux-{release}", args.qdisk_device))
        for kind, vdev, name, device in kinds:
            source = (f"{name}: xl block-attach 0 of {device} as {vdev} in the lab's dom0, read with "
                      f"pyxs once the kernel blkfront and the backend were Connected")  # fmt: skip
            try:
                doc = record(dom.store, kind, vdev, device, source)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                print(f"record {kind}: {exc}", file=sys.stderr)
                failed += 1
                continue
            path = args.out / f"{name}-connected.json"
            path.write_text(json.dumps(doc, indent=2) + "\n")
            print(f"record {kind}: {path.name}: expect {doc['expect']}")
    finally:
        dom.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
