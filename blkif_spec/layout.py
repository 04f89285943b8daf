"""Check a real C `blkif.h` against the construct definitions of `blkif_spec.wire`.

`check_header()` writes a small C program of our own that includes the header and
prints `sizeof`/`offsetof` of every wire structure, the size and signedness of
every field and the protocol constants as `key value` lines. It is compiled with
gcc once per ABI the host can run (`-m64` for x86_64-abi, `-m32` for x86_32-abi
when gcc-multilib is installed), run, and every number is compared with the
offsets and sizes of the codecs derived from `wire` and with `blkif_spec.consts`.

Two header flavours are understood:

* `xen`: Xen's public header (`libxen-dev`: `/usr/include/xen/io/blkif.h`), one
  C struct per request form, exactly the layouts `wire` models.
* `linux`: a Linux driver tree's `include/xen/interface/io/blkif.h`
  (conventions §10): `struct blkif_request` is `operation` followed by a packed
  union `u` of `rw`, `discard`, `other` and `indirect`, padding is named
  `_pad*`, kernel types (`u8` … `s64`) come from a forced-include shim and the
  x86_32 layout needs `-DCONFIG_X86_32` on top of `-m32` (`-m32` alone gives a
  hybrid that matches no real guest). Selected by `linux_tree=`, or detected
  when the header path ends in `include/xen/interface/io/blkif.h`.

Command line (conventions §2)::

    python -m blkif_spec.layout --header /usr/include/xen/io/blkif.h [--abi x86_32-abi] [--json]
    python -m blkif_spec.layout --header TREE/include/xen/interface/io/blkif.h [--linux-tree TREE]

Exit status: 0 all checks match, 1 at least one mismatch (a field-by-field diff
is printed), 2 the check could not run (no gcc, no header, the program did not
compile or run, no ABI could be checked).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from blkif_spec import codec, consts, wire

#: Where libxen-dev installs Xen's public header (the default of `--header` and `--blkif-header`).
DEFAULT_HEADER = Path("/usr/include/xen/io/blkif.h")
#: A header below this path is a Linux tree's; the tree is what precedes it.
LINUX_HEADER_SUFFIX = ("include", "xen", "interface", "io", "blkif.h")

COMPILE_TIMEOUT = 60.0
RUN_TIMEOUT = 10.0

X64, X32, ARM = consts.X86_64_ABI, consts.X86_32_ABI, consts.ARM_ABI


class LayoutError(Exception):
    """The check could not run: no compiler, no header, or the program failed to build or run."""


# --------------------------------------------------------------------------- what is compared


@dataclass(frozen=True)
class _Field:
    ours: str  # a flat codec field, or an array's name (`seg` covers `seg[0].gref` … `seg[10]._pad0`)
    c: str  # member designator in the C structure (`id`, `u.rw.id`)


@dataclass(frozen=True)
class _Struct:
    ours: str  # structure name in `codec.codecs(abi).structures()`
    label: str  # name shown in reports (the C struct's, or Linux's for the implied "other" form)
    c_type: str  # C type the members are measured in
    size_expr: str  # C expression compared with the codec's size
    size_subject: str  # what the size check is called in reports
    size_kind: str  # "size", or "offset" when the size is a member's offset (blkif_sring.ring)
    fields: tuple[_Field, ...]


def _end_of(c_type: str, member: str) -> str:
    return f"(offsetof({c_type}, {member}) + sizeof((({c_type} *)0)->{member}))"


def _fields(*pairs: str | tuple[str, str]) -> tuple[_Field, ...]:
    return tuple(_Field(p, p) if isinstance(p, str) else _Field(*p) for p in pairs)


def _xen_structs(abi: str) -> list[_Struct]:
    """Xen's public header: one struct per form; padding is unnamed except i386's `pad`."""
    req = "struct blkif_request"
    indirect_pad = (("_pad2", "pad"),) if abi == X32 else ()  # explicit `uint64_t pad` under __i386__
    return [
        _Struct("segment", "blkif_request_segment", "struct blkif_request_segment",
                "sizeof(struct blkif_request_segment)", "blkif_request_segment", "size",
                _fields("gref", "first_sect", "last_sect")),
        _Struct("request_rw", "blkif_request", req, f"sizeof({req})", "blkif_request", "size",
                _fields("operation", "nr_segments", "handle", "id", "sector_number", "seg")),
        _Struct("request_discard", "blkif_request_discard", "struct blkif_request_discard",
                "sizeof(struct blkif_request_discard)", "blkif_request_discard", "size",
                _fields("operation", "flag", "handle", "id", "sector_number", "nr_sectors")),
        _Struct("request_indirect", "blkif_request_indirect", "struct blkif_request_indirect",
                "sizeof(struct blkif_request_indirect)", "blkif_request_indirect", "size",
                _fields("operation", "indirect_op", "nr_segments", "id", "sector_number", "handle",
                        "indirect_grefs", *indirect_pad)),
        # No C struct: the common prefix every request form shares (DIV-1).
        _Struct("request_other", "blkif_request_other", req, _end_of(req, "id"),
                "blkif_request_other", "size",
                _fields("operation", "id")),
        _Struct("response", "blkif_response", "struct blkif_response",
                "sizeof(struct blkif_response)", "blkif_response", "size",
                _fields("id", "operation", "status")),
        _Struct("sring_header", "blkif_sring", "struct blkif_sring",
                "offsetof(struct blkif_sring, ring)", "blkif_sring.ring", "offset",
                _fields("req_prod", "req_event", "rsp_prod", "rsp_event", "pvt", ("_pad0", "__pad"))),
    ]  # fmt: skip


def _linux_structs(abi: str) -> list[_Struct]:
    """A Linux tree's header: request forms are members of the packed union `u`."""
    req = "struct blkif_request"
    pad8 = abi != X32  # the `_pad` before `id` exists only without CONFIG_X86_32

    def opt(ours: str, c: str) -> tuple[tuple[str, str], ...]:
        return ((ours, c),) if pad8 else ()

    return [
        _Struct("segment", "blkif_request_segment", "struct blkif_request_segment",
                "sizeof(struct blkif_request_segment)", "blkif_request_segment", "size",
                _fields("gref", "first_sect", "last_sect")),
        _Struct("request_rw", "blkif_request", req, f"sizeof({req})", "blkif_request", "size",
                _fields("operation", ("nr_segments", "u.rw.nr_segments"), ("handle", "u.rw.handle"),
                        *opt("_pad0", "u.rw._pad1"), ("id", "u.rw.id"),
                        ("sector_number", "u.rw.sector_number"), ("seg", "u.rw.seg"))),
        # Linux's discard member ends with an extra `_pad3` byte (inside the slot, harmless):
        # Xen's 32/28-byte discard request ends exactly where that byte starts.
        _Struct("request_discard", "blkif_request_discard", req,
                f"offsetof({req}, u.discard._pad3)",
                "blkif_request_discard", "size",
                _fields("operation", ("flag", "u.discard.flag"), ("handle", "u.discard._pad1"),
                        *opt("_pad0", "u.discard._pad2"), ("id", "u.discard.id"),
                        ("sector_number", "u.discard.sector_number"),
                        ("nr_sectors", "u.discard.nr_sectors"))),
        _Struct("request_indirect", "blkif_request_indirect", req, _end_of(req, "u.indirect"),
                "blkif_request_indirect", "size",
                _fields("operation", ("indirect_op", "u.indirect.indirect_op"),
                        ("nr_segments", "u.indirect.nr_segments"), *opt("_pad0", "u.indirect._pad1"),
                        ("id", "u.indirect.id"), ("sector_number", "u.indirect.sector_number"),
                        ("handle", "u.indirect.handle"), ("_pad1", "u.indirect._pad2"),
                        ("indirect_grefs", "u.indirect.indirect_grefs"), ("_pad2", "u.indirect._pad3"))),
        _Struct("request_other", "blkif_request_other", req, _end_of(req, "u.other"),
                "blkif_request_other", "size",
                _fields("operation", ("id", "u.other.id"))),
        _Struct("response", "blkif_response", "struct blkif_response",
                "sizeof(struct blkif_response)", "blkif_response", "size",
                _fields("id", "operation", "status")),
        _Struct("sring_header", "blkif_sring", "struct blkif_sring",
                "offsetof(struct blkif_sring, ring)", "blkif_sring.ring", "offset",
                _fields("req_prod", "req_event", "rsp_prod", "rsp_event")),
    ]  # fmt: skip


