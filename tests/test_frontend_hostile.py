"""The reference frontend never trusts the backend (inventory §8.2, DIV-22).

Hostile responses are written into the frontend's ring the way a broken backend
would: at the current response producer, then `rsp_prod` moved. Each one must
be detected with its rule ID, and the frontend must stop using the device.
"""

from __future__ import annotations

import pytest

from blkif_spec import consts
from blkif_spec.consts import BlkifOp, BlkifRsp
from blkif_spec.drivers.frontend import DeviceDisabled, Frontend, FrontendConfig
from blkif_spec.factory import SlotFactory
from blkif_spec.pair import ReferencePair
from blkif_spec.xen.sim import SimXen

READ = int(BlkifOp.READ)
RID = 0xBAD0_0000


def inject(fe: Frontend, responses: list[bytes], *, extra: int = 0, queue: int = 0) -> None:
    """Write responses at `rsp_prod` and publish them (plus `extra` empty slots), then notify."""
    shared = fe._queues[queue].ring.shared
    prod = shared.rsp_prod
    for i, rsp in enumerate(responses):
        shared.write_slot(prod + i, rsp)
    shared.rsp_prod = (prod + len(responses) + extra) & 0xFFFFFFFF


def unpushed_request(fe: Frontend, slots: SlotFactory, rid: int = RID) -> None:
    """A request the backend never sees (req_prod not published), so only our response answers it."""
    q = fe._queues[0]
    fe.raw_request(slots.rw(READ, rid, 0, []), operation=READ)
    q.ring.req_prod_pvt = (q.ring.req_prod_pvt - 1) & 0xFFFFFFFF  # keep it private


CASES = {
    "SEC-21 unknown id": lambda fe, f: [f.response(0xFEED, READ, 0)],
    "SEC-21 duplicate id": lambda fe, f: [f.response(RID, READ, 0), f.response(RID, READ, 0)],
    "SEC-21 wrong operation": lambda fe, f: [f.response(RID, int(BlkifOp.WRITE), 0)],
    "OP-6 status outside the spec": lambda fe, f: [f.response(RID, READ, 5)],
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_response_disables_the_device(sim_xen: SimXen, name: str) -> None:
    with ReferencePair(sim_xen, frontend_config=FrontendConfig(max_queues=1)) as pair:
        pair.connect()
        fe = pair.frontend
        slots = SlotFactory(fe.config.protocol)
        unpushed_request(fe, slots)
        inject(fe, CASES[name](fe, slots))
        fe.poll()
        assert fe.disabled and fe.violations[0].rule_id == name.split()[0], fe.violations
        with pytest.raises(DeviceDisabled):
            fe.read(0, 8)


def test_response_producer_past_the_ring(sim_xen: SimXen) -> None:
    """RING-9: rsp_prod - rsp_cons > RING_SIZE is an ill-behaved backend."""
    with ReferencePair(sim_xen, frontend_config=FrontendConfig(max_queues=1, max_ring_page_order=0)) as pair:
        pair.connect()
        fe = pair.frontend
        inject(fe, [], extra=33)
        fe.poll()
        assert fe.disabled and fe.violations[0].rule_id == "RING-9"


def test_good_responses_after_a_violation_are_not_processed(sim_xen: SimXen) -> None:
    """DIV-22: once disabled, no further responses are consumed."""
    with ReferencePair(sim_xen, frontend_config=FrontendConfig(max_queues=1)) as pair:
        pair.connect()
        fe = pair.frontend
        slots = SlotFactory(consts.X86_64_ABI)
        unpushed_request(fe, slots)
        inject(fe, [slots.response(0xFEED, READ, 0), slots.response(RID, READ, int(BlkifRsp.OKAY))])
        fe.poll()
        assert fe.disabled and len(fe.violations) == 1
        assert fe._queues[0].pending[RID].done is None
