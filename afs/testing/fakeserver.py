"""A small fake AFS cluster for client and CLI tests: real TCP, no Raft.

Contract:
- :class:`FakeCluster` starts ``size`` members on ``127.0.0.1`` port 0 (threads, blocking
  sockets). They share ONE dict-based tree, one revision counter and one ``(client_id, seq)``
  memory, so "replication" is instant. One member is the leader; the others answer writes and
  linearizable reads with ``not_leader`` (``details.leader``/``details.leader_addr``) and serve
  ``stale`` reads and ``status`` themselves — the routing a real cluster demands.
- It speaks docs/protocol.md's client port (frames from :mod:`afs.wire`): get, stat, list, walk,
  status, write (create/set/mkdir/delete/chmod/txn/noop). No watches, no snapshot.
- Fault hooks for tests: :meth:`FakeCluster.inject_error` (next matching requests answer an
  error), :meth:`FakeCluster.drop_after_apply` (apply a write, then close the connection
  without answering), ``delay`` (seconds before answering), :meth:`FakeMember.stop`/``start``,
  :meth:`FakeCluster.set_leader` (``None``: no leader). Every request is appended to
  ``cluster.requests`` as ``(member_name, request_dict)``.
- Semantics follow the protocol doc where it is explicit; where it is silent the choice is the
  obvious ZooKeeper/etcd one and is marked ``# choice:``. It is a test double, not a reference.
"""
from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

from afs import errors
from afs.errors import AfsError
from afs.model import DEFAULT_DIR_MODE, DEFAULT_FILE_MODE
from afs.wire import MAX_CLIENT_FRAME, FrameError, encode_frame, read_frame_sync

__all__ = ["FakeCluster", "FakeMember"]


@dataclass
class _Node:
    kind: str
    data: bytes | None
    create_revision: int
    mod_revision: int
    version: int
    mtime_ns: int
    mode: int
    uid: int = 0
    gid: int = 0

    def stat(self) -> dict:
        return {"kind": self.kind, "create_revision": self.create_revision,
                "mod_revision": self.mod_revision, "version": self.version,
                "mtime_ns": self.mtime_ns, "mode": self.mode, "uid": self.uid, "gid": self.gid,
                "size": len(self.data) if self.data is not None else 0}


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] or "/"


def _check_path(path) -> str:
    if (not isinstance(path, str) or not path.startswith("/") or "\x00" in path
            or (path != "/" and (path.endswith("/") or "//" in path))
            or any(c in (".", "..") for c in path.split("/")[1:])):
        raise errors.InvalidPath(f"invalid path {path!r}")
    return path


