"""The XenStore wire protocol as data and pure functions (inventory §7, XS-1..XS-8).

Nothing here does I/O: the simulated xenstored, the fuzz tests and the client
wrapper all frame, parse and validate through this one module, so a bug in the
framing shows up everywhere at once instead of hiding in one of three copies.
Hostile input stays representable: a `Message` holds any 32-bit type (not only
`XsOp` members) and any payload, and `pack()` does not validate, so tests can
build the malformed packets the server must survive.
"""

from __future__ import annotations

import errno as _errno
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum

#: XS-2: the largest payload either side may send (`XENSTORE_PAYLOAD_MAX`).
XS_PAYLOAD_MAX = 4096
#: XS-8: longest absolute and relative paths (`XENSTORE_{ABS,REL}_PATH_MAX`).
XS_ABS_PATH_MAX = 3072
XS_REL_PATH_MAX = 2048

#: XS-1: `struct xsd_sockmsg { uint32 type, req_id, tx_id, len; }`, little-endian on x86/Arm.
HEADER = struct.Struct("<IIII")
HEADER_SIZE = HEADER.size  # 16

#: Watch paths that name events rather than nodes (XS-8, XS-14).
SPECIAL_WATCH_PATHS = ("@introduceDomain", "@releaseDomain")

DOMAIN_PATH_PREFIX = "/local/domain"
DOMID_MAX = 0xFFFF


class XsOp(IntEnum):
    """Message types (§7.2). 20 (`XS_RESTRICT`) was removed from Xen and is invalid."""

    CONTROL = 0
    DEBUG = 0  # the old name of CONTROL
    DIRECTORY = 1
    READ = 2
    GET_PERMS = 3
    WATCH = 4
    UNWATCH = 5
    TRANSACTION_START = 6
    TRANSACTION_END = 7
    INTRODUCE = 8
    RELEASE = 9
    GET_DOMAIN_PATH = 10
    WRITE = 11
    MKDIR = 12
    RM = 13
    SET_PERMS = 14
    WATCH_EVENT = 15
    ERROR = 16
    IS_DOMAIN_INTRODUCED = 17
    RESUME = 18
    SET_TARGET = 19
    RESET_WATCHES = 21
    DIRECTORY_PART = 22
    GET_FEATURE = 23
    SET_FEATURE = 24
    GET_QUOTA = 25
    SET_QUOTA = 26
    INVALID = 0xFFFF


#: PYXS-3: reply types pyxs 0.4.1 can parse (0-19; its bogus RESTRICT=128 is never sent).
PYXS_SAFE_TYPES = frozenset(range(20))


def op_name(msg_type: int) -> str:
    """`READ` for 2, `TYPE_20` for a value that names no operation (for traces and errors)."""
    try:
        return XsOp(msg_type).name
    except ValueError:
        return f"TYPE_{msg_type}"


#: Error names in `xs_wire.h` table order; the wire carries the name, the number is
#: the host's errno (what pyxs maps the name back to, PYXS-6).
XS_ERRORS: dict[str, int] = {
    name: getattr(_errno, name)
    for name in (
        "EINVAL", "EACCES", "EEXIST", "EISDIR", "ENOENT", "ENOMEM", "ENOSPC", "EIO",
        "ENOTEMPTY", "ENOSYS", "EROFS", "EBUSY", "EAGAIN", "EISCONN", "E2BIG", "EPERM",
    )
}  # fmt: skip


class XsError(Exception):
    """A XenStore error reply (`XS_ERROR` with payload `ENAME\\0`, XS-3).

    Raised by the store model and by the client wrapper alike, so a test can
    compare what the server decided with what the client saw by name.
    """

    def __init__(self, name: str, detail: str = "") -> None:
        if name not in XS_ERRORS:
            raise ValueError(f"{name!r} is not a XenStore error name ({', '.join(XS_ERRORS)})")
        self.name = name
        self.errno = XS_ERRORS[name]
        self.detail = detail
        super().__init__(f"{name}: {detail}" if detail else name)

    def wire(self) -> bytes:
        return self.name.encode() + b"\0"

    def __reduce__(self):
        return (type(self), (self.name, self.detail))


