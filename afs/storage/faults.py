"""Named fault points at each durability step, and a power-loss simulator (test hooks).

Contract:
- Storage writers take ``faults: FaultPoints | None``. Production passes ``None``; the only
  cost is an ``if faults is not None`` at each step.
- ``FaultPoints.hit(name)`` is called at every durability step listed in :data:`POINTS`.
  A test arms a point to raise :class:`CrashPoint` (a ``BaseException``, so no
  ``except Exception`` in the code under test can swallow it) on the N-th hit, or to run a
  callback there. Points are hit whether or not the writer really fsyncs (``fsync=False``). After a ``CrashPoint`` the writer object must be abandoned (``close()`` is
  always safe) and the directory reopened — exactly like a process that died at that line.
- ``SyncTracker`` (attached as ``FaultPoints.tracker``) is told by the writers what they
  wrote, fsynced, created, renamed and removed. ``simulate_power_loss(dir)`` then rewinds the
  files on disk to what a power cut would leave: each file truncated to its last fsynced
  length (optionally keeping a torn/zero-filled part of the unsynced bytes), and files whose
  directory entry was created since the last fsync of their directory deleted.
  Model limits (documented, deliberate): removals are treated as immediately durable, and a
  rename over an existing file is not undone (our writers never rename over a live file
  except a snapshot re-saved at the same index/term, whose content is then identical in role).
- Not thread-safe; one writer thread at a time (the storage layer is single-threaded).
"""
from __future__ import annotations

import collections
import os
import random
from typing import Callable

# The ordering rule each point guards, in the order the steps happen. A crash at a point means
# "everything before it in program order happened (maybe only in the page cache), nothing after".
POINTS: dict[str, str] = {
    # WAL append: the framed records of one save() are handed to the kernel in ONE write call.
    # Rule: nothing may be acknowledged (and no message depending on it sent) before the fsync
    # that follows; a crash here loses the batch, which is allowed because nothing was acked.
    "before_wal_write": "WAL: records framed, not yet written",
    # Rule: the records are in the page cache only; a power loss may drop or tear them. Replay
    # must treat a torn/zero-filled tail of the LAST segment as never written.
    "before_wal_fsync": "WAL: records written, fsync not yet issued",
    # Rule: from here on the records are durable; only now may the caller ack/persist-before-send.
    "after_wal_fsync": "WAL: fsync returned; records durable",
    # A new WAL segment (or snapshot) directory entry only survives power loss after the
    # directory is fsynced. Rule: a new segment is never written to before its directory entry
    # is durable, and a renamed snapshot is not referenced from the WAL before the dir fsync.
    "before_dir_fsync": "directory entry created/renamed/removed, directory not yet fsynced",
    # Snapshot: data written to <name>.tmp. Rule: the tmp file is never renamed into place before
    # it is fsynced, so the final name always refers to complete, durable bytes.
    "before_snapshot_fsync": "snapshot: tmp file written, not yet fsynced",
    # Rule: the old snapshot(s) stay loadable until the rename; a crash here leaves a tmp file,
    # which is deleted on open.
    "before_snapshot_rename": "snapshot: tmp file durable, not yet renamed into place",
    # Rule: the rename is atomic; after it the new snapshot is visible (durable after the
    # following directory fsync).
    "after_snapshot_rename": "snapshot: renamed into place, directory not yet fsynced",
    # Rule: older snapshots are pruned only after the new one is durable, and at least one older
    # snapshot is kept, so the WAL's newest marker always names an existing file.
    "before_snapshot_prune": "snapshot: new snapshot durable, old ones not yet pruned",
    # raftlog: the snapshot file is durable but the WAL does not mark it yet. Rule: the marker is
    # written only after the snapshot file is durable; open() completes a missing marker.
    "before_snapshot_marker": "raftlog: snapshot durable, WAL marker not yet written",
    # raftlog: the marker is durable. Rule: WAL segments are released only after the marker that
    # makes them obsolete is durable; segments are removed oldest first (no holes).
    "before_wal_release": "raftlog: marker durable, obsolete segments not yet removed",
    # WAL open found a torn tail. Rule: the .broken copy is made (and fsynced) before truncating.
    "before_wal_truncate": "WAL repair: .broken copy written, tail not yet truncated",
}


