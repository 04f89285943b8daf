"""The simulated xenstored: `XenStore` served over Unix sockets, one socket per domain.

pyxs connects to a plain socket path and cannot say who it is, so identity
comes from the path: `socket_for(domid)` creates `<dir>/xs-<domid>.sock` and
every connection accepted there acts as that domain (permissions, relative
paths). dom0 (the suite's toolstack), the backend domain and the frontend
domain therefore each get their own connection identity, as on real Xen.

One thread serves every connection through `selectors` on non-blocking
sockets, so no peer can stall another and `stop()` returns within its bound.
A malformed request gets an `XS_ERROR` reply; a header announcing more than
4096 bytes closes that connection (XS-2). Anything else going wrong inside the
server is a harness bug: it is appended to `errors` (the health check the
fuzz tests assert on), the request gets `EIO`, and the server keeps going.

Replies echo the request's type, req_id and tx_id (XS-3); errors are
`ENAME\\0`, acks `OK\\0` (XS-5); watch events are `path\\0token\\0` with req_id
and tx_id 0 (PYXS-9). The only reply type outside pyxs' 0-19 (PYXS-3) is
`RESET_WATCHES` (21), echoed as xenstored does: pyxs cannot send 21, so only a
raw client ever receives it. Unsupported types, 20 and 22-26 included, get
`XS_ERROR` ENOSYS (XS-6).
"""

from __future__ import annotations

import contextlib
import os
import selectors
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from blkif_spec.xen.xenstore_model import Session, XenStore
from blkif_spec.xen.xs_wire import (
    XS_PAYLOAD_MAX,
    Framer,
    Message,
    XsError,
    XsOp,
    XsProtocolError,
    describe,
    op_name,
)

#: (domid, op name, path, value): called for every request and every watch event sent.
TraceHook = Callable[[int, str, "str | None", "bytes | str | None"], None]

#: A peer that does not read its replies is cut off once this much is queued for it.
MAX_OUTPUT = 1 << 20
_RECV_SIZE = 65536


@dataclass(eq=False)
class _Listener:
    domid: int
    sock: socket.socket
    path: str


@dataclass(eq=False)
class _Conn:
    domid: int
    sock: socket.socket
    session: Session
    framer: Framer = field(default_factory=Framer)
    out: bytearray = field(default_factory=bytearray)
    writing: bool = False
    closed: bool = False


