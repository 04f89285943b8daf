"""Backing stores for the reference backend: a small interface, in memory and as a sparse file.

Offsets and lengths are in bytes; the backend converts 512-byte sectors (SEG-4)
and enforces every range and read-only rule before it calls a store, so stores
only assert their own bounds (a bug in the backend must not corrupt data silently).
"""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path
from typing import Protocol

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


def _punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate a range with Linux fallocate(2); False where unsupported (then zero-fill)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fallocate = libc.fallocate
    except (OSError, AttributeError):
        return False
    fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong)
    mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    return fallocate(fd, mode, offset, length) == 0


class BackingStore(Protocol):
    """What the backend needs from a disk image."""

    @property
    def size(self) -> int:
        """Size in bytes."""
        ...

    def read(self, offset: int, length: int) -> bytes: ...
    def write(self, offset: int, data: bytes | memoryview) -> None: ...
    def flush(self) -> None: ...
    def discard(self, offset: int, length: int) -> None: ...
    def resize(self, size: int) -> None: ...
    def close(self) -> None: ...


def _check(store: BackingStore, offset: int, length: int) -> None:
    if offset < 0 or length < 0 or offset + length > store.size:
        raise ValueError(f"store access [{offset}, {offset + length}) outside [0, {store.size})")


class MemoryStore:
    """A disk in memory. `flushes` counts FLUSH calls so tests can observe ordering.

    `shared=True` keeps the disk in an anonymous shared mapping (`mmap(-1, size)`:
    MAP_SHARED|MAP_ANONYMOUS) instead of a bytearray, so ring workers forked by a
    backend (`BackendConfig(ring_workers="process")`) and their parent all see one
    disk. A shared store has a fixed size (`resize` refuses) and its `flushes`
    count is per process.
    """

    def __init__(self, size: int, *, shared: bool = False) -> None:
        self._data: bytearray | mmap.mmap = mmap.mmap(-1, size) if shared else bytearray(size)
        self.shared = shared
        self.flushes = 0

    @property
    def size(self) -> int:
        return len(self._data)

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > len(self._data):  # `_check`, inlined: hot path
            _check(self, offset, length)
        data = self._data[offset : offset + length]
        return data if type(data) is bytes else bytes(data)  # an mmap slice is already a bytes copy

    def write(self, offset: int, data: bytes | memoryview) -> None:
        end = offset + len(data)
        if offset < 0 or end > len(self._data):  # `_check`, inlined: hot path
            _check(self, offset, len(data))
        self._data[offset:end] = data

    def flush(self) -> None:
        self.flushes += 1

    def discard(self, offset: int, length: int) -> None:
        _check(self, offset, length)
        self._data[offset : offset + length] = bytes(length)

    def resize(self, size: int) -> None:
        data = self._data
        if not isinstance(data, bytearray):
            raise ValueError("a shared MemoryStore has a fixed size: forked workers map it as it is")
        if size < len(data):
            del data[size:]
        else:
            data.extend(bytes(size - len(data)))

    def close(self) -> None:
        if isinstance(self._data, mmap.mmap):
            self._data.close()
        self._data = bytearray()


class SparseFileStore:
    """A disk in a sparse file: FLUSH is fdatasync, DISCARD punches a hole (or writes zeros)."""

    def __init__(self, path: str | os.PathLike[str], size: int) -> None:
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        if os.fstat(self._fd).st_size != size:
            os.ftruncate(self._fd, size)
        self._size = size
        self.flushes = 0

    @property
    def size(self) -> int:
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        _check(self, offset, length)
        return os.pread(self._fd, length, offset)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        _check(self, offset, len(data))
        os.pwrite(self._fd, data, offset)

    def flush(self) -> None:
        os.fdatasync(self._fd)
        self.flushes += 1

    def discard(self, offset: int, length: int) -> None:
        _check(self, offset, length)
        if not _punch_hole(self._fd, offset, length):
            os.pwrite(self._fd, bytes(length), offset)

    def resize(self, size: int) -> None:
        os.ftruncate(self._fd, size)
        self._size = size

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
