"""RaftStorage: replay semantics (truncation, snapshot markers, hard state), durability ordering,
crash/power-loss recovery at every fault point, and parity with MemoryRaftStorage."""
from __future__ import annotations

import os
import random

import pytest

from afs.errors import FatalStorageError, StorageCorrupt
from afs.raft.messages import ConfState, Entry, HardState, SnapshotMeta
from afs.storage.faults import POINTS, CrashPoint, FaultPoints, SyncTracker
from afs.storage.raftlog import MemoryRaftStorage, RaftStorage
from afs.storage.snapshots import snapshot_name

@pytest.fixture
def fake_fsync(monkeypatch):
    """Make fsync/fdatasync no-ops. Heavy crash tests model durability with SyncTracker (which
    still sees every fsync call site); the real syscalls would only cost time on a shared disk.
    Round-trip tests keep the real syscalls."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    monkeypatch.setattr(os, "fdatasync", lambda fd: None)


CONF = ConfState(("n1", "n2", "n3"))


def ents(lo: int, hi: int, term: int, tag: bytes = b"") -> list[Entry]:
    return [Entry(i, term, data=b"%s%d-%d" % (tag, i, term)) for i in range(lo, hi + 1)]


def snap(index: int, term: int) -> SnapshotMeta:
    return SnapshotMeta(index, term, CONF)


# ------------------------------------------------------------------ a reference model

class Model:
    """The obvious semantics, written independently of afs.storage.raftlog."""

    def __init__(self):
        self.hs = HardState()
        self.snap = SnapshotMeta()
        self.entries: list[Entry] = []
        self.snap_data = None

    def copy(self) -> "Model":
        m = Model()
        m.hs, m.snap, m.entries, m.snap_data = self.hs, self.snap, list(self.entries), self.snap_data
        return m

    def term(self, i):
        if i == self.snap.index:
            return self.snap.term
        for e in self.entries:
            if e.index == i:
                return e.term
        return None

    def put(self, e: Entry):
        self.entries = [x for x in self.entries if x.index < e.index] + [e]

    def save(self, hs, es):
        for e in es:
            self.put(e)
        if hs is not None:
            self.hs = hs

    def save_snapshot(self, meta, data):
        keep = self.term(meta.index) == meta.term
        self.entries = [e for e in self.entries if e.index > meta.index] if keep else []
        self.snap, self.snap_data = meta, data

    def state(self):
        return (self.hs, self.snap, tuple(self.entries))


def disk_state(s: RaftStorage):
    hs, sn, es = s.initial_state()
    return (hs, sn, tuple(es))


def apply(target, op):
    kind, a, b = op
    if kind == "save":
        target.save(a, b)
    else:
        target.save_snapshot(a, b)


# A workload exercising every code path: truncations, snapshots that keep the suffix, a snapshot
# beyond the log (InstallSnapshot), segment rolls and releases (small segments).
WORKLOAD = [
    ("save", HardState(1, "n1", 0), ents(1, 5, 1)),
    ("save", HardState(1, "n1", 3), []),
    ("save", None, ents(4, 8, 2)),                      # truncates 4..5
    ("save", HardState(2, "n2", 6), ents(9, 12, 2)),
    ("snap", snap(6, 2), b"snap-6"),
    ("save", None, ents(13, 20, 2)),
    ("save", HardState(3, "n2", 8), ents(10, 14, 3)),   # truncates 10..20
    ("snap", snap(12, 3), b"snap-12"),
    ("save", HardState(3, "n2", 12), ents(15, 18, 3)),
    ("snap", snap(30, 4), b"snap-30"),                  # beyond the log: log discarded
    ("save", HardState(4, "", 30), ents(31, 33, 4)),
    ("save", None, ents(34, 60, 4, b"x" * 30)),
    ("snap", snap(50, 4), b"snap-50"),
    ("save", HardState(4, "", 55), ents(61, 62, 4)),
]
SEG = 300


def test_round_trip(tmp_path):
    """Hard state, entries and snapshot come back after reopen exactly as the model says."""
    m = Model()
    s = RaftStorage.open(str(tmp_path), segment_size=SEG)
    for op in WORKLOAD:
        apply(s, op)
        apply(m, op)
        assert disk_state(s) == m.state()
        s.close()
        s = RaftStorage.open(str(tmp_path), segment_size=SEG)
        assert disk_state(s) == m.state()
        assert s.last_index() == (m.entries[-1].index if m.entries else m.snap.index)
    assert s.load_snapshot() == (m.snap, m.snap_data)
    assert len(s._wal.segments()) < 8  # obsolete segments were released
    s.close()


def test_empty_storage(tmp_path):
    """A fresh directory yields the zero state, no snapshot, last_index 0."""
    s = RaftStorage.open(str(tmp_path / "d"))
    assert s.initial_state() == (HardState(), SnapshotMeta(), [])
    assert s.load_snapshot() is None and s.last_index() == 0
    s.close()


def test_truncation_by_lower_index_on_replay(tmp_path):
    """A later entry with a lower index replaces the suffix, also after replay."""
    s = RaftStorage.open(str(tmp_path))
    s.save(HardState(1, "a", 0), ents(1, 10, 1))
    s.save(HardState(2, "b", 0), ents(4, 5, 2))
    s.close()
    s = RaftStorage.open(str(tmp_path))
    assert s.initial_state()[2] == ents(1, 3, 1) + ents(4, 5, 2)
    assert s.hard_state() == HardState(2, "b", 0)
    assert s.term(5) == 2 and s.term(6) is None and s.last_index() == 5
    assert s.entries(2, 5) == ents(2, 3, 1) + ents(4, 4, 2)
    s.close()


def test_snapshot_marker_replay(tmp_path):
    """Entries <= the marker index are dropped; the suffix is kept when the terms match."""
    s = RaftStorage.open(str(tmp_path))
    s.save(HardState(1, "a", 7), ents(1, 10, 1))
    s.save_snapshot(snap(7, 1), b"S7")
    s.close()
    s = RaftStorage.open(str(tmp_path))
    hs, sn, es = s.initial_state()
    assert (hs, sn, es) == (HardState(1, "a", 7), snap(7, 1), ents(8, 10, 1))
    assert s.first_index() == 8 and s.term(7) == 1
    assert s.load_snapshot() == (snap(7, 1), b"S7")
    s.close()


def test_snapshot_conflicting_with_log_discards_it(tmp_path):
    """A snapshot whose term at its index differs from the log discards the whole log."""
    s = RaftStorage.open(str(tmp_path))
    s.save(HardState(1, "a", 2), ents(1, 10, 1))
    s.save_snapshot(snap(8, 5), b"S8")
    assert s.initial_state()[2] == [] and s.last_index() == 8
    s.save(HardState(5, "", 8), ents(9, 9, 5))
    s.close()
    s = RaftStorage.open(str(tmp_path))
    assert s.initial_state() == (HardState(5, "", 8), snap(8, 5), ents(9, 9, 5))
    s.close()


def test_save_validation(tmp_path):
    """Gaps, non-contiguous batches, entries under the snapshot and overwriting a committed
    entry are refused (bugs upstream), without writing anything."""
    s = RaftStorage.open(str(tmp_path))
    s.save(HardState(1, "a", 3), ents(1, 5, 1))
    with pytest.raises(ValueError, match="gap"):
        s.save(None, ents(7, 8, 1))
    with pytest.raises(ValueError, match="contiguous"):
        s.save(None, [Entry(6, 1), Entry(8, 1)])
    with pytest.raises(ValueError, match="committed"):
        s.save(None, ents(3, 4, 2))
    s.save(None, ents(3, 4, 1) + ents(5, 6, 2))  # identical committed prefix is fine
    s.save_snapshot(snap(4, 1), b"")
    with pytest.raises(ValueError, match="snapshot index"):
        s.save(None, ents(4, 4, 1))
    with pytest.raises(ValueError):
        s.save_snapshot(snap(2, 1), b"")
    s.close()
    s = RaftStorage.open(str(tmp_path))
    assert s.initial_state()[2] == ents(5, 6, 2)
    s.close()


def test_hard_state_latest_wins_and_survives_release(tmp_path):
    """The last hard state wins, even after every segment that held it was released."""
    s = RaftStorage.open(str(tmp_path), segment_size=200)
    s.save(HardState(9, "z", 0), [])
    for i in range(1, 40, 3):
        s.save(None, ents(i, i + 2, 9))
    s.save_snapshot(snap(42, 9), b"")
    assert s._wal.segments() == [s._wal.active_seq]
    s.close()
    s = RaftStorage.open(str(tmp_path), segment_size=200)
    assert s.initial_state() == (HardState(9, "z", 0), snap(42, 9), [])
    s.close()


def test_release_with_older_marker_in_kept_segment(tmp_path):
    """Replay after segments were released, where a kept segment starts with an OLDER marker
    followed by entries whose predecessors were released, reconstructs the log."""
    s = RaftStorage.open(str(tmp_path), segment_size=250)
    s.save(HardState(1, "a", 0), ents(1, 50, 1))          # one big segment
    s.save_snapshot(snap(40, 1), b"40")                   # marker in a new segment
    s.save(None, ents(51, 60, 1))
    s.save_snapshot(snap(55, 1), b"55")                   # releases the first segment only
    m = (HardState(1, "a", 0), snap(55, 1), tuple(ents(56, 60, 1)))
    assert disk_state(s) == m
    s.close()
    s = RaftStorage.open(str(tmp_path), segment_size=250)
    assert disk_state(s) == m
    s.close()


def test_save_of_100_entries_is_one_write_one_fsync(tmp_path, monkeypatch):
    """save(hs, 100 entries) issues exactly one write and one fsync."""
    s = RaftStorage.open(str(tmp_path))
    calls = {"write": 0, "fsync": 0}
    real_write, real_sync = os.write, os.fdatasync

    def cw(fd, b):
        calls["write"] += 1
        return real_write(fd, b)

    def cs(fd):
        calls["fsync"] += 1
        return real_sync(fd)

    monkeypatch.setattr(os, "write", cw)
    monkeypatch.setattr(os, "fdatasync", cs)
    monkeypatch.setattr(os, "fsync", cs)
    s.save(HardState(1, "a", 0), [Entry(i, 1, data=b"x" * 100) for i in range(1, 101)])
    assert calls == {"write": 1, "fsync": 1}
    s.save(HardState(1, "a", 0), [])  # unchanged hard state, no entries: nothing to do
    assert calls == {"write": 1, "fsync": 1}
    s.close()


def test_failed_fsync_is_fatal(tmp_path, monkeypatch):
    """A failed fsync in save() is fatal; all later calls raise; nothing unsynced is reported
    back as state."""
    s = RaftStorage.open(str(tmp_path))
    s.save(HardState(1, "a", 0), ents(1, 2, 1))

    def boom(fd):
        raise OSError(5, "EIO")

    monkeypatch.setattr(os, "fdatasync", boom)
    with pytest.raises(FatalStorageError):
        s.save(None, ents(3, 3, 1))
    monkeypatch.undo()
    assert s.last_index() == 2
    with pytest.raises(FatalStorageError):
        s.save(None, ents(3, 3, 1))
    with pytest.raises(FatalStorageError):
        s.save(HardState(2, "b", 0), [])
    with pytest.raises(FatalStorageError):
        s.save_snapshot(snap(1, 1), b"")
    s.close()


def test_snapshot_durable_but_marker_missing_is_completed(tmp_path):
    """Crash between the snapshot file and its WAL marker: open finishes the job."""
    f = FaultPoints()
    s = RaftStorage.open(str(tmp_path), faults=f)
    s.save(HardState(1, "a", 5), ents(1, 8, 1))
    f.arm("before_snapshot_marker")
    with pytest.raises(CrashPoint):
        s.save_snapshot(snap(5, 1), b"S5")
    s.close()
    s = RaftStorage.open(str(tmp_path))
    assert disk_state(s) == (HardState(1, "a", 5), snap(5, 1), tuple(ents(6, 8, 1)))
    s.save(None, ents(9, 9, 1))
    s.close()
    s = RaftStorage.open(str(tmp_path))  # the completed marker is itself durable
    assert disk_state(s) == (HardState(1, "a", 5), snap(5, 1), tuple(ents(6, 9, 1)))
    s.close()


def test_marker_without_snapshot_file_is_corrupt(tmp_path):
    """A WAL marker naming a snapshot that is not on disk raises StorageCorrupt."""
    s = RaftStorage.open(str(tmp_path))
    s.save(HardState(1, "a", 5), ents(1, 8, 1))
    s.save_snapshot(snap(5, 1), b"S5")
    s.close()
    os.unlink(tmp_path / "snap" / snapshot_name(5, 1))
    with pytest.raises(StorageCorrupt, match="holds no snapshot"):
        RaftStorage.open(str(tmp_path))


def test_corrupt_wal_in_old_segment_stops_open(tmp_path):
    """A flipped bit in a non-last WAL segment makes open() raise StorageCorrupt."""
    s = RaftStorage.open(str(tmp_path), segment_size=200)
    for i in range(1, 30, 3):
        s.save(HardState(1, "a", 0), ents(i, i + 2, 1))
    s.close()
    first = sorted(os.listdir(tmp_path / "wal"))[0]
    p = tmp_path / "wal" / first
    b = bytearray(p.read_bytes())
    b[40] ^= 4
    p.write_bytes(bytes(b))
    with pytest.raises(StorageCorrupt, match=first):
        RaftStorage.open(str(tmp_path), segment_size=200)


# ------------------------------------------------------------------ crash / power loss

def _allowed_states(before: Model, op) -> list:
    """States a crash during ``op`` may leave: before, after, or (for save) any prefix of its
    records (entries first, then the hard state)."""
    kind, a, b = op
    out = [before.state()]
    if kind == "save":
        for j in range(1, len(b) + 1):
            m = before.copy()
            m.save(None, b[:j])
            out.append(m.state())
    after = before.copy()
    apply(after, op)
    out.append(after.state())
    return out


def _run_until_crash(d, faults):
    """Run WORKLOAD; return (index of the op that crashed or len(WORKLOAD), model before it)."""
    m = Model()
    s = None
    i = 0
    try:
        s = RaftStorage.open(str(d), faults=faults, segment_size=SEG)
        for i, op in enumerate(WORKLOAD):
            apply(s, op)
            apply(m, op)
        i = len(WORKLOAD)
    except CrashPoint:
        pass
    finally:
        if s is not None:
            s.close()
    return i, m


def _probe_hits():
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        f = FaultPoints()
        _run_until_crash(d, f)
        return dict(f.hits)


HITS = _probe_hits()


def test_workload_touches_every_fault_point():
    """The crash workload reaches every durability step (else the crash tests prove nothing)."""
    missing = set(POINTS) - set(HITS) - {"before_wal_truncate"}
    assert not missing


@pytest.mark.usefixtures("fake_fsync")
@pytest.mark.parametrize("point", sorted(HITS))
@pytest.mark.parametrize("mode", [None, "drop", "torn", "zeros"])
def test_crash_at_every_fault_point_recovers(tmp_path, point, mode):
    """Crash at every hit of every fault point (optionally followed by power loss): reopen yields
    a state the model allows — all completed operations present, the crashed one either absent,
    complete, or (for save) a prefix of its records — and the storage stays usable."""
    for n in range(HITS[point]):
        d = tmp_path / str(n)
        tracker = SyncTracker()
        f = FaultPoints(tracker)
        f.arm(point, after=n)
        crashed_at, m = _run_until_crash(d, f)
        assert crashed_at < len(WORKLOAD), "armed point did not fire"
        if mode is not None:
            tracker.simulate_power_loss(str(d), mode=mode, rng=random.Random(n))
        s = RaftStorage.open(str(d), segment_size=SEG)
        got = disk_state(s)
        allowed = _allowed_states(m, WORKLOAD[crashed_at])
        assert got in allowed, (point, n, mode, crashed_at)
        if mode in (None, "drop"):
            assert got in (allowed[0], allowed[-1])  # whole batches only
        if got[1].index:
            assert s.load_snapshot()[0] == got[1]
        # still usable, and what we write now survives another reopen
        nxt = Entry(s.last_index() + 1, 99, data=b"after")
        s.save(HardState(99, "", got[0].commit), [nxt])
        s.close()
        s = RaftStorage.open(str(d), segment_size=SEG)
        assert s.initial_state()[2][-1] == nxt and s.hard_state().term == 99
        s.close()


@pytest.mark.usefixtures("fake_fsync")
def test_power_loss_after_ack_loses_nothing(tmp_path):
    """After every acknowledged op, a power cut keeps exactly the acknowledged state."""
    for k in range(1, len(WORKLOAD) + 1):
        d = tmp_path / str(k)
        tracker = SyncTracker()
        s = RaftStorage.open(str(d), faults=FaultPoints(tracker), segment_size=SEG)
        m = Model()
        for op in WORKLOAD[:k]:
            apply(s, op)
            apply(m, op)
        s.close()
        tracker.simulate_power_loss(str(d), mode="torn", rng=random.Random(k))
        s = RaftStorage.open(str(d), segment_size=SEG)
        assert disk_state(s) == m.state()
        s.close()


def test_power_loss_negative_control_fsync_disabled(tmp_path):
    """Negative control: with fsync=False the same check fails (acknowledged data is lost)."""
    tracker = SyncTracker()
    d = tmp_path / "d"
    s = RaftStorage.open(str(d), fsync=False, faults=FaultPoints(tracker), segment_size=SEG)
    m = Model()
    for op in WORKLOAD[:4]:
        apply(s, op)
        apply(m, op)
    s.close()
    tracker.simulate_power_loss(str(d))
    s = RaftStorage.open(str(d), segment_size=SEG)
    assert disk_state(s) != m.state()
    s.close()


# ------------------------------------------------------------------ randomized model check

@pytest.mark.usefixtures("fake_fsync")
@pytest.mark.parametrize("seed", range(12))
def test_random_ops_match_model_and_memory_storage(tmp_path, seed):
    """Random saves (with truncations), snapshots and reopens: RaftStorage, MemoryRaftStorage
    and the reference model always agree."""
    rng = random.Random(seed)
    m = Model()
    mem = MemoryRaftStorage()
    s = RaftStorage.open(str(tmp_path), segment_size=rng.choice([120, 400, 4096]))
    term = 1
    for step in range(120):
        r = rng.random()
        last = m.entries[-1].index if m.entries else m.snap.index
        if r < 0.65:
            lo = max(m.snap.index + 1, m.hs.commit + 1, last + 1 - rng.randrange(0, 4))
            if rng.random() < 0.3:
                term += 1
            es = ents(lo, lo + rng.randrange(0, 6), term, b"s%d" % step)
            commit = min(m.hs.commit + rng.randrange(0, 3), es[-1].index if es else last)
            hs = HardState(term, rng.choice(["", "n1", "n2"]), max(commit, m.hs.commit)) \
                if rng.random() < 0.6 else None
            op = ("save", hs, es)
        elif r < 0.8:
            if rng.random() < 0.8 and last > m.snap.index:
                idx = rng.randrange(m.snap.index + 1, last + 1)
                meta = snap(idx, m.term(idx))
            else:
                term += 1
                meta = snap(last + rng.randrange(0 if last > m.snap.index else 1, 5), term)
            op = ("snap", meta, b"d%d" % step)
        else:
            s.close()
            s = RaftStorage.open(str(tmp_path), segment_size=s._wal.segment_size)
            assert disk_state(s) == m.state()
            continue
        apply(m, op)
        apply(mem, op)
        apply(s, op)
        assert disk_state(s) == m.state() == (mem.initial_state()[0], mem.initial_state()[1],
                                              tuple(mem.initial_state()[2]))
    s.close()
    s = RaftStorage.open(str(tmp_path), segment_size=4096)
    assert disk_state(s) == m.state()
    if m.snap.index:
        assert s.load_snapshot() == (m.snap, m.snap_data)
    s.close()


def test_bootstrap_snapshot_at_index_zero(tmp_path):
    """A snapshot at index 0 (initial membership) round-trips with its conf state, also when the
    crash hit between the file and the WAL marker."""
    f = FaultPoints()
    s = RaftStorage.open(str(tmp_path), faults=f)
    f.arm("before_snapshot_marker")
    with pytest.raises(CrashPoint):
        s.save_snapshot(SnapshotMeta(0, 0, CONF), b"boot")
    s.close()
    s = RaftStorage.open(str(tmp_path))
    assert s.snapshot_meta() == SnapshotMeta(0, 0, CONF)
    assert s.load_snapshot() == (SnapshotMeta(0, 0, CONF), b"boot")
    s.save(HardState(1, "n1", 0), ents(1, 1, 1))
    s.close()
    s = RaftStorage.open(str(tmp_path))
    assert disk_state(s) == (HardState(1, "n1", 0), SnapshotMeta(0, 0, CONF), tuple(ents(1, 1, 1)))
    s.close()