class XenStored:
    """In-process xenstored. Use as a context manager, or `start()` / `stop()`."""

    def __init__(
        self, directory: str | None = None, *, store: XenStore | None = None, trace: TraceHook | None = None
    ) -> None:
        self.model = store if store is not None else XenStore()
        self.trace = trace
        self._own_dir = directory is None
        self.directory = directory if directory is not None else tempfile.mkdtemp(prefix="xs-")
        self.errors: list[BaseException] = []  # internal failures: always a harness bug
        self.protocol_errors: list[str] = []  # connections closed for breaking XS-2
        self._lock = threading.RLock()  # guards the model, the selector and every connection
        self._sel = selectors.DefaultSelector()
        self._listeners: dict[int, _Listener] = {}
        self._conns: dict[int, _Conn] = {}  # id(session) -> connection
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False

    # ---------------------------------------------------------------- lifecycle

    def __enter__(self) -> XenStored:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> XenStored:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="xenstored", daemon=True)
            self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def healthy(self) -> bool:
        """No internal error so far, and the serving thread runs unless stop() was asked."""
        return not self.errors and (self.alive or self._stopping.is_set())

    def stop(self, timeout: float = 1.0) -> None:
        """Close every connection and socket; returns within `timeout` even with clients connected."""
        self._stopping.set()
        self._wake()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout)
            if self._thread.is_alive():
                self.errors.append(RuntimeError(f"xenstored thread still running {timeout} s after stop()"))
                return
        with self._lock:
            self._close_all()

    # ---------------------------------------------------------------- domains

    def socket_for(self, domid: int) -> str:
        """The socket path whose connections act as `domid`; created on first use."""
        with self._lock:
            if self._closed:
                raise RuntimeError("xenstored is stopped")
            listener = self._listeners.get(domid)
            if listener is None:
                path = os.path.join(self.directory, f"xs-{domid}.sock")
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.bind(path)
                sock.listen(64)
                sock.setblocking(False)
                listener = _Listener(domid, sock, path)
                self._sel.register(sock, selectors.EVENT_READ, listener)
                self._listeners[domid] = listener
                self._wake()
            return listener.path

    def destroy_domain(self, domid: int) -> int:
        """The suite killed a hanging target: close its connections and socket, drop its watches.

        The target's blocked calls then fail at once instead of waiting; a
        later `socket_for(domid)` serves a new incarnation. Fires
        `@releaseDomain` if the domain was introduced. Returns the number of
        connections closed.
        """
        with self._lock:
            listener = self._listeners.pop(domid, None)
            if listener is not None:
                self._close_listener(listener)
            victims = [c for c in self._conns.values() if c.domid == domid]
            for conn in victims:
                self._close(conn)
            if domid != 0:
                self.model.release(domid)
                self._deliver_events()
            return len(victims)

    def connections(self, domid: int | None = None) -> int:
        with self._lock:
            return sum(1 for c in self._conns.values() if domid is None or c.domid == domid)

    # ---------------------------------------------------------------- the serving thread

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                ready = self._sel.select(timeout=0.5)
                with self._lock:
                    for key, mask in ready:
                        if self._stopping.is_set():
                            break
                        self._dispatch(key.data, mask)
        except BaseException as exc:  # the loop itself failed: report, never die silently
            self.errors.append(exc)
        finally:
            with self._lock:
                self._close_all()

    def _dispatch(self, data: object, mask: int) -> None:
        if data is None:
            with contextlib.suppress(OSError):
                while self._wake_r.recv(4096):
                    pass
        elif isinstance(data, _Listener):
            self._accept(data)
        elif isinstance(data, _Conn) and not data.closed:
            try:
                if mask & selectors.EVENT_READ:
                    self._on_readable(data)
                if mask & selectors.EVENT_WRITE and not data.closed:
                    self._flush(data)
            except Exception as exc:
                self.errors.append(exc)
                self._close(data)

    def _accept(self, listener: _Listener) -> None:
        while self._listeners.get(listener.domid) is listener:  # not a destroyed incarnation
            try:
                sock, _ = listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.errors.append(exc)
                return
            sock.setblocking(False)
            conn = _Conn(listener.domid, sock, self.model.session(listener.domid))
            self._conns[id(conn.session)] = conn
            self._sel.register(sock, selectors.EVENT_READ, conn)

    def _on_readable(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        if not data:
            self._close(conn)
            return
        bad = None
        try:
            messages = conn.framer.feed(data)
        except XsProtocolError as exc:
            messages, bad = exc.messages, exc.reason
        for msg in messages:
            if conn.closed:
                return
            self._answer(conn, msg)
            self._deliver_events()
        if bad is not None and not conn.closed:
            self.protocol_errors.append(f"domain {conn.domid}: {bad}; connection closed")
            self._flush(conn)
            self._close(conn)

    def _answer(self, conn: _Conn, msg: Message) -> None:
        self._trace(conn.domid, op_name(msg.type), *describe(msg.type, msg.payload))
        try:
            reply = Message(
                msg.type, msg.req_id, msg.tx_id, conn.session.handle(msg.type, msg.tx_id, msg.payload)
            )
        except XsError as exc:
            reply = Message(XsOp.ERROR, msg.req_id, msg.tx_id, exc.wire())
        except Exception as exc:  # a model bug: keep serving, but make it visible
            self.errors.append(exc)
            reply = Message(XsOp.ERROR, msg.req_id, msg.tx_id, b"EIO\0")
        self._send(conn, reply)

    def _deliver_events(self) -> None:
        for session, events in self.model.drain_events():
            conn = self._conns.get(id(session))
            if conn is None or conn.closed:
                continue
            for path, token in events:
                payload = path.encode() + b"\0" + token.encode("latin-1") + b"\0"
                if len(payload) > XS_PAYLOAD_MAX:
                    self.protocol_errors.append(f"domain {conn.domid}: watch event over 4096 bytes dropped")
                    continue
                self._trace(conn.domid, "WATCH_EVENT", path, token)
                self._send(conn, Message(XsOp.WATCH_EVENT, 0, 0, payload))

    def _trace(self, domid: int, op: str, path: str | None, value: bytes | str | None) -> None:
        if self.trace is None:
            return
        try:
            self.trace(domid, op, path, value)
        except Exception as exc:
            self.errors.append(exc)

    # ---------------------------------------------------------------- output and closing

    def _send(self, conn: _Conn, msg: Message) -> None:
        if conn.closed:
            return
        conn.out += msg.pack()
        self._flush(conn)

    def _flush(self, conn: _Conn) -> None:
        while conn.out and not conn.closed:
            try:
                sent = conn.sock.send(conn.out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._close(conn)
                return
            del conn.out[:sent]
        if conn.closed:
            return
        if len(conn.out) > MAX_OUTPUT:
            self.protocol_errors.append(f"domain {conn.domid}: peer does not read its replies; closed")
            self._close(conn)
            return
        want_write = bool(conn.out)
        if want_write != conn.writing:
            conn.writing = want_write
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want_write else 0)
            self._sel.modify(conn.sock, events, conn)

    def _close(self, conn: _Conn) -> None:
        if conn.closed:
            return
        conn.closed = True
        self._conns.pop(id(conn.session), None)
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._sel.unregister(conn.sock)
        with contextlib.suppress(OSError):
            conn.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            conn.sock.close()
        conn.session.close()

    def _close_listener(self, listener: _Listener) -> None:
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._sel.unregister(listener.sock)
        with contextlib.suppress(OSError):
            listener.sock.close()
        with contextlib.suppress(OSError):
            os.unlink(listener.path)

    def _close_all(self) -> None:
        if self._closed:
            return
        self._closed = True
        for conn in list(self._conns.values()):
            self._close(conn)
        for listener in list(self._listeners.values()):
            self._close_listener(listener)
        self._listeners.clear()
        for sock in (self._wake_r, self._wake_w):
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._sel.unregister(sock)
            with contextlib.suppress(OSError):
                sock.close()
        with contextlib.suppress(OSError):
            self._sel.close()
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)
