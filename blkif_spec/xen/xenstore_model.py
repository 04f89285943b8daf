"""XenStore as a pure data structure: nodes, permissions, transactions, watches (XS-8..XS-16).

Sans-IO (style habit 3): the simulated xenstored feeds it requests and ships
the replies and events it returns; the project's tests drive it directly and
compare it with a dict oracle. A `Session` is one client connection: it owns
its watches, transactions and pending events, and acts as one domain.

Semantics follow the inventory, and xenstored where the inventory is silent:

* dom0 is privileged and ignores permissions (XK-3); for everyone else the first
  permission entry names the owner (full access) and the default (XS-13).
* A node created by WRITE/MKDIR inherits its parent's permissions; when an
  unprivileged domain creates it, that domain becomes the owner (xenstored's
  rule, so a guest can delete what it made).
* A missing node reads as ENOENT, unless the caller cannot read its nearest
  existing ancestor: then EACCES, so absence does not leak (xenstored's rule).
* Transactions work on a private snapshot and record the generation of every
  node they look at; commit fails with EAGAIN if any of those changed, else it
  replays the transaction's writes on the live tree, which fires the watches
  (events only on commit, XS-14). Conflicts are per node: adding or removing a
  child changes its parent too, as in xenstored, so spurious EAGAINs are
  possible (clients retry), lost updates are not.
* A watch event reaches a watcher that may read the node or its parent (as in
  xenstored); the event that follows registration is always sent.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from blkif_spec.xen.xs_wire import (
    SPECIAL_WATCH_PATHS,
    XS_PAYLOAD_MAX,
    Perm,
    XsError,
    XsOp,
    check_path,
    domain_path,
    is_under,
    one_arg,
    parse_domid,
    path_and_value,
    perms_from_wire,
    perms_to_wire,
    resolve,
    string_args,
)

OK = b"OK\0"
#: Per-session limits: beyond them xenstored answers ENOSPC (transactions) or E2BIG (watches).
MAX_TRANSACTIONS = 32
MAX_WATCHES = 128
PRIVILEGED_DOMAINS = frozenset({0})

#: Operations that honour the header's tx_id (others ignore it, XS-15).
TX_OPS = frozenset(
    {XsOp.READ, XsOp.WRITE, XsOp.MKDIR, XsOp.RM, XsOp.DIRECTORY, XsOp.GET_PERMS, XsOp.SET_PERMS}
)
CONTROL_COMMANDS = ("check", "help", "log", "print")


@dataclass(slots=True, eq=False)
class _Node:
    value: bytes
    perms: tuple[Perm, ...]
    children: dict[str, _Node]
    gen: int


@dataclass(frozen=True, slots=True)
class Change:
    """A change to report to watchers.

    `exact`: only a watch on exactly `path` matches (the descendants of a
    recursively removed node, XS-14); otherwise any watch on `path` or an
    ancestor. `perms`: permission lists under which the node was readable.
    """

    path: str
    exact: bool = False
    perms: tuple[tuple[Perm, ...], ...] = ()


@dataclass(slots=True, eq=False)
class _Watch:
    path: str  # absolute, or a special `@` path
    token: str
    given: str  # as registered: event paths are reported relative when this is (XS-15)

    @property
    def relative(self) -> bool:
        return not self.given.startswith("/") and self.given not in SPECIAL_WATCH_PATHS


@dataclass(slots=True, eq=False)
class _Transaction:
    id: int
    root: _Node
    seen: dict[str, int | None] = field(default_factory=dict)  # path -> gen at first access
    log: list[tuple[str, tuple]] = field(default_factory=list)  # mutations to replay at commit


def _parts(path: str) -> list[str]:
    return [] if path == "/" else path[1:].split("/")


def _join(parts: list[str]) -> str:
    return "/" + "/".join(parts)


def _parent(path: str) -> str:
    head = path.rsplit("/", 1)[0]
    return head or "/"


def _lookup(root: _Node, path: str) -> _Node | None:
    node: _Node | None = root
    for part in _parts(path):
        node = node.children.get(part)
        if node is None:
            return None
    return node


def _clone(root: _Node) -> _Node:
    """Deep copy without recursion (paths may be 1500 levels deep)."""
    new_root = _Node(root.value, root.perms, {}, root.gen)
    stack = [(root, new_root)]
    while stack:
        old, new = stack.pop()
        for name, child in old.children.items():
            copy = _Node(child.value, child.perms, {}, child.gen)
            new.children[name] = copy
            stack.append((child, copy))
    return new_root


def _walk(path: str, node: _Node) -> Iterable[tuple[str, _Node]]:
    """(path, node) for `node` and every descendant, without recursion."""
    stack = [(path, node)]
    while stack:
        p, n = stack.pop()
        yield p, n
        prefix = "" if p == "/" else p
        stack.extend((f"{prefix}/{name}", child) for name, child in n.children.items())


class XenStore:
    """The store shared by all sessions; `session(domid)` opens a connection as `domid`."""

    def __init__(self) -> None:
        self._gen = itertools.count(1)
        self._tx_ids = itertools.count(1)
        n0 = (Perm("n", 0),)
        self.root = _Node(b"", n0, {}, self._next_gen())
        self.sessions: list[Session] = []
        self.introduced: set[int] = {0}
        self.targets: dict[int, int] = {}
        self._dirty: dict[int, Session] = {}
        # The skeleton xenstored and the toolstack provide before any guest runs.
        admin = self.session(0)
        admin.mkdir("/local/domain")
        admin.close()

    def _next_gen(self) -> int:
        return next(self._gen)

    # ---------------------------------------------------------------- sessions and queries

    def session(self, domid: int) -> Session:
        s = Session(self, domid)
        self.sessions.append(s)
        return s

    def is_privileged(self, domid: int) -> bool:
        return domid in PRIVILEGED_DOMAINS

    def access(self, domid: int, perms: tuple[Perm, ...]) -> tuple[bool, bool]:
        """(may read, may write) for `domid` under `perms` (XS-13, XK-3)."""
        if self.is_privileged(domid):
            return True, True
        read = write = False
        for who in (domid, self.targets.get(domid)):
            if who is None:
                continue
            if who == perms[0].domid:
                return True, True
            entry = next((p for p in perms[1:] if p.domid == who), perms[0])
            read, write = read or entry.read, write or entry.write
        return read, write

    def exists(self, path: str) -> bool:
        return _lookup(self.root, path) is not None

    def dump(self, top: str = "/") -> dict[str, bytes]:
        """Every node under `top` (absolute) with its value: the oracle's view of the tree."""
        node = _lookup(self.root, top)
        return {} if node is None else {p: n.value for p, n in _walk(top, node)}

    def perms(self, path: str) -> tuple[Perm, ...]:
        node = _lookup(self.root, path)
        if node is None:
            raise XsError("ENOENT", path)
        return node.perms

    def drain_events(self) -> list[tuple[Session, list[tuple[str, str]]]]:
        """Sessions with pending watch events, each with its events in order (emptied)."""
        out = []
        for s in self._dirty.values():
            if s.events:
                out.append((s, list(s.events)))
                s.events.clear()
        self._dirty.clear()
        return out

    # ---------------------------------------------------------------- domains (special watches)

    def introduce(self, domid: int) -> None:
        if domid not in self.introduced:
            self.introduced.add(domid)
            self.fire([Change("@introduceDomain")])

    def release(self, domid: int) -> None:
        """The domain is gone (RELEASE, or the suite destroyed it): fire `@releaseDomain`."""
        if domid in self.introduced:
            self.introduced.discard(domid)
            self.targets.pop(domid, None)
            self.fire([Change("@releaseDomain")])

    # ---------------------------------------------------------------- watch delivery

    def fire(self, changes: list[Change]) -> None:
        """Queue an event on every matching watch (XS-14)."""
        if not changes:
            return
        for s in self.sessions:
            for w in s.watches:
                for ch in changes:
                    if ch.path in SPECIAL_WATCH_PATHS or ch.exact:
                        hit = w.path == ch.path
                    else:
                        hit = w.path not in SPECIAL_WATCH_PATHS and is_under(ch.path, w.path)
                    if hit and self._visible(s.domid, ch):
                        s._queue_event(self._event_path(s, w, ch.path), w.token)

    def _visible(self, domid: int, ch: Change) -> bool:
        if ch.path in SPECIAL_WATCH_PATHS or self.is_privileged(domid):
            return True
        if any(self.access(domid, perms)[0] for perms in ch.perms):
            return True
        parent = _lookup(self.root, _parent(ch.path))
        return parent is not None and self.access(domid, parent.perms)[0]

    @staticmethod
    def _event_path(s: Session, w: _Watch, path: str) -> str:
        if w.relative:
            return path[len(domain_path(s.domid)) + 1 :]
        return path


