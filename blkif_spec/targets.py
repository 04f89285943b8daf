"""The one seam between the suite and an implementation under test (conventions §3).

A target is what a factory returns. `--backend=MODULE:FACTORY` (or
`--frontend=…`) names a callable `factory(xen, config) -> target`, called with
the target domain's `XenServices` and a `TargetConfig`. The suite then observes
the target only as a real peer would: XenStore nodes and watches, ring pages,
grants and event channels, plus, for a frontend, the block API below that the
suite uses to make it do I/O. Tests never reach into a target's objects.

`reference` is the reference backend or frontend of `blkif_spec.drivers`;
`live` is a real Xen host's own driver (`blkif_spec.live`): the plugin builds
its environment from the `--xen-*` options instead of calling a factory.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from blkif_spec.drivers.backend import Backend, BackendConfig
from blkif_spec.drivers.frontend import Completion, Frontend, FrontendConfig
from blkif_spec.drivers.store import BackingStore
from blkif_spec.toolstack import Vbd
from blkif_spec.xen.api import XenServices


@dataclass
class TargetConfig:
    """What the suite tells a target: where its device is, its disk, how long the suite waits.

    `options` are requests a target may honour (`max_queues`, `max_ring_page_order`,
    `persistent`, `max_indirect_segments`, …), as module parameters are for Linux.
    """

    vbd: Vbd
    timeout: float = 2.0
    store: BackingStore | None = None  # a backend's disk (simulation)
    readonly: bool = False
    options: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class BackendTarget(Protocol):
    """A backend under test: serves the vbd whose directories the suite (toolstack) created."""

    name: str
    versions: dict[str, str]

    def start(self) -> None:
        """Begin serving `config.vbd` (return promptly; the handshake runs on the target's threads)."""

    def stop(self) -> None:
        """Stop serving and release everything (grants, mappings, ports); bounded."""


@runtime_checkable
class ResizableBackend(Protocol):
    """OPTIONAL part of a backend target: be told that the toolstack grew or shrank the disk.

    The suite resizes `config.store` itself, then calls `resize(size_bytes)`; the backend
    then tells the frontend (XK-10: rewrite `sectors`, then `state`). A backend without this
    method cannot be driven to resize, and the resize tests SKIP with that reason.
    """

    def resize(self, size_bytes: int) -> None: ...


@runtime_checkable
class FrontendTarget(Protocol):
    """A frontend under test: attaches to the vbd and does the I/O the suite asks for."""

    name: str
    versions: dict[str, str]

    def start(self) -> None:
        """Begin attaching to `config.vbd` (return promptly; the handshake runs on its own)."""

    def stop(self) -> None:
        """Detach at once and release everything; bounded."""

    def close(self) -> None:
        """Guest-initiated close (SM-25), as at system shutdown."""

    def read(self, sector: int, nsectors: int, *, queue: int | None = None) -> Completion: ...
    def write(self, sector: int, data: bytes, *, queue: int | None = None) -> Completion: ...
    def flush(self, *, queue: int | None = None) -> Completion: ...
    def barrier(self, *, queue: int | None = None) -> Completion: ...
    def discard(self, sector: int, nsectors: int, *, secure: bool = False,
                queue: int | None = None) -> Completion: ...  # fmt: skip


Factory = Callable[[XenServices, TargetConfig], Any]


def _known(cls: type, options: dict[str, Any]) -> dict[str, Any]:
    fields = getattr(cls, "__dataclass_fields__", {})
    return {k: v for k, v in options.items() if k in fields}


class ReferenceBackend:
    """The reference backend as a target. Variants (the fault catalogue) override `backend_class`."""

    backend_class: type[Backend] = Backend

    name = "reference"
    versions: dict[str, str] = {}  # noqa: RUF012 - a plain description, never mutated

    def __init__(self, xen: XenServices, config: TargetConfig) -> None:
        if config.store is None:
            raise ValueError("the reference backend needs config.store (its disk)")
        self.backend = self.backend_class(xen, config.vbd.backend_path, config.store,
                               BackendConfig(**_known(BackendConfig, config.options)))  # fmt: skip

    def start(self) -> None:
        self.backend.start()

    def stop(self) -> None:
        self.backend.stop()

    def resize(self, size_bytes: int) -> None:
        """The optional `ResizableBackend` hook (XK-10)."""
        self.backend.resize(size_bytes)


class ReferenceFrontend:
    """The reference frontend as a target: `start()` connects on a thread of its own.

    Variants (the fault catalogue) override `frontend_class`.
    """

    frontend_class: type[Frontend] = Frontend

    name = "reference"
    versions: dict[str, str] = {}  # noqa: RUF012

    def __init__(self, xen: XenServices, config: TargetConfig) -> None:
        options = {"timeout": config.timeout, **_known(FrontendConfig, config.options)}
        self.frontend = self.frontend_class(xen, config.vbd.frontend_path, FrontendConfig(**options))
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def start(self) -> None:
        again = self._thread is not None  # a start after close(): attach anew from Initialising (SM-26)

        def attach() -> None:
            try:
                self.frontend.reconnect() if again else self.frontend.connect()
            except BaseException as exc:  # reported by the suite as the target's failure
                self.error = exc

        self._thread = threading.Thread(target=attach, name="reference-frontend-attach", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._thread.join(self.frontend.config.timeout)
        self.frontend._stop_watcher()
        self.frontend._teardown()

    def close(self) -> None:
        self.frontend.close()

    def read(self, sector: int, nsectors: int, *, queue: int | None = None) -> Completion:
        return self.frontend.read(sector, nsectors, queue=queue)

    def write(self, sector: int, data: bytes, *, queue: int | None = None) -> Completion:
        return self.frontend.write(sector, data, queue=queue)

    def flush(self, *, queue: int | None = None) -> Completion:
        return self.frontend.flush(queue=queue)

    def barrier(self, *, queue: int | None = None) -> Completion:
        return self.frontend.barrier(queue=queue)

    def discard(self, sector: int, nsectors: int, *, secure: bool = False,
                queue: int | None = None) -> Completion:  # fmt: skip
        return self.frontend.discard(sector, nsectors, secure=secure, queue=queue)


def live_factory(xen: XenServices, config: TargetConfig) -> Any:
    """Stands for the host's own driver: nothing to construct, the live harness runs it."""
    raise LookupError("--backend=live / --frontend=live targets are real drivers, not factories")


def load(spec: str, role: str) -> Factory:
    """The factory named by `--backend`/`--frontend`: `reference`, `live` or `MODULE:FACTORY`."""
    if spec == "reference":
        return ReferenceBackend if role == "backend" else ReferenceFrontend
    if spec == "live":
        return live_factory
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise LookupError(f"--{role}={spec}: cannot import {module_name!r}: {exc}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise LookupError(f"--{role}={spec}: {module_name} has no callable {attr!r}")
    return factory
