"""Durable Raft state (hard state, log entries, snapshot) on top of the WAL and snapshot store.

Layout: ``<data_dir>/wal/`` (see :mod:`afs.storage.wal`) and ``<data_dir>/snap/`` (see
:mod:`afs.storage.snapshots`), all directories 0700, files 0600.

WAL record payloads are msgpack ``[kind, body]``:

- ``[0, encode_entry(e)]``                       an entry. Replay: an entry whose index is
  <= the current last index truncates the log from that index, then is appended.
- ``[1, encode_hard_state(h)]``                  hard state; the latest one wins.
- ``[2, [encode_snapshot_meta(m), keep]]``        snapshot marker: entries <= m.index are
  dropped; if ``keep`` is false every entry is dropped (the log conflicted with the snapshot).
  ``keep`` is decided once, when the snapshot is saved, and replay obeys it verbatim.

Contract (what the Raft driver may rely on):
- ``save(hs, entries)`` writes the entries, then the hard state, with ONE write and ONE fsync;
  when it returns they are durable. Entries go first so that a torn tail can never leave a hard
  state whose commit index points past the durable log.
- ``save_snapshot(meta, data)``: the snapshot file is durable first, then a WAL marker (plus the
  current hard state, so released segments never hold the only copy of it) is written and
  fsynced, then WAL segments whose entries are all <= meta.index are removed. If the log has an
  entry at meta.index with meta.term the entries after it are kept, otherwise the whole log is
  discarded (as for an InstallSnapshot from a leader). ``open`` completes a save_snapshot that
  crashed after the file became durable but before the marker did.
- After open, ``initial_state()`` gives the hard state, the snapshot meta and the entries after
  the snapshot index, contiguous. Any inconsistency raises :class:`StorageCorrupt`.
- Any I/O failure raises :class:`FatalStorageError` and the storage refuses further use.
- Not thread-safe: one caller (the driver, e.g. from one executor thread) at a time.

``MemoryRaftStorage`` implements the same interface without I/O, for the simulator and unit
tests of the Raft core.
"""
from __future__ import annotations

import os

import msgpack

from afs.errors import FatalStorageError, StorageCorrupt
from afs.raft.messages import (
    Entry, HardState, SnapshotMeta, decode_entry, decode_hard_state, decode_snapshot_meta,
    encode_entry, encode_hard_state, encode_snapshot_meta,
)
from afs.storage.faults import FaultPoints
from afs.storage.snapshots import SnapshotStore
from afs.storage.wal import DEFAULT_SEGMENT_SIZE, WAL, ensure_dir

KIND_ENTRY = 0
KIND_HARD_STATE = 1
KIND_SNAPSHOT = 2

_packb = msgpack.Packer(use_bin_type=True).pack


def encode_entry_record(e: Entry) -> bytes:
    return _packb([KIND_ENTRY, encode_entry(e)])


def encode_hard_state_record(h: HardState) -> bytes:
    return _packb([KIND_HARD_STATE, encode_hard_state(h)])


def encode_snapshot_record(meta: SnapshotMeta, keep: bool) -> bytes:
    return _packb([KIND_SNAPSHOT, [encode_snapshot_meta(meta), keep]])


def decode_record(payload: bytes):
    """-> (kind, value); raises ValueError on anything malformed."""
    try:
        raw = msgpack.unpackb(payload, raw=False)
    except (msgpack.UnpackException, ValueError) as e:
        raise ValueError(f"undecodable record: {e}") from e
    if not isinstance(raw, list) or len(raw) != 2:
        raise ValueError("record is not [kind, body]")
    kind, body = raw
    if kind == KIND_ENTRY:
        return kind, decode_entry(body)
    if kind == KIND_HARD_STATE:
        return kind, decode_hard_state(body)
    if kind == KIND_SNAPSHOT:
        if not isinstance(body, list) or len(body) != 2 or not isinstance(body[1], bool):
            raise ValueError("malformed snapshot marker")
        return kind, (decode_snapshot_meta(body[0]), body[1])
    raise ValueError(f"unknown record kind {kind!r} (written by a newer version?)")


class _Log:
    """The in-memory log: entries after ``snap.index``, contiguous. Shared replay semantics."""

    def __init__(self) -> None:
        self.hs = HardState()
        self.snap = SnapshotMeta()
        self.entries: list[Entry] = []
        self.anchored = True  # False while replaying a WAL whose oldest segments were released

    def last_index(self) -> int:
        return self.entries[-1].index if self.entries else self.snap.index

    def term(self, index: int) -> int | None:
        if index == self.snap.index:
            return self.snap.term
        if self.entries:
            off = index - self.entries[0].index
            if 0 <= off < len(self.entries):
                return self.entries[off].term
        return None

    def put_entry(self, e: Entry) -> None:
        if not self.entries:
            if not self.anchored and e.index > self.snap.index:
                self.entries.append(e)
                return
            if e.index != self.snap.index + 1:
                raise ValueError(f"entry {e.index} does not follow snapshot index {self.snap.index}")
            self.entries.append(e)
            return
        first = self.entries[0].index
        if e.index > self.entries[-1].index + 1:
            raise ValueError(f"entry {e.index} leaves a gap after {self.entries[-1].index}")
        if e.index < first:
            if self.anchored or e.index <= self.snap.index:
                raise ValueError(f"entry {e.index} precedes the log start {first}")
            self.entries.clear()
            self.entries.append(e)
            return
        del self.entries[e.index - first:]
        self.entries.append(e)

    def put_snapshot(self, meta: SnapshotMeta, keep: bool) -> None:
        if keep:
            if self.entries:
                self.entries = self.entries[max(meta.index + 1 - self.entries[0].index, 0):]
            # while unanchored the log may still start after meta.index + 1: the entries in
            # between were in released segments and a later marker covers them (checked at end)
        else:
            self.entries = []
            self.anchored = True  # the log was reset: the next entry must be meta.index + 1
        self.snap = meta


