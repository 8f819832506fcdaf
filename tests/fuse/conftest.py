"""Fixtures for real FUSE mounts.

The daemon (``python -m afs.fs``) always runs in a SUBPROCESS: a process that serves a FUSE
mount and also reads it can deadlock. It serves an in-memory replica built from a JSON fixture
and is driven through a unix control socket (apply a revision -> swap -> invalidate -> reply).
Teardown always unmounts (``fusermount3 -u``, then ``-u -z``) and kills only the daemon PID.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from afs.testing.fusectl import DevControl, fuse_available  # noqa: F401 (re-exported)

REPO = Path(__file__).resolve().parents[2]


Control = DevControl


def read(path: str) -> bytes:
    """One open+read+close of up to 2 MiB."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, 1 << 21)
    finally:
        os.close(fd)


def errno_of(fn, *args) -> int | None:
    """The errno ``fn(*args)`` fails with, or None if it succeeds."""
    try:
        fn(*args)
    except OSError as e:
        return e.errno
    return None


def cat_as(uid: int, gid: int, path: str) -> subprocess.CompletedProcess:
    """``cat path`` in a child that dropped to uid/gid (no supplementary groups)."""
    def drop():
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    return subprocess.run(["/bin/cat", path], capture_output=True, text=True, preexec_fn=drop,
                          cwd="/", timeout=30)


class MountedFs:
    def __init__(self, mnt: Path, proc: subprocess.Popen, ctl: Control, log: Path):
        self.mnt, self.proc, self.ctl, self.log = mnt, proc, ctl, log

    def p(self, path: str) -> str:
        return str(self.mnt) + path


def start_daemon(tmp: Path, fixture: dict, *extra: str, name: str = "mnt") -> MountedFs:
    mnt = tmp / name
    try:
        mnt.mkdir()
    except FileExistsError:         # also a dead mount (stat: ENOTCONN)
        pass
    os.chmod(tmp, 0o755)            # other uids must reach the mount point
    fx = tmp / f"{name}.json"
    fx.write_text(json.dumps(fixture))
    sock = tmp / f"{name}.sock"
    log = tmp / f"{name}.log"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with open(log, "wb") as lf:
        proc = subprocess.Popen([sys.executable, "-m", "afs.fs", str(mnt), "--fixture", str(fx),
                                 "--control", str(sock), *extra],
                                stdout=lf, stderr=subprocess.STDOUT, env=env, cwd=str(tmp))
    deadline = time.monotonic() + 15
    ctl = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited {proc.returncode}: {log.read_text()}")
        if ctl is None and sock.exists():
            try:
                ctl = Control(str(sock))
            except OSError:
                ctl = None
        if ctl is not None and os.path.ismount(mnt):
            try:
                os.stat(mnt / ".afs")     # forces INIT + a lookup: kernel connected
                if ctl.call(op="ping")["ready"]:
                    return MountedFs(mnt, proc, ctl, log)
            except OSError:
                pass
        time.sleep(0.05)
    stop_daemon(MountedFs(mnt, proc, ctl, log) if ctl else None, mnt=mnt, proc=proc)
    raise RuntimeError(f"mount did not come up: {log.read_text()}")


def stop_daemon(m: MountedFs | None, mnt: Path | None = None,
                proc: subprocess.Popen | None = None) -> None:
    mnt = m.mnt if m else mnt
    proc = m.proc if m else proc
    if m is not None:
        m.ctl.close()
    if mnt is not None and os.path.ismount(mnt) or _stale(mnt):
        r = subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
        if r.returncode != 0:
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
    if proc is not None:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)


def _stale(mnt: Path | None) -> bool:
    if mnt is None:
        return False
    try:
        os.statvfs(mnt)         # stat() may be answered from cached attributes
        return False
    except OSError as e:
        return e.errno == 107   # ENOTCONN


