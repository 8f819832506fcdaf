"""Network-namespace hosts for fault tests: each host is a namespace joined by a veth pair to a
private bridge, so a partition is an iptables DROP rule between two namespaces.

Contract:
- Everything this module creates is named with a per-run tag (``afs<tag>...``) and lives in a
  private subnet ``10.231.<n>.0/24`` (``n`` picked so no existing route uses it). The bridge
  has ``.254`` so the root namespace (the test driver) reaches every host; hosts are
  ``.1, .2, ...``. Traffic between hosts never leaves the bridge.
- iptables rules are added INSIDE the host namespaces only (INPUT and OUTPUT chains); the
  root namespace's rules are never touched. :meth:`NetnsNetwork.heal` flushes them;
  :meth:`NetnsNetwork.teardown` deletes the bridge, veths and namespaces (idempotent, also run at
  interpreter exit). Deleting a namespace deletes its rules and its veth end.
- Processes enter a host with ``nsenter --net=/run/netns/<ns>`` (network namespace only: the
  mount namespace stays shared, so a FUSE mount made by a host is visible to the driver and
  to data directories). ``nsenter`` execs, so the PID of a spawned process is the program's.
- :class:`NsCluster` is :class:`afs.testing.cluster.ProcessCluster` with one host per member
  (fixed ports inside each namespace). ``available()`` says why namespaces cannot be used
  (then callers fall back to 127.0.0.1 processes without partitions).
"""
from __future__ import annotations

import atexit
import os
import random
import shutil
import subprocess
import sys
import threading
import weakref
from typing import Iterable, Mapping, Sequence

from afs.testing.cluster import Member, ProcessCluster

__all__ = ["NetnsNetwork", "NsCluster", "available"]

_LIVE: "weakref.WeakSet[NetnsNetwork]" = weakref.WeakSet()


def _run(args: Sequence[str], check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({p.returncode}): {p.stderr.strip()}")
    return p


def available() -> str | None:
    """None if namespace hosts can be built here, else the reason they cannot."""
    if sys.platform != "linux":
        return "not Linux"
    if os.geteuid() != 0:
        return "not root"
    for tool in ("ip", "iptables", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    tag = f"afsprobe{os.getpid() % 100000}"
    p = _run(["ip", "netns", "add", tag], check=False)
    if p.returncode != 0:
        return f"ip netns add failed: {p.stderr.strip()}"
    try:
        q = _run(["ip", "netns", "exec", tag, "iptables", "-w", "-S"], check=False)
        if q.returncode != 0:
            return f"iptables in a namespace failed: {q.stderr.strip()}"
    finally:
        _run(["ip", "netns", "del", tag], check=False)
    return None


class NetnsNetwork:
    """A bridge plus one namespace per host. Not thread-safe for set-up; the fault methods
    (partition/cut/heal) are serialised by a lock."""

    def __init__(self, tag: str | None = None):
        self.tag = tag or f"{os.getpid() % 1000:03d}{random.randrange(100):02d}"
        self.bridge = f"afsbr{self.tag}"
        self.hosts: dict[str, str] = {}          # host name -> IP
        self._ns: dict[str, str] = {}            # host name -> namespace name
        self._veth: dict[str, str] = {}
        self.subnet: int | None = None
        self.rules: list[tuple[str, str, str]] = []   # (host, chain, peer ip) DROP rules in force
        self._lock = threading.Lock()
        self._up = False
        _LIVE.add(self)

    # ------------------------------------------------------------ set-up
    def _pick_subnet(self) -> int:
        """A 10.231.n.0/24 no route uses, claimed with an flock held while the network lives
        (concurrent runs on one machine never share a subnet)."""
        import fcntl
        routes = _run(["ip", "-4", "route"]).stdout + _run(["ip", "-4", "addr"]).stdout
        free = [n for n in range(1, 250) if f"10.231.{n}." not in routes]
        random.SystemRandom().shuffle(free)
        for n in free:
            fd = os.open(f"/run/afs-chaos-subnet-{n}.lock", os.O_CREAT | os.O_RDWR, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue
            self._lock_fd = fd
            return n
        raise RuntimeError("no free 10.231.x.0/24 subnet")

    def setup(self) -> "NetnsNetwork":
        self.subnet = self._pick_subnet()
        _run(["ip", "link", "add", self.bridge, "type", "bridge"])
        self._up = True
        _run(["ip", "addr", "add", f"10.231.{self.subnet}.254/24", "dev", self.bridge])
        _run(["ip", "link", "set", self.bridge, "up"])
        return self

    @property
    def gateway(self) -> str:
        return f"10.231.{self.subnet}.254"

    def add_host(self, name: str) -> str:
        """Create namespace + veth for ``name``; returns its IP."""
        i = len(self.hosts) + 1
        ns = f"afs{self.tag}-{name}"
        veth = f"afsv{self.tag}{i}"
        ip = f"10.231.{self.subnet}.{i}"
        _run(["ip", "netns", "add", ns])
        self._ns[name] = ns
        _run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns])
        self._veth[name] = veth
        _run(["ip", "link", "set", veth, "master", self.bridge, "up"])
        _run(["ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0"])
        _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        self.hosts[name] = ip
        return ip

    def exec_prefix(self, host: str) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self._ns[host]}", "--"]

    # ------------------------------------------------------------ faults
    def _ipt(self, host: str, *args: str) -> None:
        _run(["ip", "netns", "exec", self._ns[host], "iptables", "-w", *args])

    def cut(self, src: str, dst: str) -> None:
        """One-way: packets from ``src`` to ``dst`` are dropped (dst -> src still flows)."""
        with self._lock:
            self._ipt(src, "-A", "OUTPUT", "-d", self.hosts[dst], "-j", "DROP")
            self._ipt(dst, "-A", "INPUT", "-s", self.hosts[src], "-j", "DROP")
            self.rules.append((src, "->", dst))

    def partition(self, groups: Iterable[Iterable[str]]) -> None:
        """No traffic between hosts of different groups (hosts not named are untouched)."""
        groups = [list(g) for g in groups]
        for gi, g in enumerate(groups):
            for h in g:
                for gj, other in enumerate(groups):
                    if gi != gj:
                        for o in other:
                            self.cut(h, o)

    def isolate(self, host: str, others: Iterable[str] | None = None) -> None:
        others = [o for o in (others or self.hosts) if o != host]
        self.partition([[host], others])

    def heal(self) -> None:
        with self._lock:
            for host in self._ns:
                self._ipt(host, "-F", "INPUT")
                self._ipt(host, "-F", "OUTPUT")
            self.rules.clear()

    # ------------------------------------------------------------ teardown
    def teardown(self) -> None:
        """Delete everything created (idempotent; errors are ignored so all of it is tried)."""
        for name, veth in list(self._veth.items()):
            _run(["ip", "link", "del", veth], check=False)
            self._veth.pop(name, None)
        for name, ns in list(self._ns.items()):
            _run(["ip", "netns", "del", ns], check=False)
            self._ns.pop(name, None)
        if self._up:
            _run(["ip", "link", "del", self.bridge], check=False)
            self._up = False
        fd = getattr(self, "_lock_fd", None)
        if fd is not None:
            os.close(fd)
            self._lock_fd = None

    def __enter__(self) -> "NetnsNetwork":
        return self.setup()

    def __exit__(self, *exc) -> None:
        self.teardown()