#: Constants absent from some real headers without that being a divergence
#: (Linux never defines the retired BLKIF_OP_RESERVED_1).
OPTIONAL_CONSTANTS = frozenset({"BLKIF_OP_RESERVED_1"})


def expected_constants() -> dict[str, int]:
    """Every constant compared, with blkif_spec's value."""
    out = {
        "BLKIF_MAX_SEGMENTS_PER_REQUEST": consts.BLKIF_MAX_SEGMENTS_PER_REQUEST,
        "BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST": consts.BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST,
    }
    out.update({f"BLKIF_OP_{op.name}": int(op) for op in consts.BlkifOp})
    out.update({f"BLKIF_RSP_{rsp.name}": int(rsp) for rsp in consts.BlkifRsp})
    out["BLKIF_DISCARD_SECURE"] = consts.BLKIF_DISCARD_SECURE
    for name in ("VDISK_CDROM", "VDISK_REMOVABLE", "VDISK_READONLY"):
        out[name] = getattr(consts, name)
    return out


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Check:
    """One number measured in the header and the value blkif_spec has for it."""

    abi: str
    subject: str  # `blkif_request.id`, `blkif_response`, `BLKIF_OP_READ`
    kind: str  # "size" | "offset" | "signed" | "value"
    expected: int | bool | None  # blkif_spec's
    observed: int | bool | None  # the header's (None: constant not defined)
    header_expr: str  # the C expression measured
    spec_ref: str  # where blkif_spec's value comes from
    optional: bool = False  # an absent optional constant is not a mismatch

    @property
    def status(self) -> str:
        if self.observed is None and self.optional:
            return "absent"
        return "ok" if self.observed == self.expected else "MISMATCH"

    @property
    def ok(self) -> bool:
        return self.status != "MISMATCH"

    def describe(self) -> str:
        """One diff line: `x86_64-abi blkif_request.id: header offset 8, blkif_spec offset 4`."""
        observed = "not defined" if self.observed is None else f"{self.kind} {_show(self.observed)}"
        return f"{self.abi} {self.subject}: header {observed}, blkif_spec {self.kind} {_show(self.expected)}"

    def to_json(self) -> dict:
        return {
            "abi": self.abi,
            "subject": self.subject,
            "kind": self.kind,
            "expected": self.expected,
            "observed": self.observed,
            "status": self.status,
            "ok": self.ok,
            "header_expr": self.header_expr,
            "spec_ref": self.spec_ref,
        }


