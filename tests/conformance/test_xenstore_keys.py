"""XenStore keys of a vbd (inventory §4.1-§4.4), both roles; hostile transport values (SEC-8).

A dom0 watch on a device directory sees every write in the order xenstored made
it; each event is read back when the watch is drained, at moments when the
writer waits for its peer (a backend in InitWait, a pair at Connected), so the
order of key writes against `state` writes is exact and each `state` event reads
the value it wrote (XK-7.a, XK-7.b, XK-8, XK-9). Trees are judged by
`blkif_spec.xenbus.validate`; every finding fails with its own rule ID, `must`
findings in one test and `should` findings in another, so a missing
recommendation only warns without `--blkif-strict`.

One startup per role is observed once per module (`startup`, `attached`) and
judged by several tests, each with its own rules; a stage that could not be
observed re-raises, in every test that needs it, what stopped the observation.

Hostile values come from the suite's frontend (`connect_edited`), one case after
the other on one backend (`hostile`): a backend must never connect with them
(SEC-8); refusing with Closing (Linux, with an error node) or by staying in
InitWait (QEMU) both pass (SM-29, DIV-24); after each refusal it must close
(SM-23), release the rings and reopen (SM-26), and at the end serve a clean
handshake (no crash).
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from blkif_spec import consts, xenbus
from blkif_spec.consts import XenbusState as S
from blkif_spec.drivers.backend import BackendConfig
from blkif_spec.drivers.frontend import DeviceDisabled, Frontend, FrontendConfig
from blkif_spec.harness import TargetTimeout
from blkif_spec.xen.api import XenError, XenStoreError, XenTimeout
from blkif_spec.xenbus import Phase
from tests.conformance.conftest import (
    OKAY,
    REFUSED,
    RUN_LAST_READ_ONLY_VBD,
    XENBUS_ERROR,
    backend_offer,
    connect_edited,
    expect,
    released,
    settle,
)

#: Keys a dom0 backend may write into the frontend's directory (XK-3: QEMU does).
DOM0_MAY_WRITE = frozenset({"virtual-device", "device-type"})
TRANSPORT = ("max-ring-page-order", "multi-queue-max-queues", "feature-max-indirect-segments")
FEATURES = {"feature-barrier": "XK-B24", "feature-flush-cache": "XK-B25", "feature-discard": "XK-B26",
            "feature-persistent": "XK-B30"}  # fmt: skip
BLOCKING = ("must", "variant")


# -- tools -------------------------------------------------------------------------------------


class DirWatch:
    """A dom0 watch on one device directory: every write under it, in xenstored's order.

    `drain()` pairs each event with the value read at drain time (None: removed), so
    drain while the writer waits for its peer. A dom0 read before draining is the
    barrier: xenstored sends a connection's events before the reply to a later request.
    """

    def __init__(self, env, path: str) -> None:
        self.store, self.path = env.dom0, path
        self.watch = self.store.watch(path, f"conformance-dirwatch-{id(self)}")
        self.writes: list[tuple[str, str | None]] = []

    def drain(self) -> list[tuple[str, str | None]]:
        self.store.read(self.path)
        new = []
        while (path := self.watch.wait(0)) is not None:
            if path.startswith(self.path + "/"):
                new.append((path.removeprefix(self.path + "/"), self.store.read(path)))
        self.writes += new
        return new

    def first_writes(self) -> list[str]:
        """Keys in the order of their first write (`state` entries for every write of it)."""
        seen: set[str] = set()
        out = []
        for key, _ in self.writes:
            if key == "state" or key not in seen:
                out.append(key)
                seen.add(key)
        return out


class Observed(dict):
    """What a module fixture saw, stage by stage; `need` re-raises whatever stopped it early."""

    error: BaseException | None = None

    def need(self, *keys: str) -> Any:
        missing = [k for k in keys if k not in self]
        if missing:
            if self.error is not None:
                raise self.error
            raise RuntimeError(f"observation incomplete: {missing}")  # a harness bug
        values = [self[k] for k in keys]
        return values[0] if len(values) == 1 else values


def close_early(env) -> None:
    """A module-scoped observation closes its environment when it is done, not at the module's end:
    a live run has one vdev, and the module's later tests each need it."""
    if env is not None:
        env.close()