@atexit.register
def _teardown_leftovers() -> None:
    for net in list(_LIVE):
        try:
            net.teardown()
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            pass


class NsCluster(ProcessCluster):
    """A ProcessCluster whose member ``nX`` runs in namespace host ``nX`` of ``net`` at
    ``<ip>:7001`` (client), ``:7101`` (peer), ``:7201`` (HTTP). ``member_env`` adds
    per-member environment variables (e.g. a sync-tracker state file)."""

    def __init__(self, net: NetnsNetwork, base_dir, size: int = 3, *,
                 member_env: Mapping[str, Mapping[str, str]] | None = None, **kw):
        super().__init__(base_dir, size, **kw)
        self.net = net
        self.member_env = {k: dict(v) for k, v in (member_env or {}).items()}
        for name, m in self.members.items():
            ip = net.hosts.get(name) or net.add_host(name)
            self.members[name] = Member(name, f"{ip}:7001", f"{ip}:7101",
                                        f"{ip}:7201" if m.http_addr else None, m.dir)
        self.initial_cluster = ",".join(f"{n}={m.peer_addr}" for n, m in self.members.items())

    def command(self, name: str) -> list[str]:
        env = [f"{k}={v}" for k, v in sorted(self.member_env.get(name, {}).items())]
        prefix = (["env", *env] if env else []) + self.net.exec_prefix(name)
        return prefix + super().command(name)

    def _check_ports(self, names) -> None:
        return None   # fresh namespaces: nothing else listens there


class LocalCluster(ProcessCluster):
    """The fallback without namespaces: 127.0.0.1 processes (no partitions possible), with the
    same per-member environment support as :class:`NsCluster`."""

    def __init__(self, base_dir, size: int = 3, *,
                 member_env: Mapping[str, Mapping[str, str]] | None = None, **kw):
        super().__init__(base_dir, size, **kw)
        self.member_env = {k: dict(v) for k, v in (member_env or {}).items()}

    def command(self, name: str) -> list[str]:
        env = [f"{k}={v}" for k, v in sorted(self.member_env.get(name, {}).items())]
        return (["env", *env] if env else []) + super().command(name)
