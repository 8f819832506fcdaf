"""Real FUSE mounts of an in-memory replica (daemon in a subprocess, see conftest.py)."""
from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from tests.fuse.conftest import (FIXTURE, REPO, cat_as, errno_of, fuse_available, read,
                                 start_daemon, stop_daemon)

pytestmark = pytest.mark.fuse


# ---------------------------------------------------------------------------------------------
def test_reads_match_replica(fuse_mount):
    """Every file reads back exactly the replica's bytes."""
    for path, spec in FIXTURE["nodes"].items():
        if spec.get("kind") == "dir" or path == "/.afs" or len(path) > 256:
            continue
        assert read(fuse_mount.p(path)) == spec["data"].encode(), path
    # partial reads at an offset
    with open(fuse_mount.p("/hello"), "rb") as f:
        f.seek(6)
        assert f.read(3) == b"wor"


def test_ls_lists_children(fuse_mount):
    """readdir lists the children (with the reserved .afs first-class), sorted, d_ino set."""
    assert sorted(os.listdir(fuse_mount.p("/"))) == sorted(
        [".afs", "deep", "empty", "hello", "secret", "services"])
    assert sorted(os.listdir(fuse_mount.p("/services"))) == ["db", "web"]
    assert sorted(os.listdir(fuse_mount.p("/services/db"))) == ["primary", "replicas"]
    assert os.listdir(fuse_mount.p("/empty")) == []
    out = subprocess.run(["ls", "-l", fuse_mount.p("/services/db")], capture_output=True,
                         text=True, check=True).stdout
    assert "primary" in out and "replicas" in out
    with os.scandir(fuse_mount.p("/services")) as it:
        entries = {e.name: e for e in it}
    assert entries["db"].is_dir() and entries["db"].inode() == \
        os.stat(fuse_mount.p("/services/db")).st_ino
    assert errno_of(os.listdir, fuse_mount.p("/hello")) == errno.ENOTDIR


def test_unshowable_names_are_reported_not_merged(fuse_mount):
    """A >255-byte name and a root name colliding with .afs are skipped and counted."""
    st = json.loads(read(fuse_mount.p("/.afs/status")))
    assert st["hidden"]["count"] == 2
    assert "/.afs" in st["hidden"]["sample"]
    assert any(s.startswith("/nnnn") for s in st["hidden"]["sample"])
    # /.afs is the reserved directory, never the replica's file
    assert stat.S_ISDIR(os.stat(fuse_mount.p("/.afs")).st_mode)


def test_stat_fields(fuse_mount):
    """mode, uid, gid, size, nlink and the ns mtime come from the replica's Stat."""
    s = os.stat(fuse_mount.p("/hello"))
    assert stat.S_ISREG(s.st_mode) and stat.S_IMODE(s.st_mode) == 0o644
    assert (s.st_uid, s.st_gid, s.st_size, s.st_nlink) == (0, 0, 12, 1)
    assert s.st_mtime_ns == 1_700_000_000_123_456_789
    s = os.stat(fuse_mount.p("/secret"))
    assert stat.S_IMODE(s.st_mode) == 0o600 and (s.st_uid, s.st_gid) == (1000, 1000)
    s = os.stat(fuse_mount.p("/services/db/primary"))
    assert stat.S_IMODE(s.st_mode) == 0o640
    d = os.stat(fuse_mount.p("/services"))
    assert stat.S_ISDIR(d.st_mode) and stat.S_IMODE(d.st_mode) == 0o755
    # inode numbers are stable per path (not per daemon run): they hash the path
    from afs.fs.view import stable_ino
    assert os.stat(fuse_mount.p("/hello")).st_ino == stable_ino("/hello")
    assert errno_of(os.stat, fuse_mount.p("/nope")) == errno.ENOENT


def test_xattrs(fuse_mount):
    """user.afs.* xattrs expose version, mod/create revision and the replica revision."""
    p = fuse_mount.p("/hello")
    assert set(os.listxattr(p)) == {"user.afs.revision", "user.afs.version",
                                    "user.afs.mod_revision", "user.afs.create_revision"}
    assert os.getxattr(p, "user.afs.revision") == b"7"
    assert os.getxattr(p, "user.afs.version") == b"0"
    assert os.getxattr(p, "user.afs.mod_revision") == b"7"
    assert os.getxattr(p, "user.afs.create_revision") == b"7"
    assert errno_of(os.getxattr, p, "user.nope") == errno.ENODATA
    assert os.getxattr(fuse_mount.p("/.afs/status"), "user.afs.revision") == b"7"
    fuse_mount.ctl.apply(put={"/hello": {"data": "v2\n"}})
    assert os.getxattr(p, "user.afs.version") == b"1"
    assert os.getxattr(p, "user.afs.mod_revision") == b"8"
    assert os.getxattr(p, "user.afs.create_revision") == b"7"
    assert os.getxattr(fuse_mount.p("/services"), "user.afs.revision") == b"8"


