"""The XenStore model against a flat dict oracle (XS-9..XS-16, XK-3).

The model is a tree with generation counters; the oracle is a dict of absolute
path -> (value, perms) and derives parents, children and subtrees from the
keys. The machine drives both with the same requests from dom0, a frontend
(domid 1) and a backend (domid 2), on relative and absolute paths, inside and
outside transactions, and compares results, errors, trees and watch events.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import note
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from blkif_spec.xen.xenstore_model import MAX_WATCHES, XenStore
from blkif_spec.xen.xs_wire import XS_PAYLOAD_MAX, Perm, XsError, XsOp, is_under, parse_perms

N0 = (Perm("n", 0),)
HOME = {d: f"/local/domain/{d}" for d in (0, 1, 2)}
#: libxl's layout (XK-3): homes owned by dom0 and readable by the guest, the
#: frontend dir owned by the frontend and readable by the backend, and back.
SETUP = (
    ("/local/domain/1", "n0 r1"),
    ("/local/domain/1/device", "n1 r2"),
    ("/local/domain/2", "n0 r2"),
    ("/local/domain/2/backend", "n2 r1"),
)
BASES = ("/local/domain/1/device", "/local/domain/2/backend", "/local/domain/1", "/local/domain/2", "/x")
SUFFIXES = ((), ("a",), ("b",), ("a", "b"), ("a", "c"))
PERMS = ("n1", "n2", "n2 r1", "n1 r2", "b1", "r2 w1", "n0", "n0 r1 r2", "n2 b1")

doms = st.sampled_from((0, 1, 2))
paths = st.builds(
    lambda b, s: b + "".join(f"/{x}" for x in s), st.sampled_from(BASES), st.sampled_from(SUFFIXES)
)
values = st.sampled_from((b"", b"1", b"x", b"4"))
perm_lists = st.sampled_from(PERMS).map(parse_perms)
tokens = st.sampled_from(("t1", "t2"))


def parent(path: str) -> str:
    return path.rsplit("/", 1)[0] or "/"


def can(dom: int, perms: tuple[Perm, ...], write: bool = False) -> bool:
    if dom == 0 or perms[0].domid == dom:
        return True
    entry = next((p for p in perms[1:] if p.domid == dom), perms[0])
    return entry.write if write else entry.read


Change = tuple[str, bool, tuple[tuple[Perm, ...], ...]]  # path, exact, perms it was readable under


class Oracle:
    """XenStore as a dict; written for obviousness, not speed."""

    def __init__(self, nodes: dict[str, tuple[bytes, tuple[Perm, ...]]] | None = None) -> None:
        self.nodes = (
            dict(nodes) if nodes is not None else {p: (b"", N0) for p in ("/", "/local", "/local/domain")}
        )

    def copy(self) -> Oracle:
        return Oracle(self.nodes)

    def _nearest(self, path: str) -> str:
        while path != "/":
            path = parent(path)
            if path in self.nodes:
                return path
        return "/"

    def _missing(self, dom: int, path: str) -> XsError:
        if not can(dom, self.nodes[self._nearest(path)][1]):
            return XsError("EACCES")
        return XsError("ENOENT")

    def _get(self, dom: int, path: str) -> tuple[bytes, tuple[Perm, ...]]:
        if path not in self.nodes:
            raise self._missing(dom, path)
        if not can(dom, self.nodes[path][1]):
            raise XsError("EACCES")
        return self.nodes[path]

    def read(self, dom: int, path: str) -> bytes:
        return self._get(dom, path)[0]

    def directory(self, dom: int, path: str) -> list[str]:
        self._get(dom, path)
        return sorted(p.rsplit("/", 1)[1] for p in self.nodes if p != "/" and parent(p) == path)

    def get_perms(self, dom: int, path: str) -> tuple[Perm, ...]:
        return self._get(dom, path)[1]

    def write(
        self, dom: int, path: str, value: bytes, check: bool = True, mkdir: bool = False
    ) -> list[Change]:
        if path in self.nodes:
            _, perms = self.nodes[path]
            if check and not can(dom, perms, write=True):
                raise XsError("EACCES")
            if mkdir:
                return []
            self.nodes[path] = (value, perms)
            return [(path, False, (perms,))]
        anc = self._nearest(path)
        perms = self.nodes[anc][1]
        if check and not can(dom, perms, write=True):
            raise XsError("EACCES")
        if dom != 0:
            perms = (Perm(perms[0].kind, dom), *perms[1:])
        p = path
        while p != anc:
            self.nodes[p] = (b"", perms)
            p = parent(p)
        self.nodes[path] = (value, perms)
        return [(path, False, (perms,))]

    def mkdir(self, dom: int, path: str, check: bool = True) -> list[Change]:
        return self.write(dom, path, b"", check=check, mkdir=True)

    def rm(self, dom: int, path: str, check: bool = True) -> list[Change]:
        if path not in self.nodes:
            if check and self._missing(dom, path).name == "EACCES":
                raise XsError("EACCES")
            if parent(path) not in self.nodes:
                raise XsError("ENOENT")
            return []
        perms = self.nodes[path][1]
        if check and not can(dom, perms, write=True):
            raise XsError("EACCES")
        gone = [p for p in self.nodes if is_under(p, path)]
        changes = [(path, False, (perms,))] + [(p, True, (self.nodes[p][1],)) for p in gone if p != path]
        for p in gone:
            del self.nodes[p]
        return changes

    def set_perms(self, dom: int, path: str, perms: tuple[Perm, ...], check: bool = True) -> list[Change]:
        if path not in self.nodes:
            raise self._missing(dom, path)
        value, old = self.nodes[path]
        if check and dom != 0:
            if dom != old[0].domid:
                raise XsError("EACCES")
            if perms[0].domid != old[0].domid:
                raise XsError("EPERM")
        self.nodes[path] = (value, perms)
        return [(path, False, (old, perms))]

    def visible(self, dom: int, path: str, permsets: tuple[tuple[Perm, ...], ...]) -> bool:
        if dom == 0 or any(can(dom, ps) for ps in permsets):
            return True
        up = parent(path)
        return up in self.nodes and can(dom, self.nodes[up][1])


def outcome(fn):
    try:
        return ("ok", fn())
    except XsError as exc:
        return ("err", exc.name)


@dataclass
class Tx:
    id: int
    view: Oracle
    start: dict
    log: list = field(default_factory=list)
    touched: set = field(default_factory=set)
    outside: bool = False  # a live mutation happened since it started


MUTATING = ("write", "mkdir", "rm", "set_perms")


class XenStoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.store = XenStore()
        self.sessions = {d: self.store.session(d) for d in (0, 1, 2)}
        self.oracle = Oracle()
        self.watches: dict[int, list[tuple[str, str, str]]] = {d: [] for d in (0, 1, 2)}  # abs, token, given
        self.txs: dict[int, Tx] = {}
        for path, perms in SETUP:
            self.sessions[0].mkdir(path)
            self.sessions[0].set_perms(path, parse_perms(perms))
            self.oracle.mkdir(0, path)
            self.oracle.set_perms(0, path, parse_perms(perms))

    # ---------------------------------------------------------------- helpers

    @staticmethod
    def given(dom: int, path: str, rel: bool) -> str:
        """XS-9: a domain may name its own subtree relative to its home."""
        prefix = HOME[dom] + "/"
        return path[len(prefix) :] if rel and path.startswith(prefix) else path

    def expect_events(self, changes: list[Change]) -> None:
        """Pop every session's events and compare with XS-14 applied to `changes`."""
        for dom, session in self.sessions.items():
            expected = []
            for abs_path, token, given in self.watches[dom]:
                for path, exact, permsets in changes:
                    hit = abs_path == path if exact else is_under(path, abs_path)
                    if hit and self.oracle.visible(dom, path, permsets):
                        relative = not given.startswith("/")
                        expected.append((path[len(HOME[dom]) + 1 :] if relative else path, token))
            assert sorted(session.pop_events()) == sorted(expected), f"events of domain {dom}"

    def mutated(self, changes: list[Change], exclude: int | None = None) -> None:
        if changes:
            for dom, tx in self.txs.items():
                if dom != exclude:
                    tx.outside = True
        self.expect_events(changes)

    def do(self, dom: int, op: str, path: str, args: tuple, rel: bool, wire: bool = False):
        given = self.given(dom, path, rel)
        note(f"domain {dom}: {op} {given} {args}{' (wire)' if wire else ''}")
        session = self.sessions[dom]
        if wire and op == "write":
            got = outcome(lambda: session.handle(XsOp.WRITE, 0, given.encode() + b"\0" + args[0]))
            got = ("ok", None) if got == ("ok", b"OK\0") else got
        elif wire and op == "read":
            got = outcome(lambda: session.handle(XsOp.READ, 0, given.encode() + b"\0"))
        else:
            got = outcome(lambda: getattr(session, op)(given, *args))
        want = outcome(lambda: getattr(self.oracle, op)(dom, path, *args))
        if op == "directory" and got[0] == "ok":
            got = ("ok", sorted(got[1]))
        if op in MUTATING:
            assert got[0] == want[0] and (got[0] == "ok" or got[1] == want[1]), (got, want)
            self.mutated(want[1] if want[0] == "ok" else [])
        else:
            assert got == want
            self.expect_events([])

    # ---------------------------------------------------------------- plain operations

    @rule(dom=doms, path=paths, value=values, rel=st.booleans(), wire=st.booleans())
    def write(self, dom, path, value, rel, wire):
        self.do(dom, "write", path, (value,), rel, wire)

    @rule(dom=doms, path=paths, rel=st.booleans())
    def mkdir(self, dom, path, rel):
        self.do(dom, "mkdir", path, (), rel)

    @rule(dom=doms, path=paths, rel=st.booleans())
    def rm(self, dom, path, rel):
        self.do(dom, "rm", path, (), rel)

    @rule(dom=doms, path=paths, rel=st.booleans(), wire=st.booleans())
    def read(self, dom, path, rel, wire):
        self.do(dom, "read", path, (), rel, wire)

    @rule(dom=doms, path=paths, rel=st.booleans())
    def directory(self, dom, path, rel):
        self.do(dom, "directory", path, (), rel)

    @rule(dom=doms, path=paths)
    def get_perms(self, dom, path):
        self.do(dom, "get_perms", path, (), False)

    @rule(dom=doms, path=paths, perms=perm_lists)
    def set_perms(self, dom, path, perms):
        self.do(dom, "set_perms", path, (perms,), False)

    # ---------------------------------------------------------------- watches (XS-14, XS-15)

    @rule(dom=doms, path=paths, token=tokens, rel=st.booleans())
    def watch(self, dom, path, token, rel):
        given = self.given(dom, path, rel)
        note(f"domain {dom}: watch {given} {token}")
        got = outcome(lambda: self.sessions[dom].watch(given, token))
        if any(w[0] == path and w[1] == token for w in self.watches[dom]):
            assert got == ("err", "EEXIST")
            assert self.sessions[dom].pop_events() == []
        else:
            assert got == ("ok", None)
            self.watches[dom].append((path, token, given))
            assert self.sessions[dom].pop_events() == [(given, token)]  # the initial event

    @precondition(lambda self: any(self.watches.values()))
    @rule(data=st.data())
    def unwatch(self, data):
        dom = data.draw(st.sampled_from([d for d in (0, 1, 2) if self.watches[d]]))
        path, token, given = data.draw(st.sampled_from(self.watches[dom]))
        note(f"domain {dom}: unwatch {given} {token}")
        self.sessions[dom].unwatch(given, token)
        self.watches[dom].remove((path, token, given))
        assert outcome(lambda: self.sessions[dom].unwatch(given, token)) == ("err", "ENOENT")

    # ---------------------------------------------------------------- transactions (XS-16)

    @rule(dom=doms)
    def tx_start(self, dom):
        if dom in self.txs:
            return
        tx_id = self.sessions[dom].transaction_start()
        note(f"domain {dom}: transaction {tx_id} starts")
        self.txs[dom] = Tx(tx_id, self.oracle.copy(), dict(self.oracle.nodes))

    @precondition(lambda self: self.txs)
    @rule(data=st.data())
    def tx_ops(self, data):
        dom = data.draw(st.sampled_from(sorted(self.txs)))
        for _ in range(data.draw(st.integers(1, 3))):
            op = data.draw(st.sampled_from(("read", "write", "mkdir", "rm", "directory", "set_perms")))
            path, rel = data.draw(paths), data.draw(st.booleans())
            args = {"write": (data.draw(values),), "set_perms": (data.draw(perm_lists),)}.get(op, ())
            self.tx_op(dom, op, path, args, rel)

    def tx_op(self, dom, op, path, args, rel):
        tx = self.txs[dom]
        given = self.given(dom, path, rel)
        note(f"domain {dom}: in transaction {tx.id}: {op} {given} {args}")
        got = outcome(lambda: getattr(self.sessions[dom], op)(given, *args, tx=tx.id))
        want = outcome(lambda: getattr(tx.view, op)(dom, path, *args))
        if op == "directory" and got[0] == "ok":
            got = ("ok", sorted(got[1]))
        if op in MUTATING:
            assert got[0] == want[0] and (got[0] == "ok" or got[1] == want[1]), (got, want)
            if got[0] == "ok":
                tx.log.append((op, path, args))
        else:
            assert got == want
        tx.touched.add(path)
        self.expect_events([])  # nothing fires before the commit

    @precondition(lambda self: any(tx.touched for tx in self.txs.values()))
    @rule(data=st.data(), value=values, remove=st.booleans())
    def interfere(self, data, value, remove):
        """dom0 changes, outside the transaction, a node a transaction has looked at."""
        dom = data.draw(st.sampled_from(sorted(d for d, tx in self.txs.items() if tx.touched)))
        path = data.draw(st.sampled_from(sorted(self.txs[dom].touched)))
        if remove:
            self.do(0, "rm", path, (), False)
        else:
            self.do(0, "write", path, (value,), False)

    @precondition(lambda self: any(tx.touched for tx in self.txs.values()))
    @rule(data=st.data(), commit=st.booleans())
    def tx_end(self, data, commit):
        dom = data.draw(st.sampled_from(sorted(d for d, tx in self.txs.items() if tx.touched)))
        tx = self.txs.pop(dom)
        note(f"domain {dom}: transaction {tx.id} {'commit' if commit else 'abort'}")
        got = outcome(lambda: self.sessions[dom].transaction_end(tx.id, commit))
        assert outcome(lambda: self.sessions[dom].read("/", tx=tx.id)) == ("err", "ENOENT")  # id now invalid
        if not commit:
            assert got == ("ok", None)
            self.expect_events([])
            return
        changed = {
            p for p in set(tx.start) | set(self.oracle.nodes) if tx.start.get(p) != self.oracle.nodes.get(p)
        }
        if not tx.outside:
            assert got == ("ok", None), "nothing intervened, yet the commit failed"
        if changed & tx.touched:
            assert got == ("err", "EAGAIN"), f"{sorted(changed & tx.touched)} changed under the transaction"
        assert got in (("ok", None), ("err", "EAGAIN"))
        if got[0] == "err":
            self.expect_events([])
            return
        changes: list[Change] = []
        for op, path, args in tx.log:
            changes += getattr(self.oracle, op)(dom, path, *args, check=False)
        self.mutated(changes, exclude=dom)

    # ---------------------------------------------------------------- the trees agree

    @invariant()
    def same_tree(self):
        assert self.store.dump() == {p: v for p, (v, _) in self.oracle.nodes.items()}
        for path, (_, perms) in self.oracle.nodes.items():
            assert self.store.perms(path) == perms, path


