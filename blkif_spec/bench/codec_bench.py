"""`bench codec`: per-item parse and build cost of the four ways to handle a request.

Workload (conventions §9): a full x86_64 READ request with 11 segments, and a
response. Measured in one run, best of several repeats, for construct,
compiled construct, the derived fast codec (`blkif_spec.codec`) and raw
`struct` with a hand-written format of the same layout (the yardstick).
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import timeit
from collections.abc import Callable

from blkif_spec import codec, consts, wire

# The yardstick: the same layouts written by hand, as a driver would.
RAW_REQUEST = struct.Struct("<BBH4sQQ" + "IBB2s" * 11)
RAW_RESPONSE = struct.Struct("<QB1sh4s")


def _request_obj() -> dict:
    segs = [{"gref": 100 + i, "first_sect": 0, "last_sect": 7, "_pad0": b"\0\0"} for i in range(11)]
    return {"operation": consts.BlkifOp.READ, "nr_segments": 11, "handle": 51712, "_pad0": bytes(4),
            "id": 0x1234, "sector_number": 4096, "seg": segs}  # fmt: skip


def _per_item(fn: Callable[[], object], number: int, repeat: int) -> float:
    """Best-of-`repeat` seconds per call."""
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number


def _figures(con, fast: codec.Codec, raw: struct.Struct, obj: dict, number: int, repeat: int) -> dict:
    """(parse, build) seconds per item for each implementation of one structure."""
    compiled = con.compile()
    data = con.build(obj)
    flat = fast.from_container(obj)
    buf = bytearray(len(data))
    n_con = max(number // 20, 200)  # construct is slow: fewer calls, the same per-item figure
    return {
        "construct": (_per_item(lambda: con.parse(data), n_con, repeat),
                      _per_item(lambda: con.build(obj), n_con, repeat)),
        "compiled": (_per_item(lambda: compiled.parse(data), n_con, repeat),
                     _per_item(lambda: compiled.build(obj), n_con, repeat)),
        "fast": (_per_item(lambda: fast.unpack_from(data, 0), number, repeat),
                 _per_item(lambda: fast.pack_into(buf, 0, *flat), number, repeat)),
        "struct": (_per_item(lambda: raw.unpack_from(data, 0), number, repeat),
                   _per_item(lambda: raw.pack_into(buf, 0, *flat), number, repeat)),
    }  # fmt: skip


def measure(number: int = 20000, repeat: int = 5) -> list[dict]:
    a = wire.abi(consts.X86_64_ABI)
    c = codec.codecs(consts.X86_64_ABI)
    rows = []
    items = (
        ("request", a.request_rw, c.request_rw, RAW_REQUEST, _request_obj()),
        ("response", a.response, c.response, RAW_RESPONSE,
         {"id": 0x1234, "operation": 0, "_pad0": b"\0", "status": 0, "_pad1": bytes(4)}),
    )  # fmt: skip
    for name, con, fast, raw, obj in items:
        for impl, (parse_s, build_s) in _figures(con, fast, raw, obj, number, repeat).items():
            rows.append({"item": name, "impl": impl, "parse_ns": parse_s * 1e9, "build_ns": build_s * 1e9})
    return rows


def _ratio(rows: list[dict], item: str, key: str) -> float:
    by = {r["impl"]: r[key] for r in rows if r["item"] == item}
    return by["fast"] / by["struct"]


def run(args: argparse.Namespace) -> int:
    rows = measure(number=args.number, repeat=args.repeat)
    ratios = {f"{item}_{key[:-3]}": _ratio(rows, item, key)
              for item in ("request", "response") for key in ("parse_ns", "build_ns")}  # fmt: skip
    if args.json:
        print(json.dumps({"cores": os.cpu_count(), "results": rows, "fast_over_struct": ratios}, indent=2))
        return 0
    print(f"bench codec: x86_64 READ request (11 segments) and response; best of {args.repeat}, "
          f"{os.cpu_count()} cores")  # fmt: skip
    print(f"{'item':<10}{'impl':<11}{'parse ns':>10}{'build ns':>10}")
    for r in rows:
        print(f"{r['item']:<10}{r['impl']:<11}{r['parse_ns']:>10.0f}{r['build_ns']:>10.0f}")
    print("fast codec / raw struct: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items())
          + "  (goal <= 1.5x)")  # fmt: skip
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("codec", help="parse/build cost: construct, compiled, fast codec, struct")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--number", type=int, default=20000, help="calls per timing (default 20000)")
    p.add_argument("--repeat", type=int, default=5, help="timings per figure, best kept (default 5)")
    p.set_defaults(run=run)
