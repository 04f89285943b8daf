"""Tests of the simulated event channels: binding rules, bounded waits, destroy, other processes.

The cross-process tests fork real children (the IOPS benchmark's setup): a
child maps a grant and exchanges notifications with the parent, and a
destroy in the parent ends a wait blocked in the child.
"""

from __future__ import annotations

import multiprocessing
import pickle
import select
import threading
import time
from collections.abc import Iterator

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from blkif_spec.xen.api import EventChannels, XenError
from blkif_spec.xen.sim_evtchn import EvtchnHost, PortInfo, SimEventChannels
from blkif_spec.xen.sim_grants import GrantHost, SimGrantTable

FRONT, BACK, OTHER = 1, 2, 3
SLACK = 0.5  # how late a bounded wait may return
JOIN_TIMEOUT = 10.0


@pytest.fixture
def host() -> Iterator[EvtchnHost]:
    with EvtchnHost(max_ports=16) as h:
        yield h


def connect(host: EvtchnHost) -> tuple[SimEventChannels, int, SimEventChannels, int]:
    front, back = host.channels(FRONT), host.channels(BACK)
    fport = front.alloc_unbound(BACK)
    bport = back.bind_interdomain(FRONT, fport)
    return front, fport, back, bport


def test_views_satisfy_the_api_protocol(host: EvtchnHost) -> None:
    assert isinstance(host.channels(FRONT), EventChannels)


# -- binding rules --------------------------------------------------------------------------


def test_bind_only_to_a_port_left_unbound_for_you(host: EvtchnHost) -> None:
    front, back, other = host.channels(FRONT), host.channels(BACK), host.channels(OTHER)
    fport = front.alloc_unbound(BACK)
    assert host.port_info(FRONT, fport) == PortInfo("unbound", BACK, None)
    with pytest.raises(XenError, match=f"allocated for domain {BACK}, not {OTHER}"):
        other.bind_interdomain(FRONT, fport)
    with pytest.raises(XenError, match=f"domain {FRONT} has no port {fport + 1}"):
        back.bind_interdomain(FRONT, fport + 1)
    with pytest.raises(XenError, match="has no port"):
        back.bind_interdomain(OTHER, fport)
    bport = back.bind_interdomain(FRONT, fport)
    assert host.port_info(FRONT, fport) == PortInfo("interdomain", BACK, bport)
    assert host.port_info(BACK, bport) == PortInfo("interdomain", FRONT, fport)
    with pytest.raises(XenError, match="interdomain, not unbound"):
        back.bind_interdomain(FRONT, fport)  # one peer per channel
    assert host.ports_of(OTHER) == []


def test_ports_are_numbered_per_domain_from_one(host: EvtchnHost) -> None:
    front, back = host.channels(FRONT), host.channels(BACK)
    assert [front.alloc_unbound(BACK) for _ in range(3)] == [1, 2, 3]
    assert back.alloc_unbound(FRONT) == 1
    front.unbind(2)
    assert front.alloc_unbound(BACK) == 2  # the lowest free number again
    assert host.ports_of(FRONT) == [1, 2, 3]


def test_loopback_channel_to_self(host: EvtchnHost) -> None:
    front = host.channels(FRONT)
    a = front.alloc_unbound(FRONT)
    b = front.bind_interdomain(FRONT, a)
    front.notify(a)
    assert front.wait(0) == [b]
    front.notify(b)
    assert front.wait(0) == [a]


def test_port_table_full(host: EvtchnHost) -> None:
    front = host.channels(FRONT)
    for _ in range(host.max_ports):
        front.alloc_unbound(BACK)
    with pytest.raises(XenError, match="no free event channel"):
        front.alloc_unbound(BACK)


# -- notify and wait -----------------------------------------------------------------------------


