"""The simulated xenstored served to pyxs over real Unix sockets (XS-1..XS-16, PYXS-*).

Plain `pyxs.Client` calls run through `bounded()` (pyxs itself can wait
forever); `XsClient` bounds its own calls. Every wait here has a bound.
"""

from __future__ import annotations

import errno
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import pytest
import pyxs
from pyxs.exceptions import PyXSError

from blkif_spec.xen.xenstored import XenStored
from blkif_spec.xen.xs_client import WatchEvent, XsClient, XsConnectionLost, XsTimeout
from blkif_spec.xen.xs_wire import HEADER_SIZE, Framer, Message, XsError, XsOp, pack_header

T = TypeVar("T")
BOUND = 2.0
FE, BE = 1, 2
FE_DIR = "/local/domain/1/device/vbd/51712"
BE_DIR = "/local/domain/2/backend/vbd/1/51712"


def bounded(fn: Callable[[], T], timeout: float = BOUND) -> T:
    """Run a call that may block forever (plain pyxs) in a thread; fail the test if it does."""
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"call still blocked after {timeout} s"
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


@pytest.fixture
def trace() -> list[tuple]:
    return []


@pytest.fixture
def server(trace):
    xs = XenStored(trace=lambda *event: trace.append(event)).start()
    with XsClient(xs.socket_for(0), timeout=BOUND) as dom0:
        # libxl's layout (XK-3): each side owns its dir, the peer may read it.
        dom0.mkdir(FE_DIR)
        dom0.set_perms("/local/domain/1", "n0 r1")
        dom0.set_perms("/local/domain/1/device", "n1 r2")
        dom0.set_perms(FE_DIR, "n1 r2")
        dom0.mkdir(BE_DIR)
        dom0.set_perms("/local/domain/2", "n0 r2")
        dom0.set_perms("/local/domain/2/backend", "n2 r1")
        dom0.set_perms(BE_DIR, "n2 r1")
    yield xs
    started = time.monotonic()
    xs.stop()
    assert time.monotonic() - started < 1.0
    assert xs.errors == []


@pytest.fixture
def dom0(server):
    with XsClient(server.socket_for(0), timeout=BOUND) as client:
        yield client


def test_plain_pyxs_client(server):
    """pyxs 0.4.1 unmodified: every reply it gets parses (PYXS-3..PYXS-9)."""
    client = pyxs.Client(unix_socket_path=server.socket_for(0))
    bounded(client.connect)
    try:
        bounded(lambda: client.write(b"/p/a", b"1"))
        assert bounded(lambda: client.read(b"/p/a")) == b"1"
        bounded(lambda: client.mkdir(b"/p/b"))
        assert sorted(bounded(lambda: client.list(b"/p"))) == [b"a", b"b"]
        assert bounded(lambda: client.exists(b"/p/b"))
        assert not bounded(lambda: client.exists(b"/p/none"))
        with pytest.raises(PyXSError) as info:
            bounded(lambda: client.read(b"/p/none"))
        assert info.value.args[0] == errno.ENOENT  # XS-11 via the errno name (PYXS-6)
        assert bounded(lambda: client.read(b"/p/none", b"dflt")) == b"dflt"
        bounded(lambda: client.set_perms(b"/p/a", [b"n0", b"r1"]))
        assert bounded(lambda: client.get_perms(b"/p/a")) == [b"n0", b"r1"]
        bounded(lambda: client.delete(b"/p"))
        assert not bounded(lambda: client.exists(b"/p/a"))
        assert bounded(lambda: client.get_domain_path(3)) == b"/local/domain/3"
        assert bounded(lambda: client.is_domain_introduced(0)) is True
        bounded(client.transaction)
        bounded(lambda: client.write(b"/tx", b"v"))
        assert bounded(client.commit) is True
        assert bounded(lambda: client.read(b"/tx")) == b"v"
    finally:
        bounded(client.close)


