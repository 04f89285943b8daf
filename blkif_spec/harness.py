"""Running a target under test: its own simulated domain, the suite's peer, bounded waits.

`BackendUnderTest`: the target backend in the backend domain, the reference
frontend (with its raw layer) as the suite's peer. `FrontendUnderTest`: the
target frontend in the frontend domain, the reference backend as the peer,
whose ring servers record every rule a request broke. The suite plays the
toolstack in dom0 (conventions §3). Every wait on the target is bounded; when a
bound expires the target's domain is destroyed and `TargetTimeout` is raised,
which the plugin reports as the `timeout` verdict.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from blkif_spec import toolstack
from blkif_spec.consts import XenbusState
from blkif_spec.drivers import xsutil
from blkif_spec.drivers.backend import Backend, BackendConfig
from blkif_spec.drivers.frontend import Frontend, FrontendConfig
from blkif_spec.drivers.store import MemoryStore
from blkif_spec.targets import Factory, TargetConfig
from blkif_spec.xen.api import XenError, XenTimeout
from blkif_spec.xen.sim import BACKEND_DOMID, FRONTEND_DOMID, SimXen

T = TypeVar("T")
DISK_SIZE = 4 << 20


class TargetTimeout(XenTimeout):
    """The target did not answer within the bound (verdict `timeout`)."""


def bounded(fn: Callable[[], T], timeout: float, what: str) -> T:
    """Run `fn` on a helper thread and wait at most `timeout` seconds for it."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=run, name=f"bounded-{what}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TargetTimeout(f"{what}: no answer within {timeout:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


class PendingIO:
    """A block-API call running on a thread of its own (`FrontendUnderTest.submit`)."""

    def __init__(self, fn: Callable[[], Any], what: str) -> None:
        self.what = what
        self._box: dict[str, Any] = {}
        self._done = threading.Event()

        def run() -> None:
            try:
                self._box["value"] = fn()
            except BaseException as exc:  # an outcome to judge, not a harness failure
                self._box["error"] = exc
            finally:
                self._done.set()

        threading.Thread(target=run, name=f"pending-{what}", daemon=True).start()

    def outcome(self, timeout: float) -> tuple[str, Any]:
        """("done", value), ("raised", exception) or ("pending", None) after waiting at most `timeout` s."""
        if not self._done.wait(timeout):
            return "pending", None
        if "error" in self._box:
            return "raised", self._box["error"]
        return "done", self._box["value"]


class _UnderTest:
    """What both roles share: the host, the device, teardown with leak accounting."""

    target_domid: int

    def __init__(self, *, timeout: float, size: int, readonly: bool, discard: bool,
                 record_grants: bool = False) -> None:  # fmt: skip
        self.timeout = timeout
        self.xen = SimXen(timeout=timeout, record_grants=record_grants)
        self.xen.domain(FRONTEND_DOMID, "guest")
        self.xen.domain(BACKEND_DOMID, "driver")
        self.vbd = toolstack.Vbd(FRONTEND_DOMID, BACKEND_DOMID)
        self.store = MemoryStore(size)
        self.readonly = readonly
        toolstack.create(self.xen.dom0.store, self.vbd, readonly=readonly, discard=discard)
        self.target: Any = None
        self.destroyed = False
        self.closed = False

    @property
    def dom0(self):
        return self.xen.dom0.store

    def backend_tree(self) -> dict[str, str]:
        return xsutil.read_tree(self.dom0, self.vbd.backend_path)

    def frontend_tree(self) -> dict[str, str]:
        return xsutil.read_tree(self.dom0, self.vbd.frontend_path)

    def state(self, side: str) -> XenbusState:
        path = self.vbd.backend_path if side == "backend" else self.vbd.frontend_path
        return xsutil.read_state(self.dom0, path)

    def wait_state(self, side: str, states: set[XenbusState], what: str = "") -> XenbusState:
        """Wait (bounded) until `side`'s state is one of `states`; TargetTimeout otherwise."""
        deadline = time.monotonic() + self.timeout
        while True:
            state = self.state(side)
            if state in states:
                return state
            if time.monotonic() > deadline:
                names = "/".join(s.name for s in sorted(states))
                raise TargetTimeout(f"{what or side} still in {state.name}, expected {names}")
            time.sleep(0.005)

    def call(self, fn: Callable[[], T], what: str) -> T:
        """A bounded call into the target; on timeout its domain is destroyed (conventions §3)."""
        try:
            return bounded(fn, self.timeout, what)
        except TargetTimeout:
            self.destroy_target()
            raise

    def destroy_target(self) -> None:
        if not self.destroyed:
            self.destroyed = True
            self.xen.destroy_domain(self.target_domid)

    @property
    def leaks_visible(self) -> bool:
        """Whether `leaks()` can see what the target holds (not on a live host)."""
        return bool(getattr(self.xen, "leaks_visible", True))

    def leaks(self) -> dict[str, list[int]]:
        return self.xen.leaks(self.target_domid)

    def close(self) -> None:
        """Stop both sides and remove everything; a second call does nothing (a machine's teardown,
        then the fixture's)."""
        if self.closed:
            return
        self.closed = True
        try:
            self._close_peer()
            if self.target is not None and not self.destroyed:
                self.call(self.target.stop, "target stop")
        finally:
            try:
                toolstack.destroy(self.dom0, self.vbd)
            finally:
                self.xen.close()

    def _close_peer(self) -> None:
        raise NotImplementedError


class BackendUnderTest(_UnderTest):
    """A backend target; the suite's frontend is `self.peer` (reference frontend, raw layer)."""

    target_domid = BACKEND_DOMID

    def __init__(self, factory: Factory, *, timeout: float = 2.0, size: int = DISK_SIZE,
                 readonly: bool = False, discard: bool = True, abi: str = "x86_64-abi",
                 options: dict[str, Any] | None = None, record_grants: bool = False,
                 start: bool = True) -> None:  # fmt: skip
        super().__init__(timeout=timeout, size=size, readonly=readonly, discard=discard,
                         record_grants=record_grants)  # fmt: skip
        config = TargetConfig(self.vbd, timeout, self.store, readonly, dict(options or {}))
        self.target = factory(self.xen.domains[BACKEND_DOMID], config)
        self.abi = abi
        self.peer = Frontend(self.xen.domains[FRONTEND_DOMID], self.vbd.frontend_path,
                             FrontendConfig(protocol=abi, timeout=timeout))  # fmt: skip
        if start:
            self.start()

    def start(self) -> None:
        """Start the target (bounded). The constructor does it unless given `start=False`: a test
        that watches the startup itself (XK-7.a write order) or edits the toolstack's keys first."""
        self.call(self.target.start, "backend start")

    def connect(self, **frontend: Any):
        """The documented startup, with the suite's frontend wanting `frontend` (FrontendConfig fields)."""
        if frontend:  # a fresh peer: nothing is allocated before connect()
            config = FrontendConfig(**{"protocol": self.abi, "timeout": self.timeout, **frontend})
            self.peer = Frontend(self.peer.xen, self.peer.path, config)
        try:
            return self.peer.connect()
        except XenTimeout as exc:
            raise TargetTimeout(str(exc)) from None

    def ring_log(self, queue: int = 0):
        """The target's recorded reads of the suite's ring `queue` (`AccessLog`), or None.

        Only with `record_grants=True`, and only reads made through the ring the
        mapping offers (`Mapping.ring`): a target that reads the mapped buffer
        directly leaves no record, so None or an empty log means "not observable".
        """
        grefs = self.peer.raw_ring(queue).ring_grefs
        for mapped, log in self.xen.grant_host.access_logs(self.target_domid):
            if tuple(mapped) == tuple(grefs):
                return log
        return None

    def _close_peer(self) -> None:
        peer = self.peer
        try:
            if peer.queues and not peer.disabled and not self.destroyed:
                peer.close()
        except XenError:
            pass
        finally:
            peer._stop_watcher()
            if not self.destroyed and self.xen.leaks(self.target_domid).get("mappings"):
                # The target never let go of our pages (it did not close, or leaks them): a test
                # judged that already; destroy it so that freeing them is not a teardown error.
                self.destroy_target()
            peer._teardown()


class FrontendUnderTest(_UnderTest):
    """A frontend target; the suite's backend is `self.peer`, recording every rule a request broke."""

    target_domid = FRONTEND_DOMID
    #: Whether a target stuck for good can be got rid of (its domain destroyed). A test that may
    #: leave the target's I/O pending forever needs it; the dom0 kernel's own frontend has not.
    destroyable = True
    #: Whether the target can be started again after a guest close (`close()`), in the same device
    #: directory, as a reconnect (SM-26). None when it can; else why not.
    no_restart: str | None = None

    def __init__(self, factory: Factory, *, timeout: float = 2.0, size: int = DISK_SIZE,
                 readonly: bool = False, discard: bool = True, backend: BackendConfig | None = None,
                 options: dict[str, Any] | None = None) -> None:  # fmt: skip
        super().__init__(timeout=timeout, size=size, readonly=readonly, discard=discard)
        self.peer = Backend(self.xen.domains[BACKEND_DOMID], self.vbd.backend_path, self.store,
                            backend or BackendConfig())  # fmt: skip
        self.peer.start()
        config = TargetConfig(self.vbd, timeout, None, readonly, dict(options or {}))
        self.target = factory(self.xen.domains[FRONTEND_DOMID], config)

    def start(self) -> None:
        """Start the target without waiting for Connected (a frontend expected to refuse the device)."""
        self.call(self.target.start, "frontend start")

    def attach(self) -> None:
        """Start the target and wait until both sides are Connected (bounded)."""
        self.start()
        self.wait_state("frontend", {XenbusState.Connected}, "frontend (SM-5)")

    def io(self, method: str, *args: Any, **kwargs: Any):
        """A block-API call on the target, bounded."""
        return self.call(lambda: getattr(self.target, method)(*args, **kwargs), f"frontend {method}")

    def submit(self, method: str, *args: Any, **kwargs: Any) -> PendingIO:
        """Start a block-API call and return at once; it may stay blocked (hostile-response tests).

        Unlike `io`, a call that does not return never destroys the target: a frontend
        that stopped using the device may leave its I/O pending, as Linux does (DIV-22).
        """
        return PendingIO(lambda: getattr(self.target, method)(*args, **kwargs), f"frontend {method}")

    def request_rules_broken(self) -> dict[str, int]:
        """Rule IDs of every request the suite's backend refused, with counts."""
        seen: dict[str, int] = {}
        for q in self.peer._queues:
            for rule, n in q.server.stats.by_rule.items():
                seen[rule] = seen.get(rule, 0) + n
        return seen

    def requests_per_queue(self) -> list[int]:
        """Requests the suite's backend took from each ring of the connection, in queue order."""
        return [q.server.stats.requests for q in self.peer._queues]

    def _close_peer(self) -> None:
        self.peer.stop()
