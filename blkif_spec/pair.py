"""The reference pair on a simulated Xen: the yardstick, and the default target of the suite.

`ReferencePair` plays the toolstack in dom0, runs the reference backend in the
backend domain and the reference frontend in the frontend domain, and on
`close()` checks that nothing was left behind: no XenStore device nodes, no
grants, no foreign mappings, no event-channel ports (issue: lifecycle).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from blkif_spec import toolstack
from blkif_spec.drivers.backend import Backend, BackendConfig
from blkif_spec.drivers.frontend import Frontend, FrontendConfig
from blkif_spec.drivers.store import BackingStore, MemoryStore
from blkif_spec.xen.api import XenError
from blkif_spec.xen.sim import BACKEND_DOMID, FRONTEND_DOMID, SimXen

_devids = itertools.count(51712, 16)  # xvda, xvdb, ...: a fresh device id per pair


class Leak(AssertionError):
    """Something a closed pair still holds."""


@dataclass
class ReferencePair:
    """A vbd between the reference frontend and backend on `xen`.

    `connect()` runs the XenBus handshake; `close()` does a guest close, stops the
    backend, removes the device directories and raises `Leak` if any domain
    still holds grants, mappings or ports, or a node of the device remains.
    """

    xen: SimXen
    backend_config: BackendConfig = field(default_factory=BackendConfig)
    frontend_config: FrontendConfig = field(default_factory=FrontendConfig)
    size: int = 4 << 20
    readonly: bool = False
    discard_enable: bool = True
    store: BackingStore | None = None

    def __post_init__(self) -> None:
        for domid, name in ((FRONTEND_DOMID, "guest"), (BACKEND_DOMID, "driver")):
            if domid not in self.xen.domains:
                self.xen.domain(domid, name)
        # What the domains already hold (other pairs on the same host): not this pair's leaks.
        self._baseline = {domid: self.xen.leaks(domid) for domid in (FRONTEND_DOMID, BACKEND_DOMID)}
        self.vbd = toolstack.Vbd(FRONTEND_DOMID, BACKEND_DOMID, devid=next(_devids))
        self.store = self.store or MemoryStore(self.size)
        toolstack.create(self.xen.dom0.store, self.vbd, readonly=self.readonly, discard=self.discard_enable)
        self.backend = Backend(self.xen.domains[BACKEND_DOMID], self.vbd.backend_path, self.store,
                               self.backend_config)  # fmt: skip
        self.frontend = Frontend(self.xen.domains[FRONTEND_DOMID], self.vbd.frontend_path,
                                 self.frontend_config)  # fmt: skip
        self.backend.start()

    def connect(self):
        return self.frontend.connect()

    def close(self, *, check: bool = True) -> None:
        try:
            if self.frontend.queues:
                self.frontend.close()
        finally:
            self.backend.stop()
            toolstack.destroy(self.xen.dom0.store, self.vbd)
        if check:
            self.check_clean()

    def check_clean(self) -> None:
        leaks = {}
        for domid, before in self._baseline.items():
            held = {kind: sorted(set(items) - set(before.get(kind, ())))
                    for kind, items in self.xen.leaks(domid).items()}  # fmt: skip
            held = {kind: items for kind, items in held.items() if items}
            if held:
                leaks[domid] = held
        nodes = [p for p in (self.vbd.frontend_path, self.vbd.backend_path)
                 if self.xen.dom0.store.read(p) is not None]  # fmt: skip
        if leaks or nodes:
            raise Leak(f"left behind: {leaks or ''} {nodes or ''}".strip())

    def __enter__(self) -> ReferencePair:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        try:
            self.close(check=exc_type is None)
        except XenError:
            if exc_type is None:
                raise