FIXTURE = {
    "revision": 7,
    "nodes": {
        "/hello": {"data": "hello world\n", "mode": 0o644, "uid": 0, "gid": 0,
                   "mtime_ns": 1_700_000_000_123_456_789},
        "/services/db/primary": {"data": "db1.example:5432\n", "mode": 0o640, "uid": 0,
                                 "gid": 0},
        "/services/db/replicas": {"data": "db2\ndb3\n"},
        "/services/web/port": {"data": "8080\n"},
        "/secret": {"data": "s3cr3t\n", "mode": 0o600, "uid": 1000, "gid": 1000},
        "/empty": {"kind": "dir"},
        "/deep/a/b/c/leaf": {"data": "leaf\n"},
        "/" + "n" * 300: {"data": "too long for the kernel\n"},
        "/.afs": {"data": "collides with the reserved directory\n"},
    },
}


@pytest.fixture
def mount_base():
    """A world-traversable directory under /tmp (pytest's tmp_path is 0700, which would hide
    the mount from the uids of the permission tests). Removed only once nothing is mounted."""
    import tempfile
    base = Path(tempfile.mkdtemp(prefix="afs-fuse-test-", dir="/tmp"))
    os.chmod(base, 0o755)
    yield base
    for child in base.iterdir():
        if child.is_dir() and (os.path.ismount(child) or _stale(child)):
            return   # never rm -r through a mount; leave it for inspection
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def fuse_mount(mount_base):
    why = fuse_available()
    if why:
        pytest.skip(why)
    m = start_daemon(mount_base, FIXTURE)
    try:
        yield m
    finally:
        stop_daemon(m)


@pytest.fixture
def fuse_mount_factory(mount_base):
    why = fuse_available()
    if why:
        pytest.skip(why)
    started: list[MountedFs] = []

    def make(fixture: dict = FIXTURE, *extra: str, name: str = "mnt") -> MountedFs:
        m = start_daemon(mount_base, fixture, *extra, name=name)
        started.append(m)
        return m

    try:
        yield make
    finally:
        for m in started:
            stop_daemon(m)


# =============================================================================================
# The real agent (``afs agent``) in a subprocess against real server processes
# (tests/fuse/test_agent.py). Every agent is stopped and its mount point unmounted in teardown.
# =============================================================================================
def afs_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "afs_cli.main", *args]


