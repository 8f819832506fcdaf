"""The three systems of the side-by-side benchmark, each as a 3-member cluster on 127.0.0.1.

- :class:`EtcdCluster`: Debian's ``etcd`` (durable defaults: fsync on), driven through its v3
  HTTP/JSON gateway with :class:`EtcdHttp` (plain :mod:`http.client`, no protobuf).
- :class:`ZkCluster`: Debian's ZooKeeper (``QuorumPeerMain``; durable default ``forceSync=yes``),
  driven with kazoo. ``maxClientCnxns=0`` (no per-IP connection cap) so the 1,000-watcher
  fan-out can connect from one address; nothing about durability is changed.
- :class:`AfsSystem`: 3 ``afs server`` processes (:class:`afs.testing.cluster.ProcessCluster`,
  fsync on) plus ``afs agent`` processes with FUSE mounts.

Every process is started in its own session (a Ctrl-C for the benchmark does not reach it),
logs to a file under the system's directory, and is stopped by PID (SIGTERM, SIGKILL after a
timeout) by ``stop()`` — which is idempotent and also runs at interpreter exit.
"""
from __future__ import annotations

import atexit
import base64
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import weakref

from bench import peer_setup

_LIVE: "weakref.WeakSet[ProcGroup]" = weakref.WeakSet()


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_port(port: int, timeout: float, proc: subprocess.Popen | None = None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def rss_bytes(pid: int) -> int | None:
    """Resident set size of a process (VmRSS), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def dir_bytes(path: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def _tail(path: str, n: int = 30) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 32768))
            return "\n".join(fh.read().decode("utf-8", "replace").splitlines()[-n:])
    except OSError as exc:
        return f"(no log: {exc})"


class ProcGroup:
    """Processes started by this benchmark; stopped by PID only."""

    def __init__(self):
        self.procs: list[tuple[str, subprocess.Popen, str]] = []
        _LIVE.add(self)

    def spawn(self, name: str, argv: list[str], log_path: str, cwd: str | None = None,
              env: dict | None = None) -> subprocess.Popen:
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        with open(log_path, "ab") as logf:
            p = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, cwd=cwd,
                                 env={**os.environ, **(env or {})}, start_new_session=True)
        self.procs.append((name, p, log_path))
        return p

    @staticmethod
    def stop_proc(p: subprocess.Popen, timeout: float = 10.0) -> int | None:
        if p.poll() is not None:
            return p.returncode
        try:
            os.kill(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            return p.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                os.kill(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return p.wait()

    def stop_all(self, timeout: float = 10.0) -> None:
        live = [p for _, p, _ in self.procs if p.poll() is None]
        for p in live:
            try:
                os.kill(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        for p in live:
            try:
                p.wait(max(0.05, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.kill(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()


@atexit.register
def _stop_leftovers() -> None:
    for g in list(_LIVE):
        try:
            g.stop_all(timeout=5.0)
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


# ============================================================================ etcd

def _b64(b: bytes | str) -> str:
    if isinstance(b, str):
        b = b.encode()
    return base64.b64encode(b).decode()


class EtcdHttp:
    """A blocking etcd v3 client over the HTTP/JSON gateway (one keep-alive connection)."""

    def __init__(self, port: int, timeout: float = 10.0):
        self.port = port
        self.timeout = timeout
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        self.conn.connect()
        self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def call(self, path: str, body: dict) -> dict:
        payload = json.dumps(body)
        try:
            self.conn.request("POST", path, payload, {"Content-Type": "application/json"})
            r = self.conn.getresponse()
            data = r.read()
        except (OSError, http.client.HTTPException):
            self.conn.close()
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            raise
        if r.status != 200:
            raise RuntimeError(f"etcd {path}: HTTP {r.status}: {data[:300]!r}")
        return json.loads(data)

    def put(self, key: str, value: bytes) -> int:
        return int(self.call("/v3/kv/put", {"key": _b64(key), "value": _b64(value)})["header"]["revision"])

    def get(self, key: str, serializable: bool = False) -> bytes | None:
        body = {"key": _b64(key)}
        if serializable:
            body["serializable"] = True
        res = self.call("/v3/kv/range", body)
        kvs = res.get("kvs") or []
        return base64.b64decode(kvs[0].get("value", "")) if kvs else None

    def status(self) -> dict:
        return self.call("/v3/maintenance/status", {})

    def close(self) -> None:
        self.conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class EtcdWatchStream:
    """A blocking watch of one key through the gateway; yields ``(value, mod_revision)``."""

    def __init__(self, port: int, key: str, start_revision: int | None = None):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=None)
        req = {"create_request": {"key": _b64(key)}}
        if start_revision:
            req["create_request"]["start_revision"] = str(start_revision)
        self.conn.request("POST", "/v3/watch", json.dumps(req), {"Content-Type": "application/json"})
        self.resp = self.conn.getresponse()
        if self.resp.status != 200:
            raise RuntimeError(f"etcd watch: HTTP {self.resp.status}")

    def events(self):
        while True:
            line = self.resp.readline()
            if not line:
                return
            line = line.strip()
            if not line:
                continue
            msg = json.loads(line)
            res = msg.get("result") or {}
            for ev in res.get("events") or []:
                kv = ev.get("kv") or {}
                yield base64.b64decode(kv.get("value", "")), int(kv.get("mod_revision", 0))

    def close(self) -> None:
        try:
            if self.conn.sock is not None:
                self.conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.conn.close()


class EtcdCluster:
    name = "etcd"

    def __init__(self, base_dir: str, size: int = 3):
        self.base_dir = base_dir
        self.size = size
        ports = free_ports(2 * size)
        self.client_ports = ports[:size]
        self.peer_ports = ports[size:]
        self.names = [f"e{i}" for i in range(1, size + 1)]
        self.group = ProcGroup()
        self.procs: list[subprocess.Popen] = []

    def start(self, timeout: float = 30.0) -> None:
        binary = peer_setup.etcd_binary()
        initial = ",".join(f"{n}=http://127.0.0.1:{p}" for n, p in zip(self.names, self.peer_ports))
        for n, cp, pp in zip(self.names, self.client_ports, self.peer_ports):
            d = os.path.join(self.base_dir, n)
            os.makedirs(d, exist_ok=True)
            argv = [binary, "--name", n, "--data-dir", os.path.join(d, "data"),
                    "--listen-client-urls", f"http://127.0.0.1:{cp}",
                    "--advertise-client-urls", f"http://127.0.0.1:{cp}",
                    "--listen-peer-urls", f"http://127.0.0.1:{pp}",
                    "--initial-advertise-peer-urls", f"http://127.0.0.1:{pp}",
                    "--initial-cluster", initial, "--initial-cluster-state", "new",
                    "--initial-cluster-token", "afs-bench", "--logger", "zap",
                    "--log-level", "warn"]
            self.procs.append(self.group.spawn(n, argv, os.path.join(d, "etcd.log")))
        deadline = time.monotonic() + timeout
        for n, cp, p in zip(self.names, self.client_ports, self.procs):
            if not wait_port(cp, max(0.1, deadline - time.monotonic()), p):
                raise RuntimeError(f"etcd {n} did not start:\n{_tail(os.path.join(self.base_dir, n, 'etcd.log'))}")
        self.wait_leader(max(1.0, deadline - time.monotonic()))

    def wait_leader(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                return self.leader_index()
            except Exception as exc:  # noqa: BLE001 - retry until the deadline
                last = exc
                time.sleep(0.2)
        raise RuntimeError(f"etcd: no leader within {timeout:.0f}s ({last})")

    def leader_index(self) -> int:
        ids = {}
        leader = None
        for i, cp in enumerate(self.client_ports):
            with EtcdHttp(cp, timeout=2.0) as c:
                st = c.status()
            ids[st["header"]["member_id"]] = i
            leader = st.get("leader") or leader
        if leader not in ids:
            raise RuntimeError("no leader yet")
        # writes succeed only with a working quorum
        with EtcdHttp(self.client_ports[ids[leader]], timeout=5.0) as c:
            c.put("/bench/ready", b"1")
        return ids[leader]

    def client(self, i: int) -> EtcdHttp:
        return EtcdHttp(self.client_ports[i])

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def stop(self) -> None:
        self.group.stop_all()


# ============================================================================ ZooKeeper

def zk_four_letter(port: int, cmd: str = "srvr", timeout: float = 2.0) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(cmd.encode())
        chunks = []
        while True:
            b = s.recv(4096)
            if not b:
                break
            chunks.append(b)
    return b"".join(chunks).decode("utf-8", "replace")


class ZkCluster:
    name = "zookeeper"

    def __init__(self, base_dir: str, size: int = 3):
        self.base_dir = base_dir
        self.size = size
        ports = free_ports(3 * size)
        self.client_ports = ports[:size]
        self.quorum_ports = ports[size:2 * size]
        self.election_ports = ports[2 * size:]
        self.group = ProcGroup()
        self.procs: list[subprocess.Popen] = []

    def start(self, timeout: float = 60.0) -> None:
        java = peer_setup.java_binary()
        servers = "\n".join(f"server.{i}=127.0.0.1:{q}:{e}" for i, (q, e) in
                            enumerate(zip(self.quorum_ports, self.election_ports), 1))
        for i, cp in enumerate(self.client_ports, 1):
            d = os.path.join(self.base_dir, f"z{i}")
            data = os.path.join(d, "data")
            conf = os.path.join(d, "conf")
            os.makedirs(data, exist_ok=True)
            os.makedirs(conf, exist_ok=True)
            with open(os.path.join(data, "myid"), "w") as fh:
                fh.write(f"{i}\n")
            cfg = os.path.join(conf, "zoo.cfg")
            with open(cfg, "w") as fh:
                fh.write(f"tickTime=2000\ninitLimit=10\nsyncLimit=5\ndataDir={data}\n"
                         f"clientPort={cp}\nclientPortAddress=127.0.0.1\nmaxClientCnxns=0\n"
                         f"admin.enableServer=false\n4lw.commands.whitelist=srvr,mntr,ruok\n"
                         f"{servers}\n")
            cp_jars = peer_setup.zookeeper_classpath(conf)
            if os.path.exists("/usr/share/java/slf4j-simple.jar"):
                cp_jars += ":/usr/share/java/slf4j-simple.jar"
            argv = [java, "-Dorg.slf4j.simpleLogger.defaultLogLevel=warn",
                    f"-Dzookeeper.log.dir={d}", "-cp", cp_jars,
                    "org.apache.zookeeper.server.quorum.QuorumPeerMain", cfg]
            self.procs.append(self.group.spawn(f"z{i}", argv, os.path.join(d, "zk.log"), cwd=d))
        deadline = time.monotonic() + timeout
        for i, (cp, p) in enumerate(zip(self.client_ports, self.procs), 1):
            if not wait_port(cp, max(0.1, deadline - time.monotonic()), p):
                raise RuntimeError(f"zookeeper z{i} did not start:\n"
                                   f"{_tail(os.path.join(self.base_dir, f'z{i}', 'zk.log'))}")
        self.wait_leader(max(1.0, deadline - time.monotonic()))

    def modes(self) -> list[str | None]:
        out = []
        for cp in self.client_ports:
            try:
                txt = zk_four_letter(cp)
            except OSError:
                out.append(None)
                continue
            mode = None
            for line in txt.splitlines():
                if line.startswith("Mode:"):
                    mode = line.split(":", 1)[1].strip()
            out.append(mode)
        return out

    def wait_leader(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            modes = self.modes()
            if "leader" in modes and all(m in ("leader", "follower") for m in modes):
                return modes.index("leader")
            time.sleep(0.2)
        raise RuntimeError(f"zookeeper: no leader within {timeout:.0f}s (modes {self.modes()})")

    def leader_index(self) -> int:
        return self.wait_leader(10.0)

    def hosts(self, i: int) -> str:
        return f"127.0.0.1:{self.client_ports[i]}"

    def client(self, i: int, **kw):
        from kazoo.client import KazooClient
        zk = KazooClient(hosts=self.hosts(i), timeout=30.0, **kw)
        zk.start(timeout=30)
        return zk

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def stop(self) -> None:
        self.group.stop_all()


# ============================================================================ AFS

class AfsSystem:
    """3 ``afs server`` members (ProcessCluster, fsync on) and any number of agents."""

    name = "afs"

    def __init__(self, base_dir: str, size: int = 3):
        from afs.testing.cluster import ProcessCluster
        self.base_dir = base_dir
        self.cluster = ProcessCluster(os.path.join(base_dir, "servers"), size, fsync=True,
                                      log_level="WARNING")
        self.group = ProcGroup()
        self.agents: list[tuple[subprocess.Popen, str]] = []

    def start(self, timeout: float = 30.0) -> None:
        self.cluster.start()
        self.cluster.wait_for_leader(timeout)

    def leader_index(self) -> int:
        return self.cluster.names.index(self.cluster.wait_for_leader(15.0))

    def addr(self, i: int) -> str:
        return self.cluster.endpoints[i]

    def client(self, i: int | None = None, **kw):
        from afs.client import Client
        eps = self.cluster.endpoints if i is None else [self.cluster.endpoints[i]]
        kw.setdefault("timeout", 30.0)
        return Client(eps, **kw)

    def start_agent(self, name: str, endpoints: list[str], timeout: float = 30.0,
                    socket_path: str | None = None) -> tuple[subprocess.Popen, str]:
        d = os.path.join(self.base_dir, name)
        mnt = os.path.join(d, "mnt")
        os.makedirs(mnt, exist_ok=True)
        argv = [sys.executable, "-m", "afs_cli.main", "agent", "--endpoints", ",".join(endpoints),
                "--mount", mnt, "--cache-dir", os.path.join(d, "cache"), "--log-level", "WARNING"]
        if socket_path:
            argv += ["--socket", socket_path]
        p = self.group.spawn(name, argv, os.path.join(d, "agent.log"))
        self.agents.append((p, mnt))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if p.poll() is not None:
                raise RuntimeError(f"agent {name} exited ({p.returncode}):\n{_tail(os.path.join(d, 'agent.log'))}")
            if os.path.ismount(mnt) and os.path.exists(os.path.join(mnt, ".afs", "status")) \
                    and (not socket_path or os.path.exists(socket_path)):
                return p, mnt
            time.sleep(0.05)
        raise RuntimeError(f"agent {name} did not mount within {timeout:.0f}s")

    @staticmethod
    def agent_status(mnt: str) -> dict:
        with open(os.path.join(mnt, ".afs", "status"), "rb") as fh:
            return json.loads(fh.read())

    def wait_agent_revision(self, mnt: str, revision: int, timeout: float = 60.0) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            try:
                if self.agent_status(mnt).get("revision", -1) >= revision:
                    return time.monotonic() - t0
            except (OSError, ValueError):
                pass
            time.sleep(0.02)
        raise RuntimeError(f"agent at {mnt} did not reach revision {revision} in {timeout:.0f}s")

    def stop_agent(self, p: subprocess.Popen, mnt: str) -> None:
        ProcGroup.stop_proc(p, timeout=15.0)
        if os.path.ismount(mnt):
            subprocess.run([shutil.which("fusermount3") or "fusermount3", "-u", "-z", mnt],
                           capture_output=True)
        self.agents = [(q, m) for q, m in self.agents if q is not p]

    def pids(self) -> list[int]:
        return [m.pid for m in self.cluster.members.values() if m.pid]

    def stop(self) -> None:
        for p, mnt in list(self.agents):
            self.stop_agent(p, mnt)
        self.group.stop_all()
        self.cluster.stop_all()
