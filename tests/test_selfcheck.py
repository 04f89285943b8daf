"""Detection power: the suite fails every faulty implementation on the rule it breaks.

Each fault of `tests/faulty` runs the conformance tests tagged with its rule
(in-process, `selfcheck` profile); it must end `fail` (or `timeout`, for one
that hangs) on a test carrying that rule. The reference pair passing the whole
suite is the main job itself (`tests/conformance` runs in this same session).
"""

from __future__ import annotations

import pytest

from tests.faulty.registry import Fault, all_faults
from tests.faulty.selfcheck import run_fault

FAULTS = all_faults()


@pytest.mark.parametrize("fault", FAULTS, ids=lambda f: f.name)
def test_fault_is_caught_on_its_rule(fault: Fault) -> None:
    out = run_fault(fault)
    assert out.ran, f"{fault.name}: no conformance test is tagged with {fault.rule}"
    assert out.caught, (
        f"{fault.name} breaks {fault.rule} ({fault.what}) but was not caught on it:\n"
        f"  tests run: {out.ran}, failing elsewhere: {out.other_failures or 'none'}, exit {out.exit_code}"
    )


def test_catalogue_is_large_and_spread() -> None:
    """At least 40 faulty backends and 15 faulty frontends, over many areas."""
    roles = {role: [f for f in FAULTS if f.role == role] for role in ("backend", "frontend")}
    assert len(roles["backend"]) >= 40 and len(roles["frontend"]) >= 15, {k: len(v) for k, v in roles.items()}
    areas = {f.rule.split("-")[0] for f in FAULTS}
    assert len(areas) >= 10, areas
