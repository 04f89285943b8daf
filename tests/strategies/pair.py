"""Strategies for reference-pair configurations: every feature combination the pair must serve."""

from __future__ import annotations

from hypothesis import strategies as st

from blkif_spec import consts
from blkif_spec.drivers.backend import BackendConfig
from blkif_spec.drivers.frontend import FrontendConfig

backend_configs = st.builds(
    BackendConfig,
    max_queues=st.integers(1, 4),
    max_ring_page_order=st.integers(0, consts.MAX_RING_PAGE_ORDER),
    max_indirect_segments=st.sampled_from([0, 16, 256]),
    persistent=st.booleans(),
    flush=st.booleans(),
    barrier=st.booleans(),
    discard=st.booleans(),
    discard_secure=st.booleans(),
)

frontend_configs = st.builds(
    FrontendConfig,
    max_queues=st.integers(1, 4),
    max_ring_page_order=st.integers(0, consts.MAX_RING_PAGE_ORDER),
    persistent=st.booleans(),
    max_indirect_segments=st.sampled_from([0, 32, 256]),
    protocol=st.sampled_from(consts.ABIS),
)