def test_notify_needs_a_connected_port_of_your_own(host: EvtchnHost) -> None:
    front, back, other = host.channels(FRONT), host.channels(BACK), host.channels(OTHER)
    fport = front.alloc_unbound(BACK)
    with pytest.raises(XenError, match=f"port {fport} of domain {FRONT} is unbound"):
        front.notify(fport)
    with pytest.raises(XenError, match="has no event channel port"):
        front.notify(fport + 5)
    with pytest.raises(XenError, match=f"domain {OTHER} has no event channel port {fport}"):
        other.notify(fport)  # a port number that only exists in another domain
    back.bind_interdomain(FRONT, fport)
    front.notify(fport)


def test_notify_sets_the_peer_pending_and_wait_clears_it(host: EvtchnHost) -> None:
    front, fport, back, bport = connect(host)
    assert back.wait(0) == []
    front.notify(fport)
    front.notify(fport)  # events coalesce, as pending bits do
    assert back.wait(0) == [bport]
    assert back.wait(0) == []
    assert front.wait(0) == []  # the sender is not signalled
    back.notify(bport)
    assert front.wait(1.0) == [fport]


def test_wait_reports_several_ports_sorted(host: EvtchnHost) -> None:
    front, back = host.channels(FRONT), host.channels(BACK)
    pairs = []
    for _ in range(3):
        f = front.alloc_unbound(BACK)
        pairs.append((f, back.bind_interdomain(FRONT, f)))
    for f, _ in reversed(pairs):
        front.notify(f)
    assert back.wait(0) == sorted(b for _, b in pairs)


@pytest.mark.parametrize("timeout", [0.0, 0.05, 0.3])
def test_wait_is_bounded_by_its_timeout(host: EvtchnHost, timeout: float) -> None:
    _, _, back, _ = connect(host)
    start = time.monotonic()
    assert back.wait(timeout) == []
    elapsed = time.monotonic() - start
    assert timeout <= elapsed + 0.001 and elapsed < timeout + SLACK


def test_wait_with_no_ports_and_negative_timeout_returns(host: EvtchnHost) -> None:
    lonely = host.channels(OTHER)
    start = time.monotonic()
    assert lonely.wait(-1.0) == []
    assert time.monotonic() - start < SLACK


def test_notify_from_another_thread_wakes_a_blocked_wait(host: EvtchnHost) -> None:
    front, fport, back, bport = connect(host)
    timer = threading.Timer(0.05, front.notify, (fport,))
    timer.start()
    start = time.monotonic()
    try:
        assert back.wait(5.0) == [bport]
        assert time.monotonic() - start < 5.0
    finally:
        timer.cancel()
        timer.join()


def test_fileno_is_readable_while_an_event_is_pending(host: EvtchnHost) -> None:
    front, fport, back, bport = connect(host)
    fd = back.fileno()
    assert select.select([fd], [], [], 0)[0] == []
    front.notify(fport)
    assert select.select([fd], [], [], 1.0)[0] == [fd]
    assert back.wait(0) == [bport]
    assert select.select([fd], [], [], 0)[0] == []
    later = front.alloc_unbound(BACK)  # a port bound after fileno() was taken is covered too
    bport2 = back.bind_interdomain(FRONT, later)
    front.notify(later)
    assert select.select([back.fileno()], [], [], 1.0)[0] == [fd]
    assert back.wait(0) == [bport2]


def test_subset_views_take_only_their_ports(host: EvtchnHost) -> None:
    front, back = host.channels(FRONT), host.channels(BACK)
    f1 = front.alloc_unbound(BACK)
    b1 = back.bind_interdomain(FRONT, f1)
    f2 = front.alloc_unbound(BACK)
    b2 = back.bind_interdomain(FRONT, f2)
    w1, w2 = back.subset([b1]), host.channels(BACK, ports=[b2])
    front.notify(f1)
    front.notify(f2)
    assert w2.wait(0) == [b2]
    assert w1.wait(0) == [b1]
    assert back.wait(0) == []
    w1.close()
    w2.close()


# -- unbind and destroy -------------------------------------------------------------------------


