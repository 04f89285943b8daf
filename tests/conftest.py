"""Fixtures of the project's own tests (the suite's plugin is registered by the root conftest)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from blkif_spec.xen.sim import SimXen


@pytest.fixture(scope="module")
def sim_xen() -> Iterator[SimXen]:
    """One simulated host per module; each pair on it gets a fresh device id."""
    with SimXen() as xen:
        yield xen
