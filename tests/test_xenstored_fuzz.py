"""Hostile bytes at the simulated xenstored (XS-2, XS-3, XS-6, XS-8; PYXS-3).

After every example the server must still answer a well-formed READ on a
fresh connection within 1 s, a long-lived pyxs connection (with a watch on
everything) must still work, and no internal error may have been recorded.
Every socket wait is bounded.
"""

from __future__ import annotations

import socket
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blkif_spec.xen.xenstore_model import TX_OPS
from blkif_spec.xen.xenstored import XenStored
from blkif_spec.xen.xs_client import XsClient, XsWatch
from blkif_spec.xen.xs_wire import (
    HEADER_SIZE,
    PYXS_SAFE_TYPES,
    XS_ERRORS,
    XS_PAYLOAD_MAX,
    Framer,
    Message,
    XsOp,
    XsProtocolError,
    pack_header,
)

REPLY_BOUND = 2.0
u32 = st.integers(0, 0xFFFFFFFF)
DOMAINS = (0, 1, 2)


@pytest.fixture(scope="module")
def server():
    xs = XenStored().start()
    for domid in DOMAINS:
        xs.socket_for(domid)
    yield xs
    started = time.monotonic()
    xs.stop()
    assert time.monotonic() - started < 1.0
    assert xs.errors == []


@pytest.fixture(scope="module")
def bystander(server):
    """A pyxs connection that outlives every example, watching every change they make."""
    with XsClient(server.socket_for(0), timeout=1.0) as client:
        yield client, client.watch("/", "all")


def connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(REPLY_BOUND)
    sock.connect(path)
    return sock


def receive(sock: socket.socket, count: int, bound: float = REPLY_BOUND) -> tuple[list[Message], bool]:
    """Up to `count` replies (watch events excluded) and whether the server hung up; bounded."""
    framer, replies, events = Framer(), [], []
    deadline = time.monotonic() + bound
    closed = False
    while len(replies) < count:
        left = deadline - time.monotonic()
        assert left > 0, f"only {len(replies)} of {count} replies within {bound} s"
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            closed = True
            break
        for msg in framer.feed(chunk):  # a server frame over 4096 bytes raises here (XS-2)
            (events if msg.type == XsOp.WATCH_EVENT else replies).append(msg)
    for event in events:  # PYXS-9: `path\0token\0`, req_id 0
        assert event.req_id == 0 and event.tx_id == 0
        assert event.payload.endswith(b"\0") and event.payload.count(b"\0") == 2
    return replies, closed


def assert_healthy(server: XenStored, bystander: tuple[XsClient, XsWatch]) -> None:
    with connect(server.socket_for(0)) as sock:
        sock.sendall(Message(XsOp.READ, 4242, 0, b"/\0").pack())
        replies, _ = receive(sock, 1, bound=1.0)
    assert [(m.type, m.req_id) for m in replies] == [(XsOp.READ, 4242)]
    assert server.alive and server.healthy and server.errors == []
    client, watch = bystander
    client.read("/", timeout=1.0)  # pyxs parsed everything it was sent (PYXS-3)
    assert client.failure is None and not client.closed
    watch.drain()


# --------------------------------------------------------------------------- strategies

UNSERVED = (15, 16, 20, 22, 23, 24, 25, 26, 128, 0xFFFE, 0xFFFF)  # ENOSYS, never a pyxs-fatal type
served = st.sampled_from(sorted({int(op) for op in XsOp} - set(UNSERVED)))
unserved = st.sampled_from(UNSERVED)

# Mostly requests that reach the model outside any transaction, else they all end in ENOENT.
msg_types = st.sampled_from("sssur").flatmap({"s": served, "u": unserved, "r": u32}.__getitem__)
tx_ids = st.sampled_from("000sr").flatmap({"0": st.just(0), "s": st.integers(1, 8), "r": u32}.__getitem__)
paths = st.one_of(
    st.sampled_from(
        [
            "/", "/local", "/local/domain/1/device", "device/vbd", "@introduceDomain", "@releaseDomain",
            "/a//b", "/a/", "", "/a@b", "/x y", "a" * 2049, "/" + "a" * 3072, "/fz/a", "fz/b", "/fz",
        ]
    ).map(lambda p: p.encode()),
    st.binary(max_size=24),
)  # fmt: skip
numbers = st.one_of(st.integers(0, 70000).map(lambda n: str(n).encode()), st.binary(max_size=6))