class Session:
    """One client connection acting as `domid`: the unit that owns watches and transactions.

    Typed methods take text paths (relative ones resolve against the domain's
    home, XS-9) and raise `XsError`; `handle()` is the same on wire payloads.
    """

    def __init__(self, store: XenStore, domid: int) -> None:
        self.store = store
        self.domid = domid
        self.watches: list[_Watch] = []
        self.transactions: dict[int, _Transaction] = {}
        self.events: deque[tuple[str, str]] = deque()
        self.closed = False

    def __repr__(self) -> str:
        return f"Session(domid={self.domid})"

    @property
    def privileged(self) -> bool:
        return self.store.is_privileged(self.domid)

    def close(self) -> None:
        """Connection gone: its watches and open transactions vanish with it."""
        if self.closed:
            return
        self.closed = True
        self.watches.clear()
        self.transactions.clear()
        self.events.clear()
        if self in self.store.sessions:
            self.store.sessions.remove(self)
        self.store._dirty.pop(id(self), None)

    def pop_events(self) -> list[tuple[str, str]]:
        out = list(self.events)
        self.events.clear()
        self.store._dirty.pop(id(self), None)
        return out

    def _queue_event(self, path: str, token: str) -> None:
        self.events.append((path, token))
        self.store._dirty[id(self)] = self

    # ---------------------------------------------------------------- helpers

    def _abs(self, path: str | bytes) -> str:
        return resolve(check_path(path), self.domid)

    def _context(self, tx_id: int) -> tuple[_Node, _Transaction | None]:
        if tx_id == 0:
            return self.store.root, None
        tx = self.transactions.get(tx_id)
        if tx is None:
            raise XsError("ENOENT", f"no transaction {tx_id} on this connection")
        return tx.root, tx

    @staticmethod
    def _seen(tx: _Transaction | None, path: str, node: _Node | None) -> None:
        if tx is not None and path not in tx.seen:
            tx.seen[path] = None if node is None else node.gen

    def _can(self, perms: tuple[Perm, ...], write: bool = False) -> bool:
        return self.store.access(self.domid, perms)[1 if write else 0]

    def _missing(self, root: _Node, path: str) -> XsError:
        """ENOENT, or EACCES when the nearest existing ancestor is unreadable to the caller."""
        node, probe = None, path
        while node is None and probe != "/":
            probe = _parent(probe)
            node = _lookup(root, probe)
        if node is not None and not self._can(node.perms):
            return XsError("EACCES", path)
        return XsError("ENOENT", path)

    def _get(self, root: _Node, tx: _Transaction | None, path: str, write: bool = False) -> _Node:
        node = _lookup(root, path)
        self._seen(tx, path, node)
        if node is None:
            raise self._missing(root, path)
        if not self._can(node.perms, write):
            raise XsError("EACCES", path)
        return node

    def _commit_or_log(self, tx: _Transaction | None, op: str, args: tuple, changes: list[Change]) -> None:
        if tx is None:
            self.store.fire(changes)
        else:
            tx.log.append((op, args))

    # ---------------------------------------------------------------- tree operations

    def read(self, path: str | bytes, tx: int = 0) -> bytes:
        root, t = self._context(tx)
        return self._get(root, t, self._abs(path)).value

    def directory(self, path: str | bytes, tx: int = 0) -> list[str]:
        root, t = self._context(tx)
        return list(self._get(root, t, self._abs(path)).children)

    def get_perms(self, path: str | bytes, tx: int = 0) -> tuple[Perm, ...]:
        root, t = self._context(tx)
        return self._get(root, t, self._abs(path)).perms

    def write(self, path: str | bytes, value: bytes, tx: int = 0) -> None:
        root, t = self._context(tx)
        abs_path = self._abs(path)
        changes = self._create(root, t, abs_path, value, mkdir=False, check=True)
        self._commit_or_log(t, "write", (abs_path, value), changes)

    def mkdir(self, path: str | bytes, tx: int = 0) -> None:
        root, t = self._context(tx)
        abs_path = self._abs(path)
        changes = self._create(root, t, abs_path, b"", mkdir=True, check=True)
        self._commit_or_log(t, "mkdir", (abs_path,), changes)

    def rm(self, path: str | bytes, tx: int = 0) -> None:
        root, t = self._context(tx)
        abs_path = self._abs(path)
        changes = self._rm(root, t, abs_path, check=True)
        self._commit_or_log(t, "rm", (abs_path,), changes)

    def set_perms(self, path: str | bytes, perms: Iterable[Perm], tx: int = 0) -> None:
        root, t = self._context(tx)
        abs_path = self._abs(path)
        perms = tuple(perms)
        if not perms:
            raise XsError("EINVAL", "empty permission list")
        changes = self._set_perms(root, t, abs_path, perms, check=True)
        self._commit_or_log(t, "set_perms", (abs_path, perms), changes)

    def _create(
        self, root: _Node, tx: _Transaction | None, path: str, value: bytes, *, mkdir: bool, check: bool
    ) -> list[Change]:
        """WRITE and MKDIR: missing parents are created empty (XS-10)."""
        parts = _parts(path)
        node, depth = root, 0
        for part in parts:
            child = node.children.get(part)
            if child is None:
                break
            node, depth = child, depth + 1
        if depth == len(parts):  # the node exists
            self._seen(tx, path, node)
            if check and not self._can(node.perms, write=True):
                raise XsError("EACCES", path)
            if mkdir:  # MKDIR leaves an existing node alone and fires nothing
                return []
            node.value = value
            node.gen = self.store._next_gen()
            return [Change(path, perms=(node.perms,))]
        self._seen(tx, _join(parts[:depth]), node)
        for i in range(depth + 1, len(parts) + 1):
            self._seen(tx, _join(parts[:i]), None)
        if check and not self._can(node.perms, write=True):
            raise XsError("EACCES", path)
        perms = node.perms
        if not self.privileged:  # an unprivileged creator owns what it creates
            perms = (Perm(perms[0].kind, self.domid), *perms[1:])
        node.gen = self.store._next_gen()
        for part in parts[depth:]:
            new = _Node(b"", perms, {}, self.store._next_gen())
            node.children[part] = new
            node = new
        node.value = value
        return [Change(path, perms=(perms,))]

    def _rm(self, root: _Node, tx: _Transaction | None, path: str, *, check: bool) -> list[Change]:
        """RM: the node and its subtree (XS-12); a watch below it sees its own path (XS-14)."""
        if path == "/":
            raise XsError("EINVAL", "cannot remove /")
        node = _lookup(root, path)
        parent_path = _parent(path)
        parent = _lookup(root, parent_path)
        self._seen(tx, path, node)
        self._seen(tx, parent_path, parent)
        if node is None:
            if check:
                err = self._missing(root, path)
                if err.name == "EACCES":
                    raise err
            if parent is None:
                raise XsError("ENOENT", f"parent of {path} does not exist")
            return []
        assert parent is not None
        if check and not self._can(node.perms, write=True):
            raise XsError("EACCES", path)
        for p, n in _walk(path, node):  # the subtree as it was: re-creating a node in it later in
            self._seen(tx, p, n)  # this transaction must not read as "absent at the start" (EAGAIN)
        changes = [Change(path, perms=(node.perms,))]
        changes += [Change(p, exact=True, perms=(n.perms,)) for p, n in _walk(path, node) if p != path]
        del parent.children[path.rsplit("/", 1)[1]]
        parent.gen = self.store._next_gen()
        return changes

    def _set_perms(
        self, root: _Node, tx: _Transaction | None, path: str, perms: tuple[Perm, ...], *, check: bool
    ) -> list[Change]:
        node = _lookup(root, path)
        self._seen(tx, path, node)
        if node is None:
            raise self._missing(root, path)
        if check and not self.privileged:
            owner = node.perms[0].domid
            if self.domid != owner and self.store.targets.get(self.domid) != owner:
                raise XsError("EACCES", f"{path}: only the owner may change permissions")
            if perms[0].domid != owner:
                raise XsError("EPERM", f"{path}: only a privileged domain may change the owner")
        old = node.perms
        node.perms = perms
        node.gen = self.store._next_gen()
        return [Change(path, perms=(old, perms))]

    # ---------------------------------------------------------------- transactions (XS-16)

    def transaction_start(self, tx: int = 0) -> int:
        if tx != 0:
            raise XsError("EBUSY" if tx in self.transactions else "ENOENT", "nested transaction")
        if len(self.transactions) >= MAX_TRANSACTIONS:
            raise XsError("ENOSPC", f"more than {MAX_TRANSACTIONS} open transactions")
        tx_id = next(self.store._tx_ids)
        self.transactions[tx_id] = _Transaction(tx_id, _clone(self.store.root))
        return tx_id

    def transaction_end(self, tx: int, commit: bool) -> None:
        t = self.transactions.pop(tx, None)
        if t is None:
            raise XsError("ENOENT", f"no transaction {tx} on this connection")
        if not commit:
            return
        live = self.store.root
        for path, gen in t.seen.items():
            node = _lookup(live, path)
            if (None if node is None else node.gen) != gen:
                raise XsError("EAGAIN", f"{path} changed since the transaction started")
        replay: dict[str, Callable[..., list[Change]]] = {
            "write": lambda p, v: self._create(live, None, p, v, mkdir=False, check=False),
            "mkdir": lambda p: self._create(live, None, p, b"", mkdir=True, check=False),
            "rm": lambda p: self._rm(live, None, p, check=False),
            "set_perms": lambda p, perms: self._set_perms(live, None, p, perms, check=False),
        }
        changes: list[Change] = []
        for op, args in t.log:
            changes += replay[op](*args)
        self.store.fire(changes)

    # ---------------------------------------------------------------- watches (XS-14, XS-15)

    def watch(self, path: str | bytes, token: str) -> None:
        given = check_path(path, watch=True)
        abs_path = resolve(given, self.domid)
        if any(w.path == abs_path and w.token == token for w in self.watches):
            raise XsError("EEXIST", f"watch {given} {token!r} already registered")
        if len(self.watches) >= MAX_WATCHES:
            raise XsError("E2BIG", f"more than {MAX_WATCHES} watches")
        self.watches.append(_Watch(abs_path, token, given))
        self._queue_event(given, token)  # the initial event, sent after the OK reply

    def unwatch(self, path: str | bytes, token: str) -> None:
        given = check_path(path, watch=True)
        abs_path = resolve(given, self.domid)
        for i, w in enumerate(self.watches):
            if w.path == abs_path and w.token == token:
                del self.watches[i]
                return
        raise XsError("ENOENT", f"no watch {given} {token!r}")

    def reset_watches(self) -> None:
        self.watches.clear()
        self.transactions.clear()

    # ---------------------------------------------------------------- domains

    def _require_privileged(self, what: str) -> None:
        if not self.privileged:
            raise XsError("EACCES", f"{what} is for the control domain")

    def introduce(self, domid: int) -> None:
        self._require_privileged("INTRODUCE")
        if domid == 0:
            raise XsError("EINVAL", "domain 0 cannot be introduced")
        self.store.introduce(domid)

    def release(self, domid: int) -> None:
        self._require_privileged("RELEASE")
        if domid == 0:
            raise XsError("EINVAL", "domain 0 cannot be released")
        if domid not in self.store.introduced:
            raise XsError("ENOENT", f"domain {domid} is not introduced")
        self.store.release(domid)

    # ---------------------------------------------------------------- the wire entry point

    def handle(self, op: int, tx_id: int, payload: bytes) -> bytes:
        """Reply payload for one request; raises XsError for the XS_ERROR reply (XS-3, XS-6)."""
        if op in TX_OPS or op == XsOp.TRANSACTION_END:
            self._context(tx_id)  # an unknown tx_id is ENOENT before the arguments are looked at
        handler = _HANDLERS.get(op)
        if handler is None:
            raise XsError("ENOSYS", f"message type {op} is not supported")
        reply = handler(self, tx_id, payload)
        if len(reply) > XS_PAYLOAD_MAX:
            raise XsError("E2BIG", f"reply of {len(reply)} bytes")
        return reply


