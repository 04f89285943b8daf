"""The XenBus state machine of a vbd (inventory §5), both roles; state flapping (SEC-7, XSA-350).

Backend role: the suite's frontend drives the handshake by hand through its raw
layer (`raw_transport`, `raw_write`, `raw_state`, `raw_finish`, `raw_release`):
documented and skipped paths, close, reconnect with other parameters, a
toolstack detach, states blkif does not use, a flapping frontend, and a
hypothesis state machine mixing all of them. Every change of the backend's
state a test sees is judged by `blkif_spec.xenbus.states` (`BackendMachine`):
a change the tables do not allow fails with the rule that governs entering that
state. Intermediate states shorter than a poll can go unseen; the tables allow
the shortcuts that then appear (e.g. Closed to Connected seeing Initialised).

Frontend role: the suite's backend closes (a libxl-style detach), the guest
closes, and the frontend attaches again after a close against a changed offer.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
from hypothesis import Phase as HPhase
from hypothesis import note, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from blkif_spec import consts, toolstack, xenbus
from blkif_spec.consts import XenbusState as S
from blkif_spec.drivers.backend import BackendConfig
from blkif_spec.drivers.frontend import Frontend, FrontendConfig
from blkif_spec.errors import RuleViolation
from blkif_spec.harness import BackendUnderTest, TargetTimeout
from blkif_spec.xen.api import XenError
from blkif_spec.xenbus import BackendMachine, FrontendMachine, Phase
from tests.conformance.conftest import OKAY, XENBUS_ERROR, expect, released, require_restart, settle

UNUSED_STATES = (2, 7, 8, 99)  # InitWait, Reconfiguring, Reconfigured, out of 0..8 (SM-30)


# -- tools -------------------------------------------------------------------------------------


def pattern(seed: int, size: int) -> bytes:
    return bytes((seed * 37 + i * 11) % 251 for i in range(size))


def check_io(env, rule: str, what: str, seed: int = 0) -> None:
    """A write and a read back on every queue of the suite's frontend."""
    fe = env.peer
    for q in range(fe.queues):
        data, sector = pattern(seed + q, 1024), 512 + 16 * q
        expect(rule, OKAY, fe.write(sector, data, queue=q).status, f"WRITE on queue {q}, {what}")
        expect(rule, data, fe.read(sector, 2, queue=q).data, f"read back on queue {q}, {what}")


class Judge:
    """The backend's state as the tests see it, every change judged by the transition tables.

    `fe` is the frontend state the suite wrote last (the peer state a change is judged against).
    """

    def __init__(self, env: BackendUnderTest) -> None:
        self.env = env
        self.fe = env.state("frontend")
        self.machine = BackendMachine(own=env.state("backend"), peer=self.fe)

    def frontend(self, state: int | None) -> None:
        """The suite's frontend writes `state` (None removes the node: Unknown)."""
        self.env.peer.raw_state(state)
        self.fe = S.Unknown if state is None else state

    def toolstack(self, state: int) -> None:
        self.machine.toolstack_wrote(state)

    def seen(self, state: int) -> int:
        if state != self.machine.own:
            self.machine.observe(self.machine.own, state, self.fe)
        return state

    def expect(self, states: set[S], rule: str, what: str, within: float | None = None) -> int:
        """Wait (bounded) for one of `states`, judge the change, fail with `rule` if it did not come."""
        state = self.seen(settle(self.env, "backend", states, within))
        expect(rule, states, state, what)
        return state

    def check(self) -> None:
        self.seen(self.env.state("backend"))


def fresh_peer(env: BackendUnderTest, **config) -> Frontend:
    """A new suite frontend for the same device (the old one must have been released)."""
    old = env.peer
    env.peer = Frontend(old.xen, old.path, FrontendConfig(**{"protocol": env.abi, "timeout": env.timeout,
                                                            **config}))  # fmt: skip
    return env.peer


