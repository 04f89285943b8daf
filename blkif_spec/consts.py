"""Numeric constants of blkif.h, ring.h, xenbus.h and protocols.h.

Values are the compiled ones of inventory §1.1 / Appendix A; names follow the
C header so that a driver author can grep for them.
"""

from __future__ import annotations

from enum import IntEnum

PAGE_SIZE = 4096  # the ring "page" unit, whatever the guest's page size (WIRE-10)
SECTOR_SIZE = 512  # unit of sector_number, first/last_sect and `sectors` (SEG-4)
SECTORS_PER_PAGE = PAGE_SIZE // SECTOR_SIZE

BLKIF_MAX_SEGMENTS_PER_REQUEST = 11
BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST = 8
SEGMENT_SIZE = 8
SEGS_PER_INDIRECT_FRAME = PAGE_SIZE // SEGMENT_SIZE  # 512
BLKIF_MAX_INDIRECT_SEGMENTS = BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST * SEGS_PER_INDIRECT_FRAME

SRING_HEADER_SIZE = 64
MAX_RING_PAGE_ORDER = 4  # XENBUS_MAX_RING_GRANT_ORDER (MPR-5)
RING_IDX_MASK = 0xFFFFFFFF


class BlkifOp(IntEnum):
    READ = 0
    WRITE = 1
    WRITE_BARRIER = 2
    FLUSH_DISKCACHE = 3
    RESERVED_1 = 4
    DISCARD = 5
    INDIRECT = 6


class BlkifRsp(IntEnum):
    OKAY = 0
    ERROR = -1
    EOPNOTSUPP = -2


BLKIF_DISCARD_SECURE = 1

VDISK_CDROM = 1
VDISK_REMOVABLE = 2
VDISK_READONLY = 4


class XenbusState(IntEnum):
    Unknown = 0
    Initialising = 1
    InitWait = 2
    Initialised = 3
    Connected = 4
    Closing = 5
    Closed = 6
    Reconfiguring = 7
    Reconfigured = 8


X86_64_ABI = "x86_64-abi"
X86_32_ABI = "x86_32-abi"
ARM_ABI = "arm-abi"
ABIS: tuple[str, ...] = (X86_64_ABI, X86_32_ABI, ARM_ABI)

# protocol string -> ABI; the mapping is the identity for the three known strings
# (protocols.h), kept as a table so an unknown string is a lookup miss (DIV-10).
PROTOCOL_TO_ABI: dict[str, str] = {abi: abi for abi in ABIS}