def _show(value: int | bool | None) -> str:
    if isinstance(value, bool):
        return "signed" if value else "unsigned"
    return str(value)


@dataclass
class LayoutResult:
    """Everything `check_header` measured and compared."""

    header: Path
    flavour: str  # "xen" | "linux"
    linux_tree: Path | None
    abis: list[str] = field(default_factory=list)  # ABIs actually checked
    skipped_abis: dict[str, str] = field(default_factory=dict)  # ABI -> reason
    checks: list[Check] = field(default_factory=list)

    @property
    def mismatches(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    @property
    def ok(self) -> bool:
        """True when at least one ABI was checked and nothing differs."""
        return bool(self.checks) and not self.mismatches

    def checks_for(self, abi: str) -> list[Check]:
        return [c for c in self.checks if c.abi == abi]

    def diff(self) -> list[str]:
        return [c.describe() for c in self.mismatches]

    def summary(self) -> str:
        abis = ", ".join(self.abis) or "none"
        line = f"{len(self.checks)} checks, {len(self.mismatches)} mismatches, ABIs: {abis}"
        if self.skipped_abis:
            line += "; skipped: " + "; ".join(f"{a} ({why})" for a, why in self.skipped_abis.items())
        return line

    def table(self) -> str:
        head = ("ABI", "check", "kind", "header", "blkif_spec", "result")
        rows = [
            (c.abi, c.subject, c.kind, "-" if c.observed is None else _show(c.observed), _show(c.expected),
             c.status)
            for c in self.checks
        ]  # fmt: skip
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*r).rstrip() for r in rows]
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {
            "header": str(self.header),
            "flavour": self.flavour,
            "linux_tree": str(self.linux_tree) if self.linux_tree else None,
            "abis": self.abis,
            "skipped_abis": self.skipped_abis,
            "checks": [c.to_json() for c in self.checks],
            "count": len(self.checks),
            "mismatches": len(self.mismatches),
            "ok": self.ok,
        }