def connect_raw(env: BackendUnderTest, judge: Judge, announce: S, rule: str, **config) -> None:
    """Set up rings, publish every key in one go, write `announce`; the backend must connect."""
    peer = fresh_peer(env, **config) if config else env.peer
    peer.raw_write(peer.raw_transport(), clear=True)
    judge.frontend(announce)
    judge.expect({S.Connected}, rule, f"backend after frontend {announce.name} with every key published")
    peer.raw_finish()
    judge.fe = S.Connected


def close_raw(env: BackendUnderTest, judge: Judge, *, graceful: bool, what: str) -> None:
    """Frontend (Closing, then) Closed; the backend mirrors (SM-22), closes (SM-23) and lets go."""
    if graceful:
        judge.frontend(S.Closing)
        judge.expect({S.Closing}, "SM-22", f"backend after frontend Closing, {what}")
    judge.frontend(S.Closed)
    judge.expect({S.Closed}, "SM-23", f"backend after frontend Closed, {what}")
    expect("SM-23", {}, released(env), f"rings, grant mappings and ports the backend still holds, {what}")
    env.peer.raw_release()


def reopen(env: BackendUnderTest, judge: Judge, what: str) -> None:
    """From Closed/Closed: frontend Initialising, backend InitWait again (SM-26)."""
    fresh_peer(env)
    judge.frontend(S.Initialising)
    judge.expect({S.InitWait}, "SM-26", f"backend after frontend Initialising, {what}")


# -- backend role ----------------------------------------------------------------------------------


@pytest.mark.role("backend")
@pytest.mark.rule("SM-8", "SM-12", "SM-4")
def test_frontend_connected_without_initialised(backend_under_test) -> None:
    """The frontend publishes its keys and writes Connected directly: the backend connects (SM-12)."""
    env = backend_under_test()
    judge = Judge(env)
    judge.expect({S.InitWait}, "SM-2", "backend after start")
    connect_raw(env, judge, S.Connected, "SM-12")
    check_io(env, "SM-12", "after a skipped Initialised")


@pytest.mark.role("backend")
@pytest.mark.rule("SM-12", "SM-8", "SM-23")
def test_reconnect_without_initialising(connected_backend) -> None:
    """After Closed/Closed the frontend publishes new keys and writes Initialised, its Initialising
    missed (coalesced watch events): the backend connects all the same, as Linux and QEMU do."""
    env = connected_backend()
    judge = Judge(env)
    close_raw(env, judge, graceful=False, what="before a reconnect")
    connect_raw(env, judge, S.Initialised, "SM-12", max_queues=1, max_ring_page_order=0)
    check_io(env, "SM-12", "after a reconnect that skipped Initialising")


@pytest.mark.role("backend")
@pytest.mark.parametrize("graceful", [True, False], ids=["via-closing", "directly-closed"])
@pytest.mark.rule("SM-22", "SM-23")
def test_close_handshake(connected_backend, graceful: bool) -> None:
    """Frontend Closing ⇒ backend Closing (SM-22); frontend Closed ⇒ backend Closed, rings unmapped,
    channels unbound (SM-23). Driver removal writes Closed directly (SM-25): the same end."""
    env = connected_backend()
    close_raw(env, Judge(env), graceful=graceful, what="a connected device")