def _token(raw: bytes) -> str:
    return raw.decode("latin-1")


def _h_read(s: Session, tx: int, payload: bytes) -> bytes:
    return s.read(one_arg(payload), tx)


def _h_directory(s: Session, tx: int, payload: bytes) -> bytes:
    return b"".join(name.encode() + b"\0" for name in s.directory(one_arg(payload), tx))


def _h_get_perms(s: Session, tx: int, payload: bytes) -> bytes:
    return perms_to_wire(s.get_perms(one_arg(payload), tx))


def _h_write(s: Session, tx: int, payload: bytes) -> bytes:
    path, value = path_and_value(payload)
    s.write(path, value, tx)
    return OK


def _h_mkdir(s: Session, tx: int, payload: bytes) -> bytes:
    s.mkdir(one_arg(payload), tx)
    return OK


def _h_rm(s: Session, tx: int, payload: bytes) -> bytes:
    s.rm(one_arg(payload), tx)
    return OK


def _h_set_perms(s: Session, tx: int, payload: bytes) -> bytes:
    path, _, rest = payload.partition(b"\0")
    s.set_perms(path, perms_from_wire(rest), tx)
    return OK


def _h_watch(s: Session, tx: int, payload: bytes) -> bytes:
    args = string_args(payload, 2, 3)  # wpath, token[, depth]
    s.watch(args[0], _token(args[1]))
    return OK


