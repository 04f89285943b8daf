"""The blkif shared ring (`ring.h`) as sans-IO Python over any writable buffer.

Nothing here blocks, sleeps, signals or spawns: a `SharedRing` is a view over
memory that somebody else maps (a `bytearray` in simulation, an `mmap` or
`multiprocessing.shared_memory` block in the benchmark, a grant-mapped page in
live mode); `FrontRing` and `BackRing` hold the private indices each side keeps
(RING-2) and return *decisions* ("notify the peer", "there is work") for the
caller to act on. Event channels and threads belong to the drivers.

Index arithmetic (RING-1) is written once as small pure functions at the top of
the module so that tests, the differential test against the real `ring.h`
macros and the reference drivers share one definition. The `FrontRing` /
`BackRing` methods inline the same expressions because they sit on the
per-request hot path (a reference backend moves >100k requests/s through them);
`tests/test_ring_h.py` checks both forms against the C macros.

Index words are read and written through one ``memoryview.cast("I")`` so every
access is a single aligned 4-byte load or store: ``struct.pack_into`` writes a
field in pieces and another process can observe a transient 0 (conventions §3).

Memory ordering: CPython offers no explicit fence. The "publish, then read the
peer's event word" (RING-6) and "write the event word, then re-check" (RING-7)
steps are store→load sequences that a real driver separates with a full
barrier. Within one process (simulation) the GIL serialises them; across
processes the interpreter's work between the store and the load dwarfs a
store-buffer drain, which is good enough for a benchmark but not a proof.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from blkif_spec.consts import MAX_RING_PAGE_ORDER, PAGE_SIZE, RING_IDX_MASK, SRING_HEADER_SIZE
from blkif_spec.errors import RuleViolation

if TYPE_CHECKING:
    from typing_extensions import Buffer  # collections.abc.Buffer from Python 3.12

__all__ = [
    "ENTRY_SIZE_BY_ABI",
    "ENTRY_SIZE_X86_32",
    "ENTRY_SIZE_X86_64",
    "REQ_EVENT",
    "REQ_PROD",
    "RSP_EVENT",
    "RSP_PROD",
    "BackRing",
    "FrontRing",
    "SharedRing",
    "free_requests",
    "idx_add",
    "idx_sub",
    "need_notify",
    "nr_unconsumed_requests",
    "nr_unconsumed_responses",
    "request_cons_overflow",
    "request_prod_overflow",
    "response_prod_overflow",
    "ring_bytes",
    "ring_size",
    "round_down_pow2",
]

_M = RING_IDX_MASK  # RING_IDX is uint32: every index result is taken modulo 2^32 (RING-1)

#: `sizeof(union blkif_sring_entry)` per ABI (inventory §1.1, WIRE-1).
ENTRY_SIZE_X86_64 = 112
ENTRY_SIZE_X86_32 = 108
ENTRY_SIZE_BY_ABI: dict[str, int] = {
    "x86_64-abi": ENTRY_SIZE_X86_64,
    "arm-abi": ENTRY_SIZE_X86_64,
    "x86_32-abi": ENTRY_SIZE_X86_32,
}

#: Positions of the four index words in the ``cast("I")`` view of the header (WIRE-8).
REQ_PROD = 0  # byte offset 0
REQ_EVENT = 1  # byte offset 4
RSP_PROD = 2  # byte offset 8
RSP_EVENT = 3  # byte offset 12


# --------------------------------------------------------------------------------------
# Pure index arithmetic (RING-1). Arguments are RING_IDX values (0 <= x < 2^32).
# --------------------------------------------------------------------------------------


def idx_add(a: int, n: int) -> int:
    """`a + n` as RING_IDX: indices are free-running and wrap at 2^32 (RING-1)."""
    return (a + n) & _M


def idx_sub(a: int, b: int) -> int:
    """`a − b` as RING_IDX: the distance from b forward to a, modulo 2^32 (RING-1)."""
    return (a - b) & _M


def need_notify(old: int, new: int, event: int) -> bool:
    """RING-6 hold-off: notify iff `event` lies in (old, new] modulo 2^32.

    Written as ring.h writes it, `(new − event) < (new − old)` in RING_IDX
    arithmetic, so it is exact across the 2^32 wrap.
    """
    return ((new - event) & _M) < ((new - old) & _M)


def free_requests(size: int, req_prod_pvt: int, rsp_cons: int) -> int:
    """RING-3 free request slots of a frontend: `RING_SIZE − (req_prod_pvt − rsp_cons)`.

    Negative when the frontend has over-produced (the C macro, being unsigned,
    wraps instead; mask with 2^32 − 1 to compare).
    """
    return size - ((req_prod_pvt - rsp_cons) & _M)


def nr_unconsumed_requests(size: int, req_prod: int, req_cons: int, rsp_prod_pvt: int) -> int:
    """RING_HAS_UNCONSUMED_REQUESTS: requests the backend may consume now.

    The lesser of what the frontend published and what the slots allow: a
    backend never holds more than RING_SIZE unanswered requests (RING-8), so
    an over-producing frontend cannot make it read a response position.
    """
    req = (req_prod - req_cons) & _M
    rsp = (size - (req_cons - rsp_prod_pvt)) & _M
    return req if req < rsp else rsp


def nr_unconsumed_responses(rsp_prod: int, rsp_cons: int) -> int:
    """RING_HAS_UNCONSUMED_RESPONSES: responses published and not yet consumed."""
    return (rsp_prod - rsp_cons) & _M


def request_cons_overflow(size: int, cons: int, rsp_prod_pvt: int) -> bool:
    """RING-8 (RING_REQUEST_CONS_OVERFLOW): consuming index `cons` would exceed RING_SIZE unanswered."""
    return ((cons - rsp_prod_pvt) & _M) >= size


def request_prod_overflow(size: int, prod: int, rsp_prod_pvt: int) -> bool:
    """RING-9 (RING_REQUEST_PROD_OVERFLOW): a frontend published more requests than there are slots."""
    return ((prod - rsp_prod_pvt) & _M) > size


def response_prod_overflow(size: int, prod: int, rsp_cons: int) -> bool:
    """RING-9 (RING_RESPONSE_PROD_OVERFLOW): a backend published more responses than there are slots."""
    return ((prod - rsp_cons) & _M) > size


def round_down_pow2(n: int) -> int:
    """Largest power of two ≤ n (ring.h's `__RD32`), 0 for n = 0."""
    if n < 0:
        raise ValueError(f"round_down_pow2 of negative value {n}")
    return 1 << (n.bit_length() - 1) if n else 0


def _check_order(order: int) -> int:
    # bool is an int subclass; `True` as a ring order is a caller bug, not order 1.
    if type(order) is not int or not 0 <= order <= MAX_RING_PAGE_ORDER:
        raise ValueError(f"ring page order {order!r} outside 0..{MAX_RING_PAGE_ORDER} (MPR-4)")
    return order


def ring_bytes(order: int) -> int:
    """Bytes spanned by a ring of `2^order` 4 KiB pages (WIRE-10), order 0..4 (MPR-4)."""
    return PAGE_SIZE << _check_order(order)


def ring_size(order: int, entry_size: int) -> int:
    """RING_SIZE for a ring of `2^order` pages and `entry_size`-byte slots (WIRE-9).

    The largest power of two ≤ (4096·2^order − 64) // entry_size, so a slot is
    `idx & (RING_SIZE − 1)`. For both real entry sizes (112 and 108) this is
    32·2^order (WIRE-10).
    """
    nbytes = ring_bytes(order)
    if type(entry_size) is not int or entry_size <= 0:
        raise ValueError(f"ring entry size {entry_size!r} is not a positive integer (WIRE-1)")
    size = round_down_pow2((nbytes - SRING_HEADER_SIZE) // entry_size)
    if size == 0:
        raise ValueError(f"ring entry size {entry_size} leaves no slot in {nbytes} bytes (WIRE-9)")
    return size


# --------------------------------------------------------------------------------------
# The shared page
# --------------------------------------------------------------------------------------


class SharedRing:
    """The shared ring page(s): 64-byte header, then RING_SIZE slots (WIRE-8, WIRE-9).

    Holds no protocol state of its own: the four index words live in the
    buffer, read and written through the single ``cast("I")`` view `words`
    (positions `REQ_PROD`, `REQ_EVENT`, `RSP_PROD`, `RSP_EVENT`). Slot views are
    made once here so a slot read or write on the hot path allocates nothing
    but the copy itself. Call `release()` (or use `with`) before closing an
    `mmap` or shared-memory block the ring views.
    """

    __slots__ = ("_buf", "_slots", "entry_size", "mask", "nbytes", "order", "size", "words")

    def __init__(self, buf: Buffer, order: int = 0, entry_size: int = ENTRY_SIZE_X86_64) -> None:
        if sys.byteorder != "little":  # the ring is little-endian on every Xen ABI (§1)
            raise RuntimeError("SharedRing reads index words natively and needs a little-endian host")
        self.size = ring_size(order, entry_size)
        self.order = order
        self.entry_size = entry_size
        self.mask = self.size - 1
        self.nbytes = ring_bytes(order)
        mv = memoryview(buf)
        if mv.readonly:
            mv.release()
            raise TypeError(f"ring buffer must be writable, got read-only {type(buf).__name__}")
        try:
            mv = mv.cast("B")
        except TypeError:
            mv.release()
            raise TypeError("ring buffer must be C-contiguous") from None
        if mv.nbytes < self.nbytes:
            have = mv.nbytes
            mv.release()
            raise ValueError(
                f"ring buffer of {have} bytes is shorter than 4096·2^{order} = {self.nbytes} "
                f"bytes needed for ring order {order} (WIRE-10)"
            )
        self._buf = mv
        self.words = mv[:16].cast("I")
        base = SRING_HEADER_SIZE
        self._slots = tuple(mv[base + i * entry_size : base + (i + 1) * entry_size] for i in range(self.size))

    # -- header ------------------------------------------------------------------------

    def init(self, start: int = 0) -> None:
        """SHARED_RING_INIT, the frontend's job only (WIRE-8, RING-11).

        `req_prod = rsp_prod = start`, `req_event = rsp_event = start + 1`, the
        48 private/padding bytes zeroed. ring.h always uses start 0; a non-zero
        `start` lets tests begin just below 2^32 (RING-1, RING-12).
        """
        start &= _M
        w = self.words
        w[REQ_PROD] = start
        w[RSP_PROD] = start
        w[REQ_EVENT] = (start + 1) & _M
        w[RSP_EVENT] = (start + 1) & _M
        self._buf[16:SRING_HEADER_SIZE] = bytes(SRING_HEADER_SIZE - 16)

    @property
    def req_prod(self) -> int:
        return self.words[REQ_PROD]

    @req_prod.setter
    def req_prod(self, value: int) -> None:
        self.words[REQ_PROD] = value & _M

    @property
    def req_event(self) -> int:
        return self.words[REQ_EVENT]

    @req_event.setter
    def req_event(self, value: int) -> None:
        self.words[REQ_EVENT] = value & _M

    @property
    def rsp_prod(self) -> int:
        return self.words[RSP_PROD]

    @rsp_prod.setter
    def rsp_prod(self, value: int) -> None:
        self.words[RSP_PROD] = value & _M

    @property
    def rsp_event(self) -> int:
        return self.words[RSP_EVENT]

    @rsp_event.setter
    def rsp_event(self, value: int) -> None:
        self.words[RSP_EVENT] = value & _M

    def header_padding(self) -> bytes:
        """The 48 private/padding bytes after the index words (WIRE-8)."""
        return self._buf[16:SRING_HEADER_SIZE].tobytes()

    # -- slots -------------------------------------------------------------------------

    def slot_offset(self, idx: int) -> int:
        """Byte offset of the slot for free-running index `idx`: `64 + (idx & (size−1))·entry` (WIRE-9)."""
        return SRING_HEADER_SIZE + (idx & self.mask) * self.entry_size

    def read_slot(self, idx: int) -> bytes:
        """One private copy of the slot for `idx` (RING-10): validate the copy, never re-read the ring."""
        return self._slots[idx & self.mask].tobytes()

    def write_slot(self, idx: int, data: Buffer) -> None:
        """Write `data` at the start of the slot for `idx`; the rest of the slot is left as it was.

        A response (16 or 12 bytes, WIRE-5) thus overwrites only its own bytes
        of the slot that held the request.
        """
        view = self._slots[idx & self.mask]
        n = len(data)  # bytes-like of 1-byte items: len() is the byte count
        if n > self.entry_size:
            raise ValueError(f"{n} bytes do not fit a {self.entry_size}-byte ring slot (WIRE-1)")
        view[:n] = data

    def write_at(self, idx: int, offset: int, data: Buffer) -> None:
        """Write `data` at `offset` inside the slot for `idx`, nothing else (SEC-5: fields, not padding)."""
        n = len(data)
        if offset < 0 or offset + n > self.entry_size:
            raise ValueError(f"{n} bytes at offset {offset} do not fit a {self.entry_size}-byte ring slot")
        self._slots[idx & self.mask][offset : offset + n] = data

    def slot_view(self, idx: int) -> memoryview:
        """The live view of the slot for `idx` (for in-place encoders; readers should use `read_slot`)."""
        return self._slots[idx & self.mask]

    # -- lifetime ----------------------------------------------------------------------

    def release(self) -> None:
        """Release every view on the buffer so an `mmap`/shared-memory block can be closed.

        Idempotent; any later access raises ValueError (released memoryview).
        """
        for view in self._slots:
            view.release()
        self.words.release()
        self._buf.release()

    def __enter__(self) -> SharedRing:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        w = self.words
        try:
            w.tolist()
        except ValueError:
            return f"<SharedRing order={self.order} size={self.size} released>"
        return (
            f"<SharedRing order={self.order} size={self.size} entry={self.entry_size} "
            f"req_prod={w[0]} req_event={w[1]} rsp_prod={w[2]} rsp_event={w[3]}>"
        )


# --------------------------------------------------------------------------------------
# The two ends
# --------------------------------------------------------------------------------------


class FrontRing:
    """The frontend's end: produces requests, consumes responses (RING-2).

    `req_prod_pvt` (requests written, not yet necessarily published) and
    `rsp_cons` are private to the frontend and never stored in the page.
    Producing: `put_request()` ... then `push_requests()`; consuming:
    `unconsumed_responses()`, `get_response()` that many times, and
    `final_check_for_responses()` before sleeping.
    """

    __slots__ = ("_w", "req_prod_pvt", "rsp_cons", "shared", "size")

    def __init__(self, shared: SharedRing) -> None:
        self.shared = shared
        self.size = shared.size
        self._w = shared.words
        self.req_prod_pvt = 0
        self.rsp_cons = 0

    def init(self, start: int = 0) -> None:
        """XEN_FRONT_RING_INIT: initialise the shared page, then attach at `start` (WIRE-8, RING-11)."""
        self.shared.init(start)
        self.attach(start)

    def attach(self, start: int = 0) -> None:
        """FRONT_RING_ATTACH: set the private indices only; the page is not touched."""
        self.req_prod_pvt = self.rsp_cons = start & _M

    # -- producing requests --------------------------------------------------------------

    def free_requests(self) -> int:
        """RING_FREE_REQUESTS (RING-3): at most RING_SIZE requests outstanding."""
        return self.size - ((self.req_prod_pvt - self.rsp_cons) & _M)

    def full(self) -> bool:
        """RING_FULL (RING-3): no free request slot.

        Also True when the ring has been over-produced (raw layer), where the
        unsigned C macro wraps and says "not full".
        """
        return ((self.req_prod_pvt - self.rsp_cons) & _M) >= self.size

    def next_request_slot(self) -> int:
        """Claim the next request index (`req_prod_pvt++`) without any check; write it with `write_slot`.

        The raw layer uses this to over-produce on purpose; well-behaved code
        uses `put_request`.
        """
        idx = self.req_prod_pvt
        self.req_prod_pvt = (idx + 1) & _M
        return idx

    def put_request(self, data: Buffer) -> int:
        """Write one request into the next slot and return its index; not yet visible (RING-4).

        Raises OverflowError when RING_SIZE requests are already outstanding (RING-3).
        """
        idx = self.req_prod_pvt
        if ((idx - self.rsp_cons) & _M) >= self.size:
            raise OverflowError(f"front ring full: {self.size} requests outstanding (RING-3)")
        self.shared.write_slot(idx, data)
        self.req_prod_pvt = (idx + 1) & _M
        return idx

    def push_requests(self) -> bool:
        """RING_PUSH_REQUESTS_AND_CHECK_NOTIFY: publish `req_prod`, return whether to notify (RING-4, RING-6).

        `req_event` is read after the store, so a backend that armed it before
        our publish is seen (`need_notify(old, new, req_event)`).
        """
        w = self._w
        old = w[REQ_PROD]
        new = self.req_prod_pvt
        w[REQ_PROD] = new
        return ((new - w[REQ_EVENT]) & _M) < ((new - old) & _M)

    # -- consuming responses -------------------------------------------------------------

    def unconsumed_responses(self) -> int:
        """Responses published and not consumed; reads `rsp_prod` once (RING-5).

        Raises RuleViolation RING-9 when `rsp_prod − rsp_cons > RING_SIZE`: the
        backend claims more responses than there can be requests.
        """
        prod = self._w[RSP_PROD]
        n = (prod - self.rsp_cons) & _M
        if n > self.size:
            raise RuleViolation(
                "RING-9",
                f"rsp_prod - rsp_cons <= RING_SIZE ({self.size})",
                f"rsp_prod={prod} rsp_cons={self.rsp_cons} (difference {n})",
                "ill-behaved backend (RING_RESPONSE_PROD_OVERFLOW)",
            )
        return n

    def response_prod_overflow(self, prod: int) -> bool:
        """RING_RESPONSE_PROD_OVERFLOW (RING-9) against this ring's `rsp_cons`."""
        return ((prod - self.rsp_cons) & _M) > self.size

    def get_response(self) -> bytes:
        """Copy the response at `rsp_cons` once (RING-10) and advance `rsp_cons`.

        Call only for responses counted by `unconsumed_responses()` (RING-5).
        """
        idx = self.rsp_cons
        self.rsp_cons = (idx + 1) & _M
        return self.shared.read_slot(idx)

    def final_check_for_responses(self) -> bool:
        """RING_FINAL_CHECK_FOR_RESPONSES (RING-7): True if there is work, else arm `rsp_event`.

        With nothing pending, sets `rsp_event = rsp_cons + 1` and re-checks, so
        a response published between the first check and the store is not a
        lost wake-up. Raises RuleViolation RING-9 like `unconsumed_responses`.
        """
        if self.unconsumed_responses():
            return True
        self._w[RSP_EVENT] = (self.rsp_cons + 1) & _M
        return self.unconsumed_responses() > 0


class BackRing:
    """The backend's end: consumes requests, produces responses (RING-2).

    A backend never initialises the page (RING-11); it `attach()`es. `req_cons`
    and `rsp_prod_pvt` are private. Consuming: `poll_requests()` (or
    `unconsumed_requests()`), `get_request()` that many times; producing:
    `put_response()` ... `push_responses()`; before sleeping
    `final_check_for_requests()`.
    """

    __slots__ = ("_w", "req_cons", "rsp_prod_pvt", "shared", "size")

    def __init__(self, shared: SharedRing) -> None:
        self.shared = shared
        self.size = shared.size
        self._w = shared.words
        self.req_cons = 0
        self.rsp_prod_pvt = 0

    def attach(self, start: int | None = None) -> None:
        """BACK_RING_ATTACH without touching the page (RING-11).

        `start=None` attaches at the shared `rsp_prod` as Linux blkback does
        (RING-12); `start=0` is QEMU's BACK_RING_INIT. Like Linux, refuses a
        ring whose `req_prod − start` exceeds RING_SIZE: RuleViolation RING-9.
        """
        w = self._w
        start = w[RSP_PROD] if start is None else start & _M
        prod = w[REQ_PROD]
        if ((prod - start) & _M) > self.size:
            raise RuleViolation(
                "RING-9",
                f"req_prod - rsp_prod <= RING_SIZE ({self.size}) at attach",
                f"req_prod={prod} attach index={start}",
                "ill-behaved frontend: ring refused at connect (RING-12, Linux blkback)",
            )
        self.req_cons = self.rsp_prod_pvt = start

    # -- consuming requests --------------------------------------------------------------

    def unconsumed_requests(self) -> int:
        """RING_HAS_UNCONSUMED_REQUESTS: min(req_prod − req_cons, RING_SIZE − (req_cons − rsp_prod_pvt)).

        Never counts more than the slots allow (RING-8) but does not judge the
        frontend; `poll_requests()` adds the RING-9 check.
        """
        cons = self.req_cons
        req = (self._w[REQ_PROD] - cons) & _M
        rsp = (self.size - (cons - self.rsp_prod_pvt)) & _M
        return req if req < rsp else rsp

    def poll_requests(self) -> int:
        """Linux blkback's loop head: read `req_prod` once (RING-5), judge it, count what may be consumed.

        Raises RuleViolation RING-9 when `req_prod − rsp_prod_pvt > RING_SIZE`
        (ill-behaved frontend); otherwise returns the same count as
        `unconsumed_requests()` for the value read.
        """
        prod = self._w[REQ_PROD]
        size = self.size
        pvt = self.rsp_prod_pvt
        if ((prod - pvt) & _M) > size:
            raise RuleViolation(
                "RING-9",
                f"req_prod - rsp_prod_pvt <= RING_SIZE ({size})",
                f"req_prod={prod} rsp_prod_pvt={pvt} (difference {(prod - pvt) & _M})",
                "ill-behaved frontend (RING_REQUEST_PROD_OVERFLOW)",
            )
        cons = self.req_cons
        req = (prod - cons) & _M
        rsp = (size - (cons - pvt)) & _M
        return req if req < rsp else rsp

    def request_cons_overflow(self, cons: int) -> bool:
        """RING_REQUEST_CONS_OVERFLOW (RING-8): would consuming `cons` exceed RING_SIZE unanswered?"""
        return ((cons - self.rsp_prod_pvt) & _M) >= self.size

    def request_prod_overflow(self, prod: int) -> bool:
        """RING_REQUEST_PROD_OVERFLOW (RING-9): is `prod` more requests than there are slots?"""
        return ((prod - self.rsp_prod_pvt) & _M) > self.size

    def get_request(self) -> bytes:
        """Copy the request at `req_cons` once (RING-10) and advance `req_cons`.

        Raises RuleViolation RING-8 instead of consuming a slot whose response
        position is still pending (`req_cons − rsp_prod_pvt ≥ RING_SIZE`).
        """
        idx = self.req_cons
        if ((idx - self.rsp_prod_pvt) & _M) >= self.size:
            raise RuleViolation(
                "RING-8",
                f"req_cons - rsp_prod_pvt < RING_SIZE ({self.size}) before consuming",
                f"req_cons={idx} rsp_prod_pvt={self.rsp_prod_pvt}",
                "backend consumed past its unanswered-request limit (RING_REQUEST_CONS_OVERFLOW)",
            )
        self.req_cons = (idx + 1) & _M
        return self.shared.read_slot(idx)

    # -- producing responses -------------------------------------------------------------

    def next_response_slot(self) -> int:
        """Claim the next response index (`rsp_prod_pvt++`) without any check (raw layer)."""
        idx = self.rsp_prod_pvt
        self.rsp_prod_pvt = (idx + 1) & _M
        return idx

    def put_response(self, data: Buffer) -> int:
        """Write one response into the next slot and return its index; not yet visible (RING-4).

        Raises OverflowError when every consumed request is already answered
        (a response needs a slot freed by consuming a request, RING-3).
        """
        idx = self.rsp_prod_pvt
        if idx == self.req_cons:
            raise OverflowError("back ring: no consumed request left to answer (RING-3)")
        self.shared.write_slot(idx, data)
        self.rsp_prod_pvt = (idx + 1) & _M
        return idx

    def push_responses(self) -> bool:
        """RING_PUSH_RESPONSES_AND_CHECK_NOTIFY: publish `rsp_prod`, return whether to notify.

        RING-4 publication, RING-6 hold-off against `rsp_event` read after the store.
        """
        w = self._w
        old = w[RSP_PROD]
        new = self.rsp_prod_pvt
        w[RSP_PROD] = new
        return ((new - w[RSP_EVENT]) & _M) < ((new - old) & _M)

    def final_check_for_requests(self) -> bool:
        """RING_FINAL_CHECK_FOR_REQUESTS (RING-7): True if there is work, else arm `req_event`.

        With nothing pending, sets `req_event = req_cons + 1` and re-checks, so
        a request pushed under the hold-off rule is never a lost wake-up.
        """
        if self.unconsumed_requests():
            return True
        self._w[REQ_EVENT] = (self.req_cons + 1) & _M
        return self.unconsumed_requests() > 0
