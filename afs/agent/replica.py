"""The agent's local replica: an authoritative KeyTree plus immutable per-revision read views,
and its crash-safe cache file.

Threading: ``Replica`` is mutated by ONE thread (the agent's sync thread). Readers (the FUSE
loop, the local watch server) call :meth:`Replica.current` and use the returned
:class:`RevisionView`, which never changes: publishing a new revision is one reference
assignment, so a transaction becomes visible as a whole and a reader never sees half of one.

Monotonicity: the replica never moves to a lower revision. ``install_snapshot`` refuses a
snapshot older than what it has; the cache records the revision and so does a separate
high-water-mark file, so a corrupt cache cannot make a restarted agent serve an older state.

Cache files (in ``cache_dir``, 0700; files 0600): ``replica.snap`` (the KeyTree snapshot format,
crc-checked; written tmp -> fsync -> rename -> fsync dir, at most every ``save_interval`` and on
stop) and ``hwm`` (the highest revision ever published to readers). ``hwm`` is rewritten in place
(one fixed-width ``pwrite``, no fsync, a few microseconds) BEFORE each new revision is published,
so an agent killed with SIGKILL between two cache saves still knows on restart that it served a
newer revision than its cache holds, and waits for the cluster instead of going back; it is
fsynced together with each cache save (a host crash may lose the unsynced tail, a process crash
cannot).
"""
from __future__ import annotations

import logging
import os

from afs import errors
from afs.model import Event
from afs.paths import parent as parent_path
from afs.storage.wal import fsync_dir
from afs.tree import KeyTree

log = logging.getLogger("afs.agent")

Entry = tuple  # (Stat, data | None, children tuple | None)


class RevisionView:
    """One immutable revision of the replica (implements ``afs.fs.view.ReplicaReader``).

    A base dict plus a chain of small per-revision deltas (``None`` = deleted). The chain is
    flattened into a new base every ``MAX_DEPTH`` revisions by the writer thread, so a lookup
    costs at most ``MAX_DEPTH`` dict probes and older views stay valid.
    """

    MAX_DEPTH = 16
    __slots__ = ("revision", "_base", "_delta", "_parent", "depth")

    def __init__(self, revision: int, base: dict, delta: dict | None = None,
                 parent: "RevisionView | None" = None):
        self.revision = revision
        self._base = base
        self._delta = delta or {}
        self._parent = parent
        self.depth = 0 if parent is None else parent.depth + 1

    def _lookup(self, path: str) -> Entry | None:
        v = self
        while v is not None:
            d = v._delta
            if path in d:
                return d[path]
            if v._parent is None:
                return v._base.get(path)
            v = v._parent
        return None

    def stat(self, path: str):
        e = self._lookup(path)
        return e[0] if e is not None else None

    def children(self, path: str):
        e = self._lookup(path)
        return list(e[2]) if e is not None and e[2] is not None else None

    def data(self, path: str):
        e = self._lookup(path)
        return e[1] if e is not None else None

    def next(self, revision: int, delta: dict) -> "RevisionView":
        if self.depth + 1 < self.MAX_DEPTH:
            return RevisionView(revision, self._root_base(), delta, self)
        chain = []
        v = self
        while v is not None:
            chain.append(v._delta)
            v = v._parent
        base = dict(self._root_base())
        for d in reversed(chain):
            for p, e in d.items():
                if e is None:
                    base.pop(p, None)
                else:
                    base[p] = e
        for p, e in delta.items():
            if e is None:
                base.pop(p, None)
            else:
                base[p] = e
        return RevisionView(revision, base)

    def _root_base(self) -> dict:
        v = self
        while v._parent is not None:
            v = v._parent
        return v._base


