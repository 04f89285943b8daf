"""Simulated Xen, part 2b: event channels with Xen's binding rules, across threads and processes.

State. An `EvtchnHost` keeps the port table (state, owner, peer end) and the
domain table in a memfd, updated under a `SharedLock`, so a port bound or
closed in one process is seen by every other. Pending state is the port's
eventfd: `notify` adds 1 to the peer end's eventfd, `wait` reads (and so
clears) the eventfds that are readable. An eventfd read is atomic across
processes, so two processes never both consume one event and none is lost.
The eventfds are made when the host is (`max_ports` of them plus one "kill"
eventfd per domain slot), so a child started with `fork` at any time has
every port's eventfd: any port allocated later, in either process, works in
both.

Waiting. Each `SimEventChannels` view owns an epoll over its domain's port
eventfds and its domain's kill eventfd; `fileno()` is that epoll, readable
when an event may be pending (it can be spuriously readable; `wait(0)` then
returns []). A view re-reads the port table when its generation counter
changed, so ports bound by other views or processes are picked up at the next
`wait`/`fileno`. `ports=` (or `subset`) restricts a view to some ports, so
ring workers of one domain (one per queue in the IOPS benchmark) never take
each other's events. `wait(timeout)` never blocks longer than `timeout` (epoll's ms
granularity, rounded up).

Destroy. `destroy_domain` marks the domain dead, frees its ports (a peer end
becomes "closed": the peer's notify fails, like an unbound port) and sets its
kill eventfd, so a `wait` blocked in any process wakes and raises XenError,
and every later call of the destroyed domain's views raises XenError.

Stricter than Xen. Real Xen silently drops a notify on a port still unbound
(ECS_UNBOUND, e.g. after the peer closed its end); here notify on any port
that is not connected to a live peer raises XenError, so a driver that
signals before connecting, or after its peer went away, is seen.

Fork. Pass views and hosts to a child with the multiprocessing `fork` start
method (as `Process` arguments; they are not picklable). The child inherits
the memfd, the eventfds and the lock; each view builds a fresh epoll the
first time it is used in a new process (an epoll instance must not be shared
between processes).
"""

from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NoReturn

from blkif_spec.xen.api import XenError
from blkif_spec.xen.sim_grants import DomainTable, SharedLock, refuse_pickling, shared_table

__all__ = ["EvtchnHost", "PortInfo", "SimEventChannels"]

# port states
_P_FREE, _P_UNBOUND, _P_INTERDOMAIN, _P_CLOSED = 0, 1, 2, 3
_STATE_NAMES = {_P_UNBOUND: "unbound", _P_INTERDOMAIN: "interdomain", _P_CLOSED: "closed"}
# port words (int32 each)
_PW = 6
_P_STATE, _P_DOMID, _P_PORT, _P_REMOTE_DOM, _P_REMOTE_SLOT, _P_DGEN = range(_PW)
_H_GEN = 0  # header word: bumped after every change of the port table


@dataclass(frozen=True)
class PortInfo:
    """One port as the table sees it: "unbound" (awaiting `remote_domid`), "interdomain" or "closed"."""

    state: str
    remote_domid: int
    remote_port: int | None