def expect_no_findings(findings, what: str, enforcements=BLOCKING) -> None:
    """Fail on the first finding of the given enforcements, with its rule ID; list the others."""
    bad = [f for f in findings if f.enforcement in enforcements]
    if bad:
        first = bad[0]
        others = "; ".join(f"{f.rule} {f.path}" for f in bad[1:7])
        others += f" (+{len(bad) - 7} more)" if len(bad) > 7 else ""
        observed = f"{first.path}={first.observed!r}: {first.message}"
        detail = f"{what} ({first.side} directory)" + (f"; also {others}" if others else "")
        expect(first.rule, f"{first.path}: {first.expected}", observed, detail)


def written_by_frontend(key: str) -> bool:
    """A key the frontend driver writes (its state and the transport keys, XK-F7..XK-F16)."""
    row = xenbus.lookup("frontend", key)
    return key == "state" or (row is not None and row.writer is xenbus.Writer.FRONTEND)


def of_side(findings, side: str):
    return [f for f in findings if f.side == side]


def check_io(env, rule: str, what: str) -> None:
    """A write and a read back on every queue of the suite's frontend."""
    fe = env.peer
    for q in range(fe.queues):
        data = bytes((q * 31 + i) % 251 for i in range(1024))
        expect(rule, OKAY, fe.write(64 + 16 * q, data, queue=q).status, f"WRITE on queue {q}, {what}")
        expect(rule, data, fe.read(64 + 16 * q, 2, queue=q).data, f"read back on queue {q}, {what}")


def error_node(env) -> tuple[str, str | None]:
    """The backend's XK-5 error node: `<home>/error/<device path below home>/error`."""
    home = f"/local/domain/{env.vbd.backend_domid}"
    path = f"{home}/error/{env.vbd.backend_path.removeprefix(home + '/')}/error"
    return path, env.dom0.read(path)


def judge_error_node(path: str, error: str | None, record_variant) -> None:
    """XK-5: an error node, when written, reads `<int> <message>`."""
    if error is not None:
        expect("XK-5", True, re.fullmatch(r"-?\d+ .*", error, re.S) is not None, f"{path} = {error!r}")
    record_variant("XK-5", "error node written (Linux)" if error is not None else "no error node (QEMU)")


# -- backend role: one observed startup ------------------------------------------------------------


@pytest.fixture(scope="module")
def startup(shared_backend_under_test) -> Observed:
    """A backend started under dom0 watches on both directories, connected, used, closed."""
    obs = Observed()
    env = None
    try:
        env = shared_backend_under_test(start=False)
        be_path, fe_path = env.vbd.backend_path, env.vbd.frontend_path
        be_watch, fe_watch = DirWatch(env, be_path), DirWatch(env, fe_path)
        env.start()
        obs["at_initwait"] = backend_offer(env)
        obs["initwait_state"] = env.state("backend")
        be_watch.drain()
        obs["initwait_writes"] = len(be_watch.writes)  # writes made before the frontend did anything
        env.connect()
        be_watch.drain()
        obs["writes"], obs["order"] = list(be_watch.writes), be_watch.first_writes()
        obs["connected_state"] = env.state("backend")
        obs["backend"], obs["frontend"] = env.backend_tree(), env.frontend_tree()
        obs["sectors"] = env.store.size // consts.SECTOR_SIZE
        check_io(env, "XK-3", "while watching the frontend's directory")
        env.peer.raw_state(S.Closed)  # whether it closes well is SM-23's business, not this one's
        settle(env, "backend", {S.Closed})
        fe_watch.drain()
        obs["frontend_writes"] = list(fe_watch.writes)
        obs["frontend_owners"] = {k: env.dom0.get_perms(f"{fe_path}/{k}")[0] for k in env.frontend_tree()}
        obs["frontend_perms"] = env.dom0.get_perms(fe_path)
        obs["domids"] = (env.vbd.frontend_domid, env.vbd.backend_domid)
        # The guest's writes into the backend's directory (SEC-30). A live run's frontend is dom0
        # itself, privileged to write anywhere: there is no guest to probe with.
        guest, probes = env.peer.xen.store, {}
        for key in ("state", "sectors", "conformance-probe") if env.vbd.frontend_domid != 0 else ():
            before = env.dom0.read(f"{be_path}/{key}")
            try:
                guest.write(f"{be_path}/{key}", "6")
                refused = False
            except XenStoreError:
                refused = True
            after = env.dom0.read(f"{be_path}/{key}")
            probes[key] = "refused" if refused and after == before else f"accepted ({before!r} -> {after!r})"
        obs["guest_writes"] = probes
    except Exception as exc:  # judged by every test that needs what was not observed
        obs.error = exc
    finally:
        close_early(env)
    return obs