def test_status_file(fuse_mount):
    """/.afs/status is JSON with revision, connection, last contact and staleness."""
    st = json.loads(read(fuse_mount.p("/.afs/status")))
    for key in ("revision", "connected", "connected_member", "last_contact",
                "staleness_seconds", "hidden"):
        assert key in st
    assert st["revision"] == 7 and st["connected"] is True
    assert os.listdir(fuse_mount.p("/.afs")) == ["status"]
    assert stat.S_IMODE(os.stat(fuse_mount.p("/.afs/status")).st_mode) == 0o444
    fuse_mount.ctl.apply(put={"/x": {"data": "1"}})
    assert json.loads(read(fuse_mount.p("/.afs/status")))["revision"] == 8
    # the provider's values show up within the refresh period (1 s) even without a revision
    fuse_mount.ctl.call(op="set_status", status={"connected": False, "staleness_seconds": 42.5})
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        st = json.loads(read(fuse_mount.p("/.afs/status")))
        if st["connected"] is False:
            break
        time.sleep(0.1)
    assert st["connected"] is False and st["staleness_seconds"] == 42.5


@pytest.mark.parametrize("cmd", [
    "echo x > {m}/hello",
    "echo x >> {m}/hello",
    "echo x > {m}/newfile",
    "mkdir {m}/newdir",
    "rm {m}/hello",
    "rmdir {m}/empty",
    "mv {m}/hello {m}/hello2",
    "chmod 600 {m}/hello",
    "chown 1 {m}/hello",
    "touch {m}/hello",
    "touch {m}/newfile",
    "ln -s hello {m}/link",
    "ln {m}/hello {m}/hardlink",
    "truncate -s 0 {m}/hello",
])
def test_writes_fail_with_erofs(fuse_mount, cmd):
    """Every write attempt fails with 'Read-only file system' and changes nothing."""
    r = subprocess.run(["sh", "-c", cmd.format(m=fuse_mount.mnt)], capture_output=True, text=True)
    assert r.returncode != 0
    assert "Read-only file system" in r.stderr, r.stderr
    assert read(fuse_mount.p("/hello")) == b"hello world\n"


def test_write_syscalls_return_erofs(fuse_mount):
    """The same at the syscall level: errno is EROFS."""
    m = fuse_mount.p
    assert errno_of(os.open, m("/hello"), os.O_WRONLY) == errno.EROFS
    assert errno_of(os.open, m("/new"), os.O_WRONLY | os.O_CREAT, 0o644) == errno.EROFS
    assert errno_of(os.mkdir, m("/d")) == errno.EROFS
    assert errno_of(os.unlink, m("/hello")) == errno.EROFS
    assert errno_of(os.rename, m("/hello"), m("/h2")) == errno.EROFS
    assert errno_of(os.chmod, m("/hello"), 0o600) == errno.EROFS
    assert errno_of(os.setxattr, m("/hello"), "user.x", b"1") == errno.EROFS
    assert errno_of(os.removexattr, m("/hello"), "user.afs.version") == errno.EROFS
    assert errno_of(os.truncate, m("/hello"), 0) == errno.EROFS
    assert errno_of(os.utime, m("/hello"), None) == errno.EROFS


def test_permissions_enforced_by_kernel(fuse_mount):
    """A 0600 file owned by uid 1000 is unreadable by uid 2000 and readable by uid 1000."""
    secret = fuse_mount.p("/secret")
    r = cat_as(2000, 2000, secret)
    assert r.returncode != 0 and "Permission denied" in r.stderr, r.stdout + r.stderr
    r = cat_as(1000, 1000, secret)
    assert r.returncode == 0 and r.stdout == "s3cr3t\n", r.stderr
    # 0640 root:root is readable by root only, not by others; 0644 by everyone (allow_other)
    r = cat_as(2000, 2000, fuse_mount.p("/services/db/primary"))
    assert r.returncode != 0 and "Permission denied" in r.stderr
    r = cat_as(2000, 2000, fuse_mount.p("/hello"))
    assert r.returncode == 0 and r.stdout == "hello world\n"
    # still enforced once the file is warm in the kernel's cache (open never asks the daemon)
    read(secret)
    r = cat_as(2000, 2000, secret)
    assert r.returncode != 0 and "Permission denied" in r.stderr
    # and follows a chown/chmod in a new revision
    fuse_mount.ctl.apply(put={"/secret": {"data": "s3cr3t\n", "mode": 0o600, "uid": 2000,
                                          "gid": 2000}})
    assert cat_as(2000, 2000, secret).stdout == "s3cr3t\n"
    assert "Permission denied" in cat_as(1000, 1000, secret).stderr