@pytest.mark.role("backend")
@pytest.mark.rule("SM-33", "SM-23", "SM-28")
def test_close_with_io_in_flight(connected_backend, record_variant) -> None:
    """The frontend closes with requests on every ring: the backend still reaches Closed and lets go
    of the rings once its I/O is done (Linux waits for it, SM-33), then serves a new connection."""
    env = connected_backend()
    judge = Judge(env)
    fe = env.peer
    pending = [fe.submit_rw(int(consts.BlkifOp.WRITE), 8 * i, pattern(i, 4096), queue=i % fe.queues)
               for i in range(24)]  # fmt: skip
    fe.push()
    judge.frontend(S.Closed)
    judge.expect({S.Closed}, "SM-23", "backend after frontend Closed with 24 requests in flight")
    expect("SM-23", {}, released(env), "rings, grant mappings and ports still held after closing")
    fe.poll()
    answered = sum(p.done is not None for p in pending)
    record_variant("SM-33", f"{answered} of {len(pending)} requests in flight answered before Closed")
    fe.raw_release()
    reopen(env, judge, "after closing with I/O in flight")
    connect_raw(env, judge, S.Initialised, "SM-28", max_queues=2, max_ring_page_order=1)
    check_io(env, "SM-28", "a new connection after closing with I/O in flight")


ROUNDS = [  # SM-26/SM-28: each reconnect changes queue count, ring order, persistence, ABI
    {"max_queues": 4, "max_ring_page_order": 2, "persistent": True},
    {"max_queues": 1, "max_ring_page_order": 0, "persistent": False},
    {"max_queues": 2, "max_ring_page_order": 1, "persistent": True, "protocol": consts.X86_32_ABI},
]


@pytest.mark.role("backend")
@pytest.mark.rule("SM-26", "SM-28", "SM-23")
def test_reconnect_with_new_parameters(backend_under_test) -> None:
    """Closed/Closed with online=1, frontend Initialising ⇒ InitWait (SM-26), then a full new
    handshake with another queue count, ring order, persistence and ABI serves every queue (SM-28);
    data written before a reconnect is still there."""
    env = backend_under_test()
    judge = Judge(env)
    judge.expect({S.InitWait}, "SM-2", "backend after start")
    kept = pattern(99, 4096)
    for i, config in enumerate(ROUNDS):
        if i:
            close_raw(env, judge, graceful=i % 2 == 1, what=f"before round {i + 1}")
            reopen(env, judge, f"round {i + 1}")
        peer = fresh_peer(env, **config)
        offer = env.backend_tree()
        negotiated = peer.connect()
        judge.fe = S.Connected
        judge.expect({S.Connected}, "SM-28", f"round {i + 1}: {config}")
        want_q = xenbus.choose_queues(offer, config["max_queues"])
        want_o = xenbus.choose_ring_order(offer, config["max_ring_page_order"])
        got = [negotiated.queues, negotiated.ring_page_order, peer.queues]
        expect("SM-28", [want_q, want_o, want_q], got, f"round {i + 1}: negotiated (queues, order, rings)")
        check_io(env, "SM-28", f"round {i + 1}: {config}", seed=i)
        if i == 0:
            expect("SM-28", OKAY, peer.write(4000, kept).status, "data to keep across reconnects")
        else:
            expect("SM-28", kept, peer.read(4000, 8).data, f"data written in round 1, read in round {i + 1}")


@pytest.mark.role("backend")
@pytest.mark.rule("SM-20", "SM-23")
def test_toolstack_detach(connected_backend, record_variant) -> None:
    """libxl's detach: online=0 and backend state=5 in one transaction; the suite's frontend goes
    Closed (SM-21); the backend must reach Closed and let go of the rings (libxl waits for it)."""
    env = connected_backend()
    judge = Judge(env)
    toolstack.request_detach(env.dom0, env.vbd)
    judge.toolstack(S.Closing)
    judge.fe = settle(env, "frontend", {S.Closed})
    state = judge.expect({S.Closed}, "SM-23", "backend after a toolstack detach and frontend Closed")
    held = released(env)
    expect("SM-23", {}, held, "rings, grant mappings and ports still held after the detach")
    present = env.dom0.read(env.vbd.backend_path) is not None
    record_variant(
        "SM-20", f"backend {S(state).name}, rings released, directory {'kept' if present else 'gone'}"
    )


