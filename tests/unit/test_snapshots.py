"""Snapshot store: format, atomic tmp -> fsync -> rename -> fsync dir, retention, corruption."""
from __future__ import annotations

import os
import random
import stat

import pytest

from afs.errors import FatalStorageError, StorageCorrupt
from afs.raft.messages import ConfState, SnapshotMeta
from afs.storage.faults import CrashPoint, FaultPoints, SyncTracker
from afs.storage.snapshots import SnapshotStore, decode_snapshot, encode_snapshot, snapshot_name

META = SnapshotMeta(7, 3, ConfState(("n1", "n2", "n3"), ("n4",)))


def test_round_trip(tmp_path):
    """save then load_latest returns the same meta and data; files 0600, dir 0700."""
    s = SnapshotStore(str(tmp_path / "snap"))
    assert s.load_latest() is None
    s.save(META, b"tree-bytes" * 100)
    assert SnapshotStore(str(tmp_path / "snap")).load_latest() == (META, b"tree-bytes" * 100)
    name = tmp_path / "snap" / snapshot_name(7, 3)
    assert name.name == "snap-0000000000000007-0000000000000003.snap"
    assert stat.S_IMODE(os.stat(name).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "snap").st_mode) == 0o700


def test_keeps_last_two(tmp_path):
    """Only the newest two snapshots are kept; an older index than the newest is refused."""
    s = SnapshotStore(str(tmp_path))
    for i in range(1, 6):
        s.save(SnapshotMeta(i * 10, 1), b"%d" % i)
    assert s.list() == [(40, 1), (50, 1)]
    assert s.load_latest() == (SnapshotMeta(50, 1), b"5")
    with pytest.raises(ValueError):
        s.save(SnapshotMeta(45, 1), b"old")


def test_every_bit_flip_is_detected():
    """Any single-bit flip of a snapshot image is rejected with StorageCorrupt."""
    img = encode_snapshot(META, bytes(range(256)))
    rng = random.Random(5)
    for off in range(len(img)):
        bad = bytearray(img)
        bad[off] ^= 1 << rng.randrange(8)
        with pytest.raises(StorageCorrupt):
            decode_snapshot(bytes(bad))
    for cut in range(len(img)):
        with pytest.raises(StorageCorrupt):
            decode_snapshot(img[:cut])


def test_corrupt_newest_is_a_hard_error(tmp_path):
    """A corrupt newest snapshot raises StorageCorrupt naming the file (no silent fallback)."""
    s = SnapshotStore(str(tmp_path))
    s.save(SnapshotMeta(1, 1), b"a")
    s.save(SnapshotMeta(2, 1), b"b")
    p = tmp_path / snapshot_name(2, 1)
    data = bytearray(p.read_bytes())
    data[-6] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(StorageCorrupt, match=snapshot_name(2, 1)):
        s.load_latest()


def test_name_header_mismatch_is_corrupt(tmp_path):
    """A file whose header meta differs from its name is rejected."""
    s = SnapshotStore(str(tmp_path))
    s.save(SnapshotMeta(2, 1), b"b")
    os.rename(tmp_path / snapshot_name(2, 1), tmp_path / snapshot_name(3, 1))
    with pytest.raises(StorageCorrupt, match="file name says index 3"):
        s.load_latest()


def test_leftover_tmp_removed_on_open(tmp_path):
    """A tmp file left by a crash is deleted when the store is opened."""
    (tmp_path / (snapshot_name(9, 9) + ".tmp")).write_bytes(b"partial")
    SnapshotStore(str(tmp_path))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("point", ["before_snapshot_fsync", "before_snapshot_rename"])
@pytest.mark.parametrize("power_loss", [False, True])
def test_crash_before_rename_keeps_old_snapshot(tmp_path, point, power_loss):
    """A crash before the rename leaves the previous snapshot as the loadable latest."""
    tracker = SyncTracker()
    f = FaultPoints(tracker)
    s = SnapshotStore(str(tmp_path), faults=f)
    s.save(SnapshotMeta(1, 1), b"old")
    f.arm(point)
    with pytest.raises(CrashPoint):
        s.save(SnapshotMeta(2, 1), b"new")
    if power_loss:
        tracker.simulate_power_loss(str(tmp_path))
    assert SnapshotStore(str(tmp_path)).load_latest() == (SnapshotMeta(1, 1), b"old")
    assert [n for n in os.listdir(tmp_path) if n.endswith(".tmp")] == []


@pytest.mark.parametrize("point", ["after_snapshot_rename", "before_dir_fsync"])
def test_crash_after_rename(tmp_path, point):
    """After the rename the new snapshot is visible; if power is lost before the directory
    fsync the old one is still there and loadable (the rename may be undone, never half-done)."""
    for power_loss in (False, True):
        d = tmp_path / str(power_loss)
        tracker = SyncTracker()
        f = FaultPoints(tracker)
        s = SnapshotStore(str(d), faults=f)
        s.save(SnapshotMeta(1, 1), b"old")
        f.arm(point)
        with pytest.raises(CrashPoint):
            s.save(SnapshotMeta(2, 1), b"new")
        if power_loss:
            tracker.simulate_power_loss(str(d))
        want = (SnapshotMeta(1, 1), b"old") if power_loss else (SnapshotMeta(2, 1), b"new")
        assert SnapshotStore(str(d)).load_latest() == want


def test_completed_save_survives_power_loss(tmp_path):
    """Once save() returns, the snapshot survives a power cut; negative control: fsync=False
    does not."""
    for fsync in (True, False):
        d = tmp_path / str(fsync)
        tracker = SyncTracker()
        s = SnapshotStore(str(d), fsync=fsync, faults=FaultPoints(tracker))
        s.save(SnapshotMeta(1, 1), b"x")
        tracker.simulate_power_loss(str(d))
        got = SnapshotStore(str(d)).load_latest()
        assert (got == (SnapshotMeta(1, 1), b"x")) is fsync


def test_failed_fsync_is_fatal(tmp_path, monkeypatch):
    """An fsync failure while saving raises FatalStorageError and leaves the old snapshot."""
    s = SnapshotStore(str(tmp_path))
    s.save(SnapshotMeta(1, 1), b"old")

    def boom(fd):
        raise OSError(5, "EIO")

    monkeypatch.setattr(os, "fdatasync", boom)
    with pytest.raises(FatalStorageError):
        s.save(SnapshotMeta(2, 1), b"new")
    monkeypatch.undo()
    assert SnapshotStore(str(tmp_path)).load_latest() == (SnapshotMeta(1, 1), b"old")
