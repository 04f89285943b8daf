"""The XenBus state machines of a vbd (inventory §5) as transition tables.

Everything that decides whether a state change is legal lives in the tables
below; the code only looks rows up. A (role, own state, peer state) key that has
no row for the new state is the error path: one lookup, one RuleViolation whose
rule is the one that governs entering that state. The same tables drive the
reference drivers (`reaction`: what a conforming driver does next on seeing the
peer's state) and judge a target (`judge`: was this change one a conforming
driver may make?). Neither side is special: both are judged alike.

Row kinds: `react` is what a driver does on seeing the peer in a state (unique
per key, it is what the reference drivers do); `may` is an alternative a
conforming driver may take or an own initiative (close, fatal error), which is
tolerated but never expected. Rows with `peer=None` apply whatever the peer's state.

Rewriting the current value is always accepted and changes nothing: Linux never
does it (SM-31), but a resize rewrites Connected on purpose (XK-10) and QEMU 7.2
was traced rewriting Closed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from blkif_spec import catalogue
from blkif_spec.consts import XenbusState
from blkif_spec.errors import RuleViolation

S = XenbusState
#: Table key for any state value outside 0..8 (SM-30: "any value outside 0-8").
OUT_OF_RANGE = -1
#: Every peer-state key of the tables: the nine XenbusStates and OUT_OF_RANGE.
STATE_KEYS: tuple[int, ...] = (*(int(s) for s in S), OUT_OF_RANGE)


class Role(StrEnum):
    FRONTEND = "frontend"
    BACKEND = "backend"


class Kind(StrEnum):
    REACT = "react"
    MAY = "may"


class By(StrEnum):
    DRIVER = "driver"
    TOOLSTACK = "toolstack"


@dataclass(frozen=True, slots=True)
class Row:
    """One legal change: `role` in `own`, seeing the peer in `peer` (None: any), may go to `next`."""

    role: str
    own: int
    peer: int | None
    next: int
    rule: str
    kind: str
    why: str


def key_of(state: int) -> int:
    """The table key of a state value: itself for 0..8, OUT_OF_RANGE otherwise."""
    return int(state) if 0 <= state <= max(S) else OUT_OF_RANGE


def _rows(role: Role, owns: Iterable[int], peers: Iterable[int] | None, nxt: int, rule: str, kind: Kind,
          why: str) -> tuple[Row, ...]:  # fmt: skip
    peer_list: Iterable[int | None] = [None] if peers is None else peers
    return tuple(Row(role.value, int(o), p if p is None else int(p), int(nxt), rule, kind.value, why)
                 for o in owns for p in peer_list)  # fmt: skip


FE, BE = Role.FRONTEND, Role.BACKEND
REACT, MAY = Kind.REACT, Kind.MAY
NOT_BLKIF = (S.InitWait, S.Reconfiguring, S.Reconfigured, OUT_OF_RANGE)  # SM-30: fatal at Linux blkback

FRONTEND_ROWS: tuple[Row, ...] = (
    # §5.2 startup
    *_rows(FE, [S.Initialising], [S.InitWait], S.Initialised, "SM-3", REACT,
           "read offers, set up rings, publish transport, Initialised"),
    *_rows(FE, [S.Initialising], [S.Unknown, S.Initialising], S.Initialised, "SM-6", MAY,
           "Initialised without waiting for InitWait, publishing default transport"),
    *_rows(FE, [S.Initialising], [S.Initialised, S.Connected], S.Initialised, "SM-8", REACT,
           "backend skipped ahead: do the skipped work (talk to the backend) first"),
    *_rows(FE, [S.Initialising], [S.Connected], S.Connected, "SM-8", MAY,
           "backend skipped ahead: publish transport and connect in one go"),
    *_rows(FE, [S.Initialised], [S.Connected], S.Connected, "SM-5", REACT,
           "read device properties, Connected"),
    # §5.4 close
    *_rows(FE, [S.Initialising, S.Initialised, S.Connected], [S.Closing, S.Closed], S.Closed, "SM-21", REACT,
           "backend closes: stop I/O, straight to Closed"),
    *_rows(FE, [S.Initialising, S.Initialised, S.Connected], [S.Closing], S.Closing, "SM-21", MAY,
           "backend closes: mirror Closing before Closed"),
    *_rows(FE, [S.Closing], [S.Closing, S.Closed], S.Closed, "SM-25", REACT,
           "own close completes once the backend closes"),
    # reconnect, reset, resume
    *_rows(FE, [S.Closed], [S.Closed], S.Initialising, "SM-27", MAY,
           "reset or reconnect: back to Initialising once the backend is Closed (SM-26 on its side)"),
    *_rows(FE, [S.Connected], [S.Initialising, S.InitWait], S.Initialised, "SM-28", MAY,
           "resume: renegotiate with the new backend"),
    # own initiative, whatever the backend does
    *_rows(FE, [S.Initialising, S.Initialised, S.Connected, S.Closing], None, S.Closed, "SM-25", MAY,
           "driver removal: directly Closed from any state"),
    *_rows(FE, [S.Initialising, S.Initialised], None, S.Closing, "SM-29", MAY, "fatal error: Closing"),
    *_rows(FE, [S.Connected], None, S.Closing, "SM-25", MAY, "guest close or reset (SM-27): Closing"),
)  # fmt: skip

BACKEND_ROWS: tuple[Row, ...] = (
    # §5.2 startup
    *_rows(BE, [S.Initialising], [S.Initialising, S.Initialised, S.Connected], S.InitWait, "SM-2", REACT,
           "device validated, offers published: InitWait"),
    *_rows(BE, [S.Initialising], None, S.InitWait, "SM-2", MAY, "InitWait whatever the frontend does"),
    *_rows(BE, [S.Initialising], None, S.Initialised, "SM-7", MAY,
           "bypass InitWait with default transport (no implementation does)"),
    *_rows(BE, [S.InitWait, S.Initialised], [S.Initialised], S.Connected, "SM-4", REACT,
           "map rings, bind event channels, publish device properties, Connected"),
    *_rows(BE, [S.InitWait, S.Initialised], [S.Connected], S.Connected, "SM-12", REACT,
           "frontend Connected is treated like Initialised (missed watch)"),
    *_rows(BE, [S.Initialising], [S.Initialised, S.Connected], S.Connected, "SM-8", MAY,
           "frontend skipped ahead: do InitWait's work and connect"),
    # §5.4 close
    *_rows(BE, [S.Initialising, S.InitWait, S.Initialised, S.Connected], [S.Closing], S.Closing, "SM-22",
           REACT, "mirror the frontend's Closing"),
    *_rows(BE, [S.Initialising, S.InitWait, S.Initialised, S.Connected, S.Closing], [S.Closed], S.Closed,
           "SM-23", REACT, "disconnect, Closed"),
    *_rows(BE, [S.InitWait, S.Initialised, S.Connected, S.Closing], [S.Unknown], S.Closed, "SM-24", REACT,
           "frontend directory gone: as if Closed"),
    *_rows(BE, [S.Initialising, S.InitWait, S.Initialised, S.Connected], NOT_BLKIF, S.Closing, "SM-30",
           REACT, "frontend state not used by blkif: fatal, Closing"),
    # reconnect
    *_rows(BE, [S.Closed], [S.Initialising], S.InitWait, "SM-26", REACT, "reconnect: InitWait again"),
    *_rows(BE, [S.Closed], [S.Initialised], S.InitWait, "SM-26", MAY, "reconnect, frontend's 1 missed"),
    *_rows(BE, [S.Closed], [S.Initialised], S.Connected, "SM-12", MAY,
           "reconnect, frontend's 1 missed: connect at once"),
    # own initiative
    *_rows(BE, [S.Initialising, S.InitWait, S.Initialised, S.Connected], None, S.Closing, "SM-29", MAY,
           "fatal error (bad order, queues, protocol, mapping, pending I/O SM-33): Closing"),
    *_rows(BE, [S.Closing], None, S.Closed, "SM-32", MAY, "removal after Closing: Closed"),
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class ToolstackRow:
    """A write the toolstack makes on `role`'s `state` node (new 0: removes the directory)."""

    role: str
    own: int
    next: int
    rule: str
    why: str