def test_warm_reads_never_reach_the_daemon(fuse_mount):
    """open() answers ENOSYS once; afterwards warm open+read+close stay in the kernel."""
    p = fuse_mount.p("/services/db/replicas")
    for _ in range(3):
        read(p)
        os.stat(p)
    before = fuse_mount.ctl.call(op="status")["calls"]
    for _ in range(500):
        assert read(p) == b"db2\ndb3\n"
        os.stat(p)
    after = fuse_mount.ctl.call(op="status")["calls"]
    assert after["read"] == before["read"]
    assert after["getattr"] == before["getattr"]


def test_update_visible_after_invalidate(fuse_mount):
    """Changed content and size are visible as soon as the revision's invalidation finished."""
    p = fuse_mount.p("/services/db/primary")
    assert read(p) == b"db1.example:5432\n"
    os.stat(p)
    for i, new in enumerate([b"db9:5432\n", b"a much longer primary address:5432\n", b""]):
        fuse_mount.ctl.apply(put={"/services/db/primary": {"data": new.decode(), "mode": 0o640}})
        assert read(p) == new
        s = os.stat(p)
        assert s.st_size == len(new)
        assert stat.S_IMODE(s.st_mode) == 0o640
    # metadata-only changes too
    fuse_mount.ctl.apply(put={"/hello": {"data": "hello world\n", "mode": 0o600, "uid": 5}})
    s = os.stat(fuse_mount.p("/hello"))
    assert stat.S_IMODE(s.st_mode) == 0o600 and s.st_uid == 5


def test_update_visible_through_open_fd(fuse_mount):
    """A reader holding the file open sees the new content on its next pread."""
    p = fuse_mount.p("/hello")
    fd = os.open(p, os.O_RDONLY)
    try:
        assert os.pread(fd, 100, 0) == b"hello world\n"
        fuse_mount.ctl.apply(put={"/hello": {"data": "bye, bigger content\n"}})
        assert os.pread(fd, 100, 0) == b"bye, bigger content\n"
    finally:
        os.close(fd)


def test_creates_visible_even_after_negative_lookup(fuse_mount):
    """A name looked up while missing (negative dentry) appears at once when created."""
    m = fuse_mount.p
    for path in ("/newtop", "/services/db/newnested", "/deep/a/b/c/new"):
        assert errno_of(os.stat, m(path)) == errno.ENOENT
    assert "newtop" not in os.listdir(m("/"))
    fuse_mount.ctl.apply(put={"/newtop": {"data": "t"}, "/services/db/newnested": {"data": "n"},
                              "/deep/a/b/c/new": {"data": "d"}})
    assert read(m("/newtop")) == b"t"
    assert read(m("/services/db/newnested")) == b"n"
    assert read(m("/deep/a/b/c/new")) == b"d"
    assert "newtop" in os.listdir(m("/"))
    assert "newnested" in os.listdir(m("/services/db"))


def test_deletes_fail_at_once_top_level_and_nested(fuse_mount):
    """Deleted names fail for stat/open immediately, at the top level and below it."""
    m = fuse_mount.p
    paths = ["/hello", "/services/db/replicas", "/deep/a/b/c/leaf"]
    for p in paths:
        read(m(p))
        os.stat(m(p))
    fuse_mount.ctl.apply(delete=paths + ["/services/web"])
    for p in paths + ["/services/web", "/services/web/port"]:
        assert errno_of(os.stat, m(p)) == errno.ENOENT, p
        assert errno_of(os.open, m(p), os.O_RDONLY) == errno.ENOENT, p
    assert "hello" not in os.listdir(m("/"))
    assert os.listdir(m("/services/db")) == ["primary"]
    assert os.listdir(m("/deep/a/b/c")) == []
    # the kernel does not even keep the dentry: it is gone from the dcache (lookup again: ENOENT)
    st = fuse_mount.ctl.call(op="status")["stats"]
    assert st["nodeid_failures"] == 0