@pytest.mark.role("backend")
@pytest.mark.rule("SM-2", "XK-4", "XK-B4", "XK-B20", "XK-B22", "XK-B23", "MQ-1")
@pytest.mark.rule("XK-B24", "XK-B25", "XK-B26", "XK-B30")
def test_offer_at_initwait_is_well_formed(startup) -> None:
    """At InitWait every key the backend offers parses and respects its row (XK-4, XK-B20..B30)."""
    tree, state = startup.need("at_initwait", "initwait_state")
    expect("SM-2", S.InitWait, state, "backend state after start, frontend still Initialising")
    findings = of_side(xenbus.validate({}, tree, phase=Phase.INIT_WAIT), "backend")
    expect_no_findings(findings, "backend tree at InitWait")


@pytest.mark.role("backend")
@pytest.mark.rule("SM-4", "XK-9", "XK-4", "XK-B31", "XK-B32", "XK-B34")
@pytest.mark.rule("XK-B24", "XK-B25", "XK-B26", "XK-B30")
def test_keys_at_connected_are_well_formed(startup) -> None:
    """At Connected the device properties exist and say what the disk is (XK-9, XK-B31, XK-B34)."""
    state, be, fe, sectors = startup.need("connected_state", "backend", "frontend", "sectors")
    expect("SM-4", S.Connected, state)
    findings = of_side(xenbus.validate(fe, be, phase=Phase.CONNECTED), "backend")
    expect_no_findings(findings, "backend tree at Connected")
    expect("XK-B34", sectors, int(be["sectors"]), "sectors in 512-byte units (SEG-4)")
    expect("XK-B31", 0, int(be["info"]) & consts.VDISK_READONLY, f"info={be['info']}, mode={be['mode']}")


@pytest.mark.role("backend")
@pytest.mark.rule("XK-B31", "XK-9")
@RUN_LAST_READ_ONLY_VBD
def test_read_only_disk_is_announced(connected_backend) -> None:
    """A read-only vbd (`mode`=r) is announced with VDISK_READONLY in `info` (XK-B31)."""
    env = connected_backend(readonly=True)
    be = env.backend_tree()
    expect("XK-B31", consts.VDISK_READONLY, int(be["info"]) & consts.VDISK_READONLY, f"info={be['info']}")


@pytest.mark.role("backend")
@pytest.mark.rule("XK-B27", "XK-B28", "XK-B33", "DISC-4")
def test_recommended_keys_at_connected(startup) -> None:
    """Should-level rows: discard geometry published with feature-discard, a sane physical-sector-size."""
    be, fe = startup.need("backend", "frontend")
    findings = of_side(xenbus.validate(fe, be, phase=Phase.CONNECTED), "backend")
    expect_no_findings(findings, "backend tree at Connected", enforcements=("should",))


@pytest.mark.role("backend")
@pytest.mark.rule("XK-7.a", "XK-B20", "XK-B22", "XK-B23")
def test_transport_parameters_before_initwait(startup) -> None:
    """max-ring-page-order, multi-queue-max-queues, feature-max-indirect-segments exist before
    state=2 (XK-7.a: Linux blkfront reads them on seeing InitWait; QEMU 10.2 writes the order late)."""
    writes, order, at_initwait, be = startup.need("writes", "order", "at_initwait", "backend")
    findings = [f for f in xenbus.validate_write_order(writes, "backend") if f.rule == "XK-7.a"]
    expect_no_findings(findings, f"write order {order}; at InitWait: {sorted(at_initwait)}")
    missing = [k for k in TRANSPORT if k in be and k not in at_initwait]
    expect("XK-7.a", [], missing, "offered transport keys absent from the tree read at InitWait")


