"""The XenBus state tables (§5): every (state, peer state) pair, the canonical sequences, real traces."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, note
from hypothesis import strategies as st

from blkif_spec import catalogue
from blkif_spec.consts import XenbusState as S
from blkif_spec.errors import RuleViolation
from blkif_spec.xenbus import (
    BACKEND_ROWS,
    FRONTEND_ROWS,
    OUT_OF_RANGE,
    TOOLSTACK_ROWS,
    TRANSITIONS,
    BackendMachine,
    FrontendMachine,
    Kind,
    XenbusPair,
    judge,
    judge_toolstack,
    reaction,
)
from blkif_spec.xenbus.states import STATE_KEYS, allowed, key_of

#: Every table key plus real out-of-range values (9, a large one) standing for OUT_OF_RANGE.
STATES = (*range(9), 9, 4096)
ROLES = ("frontend", "backend")
ANY_STATE = st.integers(0, 8) | st.integers(9, 2**32 - 1)


def rule_of(call, *args) -> str:
    with pytest.raises(RuleViolation) as caught:
        call(*args)
    return caught.value.rule_id


# --------------------------------------------------------------------------- the tables


def test_every_row_cites_a_catalogue_rule():
    for row in (*FRONTEND_ROWS, *BACKEND_ROWS, *TOOLSTACK_ROWS):
        catalogue.get(row.rule)


@pytest.mark.parametrize("role", ROLES)
def test_every_state_and_peer_state_pair_is_a_row_or_a_violation(role):
    """The h11 property: each (own, peer, new) is either a listed transition or a RuleViolation
    naming a catalogue rule; no third outcome, no crash."""
    for own, peer, new in itertools.product(STATES, STATES, STATES):
        rows = allowed(role, own, peer)
        if own == new:
            assert judge(role, own, new, peer) is None  # a rewrite changes nothing
        elif key_of(new) == new and new in rows:
            assert judge(role, own, new, peer) is rows[new]
        else:
            assert catalogue.known(rule_of(judge, role, own, new, peer)), (own, peer, new)


@given(st.sampled_from(ROLES), ANY_STATE, ANY_STATE, ANY_STATE)
def test_judge_is_total_over_any_values(role, own, new, peer):
    try:
        judge(role, own, new, peer)
    except RuleViolation as bad:
        assert catalogue.known(bad.rule_id)
        assert new != own


@pytest.mark.parametrize("role", ROLES)
def test_reactions_are_unique_and_legal(role):
    for own, peer in itertools.product(STATE_KEYS, STATE_KEYS):
        reacts = [r for r in allowed(role, own, peer).values() if r.kind == Kind.REACT]
        assert len(reacts) <= 1
        nxt = reaction(role, own, peer)
        assert nxt is None if not reacts else judge(role, own, nxt, peer) is reacts[0]


def test_tables_cover_both_roles_only():
    assert set(TRANSITIONS) == set(ROLES)


@pytest.mark.parametrize("peer", [S.InitWait, S.Reconfiguring, S.Reconfigured, 9, 255])
def test_sm30_backend_closes_on_states_blkif_does_not_use(peer):
    for own in (S.Initialising, S.InitWait, S.Initialised, S.Connected):
        assert reaction("backend", own, peer) == S.Closing


@pytest.mark.parametrize("new", [S.InitWait, S.Reconfiguring, S.Reconfigured, 9])
def test_sm30_a_frontend_never_enters_them(new):
    assert rule_of(judge, "frontend", S.Initialising, new, S.InitWait) == "SM-30"


def test_entry_rules_name_what_was_skipped():
    assert rule_of(judge, "frontend", S.Initialising, S.Connected, S.InitWait) == "SM-5"  # not Connected yet
    assert rule_of(judge, "frontend", S.Initialised, S.Initialising, S.Connected) == "SM-27"
    assert rule_of(judge, "backend", S.InitWait, S.Connected, S.Initialising) == "SM-4"
    assert rule_of(judge, "backend", S.Connected, S.InitWait, S.Initialised) == "SM-2"
    assert rule_of(judge, "backend", S.Closed, S.InitWait, S.Closed) == "SM-26"
    assert rule_of(judge, "backend", S.InitWait, S.Initialising, S.Initialising) == "SM-1"
    assert rule_of(judge, "backend", S.Unknown, S.InitWait, S.Initialising) == "SM-31"
    assert rule_of(judge, "backend", S.Connected, 9, S.Connected) == "XK-B4"


def test_skip_paths_are_tolerated_sm6_sm8():
    assert judge("frontend", S.Initialising, S.Initialised, S.Initialising).rule == "SM-6"
    assert judge("frontend", S.Initialising, S.Initialised, S.Connected).rule == "SM-8"
    assert judge("frontend", S.Initialising, S.Connected, S.Connected).rule == "SM-8"
    assert judge("backend", S.Initialising, S.Connected, S.Initialised).rule == "SM-8"
    assert judge("backend", S.InitWait, S.Connected, S.Connected).rule == "SM-12"
    assert judge("backend", S.Initialising, S.Initialised, S.Initialising).rule == "SM-7"


def test_close_paths_sm21_to_sm25_and_fatal_sm29():
    assert reaction("frontend", S.Connected, S.Closing) == S.Closed  # straight to Closed (SM-21)
    assert judge("frontend", S.Connected, S.Closing, S.Closing).rule == "SM-21"  # mirroring is tolerated
    assert judge("frontend", S.Closing, S.Closing, S.Connected) is None
    assert reaction("backend", S.Connected, S.Closing) == S.Closing  # SM-22
    assert reaction("backend", S.Closing, S.Closed) == S.Closed  # SM-23
    assert reaction("backend", S.Connected, S.Unknown) == S.Closed  # SM-24
    for role, own in itertools.product(ROLES, (S.Initialising, S.Initialised)):
        assert judge(role, own, S.Closing, S.Connected).rule == "SM-29"
    assert judge("backend", S.Initialised, S.Closing, S.InitWait).rule == "SM-30"  # the specific row wins
    for own in (S.Initialising, S.Initialised, S.Connected, S.Closing):
        assert judge("frontend", own, S.Closed, S.Connected).rule == "SM-25"  # driver removal


def test_toolstack_writes():
    assert judge_toolstack("frontend", S.Unknown, S.Initialising).rule == "SM-1"
    assert judge_toolstack("backend", S.Connected, S.Closing).rule == "SM-20"
    assert judge_toolstack("backend", S.Closed, S.Unknown).rule == "SM-20"
    assert judge_toolstack("backend", S.Closing, S.Closing) is None
    assert rule_of(judge_toolstack, "backend", S.Closed, S.Closing) == "SM-20"  # "unless already Closed"
    assert rule_of(judge_toolstack, "frontend", S.Connected, S.Closing) == "SM-20"
    assert rule_of(judge_toolstack, "backend", S.Closed, S.Initialising) == "SM-1"


# --------------------------------------------------------------------------- machines


def test_a_machine_goes_terminal_on_its_first_violation():
    machine = FrontendMachine(S.Initialising, S.Initialising)
    with pytest.raises(RuleViolation) as first:
        machine.changed(S.Connected)
    assert first.value.rule_id == "SM-5" and machine.error is first.value
    for later in (lambda: machine.changed(S.Closed), lambda: machine.peer_changed(4), machine.next_state):
        with pytest.raises(RuleViolation) as again:
            later()
        assert again.value is first.value


def test_observe_judges_given_transitions():
    machine = BackendMachine()
    step = machine.observe(S.InitWait, S.Connected, S.Initialised)
    assert (step.rule, machine.own, machine.history[-1]) == ("SM-4", S.Connected, step)


def canonical(pair: XenbusPair) -> list[tuple[str, str, int]]:
    return [(s.role, s.by, s.new) for s in pair.frontend.history + pair.backend.history]


def attached() -> XenbusPair:
    pair = XenbusPair()
    pair.create()
    pair.settle()
    return pair


def test_attach_sequence_5_5():
    pair = XenbusPair()
    pair.create()
    steps = pair.settle()
    assert [(s.role, s.new, s.rule) for s in steps] == [
        ("backend", S.InitWait, "SM-2"),
        ("frontend", S.Initialised, "SM-3"),
        ("backend", S.Connected, "SM-4"),
        ("frontend", S.Connected, "SM-5"),
    ]


def test_detach_by_the_toolstack():
    pair = attached()
    pair.write("backend", S.Closing, by="toolstack")
    assert [(s.role, s.new) for s in pair.settle()] == [("frontend", S.Closed), ("backend", S.Closed)]
    pair.write("frontend", S.Unknown, by="toolstack")
    pair.write("backend", S.Unknown, by="toolstack")


def test_guest_close_at_shutdown():
    pair = attached()
    pair.write("frontend", S.Closing)
    assert [(s.role, s.new) for s in pair.settle()] == [
        ("backend", S.Closing),
        ("frontend", S.Closed),
        ("backend", S.Closed),
    ]


def test_frontend_driver_removal():
    pair = attached()
    pair.write("frontend", S.Closed)
    assert [(s.role, s.new) for s in pair.settle()] == [("backend", S.Closed)]


def test_reconnect_from_closed():
    pair = attached()
    pair.write("frontend", S.Closed)
    pair.settle()
    assert pair.write("frontend", S.Initialising).rule == "SM-27"
    assert [(s.role, s.new, s.rule) for s in pair.settle()] == [
        ("backend", S.InitWait, "SM-26"),
        ("frontend", S.Initialised, "SM-3"),
        ("backend", S.Connected, "SM-4"),
        ("frontend", S.Connected, "SM-5"),
    ]


def test_frontend_reset_sm27_from_connected():
    pair = attached()
    for step in (S.Closing, None, S.Closed, None, S.Initialising, None):
        if step is None:
            pair.step()  # the backend follows
        else:
            pair.write("frontend", step)
    assert (pair.frontend.own, pair.backend.own) == (S.Initialising, S.InitWait)


def test_resize_rewrites_connected_xk10():
    pair = attached()
    assert pair.write("backend", S.Connected).rule is None


@given(st.lists(st.sampled_from(["react", "fe", "be", "ts"]), max_size=30), st.data())
def test_random_runs_of_legal_moves_never_raise(moves, data):
    """Drive both sides with moves drawn only from the tables: the checker must accept them all."""
    pair = XenbusPair()
    pair.create()
    for move in moves:
        if move == "react":
            pair.step()
            continue
        if move == "ts":
            options = sorted(judge_toolstack_options(pair))
            if options:
                role, new = data.draw(st.sampled_from(options))
                pair.write(role, new, by="toolstack")
            continue
        machine = pair.frontend if move == "fe" else pair.backend
        legal = sorted(machine.allowed())
        if legal:
            new = data.draw(st.sampled_from(legal))
            note(f"{machine.role} {machine.own} -> {new} (peer {machine.peer})")
            pair.write(machine.role, new)


def judge_toolstack_options(pair: XenbusPair) -> set[tuple[str, int]]:
    options = set()
    for row in TOOLSTACK_ROWS:
        machine = pair.side(row.role)
        if key_of(machine.own) == row.own and row.next != S.Unknown:
            options.add((row.role, row.next))
    return options


# --------------------------------------------------------------------------- recorded traces

# ../shared/data/xenstore-write-order.txt, transcribed: the backend's `state` writes, in order, with
# who wrote them. The trace covers only the backend directory, so each write carries the frontend state
# that the mechanics of §5 require at that point (the trace says: between 4 and 5 a userspace frontend
# connected, did I/O and closed with 5 then 6).
LINUX_BLKBACK_STATES = [
    ("toolstack", S.Initialising, S.Unknown),  # seq 10 libxl (the frontend dir is written after)
    ("driver", S.InitWait, S.Initialising),  # seq 20 blkback, at probe
    ("driver", S.Connected, S.Initialised),  # seq 35, after the frontend's Initialised
    ("driver", S.Closing, S.Closing),  # seq 36, mirrors the frontend's Closing (SM-22)
    ("driver", S.Closed, S.Closed),  # seq 37, after the frontend's Closed (SM-23)
    ("toolstack", S.Unknown, S.Closed),  # seq 39, libxl removes the directory
]
QEMU_72_STATES = [
    ("toolstack", S.Initialising, S.Unknown),  # seq 9 libxl
    ("driver", S.InitWait, S.Initialising),  # seq 30, after every key (written last)
    ("driver", S.Connected, S.Initialised),  # seq 31
    ("driver", S.Closing, S.Closing),  # seq 32
    ("driver", S.Closed, S.Closed),  # seq 33
    ("driver", S.Closed, S.Closed),  # seq 36, rewritten after online=0 (a no-op)
    ("toolstack", S.Unknown, S.Closed),  # seq 38
]


@pytest.mark.parametrize("trace", [LINUX_BLKBACK_STATES, QEMU_72_STATES], ids=["linux-6.1", "qemu-7.2"])
def test_recorded_backend_state_writes_are_accepted(trace):
    machine = BackendMachine()
    for by, new, peer in trace:
        machine.peer_changed(peer)
        if by == "toolstack":
            machine.toolstack_wrote(new)
        else:
            machine.changed(new)
    assert machine.error is None and machine.own == S.Unknown


def test_out_of_range_is_one_table_key():
    assert key_of(9) == key_of(2**32 - 1) == OUT_OF_RANGE
    assert reaction("backend", S.Connected, 2**32 - 1) == S.Closing