@pytest.mark.role("backend")
@pytest.mark.rule("SM-24")
def test_frontend_state_unknown(connected_backend, record_variant) -> None:
    """The frontend's state node disappears (Unknown): the backend tears the connection down, going
    Closed (QEMU, as on Closed) or unregistering (Linux); it must not keep the rings mapped."""
    env = connected_backend()
    judge = Judge(env)
    judge.frontend(None)
    expect("SM-24", {}, released(env), "rings, grant mappings and ports still held once the frontend is gone")
    state = judge.seen(env.state("backend"))
    record_variant("SM-24", f"backend {S(state).name} after frontend Unknown")


@pytest.mark.role("backend")
@pytest.mark.rule("SM-30")
@pytest.mark.provokes(XENBUS_ERROR)
def test_frontend_states_unused_by_blkif(connected_backend, record_variant) -> None:
    """Frontend state 2, 7, 8 or 99 while connected: Closing with an error node (Linux) or ignored;
    never a crash: the backend still closes on Closed, reopens and serves."""
    env = connected_backend()
    judge = Judge(env)
    seen = []
    for n, value in enumerate(UNUSED_STATES):
        judge.frontend(value)
        state = judge.seen(settle(env, "backend", {S.Closing, S.Closed}, within=0.25))
        path = f"/local/domain/{env.vbd.backend_domid}/error/{env.vbd.backend_path.split('/', 4)[4]}/error"
        error = env.dom0.read(path)
        if error is not None:
            expect("XK-5", True, error.split(" ", 1)[0].lstrip("-").isdigit(), f"{path} = {error!r}")
            env.dom0.rm(path)  # the toolstack's cleanup, so the next value shows its own
        seen.append(f"{value}: {S(state).name}{' + error node' if error else ''}")
        close_raw(env, judge, graceful=False, what=f"after frontend state {value}")
        reopen(env, judge, f"after frontend state {value}")
        connect_raw(env, judge, S.Initialised, "SM-26", max_queues=2, max_ring_page_order=0)
        check_io(env, "SM-30", f"after frontend state {value}", seed=n)
    record_variant("SM-30", "; ".join(seen))


@pytest.mark.role("backend")
@pytest.mark.rule("SEC-7", "SM-23", "SM-26")
def test_state_flapping_xsa_350(backend_under_test) -> None:
    """XSA-350: the frontend toggles Initialised/Connected and Closing/Closed (and back through
    Initialising) many times without waiting; the backend must not crash or hang: it settles in
    Closed, holds nothing, reopens and serves a fresh connection."""
    env = backend_under_test()
    judge = Judge(env)
    judge.expect({S.InitWait}, "SM-2", "backend after start")
    peer = env.peer
    peer.raw_write(peer.raw_transport(), clear=True)
    for i in range(40):
        up = S.Initialised if i % 2 else S.Connected
        if i % 8 == 0:  # now and then a connection really happens before it is torn down
            peer.raw_state(S.Closed)
            if i and settle(env, "backend", {S.Closed}, within=0.5) == S.Closed and not env.leaks():
                # Fresh rings and event channels: the simulated host, stricter than Xen, leaves
                # a port closed (not unbound) once the backend unbinds it, so it cannot rebind.
                peer.raw_release()
                peer.raw_write(peer.raw_transport(), clear=True)
            for state, reaction in ((S.Initialising, S.InitWait), (up, S.Connected)):
                peer.raw_state(state)
                settle(env, "backend", {reaction}, within=0.5)
        else:  # otherwise the backend sees whatever its (coalesced) watch events show it
            peer.raw_state(up)
        if i % 3:
            peer.raw_state(S.Closing)
        peer.raw_state(S.Closed)
        peer.raw_state(S.Initialising)
    peer.raw_state(S.Closed)
    judge.fe = S.Closed
    judge.machine.own = env.state("backend")  # coalesced events: the path so far is not judged
    state = settle(env, "backend", {S.Closed})
    expect("SEC-7", S.Closed, state, "backend after 40 flaps ending with frontend Closed")
    expect("SM-23", {}, released(env), "rings, grant mappings and ports still held after the flapping")
    peer.raw_release()
    judge.machine.own = S.Closed
    reopen(env, judge, "after the flapping")
    connect_raw(env, judge, S.Initialised, "SEC-7")
    check_io(env, "SEC-7", "a fresh connection after the flapping")


