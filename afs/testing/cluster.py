"""A cluster of real ``afs server`` processes on 127.0.0.1, for integration tests, fault tests
and benchmarks.

Contract:
- Each member runs as ``[sys.executable, "-m", "afs_cli.main", "server", ...]`` in its own
  session (a Ctrl-C meant for the test runner does not reach it), with stdout+stderr appended
  to ``base_dir/<name>/server.log`` and its data in ``base_dir/<name>/data``. Addresses are
  fixed when the cluster object is built, so a restarted member comes back at the same
  addresses with the same data.
- Ports: ``base_port=None`` picks free ports (checked by binding each one); ``base_port=P``
  uses the ``afs dev-cluster`` layout: member i (1-based) listens on P+i (client), P+100+i
  (peer), P+200+i (HTTP).
- Every method that starts a member waits until its client port accepts connections; a member
  that exits before that raises :class:`ClusterError` carrying the tail of its log.
- :meth:`ProcessCluster.stop_all` is idempotent and is called by ``__exit__`` and at
  interpreter exit; it resumes paused members, sends SIGTERM, and SIGKILLs stragglers after
  ``timeout``. Only processes started by this object are ever signalled, always by PID.
- Threading: a ProcessCluster may be driven from several threads (a writer thread and a
  nemesis, say); process bookkeeping is guarded by one lock. Blocking waits happen outside it.

Example::

    with ProcessCluster(tmp_path) as cl:
        cl.start()
        leader = cl.wait_for_leader(15)
        with cl.client() as c:
            c.put("/a", b"1")
        cl.kill(leader)                       # SIGKILL
        cl.wait_for_leader(15)
        cl.restart(leader)
"""
from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

from afs import errors

__all__ = ["ClusterError", "Member", "ProcessCluster", "free_ports", "wait_for_port"]

_LIVE: "weakref.WeakSet[ProcessCluster]" = weakref.WeakSet()


class ClusterError(RuntimeError):
    """The harness could not bring the cluster into the requested state (the message carries
    the relevant log tail)."""


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct TCP ports that were free a moment ago (bound then released together, so
    they are distinct; another process may still take one before it is used)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _can_connect(addr: str, timeout: float = 0.2) -> bool:
    host, _, port = addr.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_port(addr: str, timeout: float, proc: subprocess.Popen | None = None) -> bool:
    """Wait until ``addr`` (HOST:PORT) accepts TCP connections. Returns False on timeout or
    when ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        if _can_connect(addr):
            return True
        time.sleep(0.05)
    return False


def _tail(path: str, lines: int) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 64 * 1024))
            text = fh.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class Member:
    """One member's fixed identity and its current process (``None`` when never started)."""

    name: str
    client_addr: str
    peer_addr: str
    http_addr: str | None
    dir: str
    proc: subprocess.Popen | None = field(default=None, repr=False)
    paused: bool = False
    starts: int = 0

    @property
    def data_dir(self) -> str:
        return os.path.join(self.dir, "data")

    @property
    def log_path(self) -> str:
        return os.path.join(self.dir, "server.log")

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        """The process exists and has not exited (a paused member is running)."""
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc is not None else None

    def log_text(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as fh:
                return fh.read()
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = 30) -> str:
        return _tail(self.log_path, lines)