def test_read_write_mkdir_rm_directory(dom0):
    dom0.write("/n/a", "hello")
    assert dom0.read("/n/a") == b"hello" and dom0.read_text("/n/a") == "hello"
    dom0.write("/n/a", b"")  # PYXS-10: an empty value through pyxs
    assert dom0.read("/n/a") == b""
    dom0.write("/n/b", "keep")
    dom0.mkdir("/n/b")  # XS-10: MKDIR keeps the value
    assert dom0.read("/n/b") == b"keep"
    dom0.write("/n/c", b"line\nbreak\x01")  # outside pyxs' charset: sent raw
    assert dom0.read_raw("/n/c") == b"line\nbreak\x01"
    dom0.write("/n/d", b"4\0")
    assert dom0.read("/n/d") == b"4" and dom0.read_raw("/n/d") == b"4\0"  # PYXS-8
    assert sorted(dom0.list("/n")) == ["a", "b", "c", "d"]
    assert dom0.exists("/n/c") and not dom0.exists("/n/zz")
    dom0.rm("/n")
    assert not dom0.exists("/n/a")
    dom0.rm("/n")  # absent, parent exists: OK (XS-12)
    with pytest.raises(XsError) as info:
        dom0.rm("/n/x/y")
    assert info.value.name == "ENOENT"
    with pytest.raises(XsError) as info:
        dom0.read("/n")
    assert info.value.name == "ENOENT"
    assert dom0.read_text("/n", default="absent") == "absent"


def test_perms_and_relative_paths(server, dom0):
    with XsClient(server.socket_for(FE)) as fe:
        fe.write("device/vbd/51712/state", "1")  # XS-9: relative to /local/domain/1
        assert dom0.read(FE_DIR + "/state") == b"1"
        assert fe.get_perms("device/vbd/51712/state") == ["n1", "r2"]
        assert fe.get_domain_path(FE) == "/local/domain/1"
        fe.set_perms("device/vbd/51712/state", ["n1", "b2"])
        assert dom0.get_perms(FE_DIR + "/state") == ["n1", "b2"]


def test_domains_cannot_write_each_others_dirs(server, dom0):
    """XK-3 between domain 1 and 2; dom0 is privileged."""
    with XsClient(server.socket_for(FE)) as fe, XsClient(server.socket_for(BE)) as be:
        be.write(BE_DIR + "/state", "2")
        fe.write(FE_DIR + "/state", "1")
        assert fe.read(BE_DIR + "/state") == b"2" and be.read(FE_DIR + "/state") == b"1"
        for client, path in ((fe, BE_DIR + "/state"), (be, FE_DIR + "/state"), (fe, BE_DIR + "/new")):
            with pytest.raises(XsError) as info:
                client.write(path, "6")
            assert info.value.name == "EACCES"
        with pytest.raises(XsError) as info:
            fe.read("/local/domain/2/secret")
        assert info.value.name == "EACCES"
        dom0.write(FE_DIR + "/virtual-device", "51712")  # dom0 ignores permissions
        be.set_perms(BE_DIR + "/state", "n2 b1")
        fe.write(BE_DIR + "/state", "6")
        assert be.read(BE_DIR + "/state") == b"6"


def test_watch_initial_and_subtree_events(server, dom0):
    """XS-14/15: initial event, descendants, relative paths, recursive removal."""
    with XsClient(server.socket_for(FE)) as fe:
        watch = dom0.watch(BE_DIR, "be")
        assert watch.wait_event(BOUND) == WatchEvent(BE_DIR, "be")
        rel = fe.watch("device/vbd", "fe")
        assert rel.wait_event(BOUND) == WatchEvent("device/vbd", "fe")
        deep = dom0.watch(FE_DIR + "/queue-0", "deep")
        assert deep.wait_event(BOUND) == WatchEvent(FE_DIR + "/queue-0", "deep")
        dom0.write(BE_DIR + "/state", "2")
        assert watch.wait_event(BOUND) == WatchEvent(BE_DIR + "/state", "be")
        dom0.write(FE_DIR + "/queue-0/ring-ref", "8")
        assert rel.wait_event(BOUND) == WatchEvent("device/vbd/51712/queue-0/ring-ref", "fe")
        assert deep.wait_event(BOUND) == WatchEvent(FE_DIR + "/queue-0/ring-ref", "deep")
        dom0.rm(FE_DIR)
        assert rel.wait_event(BOUND) == WatchEvent("device/vbd/51712", "fe")
        assert deep.wait_event(BOUND) == WatchEvent(FE_DIR + "/queue-0", "deep")  # reports wpath
        assert watch.wait_event(0.05) is None
        with pytest.raises(XsError) as info:
            fe.watch("device/vbd", "fe")
        assert info.value.name == "EEXIST"
        rel.unwatch()
        dom0.write(FE_DIR + "/state", "1")
        assert rel.wait_event(0.05) is None


