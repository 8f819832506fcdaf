"""Configuration dataclasses and the one loader that fills them.

Contract:
- Each config is a dataclass with defaults, a ``SECTION`` name (its table in the TOML config
  file) and an ``ENV_PREFIX``; ``validate()`` raises :class:`afs.errors.InvalidInput` with one
  clear line naming the field, and returns ``self`` so calls chain.
- Precedence, highest first: explicit overrides (CLI flags) > environment ``AFS_*`` > config
  file > dataclass default. ``None`` in overrides means "not given".
- Config file: TOML. Path from the ``config_file`` argument, else ``$AFS_CONFIG``, else none
  (a missing *explicit* file is an error; nothing is read implicitly).
- Nothing here opens sockets or starts threads. Other configs (server, agent) add a dataclass
  here and reuse :func:`load`.

Example file::

    [client]
    endpoints = ["10.0.0.1:7001", "10.0.0.2:7001", "10.0.0.3:7001"]
    timeout = 5.0
"""
from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from typing import Any, Mapping, TypeVar

from afs.errors import InvalidInput

DEFAULT_ENDPOINTS = ("127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003")
#: an endpoint ``unix:/path`` is a unix socket (the agent's local watch socket)
UNIX_PREFIX = "unix:"

T = TypeVar("T")