class XsProtocolError(Exception):
    """The byte stream cannot be framed (XS-2: `len` > 4096); the connection must end.

    `messages` holds the complete messages that preceded the bad header in the
    same `feed`, which a server still answers before it closes the connection.
    """

    def __init__(self, reason: str, messages: list[Message] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.messages: list[Message] = messages or []


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class Message:
    """One framed message. `type` is a plain int so unknown types stay representable."""

    type: int
    req_id: int
    tx_id: int
    payload: bytes = b""

    @property
    def op(self) -> XsOp | None:
        try:
            return XsOp(self.type)
        except ValueError:
            return None

    def pack(self) -> bytes:
        """Header (with `len` = payload length) and payload; no validation, on purpose."""
        return pack_header(self.type, self.req_id, self.tx_id, len(self.payload)) + self.payload

    def __repr__(self) -> str:
        return (
            f"Message(type={op_name(self.type)}, req_id={self.req_id}, tx_id={self.tx_id}, "
            f"payload={self.payload!r})"
        )


def pack_header(msg_type: int, req_id: int, tx_id: int, length: int) -> bytes:
    return HEADER.pack(msg_type, req_id, tx_id, length)


def unpack_header(data: bytes) -> tuple[int, int, int, int]:
    """(type, req_id, tx_id, len) from the first 16 bytes."""
    if len(data) < HEADER_SIZE:
        raise XsProtocolError(f"truncated header: {len(data)} of {HEADER_SIZE} bytes")
    return HEADER.unpack_from(data)


class Framer:
    """Incremental stream reassembly (PYXS-2: pyxs sends header and payload separately).

    After a protocol error the framer stays failed: the peer's stream position is
    lost, so every later `feed` raises too.
    """

    __slots__ = ("_buf", "_failed", "max_payload")

    def __init__(self, max_payload: int = XS_PAYLOAD_MAX) -> None:
        self._buf = bytearray()
        self._failed: str | None = None
        self.max_payload = max_payload

    @property
    def pending(self) -> int:
        """Bytes received but not yet part of a complete message."""
        return len(self._buf)

    @property
    def failed(self) -> bool:
        return self._failed is not None

    def feed(self, data: bytes) -> list[Message]:
        if self._failed is not None:
            raise XsProtocolError(self._failed)
        buf = self._buf
        buf += data
        out: list[Message] = []
        start = 0
        while len(buf) - start >= HEADER_SIZE:
            msg_type, req_id, tx_id, length = HEADER.unpack_from(buf, start)
            if length > self.max_payload:
                self._failed = f"payload length {length} > {self.max_payload} (XS-2)"
                del buf[:]
                raise XsProtocolError(self._failed, out)
            end = start + HEADER_SIZE + length
            if len(buf) < end:
                break
            out.append(Message(msg_type, req_id, tx_id, bytes(buf[start + HEADER_SIZE : end])))
            start = end
        del buf[:start]
        return out


# --------------------------------------------------------------------------- payload arguments


def one_arg(payload: bytes) -> bytes:
    """The single NUL-terminated string a READ-like request carries; anything else is EINVAL."""
    if not payload.endswith(b"\0") or payload.count(b"\0") != 1:
        raise XsError("EINVAL", "expected exactly one NUL-terminated argument")
    return payload[:-1]


def string_args(payload: bytes, minimum: int, maximum: int | None = None) -> list[bytes]:
    """NUL-terminated strings; the last one must be terminated (a missing NUL is EINVAL)."""
    if not payload.endswith(b"\0"):
        raise XsError("EINVAL", "arguments must be NUL-terminated")
    args = payload[:-1].split(b"\0")
    if len(args) < minimum or (maximum is not None and len(args) > maximum):
        raise XsError("EINVAL", f"expected {minimum}..{maximum} arguments, got {len(args)}")
    return args


def path_and_value(payload: bytes) -> tuple[bytes, bytes]:
    """WRITE's `path\\0value`: the value is the rest of the payload, possibly empty or binary."""
    path, sep, value = payload.partition(b"\0")
    if not sep:
        raise XsError("EINVAL", "WRITE without NUL after the path")
    return path, value


def parse_domid(arg: bytes) -> int:
    if not re.fullmatch(rb"[0-9]{1,5}", arg) or int(arg) > DOMID_MAX:
        raise XsError("EINVAL", f"bad domid {arg!r}")
    return int(arg)


def describe(msg_type: int, payload: bytes) -> tuple[str | None, str | bytes | None]:
    """(path, value) of a request for a protocol trace, without validating it.

    Lossy by design: a trace line must never raise on a hostile payload.
    """
    head, _, rest = payload.partition(b"\0")
    text = head.decode("ascii", "replace")
    if msg_type == XsOp.WRITE:
        return text, rest
    if msg_type in (XsOp.READ, XsOp.DIRECTORY, XsOp.GET_PERMS, XsOp.MKDIR, XsOp.RM):
        return text, None
    if msg_type in (XsOp.WATCH, XsOp.UNWATCH):
        return text, rest.partition(b"\0")[0].decode("ascii", "replace")
    if msg_type == XsOp.SET_PERMS:
        return text, rest.rstrip(b"\0").replace(b"\0", b" ").decode("ascii", "replace")
    return None, payload.rstrip(b"\0").replace(b"\0", b" ").decode("ascii", "replace") or None


# --------------------------------------------------------------------------- paths

_PATH_CHARS = re.compile(r"[A-Za-z0-9\-/_]+")


def path_problem(path: str | bytes, *, watch: bool = False) -> str | None:
    """Why `path` breaks XS-8, or None when it is valid.

    `@introduceDomain` and `@releaseDomain` are valid only as watch paths; any
    other `@` is refused (the inventory's reading of XS-8).
    """
    if isinstance(path, bytes):
        try:
            path = path.decode("ascii")
        except UnicodeDecodeError:
            return "non-ASCII byte in path"
    if not path:
        return "empty path"
    if path in SPECIAL_WATCH_PATHS:
        return None if watch else f"{path} is only valid as a watch path"
    if not _PATH_CHARS.fullmatch(path):
        return "character outside [A-Za-z0-9-/_]"
    if "//" in path:
        return "'//' in path"
    if len(path) > 1 and path.endswith("/"):
        return "trailing '/'"
    limit = XS_ABS_PATH_MAX if path.startswith("/") else XS_REL_PATH_MAX
    if len(path) > limit:
        return f"longer than {limit} bytes"
    return None


def is_valid_path(path: str | bytes, *, watch: bool = False) -> bool:
    return path_problem(path, watch=watch) is None


def check_path(path: str | bytes, *, watch: bool = False) -> str:
    """The path as text, or XsError('EINVAL') naming the XS-8 clause it breaks."""
    problem = path_problem(path, watch=watch)
    if problem is not None:
        raise XsError("EINVAL", f"{path!r}: {problem}")
    return path.decode("ascii") if isinstance(path, bytes) else path


def domain_path(domid: int) -> str:
    """XS-9: the home relative paths resolve against."""
    return f"{DOMAIN_PATH_PREFIX}/{domid}"


def resolve(path: str, domid: int) -> str:
    """Absolute form of an already validated path (XS-9); special paths stay as they are."""
    if path.startswith("/") or path in SPECIAL_WATCH_PATHS:
        return path
    return f"{domain_path(domid)}/{path}"


def is_under(path: str, ancestor: str) -> bool:
    """`path` is `ancestor` or one of its descendants (XS-14 watch matching)."""
    if ancestor == "/":
        return path.startswith("/")
    return path == ancestor or path.startswith(ancestor + "/")


# --------------------------------------------------------------------------- permissions

PERM_KINDS = "wrbn"
_PERM_RE = re.compile(r"([wrbn])([0-9]{1,5})")


@dataclass(frozen=True, slots=True)
class Perm:
    """One permission entry (XS-13): `r1` lets domain 1 read; in first place, domain 1 owns."""

    kind: str
    domid: int

    def __post_init__(self) -> None:
        if self.kind not in PERM_KINDS or not 0 <= self.domid <= DOMID_MAX:
            raise XsError("EINVAL", f"bad permission {self.kind}{self.domid}")

    @property
    def read(self) -> bool:
        return self.kind in "rb"

    @property
    def write(self) -> bool:
        return self.kind in "wb"

    def __str__(self) -> str:
        return f"{self.kind}{self.domid}"


def parse_perm(text: str | bytes) -> Perm:
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    m = _PERM_RE.fullmatch(text)
    if m is None or int(m.group(2)) > DOMID_MAX:
        raise XsError("EINVAL", f"bad permission {text!r}")
    return Perm(m.group(1), int(m.group(2)))


def parse_perms(text: str | bytes | Iterable[str | bytes]) -> tuple[Perm, ...]:
    """`"n0 r1"` (space separated, as fixtures write them) or a list of entries; never empty."""
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    items = text.split() if isinstance(text, str) else list(text)
    if not items:
        raise XsError("EINVAL", "empty permission list")
    return tuple(parse_perm(item) for item in items)


def format_perms(perms: Iterable[Perm]) -> str:
    return " ".join(str(p) for p in perms)


def perms_to_wire(perms: Iterable[Perm]) -> bytes:
    """GET_PERMS reply / SET_PERMS arguments: one `<perm>\\0` per entry."""
    return b"".join(str(p).encode() + b"\0" for p in perms)


def perms_from_wire(payload: bytes) -> tuple[Perm, ...]:
    return parse_perms(string_args(payload, 1))
