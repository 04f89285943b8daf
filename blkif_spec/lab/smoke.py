"""The lab's smoke job, run in dom0: proves each piece the live jobs rely on, one named check at a time.

`python3 -m blkif_spec.lab.smoke` prints `PASS name: detail` / `FAIL name: detail`
per check, writes `$LAB_OUT/smoke.json`, and exits 1 when any check failed. It
needs the real dom0 (XenStore socket, /dev/xen, xl): it is not a unit test.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from blkif_spec import bounded

XS_SOCKET = "/var/run/xenstored/socket"
XL_TIMEOUT = 60  # xl block-attach takes ~2.5 s under TCG; a hang (missing /dev/stdin) takes 40 s
BACKEND_WAIT = 20.0


_client = None


def _xs():  # -> a connected pyxs.Client, one for the whole job (imported late: the import is a check)
    global _client
    if _client is None:
        from pyxs import Client

        _client = Client(unix_socket_path=XS_SOCKET)
        _client.connect()
    return _client


def _read(path: str) -> str | None:
    """The value, or None when the node does not exist (pyxs raises ENOENT when no default is given)."""
    value = _xs().read(path.encode(), b"\0absent")
    return None if value == b"\0absent" else value.decode()


def _wait_key(path: str, want: Callable[[str | None], bool], timeout: float = BACKEND_WAIT) -> str | None:
    end = time.monotonic() + timeout
    while True:
        value = _read(path)
        if want(value) or time.monotonic() > end:
            return value
        time.sleep(0.2)


def check_imports() -> str:
    versions = {}
    for name in ("blkif_spec", "pyxs", "construct", "hypothesis", "pytest"):
        mod = importlib.import_module(name)
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:  # the project is a plain copy, not installed
            versions[name] = getattr(mod, "__version__", "?")
    major = int(versions["pytest"].split(".")[0])
    assert major >= 8, f"pytest {versions['pytest']} < 8"
    return f"python {sys.version.split()[0]}; " + ", ".join(f"{k} {v}" for k, v in versions.items())


def check_xenstore() -> str:
    c = _xs()
    names = sorted(n.decode() for n in c.list(b"/local/domain/0"))
    domname = c.read(b"/local/domain/0/name", b"").decode()
    assert names, "empty /local/domain/0"
    return f"/local/domain/0 ({domname!r}): {' '.join(names)}"


def check_devices() -> str:
    opened = []
    for name in ("evtchn", "gntdev", "gntalloc", "xenbus", "privcmd"):
        fd = os.open(f"/dev/xen/{name}", os.O_RDWR)
        os.close(fd)
        opened.append(name)
    return "opened /dev/xen/{" + ",".join(opened) + "}"


def _xl(*args: str) -> float:
    t0 = time.monotonic()
    proc = bounded.run(["xl", *args], XL_TIMEOUT)
    assert proc.returncode == 0, f"xl {' '.join(args)}: exit {proc.returncode}: {proc.stderr.strip()}"
    return time.monotonic() - t0


def _attach_detach(kind: str, vdev: str, devid: int, target: str, extra: str = "") -> str:
    """xl attaches to dom0 (frontend-id 0); the check then plays a frontend that closes (5, then 6), as a
    real one does before a detach, and `xl block-detach` must then succeed without -f."""
    be, fe = f"/local/domain/0/backend/{kind}/0/{devid}", f"/local/domain/0/device/vbd/{devid}"
    spec = f"format=raw,vdev={vdev},access=rw,{extra}target={target}"
    t_attach = _xl("block-attach", "0", spec)
    try:
        state = _wait_key(f"{be}/state", lambda v: v in ("2", "4"))
        c = _xs()
        keys = {k.decode(): c.read(f"{be}/{k.decode()}".encode(), b"").decode() for k in c.list(be.encode())}
        assert state == "2", f"{be}/state = {state!r}, expected InitWait (2)"
        for fe_state in ("5", "6"):
            c.write(f"{fe}/state".encode(), fe_state.encode())
            got = _wait_key(f"{be}/state", lambda v, s=fe_state: v == s)
            assert got == fe_state, f"frontend state {fe_state}: backend state {got!r}, expected {fe_state}"
        t_detach = _xl("block-detach", "0", vdev)
    except BaseException:
        bounded.run(["xl", "block-detach", "-f", "0", vdev], XL_TIMEOUT)
        raise
    gone = _wait_key(be, lambda v: v is None, timeout=10)
    assert gone is None, f"{be} still there after block-detach"
    names = ("params", "physical-device", "hotplug-status", "max-ring-page-order",
             "feature-max-indirect-segments", "multi-queue-max-queues")  # fmt: skip
    shown = {k: keys[k] for k in names if k in keys}
    timing = f"attach {t_attach:.1f} s, detach {t_detach:.1f} s"
    return f"InitWait, Closing, Closed; {timing}; {len(keys)} backend keys, e.g. {shown}"


def check_blkback() -> str:
    return _attach_detach("vbd", "xvdd", 51760, "/dev/loop1")


def check_qdisk() -> str:
    assert os.environ.get("LAB_QDISK") == "1", "QEMU's xen backend was not started by init (LAB_QDISK != 1)"
    return _attach_detach("qdisk", "xvde", 51776, "/dev/loop2", "backendtype=qdisk,")


CHECKS: tuple[Callable[[], str], ...] = (
    check_imports, check_xenstore, check_devices, check_blkback, check_qdisk,
)  # fmt: skip
XL_CHECKS = (check_blkback, check_qdisk)  # ~25 s under TCG; the record job attaches with xl too


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args not in ([], ["--without-xl"]):
        print("usage: python3 -m blkif_spec.lab.smoke [--without-xl]", file=sys.stderr)
        return 2
    results = []
    for check in CHECKS:
        if args and check in XL_CHECKS:
            continue
        name = check.__name__.removeprefix("check_")
        t0 = time.monotonic()
        try:
            detail, ok = check(), True
        except Exception as e:  # every failure is reported, and the next check still runs
            detail, ok = f"{type(e).__name__}: {e}", False
        seconds = round(time.monotonic() - t0, 2)
        print(f"{'PASS' if ok else 'FAIL'} {name} ({seconds:.1f} s): {detail}", flush=True)
        results.append({"check": name, "ok": ok, "seconds": seconds, "detail": detail})
    if _client is not None:
        _client.close()
    out = os.environ.get("LAB_OUT")
    if out:
        Path(out, "smoke.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
