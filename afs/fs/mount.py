"""The FUSE adapter: the ONLY module that imports the FUSE binding (mfusepy on libfuse3).

What it does, and why (measured on this machine with bench/mount_bench.py and debug traces):

* **Binding.** mfusepy picks libfuse2 when ``FUSE_LIBRARY_NAME`` is unset and libfuse2 is
  installed (it tries ``find_library('fuse')`` first); libfuse2 has no working invalidation. We
  set ``FUSE_LIBRARY_NAME=fuse3`` before the import and refuse to load if anything else was
  loaded (e.g. mfusepy imported earlier by someone else, or ``FUSE_LIBRARY_PATH`` pointing at 2.x).
* **Read path.** ``open`` answers ``ENOSYS``: the kernel then sets ``no_open`` for the whole
  connection, never sends OPEN/RELEASE again and opens every file with ``FOPEN_KEEP_CACHE``
  (the first close sends one FLUSH, which libfuse answers ENOSYS as no flush op is registered,
  so the kernel sets ``no_flush`` too): a warm ``open+read+close`` never leaves the kernel. Because the daemon is no longer asked at
  open time, permissions are checked by the kernel from mode/uid/gid (``default_permissions``).
  ``opendir`` is NOT answered with ENOSYS: libfuse's high-level readdir dereferences the dir
  handle that opendir allocates (NULL after ENOSYS) and would crash.
  Long ``entry_timeout``/``attr_timeout`` + ``kernel_cache`` keep names, attributes and pages in
  the kernel until we invalidate them.
* **Change path.** :meth:`Mount.invalidate` queues changed paths to one dedicated thread (never a
  FUSE callback thread). For each changed path it calls ``fuse_invalidate_path`` (attributes and
  page cache of the inode, if the kernel knows it) and ``fuse_lowlevel_notify_inval_entry(parent,
  name)`` (drops the dentry, positive or negative, and the parent's attributes and readdir cache),
  then ``fuse_invalidate_path`` on the parent directory. The parent's node id is 1 for the root;
  below the root it is read from the kernel with ``name_to_handle_at(AT_HANDLE_FID)`` (FUSE's file
  handle is ``nodeid_hi, nodeid_lo, generation``), and only if libfuse still knows the parent
  (otherwise the kernel holds no dentry below it and there is nothing to drop).
  With that, deletes, creates over a cached negative lookup and type changes are visible at every
  depth as soon as ``invalidate`` returns. Without it (``nested_entry_invalidation=False``, or a
  parent the daemon cannot resolve), the bound is: a deleted nested name fails at once for
  open/stat/read (ENOENT, the inode's attributes were invalidated and ``default_permissions``
  forces a GETATTR) but its dentry lingers until ``entry_timeout``; a created nested name hidden by
  a cached negative lookup appears after at most ``negative_timeout``.
* **First read after a change.** After the invalidations the thread pre-warms what the kernel
  had cached: the ``name_to_handle_at`` walk re-validates the dentry and attributes of the file
  and its ancestors (served by the FUSE loop), and ``fuse_lowlevel_notify_store`` pushes the new
  bytes (of the revision whose size the kernel just got) into the page cache. A reader after
  ``invalidate()`` returned then needs no round trip (~12 us instead of ~2 round trips,
  60-300 us on this shared VM). ``prewarm=False`` turns it off.
* **Directories.** Readdir returns (name, type, ino) with no attributes, so READDIRPLUS is
  switched off in ``init``. The kernel's readdir cache (FOPEN_CACHE_DIR) cannot be used: libfuse
  3.14's high-level ``opendir`` does not copy ``cache_readdir`` back to the kernel (checked in
  the source and by counting requests), so a warm ``ls`` costs OPENDIR + READDIR(s) + RELEASEDIR
  (5 round trips for 1,000 entries) plus one Python pass over the cached listing.
* **Loop.** Single-threaded by default (``threads=False``): callbacks are short and in-memory,
  and a libfuse worker thread entering Python per request costs more than it buys.
* **Writes.** Mounted ``ro``; every write-type callback is registered anyway and answers EROFS.
* **fsname.** Shows as ``afs`` in /proc/mounts unless the daemon's working directory contains an
  entry named like the fsname (then mount(8) canonicalises it into a path); start it from ``/``.

Threading: callbacks run in the FUSE loop thread (libfuse workers with ``threads=True``); the
view is lock-free and ``status_provider`` must not block. The invalidator
thread uses the ``struct fuse*`` captured in ``init`` under a lock that ``destroy`` also takes,
so it never touches a destroyed session.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import shutil
import subprocess
import threading
import time
from collections import deque
from typing import Iterable

from afs import errors

os.environ["FUSE_LIBRARY_NAME"] = "fuse3"   # must be set before mfusepy is imported

import mfusepy  # noqa: E402  (the only import of the binding in AFS)

from afs.fs.view import FsView  # noqa: E402

if mfusepy.fuse_version_major != 3:   # pragma: no cover - depends on the host
    raise ImportError(
        f"afs.fs.mount needs libfuse3 but mfusepy loaded {mfusepy._libfuse_path!r} "
        f"(version {mfusepy.fuse_version_major}.{mfusepy.fuse_version_minor}); was mfusepy imported "
        "before afs.fs.mount, or is FUSE_LIBRARY_PATH set? Install Debian package fuse3.")

log = logging.getLogger("afs.fs.mount")

_lib = mfusepy._libfuse
LIBFUSE_PATH = mfusepy._libfuse_path
LIBFUSE_VERSION = (mfusepy.fuse_version_major, mfusepy.fuse_version_minor)

_lib.fuse_invalidate_path.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
_lib.fuse_invalidate_path.restype = ctypes.c_int
_lib.fuse_get_session.argtypes = [ctypes.c_void_p]
_lib.fuse_get_session.restype = ctypes.c_void_p
_lib.fuse_session_exited.argtypes = [ctypes.c_void_p]
_lib.fuse_session_exited.restype = ctypes.c_int
_lib.fuse_lowlevel_notify_inval_entry.argtypes = [ctypes.c_void_p, ctypes.c_uint64,
                                                  ctypes.c_char_p, ctypes.c_size_t]
_lib.fuse_lowlevel_notify_inval_entry.restype = ctypes.c_int


class _FuseBuf(ctypes.Structure):     # struct fuse_buf (fuse_common.h)
    _fields_ = [("size", ctypes.c_size_t), ("flags", ctypes.c_int), ("mem", ctypes.c_void_p),
                ("fd", ctypes.c_int), ("pos", ctypes.c_int64)]


class _FuseBufvec(ctypes.Structure):  # struct fuse_bufvec: buf is an inline array of 1
    _fields_ = [("count", ctypes.c_size_t), ("idx", ctypes.c_size_t), ("off", ctypes.c_size_t),
                ("buf", _FuseBuf * 1)]


_lib.fuse_lowlevel_notify_store.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int64,
                                            ctypes.POINTER(_FuseBufvec), ctypes.c_int]
_lib.fuse_lowlevel_notify_store.restype = ctypes.c_int

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_CAP_AUTO_INVAL_DATA = 1 << 12    # FUSE_CAP_AUTO_INVAL_DATA
_CAP_READDIRPLUS = 1 << 13        # fuse_common.h FUSE_CAP_READDIRPLUS
_CAP_READDIRPLUS_AUTO = 1 << 14   # FUSE_CAP_READDIRPLUS_AUTO
_AT_FDCWD = -100
_AT_HANDLE_FID = 0x200        # Linux >= 6.5: encode a handle that need not be decodable
_MAX_HANDLE_SZ = 128


class _FileHandle(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int),
                ("f_handle", ctypes.c_ubyte * _MAX_HANDLE_SZ)]


_libc.name_to_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_FileHandle),
                                    ctypes.POINTER(ctypes.c_int), ctypes.c_int]
_libc.name_to_handle_at.restype = ctypes.c_int


class MountError(errors.AfsError):
    """The mount could not be set up or torn down; the message is one line for the operator."""

    code, errno = "mount_failed", errno.EIO


def _enc(path: str) -> bytes:
    return path.encode("utf-8", "surrogateescape")


def _parent(path: str) -> str:
    p = path.rpartition("/")[0]
    return p or "/"


# --------------------------------------------------------------------------------------------
# The operations object handed to mfusepy. Only the callbacks listed here are registered.
# --------------------------------------------------------------------------------------------
class _Ops:
    use_ns = True   # st_mtime etc. are integer nanoseconds

    def __init__(self, view: FsView, mount: "Mount"):
        self._view = view
        self._mount = mount

    # ---- lifecycle ----
    def init_with_config(self, conn, config) -> None:
        m = self._mount
        if config is not None:
            config.entry_timeout = float(m.entry_timeout)
            config.attr_timeout = float(m.attr_timeout)
            config.negative_timeout = float(m.negative_timeout)
            config.kernel_cache = 1
            config.use_ino = 1          # st_ino from the view: stable per path
            config.direct_io = 0
            config.auto_cache = 0
            config.hard_remove = 1      # we never unlink: no hidden .fuse_hidden files
        if conn is not None:
            # Our readdir returns no attributes, so READDIRPLUS only adds per-entry overhead.
            conn.want &= ~(_CAP_READDIRPLUS | _CAP_READDIRPLUS_AUTO)
            # When fresh attributes show a new mtime/size, drop cached pages: a page read
            # against the previous revision's size must not outlive that revision.
            if conn.capable & _CAP_AUTO_INVAL_DATA:
                conn.want |= _CAP_AUTO_INVAL_DATA
        fuse_ptr = _lib.fuse_get_context().contents.fuse
        m._on_init(fuse_ptr)

    def destroy(self, path) -> None:
        self._mount._on_destroy()

    # ---- read path ----
    def getattr(self, path: str, fh=None) -> dict:
        try:
            return self._view.getattr(path)
        except errors.AfsError as e:
            raise mfusepy.FuseOSError(e.errno) from None

    def readdir(self, path: str, fh) -> list:   # registers the callback; see _Fuse
        raise mfusepy.FuseOSError(errno.ENOSYS)

    def readdir_raw(self, path: str) -> list:
        try:
            return self._view.readdir_entries(path)
        except errors.AfsError as e:
            raise mfusepy.FuseOSError(e.errno) from None

    def read(self, path: str, size: int, offset: int, fh) -> bytes:
        try:
            return self._view.read(path, size, offset)
        except errors.AfsError as e:
            raise mfusepy.FuseOSError(e.errno) from None

    def getxattr(self, path: str, name: str, *args) -> bytes:
        try:
            return self._view.getxattr(path, name)
        except errors.AfsError as e:
            raise mfusepy.FuseOSError(e.errno) from None

    def listxattr(self, path: str) -> list:
        try:
            return self._view.listxattr(path)
        except errors.AfsError as e:
            raise mfusepy.FuseOSError(e.errno) from None

    def open(self, path: str, flags: int) -> int:
        # ENOSYS => the kernel sets fc->no_open: no OPEN/RELEASE ever again, pages stay cached.
        raise mfusepy.FuseOSError(errno.ENOSYS)

    # ---- every write-type operation: read-only file system ----
    def _erofs(self, *args, **kwargs):
        raise mfusepy.FuseOSError(errno.EROFS)

    write = create = mkdir = mknod = unlink = rmdir = rename = chmod = chown = truncate = \
        utimens = symlink = link = setxattr = removexattr = fallocate = _erofs


class _Fuse(mfusepy.FUSE):
    """mfusepy's FUSE with a leaner readdir: the view hands over pre-encoded (name, type, ino)
    tuples (cached per revision), so each entry costs one filler call and two field stores."""

    def readdir_fuse_3(self, path, buf, filler, offset, fip, flags) -> int:
        entries = self.operations.readdir_raw(path.decode(self.encoding, self.errors))
        st = mfusepy.c_stat()
        for name, mode, ino in entries:
            st.st_mode = mode
            st.st_ino = ino
            if filler(buf, name, st, 0, 0) != 0:
                break
        return 0


# --------------------------------------------------------------------------------------------
class _Batch:
    __slots__ = ("paths", "done")

    def __init__(self, paths: list[str]):
        self.paths = paths
        self.done = threading.Event()


class Mount:
    """A read-only FUSE mount of an :class:`FsView`.

    ``serve()`` blocks until the file system is unmounted (``unmount()`` from another thread,
    ``fusermount3 -u``, SIGINT/SIGTERM). ``invalidate(paths)`` may be called from any thread,
    any time; paths queued before the kernel connected are dropped (nothing is cached yet).

    Timeouts are in seconds. ``negative_timeout`` bounds how long a failed lookup is cached; it
    only matters where entry invalidation is impossible (see module docstring).
    """

    def __init__(self, view: FsView, mountpoint: str, foreground: bool = True, *,
                 entry_timeout: float = 3600.0, attr_timeout: float = 3600.0,
                 negative_timeout: float = 1.0, allow_other: bool = True,
                 threads: bool = False, nested_entry_invalidation: bool = True,
                 allow_nonempty: bool = False, status_refresh: float | None = None,
                 prewarm: bool = True, prewarm_max_bytes: int = 1 << 20,
                 debug: bool = False, fsname: str = "afs"):
        self.view = view
        self.mountpoint = os.path.abspath(mountpoint)
        self.foreground = foreground
        self.entry_timeout = entry_timeout
        self.attr_timeout = attr_timeout
        self.negative_timeout = negative_timeout
        self.allow_other = allow_other
        self.threads = threads
        self.nested_entry_invalidation = nested_entry_invalidation
        self.allow_nonempty = allow_nonempty
        self.prewarm = prewarm
        self.prewarm_max_bytes = prewarm_max_bytes
        self.status_refresh = view.status_ttl if status_refresh is None else status_refresh
        self.debug = debug
        self.fsname = fsname
        self._fuse_lock = threading.Lock()
        self._fuse: int | None = None
        self._session: int | None = None
        self._ready = threading.Event()
        self._stopped = threading.Event()
        self._queue: deque[_Batch] = deque()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self.stats = {"batches": 0, "paths": 0, "inval_path": 0, "inval_entry": 0,
                      "nodeid_lookups": 0, "nodeid_failures": 0, "prewarmed": 0,
                      "last_batch_us": 0.0, "last_inval_us": 0.0}
        self._mp_b = _enc(self.mountpoint)

    # ---- public API --------------------------------------------------------------------------
    def serve(self) -> None:
        """Mount and serve until unmounted. Raises :class:`MountError` with a one-line message."""
        self.preflight()
        self.view.mount_info = {"mountpoint": self.mountpoint, "libfuse": LIBFUSE_PATH,
                                "entry_timeout": self.entry_timeout,
                                "negative_timeout": self.negative_timeout}
        ops = _Ops(self.view, self)
        options = {"ro": True, "default_permissions": True, "fsname": self.fsname,
                   "subtype": "afs"}
        if self.allow_other:
            options["allow_other"] = True
        self._thread = threading.Thread(target=self._run_invalidator, name="afs-fuse-inval",
                                        daemon=True)
        self._thread.start()
        try:
            _Fuse(ops, self.mountpoint, foreground=self.foreground, debug=self.debug,
                         nothreads=not self.threads, **options)
        except RuntimeError as e:
            # fuse_main_real: 1-7 = setup/mount failures, 8 = the loop ended with an error,
            # which includes a stop by SIGTERM/SIGINT/SIGHUP (libfuse records the signal).
            if str(e) == "8" and self._ready.is_set():
                log.info("FUSE loop for %s stopped (signal)", self.mountpoint)
                return
            raise MountError(f"libfuse could not mount {self.mountpoint} (code {e}); "
                             "see the fuse: message above") from None
        finally:
            self._on_destroy()
            with self._cv:
                self._cv.notify_all()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until the kernel connected (``init`` ran)."""
        return self._ready.wait(timeout)

    def unmount(self, lazy: bool = False) -> None:
        """Unmount (``fusermount3 -u``); ``serve()`` then returns."""
        args = ["fusermount3", "-u", *(["-z"] if lazy else []), self.mountpoint]
        r = subprocess.run(args, capture_output=True, text=True)
        if r.returncode != 0:
            msg = (r.stderr or r.stdout).strip().splitlines()
            raise MountError(f"unmount of {self.mountpoint} failed: "
                             f"{msg[-1] if msg else 'exit ' + str(r.returncode)}")

    def invalidate(self, paths: Iterable[str], wait: bool = False,
                   timeout: float | None = 10.0) -> bool:
        """Queue the changed ``paths`` of one applied revision for kernel-cache invalidation.

        Call it after the new revision is visible through the view. Returns at once unless
        ``wait``; with ``wait`` it returns True once every path (and its parent) was invalidated.
        """
        batch = _Batch(list(paths))
        if not self._ready.is_set() or self._stopped.is_set():
            batch.done.set()
            return True
        with self._cv:
            self._queue.append(batch)
            self._cv.notify()
        return batch.done.wait(timeout) if wait else True

    # ---- preflight: clear one-line errors ------------------------------------------------------
    def preflight(self) -> None:
        mp = self.mountpoint
        if shutil.which("fusermount3") is None:
            raise MountError("fusermount3 not found: install the Debian package fuse3")
        if not os.path.exists("/dev/fuse"):
            raise MountError("/dev/fuse does not exist: load the fuse kernel module "
                             "(modprobe fuse) or give the container --device /dev/fuse")
        try:
            os.close(os.open("/dev/fuse", os.O_RDWR))
        except OSError as e:
            raise MountError(f"cannot open /dev/fuse: {e.strerror}") from None
        try:
            os.stat(mp)
            dead = os.path.ismount(mp) and self._is_dead_mount(mp)
        except FileNotFoundError:
            raise MountError(f"mount point {mp} does not exist") from None
        except OSError as e:
            if e.errno != errno.ENOTCONN:
                raise MountError(f"mount point {mp}: {e.strerror}") from None
            dead = True
        if dead:
            log.warning("clearing stale FUSE mount at %s (transport endpoint not connected)", mp)
            subprocess.run(["fusermount3", "-u", "-z", mp], capture_output=True)
            try:
                os.stat(mp)
            except OSError as e2:
                raise MountError(f"mount point {mp} has a dead FUSE mount that could not be "
                                 f"cleared: {e2.strerror}") from None
        if not os.path.isdir(mp):
            raise MountError(f"mount point {mp} is not a directory")
        if os.path.ismount(mp):
            raise MountError(f"mount point {mp} is busy: something is already mounted there")
        if not self.allow_nonempty and os.listdir(mp):
            raise MountError(f"mount point {mp} is not empty")
        if self.allow_other and os.geteuid() != 0:
            try:
                with open("/etc/fuse.conf") as f:
                    ok = any(line.strip() == "user_allow_other" for line in f)
            except OSError:
                ok = False
            if not ok:
                raise MountError("allow_other needs 'user_allow_other' in /etc/fuse.conf "
                                 "when not running as root")

    @staticmethod
    def _is_dead_mount(mp: str) -> bool:
        """A FUSE mount whose daemon died answers ENOTCONN; cached attributes may still make
        stat() succeed, statfs always asks the daemon."""
        try:
            os.statvfs(mp)
        except OSError as e:
            return e.errno == errno.ENOTCONN
        return False

    # ---- libfuse callbacks (called from the FUSE loop) -----------------------------------------
    def _on_init(self, fuse_ptr: int) -> None:
        with self._fuse_lock:
            self._fuse = fuse_ptr
            self._session = _lib.fuse_get_session(fuse_ptr)
        self._ready.set()

    def _on_destroy(self) -> None:
        self._stopped.set()
        with self._fuse_lock:
            self._fuse = None
            self._session = None
        with self._cv:
            self._cv.notify_all()
        for b in list(self._queue):
            b.done.set()

    # ---- the invalidator thread ----------------------------------------------------------------
    def _run_invalidator(self) -> None:
        refresh = self.status_refresh
        next_status = time.monotonic() + refresh if refresh else None
        while not self._stopped.is_set():
            with self._cv:
                if not self._queue:
                    timeout = None if next_status is None else max(0.0, next_status - time.monotonic())
                    self._cv.wait(timeout)
                batches = list(self._queue)
                self._queue.clear()
            if self._stopped.is_set():
                for b in batches:
                    b.done.set()
                break
            if batches:
                paths = {p for b in batches for p in b.paths}
                paths.add("/.afs/status")
                try:
                    self._apply(paths)
                except Exception:   # never let the thread die: log and carry on
                    log.exception("invalidation failed")
                for b in batches:
                    b.done.set()
            if next_status is not None and time.monotonic() >= next_status:
                with self._fuse_lock:
                    if self._fuse is not None and not _lib.fuse_session_exited(self._session):
                        _lib.fuse_invalidate_path(self._fuse, b"/.afs/status")
                next_status = time.monotonic() + refresh

    def _nodeid(self, path: str) -> int | None:
        """libfuse node id of a directory the kernel has cached, via name_to_handle_at."""
        self.stats["nodeid_lookups"] += 1
        fh = _FileHandle()
        fh.handle_bytes = _MAX_HANDLE_SZ
        mount_id = ctypes.c_int()
        full = self._mp_b + _enc(path)
        if _libc.name_to_handle_at(_AT_FDCWD, full, ctypes.byref(fh), ctypes.byref(mount_id),
                                   _AT_HANDLE_FID) != 0 or fh.handle_bytes < 8:
            self.stats["nodeid_failures"] += 1
            return None
        words = (ctypes.c_uint32 * 2).from_buffer_copy(bytes(fh.f_handle[:8]))
        return (words[0] << 32) | words[1]

    def _prewarm(self, se: int, path: str) -> None:
        st = self.view.reader().stat(path)
        if st is None or st.kind.value != "file" or st.size > self.prewarm_max_bytes:
            return
        nid = self._nodeid(path)      # the walk re-validates dentry + attributes
        if nid is None:
            return
        # push the bytes of the revision whose size the kernel just got (not a newer one)
        data = self.view.reader_for(path).data(path)
        if not data:
            return
        cbuf = ctypes.create_string_buffer(data, len(data))
        vec = _FuseBufvec()
        vec.count, vec.idx, vec.off = 1, 0, 0
        b = vec.buf[0]
        b.size, b.flags, b.fd, b.pos = len(data), 0, -1, 0
        b.mem = ctypes.cast(cbuf, ctypes.c_void_p)
        if _lib.fuse_session_exited(se):     # the walk above may have raced a stop
            return
        rc = _lib.fuse_lowlevel_notify_store(se, nid, 0, ctypes.byref(vec), 0)
        if rc == 0:
            self.stats["prewarmed"] += 1
        else:
            self.stats["prewarm_failures"] = self.stats.get("prewarm_failures", 0) + 1
            self.stats["prewarm_last_error"] = rc

    def _apply(self, paths: set[str]) -> None:
        t0 = time.perf_counter()
        ordered = sorted(paths, key=lambda p: (p.count("/"), p))
        parents = {_parent(p) for p in ordered if p != "/"}
        n_path = n_entry = 0
        with self._fuse_lock:
            f, se = self._fuse, self._session
            # libfuse frees its node table (fuse_destroy) BEFORE it calls our destroy callback,
            # so after a signal stopped the loop, a path call would use freed memory (seen as
            # SIGSEGV on SIGTERM). The session itself lives until destroy took this lock, so
            # checking its exit flag here is safe; we re-check before every libfuse call.
            exited = _lib.fuse_session_exited
            if f is None or exited(se):
                return
            inval_path = _lib.fuse_invalidate_path
            inval_entry = _lib.fuse_lowlevel_notify_inval_entry
            # 1. inode attributes + page cache of every changed path the kernel knows.
            known: list[str] = []
            for p in ordered:
                if exited(se):
                    return
                if inval_path(f, _enc(p)) == 0:
                    known.append(p)
                n_path += 1
            # 2. the dentry (positive or negative) of every changed name, shallow first, so a
            #    deleted directory drops its whole subtree before we look at names below it.
            known_parent: dict[str, int | None] = {"/": 1}
            for p in ordered:
                if p == "/":
                    continue
                parent, _, name = p.rpartition("/")
                parent = parent or "/"
                if parent not in known_parent:
                    nid = None
                    if self.nested_entry_invalidation and not exited(se) \
                            and inval_path(f, _enc(parent)) == 0 \
                            and self.view.exists(parent):
                        nid = self._nodeid(parent)
                    known_parent[parent] = nid
                nid = known_parent[parent]
                if nid is not None:
                    if exited(se):
                        return
                    nb = _enc(name)
                    inval_entry(se, nid, nb, len(nb))
                    n_entry += 1
            # 3. parent directories: attributes (mtime, size) and readdir cache.
            for d in sorted(parents, key=lambda p: p.count("/")):
                if exited(se):
                    return
                inval_path(f, _enc(d))
                n_path += 1
            t_inval = time.perf_counter()
            # 4. pre-warm what the kernel had cached: a path walk from this thread refreshes the
            #    dentry and the attributes of the file and its ancestors (LOOKUP/GETATTR served
            #    by the FUSE workers), and notify_store puts the new content into the page
            #    cache, so the first read after invalidate() returned needs no round trip.
            if self.prewarm:
                for p in known:
                    if p.startswith("/.afs"):
                        continue
                    if exited(se):
                        return
                    self._prewarm(se, p)
        st = self.stats
        st["last_inval_us"] = (t_inval - t0) * 1e6
        st["batches"] += 1
        st["paths"] += len(paths)
        st["inval_path"] += n_path
        st["inval_entry"] += n_entry
        st["last_batch_us"] = (time.perf_counter() - t0) * 1e6
