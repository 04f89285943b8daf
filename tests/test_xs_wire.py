"""XenStore framing, paths and permission strings (XS-1, XS-2, XS-8, XS-13, PYXS-2, PYXS-11)."""

from __future__ import annotations

import errno
import struct

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from pyxs.exceptions import InvalidPath
from pyxs.helpers import check_path as pyxs_check_path

from blkif_spec.xen.xs_wire import (
    HEADER_SIZE,
    XS_ABS_PATH_MAX,
    XS_ERRORS,
    XS_PAYLOAD_MAX,
    XS_REL_PATH_MAX,
    Framer,
    Message,
    Perm,
    XsError,
    XsOp,
    XsProtocolError,
    check_path,
    format_perms,
    is_valid_path,
    one_arg,
    pack_header,
    parse_perm,
    parse_perms,
    path_and_value,
    perms_from_wire,
    perms_to_wire,
    resolve,
    string_args,
    unpack_header,
)

u32 = st.integers(0, 0xFFFFFFFF)
messages = st.builds(
    Message,
    type=st.one_of(st.sampled_from(sorted(set(XsOp))), u32),
    req_id=u32,
    tx_id=u32,
    payload=st.one_of(
        st.binary(max_size=64), st.binary(min_size=XS_PAYLOAD_MAX - 8, max_size=XS_PAYLOAD_MAX)
    ),
)


def test_message_type_values():
    """§7.2, including the late additions and the never-valid 65535; 20 is not a type."""
    assert XsOp.CONTROL == XsOp.DEBUG == 0
    assert (XsOp.WRITE, XsOp.WATCH_EVENT, XsOp.ERROR, XsOp.SET_TARGET) == (11, 15, 16, 19)
    assert (XsOp.RESET_WATCHES, XsOp.DIRECTORY_PART, XsOp.SET_QUOTA, XsOp.INVALID) == (21, 22, 26, 0xFFFF)
    assert 20 not in {int(op) for op in XsOp}


def test_error_names_map_to_host_errno():
    assert list(XS_ERRORS)[:3] == ["EINVAL", "EACCES", "EEXIST"] and len(XS_ERRORS) == 16
    assert XsError("ENOENT").errno == errno.ENOENT and XsError("EAGAIN").wire() == b"EAGAIN\0"
    with pytest.raises(ValueError):
        XsError("ENOTANERROR")


@given(st.tuples(u32, u32, u32, u32))
def test_header_round_trip(fields):
    raw = pack_header(*fields)
    assert len(raw) == HEADER_SIZE == 16
    assert raw == struct.pack("<IIII", *fields)  # XS-1: four little-endian uint32
    assert unpack_header(raw) == fields


@given(st.binary(max_size=HEADER_SIZE - 1))
def test_truncated_header_is_a_protocol_error(raw):
    with pytest.raises(XsProtocolError):
        unpack_header(raw)


