"""Negotiation: the frontend's choosers, the backend's reading, and their agreement with `validate`."""

from __future__ import annotations

import pytest
from hypothesis import given, note
from hypothesis import strategies as st

from blkif_spec.consts import BLKIF_MAX_INDIRECT_SEGMENTS, X86_32_ABI, X86_64_ABI
from blkif_spec.errors import RuleViolation
from blkif_spec.xenbus import (
    FEATURE_DEFAULTS,
    RingKeys,
    backend_reads,
    choose_queues,
    choose_ring_order,
    event_channel_key,
    features,
    frontend_transport,
    indirect_limit,
    negotiate,
    persistent,
    read_rings,
    ring_ref_keys,
    validate,
)
from tests.strategies.xenbus import RECORDED_BACKEND_2Q as BACKEND_2Q
from tests.strategies.xenbus import RECORDED_FRONTEND_2Q as FRONTEND_2Q
from tests.strategies.xenbus import (
    TRANSPORT_MUTATIONS,
    connected_pairs,
    hostile_uint,
    mutated_pairs,
    transport,
    valid_pairs,
)

WANT_ORDER = st.integers(0, 6)
WANT_QUEUES = st.integers(1, 12)


def frontend_for(backend, want_order, want_queues, *, state="3", base=None):
    """A frontend tree built only from the choosers, the way a reference frontend would."""
    order = choose_ring_order(backend, want_order)
    queues = choose_queues(backend, want_queues)
    pages = 1 << order
    grefs = [[100 + q * pages + i for i in range(pages)] for q in range(queues)]
    ports = [20 + q for q in range(queues)]
    tree = dict(base or {"backend": "/local/domain/0/backend/vbd/1/51712", "backend-id": "0"})
    tree.update(frontend_transport(order=order, grefs=grefs, ports=ports), state=state)
    return tree, order, queues, grefs, ports


# --------------------------------------------------------------------------- choosers


def test_recorded_pair_negotiates_what_the_kernel_logged():
    """dmesg: "using 2 queues, protocol 1 (x86_64-abi) persistent grants"; blkfront: indirect enabled."""
    n = negotiate(FRONTEND_2Q, BACKEND_2Q)
    assert (n.queues, n.ring_page_order, n.abi, n.persistent) == (2, 0, X86_64_ABI, True)
    assert (n.max_indirect_segments, n.flush_cache, n.barrier, n.discard) == (256, True, True, True)
    assert (n.sector_size, n.sectors, n.discard_granularity, n.readonly) == (512, 65536, 4096, False)
    report = n.as_report()
    assert report["queues"] == 2 and report["protocol"] == X86_64_ABI and report["persistent"] is True
    assert backend_reads(FRONTEND_2Q, BACKEND_2Q) == [
        RingKeys(0, ("queue-0/ring-ref",), "queue-0/event-channel"),
        RingKeys(1, ("queue-1/ring-ref",), "queue-1/event-channel"),
    ]
    assert [r.grefs for r in read_rings(FRONTEND_2Q, BACKEND_2Q)] == [(9,), (8,)]


@given(valid_pairs(), WANT_ORDER, WANT_QUEUES)
def test_chooser_built_frontends_validate_clean_and_read_back(pair, want_order, want_queues):
    if pair.spec.states[0] == 1:
        return  # the backend has offered nothing yet: covered by the defaults test below
    frontend, order, queues, grefs, ports = frontend_for(pair.backend, want_order, want_queues)
    note(f"order={order} queues={queues}")
    assert validate(frontend, pair.backend) == []
    assert order <= want_order and queues <= want_queues
    rings = read_rings(frontend, pair.backend)
    assert [r.grefs for r in rings] == [tuple(g) for g in grefs]
    assert [r.port for r in rings] == ports
    keys = backend_reads(frontend, pair.backend)
    multi = queues >= 2
    assert keys == [
        RingKeys(
            q if multi else None,
            ring_ref_keys(order, q if multi else None, queues),
            event_channel_key(q if multi else None, queues),
        )
        for q in range(queues)
    ]


@given(WANT_ORDER, WANT_QUEUES)
def test_without_offers_a_frontend_uses_one_single_page_queue(want_order, want_queues):
    backend = {"state": "2"}
    assert choose_ring_order(backend, want_order) == 0
    assert choose_queues(backend, want_queues) == 1
    frontend, *_ = frontend_for(backend, want_order, want_queues)
    assert set(frontend) >= {"ring-ref", "event-channel"} and "ring-page-order" not in frontend


@given(hostile_uint(), hostile_uint(), WANT_ORDER, WANT_QUEUES)
def test_choosers_read_junk_offers_as_absent(order, queues, want_order, want_queues):
    backend = {"max-ring-page-order": order, "multi-queue-max-queues": queues, "state": "2"}
    assert choose_ring_order(backend, want_order) == 0
    assert choose_queues(backend, want_queues) == 1
    frontend, *_ = frontend_for(backend, want_order, want_queues)
    assert [f for f in validate(frontend, backend) if f.side == "frontend"] == []