@st.composite
def payloads(draw: st.DrawFn, msg_type: int) -> bytes:
    path = draw(paths)
    if msg_type == XsOp.WRITE:
        proper = path + b"\0" + draw(st.binary(max_size=64))
    elif msg_type in (XsOp.WATCH, XsOp.UNWATCH):
        proper = path + b"\0" + draw(st.binary(max_size=8)).replace(b"\0", b"") + b"\0"
    elif msg_type == XsOp.SET_PERMS:
        entries = draw(
            st.lists(st.sampled_from([b"n0", b"r1", b"b2", b"w65535", b"x", b"r99999", b""]), max_size=3)
        )
        proper = path + b"\0" + b"".join(e + b"\0" for e in entries)
    elif msg_type == XsOp.TRANSACTION_END:
        proper = draw(st.sampled_from([b"T", b"F", b"x", b""])) + b"\0"
    elif msg_type in (XsOp.INTRODUCE, XsOp.SET_TARGET, XsOp.RELEASE, XsOp.GET_DOMAIN_PATH, XsOp.RESUME):
        proper = b"".join(n + b"\0" for n in draw(st.lists(numbers, min_size=1, max_size=3)))
    else:
        proper = path + b"\0"
    how = draw(st.sampled_from(["proper", "proper", "no-nul", "extra", "binary", "big"]))
    if how == "no-nul":
        return proper.rstrip(b"\0")
    if how == "extra":
        return proper + b"junk\0"
    if how == "binary":
        return draw(st.binary(max_size=128))
    if how == "big":
        return (proper + b"z" * XS_PAYLOAD_MAX)[: XS_PAYLOAD_MAX - draw(st.integers(0, 8))]
    return proper


@st.composite
def messages(draw: st.DrawFn) -> Message:
    msg_type = draw(msg_types)
    return Message(msg_type, draw(u32), draw(tx_ids), draw(payloads(msg_type)))


# --------------------------------------------------------------------------- tests


@given(st.sampled_from(DOMAINS), st.binary(max_size=8192), st.booleans())
def test_arbitrary_bytes(server, bystander, domid, data, half_close):
    with connect(server.socket_for(domid)) as sock:
        try:
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may hang up first (over-long length, XS-2)
    assert_healthy(server, bystander)


@given(
    st.sampled_from(DOMAINS),
    st.lists(messages(), min_size=1, max_size=8),
    st.sampled_from(["none", "over-long", "truncated-header", "truncated-payload"]),
    st.integers(1, 64),
)
def test_malformed_messages(server, bystander, domid, msgs, tail, piece):
    """Each request gets exactly one reply echoing req_id and tx_id (XS-3), in order."""
    stream = b"".join(m.pack() for m in msgs)
    if tail == "over-long":
        stream += pack_header(XsOp.WRITE, 1, 0, XS_PAYLOAD_MAX + piece) + b"x" * piece
    elif tail == "truncated-header":
        stream += pack_header(XsOp.READ, 1, 0, 2)[: piece % HEADER_SIZE]
    elif tail == "truncated-payload":
        stream += pack_header(XsOp.READ, 1, 0, 100) + b"/" * (piece % 100)
    with connect(server.socket_for(domid)) as sock:
        try:
            for start in range(0, len(stream), piece * 97):  # arbitrary pieces (PYXS-2)
                sock.sendall(stream[start : start + piece * 97])
        except (BrokenPipeError, ConnectionResetError):
            assert tail == "over-long"  # the server may hang up before it has read it all
        replies, closed = receive(sock, len(msgs))
        if tail == "over-long":  # XS-2: the connection ends after the last good request
            _, closed = receive(sock, 1)
            assert closed
    assert len(replies) == len(msgs)
    open_tx: set[int] = set()  # transactions this connection started and has not ended
    for req, reply in zip(msgs, replies, strict=True):
        assert (reply.req_id, reply.tx_id) == (req.req_id, req.tx_id)
        assert reply.type in (req.type, XsOp.ERROR)
        assert len(reply.payload) <= XS_PAYLOAD_MAX
        if reply.type == XsOp.ERROR:
            assert reply.payload.endswith(b"\0") and reply.payload[:-1].decode() in XS_ERRORS
        else:  # PYXS-3: only a request pyxs cannot send gets a type pyxs cannot parse
            assert reply.type in PYXS_SAFE_TYPES or reply.type == XsOp.RESET_WATCHES
        if req.op is None or req.type in UNSERVED:
            assert reply.payload == b"ENOSYS\0"  # XS-6
        elif req.type in (*TX_OPS, XsOp.TRANSACTION_END) and req.tx_id and req.tx_id not in open_tx:
            assert reply.payload == b"ENOENT\0"  # XS-16: an unknown transaction id
        if reply.type == XsOp.TRANSACTION_START:
            open_tx.add(int(reply.payload[:-1]))
        elif req.type == XsOp.TRANSACTION_END and reply.payload != b"EINVAL\0":
            open_tx.discard(req.tx_id)
        elif reply.type == XsOp.RESET_WATCHES:
            open_tx.clear()
    assert_healthy(server, bystander)


def test_framer_rejects_what_the_server_closes_on():
    with pytest.raises(XsProtocolError):
        Framer().feed(pack_header(XsOp.READ, 1, 0, XS_PAYLOAD_MAX + 1))