class _Tree:
    """The shared state: nodes by path, the revision, and the per-client last result."""

    def __init__(self):
        self.nodes: dict[str, _Node] = {"/": _Node("dir", None, 0, 0, 0, 0, DEFAULT_DIR_MODE)}
        self.revision = 0
        self.last: dict[str, tuple[int, dict]] = {}   # client_id -> (seq, response)
        self.lock = threading.RLock()

    # ---- reads ----
    def node(self, path: str) -> _Node:
        n = self.nodes.get(_check_path(path))
        if n is None:
            raise errors.NotFound(f"{path}: no such node")
        return n

    def children(self, path: str) -> list[str]:
        prefix = path.rstrip("/") + "/"
        return sorted(p[len(prefix):] for p in self.nodes
                      if p != "/" and p.startswith(prefix) and "/" not in p[len(prefix):])

    def read(self, req: dict) -> dict:
        op, path = req["op"], req.get("path")
        n = self.node(path)
        if op == "get":
            if n.kind == "dir":
                raise errors.IsADirectory(f"{path}: is a directory")
            return {"data": n.data, "stat": n.stat(), "revision": self.revision}
        if op == "stat":
            return {"stat": n.stat(), "revision": self.revision}
        if op == "list":
            if n.kind != "dir":
                raise errors.NotADirectory(f"{path}: not a directory")
            base = path.rstrip("/")
            return {"children": [[c, self.nodes[f"{base}/{c}"].stat()]
                                 for c in self.children(path)], "revision": self.revision}
        if op == "walk":
            out = []

            def visit(p):
                m = self.nodes[p]
                out.append([p, m.stat(), m.data if req.get("data", True) else None])
                if m.kind == "dir":
                    for c in self.children(p):
                        visit(f"{p.rstrip('/')}/{c}")
            visit(path)
            return {"nodes": out, "revision": self.revision}
        raise errors.InvalidInput(f"unknown op {op!r}")

    # ---- writes: apply to a scratch copy, commit as one revision ----
    def write(self, req: dict) -> dict:
        cid, seq, cmd = req.get("client_id"), req.get("seq"), req.get("cmd")
        if not isinstance(cid, str) or not isinstance(seq, int) or not isinstance(cmd, dict):
            raise errors.InvalidInput("write needs client_id, seq and cmd")
        prev = self.last.get(cid)
        if prev is not None and prev[0] == seq:
            return prev[1]                              # retried request: answer, don't apply
        if prev is not None and seq < prev[0]:
            raise errors.StaleRequest(f"seq {seq} is older than {prev[0]} for this client")
        scratch = {p: _Node(**vars(n)) for p, n in self.nodes.items()}
        rev = self.revision + 1
        now = time.time_ns()
        try:
            result = self._apply(scratch, cmd, rev, now, top=True)
            changed = result.pop("_changed")
        except AfsError as exc:
            resp = {"error": exc.to_wire()}
        else:
            if changed:
                self.nodes, self.revision = scratch, rev
            resp = {"ok": {"revision": self.revision, **result}}
        self.last[cid] = (seq, resp)
        return resp

    def _apply(self, nodes: dict, cmd: dict, rev: int, now: int, top: bool) -> dict:
        op = cmd.get("op")
        path = cmd.get("path")
        if op == "noop":
            return {"_changed": False}
        if op == "txn":
            if not top:
                raise errors.InvalidInput("nested txn")
            ok = all(self._compare(nodes, c) for c in cmd.get("compare", []))
            branch = cmd.get("then" if ok else "else", [])
            changed = False
            bname = "then" if ok else "else"
            for i, sub in enumerate(branch):
                try:
                    changed |= self._apply(nodes, sub, rev, now, top=False)["_changed"]
                except AfsError as exc:
                    exc.details.update(op_index=i, branch=bname)
                    exc.message = f"txn {bname}[{i}]: {exc.message}"
                    raise
            return {"_changed": changed, "succeeded": ok,
                    "results": [{"revision": rev if changed else self.revision}
                                for _ in branch]}
        _check_path(path)
        n = nodes.get(path)
        if op in ("create", "set"):
            data = cmd.get("data") or b""
            if not isinstance(data, bytes):
                raise errors.InvalidInput("data must be bytes")
            if n is not None and op == "create":
                raise errors.AlreadyExists(f"{path}: exists")
            if n is not None:
                if n.kind == "dir":
                    raise errors.IsADirectory(f"{path}: is a directory")
                if cmd.get("if_version") is not None and n.version != cmd["if_version"]:
                    raise errors.VersionMismatch(
                        f"{path}: version is {n.version}, expected {cmd['if_version']}")
                if (cmd.get("if_mod_revision") is not None
                        and n.mod_revision != cmd["if_mod_revision"]):
                    raise errors.VersionMismatch(f"{path}: mod_revision differs")
                n.data, n.mod_revision, n.version, n.mtime_ns = data, rev, n.version + 1, now
                if cmd.get("mode") is not None:
                    n.mode = cmd["mode"]
                return {"_changed": True}
            if op == "set" and not cmd.get("upsert"):
                raise errors.NotFound(f"{path}: no such node")
            if op == "set" and cmd.get("if_version") not in (None, 0):
                raise errors.VersionMismatch(f"{path}: missing, expected version "
                                             f"{cmd['if_version']}")
            self._ensure_parent(nodes, path, cmd.get("parents"), rev, now)
            nodes[path] = _Node("file", data, rev, rev, 1, now,
                                cmd.get("mode") if cmd.get("mode") is not None
                                else DEFAULT_FILE_MODE)
            return {"_changed": True}
        if op == "mkdir":
            if n is not None:
                if n.kind == "dir" and cmd.get("parents"):
                    return {"_changed": False}          # choice: mkdir -p of a dir is a no-op
                raise errors.AlreadyExists(f"{path}: exists")
            self._ensure_parent(nodes, path, cmd.get("parents"), rev, now)
            nodes[path] = _Node("dir", None, rev, rev, 1, now,
                                cmd.get("mode") if cmd.get("mode") is not None
                                else DEFAULT_DIR_MODE)
            return {"_changed": True}
        if op == "delete":
            if path == "/":
                raise errors.InvalidInput("cannot delete /")
            if n is None:
                raise errors.NotFound(f"{path}: no such node")
            if cmd.get("if_version") is not None and n.version != cmd["if_version"]:
                raise errors.VersionMismatch(
                    f"{path}: version is {n.version}, expected {cmd['if_version']}")
            under = [p for p in nodes if p.startswith(path + "/")]
            if under and not cmd.get("recursive"):
                raise errors.NotEmpty(f"{path}: directory not empty")
            for p in under + [path]:
                del nodes[p]
            return {"_changed": True}
        if op == "chmod":
            if n is None:
                raise errors.NotFound(f"{path}: no such node")
            for k in ("mode", "uid", "gid"):
                if cmd.get(k) is not None:
                    setattr(n, k, cmd[k])
            n.mtime_ns, n.mod_revision, n.version = now, rev, n.version + 1
            return {"_changed": True}
        raise errors.InvalidInput(f"unknown write op {op!r}")

    def _ensure_parent(self, nodes, path, parents, rev, now):
        par = _parent(path)
        chain = []
        while par not in nodes:
            chain.append(par)
            par = _parent(par)
        if nodes[par].kind != "dir":
            raise errors.NotADirectory(f"{par}: not a directory")
        if chain and not parents:
            raise errors.NotFound(f"{chain[0]}: parent does not exist")
        for p in reversed(chain):
            nodes[p] = _Node("dir", None, rev, rev, 1, now, DEFAULT_DIR_MODE)

    @staticmethod
    def _compare(nodes, c) -> bool:
        n = nodes.get(_check_path(c["path"]))
        target = c["target"]
        if target == "exists":
            actual = n is not None
        elif target == "value":
            actual = n.data if n is not None else None
        elif target in ("version", "mod_revision", "create_revision"):
            actual = getattr(n, target) if n is not None else 0
        else:
            raise errors.InvalidInput(f"bad compare target {target!r}")
        want, cmp = c.get("value"), c["cmp"]
        if cmp == "==":
            return actual == want
        if cmp == "!=":
            return actual != want
        if actual is None or want is None:
            return False
        return actual < want if cmp == "<" else actual > want