@pytest.mark.role("backend")
@pytest.mark.rule("XK-7.b")
def test_features_before_initwait(startup) -> None:
    """feature-* keys exist before state=2 (a should: Linux blkback writes them at Connected)."""
    writes, order = startup.need("writes", "order")
    findings = [f for f in xenbus.validate_write_order(writes, "backend") if f.rule == "XK-7.b"]
    expect_no_findings(findings, f"write order {order}", enforcements=("should",))


@pytest.mark.role("backend")
@pytest.mark.rule("XK-9", "DIV-20", "XK-B24", "XK-B25", "XK-B26", "XK-B30")
def test_device_properties_before_connected(startup, record_variant) -> None:
    """sectors, info, sector-size are written before state=4 (XK-9); feature keys are in place by
    Connected (XK-B24..B30); when they appeared is recorded (DIV-20: spec, QEMU 10.2 or Linux)."""
    writes, order, at_initwait = startup.need("writes", "order", "initwait_writes")
    findings = [f for f in xenbus.validate_write_order(writes, "backend") if f.rule == "XK-9"]
    expect_no_findings(findings, f"write order {order}")
    states = [i for i, (key, _) in enumerate(writes) if key == "state"]
    initwait = states[0] if states else len(writes)
    connected = next((i for i in states if i >= at_initwait), len(writes))
    timing = set()
    for key, rule in FEATURES.items():
        at = next((i for i, (k, _) in enumerate(writes) if k == key), None)
        if at is None:
            continue  # not offered (absent means 0)
        expect(rule, True, at < connected, f"{key} written after state=4; order {order}")
        if at < initwait:
            timing.add("before InitWait (spec, QEMU 7.2)")
        elif at < at_initwait:
            timing.add("just after InitWait (QEMU 10.2)")
        else:
            timing.add("at Connected (Linux)")
    if timing:
        record_variant("DIV-20", "; ".join(sorted(timing)))


@pytest.mark.role("backend")
@pytest.mark.rule("XK-3")
def test_backend_writes_only_its_own_directory(startup) -> None:
    """The backend writes nothing into the frontend's directory (bar XK-3's dom0 exceptions)."""
    writes, owners, perms, (fe_id, be_id) = startup.need(
        "frontend_writes", "frontend_owners", "frontend_perms", "domids"
    )
    foreign = sorted({k for k, _ in writes if not written_by_frontend(k)} - DOM0_MAY_WRITE)
    expect("XK-3", [], foreign, "frontend-directory writes the suite's frontend did not make")
    alien = {k: p for k, p in owners.items() if p != f"n{fe_id}"}
    expect("XK-3", {}, alien, "frontend nodes not owned by the guest")
    expect("XK-3", [f"n{fe_id}", f"r{be_id}"], perms, "frontend directory permissions")


@pytest.mark.role("backend")
@pytest.mark.rule("SEC-30")
def test_the_guest_cannot_write_the_backend_directory(startup) -> None:
    """The backend's directory stays unwritable by the guest: state, properties, new nodes."""
    probes, (fe_id, _) = startup.need("guest_writes", "domids")
    if not probes:
        pytest.skip(f"the frontend is domain {fe_id} (dom0, privileged): no guest to write as")
    for key, seen in probes.items():
        expect("SEC-30", "refused", seen, f"the guest writing {key} in the backend's directory")


@pytest.mark.role("backend")
@pytest.mark.rule("DIV-27")
@pytest.mark.provokes(XENBUS_ERROR)
def test_backend_without_dev_key(backend_under_test, record_variant) -> None:
    """The toolstack's `dev` key absent: Linux connects but never serves, QEMU creates no backend;
    any of these, or serving anyway, is recorded; a crash or a start that hangs fails."""
    env = backend_under_test(start=False)
    env.dom0.rm(f"{env.vbd.backend_path}/dev")
    env.start()
    state = settle(env, "backend", {S.InitWait, S.Connected, S.Closing, S.Closed})
    if state != S.InitWait:
        record_variant("DIV-27", f"no InitWait without dev (backend {state.name}; QEMU creates no backend)")
        return
    try:
        env.connect()
    except (XenError, XenTimeout) as exc:
        record_variant("DIV-27", f"refuses to connect without dev ({type(exc).__name__})")
        return
    try:
        done = env.peer.wait([env.peer.submit_rw(consts.BlkifOp.READ, 0, 8)])[0]
        record_variant("DIV-27", f"serves without dev (READ status {done.status})")
    except XenTimeout:
        record_variant("DIV-27", "Connected, ring never served (Linux)")