def test_unbind_makes_the_peers_notify_fail(host: EvtchnHost) -> None:
    front, fport, back, bport = connect(host)
    back.unbind(bport)
    assert host.port_info(FRONT, fport) == PortInfo("closed", BACK, None)
    assert host.port_info(BACK, bport) is None
    with pytest.raises(XenError, match="closed: no peer"):
        front.notify(fport)
    with pytest.raises(XenError, match="has no event channel port"):
        back.notify(bport)
    with pytest.raises(XenError, match="has no event channel port"):
        back.unbind(bport)
    front.unbind(fport)
    assert host.ports_of(FRONT) == host.ports_of(BACK) == []


def test_an_event_pending_on_a_freed_port_does_not_reach_its_successor(host: EvtchnHost) -> None:
    front, fport, back, bport = connect(host)
    front.notify(fport)
    back.unbind(bport)
    front.unbind(fport)
    _, _, back2, _ = connect(host)  # reuses the slots
    assert back2.wait(0) == []


def test_destroy_fails_a_blocked_wait_and_leaves_nothing(host: EvtchnHost) -> None:
    front, fport, back, bport = connect(host)
    back.alloc_unbound(OTHER)
    outcome: list[BaseException | list[int]] = []

    def blocked() -> None:
        try:
            outcome.append(back.wait(5.0))
        except XenError as e:
            outcome.append(e)

    waiter = threading.Thread(target=blocked)
    waiter.start()
    time.sleep(0.05)
    start = time.monotonic()
    host.destroy_domain(BACK)
    waiter.join(5.0)
    assert not waiter.is_alive() and time.monotonic() - start < SLACK
    assert isinstance(outcome[0], XenError) and "destroyed" in str(outcome[0])
    assert host.ports_of(BACK) == []
    assert host.port_info(FRONT, fport) == PortInfo("closed", BACK, None)
    with pytest.raises(XenError, match="closed"):
        front.notify(fport)
    for call in (lambda: back.wait(0), lambda: back.notify(bport), lambda: back.alloc_unbound(FRONT),
                 lambda: back.bind_interdomain(FRONT, fport), lambda: back.unbind(bport)):  # fmt: skip
        with pytest.raises(XenError, match=f"domain {BACK} was destroyed"):
            call()
    reborn = host.channels(BACK)  # a new incarnation starts clean; the old view stays dead
    assert reborn.wait(0) == []
    assert select.select([reborn.fileno()], [], [], 0)[0] == []  # no leftover wake-up: waits sleep
    port = reborn.alloc_unbound(FRONT)
    assert port == 1
    with pytest.raises(XenError, match="destroyed"):
        back.notify(port)
    host.destroy_domain(BACK)
    host.destroy_domain(BACK)  # idempotent
    host.destroy_domain(77)  # unknown: ignored
    front.unbind(fport)
    assert host.ports_of(FRONT) == host.ports_of(BACK) == []


def test_pickling_is_refused_with_a_hint(host: EvtchnHost) -> None:
    for obj in (host, host.channels(FRONT)):
        with pytest.raises(TypeError, match="fork"):
            pickle.dumps(obj)


# -- across processes -------------------------------------------------------------------------


def _backend_worker(grants: SimGrantTable, evtchn: SimEventChannels, gref: int, fport: int) -> None:
    """Runs in a forked child: map the frontend's page, answer, exchange notifications."""
    port = evtchn.bind_interdomain(FRONT, fport)  # bound after the fork
    mapping = grants.map(FRONT, [gref], readonly=False)
    if evtchn.wait(JOIN_TIMEOUT) != [port]:
        raise SystemExit(3)
    request = mapping.buf[:4].tobytes()
    mapping.buf[4:8] = request[::-1]
    evtchn.notify(port)
    if evtchn.wait(JOIN_TIMEOUT) != [port]:
        raise SystemExit(4)
    mapping.buf[8:12] = b"done"
    mapping.unmap()
    evtchn.notify(port)