def test_model_matches_dict_oracle():
    run_state_machine_as_test(XenStoreMachine)


# --------------------------------------------------------------------------- examples


@pytest.fixture
def store():
    s = XenStore()
    admin = s.session(0)
    for path, perms in SETUP:
        admin.mkdir(path)
        admin.set_perms(path, parse_perms(perms))
    return s


def err(fn) -> str | None:
    try:
        fn()
    except XsError as exc:
        return exc.name
    return None


def test_frontend_cannot_write_backend_dir_until_granted(store):
    """XK-3: the backend dir belongs to the backend; dom0 ignores permissions."""
    fe, be, dom0 = store.session(1), store.session(2), store.session(0)
    be.write("backend/vbd/1/51712/state", b"1")
    assert fe.read("/local/domain/2/backend/vbd/1/51712/state") == b"1"
    assert err(lambda: fe.write("/local/domain/2/backend/vbd/1/51712/state", b"6")) == "EACCES"
    assert err(lambda: fe.rm("/local/domain/2/backend/vbd")) == "EACCES"
    assert err(lambda: fe.set_perms("/local/domain/2/backend", parse_perms("n2 b1"))) == "EACCES"
    dom0.write("/local/domain/2/backend/vbd/1/51712/state", b"5")  # privileged
    be.set_perms("backend/vbd/1/51712/state", parse_perms("n2 b1"))
    fe.write("/local/domain/2/backend/vbd/1/51712/state", b"6")
    assert be.read("backend/vbd/1/51712/state") == b"6"
    assert err(lambda: be.set_perms("backend", parse_perms("n1"))) == "EPERM"  # owner change: dom0 only
    dom0.set_perms("/local/domain/2/backend", parse_perms("n1"))


