"""The blocking Python client of an AFS cluster.

Contract:
- :class:`Client` holds ONE TCP connection at a time (blocking socket, one request in flight)
  behind a lock, so a Client may be shared between threads; calls are serialised.
- Leader discovery: writes and linearizable reads go to the leader. The client tries the
  endpoint it last found to be the leader, else the endpoints in order; ``not_leader`` with
  ``details.leader_addr`` redirects at once (that address is used even if it is not one of
  ``endpoints``); ``not_leader`` without an address moves on to the next endpoint.
  ``stale=True`` reads go to whatever member is reachable (the current connection first).
- Retries: retryable errors (the :class:`~afs.errors.Unavailable` family) and connection
  failures are retried with jittered exponential backoff until ``timeout`` seconds after the
  call began; then :class:`~afs.errors.Unavailable` (or :class:`~afs.errors.Timeout` when the
  last attempt timed out) is raised naming the last failure. A write keeps the SAME
  ``(client_id, seq)`` across all its retries, so the cluster applies it at most once.
- Errors: every failure reaching the caller is an :class:`afs.errors.AfsError`. Error frames
  are rebuilt with :func:`afs.errors.from_wire` and socket/framing failures become Unavailable
  in :meth:`Client._call` — the one place network errors are translated.
- Input is validated before anything is sent (paths via :mod:`afs.paths`, ops and limits via
  :mod:`afs.ops`): bad input raises :class:`~afs.errors.InvalidInput` and never leaves the
  process.
- Results: reads return values with a ``revision`` attribute (the revision the answer
  reflects); writes return :class:`WriteResult` (``revision``; for txns ``succeeded`` and
  ``results``).
"""
from __future__ import annotations

import os
import random
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from afs import errors, ops, paths
from afs.config import UNIX_PREFIX, parse_endpoint, parse_endpoints
from afs.errors import AfsError, InvalidInput, NotLeader, Unavailable
from afs.limits import DEFAULT_LIMITS, Limits
from afs.model import Event, Stat
from afs.wire import FrameError, encode_frame, read_frame_sync

__all__ = ["Client", "WriteResult", "GetResult", "Listing", "Limits", "DEFAULT_LIMITS",
           "plan_batches", "request_size", "Watch", "WatchEvents"]

#: largest response frame accepted. Responses are not bounded by the request limit (a walk with
#: data of a large subtree can exceed 8 MiB); 256 MiB keeps one bound before allocation.
MAX_RESPONSE_FRAME = 256 << 20

_BACKOFF_START = 0.05
_BACKOFF_MAX = 1.0
_MAX_FREE_REDIRECTS = 3     # redirects followed without sleeping, per call


# ---------------------------------------------------------------- result types

class GetResult(tuple):
    """``(data, stat)`` — unpacks as a pair — with ``.revision`` (the revision it reflects)."""

    def __new__(cls, data: bytes, stat: Stat, revision: int):
        self = super().__new__(cls, (data, stat))
        self.revision = revision
        return self

    @property
    def data(self) -> bytes:
        return self[0]

    @property
    def stat(self) -> Stat:
        return self[1]


class Listing(list):
    """A list (of ``(name, Stat)`` or ``(path, Stat, data)``) with ``.revision``."""

    def __init__(self, items: Iterable, revision: int):
        super().__init__(items)
        self.revision = revision


@dataclass(frozen=True)
class WriteResult:
    """The committed ``revision`` of a write (for a write that changed nothing: the current
    revision). Txns also carry ``succeeded`` (which branch ran) and per-op ``results``."""

    revision: int
    succeeded: bool | None = None
    results: list | None = None
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    def __int__(self) -> int:
        return self.revision

    __index__ = __int__

    def to_dict(self) -> dict:
        out = dict(self.raw)
        out["revision"] = self.revision
        return out


# ---------------------------------------------------------------- op helpers

def _as_op(o, where: str):
    """An ops object or a protocol dict -> a validated ops object (InvalidInput otherwise)."""
    if isinstance(o, (ops.Create, ops.Set, ops.Mkdir, ops.Delete, ops.Chmod, ops.Noop)):
        return o
    if isinstance(o, ops.Txn):
        raise InvalidInput(f"{where}: nested transactions are not allowed")
    if isinstance(o, dict):
        if o.get("op") == "txn":
            raise InvalidInput(f"{where}: nested transactions are not allowed")
        return ops.op_from_wire(o)
    raise InvalidInput(f"{where}: expected an op or a protocol dict, got {type(o).__name__}")


