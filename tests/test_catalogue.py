"""The clause catalogue: complete, well-formed, and the only source of rule IDs."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from blkif_spec import catalogue

ROOT = Path(__file__).resolve().parent.parent
RULES = list(catalogue.rules())
ID_PATTERN = re.compile(r"^[A-Z]+-(?:[BF])?\d+(?:\.[a-z])?$")
# Raises and calls that name a rule by ID in the package (checked against the catalogue).
RULE_CALLS = {"RuleViolation", "BadRequest", "Finding", "rule", "get"}


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.id)
def test_rule_row_is_well_formed(rule: catalogue.Rule) -> None:
    assert ID_PATTERN.match(rule.id), rule.id
    assert rule.summary and "\n" not in rule.summary and len(rule.summary) <= 120
    assert rule.citation and rule.reason
    if rule.parent is not None:
        assert catalogue.known(rule.parent), f"{rule.id}: parent {rule.parent} missing"


def test_enforcement_follows_the_level() -> None:
    """conventions §4: SHOULD → should; INFO/MAY → info; XS/PYXS → harness."""
    for rule in RULES:
        if rule.area in ("XS", "PYXS"):
            assert rule.enforcement == "harness", rule.id
        elif rule.level == "SHOULD":
            assert rule.enforcement == "should", rule.id
        elif rule.level in ("INFO", "MAY"):
            assert rule.enforcement in ("info", "must"), rule.id  # OP-5: INFO text, must as suite rule
        elif rule.level == "IMPL":
            assert rule.enforcement in ("variant", "must"), rule.id


def test_conventions_decisions_are_recorded() -> None:
    """A few decisions of conventions §5 that later code depends on."""
    expected = {"FL-1.a": "must", "FL-1.b": "should", "XK-7.a": "must", "XK-7.b": "should",
                "DIV-1": "variant", "DIV-2": "must", "DIV-12": "must", "DIV-21": "must",
                "MPR-2": "must", "SEC-3.a": "must", "SEC-3.b": "variant"}  # fmt: skip
    assert {rid: catalogue.get(rid).enforcement for rid in expected} == expected


def test_every_area_is_populated() -> None:
    assert all(catalogue.by_area().values())
    assert len(RULES) >= 250


def test_unknown_id_is_an_error() -> None:
    with pytest.raises(catalogue.UnknownRule, match="NOPE-1"):
        catalogue.get("NOPE-1")
    with pytest.raises(catalogue.UnknownRule):
        catalogue.check(["SEG-3", "SEG-99"])


def _literal_rule_ids(path: Path) -> list[tuple[int, str]]:
    """First-argument string literals of calls that take a rule ID, and rule(...) marker args."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        if name not in RULE_CALLS:
            continue
        args = node.args if name == "rule" else node.args[:1]
        for arg in args:
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and ID_PATTERN.match(arg.value):
                found.append((node.lineno, arg.value))
    return found


def test_every_rule_id_in_the_code_is_known() -> None:
    """A typo in a RuleViolation or marker must fail here, not create an untested rule."""
    unknown = [
        f"{path.relative_to(ROOT)}:{line}: {rid}"
        for base in ("blkif_spec", "tests")
        for path in sorted((ROOT / base).rglob("*.py"))
        if path != Path(__file__).resolve()  # this file names unknown IDs on purpose
        for line, rid in _literal_rule_ids(path)
        if not catalogue.known(rid)
    ]
    assert not unknown, "unknown rule IDs:\n" + "\n".join(unknown)


def test_unknown_rule_marker_is_a_collection_error(tmp_path: Path) -> None:
    """conventions §4: an unknown ID in @pytest.mark.rule stops the run before any test."""
    (tmp_path / "test_x.py").write_text(
        textwrap.dedent("""
        import pytest

        @pytest.mark.rule("SEG-3", "SEG-99")
        def test_a():
            pass
    """)
    )
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "blkif_spec.pytest_plugin", "-p", "no:cacheprovider",
         "-c", "/dev/null", "--rootdir", str(tmp_path), str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "SEG-99" in proc.stdout + proc.stderr
    assert "1 passed" not in proc.stdout
