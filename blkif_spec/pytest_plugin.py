"""The suite's pytest plugin: options, markers, hypothesis profiles, rule-ID checks.

Registered once, by the root `conftest.py` (`pytest_plugins`); a `pytest11`
entry point as well would make pytest abort with "option already added".
Option names follow conventions §2; a wrong value is a usage error naming the
option and the accepted values, raised before any test runs.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, settings

from blkif_spec import catalogue, consts

DEFAULT_HEADER = Path("/usr/include/xen/io/blkif.h")
_TARGET = re.compile(r"^(reference|live|[A-Za-z_][\w.]*:[A-Za-z_]\w*)$")

# Profiles are registered at import, before hypothesis' own plugin applies
# --hypothesis-profile in pytest_configure; `ci` is the default (conventions §8).
settings.register_profile(
    "ci", derandomize=True, database=None, deadline=None, print_blob=True, max_examples=50,
    suppress_health_check=[HealthCheck.too_slow],
)  # fmt: skip
settings.register_profile("dev", max_examples=15, deadline=None, print_blob=True)
settings.register_profile("thorough", max_examples=1000, deadline=None, print_blob=True)
settings.register_profile(
    "live", max_examples=5, deadline=None, derandomize=True, database=None, print_blob=True,
    suppress_health_check=list(HealthCheck),
)  # fmt: skip
settings.register_profile(
    "selfcheck", max_examples=10, deadline=None, derandomize=True, database=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate], suppress_health_check=list(HealthCheck),
)  # fmt: skip
settings.load_profile("ci")


def _target(value: str) -> str:
    if not _TARGET.match(value):
        raise pytest.UsageError(
            f"--backend/--frontend: {value!r} is not one of reference, live or MODULE:FACTORY"
        )
    return value


def _abi(value: str) -> str:
    if value not in consts.ABIS:
        raise pytest.UsageError(f"--blkif-abi: {value!r} is not one of {', '.join(consts.ABIS)}")
    return value


def _timeout(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise pytest.UsageError(f"--blkif-timeout: {value!r} is not a positive number of seconds")
    return seconds


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("blkif", "blkif conformance")
    group.addoption("--backend", default="reference", type=_target,
                    help="backend under test: reference (default), live, or MODULE:FACTORY")  # fmt: skip
    group.addoption("--frontend", default="reference", type=_target,
                    help="frontend under test: reference (default), live, or MODULE:FACTORY")  # fmt: skip
    group.addoption("--blkif-strict", action="store_true", dest="blkif_strict",
                    help="also enforce SHOULD rules (report them as failures)")  # fmt: skip
    group.addoption("--blkif-timeout", type=_timeout, default=None,
                    help="bound on every wait on a target, s (default 2 simulated, 10 live)")  # fmt: skip
    group.addoption("--blkif-abi", type=_abi, default=consts.X86_64_ABI, dest="blkif_abi",
                    help="ABI the suite's own peer speaks: " + ", ".join(consts.ABIS))  # fmt: skip
    group.addoption("--blkif-header", type=Path, default=None, dest="blkif_header",
                    help=f"C blkif.h for the layout check (default {DEFAULT_HEADER})")  # fmt: skip
    group.addoption("--conformance-report", type=Path, default=None, dest="conformance_report",
                    help="write report.json and report.md into this directory")  # fmt: skip
    group.addoption("--known-failures", type=Path, default=None, dest="known_failures",
                    help="TOML file of accepted divergences")  # fmt: skip


def pytest_configure(config: pytest.Config) -> None:
    for line in (
        "rule(*ids): the inventory rule IDs a test checks; levels come from the catalogue",
        "role(name): the role under test, backend or frontend",
        "needs(*features): features the target must offer, else SKIP with the reason",
    ):
        config.addinivalue_line("markers", line)


def rule_ids(item: pytest.Item) -> tuple[str, ...]:
    """The rule IDs of every `rule` marker on a test, in order."""
    return tuple(rid for mark in item.iter_markers("rule") for rid in mark.args)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """An unknown rule ID in a marker is a collection error, not a silently untested rule."""
    bad = [f"{item.nodeid}: {rid!r}" for item in items for rid in rule_ids(item) if not catalogue.known(rid)]
    if bad:
        raise pytest.UsageError("unknown rule IDs in @pytest.mark.rule (not in the catalogue):\n  "
                                + "\n  ".join(bad))  # fmt: skip


# -- the C header under review (layout check, WIRE-1/3/4) --------------------------------------


def multilib_expected() -> bool:
    """Whether -m32 must work here: in CI, or where gcc-multilib is installed (Debian)."""
    return bool(os.environ.get("CI")) or any(Path("/var/lib/dpkg/info").glob("gcc-multilib*.list"))


@pytest.fixture(scope="session")
def blkif_header(request: pytest.FixtureRequest) -> Path:
    """`--blkif-header`, or libxen-dev's header; SKIP only when gcc or the default header is missing."""
    option = request.config.getoption("blkif_header", default=None)
    path = Path(option) if option else DEFAULT_HEADER
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed (apt-get install gcc): the layout check needs a C compiler")
    if not path.is_file():
        if option:
            pytest.fail(f"--blkif-header {path}: no such file")
        pytest.skip(f"{path} not found: install libxen-dev, or pass --blkif-header=PATH")
    return path.resolve()


@pytest.fixture(scope="session")
def blkif_layout(blkif_header: Path):
    """The layout check of the header under review, run once per session."""
    from blkif_spec import layout

    return layout.check_header(blkif_header)


def require_abi(result, abi: str) -> None:
    """Skip an ABI the host cannot build, except x86_32 where gcc-multilib is installed (CI)."""
    if abi in result.abis:
        return
    reason = result.skipped_abis.get(abi, "not checked")
    if abi == consts.X86_32_ABI and multilib_expected():
        pytest.fail(f"gcc-multilib is installed but x86_32-abi was not checked: {reason}")
    pytest.skip(f"{abi}: {reason}")