def _h_unwatch(s: Session, tx: int, payload: bytes) -> bytes:
    args = string_args(payload, 2, 2)
    s.unwatch(args[0], _token(args[1]))
    return OK


def _h_tx_start(s: Session, tx: int, payload: bytes) -> bytes:
    return str(s.transaction_start(tx)).encode() + b"\0"


def _h_tx_end(s: Session, tx: int, payload: bytes) -> bytes:
    arg = one_arg(payload)
    if arg not in (b"T", b"F"):
        raise XsError("EINVAL", f"TRANSACTION_END argument {arg!r}")
    s.transaction_end(tx, commit=arg == b"T")
    return OK


def _h_introduce(s: Session, tx: int, payload: bytes) -> bytes:
    domid, gfn, port = string_args(payload, 3, 3)
    for number in (gfn, port):
        if not number.isdigit():
            raise XsError("EINVAL", f"bad number {number!r}")
    s.introduce(parse_domid(domid))
    return OK


def _h_release(s: Session, tx: int, payload: bytes) -> bytes:
    s.release(parse_domid(one_arg(payload)))
    return OK


def _h_resume(s: Session, tx: int, payload: bytes) -> bytes:
    s._require_privileged("RESUME")
    domid = parse_domid(one_arg(payload))
    if domid not in s.store.introduced:
        raise XsError("ENOENT", f"domain {domid} is not introduced")
    return OK


