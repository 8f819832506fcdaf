"""Client-port request handlers.

Contract: ``ClientApi.handle(req, send)`` answers one request frame. It returns the response
frame (or None for streams, which write their own frames through ``send``). Every error that
reaches a client is an ``afs.errors.AfsError`` translated to the wire here, in ``handle`` only;
anything else is a server bug: logged with its traceback and answered as ``internal``.

Threading: runs on the server's event loop.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

from afs import errors, ops, paths
from afs.server import watchhub
from afs.server.watchhub import parse_watch_request

log = logging.getLogger("afs.api")

Send = Callable[[dict], None]


def _bool(req: dict, key: str) -> bool:
    v = req.get(key, False)
    if not isinstance(v, bool):
        raise errors.InvalidInput(f"'{key}' must be a boolean")
    return v


def _path(req: dict, max_depth: int, key: str = "path") -> str:
    p = req.get(key)
    if not isinstance(p, str):
        raise errors.InvalidPath(f"'{key}' must be a string path")
    return paths.normalize(p, max_depth=max_depth)


class ClientApi:
    def __init__(self, server):
        self.server = server
        self.handlers: dict[str, Callable[[dict, Send], Awaitable[dict | None]]] = {
            "get": self.get, "stat": self.stat, "list": self.list, "walk": self.walk,
            "write": self.write, "status": self.status, "snapshot": self.snapshot,
            "watch": self.watch, "cancel": self.cancel, "member_add": self.member_add,
            "member_remove": self.member_remove, "member_promote": self.member_promote,
            "transfer_leader": self.transfer_leader,
        }
        self.watches: dict[tuple[int, int], asyncio.Task] = {}

    async def handle(self, req: dict, send: Send, conn_id: int) -> dict | None:
        rid = req.get("id") if isinstance(req, dict) else None
        op = req.get("op") if isinstance(req, dict) else None
        started = time.perf_counter()
        outcome = "ok"
        try:
            if not isinstance(rid, int) or not isinstance(op, str):
                raise errors.InvalidInput("request needs an integer 'id' and a string 'op'")
            handler = self.handlers.get(op)
            if handler is None:
                raise errors.InvalidInput(f"unknown op {op!r}")
            req["_conn"] = conn_id
            result = await handler(req, send)
            if result is None:
                return None
            return {"id": rid, "ok": result}
        except errors.AfsError as exc:
            outcome = exc.code
            return {"id": rid, "error": self._wire_error(exc)}
        except Exception:  # noqa: BLE001 - a server bug; never a client's mistake
            outcome = "internal"
            log.exception("event=internal_error op=%s", op)
            return {"id": rid, "error": {"code": "internal", "message": "internal server error (see server log)"}}
        finally:
            self.server.metrics.observe(op if isinstance(op, str) and op in self.handlers else "invalid",
                                        outcome, time.perf_counter() - started)

    def _wire_error(self, exc: errors.AfsError) -> dict:
        if isinstance(exc, errors.NotLeader):
            leader = exc.details.get("leader") or self.server.node.leader
            exc.details["leader"] = leader or ""
            exc.details["leader_addr"] = self.server.client_addr_of(leader) if leader else ""
            if not leader:
                exc.message = "no leader elected yet"
        return exc.to_wire()

    # ------------------------------------------------------------ reads
    async def _read_point(self, req: dict) -> None:
        if self.server.test_break == "stale_read":     # TEST-ONLY negative control (server.py)
            return
        if not _bool(req, "stale"):
            await self.server.node.read_barrier(self.server.cfg.request_timeout)

    async def get(self, req, send):
        path = _path(req, self.server.cfg.limits.max_depth)
        await self._read_point(req)
        tree = self.server.tree
        data, stat = tree.get(path)
        return {"data": data, "stat": stat.to_dict(), "revision": tree.revision}

    async def stat(self, req, send):
        path = _path(req, self.server.cfg.limits.max_depth)
        await self._read_point(req)
        tree = self.server.tree
        return {"stat": tree.stat(path).to_dict(), "revision": tree.revision}

    async def list(self, req, send):
        path = _path(req, self.server.cfg.limits.max_depth)
        await self._read_point(req)
        tree = self.server.tree
        return {"children": [[name, st.to_dict()] for name, st in tree.list(path)],
                "revision": tree.revision}

    async def walk(self, req, send):
        path = _path(req, self.server.cfg.limits.max_depth)
        with_data = _bool(req, "data")
        await self._read_point(req)
        tree = self.server.tree
        return {"nodes": [[p, st.to_dict(), d] for p, st, d in tree.walk(path, with_data)],
                "revision": tree.revision}

    async def snapshot(self, req, send):
        tree = self.server.tree
        return {"revision": tree.revision, "data": tree.snapshot()}

    async def status(self, req, send):
        return self.server.status()

    # ------------------------------------------------------------ writes
    async def write(self, req, send):
        client_id, seq, raw = req.get("client_id"), req.get("seq"), req.get("cmd")
        if not isinstance(client_id, str) or not client_id or len(client_id) > 128:
            raise errors.InvalidInput("'client_id' must be a non-empty string (<= 128 chars)")
        if not isinstance(seq, int) or seq < 1:
            raise errors.InvalidInput("'seq' must be a positive integer")
        op = ops.op_from_wire(raw)
        ops.validate_limits(op, self.server.cfg.limits)
        node = self.server.node
        if not node.is_leader:
            raise errors.NotLeader("not the leader", leader=node.leader)
        uid, gid = req.get("uid", 0), req.get("gid", 0)
        if not isinstance(uid, int) or not isinstance(gid, int) or uid < 0 or gid < 0:
            raise errors.InvalidInput("'uid'/'gid' must be non-negative integers")
        cmd = ops.Command(client_id=client_id, seq=seq, mtime_ns=time.time_ns(), uid=uid, gid=gid, op=op)
        result = await node.propose(cmd.encode(), self.server.cfg.request_timeout)
        if isinstance(result, dict) and "error" in result:
            raise errors.from_wire(result["error"])
        return result

    # ------------------------------------------------------------ membership
    async def member_add(self, req, send):
        from afs.raft.messages import ConfChange, ConfChangeType
        from afs.raft.node import encode_member_info
        name, peer_addr = req.get("name"), req.get("peer_addr")
        if not isinstance(name, str) or not name or not isinstance(peer_addr, str):
            raise errors.InvalidInput("member_add needs 'name' and 'peer_addr'")
        typ = ConfChangeType.ADD_LEARNER if _bool(req, "learner") else ConfChangeType.ADD_VOTER
        cc = ConfChange(typ, name, encode_member_info(peer_addr, str(req.get("client_addr", ""))))
        await self.server.node.propose_conf_change(cc, self.server.cfg.request_timeout)
        return {"members": self.server.members()}

    async def member_remove(self, req, send):
        from afs.raft.messages import ConfChange, ConfChangeType
        name = req.get("name")
        if not isinstance(name, str) or not name:
            raise errors.InvalidInput("member_remove needs 'name'")
        await self.server.node.propose_conf_change(ConfChange(ConfChangeType.REMOVE, name),
                                                   self.server.cfg.request_timeout)
        return {"members": self.server.members()}

    async def member_promote(self, req, send):
        from afs.raft.messages import ConfChange, ConfChangeType
        name = req.get("name")
        if not isinstance(name, str) or not name:
            raise errors.InvalidInput("member_promote needs 'name'")
        await self.server.node.propose_conf_change(ConfChange(ConfChangeType.PROMOTE, name),
                                                   self.server.cfg.request_timeout)
        return {"members": self.server.members()}

    async def transfer_leader(self, req, send):
        to = req.get("to")
        if not isinstance(to, str) or not to:
            raise errors.InvalidInput("transfer_leader needs 'to'")
        node = self.server.node
        if not node.is_leader:
            raise errors.NotLeader("not the leader", leader=node.leader)
        node.transfer_leadership(to)
        deadline = time.monotonic() + self.server.cfg.request_timeout
        while time.monotonic() < deadline:
            await asyncio.sleep(0.02)
            if node.leader == to:
                return {"leader": to}
        raise errors.Timeout(f"leadership did not move to {to}")

    # ------------------------------------------------------------ watches
    async def watch(self, req, send):
        prefix, start, with_data = parse_watch_request(req, self.server.cfg.limits.max_depth)
        hub = self.server.hub
        sub = hub.subscribe(prefix, start)           # may raise Compacted
        rid = req["id"]
        key = (req["_conn"], rid)
        send({"id": rid, "ok": {"watch_id": rid, "revision": hub.revision, "oldest": hub.oldest}})
        self.watches[key] = asyncio.current_task()
        try:
            out = send
            if self.server.test_break == "drop_watch_event":   # TEST-ONLY negative control (server.py)
                def out(frame, _send=send):
                    if "events" in frame and frame.get("revision", 1) % 7 == 0:
                        return
                    _send(frame)
            await watchhub.serve(hub, sub, rid, out, with_data=with_data,
                                 flow=getattr(send, "flow", None))
        except (asyncio.CancelledError, ConnectionError):
            pass
        finally:
            hub.unsubscribe(sub)
            self.watches.pop(key, None)
        return None

    async def cancel(self, req, send):
        wid = req.get("watch_id")
        task = self.watches.get((req["_conn"], wid))
        if task is not None:
            task.cancel()
        return {}

    def cancel_connection(self, conn_id: int) -> None:
        for (cid, _), task in list(self.watches.items()):
            if cid == conn_id:
                task.cancel()