def test_type_change_file_to_dir(fuse_mount):
    """Replacing a file by a directory of the same name works without EIO."""
    m = fuse_mount.p
    read(m("/services/web/port"))
    fuse_mount.ctl.apply(delete=["/services/web/port"],
                         put={"/services/web/port/number": {"data": "8081\n"}})
    assert stat.S_ISDIR(os.stat(m("/services/web/port")).st_mode)
    assert read(m("/services/web/port/number")) == b"8081\n"


def test_multi_path_change_appears_as_a_whole(fuse_mount):
    """All paths of one revision show the new content once its invalidation finished."""
    m = fuse_mount.p
    paths = ["/hello", "/services/db/primary", "/services/web/port", "/deep/a/b/c/leaf"]
    for p in paths:
        read(m(p))
    r = fuse_mount.ctl.apply(put={p: {"data": f"rev-next {p}\n"} for p in paths})
    revs = set()
    for p in paths:
        assert read(m(p)) == f"rev-next {p}\n".encode()
        revs.add(os.getxattr(m(p), "user.afs.mod_revision"))
    assert revs == {str(r["revision"]).encode()}


READER = (
    "import os,sys,time\n"
    "bad=0;n=0;end=time.time()+float(sys.argv[2]);ex=b''\n"
    "while time.time()<end:\n"
    "  fd=os.open(sys.argv[1],os.O_RDONLY);d=os.read(fd,1<<20);os.close(fd);n+=1\n"
    "  if not (d==b'8080\\n' or (d.startswith(b'<') and d.endswith(b'>') and len(d)==int(d[1:9]))):\n"
    "    bad+=1;ex=d[:12]+b'...'+d[-12:]\n"
    "print(n,bad,ex)\n")


def race_reader_with_updates(m, seconds: float = 2.5, gap: float = 0.0) -> tuple[int, int, str]:
    """Reader subprocess re-reading a file while revisions of varying size are applied."""
    p = m.p("/services/web/port")
    proc = subprocess.Popen([sys.executable, "-c", READER, p, str(seconds)],
                            stdout=subprocess.PIPE, text=True)
    try:
        i = 0
        t_end = time.monotonic() + seconds - 0.2
        while time.monotonic() < t_end:
            i += 1
            size = 10 + (i * 997) % 5000
            body = f"<{size:08d}" + "x" * (size - 10) + ">"
            m.ctl.apply(put={"/services/web/port": {"data": body}})
            if gap:
                time.sleep(gap)
        out = proc.communicate(timeout=30)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    n, bad, ex = out.split(" ", 2)
    return int(n), int(bad), ex


def test_concurrent_reader_sees_only_whole_file_versions(fuse_mount):
    """A reader re-reading a file that changes every ~1 ms (size varies) only ever reads the
    complete content of some revision.

    Known residual race (see afs/fs/view.py, "Size/data consistency"): when the SAME file
    changes again while the kernel's GETATTR for it is in flight, the kernel drops that reply
    and may read the new bytes against the older size. Back-to-back updates with no gap
    measured ~1 torn read per 20k-80k reads with revision pinning, ~6 per 50k without it
    (``--no-revision-pinning``); with >= 1 ms between changes none were seen."""
    n, bad, ex = race_reader_with_updates(fuse_mount, seconds=2.5, gap=0.001)
    assert n > 0 and bad == 0, ex


# ---------------------------------------------------------------------------------------------
# The bound without nested entry invalidation (negative control for the mechanism above).
def test_without_nested_entry_invalidation_negative_dentry_bounded_by_timeout(
        fuse_mount_factory):
    """With nested entry invalidation off, a nested create hidden by a negative lookup shows up
    only after negative_timeout; deleted nested names still fail at once (attr invalidation)."""
    m = fuse_mount_factory(FIXTURE, "--no-nested-entry-invalidation", "--negative-timeout", "2")
    p = m.p("/services/db/later")
    assert errno_of(os.stat, p) == errno.ENOENT
    t0 = time.monotonic()
    m.ctl.apply(put={"/services/db/later": {"data": "L"}})
    assert errno_of(os.stat, p) == errno.ENOENT        # stale negative dentry: the bound
    while errno_of(os.stat, p) == errno.ENOENT:
        assert time.monotonic() - t0 < 5
        time.sleep(0.05)
    waited = time.monotonic() - t0
    assert 1.0 <= waited <= 3.5, waited
    # top level still exact (root entries are always invalidated)
    assert errno_of(os.stat, m.p("/top")) == errno.ENOENT
    m.ctl.apply(put={"/top": {"data": "T"}})
    assert read(m.p("/top")) == b"T"
    # deleted nested file: fails at once although its dentry is not dropped
    q = m.p("/deep/a/b/c/leaf")
    read(q)
    m.ctl.apply(delete=["/deep/a/b/c/leaf"])
    assert errno_of(os.stat, q) == errno.ENOENT
    assert errno_of(os.open, q, os.O_RDONLY) == errno.ENOENT