@dataclass
class _Injected:
    member: str | None
    op: str | None
    error: dict
    count: int


class FakeMember:
    """One listening member. ``addr`` is its ``host:port`` client address."""

    def __init__(self, cluster: "FakeCluster", name: str):
        self.cluster, self.name = cluster, name
        self._lsock: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self.addr = ""
        self.port = 0
        self.start()

    def start(self) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        self._lsock = s
        self.port = s.getsockname()[1]
        self.addr = f"127.0.0.1:{self.port}"
        threading.Thread(target=self._accept_loop, args=(s,), daemon=True,
                         name=f"fake-{self.name}").start()

    def stop(self) -> None:
        """Close the listener and every open connection (the member 'crashes')."""
        if self._lsock is not None:
            try:
                self._lsock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._lsock.close()
            self._lsock = None
        for c in list(self._conns):
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()
        self._conns.clear()

    @property
    def running(self) -> bool:
        return self._lsock is not None

    def _accept_loop(self, lsock: socket.socket) -> None:
        while True:
            try:
                conn, _ = lsock.accept()
            except OSError:
                return
            self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        f = conn.makefile("rb")
        try:
            while True:
                try:
                    req = read_frame_sync(f, MAX_CLIENT_FRAME)
                except (FrameError, OSError, EOFError):
                    return
                if req is None:
                    return
                resp = self.cluster._handle(self, req)
                if resp is None:            # drop_after_apply: vanish without answering
                    return
                conn.sendall(encode_frame(resp))
        except OSError:
            return
        finally:
            self._conns.discard(conn)
            f.close()
            conn.close()


