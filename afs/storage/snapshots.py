"""Snapshot files: one file per snapshot, written tmp -> fsync -> rename -> fsync dir.

On-disk format (little-endian), file ``snap-<index:016x>-<term:016x>.snap``, mode 0600::

    b"AFSSNAP1" | u32 header_len | header | data | u32 crc32c(everything before it)

``header`` is msgpack ``[1, encode_snapshot_meta(meta), len(data)]`` (format version 1),
bounded to 1 MiB before it is decoded. The meta in the header must match the file name.

Contract:
- ``save`` makes the snapshot durable before returning: the bytes go to ``<name>.tmp``,
  which is fsynced, renamed into place, and the directory fsynced. Only then are snapshots
  beyond the newest ``keep`` (default 2) removed. A crash at any step leaves the previous
  snapshot loadable; a leftover ``.tmp`` is deleted on open.
- ``load_latest`` returns the newest snapshot, verified. If the newest file is corrupt it
  raises :class:`StorageCorrupt` naming the file (we do not silently fall back to an older
  snapshot: the WAL may already have released the entries between the two).
- Not thread-safe; blocking I/O.
"""
from __future__ import annotations

import logging
import os
import re
import struct

import crc32c as _crc32c
import msgpack

from afs.errors import FatalStorageError, StorageCorrupt
from afs.raft.messages import SnapshotMeta, decode_snapshot_meta, encode_snapshot_meta
from afs.storage.faults import FaultPoints
from afs.storage.wal import ensure_dir, fsync_dir, fsync_fd

log = logging.getLogger("afs.storage.snapshots")

MAGIC = b"AFSSNAP1"
_U32 = struct.Struct("<I")
MAX_HEADER = 1 << 20
FORMAT_VERSION = 1
_SNAP_RE = re.compile(r"^snap-([0-9a-f]{16})-([0-9a-f]{16})\.snap$")


def snapshot_name(index: int, term: int) -> str:
    return f"snap-{index:016x}-{term:016x}.snap"


def encode_snapshot(meta: SnapshotMeta, data: bytes) -> bytes:
    header = msgpack.packb([FORMAT_VERSION, encode_snapshot_meta(meta), len(data)], use_bin_type=True)
    body = b"".join([MAGIC, _U32.pack(len(header)), header, data])
    return body + _U32.pack(_crc32c.crc32c(body))


def decode_snapshot(buf: bytes, where: str = "snapshot") -> tuple[SnapshotMeta, bytes]:
    """Verify and split a snapshot file image; StorageCorrupt on any defect."""
    fixed = len(MAGIC) + 4
    if len(buf) < fixed + 4:
        raise StorageCorrupt(f"{where}: truncated ({len(buf)} bytes)")
    if buf[:len(MAGIC)] != MAGIC:
        raise StorageCorrupt(f"{where} offset 0: bad magic {buf[:len(MAGIC)]!r}")
    (crc,) = _U32.unpack_from(buf, len(buf) - 4)
    if _crc32c.crc32c(memoryview(buf)[:-4]) != crc:
        raise StorageCorrupt(f"{where}: checksum mismatch over {len(buf) - 4} bytes")
    (hlen,) = _U32.unpack_from(buf, len(MAGIC))
    if hlen > MAX_HEADER or fixed + hlen > len(buf) - 4:
        raise StorageCorrupt(f"{where} offset {len(MAGIC)}: impossible header length {hlen}")
    try:
        version, raw_meta, dlen = msgpack.unpackb(buf[fixed:fixed + hlen], raw=False)
        if version != FORMAT_VERSION:
            raise ValueError(f"unsupported snapshot format version {version!r}")
        meta = decode_snapshot_meta(raw_meta)
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise StorageCorrupt(f"{where} offset {fixed}: bad header: {e}") from e
    if not isinstance(dlen, int) or fixed + hlen + dlen != len(buf) - 4:
        raise StorageCorrupt(f"{where}: data length {dlen!r} does not match file size {len(buf)}")
    return meta, buf[fixed + hlen: fixed + hlen + dlen]


