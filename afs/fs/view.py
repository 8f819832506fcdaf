"""FUSE-free read view of a replica: lookup, list, read and xattrs over one replica revision.

This module knows nothing about FUSE; :mod:`afs.fs.mount` is the thin adapter that imports the
binding and translates :class:`~afs.errors.AfsError` into ``-errno``. Everything here is on the
read path, so it is kept cheap: one ``reader_provider()`` call per operation (that reader is an
immutable snapshot, so each operation sees exactly one revision), no locks, no copies of file data
beyond the slice asked for.

Contract of the replica side (implemented by the agent over an immutable tree snapshot):

* ``reader_provider()`` returns the *current* :class:`ReplicaReader`. It must be cheap (an
  attribute read) and thread-safe; the agent swaps the reader atomically after applying a
  revision and only then calls ``Mount.invalidate(changed_paths)``.
* A reader never changes after it was published (its ``revision`` and content are fixed).

Reserved names: the root entry ``/.afs`` is the mount's own status directory (``/.afs/status``
is a JSON file built by ``status_provider()``). Replica names the kernel cannot show — a root
name that collides with the reserved ``.afs`` or names longer than 255 bytes — are never merged
or truncated: they are left out of listings and counted, and the count and a sample are visible
in ``/.afs/status`` under ``hidden``.
"""
from __future__ import annotations

import errno as _errno
import hashlib
import json
import stat as _stat
import threading
import time
from typing import Callable, Protocol, runtime_checkable

from afs import errors
from afs.model import NodeKind, Stat

RESERVED_DIR = "/.afs"
STATUS_PATH = "/.afs/status"
RESERVED_NAME = ".afs"
NAME_MAX = 255

XATTR_REVISION = "user.afs.revision"
XATTR_VERSION = "user.afs.version"
XATTR_MOD_REVISION = "user.afs.mod_revision"
XATTR_CREATE_REVISION = "user.afs.create_revision"
NODE_XATTRS = (XATTR_REVISION, XATTR_VERSION, XATTR_MOD_REVISION, XATTR_CREATE_REVISION)
# The reserved /.afs entries are not replica nodes: they only carry the replica revision.
RESERVED_XATTRS = (XATTR_REVISION,)

_BLKSIZE = 4096
# /.afs/status is padded (spaces before the final newline; still valid JSON) to a multiple of
# this size, so its st_size practically never changes: a reader whose GETATTR reply the kernel
# dropped (the race described under "Size/data consistency" below) or who raced another
# reader's re-render still reads one whole rendering, never a short or zero-padded mix. Measured
# before the padding: 12 torn status reads in 106k with two pollers and a revision every ~3 ms.
STATUS_SIZE = 4096


@runtime_checkable
class ReplicaReader(Protocol):
    """One immutable revision of the local replica (implemented by the agent).

    All methods take normalised absolute paths (``/`` or ``/a/b``) and never raise for a missing
    path: they return ``None``. Thread-safe (the mount calls them from several threads).
    """

    revision: int

    def stat(self, path: str) -> Stat | None: ...

    def children(self, path: str) -> list[str] | None:
        """Sorted child names; ``None`` if ``path`` is not a directory or does not exist."""

    def data(self, path: str) -> bytes | None:
        """File content; ``None`` if ``path`` is not a file or does not exist."""


class DictReplicaReader:
    """A tiny dict-backed :class:`ReplicaReader` (tests, benchmarks, the dev entry point).

    ``nodes`` maps path -> (Stat, data-or-None). Children are derived once at construction.
    """

    def __init__(self, revision: int, nodes: dict[str, tuple[Stat, bytes | None]]):
        self.revision = revision
        self._nodes = nodes
        kids: dict[str, list[str]] = {p: [] for p, (st, _) in nodes.items()
                                      if st.kind is NodeKind.DIR}
        for p in nodes:
            if p == "/":
                continue
            parent, _, name = p.rpartition("/")
            kids.setdefault(parent or "/", []).append(name)
        for v in kids.values():
            v.sort()
        self._children = kids

    def stat(self, path: str) -> Stat | None:
        n = self._nodes.get(path)
        return n[0] if n is not None else None

    def children(self, path: str) -> list[str] | None:
        c = self._children.get(path)
        return list(c) if c is not None else None

    def data(self, path: str) -> bytes | None:
        n = self._nodes.get(path)
        if n is None or n[0].kind is not NodeKind.FILE:
            return None
        return n[1] or b""