# -- backend role: hostile transport values (SEC-8), one case after the other ----------------------


def _rings(peer, queues: int, order: int) -> dict[str, str]:
    """Transport keys of `queues` fresh rings of 2^order granted zero pages each (not peer's own)."""
    grefs = [[peer.raw_grant()[0] for _ in range(1 << order)] for _ in range(queues)]
    ports = [peer.xen.evtchn.alloc_unbound(peer.backend_id) for _ in range(queues)]
    return xenbus.frontend_transport(order=order, grefs=grefs, ports=ports, protocol=peer.config.protocol)


def _order_above_max(env, keys):
    limit = xenbus.max_ring_order_offered(env.backend_tree())
    if limit + 1 > 6:  # 2^7 grants and more: the order key alone makes the point
        return {**keys, "ring-page-order": str(limit + 1)}
    return _rings(env.peer, 1, limit + 1)


def _queues_above_max(env, keys):
    return _rings(env.peer, xenbus.choose_queues(env.backend_tree(), 64) + 1, 0)


HOSTILE = [  # (id, edit(env, keys) -> keys, frontend config, rule)
    ("order-above-max", _order_above_max, {"max_queues": 1}, "MPR-3"),
    # read as absent (Linux), "four" means ring-ref, which is not there: refused either way
    ("order-junk", lambda env, k: {**k, "ring-page-order": "four"},
     {"max_queues": 1, "max_ring_page_order": 1}, "SEC-8"),
    ("queues-zero", lambda env, k: {**k, "multi-queue-num-queues": "0"}, {"max_queues": 1}, "MQ-2"),
    ("queues-above-max", _queues_above_max, {"max_queues": 1}, "MQ-2"),
    # read as absent (Linux: 1 queue), "two" means flat keys, which are not there
    ("queues-junk", lambda env, k: {**_rings(env.peer, 2, 0), "multi-queue-num-queues": "two"},
     {"max_queues": 1}, "SEC-8"),
    ("ring-ref-junk", lambda env, k: {**k, "ring-ref": "ref"}, {"max_queues": 1, "max_ring_page_order": 0},
     "SEC-8"),
    ("event-channel-junk", lambda env, k: {**k, "event-channel": "port"}, {"max_queues": 1}, "SEC-8"),
    ("ring-ref-not-granted", lambda env, k: {**k, "ring-ref": str(0x7FFF_FFF0)},
     {"max_queues": 1, "max_ring_page_order": 0}, "SM-29"),
    ("event-channel-unbound", lambda env, k: {**k, "event-channel": "65000"}, {"max_queues": 1}, "SM-29"),
]  # fmt: skip


@pytest.fixture(scope="module")
def hostile(shared_backend_under_test) -> dict[str, Observed]:
    """Every HOSTILE case on one backend; after each: frontend Closed, backend Closed and released,
    frontend Initialising, backend InitWait. A case whose recovery fails stops the series."""
    results: dict[str, Observed] = {}
    env = shared_backend_under_test()
    try:
        _hostile_series(env, results)
    finally:
        close_early(env)
    return results


def _hostile_series(env, results: dict[str, Observed]) -> None:
    stopped = ""
    offers_queues = "multi-queue-max-queues" in backend_offer(env)
    for name, edit, frontend, _rule in HOSTILE:
        obs = results[name] = Observed()
        obs["offers_queues"] = offers_queues
        if stopped:
            obs.error = RuntimeError(f"not run: the backend did not recover from case {stopped!r}")
            continue
        try:
            obs["state"] = connect_edited(env, lambda keys, edit=edit: edit(env, keys), **frontend)
            obs["tree"] = env.frontend_tree()
            obs["error_node"] = error_node(env)
            if obs["error_node"][1] is not None:  # the suite as toolstack clears it for the next case
                env.dom0.rm(obs["error_node"][0])
            old = env.peer
            old.raw_state(S.Closed)
            obs["closed"] = settle(env, "backend", {S.Closed})
            obs["held"] = released(env)
            if obs["held"]:
                raise RuntimeError(f"the backend still holds {obs['held']}")
            old.raw_release()
            env.peer = Frontend(old.xen, old.path, FrontendConfig(protocol=env.abi, timeout=env.timeout))
            env.peer.raw_state(S.Initialising)
            obs["reopened"] = settle(env, "backend", {S.InitWait})
        except Exception as exc:
            obs.error = exc
        if obs.error is not None or obs.get("closed") != S.Closed or obs.get("reopened") != S.InitWait:
            stopped = name
    final = results["final"] = Observed()
    if stopped:
        final.error = RuntimeError(f"not run: the backend did not recover from case {stopped!r}")
        return
    try:
        env.peer.connect()
        check_io(env, "SEC-8", "after every hostile negotiation")
        final["served"] = True
    except Exception as exc:
        final.error = exc