def test_created_nodes_inherit_perms_and_creator_owns(store):
    fe = store.session(1)
    fe.write("device/vbd/51712/ring-ref", b"8")
    assert store.perms("/local/domain/1/device/vbd") == parse_perms("n1 r2")
    store.session(0).write("/local/domain/1/device/vbd/51712/backend", b"/x")
    assert store.perms("/local/domain/1/device/vbd/51712/backend") == parse_perms("n1 r2")
    store.session(0).set_perms("/local/domain/1/device", parse_perms("n0 w1"))
    fe.write("device/new", b"")
    assert store.perms("/local/domain/1/device/new") == parse_perms("n1 w1")


def test_missing_node_is_enoent_unless_ancestor_unreadable(store):
    """XS-11; a domain that may not read the parent learns nothing (EACCES)."""
    fe, be = store.session(1), store.session(2)
    assert err(lambda: fe.read("device/none")) == "ENOENT"
    assert err(lambda: be.read("/local/domain/1/none")) == "EACCES"
    assert err(lambda: fe.directory("/local/domain/none")) == "EACCES"
    assert err(lambda: store.session(0).get_perms("/no/such")) == "ENOENT"
    assert err(lambda: fe.rm("device/a/b")) == "ENOENT"  # XS-12: parent missing
    assert err(lambda: fe.rm("device/a")) is None  # parent exists


