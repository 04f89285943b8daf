"""The clause catalogue: every rule ID of the inventory, its level and enforcement.

This module is the sole source of rule IDs (style habit 1). Tests, reports,
validators and reference drivers name rules by ID; `get()` fails loudly on an
ID that is not here, so a typo cannot silently create an untested rule.
The rows live in `_rules.py` (transcribed from the inventory, summaries in our
own words); this module gives them a type and an index.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

LEVELS = ("MUST", "SHOULD", "MAY", "IMPL", "INFO")
ENFORCEMENTS = ("must", "should", "variant", "info", "harness")

#: Areas in the order the inventory presents them; a rule's area is its ID prefix.
AREAS = (
    "WIRE", "OP", "SEG", "IND", "DISC", "FL", "PG", "RING", "XK", "MPR", "MQ",
    "SM", "DIV", "SEC", "XS", "PYXS",
)  # fmt: skip


class UnknownRule(KeyError):
    """A rule ID that the catalogue does not contain."""

    def __str__(self) -> str:
        return f"unknown rule ID {self.args[0]!r}: not in blkif_spec.catalogue"


@dataclass(frozen=True, slots=True)
class Rule:
    id: str
    level: str
    enforcement: str
    summary: str
    citation: str
    reason: str
    retired: bool = False

    @property
    def area(self) -> str:
        return area_of(self.id)

    @property
    def parent(self) -> str | None:
        """`FL-1` for the sub-clause `FL-1.a`, else None."""
        return self.id.split(".", 1)[0] if "." in self.id else None


def area_of(rule_id: str) -> str:
    return rule_id.split("-", 1)[0]


def _index(rows: Iterable[tuple]) -> dict[str, Rule]:
    index: dict[str, Rule] = {}
    for row in rows:
        rule = Rule(*row)
        if rule.id in index:
            raise ValueError(f"duplicate rule ID {rule.id} in catalogue data")
        if rule.level not in LEVELS:
            raise ValueError(f"{rule.id}: level {rule.level!r} not in {LEVELS}")
        if rule.enforcement not in ENFORCEMENTS:
            raise ValueError(f"{rule.id}: enforcement {rule.enforcement!r} not in {ENFORCEMENTS}")
        if rule.area not in AREAS:
            raise ValueError(f"{rule.id}: area {rule.area!r} not in {AREAS}")
        index[rule.id] = rule
    return index


def _load() -> dict[str, Rule]:
    from blkif_spec._rules import RULES

    return _index(RULES)


_RULES: dict[str, Rule] = _load()


def get(rule_id: str) -> Rule:
    try:
        return _RULES[rule_id]
    except KeyError:
        raise UnknownRule(rule_id) from None


def known(rule_id: str) -> bool:
    return rule_id in _RULES


def check(rule_ids: Iterable[str]) -> tuple[str, ...]:
    """Return the IDs unchanged, raising UnknownRule for the first unknown one."""
    ids = tuple(rule_ids)
    for rule_id in ids:
        get(rule_id)
    return ids


def rules() -> Iterator[Rule]:
    """Every rule, in catalogue order."""
    return iter(_RULES.values())


def by_area() -> dict[str, list[Rule]]:
    grouped: dict[str, list[Rule]] = {area: [] for area in AREAS}
    for rule in _RULES.values():
        grouped[rule.area].append(rule)
    return grouped


def sub_clauses(rule_id: str) -> list[Rule]:
    return [r for r in _RULES.values() if r.parent == rule_id]
