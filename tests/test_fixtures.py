"""The XenStore fixtures (conventions §6): recorded trees validate clean, broken ones give their rules."""

from __future__ import annotations

import json

import pytest

from blkif_spec.fixtures import XENSTORE_DIR, FixtureError, iter_fixtures, load_fixture
from blkif_spec.xenbus import negotiate, validate

FIXTURES = list(iter_fixtures())
RECORDED = [f for f in FIXTURES if f.provenance == "recorded"]
BROKEN = [f for f in FIXTURES if not f.expect.valid]


def test_the_fixture_set_is_complete():
    names = {f.name for f in FIXTURES}
    assert {
        "linux-6.1-blkback-initwait",
        "linux-6.1-pair-connected-2q",
        "linux-6.1-userspace-closed",
    } <= names
    assert len(BROKEN) >= 10
    assert all(f.provenance == "hand-written" for f in BROKEN)


@pytest.mark.parametrize("fixture", RECORDED, ids=lambda f: f.name)
def test_recorded_fixtures_validate_clean(fixture):
    assert fixture.expect.valid
    assert validate(fixture.frontend, fixture.backend) == []


@pytest.mark.parametrize("fixture", BROKEN, ids=lambda f: f.name)
def test_broken_fixtures_give_exactly_their_rules(fixture):
    found = {f.rule for f in validate(fixture.frontend, fixture.backend)}
    assert found == set(fixture.expect.rules)


@pytest.mark.parametrize("fixture", FIXTURES, ids=lambda f: f.name)
def test_fixture_trees_point_at_each_other(fixture):
    """XK-2: each side names the other's directory, as the `paths` field records them."""
    if "frontend" in fixture.backend:
        assert fixture.backend["frontend"] == fixture.paths["frontend"]
    if "backend" in fixture.frontend:
        assert fixture.frontend["backend"] == fixture.paths["backend"]


def test_the_recorded_connected_pair():
    (pair,) = [f for f in FIXTURES if f.name == "linux-6.1-pair-connected-2q"]
    assert (pair.backend["state"], pair.frontend["state"]) == ("4", "4")
    n = negotiate(pair.frontend, pair.backend)
    assert (n.queues, n.persistent, n.max_indirect_segments) == (2, True, 256)


def test_the_recorded_initwait_pair():
    (pair,) = [f for f in FIXTURES if f.name == "linux-6.1-blkback-initwait"]
    assert (pair.backend["state"], pair.frontend["state"]) == ("2", "1")
    assert pair.paths["backend"].endswith("/51712")


# --------------------------------------------------------------------------- malformed files

GOOD = {
    "source": "test",
    "provenance": "hand-written",
    "paths": {
        "backend": "/local/domain/0/backend/vbd/1/51712",
        "frontend": "/local/domain/1/device/vbd/51712",
    },
    "backend": {"state": "1"},
    "frontend": {"state": "1"},
    "expect": {"valid": True},
}


@pytest.mark.parametrize(
    "change, field",
    [
        ({"source": ""}, "source"),
        ({"provenance": "guessed"}, "provenance"),
        ({"backend": []}, "backend"),
        ({"frontend": {"state": 1}}, "frontend.state"),
        ({"backend": {"/abs": "1"}}, "backend./abs"),
        ({"paths": {"backend": "rel"}}, "paths.backend"),
        ({"expect": {"valid": "yes"}}, "expect"),
        ({"expect": {"valid": False}}, "expect.rules"),
        ({"expect": {"valid": False, "rules": ["XK-99"]}}, "expect.rules"),
        ({"expect": {"valid": True, "rules": ["XK-4"]}}, "expect.rules"),
        ({"extra": 1}, "extra"),
        ({"expect": {"valid": True, "rule": []}}, "expect"),
        ({"perms": {"state": 5}}, "perms.state"),
    ],
)
def test_malformed_fixtures_name_file_and_field(tmp_path, change, field):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({**GOOD, **change}))
    with pytest.raises(FixtureError) as caught:
        load_fixture(path)
    assert caught.value.field == field and caught.value.path == path
    assert str(path) in str(caught.value) and repr(field) in str(caught.value)


@pytest.mark.parametrize("missing", ["source", "provenance", "paths", "backend", "frontend", "expect"])
def test_missing_fields_are_named(tmp_path, missing):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({k: v for k, v in GOOD.items() if k != missing}))
    with pytest.raises(FixtureError, match=missing):
        load_fixture(path)


@pytest.mark.parametrize("text", ["{", "[]", "\xff"])
def test_unreadable_files_are_named(tmp_path, text):
    path = tmp_path / "bad.json"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(FixtureError) as caught:
        load_fixture(path)
    assert caught.value.path == path


def test_a_good_file_loads(tmp_path):
    path = tmp_path / "good.json"
    path.write_text(json.dumps({**GOOD, "perms": {".": "n0 r1"}}))
    fixture = load_fixture(path)
    assert (fixture.name, fixture.expect.valid, fixture.perms) == ("good", True, {".": "n0 r1"})
    assert [f.name for f in iter_fixtures(tmp_path)] == ["good"]


def test_the_fixture_folder_is_in_the_repository():
    assert XENSTORE_DIR.is_dir()
