"""Live mode's pure parts, off a Xen host: refusals, the device's signature, ioctl numbers,
the XenStore snapshot, and the `--backend=live` usage errors."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from blkif_spec import live, pytest_plugin
from blkif_spec.xen import live as xen_live
from blkif_spec.xen.sim import SimXen

ROOT = Path(__file__).resolve().parents[1]


def test_ioctl_numbers_match_the_linux_uapi() -> None:
    """The numbers the lab notes saw work on x86_64, and the rest from the same formula."""
    assert xen_live.GNTALLOC_ALLOC_GREF == 0x184705
    assert xen_live.EVTCHN_BIND_UNBOUND_PORT == 0x44502
    assert xen_live.EVTCHN_NOTIFY == 0x44504
    assert xen_live.EVTCHN_BIND_INTERDOMAIN == 0x84501
    assert xen_live.GNTDEV_MAP_GRANT_REF == 0x184700
    assert xen_live.GNTDEV_GRANT_COPY == 0x104708


def test_grant_copy_segment_layout() -> None:
    """`struct gntdev_grant_copy_segment`: two 8-byte unions, len, flags, status; 24 bytes."""
    import ctypes

    assert ctypes.sizeof(xen_live._Segment) == 24
    packed = struct.pack("<IHH", 0x1234, 0x200, 7)  # {u32 ref; u16 offset; u16 domid}
    assert xen_live._foreign(0x1234, 0x200, 7) == struct.unpack("<Q", packed)[0]


@pytest.mark.parametrize(
    ("vdev", "devid"), [("xvda", 51712), ("xvdd", 51760), ("xvdf", 51792)]
)  # fmt: skip
def test_vdev_numbers(vdev: str, devid: int) -> None:
    assert live.LiveOptions("/dev/x", vdev=vdev).devid == devid


def test_a_bad_vdev_is_refused_by_name() -> None:
    with pytest.raises(live.LiveRefused, match="xvdzz"):
        _ = live.LiveOptions("/dev/x", vdev="xvdzz").devid


@pytest.mark.parametrize(("offset", "magic", "what"), live.SIGNATURES, ids=[s[2] for s in live.SIGNATURES])
def test_data_on_the_device_is_recognised(tmp_path: Path, offset: int, magic: bytes, what: str) -> None:
    disk = tmp_path / "disk"
    data = bytearray(0x20000)
    data[offset : offset + len(magic)] = magic
    disk.write_bytes(bytes(data))
    assert live.signature(str(disk)) == what


def test_a_blank_device_has_no_signature(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.write_bytes(bytes(0x20000))
    assert live.signature(str(disk)) is None


def test_outside_dom0_live_mode_refuses_with_the_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(xen_live, "preflight", lambda: ["not root (live mode needs root in dom0)"])
    with pytest.raises(live.LiveRefused, match="needs root in a Xen dom0: not root"):
        live.check_safe(live.LiveOptions("/dev/loop0"))


def test_a_loaded_kernel_blkfront_is_refused_for_a_backend_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """dom0's xen-blkfront would attach to device/vbd/<devid> too: the lab's bench once lost its
    rings to it (512 requests never answered: blkback served the kernel's rings, not ours)."""
    monkeypatch.setattr(xen_live, "preflight", lambda: [])
    monkeypatch.setattr(live, "kernel_frontend_attaches", lambda: True)
    with pytest.raises(live.LiveRefused, match=r"xen-blkfront is loaded .*/local/domain/0/device/vbd/51792"):
        live.check_safe(live.LiveOptions("/dev/loop0"))


@pytest.mark.parametrize(
    ("device", "message"),
    [(None, "needs the test device named"), ("/nonexistent/dev", "No such file"),
     ("/etc/hostname", "not a block")],
)  # fmt: skip
def test_the_device_must_be_named_and_a_block_device(monkeypatch, device, message) -> None:
    monkeypatch.setattr(xen_live, "preflight", lambda: [])
    with pytest.raises(live.LiveRefused, match=message):
        live.check_safe(live.LiveOptions(device))


def test_snapshot_shows_what_a_run_left_behind() -> None:
    with SimXen() as xen:
        store = xen.dom0.store
        store.write("/local/domain/0/backend/vbd/0/1/state", "1")
        snap = live.XenStoreSnapshot(store)
        assert snap.diff() == []
        store.write("/local/domain/0/backend/vbd/0/2/state", "4")
        store.rm("/local/domain/0/backend/vbd/0/1")
        diff = snap.diff()
    assert "+ /local/domain/0/backend/vbd/0/2/state='4'" in diff
    assert "- /local/domain/0/backend/vbd/0/1/state" in diff


def test_device_store_reads_what_was_written(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.write_bytes(bytes(1 << 16))
    store = live.DeviceStore(str(disk))
    try:
        store.write(4096, b"x" * 512)
        assert store.read(4096, 512) == b"x" * 512
        assert store.size == 1 << 16
        store.zero()  # a regular file refuses BLKZEROOUT: the written ranges are zeroed instead
        assert store.read(0, 1 << 16) == bytes(1 << 16)
    finally:
        store.close()


def test_backend_live_off_a_xen_host_is_a_usage_error() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "pytest", str(ROOT / "tests" / "conformance" / "test_ring.py"),
         "--backend=live", "--xen-device=/dev/null", "-p", "no:cacheprovider", "-q"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert run.returncode == pytest.ExitCode.USAGE_ERROR, run.stdout + run.stderr
    assert "live mode needs root in a Xen dom0" in run.stderr


def test_parents_the_device_adds_are_removed_again() -> None:
    """Creating a vbd adds backend/vbd/<fe> and device/vbd when absent: live mode removes them."""
    from blkif_spec import toolstack

    with SimXen() as xen:
        store = xen.dom0.store
        before = live.XenStoreSnapshot(store)
        vbd = toolstack.Vbd(0, 0, 51792, "vbd", "xvdf")
        added = live.missing_parents(store, vbd)
        home = "/local/domain/0"
        wanted = ("backend", "backend/vbd", "backend/vbd/0", "device", "device/vbd", "error/backend/vbd/0")
        assert set(added) >= {f"{home}/{rel}" for rel in wanted}
        toolstack.create(store, vbd)
        toolstack.destroy(store, vbd)
        live.remove_if_empty(store, added)
        assert before.diff() == []
        assert store.read("/local/domain/0/backend") is None


def test_a_parent_someone_else_uses_is_kept() -> None:
    from blkif_spec import toolstack

    with SimXen() as xen:
        store = xen.dom0.store
        vbd = toolstack.Vbd(0, 0, 51792, "vbd", "xvdf")
        added = live.missing_parents(store, vbd)
        toolstack.create(store, vbd)
        store.write("/local/domain/0/backend/vbd/0/51712/state", "4")  # another device appeared meanwhile
        toolstack.destroy(store, vbd)
        live.remove_if_empty(store, added)
        assert store.read("/local/domain/0/backend/vbd/0/51712/state") == "4"
        assert store.read("/local/domain/0/device/vbd") is None


def test_tidy_removes_parents_left_after_the_run_only() -> None:
    """A backend that re-creates parents after a test's cleanup: the end of the run removes them,
    not what was there before the run."""
    with SimXen() as xen:
        store = xen.dom0.store
        store.write("/local/domain/0/backend/vbd/0/51712/state", "4")  # someone else's device
        snap = live.XenStoreSnapshot(store)
        store.mkdir("/local/domain/0/backend/qdisk/0")  # what QEMU left behind in the lab
        options = live.LiveOptions("/dev/loop1", backend_kind="qdisk", vdev="xvdg")
        live.tidy(snap, options, settle=0.2)
        assert snap.diff() == []
        assert store.read("/local/domain/0/backend/vbd/0/51712/state") == "4"


def test_a_failed_ioctl_names_the_request_and_the_known_cause() -> None:
    """gntalloc's ENOSPC means its global grant limit: the error says which parameter to raise."""
    import errno
    import os

    fd = os.open("/dev/null", os.O_RDWR)
    try:
        with pytest.raises(xen_live.XenError, match=r"^gntalloc for d0: .+ \(the cause\)$"):
            xen_live._ioctl(fd, 0x1234, bytearray(8), "gntalloc for d0", {errno.ENOTTY: "the cause"})
    finally:
        os.close(fd)
    assert xen_live.GNTALLOC_LIMIT in xen_live._gntalloc_full()


def test_a_dead_qemu_is_named_before_a_qdisk_test_waits_for_it() -> None:
    with SimXen() as xen:
        store = xen.dom0.store
        assert "not running" in live.qemu_gone(store)
        store.write("/local/domain/0/image/device-model-pid", "999999999")
        assert "(pid 999999999) is gone" in live.qemu_gone(store)
        store.write("/local/domain/0/image/device-model-pid", str(os.getpid()))
        assert live.qemu_gone(store) is None


class _Marked:
    """Just enough of a pytest item for the marker logic: its markers by name."""

    def __init__(self, *marks: pytest.MarkDecorator) -> None:
        self._marks = {m.mark.name: m.mark for m in marks}

    def get_closest_marker(self, name: str):
        return self._marks.get(name)


def test_a_host_hazard_runs_only_when_allowed_and_then_last() -> None:
    hazard = _Marked(pytest.mark.host_hazard("oopses xenwatch"))
    reason = pytest_plugin.host_hazard_skip(hazard, allowed=False)
    assert reason and "oopses xenwatch" in reason and "--xen-allow-host-crash" in reason
    assert pytest_plugin.host_hazard_skip(hazard, allowed=True) is None
    assert pytest_plugin.host_hazard_skip(_Marked(), allowed=False) is None
    plain, late = _Marked(), _Marked(pytest.mark.run_last("wedges qdisk", order=1))
    ranked = sorted([hazard, late, plain], key=pytest_plugin._run_last_rank)
    assert ranked == [plain, late, hazard]


def test_leak_checks_know_when_they_cannot_see() -> None:
    """A live host cannot show a real driver's grants, mappings or ports: its empty `leaks()` must
    not pass for "nothing held" (the leak-only tests skip on it, conftest.require_leaks_visible)."""
    assert live.LiveHost.leaks_visible is False
    assert SimXen.leaks_visible is True