TOOLSTACK_ROWS: tuple[ToolstackRow, ...] = (
    ToolstackRow("frontend", S.Unknown, S.Initialising, "SM-1", "creates the directory with state=1"),
    ToolstackRow("backend", S.Unknown, S.Initialising, "SM-1", "creates the directory with state=1"),
    *(ToolstackRow("backend", s, S.Closing, "SM-20", "detach: online=0, state=5")
      for s in (S.Initialising, S.InitWait, S.Initialised, S.Connected)),
    *(ToolstackRow(role, s, S.Unknown, "SM-20", "removes the directory")
      for role in ("frontend", "backend") for s in STATE_KEYS if s != S.Unknown),
)  # fmt: skip


def _build(rows: Iterable[Row]) -> dict[tuple[int, int], dict[int, Row]]:
    """(own, peer) → next → row. Rows for a given peer override `peer=None` rows; one REACT per key."""
    table: dict[tuple[int, int], dict[int, Row]] = {}
    ordered = sorted(rows, key=lambda r: r.peer is not None)  # wildcards first, then specifics override
    for row in ordered:
        catalogue.get(row.rule)
        peers = STATE_KEYS if row.peer is None else (row.peer,)
        for peer in peers:
            nexts = table.setdefault((row.own, peer), {})
            clash = nexts.get(row.next)
            if clash is not None and clash.peer is not None:
                raise ValueError(
                    f"two rows for {row.role} {row.own}->{row.next} seeing {peer}: {clash}, {row}"
                )
            nexts[row.next] = row
    for key, nexts in table.items():
        reacts = [r for r in nexts.values() if r.kind == Kind.REACT]
        if len(reacts) > 1:
            raise ValueError(f"two reactions for {key}: {reacts}")
    return table