class CrashPoint(BaseException):
    """Raised by an armed fault point: the simulated process dies here."""

    def __init__(self, name: str, hit: int):
        super().__init__(f"crash at fault point {name!r} (hit #{hit})")
        self.name = name
        self.hit = hit


class _Arm:
    __slots__ = ("after", "times", "action")

    def __init__(self, after: int, times: int | None, action: Callable[[str], None] | None):
        self.after = after
        self.times = times
        self.action = action


class FaultPoints:
    """Counts hits of each named point; armed points crash (or run a callback)."""

    def __init__(self, tracker: "SyncTracker | None" = None):
        self.hits: collections.Counter[str] = collections.Counter()
        self.tracker = tracker
        self._armed: dict[str, _Arm] = {}

    def arm(self, name: str, *, after: int = 0, times: int | None = 1,
            action: Callable[[str], None] | None = None) -> None:
        """Fire on the hits after the first ``after`` ones (``after=0``: the next hit).

        ``times``: how many hits fire (None = every later hit). Firing raises CrashPoint, or
        calls ``action(name)`` if given (and continues normally if it returns)."""
        if name not in POINTS:
            raise ValueError(f"unknown fault point {name!r}")
        self._armed[name] = _Arm(self.hits[name] + after, times, action)

    def disarm(self, name: str | None = None) -> None:
        if name is None:
            self._armed.clear()
        else:
            self._armed.pop(name, None)

    def hit(self, name: str) -> None:
        if name not in POINTS:
            raise ValueError(f"unknown fault point {name!r}")
        self.hits[name] += 1
        arm = self._armed.get(name)
        if arm is None or self.hits[name] <= arm.after:
            return
        if arm.times is not None:
            arm.times -= 1
            if arm.times <= 0:
                del self._armed[name]
        if arm.action is not None:
            arm.action(name)
        else:
            raise CrashPoint(name, self.hits[name])


class _FileState:
    __slots__ = ("synced", "size")

    def __init__(self, synced: int, size: int):
        self.synced = synced
        self.size = size


class SyncTracker:
    """What a power cut would lose: unsynced bytes per file, un-fsynced directory entries."""

    def __init__(self) -> None:
        self._files: dict[str, _FileState] = {}
        self._new_entries: set[str] = set()   # paths whose dir entry is not yet durable

    # -- reports from the writers (paths are normalised to absolute) --
    def created(self, path: str) -> None:
        p = os.path.abspath(path)
        self._files[p] = _FileState(0, 0)
        self._new_entries.add(p)

    def wrote(self, path: str, nbytes: int) -> None:
        p = os.path.abspath(path)
        st = self._files.get(p)
        if st is None:  # a file that existed (durably) before tracking started
            size = os.stat(p).st_size
            st = self._files[p] = _FileState(size - nbytes, size - nbytes)
        st.size += nbytes

    def fsynced(self, path: str) -> None:
        st = self._files.get(os.path.abspath(path))
        if st is not None:
            st.synced = st.size

    def truncated(self, path: str, length: int) -> None:
        p = os.path.abspath(path)
        st = self._files.get(p)
        if st is None:
            self._files[p] = _FileState(length, length)
        else:
            st.size = length
            st.synced = min(st.synced, length)

    def renamed(self, src: str, dst: str) -> None:
        s, d = os.path.abspath(src), os.path.abspath(dst)
        st = self._files.pop(s, None)
        if st is not None:
            self._files[d] = st
        self._new_entries.discard(s)
        self._new_entries.add(d)

    def removed(self, path: str) -> None:
        p = os.path.abspath(path)
        self._files.pop(p, None)
        self._new_entries.discard(p)

    def dir_fsynced(self, dirpath: str) -> None:
        d = os.path.abspath(dirpath)
        self._new_entries = {p for p in self._new_entries if os.path.dirname(p) != d}

    # -- the simulation --
    def unsynced(self, path: str) -> int:
        """Bytes of ``path`` written but not fsynced (0 for untracked files)."""
        st = self._files.get(os.path.abspath(path))
        return 0 if st is None else st.size - st.synced

    def simulate_power_loss(self, dirpath: str, *, mode: str = "drop",
                            rng: random.Random | None = None) -> list[str]:
        """Rewind every tracked file under ``dirpath`` to what survives a power cut.

        mode: "drop" — unsynced bytes vanish; "torn" — a random prefix of them survives;
        "zeros" — a random-length part of them survives as zeros (size updated, data not).
        Files whose directory entry was never made durable are deleted. Returns a list of
        actions taken (for test diagnostics). The tracker is reset for the affected files."""
        if mode not in ("drop", "torn", "zeros"):
            raise ValueError(mode)
        rng = rng or random.Random(0)
        root = os.path.abspath(dirpath) + os.sep
        actions: list[str] = []
        for p in sorted(self._new_entries):
            if p.startswith(root):
                if os.path.exists(p):
                    os.unlink(p)
                    actions.append(f"deleted {p}")
                self._files.pop(p, None)
        self._new_entries = {p for p in self._new_entries if not p.startswith(root)}
        for p, st in sorted(self._files.items()):
            if not p.startswith(root) or not os.path.exists(p):
                continue
            keep = 0
            if st.size > st.synced and mode != "drop":
                keep = rng.randint(0, st.size - st.synced)
            new_len = st.synced + keep
            if new_len < os.path.getsize(p):
                with open(p, "r+b") as f:
                    if mode == "zeros" and keep:
                        f.seek(st.synced)
                        f.write(b"\0" * keep)
                    f.truncate(new_len)
                actions.append(f"truncated {p} to {new_len}")
        for p in [p for p in self._files if p.startswith(root)]:
            del self._files[p]
        return actions