def test_watch_events_follow_commit(server, dom0):
    watch = dom0.watch("/c", "c")
    assert watch.wait_event(BOUND).path == "/c"
    with dom0.transaction() as tx:
        tx.write("/c/a", "1")
        tx.write("/c/b", "2")
        assert watch.wait_event(0.05) is None  # nothing before the commit
    assert sorted(watch.wait_event(BOUND).path for _ in range(2)) == ["/c/a", "/c/b"]


def test_transactions_conflict_between_connections(server, dom0):
    """XS-16: EAGAIN when another connection changed what the transaction read."""
    dom0.write("/tx/counter", "0")
    with XsClient(server.socket_for(0)) as other:
        tx = dom0.transaction()
        assert tx.read("/tx/counter") == b"0"
        tx.write("/tx/counter", "1")
        assert other.read("/tx/counter") == b"0"  # isolation
        other.write("/tx/counter", "5")
        assert tx.commit() is False and tx.conflicted
        assert dom0.read("/tx/counter") == b"5"

        with pytest.raises(XsError) as info, dom0.transaction() as tx2:
            tx2.read("/tx/counter")
            other.write("/tx/counter", "6")
        assert info.value.name == "EAGAIN"

        attempts = []

        def bump(tx) -> int:
            value = int(tx.read("/tx/counter"))
            if not attempts:
                other.write("/tx/counter", "10")  # interferes with the first attempt only
            attempts.append(value)
            tx.write("/tx/counter", str(value + 1))
            return value + 1

        assert dom0.transact(bump) == 11
        assert attempts == [6, 10] and dom0.read("/tx/counter") == b"11"

        with pytest.raises(XsError) as info:
            for tx in dom0.transactions(attempts=2):
                with tx:
                    tx.read("/tx/counter")
                    other.write("/tx/counter", "x")
        assert info.value.name == "EAGAIN"

        with pytest.raises(RuntimeError), dom0.transaction() as tx3:
            tx3.write("/tx/aborted", "1")
            raise RuntimeError("body failed")
        assert not dom0.exists("/tx/aborted")


# Plain pyxs' router thread dies with an exception when the server hangs up (what
# XsClient's router absorbs); pytest reports that as an unhandled thread exception.
pyxs_router_dies = pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")


@pyxs_router_dies
def test_destroy_domain_fails_the_client_fast(server, dom0):
    """conventions §3: destroying a hanging target's domain ends its blocked calls at once."""
    dom0.introduce_domain(FE, 1, 1)
    released = dom0.watch("@releaseDomain", "rel")
    assert released.wait_event(BOUND) == WatchEvent("@releaseDomain", "rel")
    fe = XsClient(server.socket_for(FE), timeout=5.0)
    plain = pyxs.Client(unix_socket_path=server.socket_for(FE))
    bounded(plain.connect)
    watch = fe.watch("device", "t")
    assert watch.wait_event(BOUND) is not None
    waiter: dict[str, object] = {}

    def wait() -> None:
        try:
            watch.wait_event(5.0)
        except XsConnectionLost as exc:
            waiter["lost"] = exc

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    assert server.connections(FE) == 2
    started = time.monotonic()
    assert server.destroy_domain(FE) == 2
    thread.join(BOUND)
    assert "lost" in waiter and time.monotonic() - started < 1.0  # the blocked wait ended
    with pytest.raises(XsConnectionLost):
        fe.read("device")
    with pytest.raises(pyxs.exceptions.PyXSError):
        bounded(lambda: plain.read(b"device"), timeout=1.0)  # plain pyxs fails fast too
    assert time.monotonic() - started < 1.5
    assert released.wait_event(BOUND) == WatchEvent("@releaseDomain", "rel")
    assert not dom0.is_domain_introduced(FE)
    assert not os.path.exists(os.path.join(server.directory, "xs-1.sock"))
    with pytest.raises(XsConnectionLost):
        XsClient(os.path.join(server.directory, "xs-1.sock"))
    fe.close()
    bounded(plain.close)
    assert dom0.read(FE_DIR) == b""  # the others are unaffected
    with XsClient(server.socket_for(FE)) as again:  # a new incarnation may connect
        assert again.read("device/vbd/51712") == b""