TRANSITIONS: dict[str, dict[tuple[int, int], dict[int, Row]]] = {
    FE.value: _build(FRONTEND_ROWS),
    BE.value: _build(BACKEND_ROWS),
}
TOOLSTACK: dict[str, dict[int, dict[int, ToolstackRow]]] = {}
for _row in TOOLSTACK_ROWS:
    catalogue.get(_row.rule)
    TOOLSTACK.setdefault(_row.role, {}).setdefault(_row.own, {})[_row.next] = _row

#: The rule that governs entering a state, cited when a change has no row. (role, new) → rule.
ENTRY_RULE: dict[tuple[str, int], str] = {
    ("frontend", S.Unknown): "XK-F3",
    ("frontend", S.Initialising): "SM-27",
    ("frontend", S.InitWait): "SM-30",
    ("frontend", S.Initialised): "SM-3",
    ("frontend", S.Connected): "SM-5",
    ("frontend", S.Closing): "SM-29",
    ("frontend", S.Closed): "SM-21",
    ("frontend", S.Reconfiguring): "SM-30",
    ("frontend", S.Reconfigured): "SM-30",
    ("frontend", OUT_OF_RANGE): "SM-30",
    ("backend", S.Unknown): "XK-B4",
    ("backend", S.Initialising): "SM-1",
    ("backend", S.InitWait): "SM-2",
    ("backend", S.Initialised): "SM-7",
    ("backend", S.Connected): "SM-4",
    ("backend", S.Closing): "SM-22",
    ("backend", S.Closed): "SM-23",
    ("backend", S.Reconfiguring): "XK-B4",
    ("backend", S.Reconfigured): "XK-B4",
    ("backend", OUT_OF_RANGE): "XK-B4",
}
for _rule in ENTRY_RULE.values():
    catalogue.get(_rule)


def _name(state: int) -> str:
    return f"{S(state).name}({int(state)})" if 0 <= state <= max(S) else f"out-of-range({state})"


def _entry_rule(role: str, old: int, new: int) -> str:
    if old == S.Unknown:
        return "SM-31"  # a driver never recreates its deleted directory by switching state
    if role == "backend" and new == S.InitWait and old == S.Closed:
        return "SM-26"
    return ENTRY_RULE[(role, key_of(new))]


def allowed(role: Role | str, own: int, peer: int) -> Mapping[int, Row]:
    """The next states a conforming `role` driver may write from `own`, seeing `peer`."""
    return TRANSITIONS[Role(role).value].get((key_of(own), key_of(peer)), {})


def reaction(role: Role | str, own: int, peer: int) -> XenbusState | None:
    """What a conforming driver does on seeing the peer's state: the `react` row, or None (wait)."""
    for row in allowed(role, own, peer).values():
        if row.kind == Kind.REACT:
            return S(row.next)
    return None


def judge(role: Role | str, old: int, new: int, peer: int) -> Row | None:
    """Judge a driver's own change `old → new` made while the peer was in `peer`.

    Returns the row that allows it (None for a rewrite of the same value); raises
    RuleViolation naming the rule that governs entering `new` otherwise.
    """
    role = Role(role).value
    if old == new:
        return None
    row = allowed(role, old, peer).get(new) if key_of(new) == new else None
    if row is None:
        legal = sorted(allowed(role, old, peer))
        raise RuleViolation(
            _entry_rule(role, key_of(old), key_of(new)),
            f"{role} in {_name(old)} seeing {_name(peer)}: one of {[_name(s) for s in legal]} or stay",
            f"{_name(old)} → {_name(new)}",
            "no transition-table row",
        )
    return row


def judge_toolstack(role: Role | str, old: int, new: int) -> ToolstackRow | None:
    """Judge a toolstack write on `role`'s state node (SM-1 creation, SM-20 detach and removal)."""
    role = Role(role).value
    if old == new:
        return None
    row = TOOLSTACK.get(role, {}).get(key_of(old), {}).get(new)
    if row is None:
        rule = "SM-1" if new == S.Initialising else "SM-20"
        legal = sorted(TOOLSTACK.get(role, {}).get(key_of(old), {}))
        raise RuleViolation(rule, f"toolstack writes one of {legal} on {role} in {_name(old)}",
                            f"{_name(old)} → {_name(new)}", "no toolstack row")  # fmt: skip
    return row