def _as_compare(c, where: str) -> ops.Compare:
    if isinstance(c, ops.Compare):
        return c
    if isinstance(c, dict):
        return ops.Compare.from_wire(c)
    raise InvalidInput(f"{where}: expected a Compare or a protocol dict, got {type(c).__name__}")


def request_size(op) -> int:
    """The size :func:`afs.ops.validate_limits` charges for ``op`` (data, compare values and
    path bytes)."""
    if isinstance(op, ops.Txn):
        return (sum(request_size(o) for o in (*op.then_ops, *op.else_ops))
                + sum(len(c.path.encode()) + (len(c.value) if isinstance(c.value, bytes) else 0)
                      for c in op.compares))
    if isinstance(op, ops.Noop):
        return 0
    n = len(op.path.encode())
    if isinstance(op, (ops.Create, ops.Set)):
        n += len(op.data)
    return n


def plan_batches(op_list: Sequence, limits: Limits = DEFAULT_LIMITS) -> list[list]:
    """Split ops (in order) into the fewest consecutive txn 'then' lists within ``limits``.

    Every op is validated first (an op that cannot fit even alone raises its limit error), so
    either every batch is sendable or nothing is. One batch means the whole set is atomic.
    """
    checked = [_as_op(o, f"op {i}") for i, o in enumerate(op_list)]
    for o in checked:
        ops.validate_limits(o, limits)
    batches: list[list] = []
    cur: list = []
    size = 0
    for o in checked:
        n = request_size(o)
        if cur and (len(cur) >= limits.max_txn_ops or size + n > limits.max_request_bytes):
            batches.append(cur)
            cur, size = [], 0
        cur.append(o)
        size += n
    if cur:
        batches.append(cur)
    return batches


def _stat(d) -> Stat:
    try:
        return Stat.from_dict(d)
    except (KeyError, TypeError, ValueError) as exc:
        raise errors.AfsError(f"malformed stat in server response: {exc}") from None


# ---------------------------------------------------------------- the connection

class _Conn:
    """One blocking connection. Not thread safe (the Client's lock guards it)."""

    def __init__(self, addr: str, connect_timeout: float):
        self.addr = addr
        if addr.startswith(UNIX_PREFIX):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(connect_timeout)
                sock.connect(addr[len(UNIX_PREFIX):])
            except BaseException:
                sock.close()
                raise
            self.sock = sock
        else:
            host, port = parse_endpoint(addr)
            self.sock = socket.create_connection((host, port), timeout=connect_timeout)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.rfile = self.sock.makefile("rb")

    def read(self, timeout: float | None) -> dict:
        """The next frame (any id). Raises like :meth:`call`."""
        self.sock.settimeout(timeout)
        frame = read_frame_sync(self.rfile, MAX_RESPONSE_FRAME)
        if frame is None:
            raise ConnectionError(f"{self.addr} closed the connection")
        if not isinstance(frame, dict):
            raise FrameError("frame is not a map")
        return frame

    def call(self, req: dict, timeout: float) -> dict:
        """Send ``req`` and return the response frame with the same id. Raises OSError
        (timeouts included), FrameError or ConnectionError; the caller then closes us."""
        deadline = time.monotonic() + timeout
        self.sock.settimeout(max(timeout, 0.001))
        self.sock.sendall(encode_frame(req))
        while True:
            self.sock.settimeout(max(deadline - time.monotonic(), 0.001))
            resp = read_frame_sync(self.rfile, MAX_RESPONSE_FRAME)
            if resp is None:
                raise ConnectionError(f"{self.addr} closed the connection")
            if not isinstance(resp, dict):
                raise FrameError("response is not a map")
            if resp.get("id") == req["id"]:
                return resp
            # a frame for another id (a stream we no longer follow): skip it

    def close(self) -> None:
        try:
            self.rfile.close()
        finally:
            self.sock.close()


# ---------------------------------------------------------------- the client