def test_watch_event_paths(store):
    """XS-14/15: subtree events, recursive removal reports the watch path, relative stays relative."""
    dom0, fe = store.session(0), store.session(1)
    dom0.mkdir("/w/a/b/c")
    dom0.watch("/w", "top")
    dom0.watch("/w/a/b", "mid")
    dom0.watch("/w/a/b/zz", "absent")
    fe.watch("device", "rel")
    assert sorted(dom0.pop_events()) == [("/w", "top"), ("/w/a/b", "mid"), ("/w/a/b/zz", "absent")]
    assert fe.pop_events() == [("device", "rel")]
    dom0.write("/w/a/b/c/d", b"1")
    assert sorted(dom0.pop_events()) == [("/w/a/b/c/d", "mid"), ("/w/a/b/c/d", "top")]
    dom0.rm("/w/a")
    assert sorted(dom0.pop_events()) == [("/w/a", "top"), ("/w/a/b", "mid")]
    fe.write("device/vbd/1/state", b"1")
    assert fe.pop_events() == [("device/vbd/1/state", "rel")]
    assert err(lambda: fe.watch("device", "rel")) == "EEXIST"
    dom0.mkdir("/w")  # exists: no change, no event
    assert dom0.pop_events() == []


def test_transaction_conflict_and_isolation(store):
    a, b = store.session(0), store.session(0)
    a.write("/t/x", b"1")
    ta = a.transaction_start()
    assert a.read("/t/x", tx=ta) == b"1"
    a.write("/t/y", b"2", tx=ta)
    assert err(lambda: b.read("/t/y")) == "ENOENT"  # invisible until commit
    b.write("/t/x", b"changed")
    assert err(lambda: a.transaction_end(ta, True)) == "EAGAIN"
    assert err(lambda: b.read("/t/y")) == "ENOENT"
    tb = b.transaction_start()
    b.write("/t/y", b"3", tx=tb)
    a.write("/u", b"elsewhere")
    b.transaction_end(tb, True)
    assert a.read("/t/y") == b"3"
    assert err(lambda: a.transaction_end(tb, True)) == "ENOENT"  # not a's transaction