@dataclass(frozen=True, slots=True)
class Step:
    """An accepted change, as the machine's history and a protocol trace record it."""

    role: str
    by: str
    old: int
    new: int
    peer: int
    rule: str | None


@dataclass(slots=True)
class StateMachine:
    """One side's XenBus state as seen by a peer: drive with `reaction`, judge with `observe`.

    After a violation the machine is terminal: every later call re-raises the same
    RuleViolation, so one fault gives one failure.
    """

    role: Role
    own: int = S.Unknown
    peer: int = S.Unknown
    error: RuleViolation | None = None
    history: list[Step] = field(default_factory=list)

    def _check_alive(self) -> None:
        if self.error is not None:
            raise self.error

    def _fail(self, violation: RuleViolation) -> RuleViolation:
        self.error = violation
        return violation

    def peer_changed(self, state: int) -> None:
        """The peer's `state` node now reads `state` (0 when absent)."""
        self._check_alive()
        self.peer = int(state)

    def observe(self, old: int, new: int, peer: int | None = None) -> Step:
        """Judge an observed own change old → new, the peer last seen in `peer` (default: tracked)."""
        self._check_alive()
        peer = self.peer if peer is None else int(peer)
        try:
            row = judge(self.role, old, new, peer)
        except RuleViolation as bad:
            raise self._fail(bad) from None
        return self._record(By.DRIVER, old, new, peer, None if row is None else row.rule)

    def changed(self, new: int) -> Step:
        """The driver wrote its own state: judge it from the tracked state."""
        return self.observe(self.own, new)

    def toolstack_wrote(self, new: int) -> Step:
        """The toolstack wrote this side's state (creation, detach) or removed the directory (0)."""
        self._check_alive()
        try:
            row = judge_toolstack(self.role, self.own, new)
        except RuleViolation as bad:
            raise self._fail(bad) from None
        return self._record(By.TOOLSTACK, self.own, new, self.peer, None if row is None else row.rule)

    def _record(self, by: By, old: int, new: int, peer: int, rule: str | None) -> Step:
        step = Step(self.role.value, by.value, int(old), int(new), int(peer), rule)
        self.own = int(new)
        self.history.append(step)
        return step

    def allowed(self) -> Mapping[int, Row]:
        return allowed(self.role, self.own, self.peer)

    def next_state(self) -> XenbusState | None:
        """For a driver: the state to write now, or None to wait."""
        self._check_alive()
        return reaction(self.role, self.own, self.peer)


class FrontendMachine(StateMachine):
    """The frontend's machine (judged against FRONTEND_ROWS)."""

    __slots__ = ()

    def __init__(self, own: int = S.Unknown, peer: int = S.Unknown) -> None:
        super().__init__(Role.FRONTEND, own, peer)


class BackendMachine(StateMachine):
    """The backend's machine (judged against BACKEND_ROWS)."""

    __slots__ = ()

    def __init__(self, own: int = S.Unknown, peer: int = S.Unknown) -> None:
        super().__init__(Role.BACKEND, own, peer)


@dataclass(slots=True)
class XenbusPair:
    """Both machines wired together: a write on one side is the other side's peer change."""

    frontend: StateMachine = field(default_factory=FrontendMachine)
    backend: StateMachine = field(default_factory=BackendMachine)

    def side(self, role: Role | str) -> StateMachine:
        return self.frontend if Role(role) is Role.FRONTEND else self.backend

    def other(self, role: Role | str) -> StateMachine:
        return self.backend if Role(role) is Role.FRONTEND else self.frontend

    def write(self, role: Role | str, new: int, by: By | str = By.DRIVER) -> Step:
        """`by` writes `role`'s state; the peer machine then sees it."""
        machine = self.side(role)
        step = machine.changed(new) if By(by) is By.DRIVER else machine.toolstack_wrote(new)
        self.other(role).peer_changed(new)
        return step

    def create(self) -> None:
        """The toolstack creates both directories with state=1 (SM-1)."""
        self.write(Role.BACKEND, S.Initialising, By.TOOLSTACK)
        self.write(Role.FRONTEND, S.Initialising, By.TOOLSTACK)

    def step(self) -> Step | None:
        """Let the first side that has a reaction make it (backend first); None when both wait."""
        for role in (Role.BACKEND, Role.FRONTEND):
            nxt = self.side(role).next_state()
            if nxt is not None:
                return self.write(role, nxt)
        return None

    def settle(self, limit: int = 32) -> list[Step]:
        """Apply reactions until both sides wait (bounded: a loop in the tables is a bug)."""
        steps = []
        for _ in range(limit):
            step = self.step()
            if step is None:
                return steps
            steps.append(step)
        raise RuntimeError(f"no fixed point after {limit} steps: {steps}")