def test_a_forked_child_maps_a_grant_and_exchanges_notifications() -> None:
    ctx = multiprocessing.get_context("fork")
    with GrantHost(64, max_grants=64) as gh, EvtchnHost() as eh:
        front_g, back_g = gh.table(FRONT), gh.table(BACK)
        front_e, back_e = eh.channels(FRONT), eh.channels(BACK)
        page = front_g.alloc_pages()
        gref = front_g.grant(BACK, page.frames[0], readonly=False)
        fport = front_e.alloc_unbound(BACK)
        start = time.monotonic()
        child = ctx.Process(target=_backend_worker, args=(back_g, back_e, gref, fport))
        child.start()
        try:
            deadline = time.monotonic() + JOIN_TIMEOUT
            while eh.port_info(FRONT, fport) != PortInfo("interdomain", BACK, 1):
                assert time.monotonic() < deadline, "child never bound the channel"
                time.sleep(0.005)
            page.buf[:4] = b"ping"
            front_e.notify(fport)
            assert front_e.wait(JOIN_TIMEOUT) == [fport]
            assert page.buf[4:8].tobytes() == b"gnip"
            assert gh.mappings_of(BACK) == [gref] and front_g.revoke(gref) is False
            front_e.notify(fport)
            assert front_e.wait(JOIN_TIMEOUT) == [fport]
            child.join(JOIN_TIMEOUT)
            assert child.exitcode == 0
            assert page.buf[8:12].tobytes() == b"done"
            assert gh.mappings_of(BACK) == [] and front_g.revoke(gref) is True
            assert time.monotonic() - start < JOIN_TIMEOUT
        finally:
            if child.is_alive():
                child.kill()
                child.join()


def _blocked_child(evtchn: SimEventChannels, ready: object) -> None:
    ready.set()  # type: ignore[attr-defined]
    try:
        evtchn.wait(JOIN_TIMEOUT)
    except XenError:
        raise SystemExit(7) from None
    raise SystemExit(1)


def test_destroy_in_the_parent_ends_a_wait_blocked_in_a_child(host: EvtchnHost) -> None:
    ctx = multiprocessing.get_context("fork")
    _, _, back, _ = connect(host)
    ready = ctx.Event()
    child = ctx.Process(target=_blocked_child, args=(back, ready))
    child.start()
    try:
        assert ready.wait(JOIN_TIMEOUT)
        time.sleep(0.05)
        start = time.monotonic()
        host.destroy_domain(BACK)
        child.join(JOIN_TIMEOUT)
        assert child.exitcode == 7
        assert time.monotonic() - start < JOIN_TIMEOUT / 2
    finally:
        if child.is_alive():
            child.kill()
            child.join()


# -- the model check ---------------------------------------------------------------------------

DOMAINS = (1, 2, 3)