class PersistentSyncTracker(SyncTracker):
    """A :class:`SyncTracker` that mirrors its state into ``state_path`` after every report,
    so a harness can simulate a power cut of a REAL server process: SIGKILL (or SIGSTOP) the
    process, ``load_sync_tracker(state_path).simulate_power_loss(data_dir)``, restart.

    TEST-ONLY (wired by ``AFS_TEST_SYNC_TRACKER`` in :mod:`afs.server.server`). The state file
    is replaced atomically (tmp + rename, no fsync: only a process crash is simulated, the host
    does not really lose power). Ordering: the mirror is written inside the report call, i.e.
    after the fsync returned and before the writer acknowledges anything, so a SIGKILL at any
    instant leaves a file that never claims more durability than there was."""

    def __init__(self, state_path: str) -> None:
        super().__init__()
        self.state_path = os.path.abspath(state_path)
        self._dump()

    def _dump(self) -> None:
        import json
        state = {"files": {p: [st.synced, st.size] for p, st in self._files.items()},
                 "new_entries": sorted(self._new_entries)}
        tmp = self.state_path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(state, fh)
        os.replace(tmp, self.state_path)

    def created(self, path: str) -> None:
        super().created(path)
        self._dump()

    def wrote(self, path: str, nbytes: int) -> None:
        super().wrote(path, nbytes)
        self._dump()

    def fsynced(self, path: str) -> None:
        super().fsynced(path)
        self._dump()

    def truncated(self, path: str, length: int) -> None:
        super().truncated(path, length)
        self._dump()

    def renamed(self, src: str, dst: str) -> None:
        super().renamed(src, dst)
        self._dump()

    def removed(self, path: str) -> None:
        super().removed(path)
        self._dump()

    def dir_fsynced(self, dirpath: str) -> None:
        super().dir_fsynced(dirpath)
        self._dump()


def load_sync_tracker(state_path: str) -> SyncTracker:
    """The tracker state a :class:`PersistentSyncTracker` left in ``state_path`` (an empty
    tracker if the file does not exist: nothing was written since the process started)."""
    import json
    t = SyncTracker()
    try:
        with open(state_path) as fh:
            state = json.load(fh)
    except FileNotFoundError:
        return t
    for p, (synced, size) in state.get("files", {}).items():
        t._files[p] = _FileState(int(synced), int(size))
    t._new_entries = set(state.get("new_entries", []))
    return t