@given(st.lists(messages, max_size=6), st.data())
def test_any_split_reassembles_the_same_messages(msgs, data):
    """PYXS-2: pyxs sends header and payload separately; the stream may arrive in any pieces."""
    stream = b"".join(m.pack() for m in msgs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    framer = Framer()
    got = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        got += framer.feed(stream[start:end])
    assert got == msgs
    assert framer.pending == 0


@given(st.lists(messages, max_size=3), st.integers(XS_PAYLOAD_MAX + 1, 0xFFFFFFFF), u32, st.data())
def test_over_long_header_fails_the_stream(before, length, msg_type, data):
    """XS-2: a length over 4096 ends the connection; the messages before it still count."""
    stream = b"".join(m.pack() for m in before) + pack_header(msg_type, 1, 0, length) + b"x" * 8
    cut = data.draw(st.integers(0, len(stream)))
    framer = Framer()
    got: list[Message] = []
    with pytest.raises(XsProtocolError) as info:
        for piece in (stream[:cut], stream[cut:]):
            got += framer.feed(piece)
    assert got + info.value.messages == before
    assert framer.failed
    with pytest.raises(XsProtocolError):
        framer.feed(Message(XsOp.READ, 1, 0, b"/\0").pack())


# --------------------------------------------------------------------------- paths (XS-8)

SEGMENT_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_"
segment = st.text(alphabet=SEGMENT_CHARS, min_size=1, max_size=12)
relative_paths = st.lists(segment, min_size=1, max_size=8).map("/".join)
absolute_paths = st.one_of(st.just("/"), relative_paths.map(lambda p: "/" + p))
valid_paths = st.one_of(absolute_paths, relative_paths)


@given(valid_paths)
def test_valid_paths_are_accepted(path):
    assert check_path(path) == path
    assert check_path(path.encode()) == path
    assert is_valid_path(path, watch=True)
    pyxs_check_path(path.encode())  # PYXS-11: pyxs never refuses what the server accepts


@given(valid_paths, st.data())
def test_broken_paths_are_refused(path, data):
    how = data.draw(st.sampled_from(["double-slash", "trailing-slash", "bad-char", "at", "empty", "nul"]))
    if how == "double-slash":
        bad = path.rstrip("/") + "//x"
    elif how == "trailing-slash":
        assume(path != "/")
        bad = path + "/"
    elif how == "bad-char":
        char = data.draw(st.characters(exclude_characters="-/_@", exclude_categories=("Lu", "Ll", "Nd")))
        i = data.draw(st.integers(0, len(path)))
        bad = path[:i] + char + path[i:]
    elif how == "at":
        bad = path.rstrip("/") + "/@x"
    elif how == "nul":
        bad = path + "\0"
    else:
        bad = ""
    assert not is_valid_path(bad)
    assert not is_valid_path(bad, watch=True)
    with pytest.raises(XsError) as info:
        check_path(bad)
    assert info.value.name == "EINVAL"


@given(st.integers(1, 64))
def test_path_length_limits(extra):
    absolute = "/" + "a" * (XS_ABS_PATH_MAX - 1)
    relative = "a" * XS_REL_PATH_MAX
    assert is_valid_path(absolute) and is_valid_path(relative)
    assert not is_valid_path(absolute + "a" * extra)
    assert not is_valid_path(relative + "a" * extra)
    assert not is_valid_path(b"/\xff")


@pytest.mark.parametrize("special", ["@introduceDomain", "@releaseDomain"])
def test_special_paths_only_as_watch_paths(special):
    assert is_valid_path(special, watch=True)
    assert not is_valid_path(special)
    assert not is_valid_path(special + "x", watch=True)
    assert not is_valid_path("/" + special, watch=True)
    assert resolve(special, 3) == special


@given(relative_paths, st.integers(0, 0xFFFF))
def test_relative_paths_resolve_under_domain_home(path, domid):
    """XS-9."""
    assert resolve(path, domid) == f"/local/domain/{domid}/{path}"
    assert resolve("/" + path, domid) == "/" + path


def test_pyxs_refuses_no_path_we_accept_but_accepts_some_we_refuse():
    """We are stricter (XS-8 on `@`, relative length): such paths reach the server and get EINVAL."""
    pyxs_check_path(b"/a@b")
    assert not is_valid_path("/a@b")
    with pytest.raises(InvalidPath):
        pyxs_check_path(b"/a//b")


# --------------------------------------------------------------------------- arguments


def test_argument_parsing():
    assert one_arg(b"/a\0") == b"/a"
    assert path_and_value(b"/a\0") == (b"/a", b"")
    assert path_and_value(b"/a\0v\0w") == (b"/a", b"v\0w")
    assert string_args(b"/a\0tok\0", 2, 3) == [b"/a", b"tok"]
    for bad in (lambda: one_arg(b"/a"), lambda: one_arg(b"/a\0b\0"), lambda: path_and_value(b"/a")):
        with pytest.raises(XsError):
            bad()
    with pytest.raises(XsError):
        string_args(b"/a\0", 2)


# --------------------------------------------------------------------------- permissions (XS-13)

perms = st.builds(Perm, st.sampled_from("wrbn"), st.integers(0, 0xFFFF))


@given(st.lists(perms, min_size=1, max_size=5))
def test_perms_round_trip(entries):
    text = format_perms(entries)
    assert parse_perms(text) == tuple(entries)
    assert parse_perms(text.split()) == tuple(entries)
    assert perms_from_wire(perms_to_wire(entries)) == tuple(entries)


@pytest.mark.parametrize("bad", ["", "x1", "r", "r-1", "r65536", "R1", "r1x", "1r"])
def test_bad_perms_are_refused(bad):
    with pytest.raises(XsError):
        parse_perms(bad) if bad == "" else parse_perm(bad)


def test_perm_kinds():
    assert parse_perm("b3").read and parse_perm("b3").write
    assert parse_perm("r3").read and not parse_perm("r3").write
    assert not parse_perm("n0").read and parse_perm("w1").write
    assert format_perms(parse_perms("n0 r1")) == "n0 r1"
