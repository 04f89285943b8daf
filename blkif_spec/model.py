"""The sector-level oracle of I/O tests (conventions §10).

Reads return what was written; a discarded range reads back as the old data or
zeros (no guarantee) until it is written again, and later writes read back
exactly. Overlapping writes in flight at once may land in either order, so
callers only put non-overlapping writes in flight together.
"""

from __future__ import annotations

from blkif_spec.consts import SECTOR_SIZE


class SectorModel:
    """What each 512-byte sector must read back as."""

    def __init__(self, sectors: int) -> None:
        self.sectors = sectors
        self.known: list[bytes | None] = [bytes(SECTOR_SIZE)] * sectors
        self.before_discard: list[bytes] = [bytes(SECTOR_SIZE)] * sectors

    def write(self, sector: int, data: bytes) -> None:
        for i in range(len(data) // SECTOR_SIZE):
            self.known[sector + i] = data[i * SECTOR_SIZE : (i + 1) * SECTOR_SIZE]

    def discard(self, sector: int, count: int) -> None:
        for s in range(sector, sector + count):
            old = self.known[s]
            if old is not None:
                self.before_discard[s] = old
            self.known[s] = None

    def mismatches(self, sector: int, data: bytes) -> list[str]:
        """Every sector of a read that the model cannot explain, described; empty when all agree."""
        out = []
        for i in range(len(data) // SECTOR_SIZE):
            got = data[i * SECTOR_SIZE : (i + 1) * SECTOR_SIZE]
            want = self.known[sector + i]
            allowed = (bytes(SECTOR_SIZE), self.before_discard[sector + i]) if want is None else (want,)
            if got not in allowed:
                what = "zeros or the data before the discard" if want is None else f"{want[:8].hex()}…"
                out.append(f"sector {sector + i}: read {got[:8].hex()}…, expected {what}")
        return out


def pattern(seed: int, sector: int, count: int) -> bytes:
    """Distinct bytes per sector and per write, so a misplaced or stale sector is visible."""
    return b"".join(((seed * 7919 + sector + i) % 2**32).to_bytes(4, "little") * (SECTOR_SIZE // 4)
                    for i in range(count))  # fmt: skip