def stable_ino(path: str) -> int:
    """A stable inode number per path (64-bit BLAKE2b of the path; ``/`` is 1).

    Stable across daemon restarts and hosts, so tools that remember (dev, ino) keep working.
    """
    if path == "/":
        return 1
    h = int.from_bytes(hashlib.blake2b(path.encode("utf-8", "surrogateescape"),
                                       digest_size=8).digest(), "little")
    h &= (1 << 63) - 1
    return h if h > 1 else h + 2


class FsView:
    """Read-only filesystem operations over the current replica revision.

    Every method either returns a value or raises an :class:`~afs.errors.AfsError` subclass whose
    ``errno`` the adapter reports. Thread-safe; holds no lock on the read path.

    ``status_provider()`` returns a dict merged into ``/.afs/status`` (e.g. ``connected_member``,
    ``last_contact`` (unix seconds), ``staleness_seconds``, ``connected``). ``status_ttl`` bounds
    how long a rendered status is reused (the mount re-invalidates the status file on that
    period, so a reader sees a status at most ``status_ttl`` old).
    """

    def __init__(self, reader_provider: Callable[[], ReplicaReader], uid_default: int = 0,
                 gid_default: int = 0, status_provider: Callable[[], dict] | None = None,
                 status_ttl: float = 1.0):
        self._reader = reader_provider
        self.reader = reader_provider       # public: the adapter's invalidator reads through it
        self.uid_default = uid_default
        self.gid_default = gid_default
        self._status_provider = status_provider
        self.status_ttl = status_ttl
        self._ino_cache: dict[str, int] = {}
        # Size/data consistency: the kernel takes a file's size from our last getattr and its
        # bytes from a later read. If a new revision was swapped in between, serving the new
        # bytes against the old size would tear the read (truncated or zero-padded). So reads
        # are served from the revision whose attributes we last reported for that path, while
        # that revision is still among the recent readers kept here.
        # Residual race: the kernel silently DROPS a GETATTR reply when an invalidation of the
        # same inode lands while that GETATTR is in flight, so "last reported" can be newer
        # than what the kernel kept. That needs the same file to change twice within about
        # one round trip; measured under back-to-back updates of one file it cut torn reads
        # from ~1/8k to ~1/40k reads, and none were seen with >= 1 ms between changes.
        self._reported: dict[str, int] = {}
        self._recent: dict[int, ReplicaReader] = {}
        self._last_reader: ReplicaReader | None = None
        self.recent_revisions = 8
        self._dir_cache: dict[tuple[int, str], list[tuple[bytes, int, int]]] = {}
        self.dir_cache_size = 512
        self._hidden: dict[str, tuple[str, ...]] = {}   # dir path -> hidden names (last listing)
        self._status_lock = threading.Lock()
        self._status_bytes = b""
        self._status_at = float("-inf")
        self._status_rev = -1
        self._mtime_ns = time.time_ns()                 # for the synthetic /.afs entries
        self.mount_info: dict = {}                      # filled in by the adapter (mountpoint, ...)
        # calls that reached the daemon (cheap int bumps; tests use them to prove the kernel
        # served a warm read without asking us)
        self.calls = {"getattr": 0, "read": 0, "readdir": 0, "xattr": 0}

    # -- helpers -------------------------------------------------------------------------------
    def _ino(self, path: str) -> int:
        ino = self._ino_cache.get(path)
        if ino is None:
            ino = stable_ino(path)
            if len(self._ino_cache) > 262_144:
                self._ino_cache.clear()
            self._ino_cache[path] = ino
        return ino

    @staticmethod
    def _reserved(path: str) -> bool:
        return path == RESERVED_DIR or path.startswith("/.afs/")

    def _attrs(self, path: str, st: Stat) -> dict:
        if st.kind is NodeKind.DIR:
            # st_nlink=1 on a directory is the conventional "subdirectory count unknown" signal
            # (fts/find then never apply the leaf optimisation); counting subdirs costs O(n).
            fmt, nlink = _stat.S_IFDIR, 1
        else:
            fmt, nlink = _stat.S_IFREG, 1
        m = st.mtime_ns
        return {
            "st_mode": fmt | (st.mode & 0o7777), "st_nlink": nlink, "st_size": st.size,
            "st_uid": st.uid, "st_gid": st.gid, "st_ino": self._ino(path),
            "st_mtime": m, "st_ctime": m, "st_atime": m,
            "st_blksize": _BLKSIZE, "st_blocks": (st.size + 511) // 512,
        }

    def _reserved_attrs(self, path: str) -> dict:
        m = self._mtime_ns
        if path == RESERVED_DIR:
            return {"st_mode": _stat.S_IFDIR | 0o555, "st_nlink": 1, "st_size": 0,
                    "st_uid": self.uid_default, "st_gid": self.gid_default,
                    "st_ino": self._ino(path), "st_mtime": m, "st_ctime": m, "st_atime": m,
                    "st_blksize": _BLKSIZE, "st_blocks": 0}
        if path == STATUS_PATH:
            body = self._status(refresh=True)
            now = time.time_ns()
            return {"st_mode": _stat.S_IFREG | 0o444, "st_nlink": 1, "st_size": len(body),
                    "st_uid": self.uid_default, "st_gid": self.gid_default,
                    "st_ino": self._ino(path), "st_mtime": now, "st_ctime": now, "st_atime": now,
                    "st_blksize": _BLKSIZE, "st_blocks": (len(body) + 511) // 512}
        raise errors.NotFound(f"no such reserved entry: {path}")

    # -- status ----------------------------------------------------------------------------------
    def hidden_summary(self) -> dict:
        hidden = dict(self._hidden)
        sample = [f"{d.rstrip('/')}/{n}"[:300] for d, names in hidden.items() for n in names][:20]
        return {"count": sum(len(v) for v in hidden.values()), "sample": sample}

    def status_dict(self) -> dict:
        reader = self._reader()
        out = {"revision": reader.revision, "connected": None, "connected_member": None,
               "last_contact": None, "staleness_seconds": None}
        if self._status_provider is not None:
            try:
                out.update(self._status_provider() or {})
            except Exception as exc:  # a broken provider must not break the mount
                out["status_error"] = f"{type(exc).__name__}: {exc}"
        out["revision"] = reader.revision   # always the revision this mount serves
        try:
            self.readdir("/", reader)        # the root is always checked; other dirs when listed
        except errors.AfsError:
            pass
        out["hidden"] = self.hidden_summary()
        if self.mount_info:
            out["mount"] = self.mount_info
        return out

    def _status(self, refresh: bool) -> bytes:
        """The rendered status; re-rendered (on getattr only, so st_size always matches what
        read returns) when older than ``status_ttl`` or when the revision moved."""
        now = time.monotonic()
        rev = self._reader().revision
        stale = now - self._status_at >= self.status_ttl or rev != self._status_rev
        if (refresh and stale) or not self._status_bytes:
            with self._status_lock:
                raw = json.dumps(self.status_dict(), sort_keys=True, default=str).encode()
                size = max(STATUS_SIZE, -(-(len(raw) + 1) // STATUS_SIZE) * STATUS_SIZE)
                self._status_bytes = raw + b" " * (size - len(raw) - 1) + b"\n"
                self._status_at = now
                self._status_rev = rev
        return self._status_bytes

    # -- operations ------------------------------------------------------------------------------
    def _current(self) -> ReplicaReader:
        reader = self._reader()
        if reader is not self._last_reader and self.recent_revisions:
            self._last_reader = reader
            recent = self._recent
            recent[reader.revision] = reader
            if len(recent) > self.recent_revisions:
                for rev in sorted(recent)[:-self.recent_revisions]:
                    recent.pop(rev, None)
        return reader

    def reader_for(self, path: str) -> ReplicaReader:
        """The reader whose attributes for ``path`` were last reported (else the current)."""
        reader = self._current()
        rev = self._reported.get(path)
        if rev is not None and rev != reader.revision:
            pinned = self._recent.get(rev)
            if pinned is not None:
                return pinned
        return reader

    def getattr(self, path: str) -> dict:
        self.calls["getattr"] += 1
        reader = self._current()
        st = reader.stat(path)
        if st is not None and not (path.startswith("/.afs") and self._reserved(path)):
            if st.kind is NodeKind.FILE:
                reported = self._reported
                if len(reported) > 262_144:
                    reported.clear()
                reported[path] = reader.revision
            return self._attrs(path, st)
        if self._reserved(path):
            return self._reserved_attrs(path)
        raise errors.NotFound(f"no such node: {path}")

    def readdir_entries(self, path: str) -> list[tuple[bytes, int, int]]:
        """``(name_bytes, file_type_bits, st_ino)`` per entry, ``.`` and ``..`` first.

        The inode number must be set (glibc's readdir skips entries whose d_ino is 0) and the
        file type gives ``d_type``, so ``find``/``ls`` need no stat per entry to know dirs.
        Cached per (revision, path): a revision's listing never changes.
        """
        self.calls["readdir"] += 1
        reader = self._reader()
        key = (reader.revision, path)
        hit = self._dir_cache.get(key)
        if hit is not None:
            return hit
        names = self.readdir(path, reader)
        base = "" if path == "/" else path
        ino = self._ino
        out = [(b".", _stat.S_IFDIR, ino(path)),
               (b"..", _stat.S_IFDIR, ino(base.rpartition("/")[0] or "/"))]
        for n in names:
            p = f"{base}/{n}"
            st = reader.stat(p)
            if st is None:   # only the reserved /.afs entries
                fmt = _stat.S_IFDIR if p == RESERVED_DIR else _stat.S_IFREG
            else:
                fmt = _stat.S_IFDIR if st.kind is NodeKind.DIR else _stat.S_IFREG
            out.append((n.encode("utf-8", "surrogateescape"), fmt, ino(p)))
        if len(self._dir_cache) >= self.dir_cache_size:
            self._dir_cache.clear()
        self._dir_cache[key] = out
        return out

    def readdir(self, path: str, reader: ReplicaReader | None = None) -> list[str]:
        """Child names visible through the mount (without ``.``/``..``)."""
        if self._reserved(path):
            if path == RESERVED_DIR:
                return ["status"]
            raise errors.NotADirectory(f"not a directory: {path}")
        if reader is None:
            reader = self._reader()
        names = reader.children(path)
        if names is None:
            st = reader.stat(path)
            if st is None:
                raise errors.NotFound(f"no such node: {path}")
            raise errors.NotADirectory(f"not a directory: {path}")
        hidden: list[str] | None = None
        for n in names:
            if len(n) > 85 and len(n.encode("utf-8", "surrogateescape")) > NAME_MAX:
                hidden = hidden or []
                hidden.append(n)
        if path == "/":
            if RESERVED_NAME in names:
                hidden = hidden or []
                hidden.append(RESERVED_NAME)
            if hidden:
                hs = set(hidden)
                names = [n for n in names if n not in hs]
            names = [RESERVED_NAME, *names]
        elif hidden:
            hs = set(hidden)
            names = [n for n in names if n not in hs]
        if hidden:
            self._hidden[path] = tuple(hidden)
        elif path in self._hidden:
            self._hidden.pop(path, None)
        return names

    def read(self, path: str, size: int, offset: int) -> bytes:
        self.calls["read"] += 1
        data = self.reader_for(path).data(path)
        if data is None:
            if path == STATUS_PATH:
                data = self._status(refresh=False)
            else:
                st = self._reader().stat(path)
                if st is not None and st.kind is NodeKind.DIR or path == RESERVED_DIR:
                    raise errors.IsADirectory(f"is a directory: {path}")
                raise errors.NotFound(f"no such node: {path}")
        if offset == 0 and size >= len(data):
            return data
        return data[offset:offset + size]

    def listxattr(self, path: str) -> list[str]:
        if self._reader().stat(path) is not None and not self._reserved(path):
            return list(NODE_XATTRS)
        if self._reserved(path) and path in (RESERVED_DIR, STATUS_PATH):
            return list(RESERVED_XATTRS)
        raise errors.NotFound(f"no such node: {path}")

    def getxattr(self, path: str, name: str) -> bytes:
        self.calls["xattr"] += 1
        reader = self._reader()
        st = reader.stat(path)
        if st is None or self._reserved(path):
            if path in (RESERVED_DIR, STATUS_PATH):
                if name == XATTR_REVISION:
                    return str(reader.revision).encode()
                raise NoAttribute(f"no attribute {name} on {path}")
            raise errors.NotFound(f"no such node: {path}")
        if name == XATTR_REVISION:
            v = reader.revision
        elif name == XATTR_VERSION:
            v = st.version
        elif name == XATTR_MOD_REVISION:
            v = st.mod_revision
        elif name == XATTR_CREATE_REVISION:
            v = st.create_revision
        else:
            raise NoAttribute(f"no attribute {name} on {path}")
        return str(v).encode()

    def statfs(self) -> dict:
        return {"f_bsize": _BLKSIZE, "f_frsize": _BLKSIZE, "f_namemax": NAME_MAX}

    def exists(self, path: str) -> bool:
        """True if ``path`` exists in the current revision (used by the invalidator)."""
        if self._reserved(path):
            return path in (RESERVED_DIR, STATUS_PATH)
        return self._reader().stat(path) is not None


class NoAttribute(errors.AfsError):
    """Requested extended attribute does not exist (ENODATA, what getxattr(2) expects)."""

    code, errno = "no_attribute", _errno.ENODATA