def test_legacy_max_ring_pages_counts_xkf11():
    assert choose_ring_order({"max-ring-pages": "8"}, 4) == 3
    assert choose_ring_order({"max-ring-pages": "8", "max-ring-page-order": "4"}, 4) == 4
    assert choose_ring_order({"max-ring-pages": "12"}, 4) == 2  # ffs(12) - 1
    assert choose_ring_order({"max-ring-page-order": "2"}, 4) == 2


def test_chooser_arguments_are_checked():
    with pytest.raises(ValueError):
        choose_ring_order({}, -1)
    with pytest.raises(ValueError):
        choose_queues({}, 0)


@given(st.sampled_from([None, "0", "1", "2", "x"]), st.sampled_from([None, "0", "1", "2", "x"]))
def test_persistent_needs_both_sides_to_advertise_1(fe, be):
    frontend = {} if fe is None else {"feature-persistent": fe}
    backend = {} if be is None else {"feature-persistent": be}
    assert persistent(frontend, backend) == (fe == "1" and be == "1")


@given(st.none() | st.integers(0, 2**32 - 1).map(str) | hostile_uint(), st.none() | st.integers(0, 5000))
def test_indirect_limit(offered, want):
    backend = {} if offered is None else {"feature-max-indirect-segments": offered}
    limit = indirect_limit(backend, want)
    honest = int(offered) if offered is not None and offered.isascii() and offered.isdigit() else 0
    if offered is not None and (offered != str(honest) or honest >= 2**32):
        honest = 0
    expected = min(honest, BLKIF_MAX_INDIRECT_SEGMENTS) if want is None else min(honest, 4096, want)
    assert limit == expected


def test_feature_defaults_are_no():
    assert all(
        FEATURE_DEFAULTS[k] == "0"
        for k in ("feature-barrier", "feature-flush-cache", "feature-discard", "feature-persistent")
    )
    offers = features({})
    assert not (offers.flush_cache or offers.barrier or offers.discard or offers.persistent)
    assert offers.max_indirect_segments == 0


def test_ring_ref_keys_follow_mpr2_and_mq3_mq4():
    assert ring_ref_keys(0) == ("ring-ref",)
    assert ring_ref_keys(0, write_order=True) == ("ring-ref0",)
    assert ring_ref_keys(2) == ("ring-ref0", "ring-ref1", "ring-ref2", "ring-ref3")
    assert ring_ref_keys(1, queue=3, nqueues=4) == ("queue-3/ring-ref0", "queue-3/ring-ref1")
    assert ring_ref_keys(0, queue=0, nqueues=2) == ("queue-0/ring-ref",)
    assert (
        event_channel_key(None, 1) == "event-channel" and event_channel_key(1, 2) == "queue-1/event-channel"
    )
    for bad in (
        {"order": 1, "write_order": False},
        {"order": 0, "queue": 1},
        {"order": 0, "nqueues": 2},
        {"order": 0, "queue": 2, "nqueues": 2},
        {"order": 0, "nqueues": 0},
    ):
        with pytest.raises(ValueError):
            ring_ref_keys(**bad)


# --------------------------------------------------------------------------- the backend's reading


@given(mutated_pairs(TRANSPORT_MUTATIONS))
def test_backend_reading_agrees_with_the_validator(mutation):
    """A backend refuses only trees the validator flags; what it accepts is what it would map."""
    frontend_findings = [f for f in validate(mutation.frontend, mutation.backend) if f.side == "frontend"]
    try:
        keys = backend_reads(mutation.frontend, mutation.backend)
    except RuleViolation as refused:
        note(f"refused: {refused.rule_id}")
        assert frontend_findings
        return
    # Accepted despite a finding: only leftovers the backend ignores (MQ-3 flat+queue-0, MQ-4 top level).
    assert {f.rule for f in frontend_findings} <= {"MQ-3", "MQ-4"}
    for ring in keys:
        assert all(k in mutation.frontend for k in (*ring.ring_refs, ring.event_channel))


@given(connected_pairs())
def test_backend_reading_of_valid_pairs_matches_the_spec(pair):
    keys = backend_reads(pair.frontend, pair.backend)
    assert len(keys) == pair.spec.queues
    assert all(len(k.ring_refs) == 1 << pair.spec.order for k in keys)
    assert all(k.ring_refs[0].endswith("ring-ref0") == pair.spec.write_order for k in keys)