class EvtchnMachine(RuleBasedStateMachine):
    """alloc/bind/notify/wait/unbind/destroy against a model of the port table."""

    def __init__(self) -> None:
        super().__init__()
        self.host = EvtchnHost(max_domains=4, max_ports=12)
        self.views = {d: self.host.channels(d) for d in DOMAINS}
        self.dead_views: list[SimEventChannels] = []
        # (domid, port) -> [state, remote domid, remote port or None, pending]
        self.ports: dict[tuple[int, int], list] = {}

    def teardown(self) -> None:
        self.host.close()

    def _keys(self) -> list[tuple[int, int]]:
        return sorted(self.ports)

    def _free_port(self, key: tuple[int, int]) -> None:
        state, rd, rp, _ = self.ports.pop(key)
        if state == "interdomain":
            self.ports[(rd, rp)][0] = "closed"
            self.ports[(rd, rp)][2] = None

    @initialize()
    def connect_around(self) -> None:
        """Each domain connects a channel to the next, so events flow from the first step."""
        for d, peer in zip(DOMAINS, DOMAINS[1:] + DOMAINS[:1], strict=True):
            self.alloc_unbound(d, peer)
            self.bind(peer, len(self.ports) - 1, honest=True)

    @rule(d=st.sampled_from(DOMAINS), remote=st.sampled_from(DOMAINS))
    def alloc_unbound(self, d: int, remote: int) -> None:
        if len(self.ports) == self.host.max_ports:
            with pytest.raises(XenError, match="no free event channel"):
                self.views[d].alloc_unbound(remote)
            return
        port = self.views[d].alloc_unbound(remote)
        mine = {p for (dd, p) in self.ports if dd == d}
        assert port == min(set(range(1, self.host.max_ports + 2)) - mine)
        self.ports[(d, port)] = ["unbound", remote, None, False]

    @precondition(lambda self: self.ports)
    @rule(d=st.sampled_from(DOMAINS), i=st.integers(0, 100), honest=st.booleans())
    def bind(self, d: int, i: int, honest: bool) -> None:
        keys = self._keys()
        if honest:
            keys = [k for k, v in self.ports.items() if v[0] == "unbound"] or keys
            keys.sort()
        rd, rp = keys[i % len(keys)]
        if honest and self.ports[(rd, rp)][0] == "unbound":
            d = self.ports[(rd, rp)][1]
        state, allowed, _, _ = self.ports[(rd, rp)]
        if state != "unbound" or allowed != d:
            with pytest.raises(XenError):
                self.views[d].bind_interdomain(rd, rp)
            return
        if len(self.ports) == self.host.max_ports:
            with pytest.raises(XenError, match="no free event channel"):
                self.views[d].bind_interdomain(rd, rp)
            return
        port = self.views[d].bind_interdomain(rd, rp)
        self.ports[(d, port)] = ["interdomain", rd, rp, False]
        self.ports[(rd, rp)][0] = "interdomain"
        self.ports[(rd, rp)][2] = port

    @precondition(lambda self: self.ports)
    @rule(i=st.integers(0, 100), d=st.sampled_from(DOMAINS), own=st.booleans())
    def notify(self, i: int, d: int, own: bool) -> None:
        keys = self._keys()
        if own:  # mostly ports that can carry an event
            keys = sorted(k for k, v in self.ports.items() if v[0] == "interdomain") or keys
        key = keys[i % len(keys)]
        if own:
            d = key[0]
        entry = self.ports.get((d, key[1]))
        if entry is None or entry[0] != "interdomain":
            with pytest.raises(XenError):
                self.views[d].notify(key[1])
            return
        self.views[d].notify(key[1])
        self.ports[(entry[1], entry[2])][3] = True

    @rule(d=st.sampled_from(DOMAINS))
    def wait(self, d: int) -> None:
        expected = sorted(p for (dd, p), v in self.ports.items() if dd == d and v[3])
        assert self.views[d].wait(0) == expected
        for p in expected:
            self.ports[(d, p)][3] = False

    @precondition(lambda self: self.ports)
    @rule(i=st.integers(0, 100))
    def unbind(self, i: int) -> None:
        key = self._keys()[i % len(self._keys())]
        self.views[key[0]].unbind(key[1])
        self._free_port(key)

    @rule(d=st.sampled_from(DOMAINS), now=st.integers(0, 2))
    def destroy(self, d: int, now: int) -> None:
        if now:  # one step in three, so channels live long enough to carry events
            return
        self.host.destroy_domain(d)
        for key in [k for k in self._keys() if k[0] == d]:
            self._free_port(key)
        self.dead_views.append(self.views[d])
        self.views[d] = self.host.channels(d)

    @precondition(lambda self: self.dead_views)
    @rule(i=st.integers(0, 100))
    def dead_view_refuses(self, i: int) -> None:
        with pytest.raises(XenError, match="destroyed"):
            self.dead_views[i % len(self.dead_views)].wait(0)

    @invariant()
    def table_matches_the_model(self) -> None:
        for d in DOMAINS:
            assert self.host.ports_of(d) == sorted(p for dd, p in self.ports if dd == d)
        for (d, p), (state, rd, rp, _) in self.ports.items():
            assert self.host.port_info(d, p) == PortInfo(state, rd, rp)


TestEvtchnMachine = EvtchnMachine.TestCase
