"""blkif wire structures as construct definitions: the readable single source of truth.

One factory per structure, parametrised by ABI (style anchor §5, construct's
`gallery/elf.py`). Every padding byte is a named `Bytes` field (`_padN`), so a
parsed request or response shows what the peer left there: that is how the
response-leak rule (SEC-5, XSA-216) and the uncleared-page rule (SEC-24) are
checked. Layouts and sizes are those of inventory §1.1 and Appendix A, verified
against a real C header by `blkif_spec.layout`.

The x86_32 ABI differs only in the alignment of 64-bit fields (WIRE-3): they are
4-byte aligned, so the 4 bytes of padding before `id` disappear.

Construct is the spec, not the hot path: `blkif_spec.codec` derives `struct`
codecs from these definitions, and a property test keeps them byte-identical.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from construct import (
    Array,
    Bytes,
    Construct,
    Default,
    Int8ul,
    Int16sl,
    Int16ul,
    Int32ul,
    Int64ul,
    Struct,
)

from blkif_spec import consts
from blkif_spec.consts import BlkifOp

#: `grant_ref_t` is uint32 (WIRE-7); `blkif_sector_t` uint64; `blkif_vdev_t` uint16.
GrantRef = Int32ul
Sector = Int64ul
Vdev = Int16ul


def pad(n: int) -> Construct:
    """Padding that stays visible when parsed and is built as zeros by default."""
    return Default(Bytes(n), bytes(n))


def _aligned64(abi: str) -> bool:
    """Whether 64-bit fields are 8-byte aligned: yes except on x86_32 (WIRE-3)."""
    if abi not in consts.ABIS:
        raise ValueError(f"unknown ABI {abi!r}: expected one of {', '.join(consts.ABIS)} (WIRE-2)")
    return abi != consts.X86_32_ABI


def _pad_to_8(abi: str, name: str, n: int) -> tuple:
    """Fields inserted before a 64-bit member on 8-byte-aligned ABIs only."""
    return (name / pad(n),) if _aligned64(abi) else ()


#: struct blkif_request_segment: identical on all ABIs (size 8, align 4).
segment = Struct(
    "gref" / GrantRef,
    "first_sect" / Int8ul,  # first 512-byte sector of the frame, inclusive (SEG-3)
    "last_sect" / Int8ul,  # last 512-byte sector of the frame, inclusive
    "_pad0" / pad(2),
)


@cache
def request_rw(abi: str) -> Struct:
    """struct blkif_request: READ, WRITE, WRITE_BARRIER, FLUSH_DISKCACHE."""
    return Struct(
        "operation" / Int8ul,
        "nr_segments" / Int8ul,
        "handle" / Vdev,
        *_pad_to_8(abi, "_pad0", 4),
        "id" / Int64ul,
        "sector_number" / Sector,
        "seg" / Array(consts.BLKIF_MAX_SEGMENTS_PER_REQUEST, segment),
    )


@cache
def request_discard(abi: str) -> Struct:
    """struct blkif_request_discard (operation 5, DISC-1)."""
    return Struct(
        "operation" / Int8ul,
        "flag" / Int8ul,  # BLKIF_DISCARD_SECURE = bit 0 (DISC-3)
        "handle" / Vdev,
        *_pad_to_8(abi, "_pad0", 4),
        "id" / Int64ul,
        "sector_number" / Sector,
        "nr_sectors" / Sector,
    )


@cache
def request_indirect(abi: str) -> Struct:
    """struct blkif_request_indirect (operation 6): 64 bytes on every ABI (WIRE-4)."""
    return Struct(
        "operation" / Int8ul,
        "indirect_op" / Int8ul,  # READ or WRITE only (IND-2)
        "nr_segments" / Int16ul,  # uint16, unlike the direct form
        *_pad_to_8(abi, "_pad0", 4),
        "id" / Int64ul,
        "sector_number" / Sector,
        "handle" / Vdev,
        "_pad1" / pad(2),
        "indirect_grefs" / Array(consts.BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST, GrantRef),
        # x86_64/arm: 4 bytes of tail padding; i386: an explicit uint64 `pad`.
        "_pad2" / pad(4 if _aligned64(abi) else 8),
    )


@cache
def request_other(abi: str) -> Struct:
    """The common prefix of every request: all a backend may read of an unknown op (DIV-1)."""
    return Struct(
        "operation" / Int8ul,
        "_pad0" / pad(7 if _aligned64(abi) else 3),
        "id" / Int64ul,
    )


@cache
def response(abi: str) -> Struct:
    """struct blkif_response: only id, operation and status carry data (WIRE-5, SEC-5)."""
    fields = [
        "id" / Int64ul,
        "operation" / Int8ul,
        "_pad0" / pad(1),
        "status" / Int16sl,
    ]
    if _aligned64(abi):
        fields.append("_pad1" / pad(4))  # tail padding to the 8-byte alignment
    return Struct(*fields)


#: A frame of indirect segment descriptors: 512 segments per 4 KiB page (IND-3).
indirect_page = Struct("seg" / Array(consts.SEGS_PER_INDIRECT_FRAME, segment))

#: struct blkif_sring's 64-byte header (WIRE-8). Xen spells the tail pvt + __pad[44].
sring_header = Struct(
    "req_prod" / Int32ul,
    "req_event" / Int32ul,
    "rsp_prod" / Int32ul,
    "rsp_event" / Int32ul,
    "pvt" / pad(4),
    "_pad0" / pad(44),
)


def request_form(operation: int) -> str:
    """The name of the request structure a slot with this operation byte holds."""
    if operation in (BlkifOp.READ, BlkifOp.WRITE, BlkifOp.WRITE_BARRIER, BlkifOp.FLUSH_DISKCACHE):
        return "rw"
    if operation == BlkifOp.DISCARD:
        return "discard"
    if operation == BlkifOp.INDIRECT:
        return "indirect"
    return "other"


@dataclass(frozen=True)
class Abi:
    """All structures of one ABI, plus the sizes derived from them."""

    name: str
    segment: Struct
    request_rw: Struct
    request_discard: Struct
    request_indirect: Struct
    request_other: Struct
    response: Struct
    indirect_page: Struct
    sring_header: Struct

    @property
    def entry_size(self) -> int:
        """sizeof(union blkif_sring_entry): the ring slot (WIRE-1)."""
        return max(self.request_rw.sizeof(), self.response.sizeof())

    def request(self, form: str) -> Struct:
        return getattr(self, f"request_{form}")

    def structures(self) -> dict[str, Struct]:
        """Every structure by name, for parity tests, the codec and the layout check."""
        names = ("segment", "request_rw", "request_discard", "request_indirect", "request_other",
                 "response", "indirect_page", "sring_header")  # fmt: skip
        return {name: getattr(self, name) for name in names}

    def parse_request(self, slot: bytes):
        """Parse a ring slot as the request form its operation byte selects."""
        return self.request(request_form(slot[0])).parse(slot)


@cache
def abi(name: str) -> Abi:
    """The structures of ABI `name` (`x86_64-abi`, `x86_32-abi`, `arm-abi`)."""
    _aligned64(name)  # validates the name
    return Abi(
        name=name,
        segment=segment,
        request_rw=request_rw(name),
        request_discard=request_discard(name),
        request_indirect=request_indirect(name),
        request_other=request_other(name),
        response=response(name),
        indirect_page=indirect_page,
        sring_header=sring_header,
    )


def abi_for_protocol(protocol: str | None, *, host_is_x86: bool = True) -> Abi:
    """The ABI a backend must speak for a frontend's `protocol` key (WIRE-2).

    Absent `protocol` means x86_32 on an x86 host as Linux and QEMU read it (DIV-9);
    an unknown string raises ValueError (DIV-10: a backend may refuse it).
    """
    if protocol is None:
        return abi(consts.X86_32_ABI if host_is_x86 else consts.ARM_ABI)
    try:
        return abi(consts.PROTOCOL_TO_ABI[protocol])
    except KeyError:
        raise ValueError(f"unknown protocol {protocol!r} (DIV-10)") from None
