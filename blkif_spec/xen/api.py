"""The abstract Xen services a blkif driver needs: XenStore, grant table, event channels.

The reference frontend and backend are written against these Protocols only,
so the same driver code runs on the simulated Xen (`blkif_spec.xen.sim`) and on
a real host (`blkif_spec.xen.live`). Every call that can block takes a timeout
and raises `XenTimeout` when it expires: nothing waits forever.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Protocol, TypeVar, runtime_checkable

PAGE_SIZE = 4096
T = TypeVar("T")


class XenError(Exception):
    """A Xen service refused an operation (permission, unknown grant or port, ...)."""


class XenTimeout(XenError):
    """A bounded wait expired. The message names what was waited for."""


class XenStoreError(XenError):
    """A XenStore error reply; `name` is the wire error name (ENOENT, EACCES, EAGAIN, ...)."""

    def __init__(self, name: str, op: str = "", path: str = "") -> None:
        self.name = name
        self.op = op
        self.path = path
        super().__init__(f"{op} {path}: {name}".strip())


@runtime_checkable
class XenStoreTxn(Protocol):
    """Reads and writes inside one transaction (committed when the context exits cleanly)."""

    def read(self, path: str) -> str | None: ...
    def write(self, path: str, value: str) -> None: ...
    def mkdir(self, path: str) -> None: ...
    def rm(self, path: str) -> None: ...
    def directory(self, path: str) -> list[str]: ...
    def set_perms(self, path: str, perms: Sequence[str]) -> None: ...


@runtime_checkable
class Watch(Protocol):
    """A registered watch. The first event (the initial fire, XS-14) is already queued."""

    path: str
    token: str

    def wait(self, timeout: float) -> str | None:
        """The next event's path, or None if none arrived within `timeout` seconds."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class XenStore(Protocol):
    """One domain's XenStore connection. `read` returns None for a missing node."""

    domid: int

    def read(self, path: str) -> str | None: ...
    def write(self, path: str, value: str) -> None: ...
    def mkdir(self, path: str) -> None: ...
    def rm(self, path: str) -> None: ...
    def directory(self, path: str) -> list[str]: ...
    def get_perms(self, path: str) -> list[str]: ...
    def set_perms(self, path: str, perms: Sequence[str]) -> None: ...
    def watch(self, path: str, token: str) -> Watch: ...
    def transaction(self) -> AbstractContextManager[XenStoreTxn]: ...
    def transact(self, body: Callable[[XenStoreTxn], T], attempts: int = 8) -> T:
        """Run `body` in a transaction, retried on EAGAIN (XS-16) up to `attempts` times."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class Mapping(Protocol):
    """Foreign pages mapped into this domain: a contiguous buffer over them.

    A mapping may also offer `ring(order, entry_size) -> SharedRing`, the ring to use
    over it (the simulated host's recorded mappings do, for SEC-1); drivers fall back
    to `SharedRing(buf, ...)` when it is absent.
    """

    buf: memoryview
    readonly: bool

    def unmap(self) -> None: ...


@runtime_checkable
class Pages(Protocol):
    """Pages a domain owns: a contiguous buffer and the frame number of each page."""

    buf: memoryview
    frames: tuple[int, ...]

    def page(self, i: int) -> memoryview:
        """The i-th 4096-byte page of `buf`."""
        ...


@runtime_checkable
class GrantTable(Protocol):
    """Grant table of one domain: offer own pages to a peer, map a peer's grants."""

    domid: int

    def alloc_pages(self, count: int = 1) -> Pages:
        """`count` zeroed pages, contiguous, shareable (SEC-24: zeroed at allocation)."""
        ...

    def free_pages(self, pages: Pages) -> None: ...

    def grant(self, peer: int, frame: int, *, readonly: bool) -> int:
        """Offer one own frame (from `Pages.frames`) to `peer`; returns the grant reference."""
        ...

    def revoke(self, gref: int) -> bool:
        """End foreign access; False (grant kept) if the peer still has it mapped (SEC-23)."""
        ...

    def map(self, peer: int, grefs: Sequence[int], *, readonly: bool) -> Mapping:
        """Map `peer`'s grants as one contiguous buffer, in order (multi-page rings, WIRE-10)."""
        ...

    def copy_from(self, peer: int, gref: int, offset: int, length: int) -> bytes:
        """Grant copy out of a peer's page (QEMU-style, no mapping)."""
        ...

    def copy_to(self, peer: int, gref: int, offset: int, data: bytes) -> None: ...


@runtime_checkable
class EventChannels(Protocol):
    """Event channels of one domain."""

    domid: int

    def alloc_unbound(self, remote: int) -> int: ...
    def bind_interdomain(self, remote: int, remote_port: int) -> int: ...
    def notify(self, port: int) -> None: ...

    def wait(self, timeout: float) -> list[int]:
        """Ports with pending events (cleared on return); [] after `timeout` seconds."""
        ...

    def unbind(self, port: int) -> None: ...
    def open(self) -> EventChannels:
        """A separate handle whose ports' events go to it only (one per driver instance)."""
        ...

    def close(self) -> None: ...
    def fileno(self) -> int:
        """A descriptor readable when an event is pending (for select/poll loops)."""
        ...


class XenServices(Protocol):
    """What one domain's driver gets: its domid and the three services."""

    domid: int
    store: XenStore
    grants: GrantTable
    evtchn: EventChannels

    def close(self) -> None: ...