CASES = [pytest.param(name, id=name, marks=pytest.mark.rule(rule)) for name, _, _, rule in HOSTILE]


@pytest.mark.role("backend")
@pytest.mark.parametrize("case", CASES)
@pytest.mark.rule("SEC-8", "SM-29", "DIV-24", "XK-5")
@pytest.mark.provokes(XENBUS_ERROR)
def test_hostile_transport_values_are_refused(hostile, case: str, record_variant) -> None:
    """Out-of-range or unparseable transport keys: never Connected (Closing, or InitWait kept)."""
    state, tree, (path, error), offers = hostile[case].need("state", "tree", "error_node", "offers_queues")
    if (
        case.startswith("queues-")
        and not offers
        and state == S.Connected
        and any(k.startswith("ring-ref") for k in tree)
    ):
        # MQ-1: without an offer the key is not the backend's to read; it used the flat keys
        pytest.skip(f"the backend offers no multi-queue: it ignored multi-queue-num-queues and connected "
                    f"on the flat keys also written ({tree.get('multi-queue-num-queues')!r})")  # fmt: skip
    expect("SEC-8", REFUSED, state, f"backend state after Initialised with {tree}")
    judge_error_node(path, error, record_variant)
    form = {S.Closing: "Closing", S.Closed: "Closed", S.InitWait: "stays in InitWait (QEMU)"}[state]
    variant = f"{form}{' with an error node (Linux)' if error is not None else ''}"
    record_variant("SM-29", variant)
    record_variant("DIV-24", variant)


@pytest.mark.role("backend")
@pytest.mark.parametrize("case", [pytest.param(name, id=name) for name, _, _, _ in HOSTILE])
@pytest.mark.rule("SM-23", "SM-26")
@pytest.mark.provokes(XENBUS_ERROR)
def test_backend_recovers_after_refusal(hostile, case: str) -> None:
    """After refusing, the backend closes on frontend Closed, lets go of everything (SM-23) and
    returns to InitWait when the frontend starts again (SM-26)."""
    obs = hostile[case]
    expect("SM-23", S.Closed, obs.need("closed"), "backend after frontend Closed, following the refusal")
    expect("SM-23", {}, obs.need("held"), "what the backend still holds once Closed")
    expect("SM-26", S.InitWait, obs.need("reopened"), "backend after frontend Initialising again")


@pytest.mark.role("backend")
@pytest.mark.rule("SEC-8", "SM-26")
@pytest.mark.provokes(XENBUS_ERROR)
def test_backend_serves_after_hostile_negotiations(hostile) -> None:
    """After every refused negotiation, a clean handshake connects and serves every queue."""
    hostile["final"].need("served")


@pytest.mark.role("backend")
@pytest.mark.rule("DIV-10", "SEC-8", "XK-5")
@pytest.mark.provokes(XENBUS_ERROR)
def test_unknown_protocol_string(backend_under_test, record_variant) -> None:
    """An unknown `protocol`: refused (Linux) or taken as native (QEMU) and then served; never a crash."""
    env = backend_under_test()
    state = connect_edited(env, lambda keys: {**keys, "protocol": "pdp11-abi"})
    expect("DIV-10", REFUSED | {S.Connected}, state)
    if state == S.Connected:
        check_io(env, "DIV-10", "protocol 'pdp11-abi' taken as native")
        record_variant("DIV-10", "taken as native (QEMU)")
        env.peer.close()
    else:
        record_variant("DIV-10", f"refused: {state.name} (Linux)")
        judge_error_node(*error_node(env), record_variant)
        env.peer.raw_state(S.Closed)
        expect("SM-23", S.Closed, settle(env, "backend", {S.Closed}), "backend after frontend Closed")
    env.peer.reconnect(FrontendConfig(protocol=env.abi, timeout=env.timeout))
    check_io(env, "DIV-10", "a known protocol after the unknown one")


