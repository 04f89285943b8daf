"""The layout check: a real C blkif.h, compiled with gcc, against `blkif_spec.wire` and `consts`.

The header is `--blkif-header` (default libxen-dev's `/usr/include/xen/io/blkif.h`;
a Linux tree's `include/xen/interface/io/blkif.h` is recognised by its path).
Only a missing gcc or a missing default header skips; with gcc-multilib installed
(as in CI) the x86_32 layout must be checked, not skipped.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from blkif_spec import consts, layout
from blkif_spec.pytest_plugin import multilib_expected, require_abi

X64, X32 = consts.X86_64_ABI, consts.X86_32_ABI
ROOT = Path(__file__).resolve().parents[1]

#: Every structure the check must cover, by report label.
SUBJECTS = {
    "blkif_request_segment", "blkif_request", "blkif_request_discard", "blkif_request_indirect",
    "blkif_request_other", "blkif_response", "blkif_sring", "blkif_sring_entry",
}  # fmt: skip

#: Numbers of inventory §1.1 that the header must show (a guard against a vacuous comparison).
KEY_NUMBERS = {
    X64: {("blkif_request", "size"): 112, ("blkif_request.id", "offset"): 8,
          ("blkif_request_discard", "size"): 32, ("blkif_request_indirect.indirect_grefs", "offset"): 28,
          ("blkif_response", "size"): 16, ("blkif_sring_entry", "size"): 112,
          ("blkif_sring.ring", "offset"): 64},
    X32: {("blkif_request", "size"): 108, ("blkif_request.id", "offset"): 4,
          ("blkif_request_discard", "size"): 28, ("blkif_request_indirect.indirect_grefs", "offset"): 24,
          ("blkif_response", "size"): 12, ("blkif_sring_entry", "size"): 108,
          ("blkif_sring.ring", "offset"): 64},
}  # fmt: skip


def _observed(result: layout.LayoutResult, abi: str, subject: str, kind: str) -> int | bool | None:
    """The header's value of one check (subjects of the Linux flavour carry a `[u.rw.id]` suffix)."""
    found = [
        c for c in result.checks_for(abi)
        if c.kind == kind and (c.subject == subject or c.subject.startswith(subject + " ["))
    ]  # fmt: skip
    assert len(found) == 1, f"{abi} {subject} {kind}: {len(found)} checks"
    return found[0].observed


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def header(blkif_header: Path) -> Path:
    return blkif_header


@pytest.fixture
def result(blkif_layout: layout.LayoutResult) -> layout.LayoutResult:
    return blkif_layout


def _mutated(header: Path, tmp_path: Path, edit: Callable[[str], str]) -> tuple[Path, Path | None]:
    """A copy of the header with `edit` applied, and the Linux tree to build it with (or None).

    Xen's header includes `ring.h` and `../grant_table.h` relative to itself, so its whole
    `xen/` directory is copied; a Linux header is copied alone and built against its tree.
    """
    tree = layout.linux_tree_of(header)
    if tree is None:
        copy_dir = tmp_path / header.parent.parent.name
        shutil.copytree(header.parent.parent, copy_dir)
        copy = copy_dir / header.parent.name / header.name
    else:
        copy = tmp_path.joinpath(*layout.LINUX_HEADER_SUFFIX)
        copy.parent.mkdir(parents=True)
        shutil.copy(header, copy)
    text = copy.read_text()
    mutated = edit(text)
    assert mutated != text, "the mutation did not apply to this header"
    copy.write_text(mutated)
    return copy, tree


def _swap_response_operation_status(text: str) -> str:
    pattern = re.compile(
        r"(struct blkif_response \{[^}]*?)"
        r"(\n[ \t]*uint8_t\s+operation;[^\n]*)"
        r"(\n[ \t]*int16_t\s+status;[^\n]*)"
    )
    return pattern.sub(r"\1\3\2", text, count=1)


def _insert_byte_before_handle(text: str) -> str:
    # Xen: struct blkif_request; Linux: its read/write member struct blkif_request_rw.
    pattern = re.compile(r"(struct blkif_request(?:_rw)? \{[^}]*?)(\n[ \t]*blkif_vdev_t\s+handle;)")
    return pattern.sub(r"\1\n    uint8_t inserted_by_test;\2", text, count=1)


def _cli(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "blkif_spec.layout", *map(str, args)],
        cwd=ROOT, capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip


# --------------------------------------------------------------------------- the real header