class Negotiation(RuleBasedStateMachine):
    """One backend per run; the suite's frontend writes its keys in random orders, announces
    Initialised or skips to Connected, closes gracefully or directly, reopens with or without
    Initialising, with a new queue count, ring order, persistence and ABI each time.

    Invariants: the backend's state only takes legal transitions (judged by the tables), and
    whenever both sides are Connected, I/O works on every queue and earlier data survives.
    """

    make: Callable[..., BackendUnderTest]

    def __init__(self) -> None:
        super().__init__()
        self.env: BackendUnderTest | None = None

    @initialize()
    def start(self) -> None:
        self.env = self.make()
        self.judge = Judge(self.env)
        self.judge.expect({S.InitWait}, "SM-2", "backend after start")
        self.phase, self.pending, self.connections, self.seed = "fresh", [], 0, 0
        self.kept: tuple[int, bytes] | None = None

    def _peer(self, queues: int, order: int, persistent: bool, protocol: str) -> Frontend:
        offer = self.env.backend_tree()
        config = {
            "max_queues": xenbus.choose_queues(offer, queues),
            "max_ring_page_order": xenbus.choose_ring_order(offer, order),
            "persistent": persistent,
            "protocol": protocol,
        }
        note(f"frontend {config}")
        return fresh_peer(self.env, **config)

    def _connected(self) -> None:
        self.env.peer.raw_finish()
        self.judge.fe = S.Connected
        self.connections += 1
        self.phase = "connected"

    @precondition(lambda self: self.phase == "fresh")
    @rule(queues=st.integers(1, 3), order=st.integers(0, 2), persistent=st.booleans(),
          protocol=st.sampled_from(sorted(consts.ABIS)), data=st.data())  # fmt: skip
    def prepare(self, queues: int, order: int, persistent: bool, protocol: str, data) -> None:
        peer = self._peer(queues, order, persistent, protocol)
        keys = peer.raw_transport()
        peer.raw_write({}, clear=True)
        self.pending = data.draw(st.permutations(sorted(keys.items())), label="key order")
        self.phase = "prepared"

    @precondition(lambda self: self.phase == "prepared" and self.pending)
    @rule(n=st.integers(1, 8))
    def write_keys(self, n: int) -> None:
        batch, self.pending = self.pending[:n], self.pending[n:]
        for key, value in batch:  # one write each: the backend may see any prefix of the order
            self.env.peer.raw_write({key: value})

    @precondition(lambda self: self.phase == "prepared" and not self.pending)
    @rule(skip=st.booleans())
    def announce(self, skip: bool) -> None:
        state = S.Connected if skip else S.Initialised
        self.judge.frontend(state)
        self.judge.expect({S.Connected}, "SM-12" if skip else "SM-4", f"backend after frontend {state.name}")
        self._connected()

    @precondition(lambda self: self.phase == "connected")
    @rule()
    def repeat_state(self) -> None:
        """Connected written again (a resize-like rewrite): nothing changes."""
        self.judge.frontend(S.Connected)

    @precondition(lambda self: self.phase in ("fresh", "prepared", "connected"))
    @rule(graceful=st.booleans())
    def close(self, graceful: bool) -> None:
        close_raw(self.env, self.judge, graceful=graceful, what=f"machine, from {self.phase}")
        self.phase, self.pending = "closed", []

    @precondition(lambda self: self.phase == "closed")
    @rule(skip=st.booleans(), queues=st.integers(1, 3), order=st.integers(0, 2), persistent=st.booleans(),
          protocol=st.sampled_from(sorted(consts.ABIS)))  # fmt: skip
    def reopen_device(self, skip: bool, queues: int, order: int, persistent: bool, protocol: str) -> None:
        if not skip:
            reopen(self.env, self.judge, "machine")
            self.phase = "fresh"
            return
        peer = self._peer(queues, order, persistent, protocol)
        peer.raw_write(peer.raw_transport(), clear=True)
        self.judge.frontend(S.Initialised)
        self.judge.expect({S.Connected}, "SM-12", "backend after frontend Initialised, Initialising missed")
        self._connected()

    @invariant()
    def backend_moves_legally(self) -> None:
        if self.env is not None:
            self.judge.check()

    @invariant()
    def io_on_every_queue(self) -> None:
        if self.env is None or self.phase != "connected":
            return
        rule_id = "SM-4" if self.connections == 1 else "SM-28"
        fe = self.env.peer
        for q in range(fe.queues):
            self.seed += 1
            sector, data = (self.seed * 24) % 8000, pattern(self.seed, 1024)
            expect(rule_id, OKAY, fe.write(sector, data, queue=q).status, f"WRITE on queue {q}")
            expect(rule_id, data, fe.read(sector, 2, queue=q).data, f"read back on queue {q}")
        if self.kept is None:
            self.kept = (8100, pattern(7, 512))
            expect(rule_id, OKAY, fe.write(*self.kept).status, "data to keep across reconnects")
        else:
            expect(rule_id, self.kept[1], fe.read(self.kept[0], 1).data, f"connection {self.connections}")

    def teardown(self) -> None:
        if self.env is not None:
            self.env.close()


