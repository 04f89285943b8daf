"""A simulated Xen host: xenstored, machine memory with grant tables, event channels, domains.

`SimXen` assembles the three simulated services behind `blkif_spec.xen.api`:
each `SimDomain` has its own XenStore connection (pyxs over its own socket of
the in-process xenstored), its own grant-table view and its own event-channel
view. Dom0 is privileged in XenStore (XK-3) and plays the toolstack; targets
run in other domains, so `destroy_domain` never touches the suite.
"""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass, field

from blkif_spec.xen.api import XenError
from blkif_spec.xen.sim_evtchn import EvtchnHost, SimEventChannels
from blkif_spec.xen.sim_grants import GrantHost, SimGrantTable
from blkif_spec.xen.xenstore import PyxsStore
from blkif_spec.xen.xenstored import XenStored

DOM0 = 0
FRONTEND_DOMID = 1
BACKEND_DOMID = 2


@dataclass
class SimDomain:
    """One simulated domain's Xen services (`api.XenServices`)."""

    domid: int
    store: PyxsStore
    grants: SimGrantTable
    evtchn: SimEventChannels
    name: str = ""

    def close(self) -> None:
        with contextlib.suppress(XenError, OSError):
            self.store.close()
        with contextlib.suppress(XenError, OSError):
            self.evtchn.close()


@dataclass
class SimXen:
    """The simulated host. Use as a context manager; `close()` stops everything it started."""

    nr_frames: int = 16384
    leaks_visible = True  # `leaks()` sees every domain's grants, mappings and ports
    timeout: float = 2.0
    record_grants: bool = False
    domains: dict[int, SimDomain] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="blkif-sim-")
        self.xenstored = XenStored(self._dir.name)
        self.xenstored.start()
        self.grant_host = GrantHost(self.nr_frames)
        self.evtchn_host = EvtchnHost()
        self.dom0 = self.domain(DOM0, "Domain-0")

    def domain(self, domid: int, name: str = "") -> SimDomain:
        """Create (or re-create, after a destroy) a domain and its home `/local/domain/<domid>`."""
        store = PyxsStore.connect(self.xenstored.socket_for(domid), domid, timeout=self.timeout)
        if domid != DOM0:
            home = f"/local/domain/{domid}"
            self.dom0.store.mkdir(home)
            self.dom0.store.set_perms(home, [f"n{domid}"])
            self.dom0.store.write(f"{home}/name", name or f"dom{domid}")
        dom = SimDomain(domid, store, self.grant_host.table(domid, record=self.record_grants),
                        self.evtchn_host.channels(domid), name)  # fmt: skip
        self.domains[domid] = dom
        return dom

    def destroy_domain(self, domid: int) -> None:
        """Kill a (hung) domain: its XenStore connections, grants, mappings and ports (conventions §3)."""
        if domid == DOM0:
            raise ValueError("dom0 runs the suite: it is never destroyed")
        dom = self.domains.pop(domid, None)
        self.xenstored.destroy_domain(domid)
        self.grant_host.destroy_domain(domid)
        self.evtchn_host.destroy_domain(domid)
        if dom is not None:
            dom.close()
        with contextlib.suppress(XenError):
            self.dom0.store.rm(f"/local/domain/{domid}")

    def leaks(self, domid: int) -> dict[str, list[int]]:
        """What a domain still holds: grants offered, foreign mappings, ports. Empty when clean."""
        held = {
            "grants": self.grant_host.grants_of(domid),
            "mappings": self.grant_host.mappings_of(domid),
            "ports": self.evtchn_host.ports_of(domid),
        }
        return {kind: items for kind, items in held.items() if items}

    def close(self) -> None:
        for dom in list(self.domains.values()):
            dom.close()
        self.domains.clear()
        self.xenstored.stop()
        self.evtchn_host.close()
        self.grant_host.close()
        self._dir.cleanup()

    def __enter__(self) -> SimXen:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
