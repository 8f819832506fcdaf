"""Write-ahead log: append-only segment files of length-prefixed, CRC-checked records.

On-disk format
--------------
Directory (mode 0700) holding segments named ``wal-<seq:016x>.log`` (mode 0600); ``seq``
starts at 1 and increases by one per segment, so the set on disk is always a contiguous run
(old segments are only ever removed oldest first). Other names (``*.broken`` copies) are
ignored. Each segment is::

    header  = b"AFSWAL\\x00\\x01" | u64 seq (little-endian)                  (16 bytes)
    record* = u32 length | u32 crc32c(payload) | payload                   (little-endian)

with ``1 <= length <= MAX_RECORD`` (64 MiB). Length 0 is invalid on purpose: a zero-filled
region must never parse as records (crc32c(b"") == 0).

Contract
--------
- ``append(payloads)`` frames all payloads and hands them to the kernel in ONE ``write``.
  Nothing is durable until ``sync()`` returns; callers must not acknowledge before that.
- A failed write or fsync raises :class:`FatalStorageError` and poisons the WAL: every later
  call raises ``FatalStorageError`` too (after a failed fsync the page cache state is unknown;
  never retry an fsync).
- On open every segment is read and checked. A bad record in the LAST segment is a torn tail
  if no valid record exists anywhere after it (the file is copied to ``<name>.broken``,
  fsynced, then truncated at the bad record, and a warning is logged). A bad record anywhere
  else — or one followed by a valid record — raises :class:`StorageCorrupt` naming the file
  and offset. Nothing is ever silently skipped.
- The WAL knows nothing about what payloads mean; ``release_before(seq)`` removes whole
  segments the caller has declared obsolete. The active (last) segment is never removed.
- Not thread-safe: one caller at a time. All I/O is blocking.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import struct
from typing import Iterator

import crc32c as _crc32c

from afs.errors import FatalStorageError, StorageCorrupt
from afs.storage.faults import FaultPoints

log = logging.getLogger("afs.storage.wal")

MAGIC = b"AFSWAL\x00\x01"
HEADER = struct.Struct("<8sQ")
HEADER_SIZE = HEADER.size  # 16
REC = struct.Struct("<II")
REC_SIZE = REC.size        # 8
MAX_RECORD = 64 << 20
DEFAULT_SEGMENT_SIZE = 64 << 20
_SEG_RE = re.compile(r"^wal-([0-9a-f]{16})\.log$")

_crc = _crc32c.crc32c


def segment_name(seq: int) -> str:
    return f"wal-{seq:016x}.log"


def fsync_fd(fd: int) -> None:
    """fdatasync where available (flushes the size too, which is all appends need)."""
    if hasattr(os, "fdatasync"):
        os.fdatasync(fd)
    else:  # pragma: no cover - macOS
        os.fsync(fd)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_dir(path: str) -> None:
    """Create ``path`` (and parents) with mode 0700; tighten an existing one to 0700."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    if os.stat(path).st_mode & 0o077:
        os.chmod(path, 0o700)


def broken_copy(path: str, *, fsync: bool = True) -> str:
    """Copy ``path`` to ``<path>.broken`` (or ``.broken.N`` if taken), mode 0600; return it."""
    dst = path + ".broken"
    n = 1
    while os.path.exists(dst):
        dst = f"{path}.broken.{n}"
        n += 1
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out, open(path, "rb") as src:
        shutil.copyfileobj(src, out)
        out.flush()
        if fsync:
            fsync_fd(out.fileno())
    return dst


def frame(payload: bytes) -> bytes:
    n = len(payload)
    if not 0 < n <= MAX_RECORD:
        raise ValueError(f"WAL record size {n} outside 1..{MAX_RECORD}")
    return REC.pack(n, _crc(payload)) + payload


def _valid_record_at(buf: memoryview, off: int) -> bool:
    """Whether a complete record with a matching CRC starts at ``off``."""
    if off + REC_SIZE > len(buf):
        return False
    n, crc = REC.unpack_from(buf, off)
    if not 0 < n <= MAX_RECORD or off + REC_SIZE + n > len(buf):
        return False
    return _crc(buf[off + REC_SIZE: off + REC_SIZE + n]) == crc


def scan_segment(buf: bytes | memoryview, start: int = HEADER_SIZE) -> tuple[list[bytes], int, str]:
    """Parse records from ``start``. Returns (payloads, end offset of the last good record,
    reason the scan stopped or "" at a clean end)."""
    mv = memoryview(buf)
    size = len(mv)
    out: list[bytes] = []
    off = start
    while off < size:
        if off + REC_SIZE > size:
            return out, off, f"incomplete record header ({size - off} bytes)"
        n, crc = REC.unpack_from(mv, off)
        if n == 0 or n > MAX_RECORD:
            return out, off, f"impossible record length {n}"
        end = off + REC_SIZE + n
        if end > size:
            return out, off, f"record of {n} bytes runs past end of file ({size - off - REC_SIZE} left)"
        payload = mv[off + REC_SIZE: end]
        if _crc(payload) != crc:
            return out, off, "checksum mismatch"
        out.append(bytes(payload))
        off = end
    return out, off, ""