@pyxs_router_dies
def test_stop_within_one_second_with_clients_connected():
    xs = XenStored().start()
    clients = [XsClient(xs.socket_for(d)) for d in (0, 1, 2)]
    plain = pyxs.Client(unix_socket_path=xs.socket_for(0))
    bounded(plain.connect)
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.connect(xs.socket_for(2))
    raw.sendall(pack_header(XsOp.WRITE, 1, 0, 100) + b"/half")  # a request cut in the middle
    watch = clients[0].watch("/w")
    assert watch.wait_event(BOUND) == WatchEvent("/w", watch.token)
    started = time.monotonic()
    xs.stop()
    assert time.monotonic() - started < 1.0
    assert not xs.alive and xs.errors == []
    assert not os.path.exists(xs.directory)
    with pytest.raises(XsConnectionLost):
        watch.wait_event(BOUND)  # no event, but not a full bound either
    for client in clients:
        with pytest.raises((XsConnectionLost, XsTimeout)):
            client.read("/")
        started = time.monotonic()
        client.close()
        assert time.monotonic() - started < 1.0
    bounded(plain.close)
    raw.close()


def test_client_times_out_on_a_silent_server():
    """The bound pyxs lacks: a server that never answers gives XsTimeout naming op and path."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "silent.sock")
        silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        silent.bind(path)
        silent.listen(1)  # accepts into the backlog, never reads, never answers
        try:
            client = XsClient(path, timeout=0.2)
            started = time.monotonic()
            with pytest.raises(XsTimeout) as info:
                client.read("/local/domain/1/state")
            assert 0.2 <= time.monotonic() - started < 1.0
            assert (info.value.op, info.value.path) == ("READ", "/local/domain/1/state")
            assert "READ /local/domain/1/state" in str(info.value)
            with pytest.raises(XsTimeout):
                client.write("/x", "1", timeout=0.05)
            started = time.monotonic()
            client.close()
            assert time.monotonic() - started < 1.0
        finally:
            silent.close()


def test_trace_hook_records_requests_and_events(server, dom0, trace):
    del trace[:]
    dom0.write("/traced", "v")
    dom0.watch("/traced", "tok").wait_event(BOUND)
    assert (0, "WRITE", "/traced", b"v") in trace
    assert (0, "WATCH", "/traced", "tok") in trace
    assert (0, "WATCH_EVENT", "/traced", "tok") in trace


def raw_exchange(path: str, data: bytes, replies: int, timeout: float = BOUND) -> list[Message]:
    """Send raw bytes; collect `replies` messages (bounded)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(data)
        framer, got = Framer(), []
        while len(got) < replies:
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += framer.feed(chunk)
        return got


def test_raw_replies_echo_ids(server):
    """XS-3/XS-5: type, req_id and tx_id echoed; OK\\0 acks; errors by name."""
    path = server.socket_for(0)
    reqs = [
        Message(XsOp.WRITE, 7, 0, b"/raw\0v"),
        Message(XsOp.READ, 8, 0, b"/raw\0"),
        Message(XsOp.READ, 9, 0, b"/none\0"),
        Message(XsOp.RESET_WATCHES, 10, 0, b"\0"),
        Message(20, 11, 0, b""),
        Message(XsOp.READ, 12, 77, b"/raw\0"),
    ]
    got = raw_exchange(path, b"".join(m.pack() for m in reqs), len(reqs))
    assert got == [
        Message(XsOp.WRITE, 7, 0, b"OK\0"),
        Message(XsOp.READ, 8, 0, b"v"),
        Message(XsOp.ERROR, 9, 0, b"ENOENT\0"),
        Message(XsOp.RESET_WATCHES, 10, 0, b"OK\0"),
        Message(XsOp.ERROR, 11, 0, b"ENOSYS\0"),
        Message(XsOp.ERROR, 12, 77, b"ENOENT\0"),
    ]


def test_over_long_payload_closes_only_that_connection(server, dom0):
    """XS-2."""
    data = Message(XsOp.READ, 1, 0, b"/\0").pack() + pack_header(XsOp.WRITE, 2, 0, 4097) + b"x" * 64
    got = raw_exchange(server.socket_for(1), data, 2)
    assert [m.req_id for m in got] == [1]  # answered what came before, then closed
    assert server.protocol_errors and dom0.read("/local/domain/1") == b""
    assert len(pack_header(0, 0, 0, 0)) == HEADER_SIZE