class FakeCluster:
    """``size`` fake members sharing one tree. Use as a context manager or call ``close()``."""

    def __init__(self, size: int = 3):
        self.tree = _Tree()
        self.requests: list[tuple[str, dict]] = []
        self.delay = 0.0
        self.term = 1
        self._injected: list[_Injected] = []
        self._drop_after_apply = 0
        self.members = [FakeMember(self, f"n{i + 1}") for i in range(size)]
        self.leader: FakeMember | None = self.members[0]

    @property
    def endpoints(self) -> list[str]:
        return [m.addr for m in self.members]

    def member(self, name: str) -> FakeMember:
        return next(m for m in self.members if m.name == name)

    def set_leader(self, name: str | None) -> None:
        self.leader = None if name is None else self.member(name)
        self.term += 1

    def inject_error(self, error: AfsError | dict, *, count: int = 1, op: str | None = None,
                     member: str | None = None) -> None:
        """The next ``count`` requests matching ``op``/``member`` answer ``error``."""
        wire = error.to_wire() if isinstance(error, AfsError) else error
        self._injected.append(_Injected(member, op, wire, count))

    def drop_after_apply(self, count: int = 1) -> None:
        """The next ``count`` writes are applied, then the connection closes unanswered."""
        self._drop_after_apply += count

    def close(self) -> None:
        for m in self.members:
            m.stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def writes(self) -> list[dict]:
        return [r for _, r in self.requests if r.get("op") == "write"]

    # ---- request handling (called from member threads) ----
    def _handle(self, member: FakeMember, req) -> dict | None:
        rid = req.get("id") if isinstance(req, dict) else None
        if self.delay:
            time.sleep(self.delay)
        with self.tree.lock:
            self.requests.append((member.name, req))
            try:
                body = self._dispatch(member, req)
            except AfsError as exc:
                body = {"error": exc.to_wire()}
            if body is None:
                return None
        return {"id": rid, **body}

    def _dispatch(self, member: FakeMember, req) -> dict | None:
        if not isinstance(req, dict) or not isinstance(req.get("op"), str):
            raise errors.InvalidInput("request must be a map with an op")
        op = req["op"]
        for inj in self._injected:
            if inj.count > 0 and inj.op in (None, op) and inj.member in (None, member.name):
                inj.count -= 1
                return {"error": inj.error}
        if op == "status":
            return {"ok": self._status(member)}
        if op in ("get", "stat", "list", "walk"):
            if not req.get("stale") and member is not self.leader:
                raise self._not_leader()
            return {"ok": self.tree.read(req)}
        if op == "write":
            if member is not self.leader:
                raise self._not_leader()
            resp = self.tree.write(req)
            if self._drop_after_apply > 0:
                self._drop_after_apply -= 1
                return None
            return resp
        raise errors.InvalidInput(f"unknown op {op!r}")

    def _not_leader(self) -> AfsError:
        if self.leader is None or not self.leader.running:
            return errors.NotLeader("no leader", leader="", leader_addr="")
        return errors.NotLeader(f"not the leader; the leader is {self.leader.name}",
                                leader=self.leader.name, leader_addr=self.leader.addr)

    def _status(self, member: FakeMember) -> dict:
        lead = self.leader
        return {
            "name": member.name,
            "role": "leader" if member is lead else "follower",
            "leader": lead.name if lead else "", "leader_addr": lead.addr if lead else "",
            "term": self.term, "commit_index": self.tree.revision + 10,
            "applied_index": self.tree.revision + 10, "revision": self.tree.revision,
            "members": [{"name": m.name, "peer_addr": f"127.0.0.1:{m.port + 10000}",
                         "client_addr": m.addr, "voter": True} for m in self.members],
        }