# ---------------------------------------------------------------------------------------------
def _mount_cli(mountpoint, *extra, timeout=15):
    return subprocess.run([sys.executable, "-m", "afs.fs", str(mountpoint), *extra],
                          capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))


def test_clear_error_mount_point_missing(tmp_path):
    """A missing mount point is a one-line error, no traceback."""
    if fuse_available():
        pytest.skip(fuse_available())
    r = _mount_cli(tmp_path / "nope")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"afs mount: mount point {tmp_path / 'nope'} "
                                             "does not exist"]


def test_clear_error_mount_point_not_empty(tmp_path):
    """A non-empty mount point is refused with one line."""
    if fuse_available():
        pytest.skip(fuse_available())
    (tmp_path / "mp").mkdir()
    (tmp_path / "mp" / "f").write_text("x")
    r = _mount_cli(tmp_path / "mp")
    assert r.returncode == 1 and "is not empty" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_clear_error_mount_point_busy(fuse_mount):
    """Mounting over a live mount is refused with one line."""
    r = _mount_cli(fuse_mount.mnt)
    assert r.returncode == 1 and "is busy" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_clear_error_no_fusermount3(tmp_path):
    """Without fusermount3 on PATH the error says which package to install."""
    (tmp_path / "mp").mkdir()
    r = subprocess.run([sys.executable, "-m", "afs.fs", str(tmp_path / "mp")],
                       capture_output=True, text=True, timeout=15,
                       env=dict(os.environ, PYTHONPATH=str(REPO), PATH=str(tmp_path)))
    assert r.returncode == 1
    assert r.stderr.strip() == "afs mount: fusermount3 not found: install the Debian package fuse3"


def test_stale_dead_mount_is_cleared_on_start(mount_base):
    """A mount whose daemon was killed (ENOTCONN) is cleared with fusermount3 -u -z on start."""
    if fuse_available():
        pytest.skip(fuse_available())
    tmp_path = mount_base
    m = start_daemon(tmp_path, FIXTURE)
    try:
        m.ctl.close()
        m.proc.send_signal(signal.SIGKILL)
        m.proc.wait(timeout=10)
        assert errno_of(os.statvfs, m.mnt) == errno.ENOTCONN
        m2 = start_daemon(tmp_path, FIXTURE)
        try:
            assert read(m2.p("/hello")) == b"hello world\n"
            assert "clearing stale FUSE mount" in m2.log.read_text()
        finally:
            stop_daemon(m2)
    finally:
        stop_daemon(m)
        if errno_of(os.statvfs, m.mnt) == errno.ENOTCONN:
            subprocess.run(["fusermount3", "-u", "-z", str(m.mnt)])


def test_unmount_api_and_sigterm_stop_cleanly(fuse_mount_factory):
    """Mount.unmount() and SIGTERM both unmount and let serve() return (exit 0)."""
    m = fuse_mount_factory(FIXTURE, name="a")
    try:
        m.ctl.call(op="unmount")
    except RuntimeError:
        pass   # the daemon may exit before it answers
    assert m.proc.wait(timeout=10) == 0
    assert not os.path.ismount(m.mnt)
    m2 = fuse_mount_factory(FIXTURE, name="b")
    m2.proc.send_signal(signal.SIGTERM)
    assert m2.proc.wait(timeout=10) == 0
    assert not os.path.ismount(m2.mnt)
    assert "Traceback" not in m.log.read_text() + m2.log.read_text()


def test_mount_table_entry(fuse_mount):
    """The mount is read-only, default_permissions, allow_other, type fuse.afs."""
    line = next(ln for ln in open("/proc/self/mounts") if f" {fuse_mount.mnt} " in ln)
    src, _, fstype, opts = line.split()[:4]
    assert fstype == "fuse.afs"
    assert src == "afs"
    assert {"ro", "default_permissions", "allow_other"} <= set(opts.split(","))
