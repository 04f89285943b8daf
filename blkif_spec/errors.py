"""The one exception every protocol check raises: a rule, what was expected, what was seen."""

from __future__ import annotations

from blkif_spec import catalogue


class RuleViolation(Exception):
    """A peer (or a value) broke a catalogue rule.

    Whether that is a target's `fail` or the harness' `error` is decided at the
    boundary that catches it, never here (style habit 4).
    """

    def __init__(self, rule_id: str, expected: object, observed: object, detail: str = "") -> None:
        self.rule = catalogue.get(rule_id)
        self.expected = expected
        self.observed = observed
        self.detail = detail
        super().__init__(str(self))

    @property
    def rule_id(self) -> str:
        return self.rule.id

    def __str__(self) -> str:
        head = f"{self.rule.id} [{self.rule.level}] {self.rule.summary}"
        lines = [head, f"  expected: {self.expected}", f"  observed: {self.observed}"]
        if self.detail:
            lines.append(f"  detail:   {self.detail}")
        return "\n".join(lines)

    def __reduce__(self):  # picklable across processes (bench workers, xdist)
        return (type(self), (self.rule_id, self.expected, self.observed, self.detail))