class AgentProc:
    """One ``afs agent --mount`` subprocess with its own mount point and cache directory
    (``<base>/<name>/mnt`` and ``.../cache``), log in ``.../agent.log``."""

    def __init__(self, base: Path, endpoints: list[str], name: str = "agent"):
        self.dir = base / name
        self.mnt = self.dir / "mnt"
        self.cache = self.dir / "cache"
        self.log = self.dir / "agent.log"
        self.endpoints = list(endpoints)
        self.proc: subprocess.Popen | None = None
        self.dir.mkdir(exist_ok=True)
        os.chmod(self.dir, 0o755)
        try:
            self.mnt.mkdir()
        except FileExistsError:
            pass

    # ---- process control
    def start(self, wait: bool = True, endpoints: list[str] | None = None,
              env: dict | None = None, timeout: float = 20.0) -> "AgentProc":
        assert self.proc is None or self.proc.poll() is not None, "agent already running"
        eps = endpoints or self.endpoints
        with open(self.log, "ab") as lf:
            lf.write(f"---- test harness: start at {time.strftime('%H:%M:%S')}\n".encode())
            lf.flush()
            self.proc = subprocess.Popen(
                afs_argv("agent", "--endpoints", ",".join(eps), "--mount", str(self.mnt),
                         "--cache-dir", str(self.cache), "--log-level", "INFO"),
                stdout=lf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=dict(os.environ, PYTHONPATH=str(REPO), **(env or {})),
                start_new_session=True)
        if wait:
            self.wait_mounted(timeout)
        return self

    def wait_mounted(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            if self.mounted():
                try:
                    os.getxattr(self.p("/.afs/status"), "user.afs.revision")
                    return
                except OSError:
                    pass
            time.sleep(0.02)
        raise RuntimeError(f"agent did not mount within {timeout}s:\n{self.log_text()[-3000:]}")

    def mounted(self) -> bool:
        return os.path.ismount(self.mnt) and not _stale(self.mnt)

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill9(self) -> None:
        """SIGKILL: leaves a dead mount (ENOTCONN) behind, as a crashed agent would."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGKILL)
                self.proc.wait(timeout=10)
        if os.path.ismount(self.mnt) or _stale(self.mnt) or _in_mount_table(self.mnt):
            r = subprocess.run(["fusermount3", "-u", str(self.mnt)], capture_output=True)
            if r.returncode != 0:
                subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True)

    # ---- reading through the mount
    def p(self, path: str) -> str:
        return str(self.mnt) + path

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def status(self) -> dict:
        with open(self.p("/.afs/status"), "rb") as f:
            return json.loads(f.read())

    def revision(self) -> int:
        """The revision the mount serves (``user.afs.revision`` of the root: never cached by
        the kernel, so it is the agent's current revision)."""
        return int(os.getxattr(str(self.mnt), "user.afs.revision"))

    def wait_revision(self, revision: int, timeout: float = 10.0) -> int:
        deadline = time.monotonic() + timeout
        while True:
            try:
                rev = self.revision()
                if rev >= revision:
                    return rev
            except OSError:
                rev = None
            if time.monotonic() > deadline:
                raise AssertionError(f"agent stuck at revision {rev}, wanted {revision}:\n"
                                     f"{self.log_text()[-2000:]}")
            time.sleep(0.005)


def _in_mount_table(mnt: Path) -> bool:
    """True if ``mnt`` is listed in /proc/self/mounts (also a dead mount that stat cannot see)."""
    want = os.path.abspath(mnt)
    try:
        with open("/proc/self/mounts") as f:
            return any(line.split()[1] == want for line in f if len(line.split()) > 1)
    except OSError:
        return False


def _fuse_skip():
    why = fuse_available()
    if why:
        pytest.skip(why)


def _new_base(prefix: str) -> Path:
    import tempfile
    base = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(base, 0o755)           # other uids must reach the mount points
    return base


def _rm_base(base: Path) -> None:
    for d in base.rglob("mnt"):
        if os.path.ismount(d) or _stale(d):
            return                  # never rm -r through a mount; leave it for inspection
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def agent_cluster():
    """One 3-member cluster (real processes, fsync on) per test module, for tests that do not
    kill members. Tests use their own subtrees."""
    _fuse_skip()
    from afs.testing.cluster import ProcessCluster
    base = _new_base("afs-agent-cl-")
    cl = ProcessCluster(base / "cluster", size=3)
    try:
        cl.start()
        cl.wait_for_leader(20)
        yield cl
    finally:
        cl.stop_all()
        _rm_base(base)


@pytest.fixture
def make_cluster(mount_base):
    """A fresh 3-member cluster for tests that kill or restart members."""
    _fuse_skip()
    from afs.testing.cluster import ProcessCluster
    made = []

    def make(size: int = 3):
        cl = ProcessCluster(mount_base / f"cluster{len(made)}", size=size)
        made.append(cl)
        cl.start()
        cl.wait_for_leader(20)
        return cl

    try:
        yield make
    finally:
        for cl in made:
            cl.stop_all()


@pytest.fixture
def agent_factory(mount_base):
    """``agent_factory(endpoints, name="agent", start=True)`` -> a started :class:`AgentProc`.
    Teardown: SIGTERM (SIGKILL after 10 s) each agent, then unmount what is left."""
    _fuse_skip()
    made: list[AgentProc] = []

    def make(endpoints: list[str], name: str = "agent", start: bool = True, **kw) -> AgentProc:
        a = AgentProc(mount_base, endpoints, name)
        made.append(a)
        if start:
            a.start(**kw)
        return a

    try:
        yield make
    finally:
        for a in made:
            a.cleanup()