@pytest.mark.parametrize(
    "change, rule",
    [
        ({"ring-page-order": "5"}, "MPR-3"),
        ({"ring-page-order": "0x1"}, "SEC-8"),
        ({"multi-queue-num-queues": "3"}, "MQ-2"),
        ({"multi-queue-num-queues": "0"}, "MQ-2"),
        ({"multi-queue-num-queues": " 2"}, "SEC-8"),
        ({"queue-1/ring-ref": "-8"}, "SEC-8"),
        ({"queue-1/event-channel": "4294967296"}, "SEC-8"),
        ({"ring-page-order": "0"}, "MPR-2"),
    ],
)
def test_backend_refuses_with_the_right_rule(change, rule):
    with pytest.raises(RuleViolation) as caught:
        backend_reads({**FRONTEND_2Q, **change}, BACKEND_2Q)
    assert caught.value.rule_id == rule


def test_backend_picks_the_layout_by_presence_of_ring_page_order_only():
    """SEC-8/MPR-2: a stale ring-ref0 beside ring-ref does not switch the layout."""
    single = {"ring-ref": "9", "ring-ref0": "77", "event-channel": "23"}
    assert read_rings(single) == [read_rings({"ring-ref": "9", "event-channel": "23"})[0]]
    assert read_rings({**single, "ring-page-order": "0"})[0].grefs == (77,)


def test_backend_refuses_missing_pieces():
    cases = [
        ({"multi-queue-num-queues": "1", "queue-0/ring-ref": "9", "queue-0/event-channel": "2"}, "MQ-3"),
        ({"ring-ref": "9"}, "XK-8"),
        ({"event-channel": "9"}, "MPR-2"),
        ({"multi-queue-num-queues": "2", "queue-0/ring-ref": "9", "queue-0/event-channel": "2"}, "MQ-4"),
        (
            {
                "multi-queue-num-queues": "2",
                "queue-0/ring-ref": "9",
                "queue-0/event-channel": "2",
                "queue-1/ring-ref": "8",
            },
            "MQ-4",
        ),
    ]
    for frontend, rule in cases:
        with pytest.raises(RuleViolation) as caught:
            backend_reads(frontend)
        assert caught.value.rule_id == rule, frontend


def test_without_a_backend_tree_linux_limits_apply():
    order5 = {"ring-page-order": "5", **{f"ring-ref{i}": str(i + 8) for i in range(32)}, "event-channel": "3"}
    with pytest.raises(RuleViolation) as caught:
        backend_reads(order5)
    assert caught.value.rule_id == "MPR-3"
    many = {"multi-queue-num-queues": "4294967295", "queue-0/ring-ref": "9", "queue-0/event-channel": "2"}
    with pytest.raises(RuleViolation) as caught:
        backend_reads(many)
    assert caught.value.rule_id == "MQ-4"


# --------------------------------------------------------------------------- the record


@given(connected_pairs())
def test_negotiated_record_reflects_both_trees(pair):
    s = pair.spec
    n = negotiate(pair.frontend, pair.backend)
    assert (n.queues, n.ring_page_order, n.ring_ref_indexed) == (s.queues, s.order, s.write_order)
    assert n.persistent == bool(s.fe_persistent and s.be_persistent)
    assert n.max_indirect_segments == min(s.max_indirect or 0, BLKIF_MAX_INDIRECT_SEGMENTS)
    assert (n.flush_cache, n.barrier, n.discard) == (bool(s.flush), bool(s.barrier), bool(s.discard))
    assert (n.sector_size, n.sectors, n.info) == (s.sector_size, s.sectors, s.info)
    assert n.physical_sector_size == (s.physical_sector_size or s.sector_size)
    assert n.abi == (s.protocol or X86_64_ABI)
    if s.discard:
        assert n.discard_granularity == s.discard_granularity
    assert negotiate(pair.frontend, pair.backend, default_abi=X86_32_ABI).abi == (s.protocol or X86_32_ABI)


@given(mutated_pairs())
def test_negotiate_accepts_only_what_validates_without_must_findings(mutation):
    findings = validate(mutation.frontend, mutation.backend)
    try:
        record = negotiate(mutation.frontend, mutation.backend)
    except RuleViolation as refused:
        assert refused.rule_id in {f.rule for f in findings if f.enforcement == "must"}
        return
    assert all(f.enforcement != "must" for f in findings)
    if any(f.rule == "DIV-10" for f in findings):
        assert record.abi is None


def test_negotiate_before_connected_leaves_properties_unknown():
    backend = {
        k: v
        for k, v in BACKEND_2Q.items()
        if k not in ("sectors", "info", "sector-size", "physical-sector-size")
    }
    n = negotiate({**FRONTEND_2Q, "state": "3"}, {**backend, "state": "2"})
    assert (n.sector_size, n.sectors, n.info, n.physical_sector_size) == (None, None, None, None)


@given(valid_pairs(("initialised", "connecting", "connected")))
def test_negotiated_transport_equals_what_the_backend_maps(pair):
    n = negotiate(pair.frontend, pair.backend)
    rings = read_rings(pair.frontend, pair.backend)
    assert len(rings) == n.queues and all(len(r.grefs) == 1 << n.ring_page_order for r in rings)
    assert transport(pair.spec).items() <= pair.frontend.items()