def parse_endpoint(text: str) -> tuple[str, int]:
    """``"host:port"`` (or ``"[v6]:port"``) -> ``(host, port)``; InvalidInput if malformed."""
    s = str(text).strip()
    host, sep, port_s = s.rpartition(":")
    if not sep or not host or not port_s.isdigit():
        raise InvalidInput(f"bad endpoint {text!r}: expected HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    port = int(port_s)
    if not 0 < port < 65536:
        raise InvalidInput(f"bad endpoint {text!r}: port out of range")
    return host, port


def parse_endpoints(value: Any) -> list[str]:
    """A comma-separated string or a list of strings -> list of ``host:port`` strings
    (or ``unix:/path`` for a unix socket, e.g. the agent's local watch socket)."""
    if isinstance(value, str):
        items = [p.strip() for p in value.split(",")]
    elif isinstance(value, (list, tuple)):
        items = [str(p).strip() for p in value]
    else:
        raise InvalidInput(f"bad endpoints {value!r}: expected 'host:port,host:port'")
    items = [p for p in items if p]
    for p in items:
        if p.startswith(UNIX_PREFIX):
            if len(p) == len(UNIX_PREFIX):
                raise InvalidInput(f"bad endpoint {p!r}: expected unix:/path/to/socket")
            continue
        parse_endpoint(p)
    return items


@dataclass
class ClientConfig:
    """How a client (the CLI, :class:`afs.client.Client`) reaches the cluster."""

    SECTION = "client"
    ENV_PREFIX = "AFS_"

    #: client addresses of the members, tried in order to find the leader
    endpoints: list[str] = field(default_factory=lambda: list(DEFAULT_ENDPOINTS))
    #: overall deadline of one call, retries included (seconds)
    timeout: float = 5.0
    #: deadline of one TCP connect (seconds)
    connect_timeout: float = 1.0

    def validate(self) -> "ClientConfig":
        self.endpoints = parse_endpoints(self.endpoints)
        if not self.endpoints:
            raise InvalidInput("endpoints: at least one HOST:PORT is required")
        for name in ("timeout", "connect_timeout"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise InvalidInput(f"{name}: must be a positive number of seconds, got {v!r}")
            setattr(self, name, float(v))
        return self


def _coerce(cls, name: str, raw: Any, source: str) -> Any:
    """Convert a string from the environment to the field's type (files are already typed)."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    if not isinstance(raw, str):
        return raw
    typ = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if typ == "float":
            return float(raw)
        if typ == "int":
            return int(raw, 0)
        if typ == "bool":
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
    except ValueError:
        raise InvalidInput(f"{source}: cannot parse {raw!r} as {typ}") from None
    return raw


def read_file(path: str | os.PathLike) -> dict:
    """Parse a TOML config file; InvalidInput with the reason if unreadable or malformed."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise InvalidInput(f"config file not found: {os.fspath(path)}") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise InvalidInput(f"config file {os.fspath(path)}: {exc}") from None


def load(cls: type[T], *, overrides: Mapping[str, Any] | None = None,
         config_file: str | os.PathLike | None = None,
         env: Mapping[str, str] | None = None) -> T:
    """Build and validate ``cls`` from flags > env > file > defaults (see module doc)."""
    env = os.environ if env is None else env
    names = [f.name for f in dataclasses.fields(cls)]
    values: dict[str, Any] = {}
    path = config_file if config_file is not None else (env.get("AFS_CONFIG") or None)
    if path is not None:
        section = read_file(path).get(cls.SECTION, {})
        if not isinstance(section, dict):
            raise InvalidInput(f"config file {os.fspath(path)}: [{cls.SECTION}] must be a table")
        unknown = sorted(set(section) - set(names))
        if unknown:
            raise InvalidInput(f"config file {os.fspath(path)}: unknown key "
                               f"{cls.SECTION}.{unknown[0]}")
        values.update(section)
    for name in names:
        key = cls.ENV_PREFIX + name.upper()
        if env.get(key) not in (None, ""):
            values[name] = _coerce(cls, name, env[key], key)
    for name, v in (overrides or {}).items():
        if v is not None:
            if name not in names:
                raise TypeError(f"{cls.__name__} has no field {name!r}")
            values[name] = _coerce(cls, name, v, f"--{name.replace('_', '-')}")
    return cls(**values).validate()


def load_client_config(**kwargs) -> ClientConfig:
    return load(ClientConfig, **kwargs)


def parse_initial_cluster(value: Any) -> dict[str, str]:
    """``"n1=127.0.0.1:7101,n2=..."`` (or a TOML table) -> ``{"n1": "127.0.0.1:7101", ...}``."""
    if isinstance(value, dict):
        items = [(str(k), str(v)) for k, v in value.items()]
    elif isinstance(value, str):
        items = []
        for part in (p.strip() for p in value.split(",")):
            if not part:
                continue
            name, sep, addr = part.partition("=")
            if not sep or not name.strip():
                raise InvalidInput(f"initial_cluster: bad entry {part!r}: expected NAME=HOST:PORT")
            items.append((name.strip(), addr.strip()))
    else:
        raise InvalidInput("initial_cluster: expected 'NAME=HOST:PORT,...'")
    out: dict[str, str] = {}
    for name, addr in items:
        parse_endpoint(addr)
        if name in out:
            raise InvalidInput(f"initial_cluster: member {name!r} listed twice")
        out[name] = addr
    if not out:
        raise InvalidInput("initial_cluster: at least one member is required")
    return out


@dataclass
class ServerConfig:
    """One cluster member (``afs server``). Raft timing lives in ``raft_*`` fields."""

    SECTION = "server"
    ENV_PREFIX = "AFS_SERVER_"

    name: str = ""
    data_dir: str = ""
    client_addr: str = "127.0.0.1:7001"
    peer_addr: str = "127.0.0.1:7101"
    #: founding members NAME=PEER_ADDR,...; on restart it is only checked against the stored cluster
    initial_cluster: Any = ""
    http_addr: str | None = None
    cluster_id: str = "afs"
    #: never set False outside benchmarks: acknowledged writes could be lost on power failure
    fsync: bool = True
    log_level: str = "INFO"
    request_timeout: float = 5.0
    #: watch history window
    history_revisions: int = 100_000
    history_bytes: int = 64 << 20
    #: idle watchers get the current revision this often (seconds)
    progress_interval: float = 1.0
    raft_tick_interval: float = 0.05
    raft_election_tick: int = 10
    raft_heartbeat_tick: int = 2
    raft_snapshot_every: int = 20_000
    limits: Any = None

    def validate(self) -> "ServerConfig":
        from afs.limits import Limits
        from afs.raft.node import NodeConfig
        if not self.name:
            raise InvalidInput("name: required (e.g. --name n1)")
        if not self.data_dir:
            raise InvalidInput("data_dir: required (e.g. --data-dir /var/lib/afs)")
        for f in ("client_addr", "peer_addr"):
            parse_endpoint(getattr(self, f))
        if self.http_addr:
            parse_endpoint(self.http_addr)
        if not isinstance(self.initial_cluster, dict):
            self.initial_cluster = parse_initial_cluster(self.initial_cluster or f"{self.name}={self.peer_addr}")
        if self.name not in self.initial_cluster:
            raise InvalidInput(f"initial_cluster: does not list this member {self.name!r}")
        if self.initial_cluster[self.name] != self.peer_addr:
            raise InvalidInput(f"initial_cluster: {self.name} is {self.initial_cluster[self.name]} "
                               f"but --peer-addr is {self.peer_addr}")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise InvalidInput(f"log_level: {self.log_level!r} is not DEBUG, INFO, WARNING or ERROR")
        for f in ("request_timeout", "progress_interval", "raft_tick_interval"):
            if not float(getattr(self, f)) > 0:
                raise InvalidInput(f"{f}: must be positive")
        if isinstance(self.limits, dict):
            self.limits = Limits(**self.limits)
        self.limits = (self.limits or Limits()).validate()
        self.raft = NodeConfig(tick_interval=float(self.raft_tick_interval),
                               election_tick=int(self.raft_election_tick),
                               heartbeat_tick=int(self.raft_heartbeat_tick),
                               snapshot_every=int(self.raft_snapshot_every))
        self.raft.validate()
        return self


@dataclass
class AgentConfig:
    """One host's agent (``afs agent``)."""

    SECTION = "agent"
    ENV_PREFIX = "AFS_AGENT_"

    endpoints: Any = field(default_factory=lambda: list(DEFAULT_ENDPOINTS))
    mountpoint: str | None = None
    cache_dir: str = "/var/lib/afs-agent"
    socket_path: str | None = None
    http_addr: str | None = None
    log_level: str = "INFO"
    #: kernel entry/attr cache lifetime for the mount (seconds); changes are invalidated explicitly
    entry_timeout: float = 3600.0
    #: how long the kernel may remember that a name does not exist (seconds)
    negative_timeout: float = 1.0
    allow_other: bool = True
    connect_timeout: float = 1.0

    def validate(self) -> "AgentConfig":
        self.endpoints = parse_endpoints(self.endpoints)
        if not self.endpoints:
            raise InvalidInput("endpoints: at least one HOST:PORT is required")
        if any(e.startswith(UNIX_PREFIX) for e in self.endpoints):
            raise InvalidInput("endpoints: the agent follows cluster members (HOST:PORT), not unix sockets")
        if not self.cache_dir:
            raise InvalidInput("cache_dir: required")
        if self.http_addr:
            parse_endpoint(self.http_addr)
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise InvalidInput(f"log_level: {self.log_level!r} is not DEBUG, INFO, WARNING or ERROR")
        return self