@pytest.mark.role("backend")
@pytest.mark.rule("SM-2", "SM-4", "SM-8", "SM-12", "SM-22", "SM-23", "SM-26", "SM-28")
def test_negotiation_state_machine(backend_under_test) -> None:
    """Random orders of key writes, announced or skipped states, closes and reopens with changed
    parameters: the backend moves only as the tables allow and serves every queue when Connected."""
    Negotiation.make = staticmethod(backend_under_test)
    # The loaded profile decides, scaled down: each run costs a backend and its handshakes. No
    # shrinking: every shrink step would start a backend and wait out its bounds again; the
    # failing program is printed as it ran, and print_blob replays it.
    profile = settings()
    cheap = settings(profile, max_examples=max(2, profile.max_examples // 10), stateful_step_count=10,
                     phases=[p for p in profile.phases if p is not HPhase.shrink])  # fmt: skip
    run_state_machine_as_test(Negotiation, settings=cheap)


# -- frontend role ---------------------------------------------------------------------------------


class StateLog:
    """A state node followed on a thread of its own (dom0 watch): its distinct values, in order,
    each with the other side's state read at the same moment."""

    def __init__(self, env, side: str) -> None:
        self.env, self.side = env, side
        self.other = "backend" if side == "frontend" else "frontend"
        self.values: list[tuple[int, int]] = [(env.state(side), env.state(self.other))]
        path = env.vbd.frontend_path if side == "frontend" else env.vbd.backend_path
        self._watch = env.dom0.watch(f"{path}/state", f"conformance-statelog-{id(self)}")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="conformance-statelog", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if self._watch.wait(0.02) is not None:
                    self._note()
        except XenError:
            pass

    def _note(self) -> None:
        value = self.env.state(self.side)
        if value != self.values[-1][0]:
            self.values.append((value, self.env.state(self.other)))

    def stop(self) -> list[tuple[int, int]]:
        self._stop.set()
        self._thread.join(1.0)
        self._watch.close()
        self._note()
        return self.values

    def judge(self, rule: str) -> list[int]:
        """Judge each change with the frontend tables; the values seen."""
        machine = FrontendMachine(own=self.values[0][0], peer=self.values[0][1])
        for value, peer in self.values[1:]:
            try:
                machine.observe(machine.own, value, peer)
            except RuleViolation as bad:
                expect(rule, "a change the frontend tables allow", f"{bad}", f"states seen: {self.values}")
        return [v for v, _ in self.values]


@pytest.mark.role("frontend")
@pytest.mark.rule("SM-21", "SM-20")
def test_frontend_follows_backend_close(frontend_under_test, record_variant) -> None:
    """A libxl-style detach puts the backend in Closing: the frontend reaches Closed, directly
    (Linux) or through Closing; either is recorded."""
    env = frontend_under_test()
    env.attach()
    log = StateLog(env, "frontend")
    toolstack.request_detach(env.dom0, env.vbd)
    state = settle(env, "frontend", {S.Closed})
    log.stop()
    expect("SM-21", S.Closed, state, "frontend after backend Closing (toolstack detach)")
    seen = log.judge("SM-21")
    record_variant("SM-21", "via Closing" if S.Closing in seen else "directly Closed (Linux)")
    record_variant("SM-20", f"frontend states {[S(v).name for v in seen]}")


@pytest.mark.role("frontend")
@pytest.mark.rule("SM-25")
def test_frontend_guest_close(frontend_under_test, record_variant) -> None:
    """The guest closes the device: Closing then Closed once the backend closes (system shutdown)
    or directly Closed (driver removal); both ends Closed."""
    env = frontend_under_test()
    env.attach()
    log = StateLog(env, "frontend")
    env.io("close")
    state = settle(env, "frontend", {S.Closed})
    backend = settle(env, "backend", {S.Closed})
    log.stop()
    expect("SM-25", [S.Closed, S.Closed], [state, backend], "[frontend, backend] after the guest closed")
    seen = log.judge("SM-25")
    record_variant(
        "SM-25", "Closing, then Closed (shutdown)" if S.Closing in seen else "directly Closed (removal)"
    )


@pytest.mark.role("frontend")
@pytest.mark.rule("SM-27", "SM-3", "MQ-2", "MPR-1", "MQ-3", "XK-8")
def test_frontend_reattaches_after_close(frontend_under_test) -> None:
    """After a guest close the frontend attaches again (back through Initialising, SM-27) and
    reads the backend's new offer: one queue, one page now (MQ-2, MPR-1, MQ-3); old data is there."""
    env = frontend_under_test(backend=BackendConfig(max_queues=4, max_ring_page_order=2))
    require_restart(env)
    env.attach()
    kept = pattern(5, 4096)
    expect("SM-27", OKAY, env.io("write", 16, kept).status, "a write before the close")
    env.io("close")
    expect(
        "SM-27",
        [S.Closed, S.Closed],
        [settle(env, "frontend", {S.Closed}), settle(env, "backend", {S.Closed})],
    )
    env.peer.config = BackendConfig(max_queues=1, max_ring_page_order=0)  # offered at the next InitWait
    try:
        env.attach()
        error = None
    except TargetTimeout as exc:  # a frontend that kept the old offer is refused (MQ-2): say so
        error = exc
    phase = Phase.INITIALISED if error else Phase.CONNECTED
    findings = [f for f in xenbus.validate(env.frontend_tree(), env.backend_tree(), phase=phase)
                if f.side == "frontend" and f.enforcement in ("must", "variant")]  # fmt: skip
    if error is not None and not findings:
        raise error
    if findings:
        f = findings[0]
        expect(
            f.rule, f"{f.path}: {f.expected}", f"{f.path}={f.observed!r}: {f.message}", "after re-attaching"
        )
    expect("SM-27", kept, env.io("read", 16, 8).data, "data written before the close")
    data = pattern(6, 4096)
    expect("SM-27", OKAY, env.io("write", 32, data).status, "a write after re-attaching")
    expect("SM-27", data, env.io("read", 32, 8).data, "read back after re-attaching")
    expect("SM-27", {}, env.request_rules_broken(), "requests the suite's backend refused")
