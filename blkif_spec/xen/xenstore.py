"""`api.XenStore` over the pyxs-based `XsClient`: the one XenStore service drivers use.

The same class serves the simulation (a socket of the in-process xenstored) and
a real host (`/var/run/xenstored/socket`), since both are pyxs connections.
It maps the client's errors onto `blkif_spec.xen.api`'s: an absent node reads
as None, XenStore error replies become `XenStoreError(name)`, a bounded wait
that expires becomes `XenTimeout`, a lost connection `XenError`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

from blkif_spec.xen.api import XenError, XenStoreError, XenTimeout
from blkif_spec.xen.xs_client import XsClient, XsConnectionLost, XsTimeout, XsTransaction, XsWatch
from blkif_spec.xen.xs_wire import XsError

T = TypeVar("T")


@contextlib.contextmanager
def _translated(op: str, path: str = "") -> Iterator[None]:
    try:
        yield
    except XsError as exc:
        raise XenStoreError(exc.name, op, path) from None
    except XsTimeout as exc:
        raise XenTimeout(str(exc)) from None
    except XsConnectionLost as exc:
        raise XenError(f"{op} {path}: XenStore connection lost ({exc})") from None


class _Nodes:
    """Read/write operations shared by the store and its transactions."""

    _ops: XsClient | XsTransaction

    def read(self, path: str) -> str | None:
        try:
            with _translated("read", path):
                return self._ops.read(path).decode("latin-1")
        except XenStoreError as exc:
            if exc.name == "ENOENT":
                return None
            raise

    def write(self, path: str, value: str) -> None:
        with _translated("write", path):
            self._ops.write(path, value)

    def mkdir(self, path: str) -> None:
        with _translated("mkdir", path):
            self._ops.mkdir(path)

    def rm(self, path: str) -> None:
        with _translated("rm", path):
            self._ops.rm(path)

    def directory(self, path: str) -> list[str]:
        with _translated("directory", path):
            return self._ops.list(path)

    def get_perms(self, path: str) -> list[str]:
        with _translated("get_perms", path):
            return self._ops.get_perms(path)

    def set_perms(self, path: str, perms: Sequence[str]) -> None:
        with _translated("set_perms", path):
            self._ops.set_perms(path, list(perms))


class _Txn(_Nodes):
    def __init__(self, tx: XsTransaction) -> None:
        self._ops = tx


class _Watch:
    def __init__(self, watch: XsWatch) -> None:
        self._watch = watch
        self.path = watch.path
        self.token = watch.token

    def wait(self, timeout: float) -> str | None:
        with _translated("watch", self.path):
            event = self._watch.wait_event(timeout)
        return None if event is None else event.path

    def close(self) -> None:
        with contextlib.suppress(XsTimeout, XsConnectionLost, XsError):
            self._watch.unwatch()


class PyxsStore(_Nodes):
    """One domain's XenStore connection as `api.XenStore`."""

    def __init__(self, client: XsClient, domid: int) -> None:
        self._client = client
        self._ops = client
        self.domid = domid

    @classmethod
    def connect(cls, socket_path: str, domid: int, *, timeout: float = 2.0) -> PyxsStore:
        with _translated("connect", socket_path):
            return cls(XsClient(socket_path, timeout=timeout), domid)

    def watch(self, path: str, token: str) -> _Watch:
        with _translated("watch", path):
            return _Watch(self._client.watch(path, token))

    @contextlib.contextmanager
    def transaction(self) -> Iterator[_Txn]:
        """One attempt; a conflicting commit raises XenStoreError('EAGAIN') (use `transact`)."""
        with _translated("transaction"):
            tx = self._client.transaction()
        with _translated("transaction"), tx:
            yield _Txn(tx)

    def transact(self, body: Callable[[_Txn], T], attempts: int = 8) -> T:
        """Run `body` in a transaction, retrying it on EAGAIN up to `attempts` times (XS-16)."""
        for attempt in range(attempts):
            try:
                with self.transaction() as t:
                    result = body(t)
                return result
            except XenStoreError as exc:
                if exc.name != "EAGAIN" or attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._client.close()
