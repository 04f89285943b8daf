"""Wire layout: the C header a driver is built against has the layouts of the spec.

Give a driver tree's own header with `--blkif-header=PATH` (Xen's public header
or a Linux tree's `include/xen/interface/io/blkif.h`); the default is libxen-dev's.
Every size, offset, signedness and constant is compared with `blkif_spec.wire`.
"""

from __future__ import annotations

import pytest

from blkif_spec import consts
from blkif_spec.pytest_plugin import require_abi

#: Numbers of inventory §1.1 the header must show, beside the full comparison.
KEY_NUMBERS = {
    consts.X86_64_ABI: {("blkif_request", "size"): 112, ("blkif_request.id", "offset"): 8,
                        ("blkif_response", "size"): 16, ("blkif_request_indirect", "size"): 64},
    consts.X86_32_ABI: {("blkif_request", "size"): 108, ("blkif_request.id", "offset"): 4,
                        ("blkif_response", "size"): 12, ("blkif_request_indirect", "size"): 64},
}  # fmt: skip


@pytest.mark.rule("WIRE-1", "WIRE-3", "WIRE-4", "WIRE-7", "WIRE-8", "OP-1", "OP-6")
@pytest.mark.parametrize("abi", sorted(KEY_NUMBERS))
def test_header_layout_matches_the_spec(blkif_layout, abi: str) -> None:
    require_abi(blkif_layout, abi)
    checks = blkif_layout.checks_for(abi)
    bad = [c.describe() for c in checks if not c.ok]
    assert not bad, (
        f"WIRE-1 the header's layouts are the spec's\n  expected: blkif_spec.wire for {abi}\n"
        f"  observed: {blkif_layout.header} differs:\n    " + "\n    ".join(bad)
    )
    seen = {(c.subject.split(" [")[0], c.kind): c.observed for c in checks}
    for key, value in KEY_NUMBERS[abi].items():
        assert seen.get(key) == value, f"WIRE-3 {key}: expected {value}, observed {seen.get(key)}"