def _atomic_write(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")


class Replica:
    def __init__(self, cache_dir: str | None = None):
        self.cache_dir = cache_dir
        self.tree = KeyTree()
        self.hwm = 0                     # highest revision ever served on this host
        self._view = RevisionView(0, self.tree.all_entries())
        self._saved_revision = -1
        self.cache_state = "none"        # none | loaded | discarded_corrupt
        self._hwm_fd: int | None = None
        self._hwm_written = -1           # revision last written to the hwm file
        self._hwm_error_logged = False

    # ------------------------------------------------------------ reading
    def current(self) -> RevisionView:
        return self._view

    @property
    def revision(self) -> int:
        return self.tree.revision

    # ------------------------------------------------------------ cache
    @classmethod
    def open(cls, cache_dir: str) -> "Replica":
        """Load the cache if valid. A corrupt cache is discarded with a warning (renamed to
        ``replica.snap.corrupt``), never served."""
        os.makedirs(cache_dir, mode=0o700, exist_ok=True)
        os.chmod(cache_dir, 0o700)
        r = cls(cache_dir)
        r.hwm = r._read_hwm()
        r._hwm_fd = os.open(os.path.join(cache_dir, "hwm"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        snap = os.path.join(cache_dir, "replica.snap")
        if os.path.exists(snap):
            try:
                with open(snap, "rb") as fh:
                    tree = KeyTree.restore(fh.read())
                r._set_tree(tree)
                r._saved_revision = tree.revision
                r.cache_state = "loaded"
                log.info("event=cache_loaded revision=%d path=%s", tree.revision, snap)
            except (errors.AfsError, ValueError, OSError) as exc:
                os.replace(snap, snap + ".corrupt")
                r.cache_state = "discarded_corrupt"
                log.warning("event=cache_discarded reason=%r path=%s (kept as .corrupt; will re-fetch)", str(exc), snap)
        r.hwm = max(r.hwm, r.revision)
        r._hwm_written = r.hwm if r.hwm == r._read_hwm() else -1
        return r

    def _read_hwm(self) -> int:
        try:
            with open(os.path.join(self.cache_dir, "hwm"), "rb") as fh:
                text = fh.read().decode().strip()
            return int(text) if text.isdigit() else 0
        except (OSError, UnicodeDecodeError):
            return 0

    def save(self) -> bool:
        """Persist the replica if it changed since the last save. Returns True if written."""
        if self.cache_dir is None or self._saved_revision == self.revision:
            return False
        rev = self.revision
        _atomic_write(os.path.join(self.cache_dir, "replica.snap"), self.tree.snapshot(include_dedupe=False))
        self._persist_hwm(max(self.hwm, rev), sync=True)
        self._saved_revision = rev
        return True

    def _persist_hwm(self, revision: int, sync: bool = False) -> None:
        """Record that ``revision`` is (about to be) served. Called BEFORE publishing it."""
        fd = self._hwm_fd
        if fd is None:
            return
        try:
            if revision > self._hwm_written:
                line = b"%020d\n" % revision       # fixed width: an in-place rewrite never
                os.pwrite(fd, line, 0)             # leaves a longer old value's tail behind
                if self._hwm_written < 0:
                    os.ftruncate(fd, len(line))
                self._hwm_written = revision
            if sync:
                os.fsync(fd)
        except OSError as exc:
            if not self._hwm_error_logged:
                self._hwm_error_logged = True
                log.error("event=hwm_write_failed error=%r (monotonicity across restarts is "
                          "not guaranteed until it works again)", str(exc))
            if sync:
                raise

    def close(self) -> None:
        if self._hwm_fd is not None:
            os.close(self._hwm_fd)
            self._hwm_fd = None

    @property
    def can_serve(self) -> bool:
        """False while this host has served a newer revision than the replica holds (e.g.
        the cache was corrupt): serving now would go back in time."""
        return self.revision >= self.hwm

    # ------------------------------------------------------------ updates (sync thread only)
    def _set_tree(self, tree: KeyTree) -> None:
        self.tree = tree
        self._view = RevisionView(tree.revision, tree.all_entries())

    def install_snapshot(self, data: bytes) -> set[str] | None:
        """Replace the replica with a snapshot from a member. Returns the paths that differ
        (to invalidate), or None if the snapshot is older than what we have (refused)."""
        tree = KeyTree.restore(data)
        if tree.revision < self.revision:
            return None
        old = self._view
        new_entries = tree.all_entries()
        changed = {p for p, e in new_entries.items() if old._lookup(p) != e}
        old_tree_paths = self.tree.all_entries().keys()
        changed |= {p for p in old_tree_paths if p not in new_entries}
        self._persist_hwm(tree.revision)
        self.tree = tree
        self._view = RevisionView(tree.revision, new_entries)
        self.hwm = max(self.hwm, tree.revision)
        return changed

    def apply(self, revision: int, events: list[Event]) -> set[str]:
        """Apply one revision's events (atomic). Returns changed paths plus their parents.
        Raises RevisionGap / InvalidInput if the events do not fit (resync from a snapshot)."""
        self.tree.apply_events(revision, events)
        delta: dict = {}
        tree = self.tree
        for e in events:
            for p in (e.path, parent_path(e.path)) if e.path != "/" else ("/",):
                if p not in delta:
                    delta[p] = tree.node_entry(p)
        self._persist_hwm(revision)      # before readers can see it (never go back on restart)
        self._view = self._view.next(revision, delta)
        self.hwm = max(self.hwm, revision)
        return set(delta)
