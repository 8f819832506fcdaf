"""WAL: framing, torn-tail repair, corruption detection, fatal fsync, fault points, power loss."""
from __future__ import annotations

import os
import random
import stat

import pytest

from afs.errors import FatalStorageError, StorageCorrupt
from afs.storage import wal as walmod
from afs.storage.faults import POINTS, CrashPoint, FaultPoints, SyncTracker
from afs.storage.wal import HEADER_SIZE, MAX_RECORD, REC, WAL, segment_name


@pytest.fixture
def fake_fsync(monkeypatch):
    """Make fsync/fdatasync no-ops. Heavy crash tests model durability with SyncTracker (which
    still sees every fsync call site); the real syscalls would only cost time on a shared disk.
    Round-trip tests keep the real syscalls."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    monkeypatch.setattr(os, "fdatasync", lambda fd: None)


def payloads(n: int, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    return [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40))) for _ in range(n)]


def write_wal(d, recs, *, batch=1, segment_size=1 << 20, **kw) -> None:
    w = WAL.open(str(d), segment_size=segment_size, **kw)
    for i in range(0, len(recs), batch):
        w.append(recs[i:i + batch])
        w.sync()
    w.close()


def read_wal(d, **kw) -> tuple[list[bytes], WAL]:
    w = WAL.open(str(d), **kw)
    recs = [p for _, p in w.replay()]
    return recs, w


def seg_paths(d) -> list[str]:
    return sorted(str(d / n) for n in os.listdir(d) if n.startswith("wal-") and n.endswith(".log"))


def record_offsets(path: str) -> list[tuple[int, int]]:
    """(start, end) of each record in a segment file."""
    buf = open(path, "rb").read()
    out, off = [], HEADER_SIZE
    while off < len(buf):
        n, _ = REC.unpack_from(buf, off)
        out.append((off, off + 8 + n))
        off += 8 + n
    return out


def test_round_trip_and_modes(tmp_path):
    """Records come back in order across reopen; dir is 0700 and segments 0600."""
    d = tmp_path / "wal"
    recs = payloads(50)
    write_wal(d, recs, batch=7)
    got, w = read_wal(d)
    w.close()
    assert got == recs
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    for p in seg_paths(d):
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o600


def test_roll_segments_and_release(tmp_path):
    """Appends roll to a new segment past segment_size; release_before removes old ones only."""
    d = tmp_path / "wal"
    recs = payloads(60)
    write_wal(d, recs, batch=3, segment_size=200)
    assert len(seg_paths(d)) > 3
    got, w = read_wal(d, segment_size=200)
    assert got == recs
    segs = w.segments()
    assert segs == list(range(1, len(segs) + 1))
    assert w.release_before(3) == 2
    assert w.release_before(10 ** 6) == len(segs) - 3  # never the active segment
    assert w.segments() == [segs[-1]]
    w.close()
    got, w = read_wal(d, segment_size=200)
    w.close()
    assert got == recs[-len(got):] and got


def test_append_is_one_write_call(tmp_path, monkeypatch):
    """A batch of 100 payloads is written with exactly one write and synced with one fsync."""
    w = WAL.open(str(tmp_path / "wal"))
    calls = {"write": 0, "fsync": 0}
    real_write, real_fdatasync = os.write, os.fdatasync

    def cw(fd, b):
        calls["write"] += 1
        return real_write(fd, b)

    def cf(fd):
        calls["fsync"] += 1
        return real_fdatasync(fd)

    monkeypatch.setattr(os, "write", cw)
    monkeypatch.setattr(os, "fdatasync", cf)
    w.append(payloads(100))
    w.sync()
    assert calls == {"write": 1, "fsync": 1}
    w.close()


def test_oversized_and_empty_records_rejected(tmp_path, monkeypatch):
    """Records must be 1..MAX_RECORD bytes; an impossible length on disk is never allocated."""
    w = WAL.open(str(tmp_path / "wal"))
    with pytest.raises(ValueError):
        w.append([b""])
    monkeypatch.setattr(walmod, "MAX_RECORD", 10)
    with pytest.raises(ValueError):
        w.append([b"x" * 11])
    w.close()
    monkeypatch.undo()
    # a length field of 4 GiB in a non-last segment is reported, not allocated
    d = tmp_path / "w2"
    write_wal(d, payloads(5), segment_size=60)
    first = seg_paths(d)[0]
    with open(first, "r+b") as f:
        f.seek(HEADER_SIZE)
        f.write(REC.pack(0xFFFFFFFF, 0))
    with pytest.raises(StorageCorrupt, match=r"impossible record length 4294967295"):
        WAL.open(str(d), segment_size=60)
    assert MAX_RECORD == 64 << 20


@pytest.mark.usefixtures("fake_fsync")
def test_torn_tail_at_every_offset(tmp_path):
    """Cutting the last record of the last segment at ANY byte offset truncates to the previous
    record, keeps a .broken copy, and the WAL stays appendable."""
    src = tmp_path / "src"
    recs = payloads(6, seed=3)
    write_wal(src, recs)
    path = seg_paths(src)[-1]
    full = open(path, "rb").read()
    start, end = record_offsets(path)[-1]
    assert end == len(full)
    for cut in range(start + 1, end):
        d = tmp_path / f"cut{cut}"
        d.mkdir(mode=0o700)
        p = d / os.path.basename(path)
        p.write_bytes(full[:cut])
        got, w = read_wal(d)
        assert got == recs[:-1], cut
        assert w.repairs and f"offset {start}" in w.repairs[0]
        assert os.path.getsize(p) == start
        assert (d / (p.name + ".broken")).read_bytes() == full[:cut]
        w.append([b"after"])
        w.sync()
        w.close()
        got, w = read_wal(d)
        w.close()
        assert got == recs[:-1] + [b"after"]
    # cutting exactly at a record boundary is a clean end: no repair, no .broken
    d = tmp_path / "clean"
    d.mkdir()
    (d / os.path.basename(path)).write_bytes(full[:start])
    got, w = read_wal(d)
    w.close()
    assert got == recs[:-1] and not w.repairs
    assert not [n for n in os.listdir(d) if ".broken" in n]


@pytest.mark.parametrize("overwrite", [False, True])
def test_zero_filled_tail(tmp_path, overwrite):
    """A zero-filled tail (appended zeros, or the last record's bytes zeroed) is truncated."""
    d = tmp_path / "wal"
    recs = payloads(5)
    write_wal(d, recs)
    path = seg_paths(d)[-1]
    start, end = record_offsets(path)[-1]
    with open(path, "r+b") as f:
        if overwrite:
            f.seek(start)
            f.write(b"\0" * (end - start))
        else:
            f.seek(0, 2)
            f.write(b"\0" * 4096)
    got, w = read_wal(d)
    w.close()
    assert got == (recs[:-1] if overwrite else recs)
    assert os.path.getsize(path) == (start if overwrite else end)
    assert os.path.exists(path + ".broken")


def test_torn_header_of_new_last_segment(tmp_path):
    """A last segment whose header was never (fully) written is reset, earlier data kept."""
    d = tmp_path / "wal"
    recs = payloads(4)
    write_wal(d, recs)
    for content in (b"", b"AFSWAL", b"\0" * 16):
        nxt = d / segment_name(len(seg_paths(d)) + 1)
        nxt.write_bytes(content)
        got, w = read_wal(d)
        w.append([b"z"])
        w.sync()
        w.close()
        assert got[:4] == recs
    got, w = read_wal(d)
    w.close()
    assert got == recs + [b"z"] * 3


def test_corruption_in_non_last_segment_raises(tmp_path):
    """A bad record (or a truncated record) in a non-last segment raises StorageCorrupt naming
    the file and offset — never skipped, never 'repaired'."""
    d = tmp_path / "wal"
    write_wal(d, payloads(30), segment_size=150)
    segs = seg_paths(d)
    assert len(segs) >= 3
    victim = segs[1]
    start, end = record_offsets(victim)[-1]
    with open(victim, "r+b") as f:  # a torn-looking tail, but not in the last segment
        f.truncate(end - 2)
    with pytest.raises(StorageCorrupt) as ei:
        WAL.open(str(d), segment_size=150)
    assert os.path.basename(victim) in str(ei.value) and f"offset {start}" in str(ei.value)
    assert not [n for n in os.listdir(d) if ".broken" in n]


def test_missing_middle_segment_raises(tmp_path):
    """A hole in the segment sequence is corruption."""
    d = tmp_path / "wal"
    write_wal(d, payloads(30), segment_size=150)
    os.unlink(seg_paths(d)[1])
    with pytest.raises(StorageCorrupt, match="not consecutive"):
        WAL.open(str(d), segment_size=150)


def test_corruption_mid_last_segment_raises(tmp_path):
    """A bad record in the last segment that is followed by a valid record is corruption."""
    d = tmp_path / "wal"
    write_wal(d, payloads(5))
    path = seg_paths(d)[-1]
    start, end = record_offsets(path)[1]
    with open(path, "r+b") as f:
        f.seek(end - 1)
        b = f.read(1)
        f.seek(end - 1)
        f.write(bytes([b[0] ^ 0x10]))
    with pytest.raises(StorageCorrupt, match=r"offset %d: checksum mismatch.*valid record follows" % start):
        WAL.open(str(d))


@pytest.mark.usefixtures("fake_fsync")
def test_every_bit_flip_is_detected(tmp_path):
    """Flipping a random bit of EVERY byte of every segment is never silently accepted: a flip in
    the last record of the last segment truncates it (with a .broken copy); anything else raises
    StorageCorrupt."""
    src = tmp_path / "src"
    recs = payloads(24, seed=7)
    write_wal(src, recs, batch=2, segment_size=200)
    segs = seg_paths(src)
    assert len(segs) >= 3
    images = {p: open(p, "rb").read() for p in segs}
    last = segs[-1]
    last_start, _ = record_offsets(last)[-1]
    rng = random.Random(1234)
    d = tmp_path / "d"
    outcomes = {"corrupt": 0, "truncated": 0}
    for victim in segs:
        for off in range(len(images[victim])):
            if d.exists():
                for n in os.listdir(d):
                    os.unlink(d / n)
            else:
                d.mkdir(mode=0o700)
            for p, img in images.items():
                if p == victim:
                    img = bytearray(img)
                    img[off] ^= 1 << rng.randrange(8)
                    img = bytes(img)
                (d / os.path.basename(p)).write_bytes(img)
            try:
                got, w = read_wal(d, segment_size=200)
                w.close()
            except StorageCorrupt:
                assert not (victim == last and off >= last_start), (victim, off)
                outcomes["corrupt"] += 1
                continue
            assert victim == last and off >= last_start, (victim, off)
            assert got == recs[:-1]
            assert os.path.exists(d / (os.path.basename(last) + ".broken"))
            outcomes["truncated"] += 1
    assert outcomes["truncated"] == len(images[last]) - last_start
    assert outcomes["corrupt"] > 0


def test_failed_fsync_is_fatal(tmp_path, monkeypatch):
    """An fsync error raises FatalStorageError, and every later call is refused."""
    w = WAL.open(str(tmp_path / "wal"))
    w.append([b"a"])

    def boom(fd):
        raise OSError(5, "EIO")

    monkeypatch.setattr(os, "fdatasync", boom)
    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(FatalStorageError, match="fsync failed"):
        w.sync()
    monkeypatch.undo()  # even once fsync "works" again, the WAL must not be used
    assert w.failed
    with pytest.raises(FatalStorageError):
        w.append([b"b"])
    with pytest.raises(FatalStorageError):
        w.sync()
    with pytest.raises(FatalStorageError):
        w.release_before(5)
    w.close()


def test_failed_write_is_fatal(tmp_path, monkeypatch):
    """A write error (e.g. ENOSPC) is fatal too."""
    w = WAL.open(str(tmp_path / "wal"))

    def boom(fd, b):
        raise OSError(28, "ENOSPC")

    monkeypatch.setattr(os, "write", boom)
    with pytest.raises(FatalStorageError, match="write failed"):
        w.append([b"a"])
    monkeypatch.undo()
    with pytest.raises(FatalStorageError):
        w.append([b"a"])
    w.close()


def test_fault_points_are_known_and_fire(tmp_path):
    """Arming an unknown name fails; an armed point crashes on the requested hit only."""
    f = FaultPoints()
    with pytest.raises(ValueError):
        f.arm("no_such_point")
    for name in ("before_wal_write", "before_wal_fsync", "after_wal_fsync",
                 "before_snapshot_fsync", "before_snapshot_rename", "after_snapshot_rename",
                 "before_dir_fsync"):
        assert name in POINTS
    f.arm("before_wal_fsync", after=2)
    w = WAL.open(str(tmp_path / "wal"), faults=f)
    for i in range(2):
        w.append([b"%d" % i])
        w.sync()
    w.append([b"2"])
    with pytest.raises(CrashPoint) as ei:
        w.sync()
    assert ei.value.name == "before_wal_fsync" and ei.value.hit == 3
    assert not isinstance(ei.value, Exception)  # cannot be swallowed by `except Exception`
    w.append([b"3"])  # disarmed after firing once
    w.sync()
    w.close()


@pytest.mark.usefixtures("fake_fsync")
@pytest.mark.parametrize("point", ["before_wal_write", "before_wal_fsync", "after_wal_fsync",
                                   "before_dir_fsync"])
def test_crash_at_wal_fault_point_recovers_prefix(tmp_path, point):
    """Crashing at each WAL durability step (with and without power loss) reopens to a prefix
    that contains every synced batch."""
    batches = [payloads(3, seed=i) for i in range(12)]
    probe = FaultPoints()
    w = WAL.open(str(tmp_path / "probe2"), faults=probe, segment_size=150)
    for b in batches:
        w.append(b)
        w.sync()
    w.close()
    total = probe.hits[point]
    assert total > 0
    for n in range(total):
        for power_loss in (False, True):
            d = tmp_path / f"{point}-{n}-{power_loss}"
            tracker = SyncTracker()
            f = FaultPoints(tracker)
            f.arm(point, after=n)
            w = None
            acked = 0
            try:
                w = WAL.open(str(d), faults=f, segment_size=150)
                for b in batches:
                    w.append(b)
                    w.sync()
                    acked += 1
            except CrashPoint:
                pass
            if w is not None:
                w.close()
            if power_loss:
                tracker.simulate_power_loss(str(d))
            got, w = read_wal(d, segment_size=150)
            w.close()
            flat = [p for b in batches for p in b]
            assert got == flat[:len(got)], (n, power_loss)
            assert len(got) >= 3 * acked
            if power_loss:
                assert len(got) % 3 == 0  # drop mode: unsynced batches vanish whole


@pytest.mark.usefixtures("fake_fsync")
@pytest.mark.parametrize("mode", ["drop", "torn", "zeros"])
def test_power_loss_drops_only_unsynced(tmp_path, mode):
    """Power loss keeps every synced record and at most a torn prefix of unsynced ones."""
    for seed in range(20):
        d = tmp_path / f"{mode}{seed}"
        tracker = SyncTracker()
        w = WAL.open(str(d), faults=FaultPoints(tracker), segment_size=300)
        recs = payloads(40, seed=seed)
        rng = random.Random(seed)
        synced = 0
        for i in range(0, 40, 4):
            w.append(recs[i:i + 4])
            if rng.random() < 0.5:
                w.sync()
                synced = i + 4
        w.close()
        tracker.simulate_power_loss(str(d), mode=mode, rng=rng)
        got, w = read_wal(d, segment_size=300)
        w.close()
        assert got == recs[:len(got)]
        assert len(got) >= synced


def test_power_loss_without_fsync_loses_acked_data(tmp_path):
    """Negative control: with fsync disabled, 'synced' records do not survive power loss — so
    the power-loss checks above can fail."""
    tracker = SyncTracker()
    d = tmp_path / "wal"
    w = WAL.open(str(d), fsync=False, faults=FaultPoints(tracker))
    w.append([b"acked"])
    w.sync()
    w.close()
    tracker.simulate_power_loss(str(d))
    assert not os.listdir(d)  # even the segment's directory entry was never made durable
