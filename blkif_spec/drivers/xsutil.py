"""Small XenStore helpers shared by the reference drivers."""

from __future__ import annotations

from blkif_spec.consts import XenbusState
from blkif_spec.xen.api import XenStore, XenStoreError


def read_tree(store: XenStore, path: str) -> dict[str, str]:
    """Every node under `path` as {relative path: value}; missing nodes vanish quietly.

    This is the plain-dict form `blkif_spec.xenbus` validates and negotiates on.
    """
    tree: dict[str, str] = {}

    def walk(rel: str) -> None:
        full = f"{path}/{rel}" if rel else path
        try:
            children = store.directory(full)
        except XenStoreError:
            return
        for child in children:
            child_rel = f"{rel}/{child}" if rel else child
            value = store.read(f"{path}/{child_rel}")
            if value is not None:
                tree[child_rel] = value
            walk(child_rel)

    walk("")
    return tree


def read_state(store: XenStore, path: str) -> XenbusState:
    """A `state` node as XenbusState; absent or unparseable reads as Unknown (as Linux does)."""
    value = store.read(f"{path}/state")
    try:
        return XenbusState(int(value)) if value is not None else XenbusState.Unknown
    except ValueError:
        return XenbusState.Unknown


def read_int(store: XenStore, path: str, default: int | None = None) -> int | None:
    value = store.read(path)
    if value is None:
        return default
    try:
        return int(value, 10)
    except ValueError:
        return default


def write_error(store: XenStore, device_path: str, errno: int, message: str) -> None:
    """Report a fatal error the Linux way (XK-5): `<home>/error/<device path>/error`."""
    home = f"/local/domain/{store.domid}"
    rel = device_path.removeprefix(home + "/")
    store.write(f"{home}/error/{rel}/error", f"{errno} {message}")
