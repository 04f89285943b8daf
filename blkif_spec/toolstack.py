"""The toolstack role (libxl's part of a vbd's life), played by the suite itself.

The suite always creates and removes the device directories (conventions §3):
it writes the keys libxl writes, in libxl's order (recorded with `xenstored -T`,
`fixtures/` and inventory §4.2), with the permissions of XK-3, and performs a
libxl-style detach (SM-20). Targets never run in the toolstack's domain.
"""

from __future__ import annotations

from dataclasses import dataclass

from blkif_spec.consts import XenbusState
from blkif_spec.xen.api import XenStore


@dataclass(frozen=True)
class Vbd:
    """Where one virtual block device lives in XenStore (XK-1)."""

    frontend_domid: int
    backend_domid: int
    devid: int = 51712  # xvda: (202 << 8) | (0 << 4)
    kind: str = "vbd"  # vbd (blkback), qdisk (QEMU)
    dev: str = "xvda"

    @property
    def frontend_path(self) -> str:
        return f"/local/domain/{self.frontend_domid}/device/vbd/{self.devid}"

    @property
    def backend_path(self) -> str:
        return f"/local/domain/{self.backend_domid}/backend/{self.kind}/{self.frontend_domid}/{self.devid}"


def create(store: XenStore, vbd: Vbd, *, readonly: bool = False, discard: bool = True,
           params: str = "", trusted: bool = True, protocol: str | None = None) -> None:  # fmt: skip
    """libxl's device creation: both directories at Initialising, each owned by its domain (SM-1, XK-3).

    `discard-enable` and `dev` are always written (XK-B12, XK-B17: QEMU needs both).
    """
    be, fe = vbd.backend_path, vbd.frontend_path
    backend_keys = {
        "frontend": fe,
        "params": params,
        "frontend-id": str(vbd.frontend_domid),
        "online": "1",
        "removable": "0",
        "bootable": "1",
        "state": str(int(XenbusState.Initialising)),
        "dev": vbd.dev,
        "type": "phy",
        "mode": "r" if readonly else "w",
        "device-type": "disk",
        "discard-enable": "1" if discard else "0",
        "specification": "xen",
    }
    frontend_keys = {
        "backend": be,
        "backend-id": str(vbd.backend_domid),
        "state": str(int(XenbusState.Initialising)),
        "virtual-device": str(vbd.devid),
        "device-type": "disk",
        "trusted": "1" if trusted else "0",
    }
    if protocol is not None:
        frontend_keys["protocol"] = protocol  # libxl pre-writes it for PV guests (XK-F7)

    def write(t) -> None:
        # XK-3: each directory is owned by its domain and readable by the peer, set right
        # after MKDIR (as libxl does) so that every key written below inherits it.
        for path, owner, peer in ((be, vbd.backend_domid, vbd.frontend_domid),
                                  (fe, vbd.frontend_domid, vbd.backend_domid)):  # fmt: skip
            if t.read(path) is not None:  # a stale device of the same id (libxl's RM first)
                t.rm(path)
            t.mkdir(path)
            t.set_perms(path, [f"n{owner}", f"r{peer}"])
        for key, value in backend_keys.items():
            t.write(f"{be}/{key}", value)
        for key, value in frontend_keys.items():
            t.write(f"{fe}/{key}", value)

    store.transact(write)


def request_detach(store: XenStore, vbd: Vbd) -> None:
    """SM-20: `online=0` and backend `state=Closing` in one transaction, as libxl does (never
    re-creating a directory the backend removed)."""

    def write(t) -> None:
        if t.read(vbd.backend_path) is None:
            return  # the backend removed its directory (refused the device): nothing to detach
        t.write(f"{vbd.backend_path}/online", "0")
        if t.read(f"{vbd.backend_path}/state") != str(int(XenbusState.Closed)):
            t.write(f"{vbd.backend_path}/state", str(int(XenbusState.Closing)))

    store.transact(write)


def destroy(store: XenStore, vbd: Vbd) -> None:
    """Remove both directories (and the frontend's error node, if a driver wrote one)."""
    paths = [vbd.backend_path, vbd.frontend_path]
    for domid, path in ((vbd.backend_domid, vbd.backend_path), (vbd.frontend_domid, vbd.frontend_path)):
        home = f"/local/domain/{domid}"
        paths.append(f"{home}/error/{path.removeprefix(home + '/')}")
    for path in paths:
        if store.read(path) is not None:
            store.rm(path)