# --------------------------------------------------------------------------- our side


def _extent(c: codec.Codec, name: str) -> tuple[int, int, str]:
    """(offset, size, first flat field) of a field or an array in a derived codec."""
    idx = [i for i, f in enumerate(c.fields) if f == name or f.startswith((name + "[", name + "."))]
    if not idx:
        raise KeyError(f"{c.name} has no field {name!r}")
    start = c.offset(c.fields[idx[0]])
    nxt = idx[-1] + 1
    end = c.offset(c.fields[nxt]) if nxt < len(c.fields) else c.size
    return start, end - start, c.fields[idx[0]]


def _signed(c: codec.Codec, name: str) -> bool | None:
    """Whether a scalar field is signed (None for padding bytes and arrays)."""
    if name not in c.fields:
        return None
    value = c.unpack_from(b"\xff" * c.size)[c.index(name)]
    return value < 0 if isinstance(value, int) else None


# --------------------------------------------------------------------------- the C program

_SHIM = """\
/* blkif-conformance: kernel integer types for compiling a Linux tree's xen headers in user space. */
#include <stdint.h>
#include <stddef.h>
typedef uint8_t u8;   typedef int8_t s8;
typedef uint16_t u16; typedef int16_t s16;
typedef uint32_t u32; typedef int32_t s32;
typedef uint64_t u64; typedef int64_t s64;
typedef uint8_t __u8;   typedef int8_t __s8;
typedef uint16_t __u16; typedef int16_t __s16;
typedef uint32_t __u32; typedef int32_t __s32;
typedef uint64_t __u64; typedef int64_t __s64;
"""


@dataclass(frozen=True)
class _Item:
    """One number the C program prints (`key value`) and the check it feeds."""

    key: str
    expr: str  # C expression, printed as long long
    subject: str
    kind: str
    expected: int | bool
    spec_ref: str

    def check(self, abi: str, observed: dict[str, int]) -> Check:
        value = observed[self.key]
        got: int | bool = bool(value) if self.kind == "signed" else value
        return Check(abi, self.subject, self.kind, self.expected, got, self.expr, self.spec_ref)