def test_transaction_events_fire_on_commit_only(store):
    s = store.session(0)
    s.watch("/t", "tok")
    s.pop_events()
    tx = s.transaction_start()
    s.write("/t/a", b"1", tx=tx)
    assert s.pop_events() == []
    s.transaction_end(tx, True)
    assert s.pop_events() == [("/t/a", "tok")]


def test_domain_special_watches_and_privilege(store):
    dom0, fe = store.session(0), store.session(1)
    dom0.watch("@introduceDomain", "i")
    fe.watch("@releaseDomain", "r")
    assert dom0.pop_events() == [("@introduceDomain", "i")]
    assert fe.pop_events() == [("@releaseDomain", "r")]
    assert dom0.handle(XsOp.INTRODUCE, 0, b"1\x00100\x005\x00") == b"OK\0"
    assert dom0.pop_events() == [("@introduceDomain", "i")]
    assert fe.handle(XsOp.IS_DOMAIN_INTRODUCED, 0, b"1\0") == b"T\0"
    assert err(lambda: fe.handle(XsOp.RELEASE, 0, b"1\0")) == "EACCES"
    assert err(lambda: fe.handle(XsOp.INTRODUCE, 0, b"3\x000\x000\x00")) == "EACCES"
    dom0.handle(XsOp.RELEASE, 0, b"1\0")
    assert fe.pop_events() == [("@releaseDomain", "r")]
    assert err(lambda: dom0.handle(XsOp.RELEASE, 0, b"1\0")) == "ENOENT"
    assert err(lambda: dom0.write("@releaseDomain", b"x")) == "EINVAL"  # special only as a watch path
    assert fe.handle(XsOp.GET_DOMAIN_PATH, 0, b"7\0") == b"/local/domain/7\0"


