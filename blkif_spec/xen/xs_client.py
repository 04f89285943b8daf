"""XenStore client: pyxs 0.4.1 with every wait bounded (PYXS-1..PYXS-14).

pyxs is the client the product uses against a real host, so it stays the
client here; this module only replaces the parts of it that can wait forever
or refuse what XenStore allows. What pyxs lacks, and how it is fixed:

* `RVar.get()` (used by every request) waits on a condition with no timeout,
  so a server that never answers, or a connection that dies while a request
  is in flight, hangs the caller forever. `pyxs.Client` accepts a `router=`;
  `_Router` is a `pyxs.client.Router` whose `send` returns a `_Reply` with a
  bounded `get()` (raising `XsTimeout` naming the op and path), and whose
  thread, when it ends for any reason, fails every pending reply with
  `XsConnectionLost` instead of leaving it waiting. pyxs' own request code
  (`Client.execute_command`, `ack`, `read`, `commit`, ...) runs unchanged on top.
* The router thread dies with an exception on EOF or on an unexpected packet,
  and its socket has no timeout (a half-sent reply blocks its `recv`, a full
  socket blocks `sendall`). `_Router` records the exception instead of
  letting it escape the thread, and `_Transport` (pyxs' transport interface,
  reimplemented) gives the socket a timeout.
* `Router.terminate()` joins the thread without a timeout; `close()` here
  joins with one and, if the thread is stuck, shuts the socket down under it.
* `next_rq_id()` is a global counter without a lock; `_Router.send` numbers
  requests per connection under the send lock (and keeps them within uint32).
* PYXS-10: pyxs refuses empty values and bytes outside 0x20-0x7f.
  `write(path, b"")` sends `XS_WRITE` with payload `path\\0` through pyxs'
  own `ack` (an empty value, exactly what xenstore-write sends). MKDIR would
  not do: it leaves an existing node's value unchanged (XS-10). Values pyxs
  refuses go as a raw `XS_WRITE` packet over the same connection.
* PYXS-8: replies lose trailing NULs; `read_raw()` returns the exact payload.
* `Monitor.wait()` blocks forever; `XsWatch.wait_event(timeout)` reads the
  monitor's queue with a timeout and fails fast once the connection is gone.
* pyxs' privileged helpers check `/proc/xen/capabilities` (PYXS: `Client.SU`),
  which the simulated dom0 lacks; `release_domain` sends the request itself and
  lets the server decide (XK-3).

Errors come back as `XsError` (same class the store model raises), a lost
connection as `XsConnectionLost`, no answer as `XsTimeout`. Paths pyxs' own
checks refuse (PYXS-11) still raise pyxs' `InvalidPath`, a `ValueError`.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import itertools
import queue
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import pyxs
import pyxs.client
import pyxs.connection
import pyxs.helpers
from pyxs._internal import NUL, Op, Packet
from pyxs.exceptions import ConnectionError as PyxsConnectionError
from pyxs.exceptions import PyXSError

from blkif_spec.xen.xs_wire import (
    SPECIAL_WATCH_PATHS,
    XS_ERRORS,
    Message,
    XsError,
    describe,
    is_under,
    op_name,
)

T = TypeVar("T")
DEFAULT_TIMEOUT = 2.0
_PYXS_VALUE = re.compile(rb"^[\x00\x20-\x7f]+$")  # what pyxs' execute_command accepts (PYXS-10)
_tokens = itertools.count(1)


class XsTimeout(TimeoutError):
    """No reply within the bound: the server (or a target's xenstored) hangs."""

    def __init__(self, op: str, path: str | None, timeout: float) -> None:
        self.op, self.path, self.timeout = op, path, timeout
        where = f" {path}" if path else ""
        super().__init__(f"XenStore {op}{where}: no reply within {timeout:g} s")


class XsConnectionLost(ConnectionError):
    """The connection is closed (by us, by the server, or because the domain was destroyed)."""


@dataclass(frozen=True, slots=True)
class WatchEvent:
    path: str
    token: str


def _b(text: str | bytes) -> bytes:
    return text.encode("ascii") if isinstance(text, str) else text


def _s(raw: bytes) -> str:
    return raw.decode("latin-1")


# --------------------------------------------------------------------------- the pyxs layer


class _Reply:
    """Stands in for `pyxs.client.RVar`: the same set/get, but `get` is bounded."""

    __slots__ = ("_done", "error", "op", "packet", "path", "timeout")

    def __init__(self, packet: Packet, timeout: float) -> None:
        self._done = threading.Event()
        self.packet: Packet | None = None
        self.error: BaseException | None = None
        self.timeout = timeout
        self.op = op_name(packet.op)
        self.path = describe(packet.op, packet.payload)[0]

    def set(self, packet: Packet) -> None:
        self.packet = packet
        self._done.set()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self._done.set()

    def get(self) -> Packet:
        if not self._done.wait(self.timeout):
            raise XsTimeout(self.op, self.path, self.timeout)
        if self.packet is None:
            raise self.error or XsConnectionLost("connection closed")
        return self.packet


class _Transport:
    """pyxs' Unix-socket transport interface (fileno/recv/send/close) with a socket timeout."""

    def __init__(self, path: str, timeout: float) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError as exc:
            self.sock.close()
            raise PyxsConnectionError(f"error connecting to {path!r}: {exc}") from exc

    def fileno(self) -> int:
        return self.sock.fileno()

    def recv(self, size: int) -> bytes:
        buf = bytearray()
        while len(buf) < size:
            chunk = self.sock.recv(size - len(buf))
            if not chunk:
                raise OSError(errno.ECONNRESET, "XenStore closed the connection")
            buf += chunk
        return bytes(buf)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


class _Connection(pyxs.connection.UnixSocketConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__(path)
        self.timeout = timeout

    def create_transport(self) -> _Transport:
        return _Transport(self.path, self.timeout)


class _Router(pyxs.client.Router):
    """pyxs' router with bounded replies, per-connection request ids and a quiet death."""

    def __init__(self, connection: _Connection, timeout: float) -> None:
        super().__init__(connection)
        self.thread.name = f"pyxs-router {connection.path}"
        self.timeout = timeout
        self.failure: BaseException | None = None  # why the router thread ended, if not asked to
        self.dead = False
        self._ids = 0
        self._local = threading.local()

    def __call__(self) -> None:
        try:
            super().__call__()
        except BaseException as exc:  # EOF, unexpected packet, malformed event: end, but visibly
            self.failure = exc
        finally:
            with self.send_lock:
                self.dead = True
                pending = list(self.rvars.values())
                self.rvars.clear()
            why = f": {self.failure}" if self.failure is not None else ""
            lost = XsConnectionLost(f"XenStore connection {self.connection.path} closed{why}")
            for reply in pending:
                reply.fail(lost)
            for monitors in list(self.monitors.values()):
                for monitor in list(monitors):
                    monitor.events.put(None)  # wakes wait_event(); None means "connection gone"

    @contextlib.contextmanager
    def deadline(self, timeout: float | None) -> Iterator[None]:
        """Bound the replies awaited by this thread inside the block."""
        previous = getattr(self._local, "timeout", None)
        self._local.timeout = timeout
        try:
            yield
        finally:
            self._local.timeout = previous

    def send(self, packet: Packet) -> _Reply:
        with self.send_lock:
            if self.dead or not self.connection.is_connected:
                raise XsConnectionLost(f"XenStore connection {self.connection.path} is closed")
            self._ids = self._ids % 0xFFFFFFFF + 1
            packet = packet._replace(rq_id=self._ids)
            reply = _Reply(packet, getattr(self._local, "timeout", None) or self.timeout)
            self.rvars[packet.rq_id] = reply  # before sending: the reply may beat us back
            try:
                self.connection.send(packet)
            except BaseException:
                self.rvars.pop(packet.rq_id, None)
                raise
            return reply

    def terminate(self, timeout: float = 1.0) -> None:
        """Stop the thread within `timeout`, whatever it is blocked on."""
        if self.thread.ident is None:  # never started: nothing to join
            self.dead = True
            self.connection.close()
            for sock in (self.r_terminator, self.w_terminator):
                sock.close()
            return
        with contextlib.suppress(OSError):
            self.w_terminator.sendall(NUL)
        self.thread.join(timeout / 2)
        if self.thread.is_alive():
            transport = self.connection.transport
            if transport is not None:
                with contextlib.suppress(OSError):
                    transport.sock.shutdown(socket.SHUT_RDWR)
            self.thread.join(timeout / 2)


# --------------------------------------------------------------------------- the public API


def _xs_error(exc: PyXSError) -> XsError:
    """pyxs' PyXSError(errno, strerror) back to the wire's error name."""
    code = exc.args[0] if exc.args else None
    if isinstance(code, int):
        name = errno.errorcode.get(code, "")
        if name in XS_ERRORS:
            return XsError(name)
        return XsError("EINVAL", f"unrecognised error reply ({code})")
    return XsError("EIO", f"unexpected reply {code!r}")


class _Ops:
    """Node operations shared by a client and its transactions (which differ only in tx_id)."""

    _client: XsClient
    _c: pyxs.Client

    def _call(self, fn: Callable[..., T], *args: Any, timeout: float | None = None) -> T:
        router = self._client._router
        with router.deadline(timeout):
            try:
                return fn(*args)
            except (XsTimeout, XsConnectionLost, ValueError):
                raise
            except PyxsConnectionError as exc:
                raise XsConnectionLost(str(exc)) from exc
            except PyXSError as exc:
                raise _xs_error(exc) from None

    def read(self, path: str | bytes, *, timeout: float | None = None) -> bytes:
        """The value (bytes, trailing NULs stripped by pyxs, PYXS-8); XsError('ENOENT') if absent."""
        return self._call(self._c.read, _b(path), timeout=timeout)

    def read_text(
        self, path: str | bytes, default: str | None = None, *, timeout: float | None = None
    ) -> str:
        """The value as text; `default` instead of ENOENT when given."""
        try:
            return self.read(path, timeout=timeout).decode("latin-1")
        except XsError as exc:
            if exc.name == "ENOENT" and default is not None:
                return default
            raise

    def read_raw(self, path: str | bytes, *, timeout: float | None = None) -> bytes:
        """The exact value bytes, trailing NULs included (XS-17 checks)."""
        reply = self.request(Op.READ, _b(path) + NUL, timeout=timeout)
        if reply.type == Op.ERROR:
            raise XsError(reply.payload.rstrip(b"\0").decode("ascii", "replace"))
        return reply.payload

    def write(self, path: str | bytes, value: str | bytes, *, timeout: float | None = None) -> None:
        """Set a value, creating missing parents (XS-10); empty and non-printable values work."""
        path, value = _b(path), _b(value)
        if not value:  # PYXS-10: pyxs refuses an empty argument, not an empty value
            self._call(self._c.ack, Op.WRITE, path + NUL, timeout=timeout)
        elif _PYXS_VALUE.match(value):
            self._call(self._c.write, path, value, timeout=timeout)
        else:
            pyxs.helpers.check_path(path)
            reply = self.request(Op.WRITE, path + NUL + value, timeout=timeout)
            if reply.type == Op.ERROR:
                raise XsError(reply.payload.rstrip(b"\0").decode("ascii", "replace"))

    def mkdir(self, path: str | bytes, *, timeout: float | None = None) -> None:
        self._call(self._c.mkdir, _b(path), timeout=timeout)

    def rm(self, path: str | bytes, *, timeout: float | None = None) -> None:
        """Remove the node and its subtree; OK if absent but its parent exists (XS-12)."""
        self._call(self._c.delete, _b(path), timeout=timeout)

    def list(self, path: str | bytes, *, timeout: float | None = None) -> list[str]:
        return [_s(name) for name in self._call(self._c.list, _b(path), timeout=timeout)]

    directory = list

    def exists(self, path: str | bytes, *, timeout: float | None = None) -> bool:
        return self._call(self._c.exists, _b(path), timeout=timeout)

    def get_perms(self, path: str | bytes, *, timeout: float | None = None) -> list[str]:
        """Entries like `["n0", "r1"]` (XS-13)."""
        return [_s(p) for p in self._call(self._c.get_perms, _b(path), timeout=timeout)]

    def set_perms(
        self, path: str | bytes, perms: str | Iterable[str], *, timeout: float | None = None
    ) -> None:
        """`perms` as `"n0 r1"` or `["n0", "r1"]`."""
        items = perms.split() if isinstance(perms, str) else list(perms)
        self._call(self._c.set_perms, _b(path), [_b(p) for p in items], timeout=timeout)

    def request(
        self, op: int, payload: bytes, *, tx_id: int | None = None, timeout: float | None = None
    ) -> Message:
        """One raw request over this connection (ops 0-19 only: pyxs' Packet refuses others).

        The reply comes back as a `Message`, an XS_ERROR included, not raised.
        """
        tx = self._c.tx_id if tx_id is None else tx_id
        router = self._client._router
        with router.deadline(timeout):
            try:
                packet = router.send(Packet(op, payload, rq_id=0, tx_id=tx)).get()
            except PyxsConnectionError as exc:
                raise XsConnectionLost(str(exc)) from exc
        return Message(packet.op, packet.rq_id, packet.tx_id, packet.payload)


class XsTransaction(_Ops):
    """One attempt at a transaction (XS-16): commits on a clean exit, aborts on an exception.

    Used alone, a conflicting commit raises XsError('EAGAIN'); handed out by
    `XsClient.transactions()`, a conflict is left for the loop to retry.
    """

    def __init__(self, client: XsClient, *, retrying: bool = False, timeout: float | None = None) -> None:
        self._client = client
        self._c = copy.copy(client._c)  # shares the connection, has its own tx_id (pyxs' design)
        self._retrying = retrying
        self.committed = False
        self.conflicted = False
        self._done = False
        self._call(self._c.transaction, timeout=timeout)
        self.id: int = self._c.tx_id

    def __repr__(self) -> str:
        return f"XsTransaction(id={self.id}, committed={self.committed})"

    def commit(self, *, timeout: float | None = None) -> bool:
        """True if committed, False on EAGAIN; either way the transaction is over."""
        if self._done:
            raise RuntimeError("transaction already ended")
        self._done = True
        self.committed = self._call(self._c.commit, timeout=timeout)
        self.conflicted = not self.committed
        return self.committed

    def abort(self, *, timeout: float | None = None) -> None:
        if self._done:
            return
        self._done = True
        try:
            self._call(self._c.rollback, timeout=timeout)
        finally:
            self._c.tx_id = 0

    def __enter__(self) -> XsTransaction:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            with contextlib.suppress(XsError, XsTimeout, XsConnectionLost):
                self.abort()
            return
        if not self._done and not self.commit() and not self._retrying:
            raise XsError("EAGAIN", f"transaction {self.id} conflicted")


class XsWatch:
    """A registered watch; events arrive through pyxs' router thread into a queue."""

    def __init__(self, client: XsClient, path: str | bytes, token: str | bytes | None = None) -> None:
        self._client = client
        self.path = _s(_b(path))
        self.token = _s(_b(token)) if token is not None else f"blkif-{next(_tokens)}"
        self._monitor = client._c.monitor()
        self._active = False
        try:
            client._call(self._monitor.watch, _b(self.path), self.token.encode("latin-1"))
        except BaseException:
            with contextlib.suppress(ValueError):
                client._router.unsubscribe(self.token.encode("latin-1"), self._monitor)
            raise
        self._active = True

    def __repr__(self) -> str:
        return f"XsWatch(path={self.path!r}, token={self.token!r})"

    def _ours(self, path: str) -> bool:
        if self.path in SPECIAL_WATCH_PATHS:
            return path == self.path
        return is_under(path, self.path)

    def wait_event(self, timeout: float | None = None) -> WatchEvent | None:
        """The next event for this watch, or None if none arrives within `timeout` (bounded).

        Raises XsConnectionLost once the connection is gone and no event is left.
        """
        end = time.monotonic() + (self._client.timeout if timeout is None else timeout)
        events = self._monitor.events
        while True:
            try:
                item = events.get(timeout=max(end - time.monotonic(), 0.0))
            except queue.Empty:
                return None
            if item is None:
                events.put(None)  # stay "gone" for later calls
                raise XsConnectionLost(f"XenStore connection {self._client.path} closed")
            path, token = _s(item[0]), _s(item[1])
            if token == self.token and self._ours(path):
                return WatchEvent(path, token)

    def drain(self) -> list[WatchEvent]:
        """Events already queued, without waiting."""
        out = []
        while (event := self.wait_event(0)) is not None:
            out.append(event)
        return out

    def unwatch(self, *, timeout: float | None = None) -> None:
        if not self._active:
            return
        self._active = False
        try:
            self._client._call(
                self._monitor.unwatch, _b(self.path), self.token.encode("latin-1"), timeout=timeout
            )
        except (XsConnectionLost, XsError):
            with contextlib.suppress(ValueError):
                self._client._router.unsubscribe(self.token.encode("latin-1"), self._monitor)

    def __enter__(self) -> XsWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(XsTimeout, XsConnectionLost):
            self.unwatch()


class XsClient(_Ops):
    """A XenStore connection (one domain's identity in simulation) with bounded calls.

    `timeout` bounds every call (each also takes `timeout=`); `close()` never hangs.
    """

    def __init__(self, socket_path: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.path = socket_path
        self.timeout = timeout
        self._client = self
        self._router = _Router(_Connection(socket_path, timeout), timeout)
        self._c = pyxs.Client(router=self._router)
        try:
            self._router.start()
        except PyxsConnectionError as exc:
            self._router.terminate(timeout)
            raise XsConnectionLost(str(exc)) from exc

    def __repr__(self) -> str:
        return f"XsClient({self.path!r})"

    def __enter__(self) -> XsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._router.dead or not self._router.connection.is_connected

    @property
    def failure(self) -> BaseException | None:
        """Why the connection ended, when it was not closed by us."""
        return self._router.failure

    def close(self, timeout: float = 1.0) -> None:
        """Close the connection; returns within `timeout` (pyxs' own join has none)."""
        self._router.terminate(timeout)

    # ---------------------------------------------------------------- watches and transactions

    def watch(self, path: str | bytes, token: str | bytes | None = None) -> XsWatch:
        """Register a watch (XS-14); its first event, for `path` itself, is already on its way."""
        return XsWatch(self, path, token)

    def transaction(self, *, timeout: float | None = None) -> XsTransaction:
        """A single attempt: `with c.transaction() as tx: tx.write(...)`; EAGAIN raises."""
        return XsTransaction(self, timeout=timeout)

    def transactions(self, attempts: int = 5) -> Iterator[XsTransaction]:
        """Retry on EAGAIN up to `attempts` times::

        for tx in client.transactions():
            with tx:
                tx.write("a", tx.read("b"))
        """
        for _ in range(attempts):
            tx = XsTransaction(self, retrying=True)
            yield tx
            if not tx._done:
                tx.abort()
            if tx.committed:
                return
        raise XsError("EAGAIN", f"transaction still conflicting after {attempts} attempts")

    def transact(self, body: Callable[[XsTransaction], T], attempts: int = 5) -> T:
        """Run `body(tx)` in a transaction, retrying on EAGAIN; returns the committed run's result."""
        for tx in self.transactions(attempts):
            with tx:
                result = body(tx)
            if tx.committed:
                return result
        raise AssertionError("unreachable: transactions() raises when attempts run out")

    # ---------------------------------------------------------------- domains

    def get_domain_path(self, domid: int, *, timeout: float | None = None) -> str:
        return _s(self._call(self._c.get_domain_path, domid, timeout=timeout))

    def is_domain_introduced(self, domid: int, *, timeout: float | None = None) -> bool:
        return self._call(self._c.is_domain_introduced, domid, timeout=timeout)

    def introduce_domain(
        self, domid: int, gfn: int = 0, port: int = 0, *, timeout: float | None = None
    ) -> None:
        self._call(self._c.introduce_domain, domid, gfn, port, timeout=timeout)

    def release_domain(self, domid: int, *, timeout: float | None = None) -> None:
        self._call(self._c.ack, Op.RELEASE, str(domid).encode() + NUL, timeout=timeout)