def _c_string(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _program(header: Path, items: Sequence[_Item], constants: Iterable[str]) -> str:
    lines = [
        "/* Generated by blkif_spec.layout: prints sizes, offsets and constants of a blkif.h. */",
        "#include <stdint.h>",
        "#include <stddef.h>",
        "#include <stdio.h>",
        f"#include {_c_string(str(header))}",
        "",
        '#define P(key, value) printf("%s %lld\\n", key, (long long)(value))',
        "",
        "int main(void)",
        "{",
    ]
    lines += [f"    P({_c_string(it.key)}, {it.expr});" for it in items]
    for name in constants:
        lines += [f"#ifdef {name}", f"    P({_c_string('const:' + name)}, {name});", "#endif"]
    lines += ["    return 0;", "}", ""]
    return "\n".join(lines)


def _plan(abi: str, flavour: str) -> list[_Item]:
    """Every size, offset and signedness the C program prints for `abi`, with blkif_spec's value."""
    structs = _linux_structs(abi) if flavour == "linux" else _xen_structs(abi)
    ours = codec.codecs(abi).structures()
    items: list[_Item] = []

    def add(key: str, expr: str, subject: str, kind: str, expected: int | bool, spec_ref: str) -> None:
        items.append(_Item(key, expr, subject, kind, expected, spec_ref))

    for s in structs:
        c = ours[s.ours]
        add(f"{s.label}:size", s.size_expr, s.size_subject, s.size_kind, c.size, f"{abi} {s.ours} size")
        for f in s.fields:
            off, size, first = _extent(c, f.ours)
            subject = f"{s.label}.{f.ours}" + (f" [{f.c}]" if f.c != f.ours else "")
            member = f"(({s.c_type} *)0)->{f.c}"
            add(
                f"{s.label}.{f.ours}:offset",
                f"offsetof({s.c_type}, {f.c})",
                subject,
                "offset",
                off,
                f"{abi} {s.ours} offset({first!r})",
            )
            add(
                f"{s.label}.{f.ours}:size",
                f"sizeof({member})",
                subject,
                "size",
                size,
                f"{abi} {s.ours} size of {f.ours!r}",
            )
            signed = _signed(c, f.ours)
            if signed is not None:
                add(
                    f"{s.label}.{f.ours}:signed",
                    f"((__typeof__({member}))-1 < 0)",
                    subject,
                    "signed",
                    signed,
                    f"{abi} {s.ours} format of {f.ours!r}",
                )
    add(
        "blkif_sring_entry:size",
        "sizeof(union blkif_sring_entry)",
        "blkif_sring_entry",
        "size",
        wire.abi(abi).entry_size,
        f"wire.abi({abi!r}).entry_size",
    )
    return items


# --------------------------------------------------------------------------- compiling and running


@dataclass(frozen=True)
class _Build:
    """How to compile for one ABI and flavour."""

    flags: tuple[str, ...]  # ABI flags (-m64 / -m32 …)
    extra: tuple[str, ...]  # flavour flags (include paths, shim, defines)


def _native_abis() -> dict[str, tuple[str, ...]]:
    """ABIs this host can build and run natively, with their gcc flags."""
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "i386", "i686"):
        return {X64: ("-m64",), X32: ("-m32",)}
    if machine in ("aarch64", "arm64") or machine.startswith("arm"):
        return {ARM: ()}
    return {}


def _linux_arch_dir() -> str:
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return "arm64"
    return "arm" if machine.startswith("arm") else "x86"