@pytest.mark.parametrize(
    ("op", "tx_id", "payload", "error"),
    [
        (20, 0, b"", "ENOSYS"),
        (22, 0, b"/\x000\x00", "ENOSYS"),
        (XsOp.WATCH_EVENT, 0, b"/\x00t\x00", "ENOSYS"),
        (XsOp.INVALID, 0, b"", "ENOSYS"),
        (XsOp.READ, 0, b"/local", "EINVAL"),  # missing NUL
        (XsOp.READ, 0, b"/local\0extra\0", "EINVAL"),
        (XsOp.READ, 0, b"/a//b\0", "EINVAL"),
        (XsOp.READ, 99, b"/local\0", "ENOENT"),  # unknown transaction
        (XsOp.WRITE, 0, b"/nonul", "EINVAL"),
        (XsOp.WATCH, 0, b"/a\0", "EINVAL"),
        (XsOp.TRANSACTION_END, 0, b"T\0", "ENOENT"),
        (XsOp.SET_PERMS, 0, b"/local\0x1\0", "EINVAL"),
        (XsOp.GET_DOMAIN_PATH, 0, b"abc\0", "EINVAL"),
    ],
)
def test_malformed_requests_get_errors(store, op, tx_id, payload, error):
    assert err(lambda: store.session(0).handle(op, tx_id, payload)) == error


def test_reply_over_payload_max_is_e2big(store):
    s = store.session(0)
    for i in range(XS_PAYLOAD_MAX // 8):
        s.mkdir(f"/big/child{i:04d}")
    assert err(lambda: s.handle(XsOp.DIRECTORY, 0, b"/big\0")) == "E2BIG"


def test_watch_quota_and_reset(store):
    s = store.session(0)
    for i in range(MAX_WATCHES):
        s.watch("/q", f"t{i}")
    assert err(lambda: s.watch("/q", "one-more")) == "E2BIG"
    s.handle(XsOp.RESET_WATCHES, 0, b"\0")
    assert s.watches == []


def test_deep_paths_do_not_recurse(store):
    s = store.session(0)
    deep = "/d" + "/a" * 1500
    s.write(deep, b"v")
    tx = s.transaction_start()
    s.rm("/d", tx=tx)
    s.transaction_end(tx, True)
    assert not store.exists("/d")
