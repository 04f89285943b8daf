"""`bench iops`: the multi-queue series' experiment (IOPS, 1 queue against several) on the reference pair.

Workload (conventions §9): the reference backend serves 4 KiB random reads and
writes (50/50) from a shared in-memory disk, ring order 4, persistent grants,
every ring kept full, for 1, 2 and 4 queues. Each ring is served by its own
worker process (`BackendConfig(ring_workers="process")`), so queues run in
parallel as blkback's per-ring kthreads do, not under one GIL.

The figure is the backend's ring throughput, so the load generator (the parent
process) costs as little as it can: after the normal XenBus handshake it takes
each queue's ring and persistent pages (`Frontend.raw_queue`), pre-encodes
requests in half-ring chunks, refills a ring a chunk at a time with one copy,
and retires responses by comparing a whole range of slots with the image a
correct backend leaves behind (request bytes with `id`, `operation` and
`status` 0 written over them, padding untouched: SEC-5), one memcmp for
hundreds of responses. A range that differs is decoded slot by slot and every
bad status, id/operation echo or touched padding is counted: a benchmark of a
broken backend is worthless, so the count is printed and must be 0.

Every pair (one per queue count) is connected first and the queue counts then
take turns in short slices (`--slice`) until each has had `--seconds` of
measured time, its rings drained between slices: on a shared machine a burst
of someone else's load then falls on all queue counts alike, so the ratios
hold. After the load each queue does a write and a read-back through the
normal block API (the workers and the parent see one disk), and every pair
must close leaving no grant, mapping, port or node behind.

CPU seconds over the measured time are reported per process: the backend
workers, the generator thread, its whole process, and the rest of the machine
(`/proc/stat` minus ours), so a figure can be judged. `ring_anchor.py`
(shared/perf, run by hand beside this, never imported) is the yardstick.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from blkif_spec import codec, consts
from blkif_spec.consts import BlkifOp
from blkif_spec.drivers.backend import BackendConfig
from blkif_spec.drivers.frontend import Frontend, FrontendConfig, RawQueue
from blkif_spec.drivers.store import MemoryStore
from blkif_spec.pair import Leak, ReferencePair
from blkif_spec.ring import RSP_PROD, SRING_HEADER_SIZE
from blkif_spec.xen.api import XenError
from blkif_spec.xen.sim import SimXen

ABI = consts.X86_64_ABI
RING_ORDER = 4
DISK_BYTES = 64 << 20
IO_SECTORS = consts.PAGE_SIZE // consts.SECTOR_SIZE  # 4 KiB: one segment, first_sect 0, last_sect 7
IMAGES = 8  # pre-encoded half-ring chunks per queue (even: a chunk always lands in the same half)
_M = consts.RING_IDX_MASK
# The generator's nap when no ring needs a refill. A ring is refilled at half empty, so it still
# holds >= RING_SIZE/2 requests then: napping 0.5 ms leaves a ring dry only above ~500k IOPS per
# queue, and wakes the generator (the CPU it takes from the workers) 2.5x less than 0.2 ms.
IDLE_SLEEP = 0.0005
_TICK = os.sysconf("SC_CLK_TCK")


def _process_cpu(pid: int) -> float:
    """utime + stime of a process in seconds (/proc/<pid>/stat fields 14 and 15)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def _machine_busy() -> float:
    """CPU seconds all processes have used, every core (/proc/stat: all but idle and iowait).

    Minus our own processes, it shows how much the rest of a shared machine took
    during a window: the figure to judge a low result by.
    """
    with open("/proc/stat", "rb") as f:
        ticks = [int(t) for t in f.readline().split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / _TICK


@dataclass
class _Load:
    """The generator's state for one queue: pre-encoded chunks and what their responses must look like."""

    raw: RawQueue
    entry: int
    half: int  # requests per chunk: half a ring
    requests: list[bytes]  # IMAGES chunks of `half` request slots each
    expected: list[bytes]  # the same chunks as a correct backend leaves them
    pushed: int = 0  # chunks pushed
    retired: int = 0  # responses retired (free-running, from the lend point)
    bad: dict[str, int] = field(default_factory=lambda: {"status": 0, "echo": 0, "padding": 0})


def _chunks(raw: RawQueue, seed: int, handle: int) -> tuple[list[bytes], list[bytes]]:
    """`IMAGES` half-ring chunks of random 4 KiB READ/WRITE requests, and their expected responses.

    Slot s always uses data page s, so requests in flight never share a page;
    `id` = chunk << 16 | slot, so a response from an earlier lap is seen.
    """
    c = codec.codecs(ABI)
    req, rsp = c.request_rw, c.response
    size = raw.ring.size
    half = size // 2
    entry = raw.ring.shared.entry_size
    write_rsp = rsp.field_packer("id", "operation", "status")
    rng = random.Random(seed)
    pages = DISK_BYTES // consts.PAGE_SIZE
    unused = [0, 0, 0, b"\0\0"] * (consts.BLKIF_MAX_SEGMENTS_PER_REQUEST - 1)
    requests, expected = [], []
    for chunk in range(IMAGES):
        reqs, exps = bytearray(half * entry), bytearray(half * entry)
        for i in range(half):
            slot = (chunk % 2) * half + i
            op = rng.choice((int(BlkifOp.READ), int(BlkifOp.WRITE)))
            rid = chunk << 16 | slot
            sector = rng.randrange(pages) * IO_SECTORS
            gref = raw.pages[slot][1]
            body = req.pack(op, 1, handle, bytes(4), rid, sector, gref, 0, IO_SECTORS - 1, b"\0\0", *unused)
            reqs[i * entry : i * entry + len(body)] = body
            exps[i * entry : i * entry + len(body)] = body
            write_rsp(exps, i * entry, rid, op, 0)
        requests.append(bytes(reqs))
        expected.append(bytes(exps))
    return requests, expected


def _fill(load: _Load, notify: Callable[[int], None]) -> None:
    """Push the next chunk into the half of the ring it belongs to, then notify if RING-6 says so."""
    ring, half, entry = load.raw.ring, load.half, load.entry
    start = SRING_HEADER_SIZE + (load.pushed % 2) * half * entry
    load.raw.buf[start : start + half * entry] = load.requests[load.pushed % IMAGES]
    load.pushed += 1
    ring.req_prod_pvt = (ring.req_prod_pvt + half) & _M
    if ring.push_requests():
        notify(load.raw.port)


def _retire(load: _Load, prod: int) -> int:
    """Retire responses up to `prod`, checking each against its expected image; return how many."""
    ring = load.raw.ring
    n = (prod - ring.rsp_cons) & _M
    if n > ring.size:  # RING-9: a backend answering more than was asked is broken, not slow
        raise XenError(f"rsp_prod {prod} runs {n} past rsp_cons {ring.rsp_cons}")
    half, entry, buf = load.half, load.entry, load.raw.buf
    done = load.retired
    end = done + n
    while done < end:
        chunk, pos = divmod(done, half)
        stop = min(end, (chunk + 1) * half) - chunk * half
        base = SRING_HEADER_SIZE + (chunk % 2) * half * entry
        want = load.expected[chunk % IMAGES]
        if buf[base + pos * entry : base + stop * entry].tobytes() != want[pos * entry : stop * entry]:
            _classify(load, chunk, pos, stop)
        done += stop - pos
    load.retired = end
    ring.rsp_cons = prod
    return n


def _classify(load: _Load, chunk: int, first: int, stop: int) -> None:
    """Count what is wrong in slots [first, stop) of a chunk (the slow path: only when a compare failed).

    A real backend completes requests out of order, so a slot may answer any request of the
    chunks that can be in flight (this one, the one before, the one after): its id names the
    request (`chunk image << 16 | ring slot`), whose operation it must echo. The rest of the slot
    must still be the bytes the request there left (SEC-5: padding untouched)."""
    c = codec.codecs(ABI)
    rsp, req, write_rsp = c.response, c.request_rw, c.response.field_packer("id", "operation", "status")
    entry, buf, half = load.entry, load.raw.buf, load.half
    base = SRING_HEADER_SIZE + (chunk % 2) * half * entry
    want = load.expected[chunk % IMAGES]
    in_flight = {(chunk + d) % IMAGES for d in (-1, 0, 1)}
    for i in range(first, stop):
        got = buf[base + i * entry : base + (i + 1) * entry].tobytes()
        if got == want[i * entry : (i + 1) * entry]:
            continue
        g = rsp.unpack_from(got)
        rid, op, status = g[0], g[1], g[3]
        image, slot = rid >> 16, rid & 0xFFFF
        pos = slot - (image % 2) * half
        if status != 0:
            load.bad["status"] += 1
        elif (
            image not in in_flight
            or not 0 <= pos < half
            or (req.unpack_from(load.requests[image][pos * entry : (pos + 1) * entry])[0] != op)
        ):
            load.bad["echo"] += 1
        else:
            same = bytearray(want[i * entry : (i + 1) * entry])
            write_rsp(same, 0, rid, op, 0)
            if bytes(same) != got:
                load.bad["padding"] += 1


def _drive(loads: list[_Load], notify: Callable[[int], None], until: float) -> None:
    """Keep every ring full until `until`: retire what is answered, refill a half ring at a time."""
    clock, sleep = time.perf_counter, time.sleep
    while clock() < until:
        busy = False
        for load in loads:
            ring = load.raw.ring
            prod = ring.shared.words[RSP_PROD]
            if prod != ring.rsp_cons:
                _retire(load, prod)
            if ring.size - ((ring.req_prod_pvt - ring.rsp_cons) & _M) >= load.half:
                _fill(load, notify)
                busy = True
        if not busy:
            sleep(IDLE_SLEEP)


def _drain(loads: list[_Load], timeout: float) -> None:
    """Retire every request still in flight, so the block API may use the queues again."""
    deadline = time.perf_counter() + timeout
    for load in loads:
        ring = load.raw.ring
        while ring.rsp_cons != ring.req_prod_pvt:
            prod = ring.shared.words[RSP_PROD]
            if prod != ring.rsp_cons:
                _retire(load, prod)
            elif time.perf_counter() > deadline:
                raise XenError(f"{(ring.req_prod_pvt - ring.rsp_cons) & _M} requests unanswered after drain")
            else:
                time.sleep(0.0005)


def _loads(fe: Frontend, queues: int, ring_order: int) -> list[_Load]:
    """Take each queue's ring from the connected frontend and pre-encode its chunks."""
    loads = []
    for q in range(queues):
        raw = fe.raw_queue(q, raw_size := 32 << ring_order)
        if raw.ring.req_prod_pvt & (raw_size - 1):
            raise XenError("raw_queue lent a ring that was already used: chunks would straddle halves")
        requests, expected = _chunks(raw, seed=q + 1, handle=fe.config.handle)
        loads.append(_Load(raw, raw.ring.shared.entry_size, raw_size // 2, requests, expected))
    return loads


class _Run:
    """One queue count: a connected pair, its loads, and the sum of its measured slices."""

    def __init__(self, xen: SimXen, queues: int) -> None:
        self.queues = queues
        self.store = MemoryStore(DISK_BYTES, shared=True)
        self.store.write(0, bytes(DISK_BYTES))  # fault every page in now, not inside a window
        be_config = BackendConfig(max_queues=queues, max_ring_page_order=RING_ORDER, ring_workers="process")
        fe_config = FrontendConfig(max_queues=queues, max_ring_page_order=RING_ORDER, persistent=True)
        self.pair = ReferencePair(xen, be_config, fe_config, size=DISK_BYTES, store=self.store)
        neg = self.pair.connect()
        if neg.queues != queues or neg.ring_page_order != RING_ORDER or not neg.persistent:
            wanted = f"{queues} queues, ring order {RING_ORDER}, persistent grants"
            raise XenError(f"negotiated {neg.as_report()}, wanted {wanted}")
        fe = self.pair.frontend
        self.loads = _loads(fe, queues, RING_ORDER)
        self.notify = fe.xen.evtchn.notify
        self.workers = self.pair.backend.ring_worker_pids
        self.responses = [0] * queues
        self.worker_cpu = [0.0] * queues
        self.elapsed = self.generator_cpu = self.parent_cpu = self.others_cpu = 0.0

    def warm(self, seconds: float) -> None:
        """Drive without counting: every persistent grant gets mapped, caches fill."""
        _drive(self.loads, self.notify, time.perf_counter() + seconds)
        _drain(self.loads, timeout=5.0)

    def slice(self, seconds: float) -> None:
        """One measured slice from idle rings; the drain after it is not counted."""
        loads = self.loads
        done0 = [load.retired for load in loads]
        cpu0 = [_process_cpu(pid) for pid in self.workers]
        gen0, proc0, busy0 = time.thread_time(), sum(os.times()[:2]), _machine_busy()
        t0 = time.perf_counter()
        _drive(loads, self.notify, t0 + seconds)
        t1 = time.perf_counter()
        done1 = [load.retired for load in loads]
        cpu1 = [_process_cpu(pid) for pid in self.workers]
        gen1, proc1, busy1 = time.thread_time(), sum(os.times()[:2]), _machine_busy()
        _drain(loads, timeout=5.0)
        self.elapsed += t1 - t0
        self.generator_cpu += gen1 - gen0
        self.parent_cpu += proc1 - proc0
        ours = proc1 - proc0 + sum(cpu1) - sum(cpu0)
        self.others_cpu += max(0.0, busy1 - busy0 - ours)
        for q in range(self.queues):
            self.responses[q] += done1[q] - done0[q]
        for q, (before, after) in enumerate(zip(cpu0, cpu1, strict=True)):  # none for a live backend
            self.worker_cpu[q] += after - before

    def finish(self) -> dict:
        """Check the disk through the block API, close the pair and report (`measure` checks leaks)."""
        fe, be = self.pair.frontend, self.pair.backend
        try:
            data_ok = _data_check(fe, self.queues)
        finally:
            self.close()
        errors = be.errors + [str(v) for v in be.violations] + [str(v) for v in fe.violations]
        return self._result(data_ok, errors)

    def _result(self, data_ok: bool, errors: list[str]) -> dict:
        """The figures of this queue count, as `run` prints them."""
        return {
            "queues": self.queues,
            "iops": sum(self.responses) / self.elapsed,
            "iops_per_queue": [n / self.elapsed for n in self.responses],
            "seconds": self.elapsed,
            "responses": sum(self.responses),
            "bad_responses": {kind: sum(load.bad[kind] for load in self.loads) for kind in self.loads[0].bad},
            "data_ok": data_ok,
            "errors": errors,
            "cpu_s": {  # /proc counts in clock ticks: more digits would be noise
                "backend_workers": [round(c, 3) for c in self.worker_cpu],
                "generator": round(self.generator_cpu, 3),
                "parent_process": round(self.parent_cpu, 3),
                "other_processes": round(self.others_cpu, 3),
            },
        }

    def close(self) -> None:
        """Guest close and backend stop. No leak check here: the pairs share two domains, so
        what one still holds shows up as another's leak until all are closed."""
        try:
            self.pair.close(check=False)
        finally:
            self.store.close()


class _LiveRun(_Run):
    """One queue count against a live backend (`--backend=live`): the suite's frontend over dom0's
    grant and event-channel devices, the real backend's kernel threads serving the rings."""

    def __init__(self, live, queues: int) -> None:  # a blkif_spec.live.LiveOptions
        from blkif_spec.live import LiveBackendUnderTest

        self.queues = queues
        self.env = LiveBackendUnderTest(live, timeout=20.0)
        neg = self.env.connect(max_queues=queues, max_ring_page_order=RING_ORDER, persistent=True)
        if neg.queues != queues or not neg.persistent:
            self.env.close()
            wanted = f"{queues} queues, persistent grants"
            raise XenError(f"the live backend negotiated {neg.as_report()}: wanted {wanted}")
        fe = self.env.peer
        self.loads = _loads(fe, queues, neg.ring_page_order)
        self.notify = fe.evtchn.notify
        self.workers = []  # the backend's kernel threads: their CPU is not ours to read
        self.responses = [0] * queues
        self.worker_cpu = []
        self.elapsed = self.generator_cpu = self.parent_cpu = self.others_cpu = 0.0

    def finish(self) -> dict:
        fe = self.env.peer
        try:
            data_ok = _data_check(fe, self.queues)
        finally:
            self.close()
        return self._result(data_ok, [str(v) for v in fe.violations])

    def close(self) -> None:
        self.env.close()


def measure_live(live, queue_counts: list[int], seconds: float, *, slice_s: float = 0.5) -> list[dict]:
    """`measure` against a live backend: one connection at a time (one test device), no interleaving."""
    results = []
    for q in queue_counts:
        run = _LiveRun(live, q)
        try:
            run.warm(0.3)
            slices = max(1, round(seconds / slice_s))
            for _ in range(slices):
                run.slice(seconds / slices)
        except BaseException:
            run.close()
            raise
        results.append(run.finish())
    return results


def measure(
    queue_counts: list[int], seconds: float, *, slice_s: float = 0.5, warmup: float = 0.3
) -> list[dict]:
    """IOPS and CPU per process for each queue count, `seconds` of measured time each.

    Every pair is connected first, then the queue counts take turns in slices of
    `slice_s`: on a shared machine a change of background load then falls on all
    of them alike instead of on whichever ran at that moment, so the ratios hold.
    """
    slices = max(1, round(seconds / slice_s))
    runs: list[_Run] = []
    with SimXen() as xen:
        try:
            for q in queue_counts:
                runs.append(_Run(xen, q))
            for run in runs:
                run.warm(warmup)
            for _ in range(slices):
                for run in runs:
                    run.slice(seconds / slices)
            pairs = [run.pair for run in runs]
            results = [runs.pop(0).finish() for _ in range(len(runs))]
            for pair, result in zip(pairs, results, strict=True):
                try:  # all closed now: no grant, mapping, port or node may remain
                    pair.check_clean()
                except Leak as leak:
                    result["errors"].append(str(leak)[:500])
            return results
        finally:
            for run in runs:  # only on an error: the normal path finished (and closed) them all
                run.close()


def _data_check(fe: Frontend, queues: int) -> bool:
    """After the load: a write then a read on each queue through the block API must round-trip.

    Proves the workers and the parent share one disk and that the rings were left consistent.
    """
    ok = True
    for q in range(queues):
        sector = (q * 4099 + 17) * IO_SECTORS
        data = os.urandom(consts.PAGE_SIZE)
        w = fe.write(sector, data, queue=q)
        r = fe.read(sector, IO_SECTORS, queue=q)
        ok &= w.status == 0 and r.status == 0 and r.data == data
    return ok


def run(args: argparse.Namespace) -> int:
    cores = os.cpu_count() or 1
    target = "reference pair"
    if args.backend == "live":
        from blkif_spec import live

        options = live.LiveOptions(args.xen_device, 0, args.xen_backend_kind, args.xen_vdev,
                                   args.xen_allow_dataloss)  # fmt: skip
        try:
            live.check_safe(options)
        except live.LiveRefused as exc:
            print(f"bench iops: {exc}")
            return 2
        target = f"live {live.KINDS[options.backend_kind]} on {options.device}"
        results = measure_live(options, args.queues, args.seconds, slice_s=args.slice)
    elif args.backend != "reference":
        print(f"bench iops: --backend {args.backend!r}: reference or live")
        return 2
    else:
        results = measure(args.queues, args.seconds, slice_s=args.slice)
    one = next((r["iops"] for r in results if r["queues"] == 1), None)
    for r in results:
        r["vs_1q"] = r["iops"] / one if one else None
    bad = sum(sum(r["bad_responses"].values()) for r in results)
    failed = bad or any(not r["data_ok"] or r["errors"] for r in results)
    if args.json:
        print(json.dumps({"cores": cores, "ring_order": RING_ORDER, "seconds": args.seconds,
                          "results": results}, indent=2))  # fmt: skip
        return 1 if failed else 0
    print(f"bench iops: {target}, 4 KiB random read/write (50/50), ring order {RING_ORDER}, "
          f"persistent grants, {cores} cores, {args.seconds:g} s per queue count")  # fmt: skip
    print(f"{'queues':<8}{'IOPS':>9}{'vs 1q':>8}   {'cpu s (backend workers)':<27}{'(generator)':<13}"
          f"{'(parent)':<10}{'(others)':<10}{'bad':>4}")  # fmt: skip
    for r in results:
        cpu = r["cpu_s"]
        workers = " + ".join(f"{c:.2f}" for c in cpu["backend_workers"])
        ratio = f"{r['vs_1q']:.2f}x" if r["vs_1q"] else "-"
        print(f"{r['queues']:<8}{r['iops']:>9.0f}{ratio:>8}   {workers:<27}{cpu['generator']:<13.2f}"
              f"{cpu['parent_process']:<10.2f}{cpu['other_processes']:<10.2f}"
              f"{sum(r['bad_responses'].values()):>4}")  # fmt: skip
        for e in r["errors"]:
            print(f"  error: {e}")
        if not r["data_ok"]:
            print("  error: write/read round trip after the load failed")
    print("(generator): the load generator thread; (parent): its whole process; (others): the rest of the"
          " machine, which a shared machine's figures must be judged by")  # fmt: skip
    print("goals (2 cores): 1 queue >= 100,000 IOPS and >= 1/4 of ring_anchor.py; 2 queues >= 1.6x 1 queue")
    print("(or >= 0.9x the anchor's own ratio): run ../shared/perf/ring_anchor.py in the same minute")
    return 1 if failed else 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("iops", help="IOPS of the reference pair for 1, 2 and 4 queues, CPU per process")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--seconds", type=float, default=3.0, help="measured window per queue count (default 3)")
    p.add_argument("--queues", type=int, nargs="+", default=[1, 2, 4], help="queue counts (default 1 2 4)")
    p.add_argument("--slice", type=float, default=0.5, help="queue counts take turns in slices this long")
    p.add_argument("--backend", default="reference", help="reference (default) or live (root in dom0)")
    p.add_argument("--xen-device", default=None, help="live: the block device the run may overwrite")
    p.add_argument("--xen-backend-kind", choices=("vbd", "qdisk"), default="vbd", help="live: vbd or qdisk")
    p.add_argument("--xen-vdev", default="xvdf", help="live: the virtual device created (default xvdf)")
    p.add_argument("--xen-allow-dataloss", action="store_true", help="live: accept a device holding data")
    p.set_defaults(run=run)