class _LogReads:
    """Read accessors shared by RaftStorage and MemoryRaftStorage (both hold a ``_log``)."""

    _log: _Log

    def initial_state(self) -> tuple[HardState, SnapshotMeta, list[Entry]]:
        """(hard state, snapshot meta, entries after the snapshot index in order)."""
        return self._log.hs, self._log.snap, list(self._log.entries)

    def hard_state(self) -> HardState:
        return self._log.hs

    def snapshot_meta(self) -> SnapshotMeta:
        return self._log.snap

    def first_index(self) -> int:
        return self._log.snap.index + 1

    def last_index(self) -> int:
        return self._log.last_index()

    def term(self, index: int) -> int | None:
        """Term of the entry at ``index`` (the snapshot's term at its index); None if unknown."""
        return self._log.term(index)

    def entries(self, lo: int, hi: int) -> list[Entry]:
        """Entries with lo <= index < hi (clipped to what is held)."""
        es = self._log.entries
        if not es:
            return []
        base = es[0].index
        return es[max(lo - base, 0):max(hi - base, 0)]


class RaftStorage(_LogReads):
    """Durable Raft storage in ``data_dir``. See the module docstring for the contract."""

    def __init__(self, wal: WAL, snaps: SnapshotStore, state: _Log, seg_max: dict[int, int],
                 fsync: bool, faults: FaultPoints | None):
        self._wal = wal
        self._snaps = snaps
        self._log = state
        self._seg_max = seg_max   # segment seq -> highest entry index written in it (0 = none)
        self._fsync = fsync
        self._faults = faults
        self._closed = False

    # ------------------------------------------------------------------ open
    @classmethod
    def open(cls, data_dir: str, *, fsync: bool = True, faults: FaultPoints | None = None,
             segment_size: int = DEFAULT_SEGMENT_SIZE) -> "RaftStorage":
        ensure_dir(data_dir)
        snaps = SnapshotStore(os.path.join(data_dir, "snap"), fsync=fsync, faults=faults)
        latest = snaps.load_latest()  # verifies the newest snapshot (StorageCorrupt if bad)
        file_meta = latest[0] if latest is not None else None
        del latest
        wal = WAL.open(os.path.join(data_dir, "wal"), fsync=fsync, faults=faults,
                       segment_size=segment_size)
        try:
            state = _Log()
            seqs = wal.segments()
            state.anchored = seqs[0] == 1
            seg_max: dict[int, int] = {s: 0 for s in seqs}
            for seq, payload in wal.replay():
                try:
                    kind, value = decode_record(payload)
                    if kind == KIND_ENTRY:
                        state.put_entry(value)
                        if value.index > seg_max[seq]:
                            seg_max[seq] = value.index
                    elif kind == KIND_HARD_STATE:
                        state.hs = value
                    else:
                        state.put_snapshot(*value)
                except ValueError as e:
                    raise StorageCorrupt(
                        f"WAL {wal.dir} segment {seq}: inconsistent record: {e}") from e
            self = cls(wal, snaps, state, seg_max, fsync, faults)
            self._reconcile(file_meta)
        except BaseException:
            wal.close()
            raise
        return self

    def _reconcile(self, file_meta: SnapshotMeta | None) -> None:
        st = self._log
        marker = st.snap
        if file_meta is None:
            if marker.index > 0:
                raise StorageCorrupt(
                    f"WAL marks a snapshot at index {marker.index} term {marker.term} but "
                    f"{self._snaps.dir} holds no snapshot")
        elif file_meta == marker:
            pass
        elif file_meta.index > marker.index or (file_meta.index, file_meta.term) == (marker.index, marker.term):
            # save_snapshot crashed after the file was durable, before the marker was: finish it
            # (idempotent if a marker for the same index/term exists, e.g. an index-0 bootstrap).
            self._write_marker(file_meta)
        else:
            raise StorageCorrupt(
                f"WAL marks snapshot index {marker.index} term {marker.term} but the newest "
                f"snapshot file is index {file_meta.index} term {file_meta.term}")
        if st.entries and st.entries[0].index != st.snap.index + 1:
            raise StorageCorrupt(f"WAL {self._wal.dir}: log starts at {st.entries[0].index}, "
                                 f"expected {st.snap.index + 1} after the snapshot (missing "
                                 f"segment or marker)")
        st.anchored = True

    # ------------------------------------------------------------------ reads
    def _check(self) -> None:
        if self._closed:
            raise FatalStorageError("RaftStorage is closed")
        if self._wal.failed:
            raise FatalStorageError("RaftStorage is unusable after an earlier write/fsync failure")

    def load_snapshot(self) -> tuple[SnapshotMeta, bytes] | None:
        self._check()
        if not self._snaps.list():
            return None
        return self._snaps.load(self._log.snap.index, self._log.snap.term)

    # ------------------------------------------------------------------ writes
    def save(self, hard_state: HardState | None, entries: list[Entry]) -> None:
        """Persist entries (replacing the suffix from entries[0].index) then the hard state;
        one write + one fsync. No-op if there is nothing new."""
        self._check()
        st = self._log
        payloads: list[bytes] = []
        if entries:
            first = entries[0].index
            if first <= st.snap.index:
                raise ValueError(f"entry {first} is at or below the snapshot index {st.snap.index}")
            if first > st.last_index() + 1:
                raise ValueError(f"entry {first} leaves a gap after {st.last_index()}")
            prev = first - 1
            for e in entries:
                if e.index != prev + 1:
                    raise ValueError(f"entries not contiguous at {e.index}")
                prev = e.index
            # never truncate a committed entry (a Raft safety bug upstream if it happens)
            commit = st.hs.commit
            for e in entries:
                if e.index > commit or e.index > st.last_index():
                    break
                if st.term(e.index) != e.term:
                    raise ValueError(f"refusing to overwrite committed entry {e.index}")
            payloads.extend([encode_entry_record(e) for e in entries])
        if hard_state is not None and hard_state != st.hs:
            payloads.append(encode_hard_state_record(hard_state))
        if not payloads:
            return
        seq = self._wal.append(payloads)
        self._wal.sync()
        if entries:  # validated above: contiguous, first in (snap.index, last + 1]
            es = st.entries
            if es:
                del es[entries[0].index - es[0].index:]
            es.extend(entries)
        if entries and entries[-1].index > self._seg_max.get(seq, 0):
            self._seg_max[seq] = entries[-1].index
        if hard_state is not None:
            st.hs = hard_state

    def _write_marker(self, meta: SnapshotMeta) -> None:
        st = self._log
        keep = st.term(meta.index) == meta.term
        seq = self._wal.append([encode_snapshot_record(meta, keep), encode_hard_state_record(st.hs)])
        self._wal.sync()
        self._seg_max.setdefault(seq, 0)
        st.put_snapshot(meta, keep)

    def save_snapshot(self, meta: SnapshotMeta, data: bytes) -> None:
        """Snapshot file durable, then WAL marker durable, then obsolete segments released."""
        self._check()
        st = self._log
        if meta.index < st.snap.index or (meta.index == st.snap.index and meta.term != st.snap.term
                                          and meta.index != 0):
            raise ValueError(f"snapshot {meta.index}/{meta.term} is older than the current "
                             f"{st.snap.index}/{st.snap.term}")
        self._snaps.save(meta, data)
        if self._faults is not None:
            self._faults.hit("before_snapshot_marker")
        self._write_marker(meta)
        if self._faults is not None:
            self._faults.hit("before_wal_release")
        self._release(meta.index)

    def _release(self, upto: int) -> None:
        segs = self._wal.segments()
        cut = None
        for s in segs[:-1]:  # never the active segment (it holds the marker)
            if self._seg_max.get(s, 0) <= upto:
                cut = s + 1
            else:
                break
        if cut is not None:
            self._wal.release_before(cut)
            for s in list(self._seg_max):
                if s < cut:
                    del self._seg_max[s]

    def close(self) -> None:
        """Close files. Does not sync: everything save()d is already durable. Always safe."""
        self._closed = True
        self._wal.close()


class MemoryRaftStorage(_LogReads):
    """Same interface as RaftStorage, in memory (simulator, Raft core tests). No durability."""

    def __init__(self) -> None:
        self._log = _Log()
        self._snap_data: bytes | None = None

    @classmethod
    def open(cls, data_dir: str = "", **_ignored) -> "MemoryRaftStorage":
        return cls()

    def save(self, hard_state: HardState | None, entries: list[Entry]) -> None:
        st = self._log
        if entries:
            if entries[0].index <= st.snap.index or entries[0].index > st.last_index() + 1:
                raise ValueError(f"entry {entries[0].index} out of range")
            for e in entries:
                st.put_entry(e)
        if hard_state is not None:
            st.hs = hard_state

    def save_snapshot(self, meta: SnapshotMeta, data: bytes) -> None:
        if meta.index < self._log.snap.index:
            raise ValueError("snapshot older than the current one")
        self._log.put_snapshot(meta, self._log.term(meta.index) == meta.term)
        self._snap_data = bytes(data)

    def load_snapshot(self) -> tuple[SnapshotMeta, bytes] | None:
        if self._snap_data is None:
            return None
        return self._log.snap, self._snap_data

    def close(self) -> None:
        pass