class WAL:
    """An open write-ahead log directory. See the module docstring for the contract."""

    def __init__(self, dirpath: str, *, fsync: bool, faults: FaultPoints | None, segment_size: int):
        self.dir = dirpath
        self._fsync = fsync
        self._faults = faults
        self._tracker = faults.tracker if faults is not None else None
        self.segment_size = segment_size
        self._seqs: list[int] = []        # segments on disk, oldest first
        self._fd = -1                     # active (last) segment, O_APPEND
        self._path = ""
        self._size = 0                    # bytes in the active segment
        self._failed: BaseException | None = None
        self._replay: list[tuple[int, bytes]] | None = []
        self.repairs: list[str] = []      # human-readable notes of tail repairs done on open

    # ------------------------------------------------------------------ open / replay
    @classmethod
    def open(cls, dirpath: str, *, fsync: bool = True, faults: FaultPoints | None = None,
             segment_size: int = DEFAULT_SEGMENT_SIZE) -> "WAL":
        """Open (creating if needed) the WAL in ``dirpath``; validate, repair the tail."""
        if segment_size < HEADER_SIZE + REC_SIZE + 1:
            raise ValueError("segment_size too small")
        ensure_dir(dirpath)
        w = cls(dirpath, fsync=fsync, faults=faults, segment_size=segment_size)
        try:
            w._load()
        except BaseException:
            w.close()
            raise
        return w

    def _load(self) -> None:
        seqs = sorted(int(m.group(1), 16) for m in map(_SEG_RE.match, os.listdir(self.dir)) if m)
        for a, b in zip(seqs, seqs[1:]):
            if b != a + 1:
                raise StorageCorrupt(
                    f"WAL {self.dir}: segments {segment_name(a)} and {segment_name(b)} are not "
                    f"consecutive (missing segment file)")
        replay: list[tuple[int, bytes]] = []
        for i, seq in enumerate(seqs):
            last = i == len(seqs) - 1
            path = os.path.join(self.dir, segment_name(seq))
            with open(path, "rb") as f:
                buf = f.read()
            hdr_ok = self._check_header(path, seq, buf, last)
            if not hdr_ok:  # torn header of a just-created last segment
                self._repair(path, 0, "torn segment header", buf)
                self._write_header(path, seq, create=False)
                continue
            payloads, good_end, why = scan_segment(buf)
            if why:
                where = f"WAL segment {path} offset {good_end}: {why}"
                if not last:
                    raise StorageCorrupt(f"{where} (not the last segment; refusing to skip)")
                mv = memoryview(buf)
                for off in range(good_end + 1, len(buf) - REC_SIZE):
                    if _valid_record_at(mv, off):
                        raise StorageCorrupt(
                            f"{where}; a valid record follows at offset {off}, so this is "
                            f"corruption, not a torn tail")
                self._repair(path, good_end, why, buf)
            replay.extend((seq, p) for p in payloads)
        self._seqs = seqs
        self._replay = replay
        if not seqs:
            self._create_segment(1)
        elif self._fd < 0:  # (a torn-header repair already reopened the last segment)
            self._open_active(seqs[-1])

    def _check_header(self, path: str, seq: int, buf: bytes, last: bool) -> bool:
        if len(buf) < HEADER_SIZE or buf[:HEADER_SIZE] == b"\0" * HEADER_SIZE:
            if last and not buf.strip(b"\0"):
                return False
            if last and len(buf) < HEADER_SIZE and MAGIC.startswith(buf[:len(MAGIC)]):
                return False
            raise StorageCorrupt(f"WAL segment {path} offset 0: missing or truncated header")
        magic, hseq = HEADER.unpack_from(buf)
        if magic != MAGIC:
            raise StorageCorrupt(f"WAL segment {path} offset 0: bad magic {magic!r}")
        if hseq != seq:
            raise StorageCorrupt(f"WAL segment {path} offset 8: header says segment {hseq}, name says {seq}")
        return True

    def _repair(self, path: str, length: int, why: str, buf: bytes) -> None:
        copy = broken_copy(path, fsync=self._fsync)
        if self._fsync:
            fsync_dir(self.dir)
        if self._faults is not None:
            self._faults.hit("before_wal_truncate")
        note = (f"WAL segment {path}: torn tail at offset {length} ({why}); dropped "
                f"{len(buf) - length} bytes; original kept as {copy}")
        log.warning("%s", note)
        self.repairs.append(note)
        fd = os.open(path, os.O_WRONLY)
        try:
            os.ftruncate(fd, length)
            if self._fsync:
                fsync_fd(fd)
        finally:
            os.close(fd)
        if self._tracker is not None:
            self._tracker.truncated(path, length)
            if self._fsync:
                self._tracker.fsynced(path)

    def replay(self) -> Iterator[tuple[int, bytes]]:
        """Yield (segment seq, payload) for every record found on open, in order. Once only."""
        if self._replay is None:
            raise RuntimeError("WAL.replay() may be called once, right after open()")
        recs, self._replay = self._replay, None
        return iter(recs)

    # ------------------------------------------------------------------ segments
    def _write_header(self, path: str, seq: int, *, create: bool) -> None:
        flags = os.O_WRONLY | os.O_APPEND | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            os.write(fd, HEADER.pack(MAGIC, seq))
            if self._tracker is not None:
                self._tracker.wrote(path, HEADER_SIZE)
            if self._fsync:
                fsync_fd(fd)
                if self._tracker is not None:
                    self._tracker.fsynced(path)
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._path, self._size = fd, path, HEADER_SIZE
        if seq not in self._seqs:
            self._seqs.append(seq)

    def _create_segment(self, seq: int) -> None:
        """Create, write the header, fsync it, fsync the directory; becomes the active segment.
        Ordering: the directory entry is durable before any record is written to the file."""
        path = os.path.join(self.dir, segment_name(seq))
        if self._tracker is not None:
            self._tracker.created(path)
        self._write_header(path, seq, create=True)
        self._dir_fsync()

    def _open_active(self, seq: int) -> None:
        path = os.path.join(self.dir, segment_name(seq))
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        self._path = path
        self._size = os.fstat(self._fd).st_size

    def _dir_fsync(self) -> None:
        if self._faults is not None:
            self._faults.hit("before_dir_fsync")
        if self._fsync:
            fsync_dir(self.dir)
            if self._tracker is not None:
                self._tracker.dir_fsynced(self.dir)

    def _roll(self) -> None:
        # The old segment may hold written-but-unsynced records: make them durable before
        # moving on, since sync() only fsyncs the active segment.
        self._do_fsync()
        os.close(self._fd)
        self._fd = -1
        self._create_segment(self._seqs[-1] + 1)

    # ------------------------------------------------------------------ writing
    def _check_usable(self) -> None:
        if self._failed is not None:
            raise FatalStorageError(f"WAL {self.dir} is unusable after an earlier failure: {self._failed}")
        if self._fd < 0:
            raise FatalStorageError(f"WAL {self.dir} is closed")

    def _fail(self, what: str, exc: BaseException) -> FatalStorageError:
        self._failed = exc
        log.critical("WAL %s: %s failed: %s — the WAL refuses all further use", self.dir, what, exc)
        return FatalStorageError(f"WAL {self.dir}: {what} failed: {exc}")

    def append(self, payloads: list[bytes]) -> int:
        """Frame and write all payloads with one write call (rolling first if the active
        segment is full). Returns the segment seq they went to. Not durable until sync()."""
        self._check_usable()
        data = b"".join([frame(p) for p in payloads])
        if not data:
            return self._seqs[-1]
        try:
            if self._size >= self.segment_size:
                self._roll()
            if self._faults is not None:
                self._faults.hit("before_wal_write")
            view = memoryview(data)
            while view:  # a regular file short-writes only on error paths (e.g. ENOSPC)
                n = os.write(self._fd, view)
                if n <= 0:
                    raise OSError("write returned 0")
                view = view[n:]
        except OSError as e:
            raise self._fail("write", e) from e
        finally:
            if self._tracker is not None and self._fd >= 0:
                # report what actually reached the file (even on a CrashPoint it is 0 or all)
                written = os.fstat(self._fd).st_size - self._size
                if written:
                    self._tracker.wrote(self._path, written)
        self._size += len(data)
        return self._seqs[-1]

    def _do_fsync(self) -> None:
        if self._faults is not None:
            self._faults.hit("before_wal_fsync")
        if self._fsync:
            try:
                fsync_fd(self._fd)
            except OSError as e:
                raise self._fail("fsync", e) from e
            if self._tracker is not None:
                self._tracker.fsynced(self._path)
        if self._faults is not None:
            self._faults.hit("after_wal_fsync")

    def sync(self) -> None:
        """Make every appended record durable (no-op syscall-wise when fsync=False)."""
        self._check_usable()
        self._do_fsync()

    # ------------------------------------------------------------------ housekeeping
    def segments(self) -> list[int]:
        """Seqs of the segments on disk, oldest first; the last one is active."""
        return list(self._seqs)

    @property
    def failed(self) -> bool:
        """True once a write/fsync failed; the WAL then refuses all use."""
        return self._failed is not None

    @property
    def active_seq(self) -> int:
        return self._seqs[-1]

    def release_before(self, seq: int) -> int:
        """Remove segments with seq < ``seq`` (never the active one), oldest first, then fsync
        the directory. The caller guarantees their records are obsolete. Returns the count."""
        self._check_usable()
        doomed = [s for s in self._seqs[:-1] if s < seq]
        for s in doomed:
            path = os.path.join(self.dir, segment_name(s))
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as e:
                raise self._fail(f"remove {path}", e) from e
            if self._tracker is not None:
                self._tracker.removed(path)
            self._seqs.remove(s)
        if doomed:
            self._dir_fsync()
        return len(doomed)

    def close(self) -> None:
        """Close the active segment. Does NOT sync (call sync() first). Always safe."""
        if self._fd >= 0:
            try:
                os.close(self._fd)
            finally:
                self._fd = -1