@pytest.mark.role("backend")
@pytest.mark.rule("DIV-9", "XK-F7")
def test_absent_protocol(backend_under_test, record_variant) -> None:
    """No `protocol` key: the backend connects and speaks x86_32 (Linux, QEMU on x86) or native."""
    env = backend_under_test()
    tried: list[str] = []
    for abi in (consts.X86_32_ABI, consts.X86_64_ABI):
        if tried:  # the previous guess failed: close, reopen, try the other ABI
            env.peer.raw_state(S.Closed)
            expect("SM-23", S.Closed, settle(env, "backend", {S.Closed}), "backend after frontend Closed")
            env.peer.raw_release()
            env.peer.raw_state(S.Initialising)
            expect("SM-26", S.InitWait, settle(env, "backend", {S.InitWait}), "backend after a reopen")
        old = env.peer
        peer = env.peer = Frontend(
            old.xen, old.path, FrontendConfig(protocol=abi, max_queues=1, timeout=env.timeout)
        )
        keys = peer.raw_transport()
        peer.raw_write({**keys, "protocol": None}, clear=True)  # the key itself removed (DIV-9)
        peer.raw_state(S.Initialised)
        state = settle(env, "backend", {S.Connected, S.Closing, S.Closed})
        expect("DIV-9", S.Connected, state, "a frontend without `protocol` must be served (both variants)")
        peer.raw_finish()
        data = bytes(range(256)) * 2
        try:
            ok = peer.write(8, data).status == OKAY and peer.read(8, 1).data == data
        except (DeviceDisabled, XenTimeout):
            ok = False
        if ok:
            record_variant("DIV-9", "x86_32 (Linux, QEMU on x86)" if abi == consts.X86_32_ABI else "native")
            return
        tried.append(abi)
    expect("DIV-9", "x86_32-abi or native served", f"neither worked ({tried})")


# -- frontend role ---------------------------------------------------------------------------------


def _attach_watched(make, backend: BackendConfig | None = None):
    """Attach the frontend under test under a dom0 watch on its directory. When it never gets to
    Connected, what it wrote explains why if it can (a key late or malformed: that rule fails);
    otherwise the timeout stands."""
    env = make(backend=backend or BackendConfig())
    watch = DirWatch(env, env.vbd.frontend_path)
    try:
        env.attach()
    except TargetTimeout:
        watch.drain()
        order = watch.first_writes()
        expect_no_findings(xenbus.validate_write_order(watch.writes, "frontend"), f"write order {order}")
        tree = xenbus.validate(env.frontend_tree(), env.backend_tree(), phase=Phase.INITIALISED)
        expect_no_findings(of_side(tree, "frontend"), "frontend tree, never Connected")
        raise
    watch.drain()
    return env, watch


def _exercise(env, rule: str, what: str) -> None:
    """I/O through the frontend under test at both ends of the disk; the suite's backend (whose
    ring servers record the rule of every request they refuse) refused nothing."""
    last = env.store.size // consts.SECTOR_SIZE - 8
    for sector in (0, last):
        data = bytes((sector + i) % 253 for i in range(4096))
        expect(rule, OKAY, env.io("write", sector, data).status, f"write at {sector}, {what}")
        expect(rule, data, env.io("read", sector, 8).data, f"read back at {sector}, {what}")
    expect(rule, {}, env.request_rules_broken(), f"requests the suite's backend refused, {what}")


@pytest.fixture(scope="module")
def attached(shared_frontend_under_test) -> Observed:
    """A frontend attached under a dom0 watch on its directory, then used (the spec's timing)."""
    obs = Observed()
    env = None
    try:
        env, watch = _attach_watched(shared_frontend_under_test)
        obs["writes"], obs["order"] = watch.writes, watch.first_writes()
        obs["frontend"], obs["backend"] = env.frontend_tree(), env.backend_tree()
        _exercise(env, "XK-8", "after the handshake")
        obs["served"] = True
        be_path = env.vbd.backend_path
        obs["backend_owners"] = {k: env.dom0.get_perms(f"{be_path}/{k}")[0] for k in env.backend_tree()}
        obs["backend_perms"] = env.dom0.get_perms(be_path)
        obs["domids"] = (env.vbd.frontend_domid, env.vbd.backend_domid)
    except Exception as exc:
        obs.error = exc
    finally:
        close_early(env)
    return obs