class Client:
    """A client of one AFS cluster. See the module docstring for routing, retries, errors."""

    def __init__(self, endpoints: list[str] | str, *, timeout: float = 5.0,
                 connect_timeout: float = 1.0, client_id: str | None = None,
                 limits: Limits = DEFAULT_LIMITS):
        self.endpoints = parse_endpoints(endpoints)
        if not self.endpoints:
            raise InvalidInput("at least one endpoint is required")
        if not timeout > 0 or not connect_timeout > 0:
            raise InvalidInput("timeout and connect_timeout must be positive")
        self.timeout = float(timeout)
        self.connect_timeout = float(connect_timeout)
        self.client_id = client_id or uuid.uuid4().hex
        if not isinstance(self.client_id, str) or len(self.client_id) > 128:
            raise InvalidInput("client_id must be a string of at most 128 characters")
        self.limits = limits
        self._lock = threading.RLock()
        self._conn: _Conn | None = None
        self._leader: str | None = None     # address believed to be the leader
        self._rr = 0                        # next endpoint to try when no leader is known
        self._next_id = 0
        self._seq = 0

    @classmethod
    def from_config(cls, cfg) -> "Client":
        """Build from an :class:`afs.config.ClientConfig`."""
        return cls(cfg.endpoints, timeout=cfg.timeout, connect_timeout=cfg.connect_timeout)

    # ------------------------------------------------------------ lifecycle
    def close(self) -> None:
        with self._lock:
            self._drop()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _drop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except OSError:
                pass
            self._conn = None

    # ------------------------------------------------------------ the one network boundary
    def _target(self, route: str) -> str:
        if route == "leader":
            if self._leader:
                return self._leader
        elif route == "any":
            if self._conn is not None:
                return self._conn.addr
        else:
            return route                     # a fixed address
        return self.endpoints[self._rr % len(self.endpoints)]

    def _rotate(self, failed: str) -> None:
        if self._leader == failed:
            self._leader = None
        if failed in self.endpoints:
            self._rr = self.endpoints.index(failed) + 1
        else:
            self._rr += 1

    def _call(self, body: dict, route: str = "leader", timeout: float | None = None) -> Any:
        """Send ``body`` (retrying per the contract) and return the ``ok`` result."""
        timeout = self.timeout if timeout is None else timeout
        with self._lock:
            start = time.monotonic()
            deadline = start + timeout
            backoff = _BACKOFF_START
            redirects = 0
            last: str = "no attempt made"
            timed_out = False
            while True:
                now = time.monotonic()
                if now >= deadline:
                    break
                addr = self._target(route)
                self._next_id = (self._next_id + 1) & 0x7FFFFFFF
                req = {"id": self._next_id, **body}
                sleep = True
                try:
                    if self._conn is None or self._conn.addr != addr:
                        self._drop()
                        self._conn = _Conn(addr, min(self.connect_timeout, deadline - now))
                    resp = self._conn.call(req, deadline - time.monotonic())
                except (OSError, FrameError, EOFError) as exc:
                    self._drop()
                    timed_out = isinstance(exc, (TimeoutError, socket.timeout))
                    last = f"{addr}: {_describe(exc)}"
                    if route not in ("leader", "any"):   # a fixed member: one attempt only
                        raise (errors.Timeout if timed_out else Unavailable)(
                            f"cannot reach {last}", endpoint=addr)
                    self._rotate(addr)
                else:
                    if "error" not in resp:
                        if route == "leader":
                            self._leader = addr
                        return resp.get("ok")
                    err = errors.from_wire(resp["error"])
                    if not err.retryable:
                        raise err
                    timed_out = isinstance(err, errors.Timeout)
                    last = f"{addr}: {err.message}"
                    if isinstance(err, NotLeader) and route == "leader":
                        to = err.details.get("leader_addr")
                        if to and to != addr and redirects < _MAX_FREE_REDIRECTS:
                            redirects += 1
                            self._leader = to
                            sleep = False
                        else:
                            self._rotate(addr)
                    elif route == "leader":
                        self._rotate(addr)       # the leader may have moved
                if sleep:
                    pause = min(backoff * (0.5 + random.random()), deadline - time.monotonic())
                    if pause > 0:
                        time.sleep(pause)
                    backoff = min(backoff * 2, _BACKOFF_MAX)
            cls = errors.Timeout if timed_out else Unavailable
            raise cls(f"cluster unavailable: no answer within {timeout:g}s "
                      f"(last error: {last})", endpoints=list(self.endpoints))

    # ------------------------------------------------------------ validation helpers
    def _path(self, path: str) -> str:
        return paths.normalize(path, max_depth=self.limits.max_depth)

    def _read(self, op: str, path: str, stale: bool, **extra) -> dict:
        if not isinstance(stale, bool):
            raise InvalidInput("stale must be a boolean")
        body = {"op": op, "path": self._path(path), "stale": stale, **extra}
        res = self._call(body, route="any" if stale else "leader")
        if not isinstance(res, dict):
            raise errors.AfsError(f"malformed {op} response from server")
        return res

    def _write(self, op) -> WriteResult:
        ops.validate_limits(op, self.limits)
        with self._lock:
            self._seq += 1
            body = {"op": "write", "client_id": self.client_id, "seq": self._seq,
                    "cmd": op.to_wire()}
            res = self._call(body, route="leader")
        if not isinstance(res, dict) or not isinstance(res.get("revision"), int):
            raise errors.AfsError("malformed write response from server")
        return WriteResult(res["revision"], res.get("succeeded"), res.get("results"), raw=res)

    # ------------------------------------------------------------ reads
    def get(self, path: str, stale: bool = False) -> GetResult:
        """``(data, stat)`` of a file, with ``.revision``. NotFound / IsADirectory."""
        r = self._read("get", path, stale)
        return GetResult(r.get("data") or b"", _stat(r.get("stat")), int(r.get("revision", 0)))

    def stat(self, path: str, stale: bool = False) -> Stat:
        return self.stat_with_revision(path, stale)[0]

    def stat_with_revision(self, path: str, stale: bool = False) -> tuple[Stat, int]:
        r = self._read("stat", path, stale)
        return _stat(r.get("stat")), int(r.get("revision", 0))

    def exists(self, path: str, stale: bool = False) -> bool:
        try:
            self.stat(path, stale)
        except errors.NotFound:
            return False
        return True

    def list(self, path: str, stale: bool = False) -> Listing:
        """``[(name, Stat), ...]`` sorted by name, with ``.revision``. NotADirectory."""
        r = self._read("list", path, stale)
        return Listing([(str(n), _stat(s)) for n, s in r.get("children", [])],
                       int(r.get("revision", 0)))

    def walk(self, path: str, data: bool = True, stale: bool = False) -> Listing:
        """``[(path, Stat, data or None), ...]`` pre-order, sorted, at ONE revision
        (``.revision``); ``path`` itself first."""
        if not isinstance(data, bool):
            raise InvalidInput("data must be a boolean")
        r = self._read("walk", path, stale, data=data)
        return Listing([(str(p), _stat(s), d) for p, s, d in r.get("nodes", [])],
                       int(r.get("revision", 0)))

    # ------------------------------------------------------------ writes
    def create(self, path: str, data: bytes = b"", mode: int | None = None,
               parents: bool = False) -> WriteResult:
        """Create a file; AlreadyExists if the path exists."""
        return self._write(ops.Create(path, data, mode, parents))

    def put(self, path: str, data: bytes, if_version: int | None = None,
            mode: int | None = None, parents: bool = False) -> WriteResult:
        """Create or replace a file (upsert)."""
        return self._write(ops.Set(path, data, if_version=if_version, upsert=True,
                                   parents=parents, mode=mode))

    def set(self, path: str, data: bytes, if_version: int | None = None,
            if_mod_revision: int | None = None, mode: int | None = None) -> WriteResult:
        """Replace an existing file's data; NotFound if missing."""
        return self._write(ops.Set(path, data, if_version=if_version,
                                   if_mod_revision=if_mod_revision, mode=mode))

    def mkdir(self, path: str, parents: bool = False, mode: int | None = None) -> WriteResult:
        return self._write(ops.Mkdir(path, parents, mode))

    def delete(self, path: str, recursive: bool = False,
               if_version: int | None = None) -> WriteResult:
        return self._write(ops.Delete(path, recursive, if_version))

    def chmod(self, path: str, mode: int | None = None, uid: int | None = None,
              gid: int | None = None) -> WriteResult:
        if mode is None and uid is None and gid is None:
            raise InvalidInput("chmod: give at least one of mode, uid, gid")
        return self._write(ops.Chmod(path, mode, uid, gid))

    def txn(self, compare: Sequence = (), then: Sequence = (),
            else_: Sequence = ()) -> WriteResult:
        """All-or-nothing: if every compare holds apply ``then`` else ``else_``, as ONE
        revision. Items are :mod:`afs.ops` objects or protocol dicts."""
        t = ops.Txn(tuple(_as_compare(c, f"compare[{i}]") for i, c in enumerate(compare)),
                    tuple(_as_op(o, f"then[{i}]") for i, o in enumerate(then)),
                    tuple(_as_op(o, f"else[{i}]") for i, o in enumerate(else_)))
        return self._write(t)

    def plan_batches(self, op_list: Sequence) -> list[list]:
        """:func:`plan_batches` with this client's limits."""
        return plan_batches(op_list, self.limits)

    # ------------------------------------------------------------ watches
    @classmethod
    def local(cls, socket_path: str, **kw) -> "Client":
        """A client of this host's agent, through its local unix socket (``afs agent
        --socket PATH``). The agent answers ``watch``, ``cancel`` and ``status`` from its
        replica, so N local watchers cost the cluster one stream."""
        if not socket_path:
            raise InvalidInput("socket_path is required")
        return cls([UNIX_PREFIX + os.fspath(socket_path)], **kw)

    def watch(self, prefix: str = "/", start_revision: int | None = None, *, data: bool = True,
              idle_timeout: float = 5.0, reconnect_timeout: float | None = None) -> "Watch":
        """Watch ``prefix`` (the node itself and everything below it) from ``start_revision``
        (``None``: from now; ``0``: from the oldest revision still in history).

        Returns a :class:`Watch`: an iterator of :class:`WatchEvents`, one per revision that
        touches ``prefix`` (a transaction's events arrive together), in revision order, each
        revision exactly once — also across reconnects. See :class:`Watch`.
        Raises (at once, or from the iterator) :class:`~afs.errors.Compacted` when the
        revision to deliver next is no longer in any reachable member's history.
        ``data=False`` gives metadata-only events (``data`` is None)."""
        prefix = self._path(prefix)
        if start_revision is not None and (isinstance(start_revision, bool)
                                           or not isinstance(start_revision, int) or start_revision < 0):
            raise InvalidInput("start_revision must be None or a non-negative integer")
        if not isinstance(data, bool):
            raise InvalidInput("data must be a boolean")
        if not idle_timeout > 0:
            raise InvalidInput("idle_timeout must be positive")
        w = Watch(self.endpoints, prefix, start_revision, data=data, connect_timeout=self.connect_timeout,
                  timeout=self.timeout, idle_timeout=idle_timeout, reconnect_timeout=reconnect_timeout)
        w._connect(first=True)
        return w

    # ------------------------------------------------------------ cluster
    def status(self, endpoint: str | None = None, timeout: float | None = None) -> dict:
        """One member's status dict (docs/protocol.md): ``endpoint``'s, or any reachable
        member's. The answering address is added as ``endpoint``."""
        if endpoint is not None:
            parse_endpoint(endpoint)
            res = self._call_once(endpoint, {"op": "status"}, timeout)
        else:
            res = self._call({"op": "status"}, route="any", timeout=timeout)
            endpoint = self._conn.addr if self._conn is not None else ""
        if not isinstance(res, dict):
            raise errors.AfsError("malformed status response")
        return {**res, "endpoint": endpoint}

    def cluster_status(self) -> list[dict]:
        """The status of every member known from ``endpoints`` and from the members lists the
        cluster reports. Unreachable ones appear as ``{"endpoint", "name"?, "error"}``.
        Raises Unavailable only if no member answers."""
        per_timeout = min(self.timeout, max(self.connect_timeout * 2, 1.0))
        addrs = list(self.endpoints)
        names: dict[str, str] = {}          # client_addr -> member name, from members lists
        out: dict[str, dict] = {}
        i = 0
        while i < len(addrs):
            addr = addrs[i]
            i += 1
            try:
                st = self.status(addr, timeout=per_timeout)
            except AfsError as exc:
                out[addr] = {"endpoint": addr, "error": exc.message}
                continue
            if any(s.get("name") == st.get("name") for s in out.values()):
                continue                    # the same member under another address
            out[addr] = st
            for m in st.get("members") or []:
                ca = m.get("client_addr") if isinstance(m, dict) else None
                if ca:
                    names[ca] = m.get("name", "")
                    if ca not in addrs:
                        addrs.append(ca)
        if not any("error" not in s for s in out.values()):
            raise Unavailable("cluster unavailable: no member answered ("
                              + "; ".join(f"{a}: {s['error']}" for a, s in out.items()) + ")")
        answered = {s.get("name") for s in out.values() if "error" not in s}
        result = []
        for addr, s in out.items():
            if "error" in s and addr in names:
                if names[addr] in answered:
                    continue
                s["name"] = names[addr]
            result.append(s)
        return sorted(result, key=lambda s: (s.get("name") or "\uffff", s["endpoint"]))

    def _call_once(self, addr: str, body: dict, timeout: float | None) -> Any:
        """A request to one fixed member, on a separate short-lived connection (retrying only
        within ``timeout``); does not disturb the main connection or leader tracking."""
        with self._lock:
            saved = (self._conn, self._leader, self._rr)
            self._conn = None
            try:
                return self._call(body, route=addr, timeout=timeout or self.timeout)
            finally:
                self._drop()
                self._conn, self._leader, self._rr = saved