@pytest.mark.parametrize("abi", [X64, X32])
def test_every_structure_field_and_constant_is_compared(result: layout.LayoutResult, abi: str) -> None:
    require_abi(result, abi)
    checks = result.checks_for(abi)
    structures = {c.subject.split(" ")[0].split(".")[0] for c in checks if c.kind != "value"}
    assert structures == SUBJECTS
    assert {c.subject for c in checks if c.kind == "value"} == set(layout.expected_constants())
    kinds = {c.kind for c in checks}
    assert kinds == {"size", "offset", "signed", "value"}
    assert _observed(result, abi, "blkif_response.status", "signed") is True
    assert _observed(result, abi, "blkif_request_indirect.nr_segments", "size") == 2


def test_cli_on_the_real_header(header: Path) -> None:
    r = _cli("--header", header, "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    summary = r.stdout.strip().splitlines()[-1]
    assert re.match(r"^\d+ checks, 0 mismatches, ABIs: x86_64-abi", summary), summary

    r = _cli("--header", header, "--abi", X64, "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["ok"] and data["abis"] == [X64] and data["mismatches"] == 0
    assert data["count"] == len(data["checks"]) > 100


# --------------------------------------------------------------------------- mutations are caught


def test_swapped_response_fields_are_named_in_the_diff(header: Path, tmp_path: Path) -> None:
    copy, tree = _mutated(header, tmp_path, _swap_response_operation_status)
    res = layout.check_header(copy, linux_tree=tree, abis=[X64])
    require_abi(res, X64)
    assert not res.ok
    assert {c.subject for c in res.mismatches if c.kind == "offset"} == {
        "blkif_response.operation",
        "blkif_response.status",
    }
    assert "x86_64-abi blkif_response.operation: header offset 10, blkif_spec offset 8" in res.diff()
    assert "x86_64-abi blkif_response.status: header offset 8, blkif_spec offset 10" in res.diff()

    r = _cli("--header", copy, *(["--linux-tree", tree] if tree else []))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "blkif_response.operation: header offset 10, blkif_spec offset 8" in r.stdout
    assert re.search(r"^\d+ checks, [1-9]\d* mismatches", r.stdout, re.M), r.stdout


def test_inserted_request_field_is_named_in_the_diff(header: Path, tmp_path: Path) -> None:
    copy, tree = _mutated(header, tmp_path, _insert_byte_before_handle)
    res = layout.check_header(copy, linux_tree=tree, abis=[X64])
    require_abi(res, X64)
    assert not res.ok
    moved = [c for c in res.mismatches if c.kind == "offset" and c.subject.startswith("blkif_request.handle")]
    assert moved and moved[0].expected == 2 and moved[0].observed in (3, 4), res.diff()

    r = _cli("--header", copy, "--abi", X64, *(["--linux-tree", tree] if tree else []))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "x86_64-abi blkif_request.handle" in r.stdout


# --------------------------------------------------------------------------- the Linux flavour

# A miniature of a Linux tree's header, written for this test: the kernel's member paths
# (`u.rw.id`, `_pad*`), packed request union and CONFIG_X86_32 switch, kernel `u8`…`s64`
# types from the forced-include shim. It lets CI check the flavour without a kernel tree.
MINI_LINUX_BLKIF = """\
#ifndef MINI_LINUX_BLKIF_H
#define MINI_LINUX_BLKIF_H

typedef u16 blkif_vdev_t;
typedef u64 blkif_sector_t;
typedef u32 grant_ref_t;

#define BLKIF_OP_READ 0
#define BLKIF_OP_WRITE 1
#define BLKIF_OP_WRITE_BARRIER 2
#define BLKIF_OP_FLUSH_DISKCACHE 3
#define BLKIF_OP_DISCARD 5
#define BLKIF_OP_INDIRECT 6
#define BLKIF_MAX_SEGMENTS_PER_REQUEST 11
#define BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST 8
#define BLKIF_DISCARD_SECURE (1 << 0)
#define BLKIF_RSP_EOPNOTSUPP -2
#define BLKIF_RSP_ERROR -1
#define BLKIF_RSP_OKAY 0
#define VDISK_CDROM 0x1
#define VDISK_REMOVABLE 0x2
#define VDISK_READONLY 0x4

#ifdef CONFIG_X86_32
#define GAP_BEFORE_ID(name)            /* 64-bit members are 4-byte aligned */
#define INDIRECT_TAIL(name) u64 name;
#else
#define GAP_BEFORE_ID(name) u32 name;  /* keeps id at offset 8 */
#define INDIRECT_TAIL(name) u32 name;
#endif

struct blkif_request_segment { grant_ref_t gref; u8 first_sect, last_sect; };

struct blkif_request_rw {
    u8 nr_segments; blkif_vdev_t handle; GAP_BEFORE_ID(_pad1)
    u64 id; blkif_sector_t sector_number;
    struct blkif_request_segment seg[BLKIF_MAX_SEGMENTS_PER_REQUEST];
} __attribute__((__packed__));

struct blkif_request_discard {
    u8 flag; blkif_vdev_t _pad1; GAP_BEFORE_ID(_pad2)
    u64 id; blkif_sector_t sector_number; u64 nr_sectors; u8 _pad3;
} __attribute__((__packed__));

struct blkif_request_other {
    u8 _pad1; blkif_vdev_t _pad2; GAP_BEFORE_ID(_pad3) u64 id;
} __attribute__((__packed__));

struct blkif_request_indirect {
    u8 indirect_op; u16 nr_segments; GAP_BEFORE_ID(_pad1)
    u64 id; blkif_sector_t sector_number; blkif_vdev_t handle; u16 _pad2;
    grant_ref_t indirect_grefs[BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST];
    INDIRECT_TAIL(_pad3)
} __attribute__((__packed__));

struct blkif_request {
    u8 operation;
    union {
        struct blkif_request_rw rw;
        struct blkif_request_discard discard;
        struct blkif_request_other other;
        struct blkif_request_indirect indirect;
    } u;
} __attribute__((__packed__));

struct blkif_response { u64 id; u8 operation; s16 status; };

union blkif_sring_entry { struct blkif_request req; struct blkif_response rsp; };
struct blkif_sring {
    u32 req_prod, req_event, rsp_prod, rsp_event;
    u8 __pad[48];
    union blkif_sring_entry ring[1];
};

#endif
"""


def _mini_linux_tree(tmp_path: Path, text: str = MINI_LINUX_BLKIF) -> Path:
    path = tmp_path.joinpath("linux", *layout.LINUX_HEADER_SUFFIX)
    path.parent.mkdir(parents=True)
    path.write_text(text)
    return path


@pytest.fixture
def gcc() -> None:
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed (apt-get install gcc): the layout check needs a C compiler")


@pytest.mark.usefixtures("gcc")
def test_linux_flavour_on_a_miniature_tree(tmp_path: Path) -> None:
    path = _mini_linux_tree(tmp_path)
    res = layout.check_header(path)
    assert res.flavour == "linux" and res.linux_tree == tmp_path / "linux"
    require_abi(res, X64)
    assert res.ok, "\n".join(res.diff())
    assert _observed(res, X64, "blkif_request.id", "offset") == 8
    assert [c.status for c in res.checks if c.subject == "BLKIF_OP_RESERVED_1"] == ["absent"] * len(res.abis)
    if X32 in res.abis or multilib_expected():
        require_abi(res, X32)
        assert _observed(res, X32, "blkif_request.id", "offset") == 4  # needs -DCONFIG_X86_32


@pytest.mark.usefixtures("gcc")
def test_linux_flavour_without_the_x86_32_switch_is_a_hybrid(tmp_path: Path) -> None:
    path = _mini_linux_tree(tmp_path, MINI_LINUX_BLKIF.replace("CONFIG_X86_32", "NEVER_DEFINED"))
    res = layout.check_header(path, abis=[X32])
    require_abi(res, X32)
    wrong = {c.subject for c in res.mismatches}
    assert "blkif_request" in wrong and "blkif_request.id [u.rw.id]" in wrong  # 112 / id@8: x86_64's
    assert "blkif_response" not in wrong  # 12 bytes with -m32 either way


# --------------------------------------------------------------------------- cannot run: exit 2


def test_missing_header_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(layout.LayoutError, match="not found"):
        layout.check_header(tmp_path / "blkif.h")
    r = _cli("--header", tmp_path / "blkif.h")
    assert r.returncode == 2 and "not found" in r.stderr, r.stderr


def test_missing_compiler_is_an_error(tmp_path: Path) -> None:
    path = _mini_linux_tree(tmp_path)
    with pytest.raises(layout.LayoutError, match="compiler 'no-such-cc' not found"):
        layout.check_header(path, cc="no-such-cc")
    r = _cli("--header", path, "--cc", "no-such-cc")
    assert r.returncode == 2 and "install gcc" in r.stderr, r.stderr


def test_unknown_abi_is_a_usage_error() -> None:
    r = _cli("--abi", "sparc-abi")
    assert r.returncode == 2 and "--abi" in r.stderr and "x86_64-abi" in r.stderr, r.stderr
