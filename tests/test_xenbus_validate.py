"""The tree validator: generated pairs validate clean, each single fault gives exactly its rule."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, note
from hypothesis import strategies as st

from blkif_spec import catalogue
from blkif_spec.errors import RuleViolation
from blkif_spec.xenbus import Finding, Phase, infer_phase, raise_first, validate, validate_write_order
from tests.strategies.xenbus import (
    MUTATORS,
    STAGES,
    every_mutation,
    mutated_pairs,
    valid_pairs,
)
from tests.strategies.xenbus import RECORDED_BACKEND_2Q as BACKEND_2Q
from tests.strategies.xenbus import RECORDED_FRONTEND_2Q as FRONTEND_2Q


def rules(frontend, backend, **kwargs) -> set[str]:
    return {f.rule for f in validate(frontend, backend, **kwargs)}


def test_the_recorded_connected_pair_is_clean():
    assert validate(FRONTEND_2Q, BACKEND_2Q) == []
    assert infer_phase(FRONTEND_2Q, BACKEND_2Q) == Phase.CONNECTED


@given(valid_pairs())
def test_generated_pairs_validate_clean(pair):
    note(f"spec={pair.spec}")
    assert validate(pair.frontend, pair.backend) == []


@given(valid_pairs(("connected", "closed")))
def test_a_complete_pair_is_clean_whatever_phase_is_claimed(pair):
    for phase in Phase:
        assert validate(pair.frontend, pair.backend, phase=phase) == []


@given(every_mutation())
def test_each_single_fault_gives_exactly_its_rule(mutations):
    """Every kind of fault, applied alone to the same connected pair, gives exactly its rule."""
    assert {m.name for m in mutations} == set(MUTATORS)
    for mutation in mutations:
        findings = validate(mutation.frontend, mutation.backend)
        assert {f.rule for f in findings} == {mutation.rule}, (mutation.name, findings)


@given(mutated_pairs())
def test_findings_have_catalogue_rules_and_valid_python_reprs(mutation):
    for finding in validate(mutation.frontend, mutation.backend):
        assert catalogue.known(finding.rule)
        assert eval(repr(finding), {"Finding": Finding}) == finding  # the repr contract: valid Python
        assert finding.side in ("frontend", "backend")
        assert finding.violation().rule_id == finding.rule


@given(valid_pairs(), st.dictionaries(st.from_regex(r"[a-z][a-z0-9-]{0,15}", fullmatch=True), st.text()))
def test_unknown_extra_keys_are_not_findings(pair, extra):
    from blkif_spec.xenbus.schema import lookup

    extra = {k: v for k, v in extra.items() if lookup("frontend", k) is None and lookup("backend", k) is None}
    extra = {k: v for k, v in extra.items() if not k.startswith(("queue-", "ring-ref", "event-channel"))}
    assert validate({**pair.frontend, **extra}, {**pair.backend, **extra}) == []


# --------------------------------------------------------------------------- phases


def test_device_properties_are_due_only_at_backend_connected():
    initwait = {k: v for k, v in BACKEND_2Q.items() if k not in ("sectors", "info", "sector-size")}
    initwait["state"] = "2"
    frontend = {**FRONTEND_2Q, "state": "3"}
    assert rules(frontend, initwait) == set()
    assert rules(frontend, initwait, phase=Phase.CONNECTED) == {"XK-9"}
    assert rules(frontend, {**initwait, "state": "4"}) == {"XK-9"}


def test_frontend_transport_is_due_only_at_initialised_or_connected():
    bare = {k: v for k, v in FRONTEND_2Q.items() if not k.startswith(("queue-", "multi-queue"))}
    backend = {**BACKEND_2Q, "state": "2"}
    assert rules({**bare, "state": "1"}, backend) == set()
    assert rules({**bare, "state": "1"}, backend, phase=Phase.INITIALISED) == {"XK-8"}
    assert rules({**bare, "state": "3"}, backend) == {"XK-8"}
    assert rules({**bare, "state": "5"}, backend) == set()


def test_an_empty_tree_is_an_absent_directory_and_is_not_judged():
    assert validate({}, BACKEND_2Q) == []
    assert validate(FRONTEND_2Q, {}) == []
    assert validate({}, {}) == []


def test_phase_inference():
    assert infer_phase({"state": "1"}, {"state": "1"}) == Phase.CREATED
    assert infer_phase({"state": "1"}, {"state": "2"}) == Phase.INIT_WAIT
    assert infer_phase({"state": "3"}, {"state": "2"}) == Phase.INITIALISED
    assert infer_phase({"state": "5"}, {"state": "4"}) == Phase.CLOSING
    assert infer_phase({}, {"state": "x"}) == Phase.CREATED


# --------------------------------------------------------------------------- specific readings


def test_mpr2_order_zero_with_flat_ring_ref_is_refused_and_with_ring_ref0_accepted():
    single = {k: v for k, v in FRONTEND_2Q.items() if not k.startswith(("queue-", "multi-queue"))}
    single.update({"ring-ref": "9", "event-channel": "23"})
    assert rules(single, BACKEND_2Q) == set()
    assert rules({**single, "ring-page-order": "0"}, BACKEND_2Q) == {"MPR-2"}
    indexed = {k: v for k, v in single.items() if k != "ring-ref"}
    assert rules({**indexed, "ring-page-order": "0", "ring-ref0": "9"}, BACKEND_2Q) == set()
    # A leftover flat ring-ref beside a complete ring-ref%u set is not relied on: fine (SEC-8).
    assert rules({**single, "ring-page-order": "0", "ring-ref0": "9"}, BACKEND_2Q) == set()


def test_mq3_one_written_with_flat_keys_is_correct():
    single = {k: v for k, v in FRONTEND_2Q.items() if not k.startswith("queue-")}
    single.update({"multi-queue-num-queues": "1", "ring-ref": "9", "event-channel": "23"})
    assert rules(single, BACKEND_2Q) == set()


def test_legacy_page_keys_may_be_absent_and_must_agree_when_present():
    backend = {**BACKEND_2Q, "max-ring-pages": "16"}
    assert rules(FRONTEND_2Q, backend) == set()
    assert rules(FRONTEND_2Q, {**BACKEND_2Q, "max-ring-pages": "8"}) == {"XK-11"}


def test_legacy_max_ring_pages_alone_raises_the_offer_xkf11():
    backend = {k: v for k, v in BACKEND_2Q.items() if k != "max-ring-page-order"}
    frontend = {k: v for k, v in FRONTEND_2Q.items() if not k.endswith("ring-ref")}
    frontend.update(
        {
            "ring-page-order": "2",
            **{f"queue-{q}/ring-ref{i}": str(10 * q + i) for q in (0, 1) for i in range(4)},
        }
    )
    assert rules(frontend, backend) == {"MPR-1"}
    assert rules(frontend, {**backend, "max-ring-pages": "4"}) == set()


def test_discard_offer_without_granularity_is_disc4():
    backend = {k: v for k, v in BACKEND_2Q.items() if k != "discard-granularity"}
    assert rules(FRONTEND_2Q, backend) == {"DISC-4"}
    assert rules(FRONTEND_2Q, {**backend, "feature-discard": "0"}) == set()


def test_xkf16_is_a_should_level_finding():
    (finding,) = validate({**FRONTEND_2Q, "feature-large-sector-size": "1"}, BACKEND_2Q)
    assert finding.rule == "XK-F16" and finding.enforcement == "should"
    raise_first([finding])  # should-level: does not stop a driver


def test_unknown_protocol_is_the_div10_variant():
    (finding,) = validate({**FRONTEND_2Q, "protocol": "sparc-abi"}, BACKEND_2Q)
    assert finding.rule == "DIV-10" and finding.enforcement == "variant"
    assert rules({k: v for k, v in FRONTEND_2Q.items() if k != "protocol"}, BACKEND_2Q) == set()  # DIV-9


def test_hostile_counts_are_summarised_not_enumerated():
    frontend = {**FRONTEND_2Q, "multi-queue-num-queues": "4294967295"}
    backend = {**BACKEND_2Q, "multi-queue-max-queues": "4294967295"}
    findings = validate(frontend, backend)
    assert {f.rule for f in findings} == {"MQ-4"} and len(findings) == 1
    huge_order = {**FRONTEND_2Q, "ring-page-order": "4294967295"}
    assert rules(huge_order, {**BACKEND_2Q, "max-ring-page-order": "4294967295"}) == {"MPR-2"}


def test_raise_first_stops_on_must_findings():
    findings = validate({**FRONTEND_2Q, "multi-queue-num-queues": "3"}, BACKEND_2Q)
    with pytest.raises(RuleViolation) as caught:
        raise_first(findings)
    assert caught.value.rule_id == "MQ-2"


def test_finding_refuses_unknown_rules_and_sides():
    unknown = "XK-" + "999"  # built, so the catalogue's scan of literal rule IDs does not flag it
    with pytest.raises(KeyError):
        Finding(unknown, "x", "", None, "", "frontend")
    with pytest.raises(ValueError):
        Finding("XK-4", "x", "", None, "", "toolstack")
    finding = Finding("XK-4", "sectors", "decimal", "0x1", "bad", "backend")
    with pytest.raises(dataclasses.FrozenInstanceError):
        finding.rule = "XK-9"


# --------------------------------------------------------------------------- write order

# Transcribed from ../shared/data/xenstore-write-order.txt (xenstored -T, Xen 4.17.7, Linux 6.1, QEMU 7.2):
# the backend directory's writes in processing order, removals as None.
LINUX_BLKBACK_WRITES = [
    (".", None),
    ("frontend", "/local/domain/0/device/vbd/51760"),
    ("params", "/dev/loop0"),
    ("script", "/etc/xen/scripts/block"),
    ("frontend-id", "0"),
    ("online", "1"),
    ("removable", "0"),
    ("bootable", "1"),
    ("state", "1"),
    ("dev", "xvdd"),
    ("type", "phy"),
    ("mode", "w"),
    ("device-type", "disk"),
    ("discard-enable", "1"),
    ("specification", "xen"),
    ("feature-max-indirect-segments", "256"),
    ("multi-queue-max-queues", "2"),
    ("max-ring-page-order", "4"),
    ("state", "2"),
    ("physical-device", "7:0"),
    ("physical-device-path", "/dev/loop0"),
    ("hotplug-status", "connected"),
    ("feature-flush-cache", "1"),
    ("discard-granularity", "4096"),
    ("discard-alignment", "0"),
    ("discard-secure", "0"),
    ("feature-discard", "1"),
    ("feature-barrier", "1"),
    ("feature-persistent", "1"),
    ("sectors", "131072"),
    ("info", "0"),
    ("sector-size", "512"),
    ("physical-sector-size", "512"),
    ("state", "4"),
    ("state", "5"),
    ("state", "6"),
    ("online", "0"),
    (".", None),
    (".", None),
]
QEMU_72_WRITES = [
    (".", None),
    ("frontend", "/local/domain/0/device/vbd/51792"),
    ("params", "aio:/dev/loop2"),
    ("frontend-id", "0"),
    ("online", "1"),
    ("removable", "0"),
    ("bootable", "1"),
    ("state", "1"),
    ("dev", "xvdf"),
    ("type", "qdisk"),
    ("mode", "w"),
    ("device-type", "disk"),
    ("discard-enable", "1"),
    ("specification", "xen"),
    ("feature-discard", "1"),
    ("discard-granularity", "512"),
    ("discard-alignment", "0"),
    ("feature-flush-cache", "1"),
    ("max-ring-page-order", "4"),
    ("info", "0"),
    ("sector-size", "512"),
    ("sectors", "131072"),
    ("frontend", "/local/domain/0/device/vbd/51792"),
    ("frontend-id", "0"),
    ("hotplug-status", "connected"),
    ("online", "1"),
    ("state", "2"),
    ("state", "4"),
    ("state", "5"),
    ("state", "6"),
    ("online", "0"),
    ("online", "0"),
    ("state", "6"),
    (".", None),
]


def test_linux_blkback_publishes_features_at_connected_xk7b_only():
    findings = validate_write_order(LINUX_BLKBACK_WRITES, "backend")
    assert {f.rule for f in findings} == {"XK-7.b"}
    assert {f.path for f in findings} == {
        "feature-flush-cache",
        "feature-discard",
        "feature-barrier",
        "feature-persistent",
    }


def test_qemu_72_publishes_everything_before_initwait():
    assert validate_write_order(QEMU_72_WRITES, "backend") == []


def test_qemu_102_order_fails_xk7a():
    """QEMU 10.2's source writes InitWait before max-ring-page-order (SM-13, DIV-20)."""
    writes = [
        ("state", "1"),
        ("state", "2"),
        ("max-ring-page-order", "4"),
        ("sector-size", "512"),
        ("sectors", "8"),
        ("info", "0"),
        ("state", "4"),
    ]
    assert {f.rule for f in validate_write_order(writes, "backend")} == {"XK-7.a"}


def test_connected_before_device_properties_is_xk9():
    writes = [("state", "1"), ("state", "2"), ("state", "4"), ("sectors", "8"), ("sectors", "16")]
    findings = validate_write_order(writes, "backend")
    assert [f.rule for f in findings] == ["XK-9", "XK-9", "XK-9", "XK-9"]


def test_frontend_transport_after_initialised_is_xk8():
    writes = [("state", "1"), ("ring-ref", "8"), ("state", "3"), ("event-channel", "23")]
    assert [(f.rule, f.path) for f in validate_write_order(writes, "frontend")] == [("XK-8", "event-channel")]


@given(valid_pairs(tuple(s for s in STAGES if s != "created")))
def test_keys_written_before_the_state_are_in_order(pair):
    """A directory written key by key, state last, is in order (what Linux's transactions give)."""
    for side, tree in (("frontend", pair.frontend), ("backend", pair.backend)):
        writes = [
            ("state", "1"),
            *((k, v) for k, v in tree.items() if k != "state"),
            ("state", tree["state"]),
        ]
        assert validate_write_order(writes, side) == []