# ---------------------------------------------------------------- watches

@dataclass(frozen=True)
class WatchEvents:
    """All events of ONE revision that touch the watched prefix (a transaction's events
    together). Iterates over its events."""

    revision: int
    events: tuple[Event, ...]

    def __iter__(self):
        return iter(self.events)

    def __len__(self) -> int:
        return len(self.events)


class Watch:
    """An iterator of :class:`WatchEvents` (see :meth:`Client.watch`).

    Contract:
    - Uses its OWN connection (never the Client's request connection), so a Client keeps
      serving calls while watches stream.
    - Order and exactly-once: groups come in increasing revision order; the watch remembers
      the next revision it must deliver (``next_revision``). After a connection failure,
      an idle period without any frame (``idle_timeout``; members send progress frames every
      second when idle) or a retryable error, it reconnects — to the next endpoint first —
      and resumes from ``next_revision``; anything at or below the last delivered revision
      is dropped. So a reconnect never shows a gap or a duplicate.
    - Progress frames (``{"progress": R}``) are not yielded; they advance ``revision`` (the
      revision the watcher is known to be current to) and ``next_revision``.
    - ``Compacted``: raised when the revision to deliver next has left history on every member
      that answered in one round (a member that restarted or fell behind may lack history
      another still has, so all are asked). It is never turned into a silent gap.
    - Reconnecting gives up with :class:`~afs.errors.Unavailable` after ``timeout`` for the
      first subscription and after ``reconnect_timeout`` (None: never) later.
    - ``cancel()`` may be called from any thread (or a signal handler); the iterator then
      stops (StopIteration) and the connection is closed. Also a context manager.
    - Iterating is for one thread at a time.
    """

    def __init__(self, endpoints: list[str], prefix: str, start_revision: int | None, *,
                 data: bool = True, connect_timeout: float = 1.0, timeout: float = 5.0,
                 idle_timeout: float = 5.0, reconnect_timeout: float | None = None):
        self.endpoints = list(endpoints)
        self.prefix = prefix
        self.start_revision = start_revision
        self.data = data
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.idle_timeout = idle_timeout
        self.reconnect_timeout = reconnect_timeout
        #: the next revision to deliver (None until the first subscription when watching "from now")
        self.next_revision: int | None = start_revision
        #: the revision this watcher is known to be current to (last delivered or progress)
        self.revision = (start_revision - 1) if start_revision else 0
        self.endpoint = ""                 # the member (or socket) currently streaming
        self.reconnects = 0
        self._ep = 0
        self._conn: _Conn | None = None
        self._rid = 0
        self._lock = threading.Lock()
        self._cancelled = False
        self._reading = False

    # ------------------------------------------------------------ public
    def __iter__(self) -> "Watch":
        return self

    def __next__(self) -> WatchEvents:
        while True:
            if self._cancelled:
                self._close()
                raise StopIteration
            if self._conn is None:
                self._connect(first=False)
                continue
            conn = self._conn
            try:
                with self._lock:
                    self._reading = True
                frame = conn.read(self.idle_timeout)
            except (OSError, FrameError, EOFError) as exc:
                if self._cancelled:
                    continue
                self._lost(f"{conn.addr}: {_describe(exc)}")
                continue
            finally:
                with self._lock:
                    self._reading = False
            if frame.get("id") != self._rid:
                continue
            if "events" in frame:
                rev = frame.get("revision")
                raw = frame.get("events") or []
                try:
                    events = tuple(Event.from_wire(e) for e in raw)
                    if not isinstance(rev, int):
                        rev = events[0].revision
                except (ValueError, TypeError, KeyError, IndexError) as exc:
                    self._lost(f"{conn.addr}: malformed watch frame ({exc})")
                    continue
                if self.next_revision is not None and rev < self.next_revision:
                    continue                      # already delivered (never twice)
                self.next_revision = rev + 1
                self.revision = max(self.revision, rev)
                return WatchEvents(rev, events)
            if "progress" in frame:
                p = frame["progress"]
                if isinstance(p, int) and self.next_revision is not None and p + 1 > self.next_revision:
                    self.next_revision = p + 1
                    self.revision = max(self.revision, p)
                continue
            if "error" in frame:
                err = errors.from_wire(frame["error"])
                if err.retryable or isinstance(err, errors.Compacted):
                    # Compacted mid-stream: this member let us fall behind; another may still
                    # have the revision (the round in _connect decides)
                    self._lost(f"{conn.addr}: {err.message}")
                    continue
                self._close()
                raise err

    def events(self):
        """The same stream flattened to single :class:`~afs.model.Event` objects."""
        for group in self:
            yield from group.events

    def cancel(self) -> None:
        """Stop the watch (any thread). The iterator then ends."""
        self._cancelled = True
        with self._lock:
            conn = self._conn
            if conn is None:
                return
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)    # wakes a blocked reader
            except OSError:
                pass
            if not self._reading:
                self._conn = None
                conn.close()

    close = cancel

    def __enter__(self) -> "Watch":
        return self

    def __exit__(self, *exc) -> None:
        self.cancel()

    # ------------------------------------------------------------ internals
    def _close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except OSError:
                pass

    def _lost(self, why: str) -> None:
        self._close()
        self.reconnects += 1
        self._last_error = why
        self._ep += 1                             # prefer another member next

    def _connect(self, first: bool) -> None:
        """Subscribe on some endpoint from ``next_revision`` (see the class contract)."""
        limit = self.timeout if first else self.reconnect_timeout
        deadline = None if limit is None else time.monotonic() + limit
        backoff = _BACKOFF_START
        last = getattr(self, "_last_error", "no attempt made")
        n = len(self.endpoints)
        while not self._cancelled:
            compacted: AfsError | None = None
            answered = 0
            for _ in range(n):
                if self._cancelled:
                    break
                addr = self.endpoints[self._ep % n]
                try:
                    self._subscribe(addr)
                    return
                except errors.Compacted as exc:
                    answered += 1
                    compacted = compacted or exc
                    last = f"{addr}: {exc.message}"
                except AfsError as exc:
                    if not exc.retryable:
                        self._close()
                        raise
                    last = f"{addr}: {exc.message}"
                except (OSError, FrameError, EOFError) as exc:
                    last = f"{addr}: {_describe(exc)}"
                self._close()
                self._ep += 1
            if compacted is not None and answered:
                raise compacted
            if self._cancelled:
                break
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise Unavailable(f"watch {self.prefix}: no member could be subscribed within "
                                  f"{limit:g}s (last error: {last})", endpoints=list(self.endpoints))
            pause = backoff * (0.5 + random.random())
            if deadline is not None:
                pause = min(pause, deadline - now)
            time.sleep(max(pause, 0))
            backoff = min(backoff * 2, _BACKOFF_MAX)

    def _subscribe(self, addr: str) -> None:
        conn = _Conn(addr, self.connect_timeout)
        with self._lock:
            self._conn = conn
            if self._cancelled:
                return
        self._rid += 1
        req = {"id": self._rid, "op": "watch", "path": self.prefix,
               "start_revision": self.next_revision}
        if not self.data:
            req["data"] = False
        conn.sock.settimeout(self.timeout)
        conn.sock.sendall(encode_frame(req))
        deadline = time.monotonic() + self.timeout
        while True:
            frame = conn.read(max(deadline - time.monotonic(), 0.001))
            if frame.get("id") == self._rid:
                break
        if "error" in frame:
            raise errors.from_wire(frame["error"])
        ok = frame.get("ok")
        if not isinstance(ok, dict) or not isinstance(ok.get("revision"), int):
            raise FrameError("malformed watch answer")
        if self.next_revision is None:           # "from now": fixed by the first member
            self.next_revision = ok["revision"] + 1
            self.revision = ok["revision"]
        self.endpoint = addr


def _describe(exc: BaseException) -> str:
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, FrameError):
        return f"protocol error ({exc})"
    text = os.strerror(exc.errno) if isinstance(exc, OSError) and exc.errno else str(exc)
    return text or type(exc).__name__