def _h_set_target(s: Session, tx: int, payload: bytes) -> bytes:
    s._require_privileged("SET_TARGET")
    domid, target = (parse_domid(a) for a in string_args(payload, 2, 2))
    s.store.targets[domid] = target
    return OK


def _h_get_domain_path(s: Session, tx: int, payload: bytes) -> bytes:
    return domain_path(parse_domid(one_arg(payload))).encode() + b"\0"


def _h_is_introduced(s: Session, tx: int, payload: bytes) -> bytes:
    return b"T\0" if parse_domid(one_arg(payload)) in s.store.introduced else b"F\0"


def _h_reset_watches(s: Session, tx: int, payload: bytes) -> bytes:
    s.reset_watches()
    return OK


def _h_control(s: Session, tx: int, payload: bytes) -> bytes:
    """Minimal XS_CONTROL: enough for a client probing it, nothing xenstored-internal."""
    s._require_privileged("CONTROL")
    cmd = string_args(payload, 1)[0].decode("ascii", "replace")
    if cmd == "help":
        return "\n".join(CONTROL_COMMANDS).encode() + b"\n\0"
    if cmd in CONTROL_COMMANDS:
        return OK
    raise XsError("EINVAL", f"unknown control command {cmd!r}")


_HANDLERS: dict[int, Callable[[Session, int, bytes], bytes]] = {
    XsOp.CONTROL: _h_control,
    XsOp.DIRECTORY: _h_directory,
    XsOp.READ: _h_read,
    XsOp.GET_PERMS: _h_get_perms,
    XsOp.WATCH: _h_watch,
    XsOp.UNWATCH: _h_unwatch,
    XsOp.TRANSACTION_START: _h_tx_start,
    XsOp.TRANSACTION_END: _h_tx_end,
    XsOp.INTRODUCE: _h_introduce,
    XsOp.RELEASE: _h_release,
    XsOp.GET_DOMAIN_PATH: _h_get_domain_path,
    XsOp.WRITE: _h_write,
    XsOp.MKDIR: _h_mkdir,
    XsOp.RM: _h_rm,
    XsOp.SET_PERMS: _h_set_perms,
    XsOp.IS_DOMAIN_INTRODUCED: _h_is_introduced,
    XsOp.RESUME: _h_resume,
    XsOp.SET_TARGET: _h_set_target,
    XsOp.RESET_WATCHES: _h_reset_watches,
}