class ProcessCluster:
    """``size`` real server processes. See the module docstring for the contract."""

    def __init__(self, base_dir: str | os.PathLike, size: int = 3, *, base_port: int | None = None,
                 fsync: bool = True, extra_args: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
                 env: Mapping[str, str] | None = None, http: bool = True, log_level: str = "INFO",
                 startup_timeout: float = 20.0, cluster_id: str | None = None):
        if size < 1:
            raise ValueError("size must be >= 1")
        self.base_dir = os.path.abspath(os.fspath(base_dir))
        self.size = size
        self.fsync = fsync
        self.extra_args = extra_args
        self.env = dict(env or {})
        self.log_level = log_level
        self.startup_timeout = startup_timeout
        self.cluster_id = cluster_id
        self._lock = threading.RLock()
        names = [f"n{i}" for i in range(1, size + 1)]
        if base_port is None:
            ports = free_ports(3 * size)
            client = dict(zip(names, ports[:size]))
            peer = dict(zip(names, ports[size:2 * size]))
            httpp = dict(zip(names, ports[2 * size:]))
        else:
            client = {n: base_port + i for i, n in enumerate(names, 1)}
            peer = {n: base_port + 100 + i for i, n in enumerate(names, 1)}
            httpp = {n: base_port + 200 + i for i, n in enumerate(names, 1)}
        self.members: dict[str, Member] = {
            n: Member(n, f"127.0.0.1:{client[n]}", f"127.0.0.1:{peer[n]}",
                      f"127.0.0.1:{httpp[n]}" if http else None, os.path.join(self.base_dir, n))
            for n in names}
        self.initial_cluster = ",".join(f"{n}={m.peer_addr}" for n, m in self.members.items())
        _LIVE.add(self)

    # ------------------------------------------------------------ addresses
    @property
    def names(self) -> list[str]:
        return list(self.members)

    @property
    def endpoints(self) -> list[str]:
        """Client addresses of every member (running or not), in name order."""
        return [m.client_addr for m in self.members.values()]

    def member(self, name: str) -> Member:
        try:
            return self.members[name]
        except KeyError:
            raise KeyError(f"no member {name!r} (members: {', '.join(self.members)})") from None

    def running(self) -> list[str]:
        return [n for n, m in self.members.items() if m.running]

    # ------------------------------------------------------------ processes
    def command(self, name: str) -> list[str]:
        """The argv that starts member ``name``."""
        m = self.member(name)
        argv = [sys.executable, "-m", "afs_cli.main", "server", "--name", name,
                "--data-dir", m.data_dir, "--client-addr", m.client_addr,
                "--peer-addr", m.peer_addr, "--initial-cluster", self.initial_cluster,
                "--log-level", self.log_level]
        if m.http_addr:
            argv += ["--http-addr", m.http_addr]
        if not self.fsync:
            argv.append("--unsafe-no-fsync")
        extra = self.extra_args
        if isinstance(extra, Mapping):
            extra = extra.get(name, ())
        argv += list(extra or ())
        return argv

    def _spawn(self, name: str) -> Member:
        m = self.member(name)
        with self._lock:
            if m.running:
                raise ClusterError(f"{name} is already running (pid {m.pid})")
            os.makedirs(m.dir, exist_ok=True)
            env = dict(os.environ)
            env.update(self.env)
            env.setdefault("PYTHONUNBUFFERED", "1")
            if self.cluster_id:
                env["AFS_SERVER_CLUSTER_ID"] = self.cluster_id
            m.starts += 1
            with open(m.log_path, "ab") as logf:
                logf.write(f"---- harness: start #{m.starts} of {name} at {time.strftime('%H:%M:%S')}\n".encode())
                logf.flush()
                m.proc = subprocess.Popen(self.command(name), stdout=logf, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, env=env, cwd=self.base_dir,
                                          start_new_session=True)
            m.paused = False
        return m

    def _wait_up(self, names: Iterable[str], timeout: float | None = None) -> None:
        deadline = time.monotonic() + (self.startup_timeout if timeout is None else timeout)
        for name in names:
            m = self.member(name)
            ok = wait_for_port(m.client_addr, max(0.0, deadline - time.monotonic()), m.proc)
            if not ok:
                if m.proc is not None and m.proc.poll() is not None:
                    raise ClusterError(f"{name} exited with code {m.proc.returncode} during start-up; "
                                       f"log tail:\n{m.tail(40)}")
                raise ClusterError(f"{name} did not open {m.client_addr} within the start-up timeout; "
                                   f"log tail:\n{m.tail(40)}")

    def _check_ports(self, names: Iterable[str]) -> None:
        for name in names:
            m = self.member(name)
            if m.starts:
                continue   # our own previous process: the port may linger in TIME_WAIT
            for addr in (m.client_addr, m.peer_addr, m.http_addr):
                if addr and not _port_free(int(addr.rpartition(":")[2])):
                    raise ClusterError(f"{name}: port of {addr} is already in use")

    def start(self, names: Iterable[str] | None = None, wait: bool = True) -> "ProcessCluster":
        """Start the given members (default: every member not running) and wait until each
        accepts client connections. Does not wait for a leader (see :meth:`wait_for_leader`)."""
        names = [n for n in (names or self.names) if not self.member(n).running]
        os.makedirs(self.base_dir, exist_ok=True)
        self._check_ports(names)
        for n in names:
            self._spawn(n)
        if wait:
            self._wait_up(names)
        return self

    def kill(self, name: str, sig: int = signal.SIGKILL, wait: float | None = 10.0) -> int | None:
        """Send ``sig`` to the member (by PID). For SIGKILL/SIGTERM/SIGINT waits up to ``wait``
        seconds for the exit and returns the exit code (negative: killed by that signal)."""
        m = self.member(name)
        with self._lock:
            if not m.running:
                return m.returncode
            if m.paused and sig not in (signal.SIGKILL, signal.SIGSTOP):
                os.kill(m.pid, signal.SIGCONT)
                m.paused = False
            os.kill(m.pid, sig)
            if sig == signal.SIGSTOP:
                m.paused = True
            elif sig == signal.SIGCONT:
                m.paused = False
        if sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT) and wait is not None:
            try:
                return m.proc.wait(wait)
            except subprocess.TimeoutExpired:
                return None
        return None

    def pause(self, name: str) -> None:
        """SIGSTOP: the member freezes (its sockets stay open; peers see silence)."""
        self.kill(name, signal.SIGSTOP)

    def resume(self, name: str) -> None:
        """SIGCONT a paused member."""
        self.kill(name, signal.SIGCONT)

    def stop(self, name: str, timeout: float = 15.0) -> int | None:
        """SIGTERM and wait (SIGKILL after ``timeout``). Returns the exit code (None if the
        member was never started)."""
        m = self.member(name)
        if m.proc is None:
            return None
        if not m.running:
            return m.returncode
        rc = self.kill(name, signal.SIGTERM, wait=timeout)
        if rc is None and m.running:
            self.kill(name, signal.SIGKILL, wait=timeout)
            return m.returncode
        return rc

    def restart(self, name: str, sig: int = signal.SIGTERM, wait: bool = True) -> Member:
        """Stop the member (``sig``: SIGTERM = clean stop, SIGKILL = crash) if it runs, then
        start it again with the same data directory and addresses."""
        m = self.member(name)
        if m.running:
            if sig == signal.SIGTERM:
                self.stop(name)
            else:
                self.kill(name, sig)
        self.start([name], wait=wait)
        return m

    def stop_all(self, timeout: float = 10.0, sig: int = signal.SIGTERM) -> dict[str, int | None]:
        """Stop every running member: ``sig`` to all at once (paused ones are resumed first),
        wait up to ``timeout`` seconds in total, SIGKILL stragglers. Idempotent. Returns the
        exit codes by name."""
        with self._lock:
            live = [m for m in self.members.values() if m.running]
            for m in live:
                try:
                    if m.paused and sig != signal.SIGKILL:
                        os.kill(m.pid, signal.SIGCONT)
                        m.paused = False
                    os.kill(m.pid, sig)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + timeout
        for m in live:
            try:
                m.proc.wait(max(0.05, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with open(m.log_path, "ab") as logf:
                    logf.write(f"---- harness: {m.name} did not stop within {timeout:g}s; SIGKILL\n".encode())
                try:
                    os.kill(m.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                m.proc.wait()
        return {n: m.returncode for n, m in self.members.items()}

    def kill_all(self, sig: int = signal.SIGKILL) -> dict[str, int | None]:
        """Crash every member at once (SIGKILL by default)."""
        return self.stop_all(sig=sig)

    # ------------------------------------------------------------ cluster state
    def client(self, **kw):
        """An :class:`afs.client.Client` over every member's endpoint (``endpoints=`` in ``kw``
        overrides; default ``timeout`` 10 s)."""
        from afs.client import Client
        endpoints = kw.pop("endpoints", None) or self.endpoints
        kw.setdefault("timeout", 10.0)
        return Client(endpoints, **kw)

    def member_client(self, name: str, **kw):
        """A Client that talks to member ``name`` only (for stale reads from that member)."""
        return self.client(endpoints=[self.member(name).client_addr], **kw)

    def status(self, names: Iterable[str] | None = None, timeout: float = 2.0) -> dict[str, dict]:
        """Each member's status dict (docs/protocol.md) or ``{"error": reason}``."""
        from afs.client import Client
        out: dict[str, dict] = {}
        for name in (names or self.names):
            m = self.member(name)
            if not m.running:
                out[name] = {"error": "not running" if m.proc is None else f"exited ({m.returncode})"}
                continue
            if m.paused:
                out[name] = {"error": "paused"}
                continue
            try:
                with Client([m.client_addr], timeout=timeout, connect_timeout=min(1.0, timeout)) as c:
                    out[name] = c.status(m.client_addr, timeout=timeout)
            except errors.AfsError as exc:
                out[name] = {"error": exc.message}
        return out

    def leader(self, names: Iterable[str] | None = None) -> str | None:
        """The leader that a majority of the cluster currently agrees on (the leader itself
        reports role ``leader``), or None."""
        st = self.status(names)
        votes: dict[str, int] = {}
        for s in st.values():
            if "error" not in s and s.get("leader"):
                votes[s["leader"]] = votes.get(s["leader"], 0) + 1
        quorum = self.size // 2 + 1
        for name, n in sorted(votes.items(), key=lambda kv: -kv[1]):
            ls = st.get(name) or {}
            if n >= quorum and ls.get("role") == "leader":
                return name
        return None

    def wait_for_leader(self, timeout: float = 20.0, exclude: Iterable[str] = ()) -> str:
        """Wait until a majority agrees on a leader (not in ``exclude``) and return its name.
        Raises ClusterError (with the log tails) on timeout or when a member died."""
        exclude = set(exclude)
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            name = self.leader()
            if name and name not in exclude:
                return name
            if time.monotonic() >= deadline:
                raise ClusterError(f"no leader within {timeout:g}s; status: {self.status()}\n"
                                   f"{self.tail_logs()}")
            time.sleep(0.1)

    def wait_for_revision(self, revision: int, names: Iterable[str] | None = None,
                          timeout: float = 15.0) -> None:
        """Wait until every given (default: running) member has applied ``revision``."""
        names = list(names or self.running())
        deadline = time.monotonic() + timeout
        while True:
            st = self.status(names)
            behind = {n: s.get("revision", s.get("error")) for n, s in st.items()
                      if s.get("revision", -1) < revision}
            if not behind:
                return
            if time.monotonic() >= deadline:
                raise ClusterError(f"members did not reach revision {revision} within {timeout:g}s: "
                                   f"{behind}\n{self.tail_logs()}")
            time.sleep(0.05)

    def wait_converged(self, names: Iterable[str] | None = None, timeout: float = 15.0) -> int:
        """Wait until the given (default: running) members report the same revision and
        applied index; return that revision."""
        names = list(names or self.running())
        deadline = time.monotonic() + timeout
        while True:
            st = self.status(names)
            revs = {s.get("revision") for s in st.values()}
            applied = {s.get("applied_index") for s in st.values()}
            commits = {s.get("commit_index") for s in st.values()}
            if (not any("error" in s for s in st.values()) and len(revs) == 1
                    and len(applied) == 1 and applied == commits):
                return revs.pop()
            if time.monotonic() >= deadline:
                raise ClusterError(f"members did not converge within {timeout:g}s: "
                                   f"{ {n: (s.get('revision'), s.get('applied_index'), s.get('error')) for n, s in st.items()} }")
            time.sleep(0.05)

    def _check_alive(self) -> None:
        dead = [m for m in self.members.values()
                if m.proc is not None and m.proc.poll() is not None and m.proc.returncode > 0]
        if dead:
            m = dead[0]
            raise ClusterError(f"{m.name} exited with code {m.returncode}; log tail:\n{m.tail(40)}")

    def tail_logs(self, lines: int = 25, names: Iterable[str] | None = None) -> str:
        """The last ``lines`` of each member's log, for failure messages."""
        parts = []
        for name in (names or self.names):
            m = self.member(name)
            state = ("running" if m.running else f"exited {m.returncode}") if m.proc else "never started"
            parts.append(f"===== {name} (pid {m.pid}, {state}) {m.log_path}\n{m.tail(lines)}")
        return "\n".join(parts)

    # ------------------------------------------------------------ context manager
    def __enter__(self) -> "ProcessCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()


@atexit.register
def _stop_leftovers() -> None:
    for cl in list(_LIVE):
        try:
            cl.stop_all(timeout=5.0)
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            pass