class EvtchnHost:
    """The event channels of every simulated domain: `max_ports` ports in all."""

    def __init__(self, *, max_domains: int = 16, max_ports: int = 64, lock_timeout: float = 10.0) -> None:
        if max_domains < 1 or max_ports < 1:
            raise ValueError("EvtchnHost needs at least one domain slot and one port")
        self.max_ports = max_ports
        self._lock = SharedLock("event channel", lock_timeout)
        hdr_bytes = 32
        dom_bytes = max_domains * DomainTable.WORDS * 4
        self._ctlfd, self._ctl_mm = shared_table(
            "blkif-sim-evtchn", hdr_bytes + dom_bytes + max_ports * _PW * 4
        )
        ctl = memoryview(self._ctl_mm)
        self._hdr = ctl[:hdr_bytes].cast("i")
        self.domains = DomainTable(ctl[hdr_bytes : hdr_bytes + dom_bytes].cast("i"))
        self._p = ctl[hdr_bytes + dom_bytes :].cast("i")
        self._views = [ctl, self._hdr, self.domains._w, self._p]
        flags = os.EFD_NONBLOCK | os.EFD_CLOEXEC
        self._efd: list[int] = []
        self._kill: list[int] = []
        try:
            self._efd.extend(os.eventfd(0, flags) for _ in range(max_ports))
            self._kill.extend(os.eventfd(0, flags) for _ in range(max_domains))
        except BaseException:
            self._close_fds()
            raise
        self.closed = False

    # -- service objects and accounting --------------------------------------------------------

    def channels(self, domid: int, *, ports: Iterable[int] | None = None) -> SimEventChannels:
        """The event channels of `domid` (created, or re-created after a destroy)."""
        return SimEventChannels(self, domid, ports=ports)

    def ports_of(self, domid: int) -> list[int]:
        """Ports `domid` holds (unbound, connected or closed by the peer), sorted."""
        p = self._p
        with self._lock:
            return sorted(
                p[s * _PW + _P_PORT]
                for s in range(self.max_ports)
                if p[s * _PW + _P_STATE] != _P_FREE and p[s * _PW + _P_DOMID] == domid
            )

    def port_info(self, domid: int, port: int) -> PortInfo | None:
        """The state of `domid`'s `port`, or None if it has no such port."""
        with self._lock:
            s = self._find(domid, port)
            if s is None:
                return None
            p = self._p
            base = s * _PW
            state = p[base + _P_STATE]
            remote_port = p[p[base + _P_REMOTE_SLOT] * _PW + _P_PORT] if state == _P_INTERDOMAIN else None
            return PortInfo(_STATE_NAMES[state], p[base + _P_REMOTE_DOM], remote_port)

    def destroy_domain(self, domid: int) -> None:
        """Free all of `domid`'s ports (peer ends become closed) and wake its waiters to fail.

        Idempotent; unknown domains are ignored.
        """
        with self._lock:
            dslot = self.domains.kill(domid)
            if dslot is None:
                return
            p = self._p
            for s in range(self.max_ports):
                if p[s * _PW + _P_STATE] != _P_FREE and p[s * _PW + _P_DOMID] == domid:
                    self._free_slot(s)
            self._hdr[_H_GEN] += 1
            os.eventfd_write(self._kill[dslot], 1)  # left set: every waiter, in any process, wakes

    # -- internals (callers hold the lock unless noted) -------------------------------------

    def _find(self, domid: int, port: int) -> int | None:
        p = self._p
        for s in range(self.max_ports):
            base = s * _PW
            if p[base + _P_STATE] != _P_FREE and p[base + _P_DOMID] == domid and p[base + _P_PORT] == port:
                return s
        return None

    def _new_port(
        self, domid: int, gen: int, state: int, remote_dom: int, remote_slot: int
    ) -> tuple[int, int]:
        """(slot, port) of a new port of `domid`: the smallest port number ≥ 1 it does not use."""
        p = self._p
        used: set[int] = set()
        free: int | None = None
        for s in range(self.max_ports):
            base = s * _PW
            if p[base + _P_STATE] == _P_FREE:
                if free is None:
                    free = s
            elif p[base + _P_DOMID] == domid:
                used.add(p[base + _P_PORT])
        if free is None:
            raise XenError(f"domain {domid}: no free event channel ({self.max_ports} ports in use)")
        port = next(n for n in range(1, self.max_ports + 2) if n not in used)
        self._drain(self._efd[free])  # an event a previous owner left behind is not this port's
        base = free * _PW
        p[base + _P_DOMID] = domid
        p[base + _P_PORT] = port
        p[base + _P_REMOTE_DOM] = remote_dom
        p[base + _P_REMOTE_SLOT] = remote_slot
        p[base + _P_DGEN] = gen
        p[base + _P_STATE] = state
        return free, port

    def _free_slot(self, s: int) -> None:
        p = self._p
        base = s * _PW
        if p[base + _P_STATE] == _P_INTERDOMAIN:
            r = p[base + _P_REMOTE_SLOT]
            if p[r * _PW + _P_STATE] == _P_INTERDOMAIN and p[r * _PW + _P_REMOTE_SLOT] == s:
                p[r * _PW + _P_STATE] = _P_CLOSED
        p[base + _P_STATE] = _P_FREE
        self._drain(self._efd[s])

    @staticmethod
    def _drain(fd: int) -> None:
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            pass

    def _close_fds(self) -> None:
        for fd in (*self._efd, *self._kill):
            os.close(fd)
        self._efd.clear()
        self._kill.clear()

    def close(self) -> None:
        """Close this process's descriptors and mapping of the tables."""
        if self.closed:
            return
        self.closed = True
        self._close_fds()
        for view in reversed(self._views):
            view.release()
        self._ctl_mm.close()
        os.close(self._ctlfd)

    def __enter__(self) -> EvtchnHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> NoReturn:
        refuse_pickling(self)

    def __repr__(self) -> str:
        return f"<EvtchnHost {self.max_ports} ports>"


