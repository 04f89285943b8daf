"""Load XenStore tree fixtures (conventions §6) with errors that name the file and the field.

A fixture pairs a backend and a frontend tree (keys relative to the device
directories, values exact strings) with how it was obtained and what the
validator must say about it. The format is checked strictly, unknown fields
included, because a typo in `expect` would otherwise turn a fixture into a test
that always passes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from blkif_spec import catalogue

PROVENANCES = ("recorded", "transcribed", "hand-written")
FIELDS = frozenset({"source", "provenance", "paths", "backend", "frontend", "perms", "expect"})
REQUIRED = ("source", "provenance", "paths", "backend", "frontend", "expect")
#: The repository's fixture folder (present in a clone, not in an installed wheel).
FIXTURES_DIR = Path(__file__).resolve().parent.parent / "fixtures"
XENSTORE_DIR = FIXTURES_DIR / "xenstore"


class FixtureError(ValueError):
    """A fixture file that does not follow the conventions §6 format."""

    def __init__(self, path: Path | str, fieldname: str, problem: str) -> None:
        self.path = Path(path)
        self.field = fieldname
        self.problem = problem
        super().__init__(f"{self.path}: field {fieldname!r}: {problem}")


@dataclass(frozen=True, slots=True)
class Expect:
    valid: bool
    rules: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Fixture:
    name: str
    path: Path
    source: str
    provenance: str
    paths: Mapping[str, str]
    backend: Mapping[str, str]
    frontend: Mapping[str, str]
    expect: Expect
    perms: Mapping[str, str] = field(default_factory=dict)


def _string_map(path: Path, name: str, value: object, *, relative: bool) -> dict[str, str]:
    if not isinstance(value, dict):
        raise FixtureError(path, name, f"must be an object of strings, not {type(value).__name__}")
    for key, item in value.items():
        if not isinstance(item, str):
            raise FixtureError(path, f"{name}.{key}", f"value must be a string, not {item!r}")
        if relative and (key.startswith("/") or key.endswith("/") or key == ""):
            raise FixtureError(path, f"{name}.{key}", "keys are relative to the device directory")
    return dict(value)


def _paths(path: Path, value: object) -> dict[str, str]:
    paths = _string_map(path, "paths", value, relative=False)
    for side in ("backend", "frontend"):
        if not paths.get(side, "").startswith("/"):
            raise FixtureError(path, f"paths.{side}", "must be an absolute XenStore path")
    extra = set(paths) - {"backend", "frontend"}
    if extra:
        raise FixtureError(path, "paths", f"unknown keys {sorted(extra)}")
    return paths


def _expect(path: Path, value: object) -> Expect:
    if not isinstance(value, dict) or not isinstance(value.get("valid"), bool):
        raise FixtureError(path, "expect", 'must be {"valid": true} or {"valid": false, "rules": [...]}')
    extra = set(value) - {"valid", "rules"}
    if extra:
        raise FixtureError(path, "expect", f"unknown keys {sorted(extra)}")
    rules = value.get("rules", [])
    if not isinstance(rules, list) or not all(isinstance(r, str) for r in rules):
        raise FixtureError(path, "expect.rules", "must be a list of rule IDs")
    for rule in rules:
        if not catalogue.known(rule):
            raise FixtureError(path, "expect.rules", f"{rule!r} is not a catalogue rule ID")
    if value["valid"] and rules:
        raise FixtureError(path, "expect.rules", "a valid fixture lists no rules")
    if not value["valid"] and not rules:
        raise FixtureError(path, "expect.rules", "an invalid fixture names the rules it breaks")
    return Expect(value["valid"], tuple(rules))


def load_fixture(path: Path | str) -> Fixture:
    """Read and check one fixture file; FixtureError names the file and the field at fault."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as bad:
        raise FixtureError(path, "<file>", f"unreadable JSON: {bad}") from None
    if not isinstance(doc, dict):
        raise FixtureError(path, "<file>", "top level must be an object")
    for name in REQUIRED:
        if name not in doc:
            raise FixtureError(path, name, "missing")
    unknown = set(doc) - FIELDS
    if unknown:
        raise FixtureError(path, sorted(unknown)[0], f"unknown field (allowed: {sorted(FIELDS)})")
    if not isinstance(doc["source"], str) or not doc["source"].strip():
        raise FixtureError(path, "source", "must say where the trees come from")
    if doc["provenance"] not in PROVENANCES:
        raise FixtureError(path, "provenance", f"{doc['provenance']!r} is not one of {PROVENANCES}")
    return Fixture(
        name=path.stem,
        path=path,
        source=doc["source"],
        provenance=doc["provenance"],
        paths=_paths(path, doc["paths"]),
        backend=_string_map(path, "backend", doc["backend"], relative=True),
        frontend=_string_map(path, "frontend", doc["frontend"], relative=True),
        expect=_expect(path, doc["expect"]),
        perms=_string_map(path, "perms", doc.get("perms", {}), relative=False),
    )


def iter_fixtures(directory: Path | str = XENSTORE_DIR) -> Iterator[Fixture]:
    """Every `*.json` fixture in `directory`, sorted by name (a stable order for parametrising)."""
    for path in sorted(Path(directory).glob("*.json")):
        yield load_fixture(path)