FRONTEND_LAYOUT_RULES = ("XK-8", "XK-4", "XK-F3", "XK-F7", "XK-F8", "XK-F9", "XK-F10", "XK-F11",
                         "XK-F13", "XK-F14", "XK-F15", "MPR-1", "MPR-2",
                         "MQ-2", "MQ-3", "MQ-4", "MQ-5")  # fmt: skip


def _judge_frontend_layout(writes, order, fe, be) -> None:
    expect_no_findings(xenbus.validate_write_order(writes, "frontend"), f"frontend write order {order}")
    expect_no_findings(of_side(xenbus.validate(fe, be, phase=Phase.CONNECTED), "frontend"), "frontend tree")


@pytest.mark.role("frontend")
@pytest.mark.rule(*FRONTEND_LAYOUT_RULES, "DIV-20.a")
def test_frontend_publishes_transport_before_initialised(attached) -> None:
    """Every chosen transport key is written before state=3 (XK-8), in a layout that validates
    against a multi-queue, multi-page offer; then I/O works (the spec's timing of DIV-20.a)."""
    _judge_frontend_layout(*attached.need("writes", "order", "frontend", "backend"))
    attached.need("served")


@pytest.mark.role("frontend")
@pytest.mark.rule(*FRONTEND_LAYOUT_RULES)
def test_frontend_single_queue_single_page_layout(frontend_under_test) -> None:
    """Against a backend offering one queue and no multi-page ring: flat keys, no order (MQ-3, MPR-1)."""
    env, watch = _attach_watched(frontend_under_test, BackendConfig(max_queues=1, max_ring_page_order=0))
    _judge_frontend_layout(watch.writes, watch.first_writes(), env.frontend_tree(), env.backend_tree())
    _exercise(env, "XK-8", "single queue, single page")


@pytest.mark.role("frontend")
@pytest.mark.rule("XK-F16")
def test_frontend_writes_no_deprecated_keys(attached) -> None:
    fe, be = attached.need("frontend", "backend")
    findings = of_side(xenbus.validate(fe, be), "frontend")
    expect_no_findings(findings, "frontend tree at Connected", enforcements=("should",))


TIMINGS = {  # DIV-20: when real backends publish their offers (the spec's timing: `attached`)
    "linux-features-at-connected": BackendConfig(publish_features="connected"),
    "qemu-10.2-order-after-initwait": BackendConfig(order_after_initwait=True),
}


@pytest.mark.role("frontend")
@pytest.mark.parametrize("offer", list(TIMINGS.values()), ids=list(TIMINGS))
@pytest.mark.rule("DIV-20.a", "XK-9", "MPR-1", "SM-3", "SM-5")
def test_frontend_copes_with_publication_timing(frontend_under_test, offer) -> None:
    """Features at Connected (Linux) or the ring order just after InitWait (QEMU 10.2): the frontend
    connects, stays within what was offered, reads the device properties at Connected and serves I/O."""
    env, _ = _attach_watched(frontend_under_test, offer)
    fe, be = env.frontend_tree(), env.backend_tree()
    expect_no_findings(of_side(xenbus.validate(fe, be, phase=Phase.CONNECTED), "frontend"), "frontend tree")
    _exercise(env, "DIV-20.a", "with the backend's offers published late")


@pytest.mark.role("frontend")
@pytest.mark.rule("XK-3", "SEC-30")
def test_frontend_writes_only_its_own_directory(attached) -> None:
    """Nothing in the backend's directory belongs to the guest; its permissions are the toolstack's."""
    owners, perms, (fe_id, be_id) = attached.need("backend_owners", "backend_perms", "domids")
    alien = {k: p for k, p in owners.items() if p != f"n{be_id}"}
    expect("XK-3", {}, alien, "backend nodes owned by another domain than the backend's")
    expect("SEC-30", [f"n{be_id}", f"r{fe_id}"], perms, "backend directory permissions")