class SimEventChannels:
    """The event channels of one domain (`EventChannels`), optionally restricted to some ports.

    `ports` limits which ports `wait` reports and `fileno` covers (one ring
    worker per port); allocation, binding and notify are not restricted.
    """

    def __init__(self, host: EvtchnHost, domid: int, *, ports: Iterable[int] | None = None) -> None:
        self.host = host
        self.domid = domid
        self.only: frozenset[int] | None = None if ports is None else frozenset(ports)
        with host._lock:
            self._dslot, self._gen, revived = host.domains.attach(domid)
            if revived:
                host._drain(host._kill[self._dslot])
        self._slots: dict[int, int] = {}  # port -> slot cache, validated on use
        self._ep: select.epoll | None = None
        self._handle = False
        self._local_setup()

    def open(self) -> SimEventChannels:
        """A separate handle (like opening /dev/xen/evtchn again): its ports' events go to it only.

        Ports allocated or bound through the handle are the only ones it waits on, so two
        drivers of one domain never take each other's events.
        """
        view = self.subset(())
        view._handle = True
        return view

    def subset(self, ports: Iterable[int]) -> SimEventChannels:
        """Another view of this domain that waits only on `ports` (one per ring worker)."""
        view = SimEventChannels.__new__(SimEventChannels)
        view.host, view.domid, view.only = self.host, self.domid, frozenset(ports)
        view._dslot, view._gen = self._dslot, self._gen
        view._slots, view._ep = {}, None
        view._handle = False
        view._local_setup()
        return view

    # -- EventChannels ---------------------------------------------------------------------------

    def alloc_unbound(self, remote: int) -> int:
        """A new port that `remote` (and only it) may bind to."""
        h = self.host
        with h._lock:
            self._check_alive()
            slot, port = h._new_port(self.domid, self._gen, _P_UNBOUND, remote, -1)
            h._hdr[_H_GEN] += 1
        self._adopt(port, slot)
        return port

    def bind_interdomain(self, remote: int, remote_port: int) -> int:
        """Connect a new local port to `remote`'s `remote_port`, which must be unbound for this domain."""
        h = self.host
        p = h._p
        with h._lock:
            self._check_alive()
            r = h._find(remote, remote_port)
            if r is None:
                raise XenError(f"bind_interdomain: domain {remote} has no port {remote_port}")
            rbase = r * _PW
            state = p[rbase + _P_STATE]
            if state != _P_UNBOUND:
                raise XenError(
                    f"bind_interdomain: port {remote_port} of domain {remote} is "
                    f"{_STATE_NAMES[state]}, not unbound"
                )
            if p[rbase + _P_REMOTE_DOM] != self.domid:
                raise XenError(
                    f"bind_interdomain: port {remote_port} of domain {remote} was allocated for domain "
                    f"{p[rbase + _P_REMOTE_DOM]}, not {self.domid}"
                )
            slot, port = h._new_port(self.domid, self._gen, _P_INTERDOMAIN, remote, r)
            p[rbase + _P_REMOTE_SLOT] = slot
            p[rbase + _P_STATE] = _P_INTERDOMAIN
            h._hdr[_H_GEN] += 1
        self._adopt(port, slot)
        return port

    def _adopt(self, port: int, slot: int) -> None:
        self._slots[port] = slot
        if self._handle:
            self.only = (self.only or frozenset()) | {port}
        self._resync()

    def notify(self, port: int) -> None:
        """Signal the peer end; XenError if `port` is not this domain's, unbound, or closed by the peer."""
        h = self.host
        p = h._p
        s = self._slot(port)
        base = s * _PW
        state = p[base + _P_STATE]
        if state != _P_INTERDOMAIN:
            raise XenError(f"notify: port {port} of domain {self.domid} is {_STATE_NAMES[state]}: no peer")
        os.eventfd_write(h._efd[p[base + _P_REMOTE_SLOT]], 1)

    def wait(self, timeout: float) -> list[int]:
        """Ports with pending events, cleared; [] once `timeout` seconds passed without one.

        Raises XenError when this domain is (or gets) destroyed.
        """
        deadline = time.monotonic() + max(timeout, 0.0)
        ep = self._epoll()
        h = self.host
        while True:
            self._check_alive()
            remaining = max(deadline - time.monotonic(), 0.0)
            events = ep.poll(remaining)
            if h._hdr[_H_GEN] != self._synced:
                self._resync()
            ports: list[int] = []
            for fd, _ in events:
                port = self._watched.get(fd)
                if port is None:
                    continue  # the kill eventfd, or a port closed meanwhile
                try:
                    os.eventfd_read(fd)
                except BlockingIOError:
                    continue  # another view of this port took it
                ports.append(port)
            if ports:
                return sorted(ports)
            if remaining <= 0.0:
                self._check_alive()
                return []

    def unbind(self, port: int) -> None:
        """Close `port`; the peer end becomes closed (its notify fails)."""
        h = self.host
        with h._lock:
            self._check_alive()
            s = self._lookup_locked(port)
            h._free_slot(s)
            h._hdr[_H_GEN] += 1
        self._slots.pop(port, None)
        if self._handle and self.only is not None:
            self.only = self.only - {port}
        self._resync()

    def fileno(self) -> int:
        """The view's epoll: readable when an event may be pending (or the domain was destroyed)."""
        ep = self._epoll()
        if self.host._hdr[_H_GEN] != self._synced:
            self._resync()
        return ep.fileno()

    def close(self) -> None:
        """Close this view's epoll (the ports stay bound: `unbind` them, or destroy the domain)."""
        if self._ep is not None:
            self._ep.close()
        self._ep = None
        self._watched = {}

    # -- internals -------------------------------------------------------------------------

    def _check_alive(self) -> None:
        if not self.host.domains.alive(self.domid, self._gen):
            raise XenError(f"domain {self.domid} was destroyed")

    def _slot(self, port: int) -> int:
        """The slot of this domain's live `port` (lock-free; the cache is checked against the table)."""
        s = self._slots.get(port)
        if s is None or not self._owns(s, port):
            with self.host._lock:
                s = self._lookup_locked(port)
        return s

    def _lookup_locked(self, port: int) -> int:
        s = self.host._find(self.domid, port)
        if s is None or self.host._p[s * _PW + _P_DGEN] != self._gen:
            self._check_alive()
            raise XenError(f"domain {self.domid} has no event channel port {port!r}")
        self._slots[port] = s
        return s

    def _owns(self, s: int, port: int) -> bool:
        p = self.host._p
        base = s * _PW
        return (
            p[base + _P_STATE] != _P_FREE
            and p[base + _P_DOMID] == self.domid
            and p[base + _P_PORT] == port
            and p[base + _P_DGEN] == self._gen
        )

    def _local_setup(self) -> None:
        """The process-local part: an epoll (never shared across processes) and its bookkeeping.

        Made eagerly, so threads of one process never race to create it; made
        again by the first use in a forked child (one thread at that point).
        """
        if self._ep is not None:
            self._ep.close()  # ours, or our copy of the parent's descriptor after fork
        self._ep = select.epoll()
        self._pid = os.getpid()
        self._sync_lock = threading.Lock()
        self._watched: dict[int, int] = {}  # eventfd -> port
        self._synced = -1
        self._ep.register(self.host._kill[self._dslot], select.EPOLLIN)
        self._resync()

    def _epoll(self) -> select.epoll:
        """This process's epoll for the view (a fresh one after fork or `close`)."""
        if self._ep is None or self._pid != os.getpid():
            self._local_setup()
        assert self._ep is not None
        return self._ep

    def _resync(self) -> None:
        """Watch exactly this view's live ports; reads the table lock-free (a change bumps its generation)."""
        ep = self._ep
        if ep is None or self._pid != os.getpid():
            return
        h = self.host
        p = h._p
        with self._sync_lock:
            gen = h._hdr[_H_GEN]
            want: dict[int, int] = {}
            for s in range(h.max_ports):
                base = s * _PW
                if (
                    p[base + _P_STATE] != _P_FREE
                    and p[base + _P_DOMID] == self.domid
                    and p[base + _P_DGEN] == self._gen
                ):
                    port = p[base + _P_PORT]
                    if self.only is None or port in self.only:
                        want[h._efd[s]] = port
            for fd in self._watched.keys() - want.keys():
                ep.unregister(fd)
            for fd in want.keys() - self._watched.keys():
                ep.register(fd, select.EPOLLIN)
            self._watched = want
            self._synced = gen

    def __reduce__(self) -> NoReturn:
        refuse_pickling(self)

    def __repr__(self) -> str:
        only = f" ports={sorted(self.only)}" if self.only is not None else ""
        return f"<SimEventChannels dom{self.domid} gen={self._gen}{only}>"