def _run(cmd: Sequence[str], timeout: float, what: str, cwd: Path) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(
            list(cmd), cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        raise LayoutError(f"{what} timed out after {timeout:g} s: {' '.join(cmd)}") from None
    except OSError as e:
        raise LayoutError(f"{what} could not start: {e}") from None


def _tail(text: str, n: int = 25) -> str:
    lines = text.strip().splitlines()
    return "\n".join(lines[-n:] if len(lines) > n else lines)


@cache
def probe(cc: str, flags: tuple[str, ...]) -> str | None:
    """None when `cc flags` builds and runs a trivial program, else why not."""
    with tempfile.TemporaryDirectory(prefix="blkif-layout-probe-") as tmp:
        d = Path(tmp)
        (d / "probe.c").write_text("#include <stdint.h>\n#include <stdio.h>\nint main(void) { return 0; }\n")
        r = _run([cc, *flags, "probe.c", "-o", "probe"], COMPILE_TIMEOUT, "probe compile", d)
        if r.returncode != 0:
            first = (r.stderr.strip().splitlines() or ["?"])[0]
            return f"{Path(cc).name} {' '.join(flags)} cannot build: {first}"
        r = _run([str(d / "probe")], RUN_TIMEOUT, "probe run", d)
        if r.returncode != 0:
            return f"a {' '.join(flags)} program does not run here (exit {r.returncode})"
    return None


def _skip_reason(flags: tuple[str, ...], problem: str) -> str:
    if "-m32" in flags:
        return f"-m32 unavailable: install gcc-multilib; probe: {problem}"
    return problem


def _measure(cc: str, header: Path, build: _Build, items: Sequence[_Item], label: str) -> dict[str, int]:
    source = _program(header, items, expected_constants())
    with tempfile.TemporaryDirectory(prefix="blkif-layout-") as tmp:
        d = Path(tmp)
        (d / "shim.h").write_text(_SHIM)
        (d / "layout.c").write_text(source)
        extra = [a.replace("@SHIM@", str(d / "shim.h")) for a in build.extra]
        cmd = [cc, "-std=gnu11", *build.flags, *extra, "layout.c", "-o", "layout"]
        r = _run(cmd, COMPILE_TIMEOUT, f"{label}: compiling", d)
        if r.returncode != 0:
            hint = ""
            if "blkif_request_rw" in header.read_text(errors="replace") and "-include" not in extra:
                hint = "\n(this looks like a Linux tree's header: pass --linux-tree DIR)"
            raise LayoutError(
                f"{label}: the layout program does not compile against {header}:\n"
                f"$ {' '.join(cmd)}\n{_tail(r.stderr)}{hint}"
            )
        r = _run([str(d / "layout")], RUN_TIMEOUT, f"{label}: running", d)
        if r.returncode != 0:
            raise LayoutError(f"{label}: the layout program exited {r.returncode}: {_tail(r.stderr)}")
    out: dict[str, int] = {}
    for line in r.stdout.splitlines():
        key, _, value = line.rpartition(" ")
        out[key] = int(value)
    return out


# --------------------------------------------------------------------------- entry points


def linux_tree_of(header: Path) -> Path | None:
    """The Linux tree a header path lies in (`TREE/include/xen/interface/io/blkif.h`), if any."""
    parts = header.parts
    n = len(LINUX_HEADER_SUFFIX)
    if len(parts) > n and tuple(parts[-n:]) == LINUX_HEADER_SUFFIX:
        return Path(*parts[:-n])
    return None


def _flavour_flags(header: Path, abi: str, linux_tree: Path | None, include_dirs: Sequence[Path]) -> tuple:
    extra: list[str] = []
    for d in include_dirs:
        extra += ["-I", str(d)]
    if linux_tree is None:
        # Xen's header includes "ring.h" and "../grant_table.h": quote-only search paths, so the
        # header's own xen/ directory never shadows a system header such as <memory.h>.
        extra += ["-iquote", str(header.parent), "-iquote", str(header.parent.parent)]
        return tuple(extra)
    arch = _linux_arch_dir()
    extra += ["-include", "@SHIM@"]
    for sub in ("include", f"arch/{arch}/include", f"arch/{arch}/include/uapi", "include/uapi"):
        if (linux_tree / sub).is_dir():
            extra += ["-I", str(linux_tree / sub)]
    if abi == X32:
        extra.append("-DCONFIG_X86_32")  # without it -m32 gives a hybrid no real guest uses
    return tuple(extra)


def check_header(
    header: Path,
    *,
    abis: Sequence[str] | None = None,
    linux_tree: Path | None = None,
    include_dirs: Sequence[Path] = (),
    cc: str = "gcc",
) -> LayoutResult:
    """Compile the layout program against `header` for each ABI and compare with blkif_spec.

    `abis=None` checks every ABI this host runs natively (x86_64-abi and, with
    gcc-multilib, x86_32-abi on x86); an ABI that cannot be built or run is
    listed in `.skipped_abis` with the reason. A Linux tree's header is detected
    from its path, or named with `linux_tree`. Raises LayoutError when the check
    cannot run at all (no compiler, no header, a compile error in the header).
    """
    header = Path(header).absolute()
    if not header.is_file():
        raise LayoutError(
            f"header {header} not found"
            + (" (install libxen-dev: apt-get install libxen-dev)" if header == DEFAULT_HEADER else "")
        )
    compiler = shutil.which(cc)
    if compiler is None:
        raise LayoutError(f"C compiler {cc!r} not found (install gcc: apt-get install gcc)")
    if linux_tree is None:
        linux_tree = linux_tree_of(header)
    elif not Path(linux_tree).is_dir():
        raise LayoutError(f"Linux tree {linux_tree} is not a directory")
    linux_tree = Path(linux_tree).absolute() if linux_tree is not None else None
    flavour = "linux" if linux_tree is not None else "xen"

    native = _native_abis()
    wanted = list(native) if abis is None else list(dict.fromkeys(abis))
    for abi in wanted:
        if abi not in consts.ABIS:
            raise ValueError(f"unknown ABI {abi!r}: expected one of {', '.join(consts.ABIS)}")

    result = LayoutResult(header=header, flavour=flavour, linux_tree=linux_tree)
    for abi in wanted:
        if abi not in native:
            result.skipped_abis[abi] = f"not runnable on a {platform.machine()} host; no cross-compiled check"
            continue
        problem = probe(compiler, native[abi])
        if problem is not None:
            result.skipped_abis[abi] = _skip_reason(native[abi], problem)
            continue
        build = _Build(native[abi], _flavour_flags(header, abi, linux_tree, include_dirs))
        items = _plan(abi, flavour)
        observed = _measure(compiler, header, build, items, f"{abi} ({' '.join(native[abi])})")
        result.checks += [item.check(abi, observed) for item in items]
        for name, value in expected_constants().items():
            result.checks.append(
                Check(
                    abi,
                    name,
                    "value",
                    value,
                    observed.get(f"const:{name}"),
                    name,
                    f"blkif_spec.consts {name}",
                    optional=name in OPTIONAL_CONSTANTS,
                )
            )
        result.abis.append(abi)
    return result


# --------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m blkif_spec.layout",
        description="Compile a C blkif.h and compare its layouts and constants with blkif_spec's.",
    )
    p.add_argument(
        "--header",
        type=Path,
        default=DEFAULT_HEADER,
        metavar="PATH",
        help=f"the blkif.h to check (default {DEFAULT_HEADER}, from libxen-dev)",
    )
    p.add_argument(
        "--linux-tree",
        type=Path,
        default=None,
        metavar="DIR",
        help="the header is a Linux tree's (packed-union layout); DIR is the tree "
        "(detected when the path ends in include/xen/interface/io/blkif.h)",
    )
    p.add_argument(
        "--abi",
        action="append",
        choices=consts.ABIS,
        default=None,
        help="check only this ABI (repeatable; default: every ABI this host runs)",
    )
    p.add_argument(
        "-I",
        dest="include_dirs",
        action="append",
        type=Path,
        default=[],
        metavar="DIR",
        help="extra include directory for the header's own includes",
    )
    p.add_argument("--cc", default="gcc", help="C compiler (default gcc)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="print only mismatches and the summary")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        result = check_header(
            args.header, abis=args.abi, linux_tree=args.linux_tree, include_dirs=args.include_dirs, cc=args.cc
        )
    except LayoutError as e:
        if args.json:
            print(json.dumps({"error": str(e), "ok": False}, indent=2))
        print(f"blkif_spec.layout: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print(
            f"header: {result.header} ({result.flavour} flavour"
            + (f", tree {result.linux_tree})" if result.linux_tree else ")")
        )
        if not args.quiet and result.checks:
            print(result.table())
        if result.mismatches:
            print("\nmismatches:")
            for c in result.mismatches:
                print(f"  {c.describe()}\n      header: {c.header_expr}\n      blkif_spec: {c.spec_ref}")
        print(result.summary())
    if not result.checks:
        reasons = "; ".join(f"{a}: {why}" for a, why in result.skipped_abis.items())
        print(f"blkif_spec.layout: error: no ABI could be checked: {reasons}", file=sys.stderr)
        return 2
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
