"""Raw ring slots, built from the derived codecs: any request or response, valid or not.

h2's `FrameFactory` for blkif: hostile-input tests and the suite's raw layer build
slots here, so no test hand-packs bytes. Nothing is validated: a factory must be
able to say what a broken peer says (nr_segments 200, last_sect 9, op 99, …).
"""

from __future__ import annotations

from collections.abc import Sequence

from blkif_spec import codec, consts

Seg = tuple[int, int, int]  # (gref, first_sect, last_sect)


class SlotFactory:
    """Request and response slots of one ABI, padded to the ring entry size."""

    def __init__(self, abi: str) -> None:
        self.codecs = codec.codecs(abi)
        self.entry_size = self.codecs.abi.entry_size

    @staticmethod
    def _pack(c: codec.Codec, values: dict) -> bytes:
        obj = c.to_container(c.unpack_from(bytes(c.size)))
        for key, value in values.items():
            obj[key] = value
        return c.pack(*c.from_container(obj))

    def rw(self, op: int, rid: int, sector: int, segs: Sequence[Seg], *, nr_segments: int | None = None,
           handle: int = 0) -> bytes:  # fmt: skip
        """READ/WRITE/BARRIER/FLUSH; `nr_segments` may lie about `segs` (SEG-1 tests)."""
        seg_list = [{"gref": g, "first_sect": f, "last_sect": la, "_pad0": b"\0\0"} for g, f, la in segs]
        seg_list += [{"gref": 0, "first_sect": 0, "last_sect": 0, "_pad0": b"\0\0"}] * (
            consts.BLKIF_MAX_SEGMENTS_PER_REQUEST - len(seg_list))  # fmt: skip
        values = {"operation": op, "nr_segments": len(segs) if nr_segments is None else nr_segments,
                  "handle": handle, "id": rid, "sector_number": sector,
                  "seg": seg_list[: consts.BLKIF_MAX_SEGMENTS_PER_REQUEST]}  # fmt: skip
        return self._pack(self.codecs.request_rw, values).ljust(self.entry_size, b"\0")

    def discard(self, rid: int, sector: int, nr_sectors: int, *, flag: int = 0, handle: int = 0) -> bytes:
        values = {"operation": consts.BlkifOp.DISCARD, "flag": flag, "handle": handle, "id": rid,
                  "sector_number": sector, "nr_sectors": nr_sectors}  # fmt: skip
        return self._pack(self.codecs.request_discard, values).ljust(self.entry_size, b"\0")

    def indirect(self, indirect_op: int, rid: int, sector: int, nr_segments: int, grefs: Sequence[int],
                 *, handle: int = 0) -> bytes:  # fmt: skip
        refs = list(grefs) + [0] * (consts.BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST - len(grefs))
        values = {"operation": consts.BlkifOp.INDIRECT, "indirect_op": indirect_op,
                  "nr_segments": nr_segments, "id": rid, "sector_number": sector, "handle": handle,
                  "indirect_grefs": refs}  # fmt: skip
        return self._pack(self.codecs.request_indirect, values).ljust(self.entry_size, b"\0")

    def other(self, op: int, rid: int, fill: bytes = b"\0") -> bytes:
        """Any operation byte with an id: what a backend must answer even for unknown ops (DIV-1)."""
        return self._pack(self.codecs.request_other, {"operation": op, "id": rid}).ljust(
            self.entry_size, fill
        )

    def segments_page(self, segs: Sequence[Seg]) -> bytes:
        """One indirect page of segment descriptors (IND-3), zero after the last."""
        seg = self.codecs.segment
        return b"".join(seg.pack(g, f, la, b"\0\0") for g, f, la in segs).ljust(consts.PAGE_SIZE, b"\0")

    def response(self, rid: int, op: int, status: int) -> bytes:
        values = {"id": rid, "operation": op, "status": status}
        return self._pack(self.codecs.response, values)