class SnapshotStore:
    """A directory of snapshot files. See the module docstring for the contract."""

    def __init__(self, dirpath: str, *, fsync: bool = True, faults: FaultPoints | None = None,
                 keep: int = 2):
        if keep < 2:
            raise ValueError("keep must be >= 2 (the WAL may still name the previous snapshot)")
        self.dir = dirpath
        self._fsync = fsync
        self._faults = faults
        self._tracker = faults.tracker if faults is not None else None
        self.keep = keep
        ensure_dir(dirpath)
        removed = False
        for name in os.listdir(dirpath):
            if name.endswith(".tmp") and name.startswith("snap-"):
                log.info("removing leftover snapshot temp file %s", name)
                os.unlink(os.path.join(dirpath, name))
                removed = True
        if removed and fsync:
            fsync_dir(dirpath)

    def list(self) -> list[tuple[int, int]]:
        """(index, term) of the snapshot files present, oldest first."""
        out = []
        for name in os.listdir(self.dir):
            m = _SNAP_RE.match(name)
            if m:
                out.append((int(m.group(1), 16), int(m.group(2), 16)))
        return sorted(out)

    def _hit(self, name: str) -> None:
        if self._faults is not None:
            self._faults.hit(name)

    def save(self, meta: SnapshotMeta, data: bytes) -> None:
        """Write the snapshot durably, then prune to the newest ``keep``."""
        existing = self.list()
        if existing and meta.index < existing[-1][0]:
            raise ValueError(f"snapshot index {meta.index} is older than the newest on disk "
                             f"({existing[-1][0]})")
        final = os.path.join(self.dir, snapshot_name(meta.index, meta.term))
        tmp = final + ".tmp"
        image = encode_snapshot(meta, data)
        try:
            if os.path.exists(tmp):
                os.unlink(tmp)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            if self._tracker is not None:
                self._tracker.created(tmp)
            try:
                view = memoryview(image)
                while view:
                    n = os.write(fd, view)
                    if self._tracker is not None:
                        self._tracker.wrote(tmp, n)
                    view = view[n:]
                self._hit("before_snapshot_fsync")
                if self._fsync:
                    fsync_fd(fd)
                    if self._tracker is not None:
                        self._tracker.fsynced(tmp)
            finally:
                os.close(fd)
            self._hit("before_snapshot_rename")
            os.rename(tmp, final)
            if self._tracker is not None:
                self._tracker.renamed(tmp, final)
            self._hit("after_snapshot_rename")
            self._hit("before_dir_fsync")
            if self._fsync:
                fsync_dir(self.dir)
                if self._tracker is not None:
                    self._tracker.dir_fsynced(self.dir)
        except OSError as e:
            log.critical("snapshot %s: write failed: %s", final, e)
            raise FatalStorageError(f"snapshot {final}: write failed: {e}") from e
        self._hit("before_snapshot_prune")
        self._prune()

    def _prune(self) -> None:
        snaps = self.list()
        for index, term in snaps[:-self.keep]:
            path = os.path.join(self.dir, snapshot_name(index, term))
            os.unlink(path)
            if self._tracker is not None:
                self._tracker.removed(path)
        # No dir fsync needed: a pruned file that reappears after a crash is harmless.

    def load(self, index: int, term: int) -> tuple[SnapshotMeta, bytes]:
        path = os.path.join(self.dir, snapshot_name(index, term))
        with open(path, "rb") as f:
            buf = f.read()
        meta, data = decode_snapshot(buf, f"snapshot {path}")
        if (meta.index, meta.term) != (index, term):
            raise StorageCorrupt(f"snapshot {path}: header says index {meta.index} term {meta.term}, "
                                 f"file name says index {index} term {term}")
        return meta, data

    def load_latest(self) -> tuple[SnapshotMeta, bytes] | None:
        """The newest snapshot, verified; None if there is none; StorageCorrupt if it is bad."""
        snaps = self.list()
        if not snaps:
            return None
        return self.load(*snaps[-1])
