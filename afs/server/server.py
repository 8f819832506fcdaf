"""``afs server``: wiring of one member — storage, Raft node, peer transport, key tree,
watch hub, client port and HTTP endpoint.

Threading: one asyncio event loop; the Raft node uses one extra thread for fsync.
Shutdown: SIGTERM/SIGINT stop accepting, cancel watches, stop Raft (in-flight requests fail
with a retryable error), close the WAL. A failed fsync stops the process with exit code 1.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import time

from afs import errors, wire
from afs.config import ServerConfig
from afs.raft.node import RaftNode, decode_member_info
from afs.server.api import ClientApi
from afs.server.http import Metrics, serve_http
from afs.server.watchhub import WatchHub
from afs.storage.raftlog import RaftStorage
from afs.transport.tcp import TcpTransport
from afs.tree import TreeStateMachine

log = logging.getLogger("afs.server")

#: a watch stream stops writing while its connection has this much unsent (bytes)
WATCH_HIGH_WATER = 1 << 20


def split_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host or "127.0.0.1", int(port)


# ---------------------------------------------------------------- TEST-ONLY hooks
# Read here and nowhere else. Used only by tests/fault (afs.testing.chaos negative controls);
# never set them in production.
#
# AFS_TEST_BREAK deliberately breaks one guarantee so the fault suite can prove it notices:
#   ack_before_quorum  the leader commits (and so acknowledges) an entry once IT alone has it
#                      durably, without waiting for a majority (afs/raft/node.py)
#   drop_watch_event   watch streams silently skip every revision divisible by 7 (api.watch)
#   stale_read         "linearizable" reads skip ReadIndex and are answered from local state by
#                      any member, leader or not (api._read_point)
# AFS_TEST_SYNC_TRACKER=<file> makes RaftStorage report writes/fsyncs to a
#   PersistentSyncTracker mirrored in <file>, so a harness can simulate a power cut
#   (afs.storage.faults.load_sync_tracker(file).simulate_power_loss(data_dir)).
TEST_BREAKS = ("ack_before_quorum", "drop_watch_event", "stale_read")


def test_break_from_env() -> str:
    name = os.environ.get("AFS_TEST_BREAK", "")
    if name and name not in TEST_BREAKS:
        raise errors.InvalidInput(f"AFS_TEST_BREAK={name!r}: expected one of {', '.join(TEST_BREAKS)}")
    if name:
        log.warning("event=TEST_BREAK_ACTIVE break=%s (this member violates its guarantees on purpose)", name)
    return name


def test_sync_tracker_from_env():
    path = os.environ.get("AFS_TEST_SYNC_TRACKER", "")
    if not path:
        return None
    from afs.storage.faults import FaultPoints, PersistentSyncTracker
    log.warning("event=TEST_SYNC_TRACKER_ACTIVE state_file=%s", path)
    return FaultPoints(PersistentSyncTracker(path))


class _PublishingStateMachine:
    """The StateMachine the Raft node drives: applies to the key tree and hands each
    revision's events to the watch hub (same thread, in log order)."""

    def __init__(self, fsm: TreeStateMachine, hub: WatchHub):
        self.fsm = fsm
        self.hub = hub

    def apply(self, index: int, data: bytes):
        result, events = self.fsm.apply(index, data)
        if events:
            self.hub.publish(events[0].revision, events)
        return result

    def snapshot(self) -> bytes:
        return self.fsm.snapshot()

    def restore(self, data: bytes) -> None:
        self.fsm.restore(data)


class Server:
    def __init__(self, cfg: ServerConfig):
        cfg.validate()
        self.cfg = cfg
        self.metrics = Metrics()
        self.hub = WatchHub(max_revisions=cfg.history_revisions, max_bytes=cfg.history_bytes)
        self.fsm = TreeStateMachine()
        self.api = ClientApi(self)
        self.node: RaftNode | None = None
        self.transport: TcpTransport | None = None
        self._servers: list[asyncio.AbstractServer] = []
        self._conns: dict[int, asyncio.StreamWriter] = {}
        self._conn_ids = itertools.count(1)
        self._stopped = asyncio.Event()
        self._progress_task: asyncio.Task | None = None
        self.peer_client_addrs: dict[str, str] = {}
        self.exit_code = 0
        self.started_at = time.time()
        self.test_break = test_break_from_env()      # TEST-ONLY (tests/fault); "" in production

    @property
    def tree(self):
        return self.fsm.tree

    # ------------------------------------------------------------ wiring
    async def start(self) -> None:
        cfg = self.cfg
        os.makedirs(cfg.data_dir, mode=0o700, exist_ok=True)
        os.chmod(cfg.data_dir, 0o700)
        storage = RaftStorage.open(os.path.join(cfg.data_dir, "raft"), fsync=cfg.fsync,
                                   faults=test_sync_tracker_from_env())
        bootstrap = {name: {"peer_addr": addr, "client_addr": cfg.client_addr if name == cfg.name else ""}
                     for name, addr in cfg.initial_cluster.items()}
        self.node = RaftNode(cfg.name, storage, _PublishingStateMachine(self.fsm, self.hub), config=cfg.raft,
                             bootstrap=bootstrap,
                             on_snapshot_installed=self._on_snapshot_installed, on_fatal=self._on_fatal)
        self.hub.reset(self.tree.revision)
        self.transport = TcpTransport(
            cfg.name, cfg.peer_addr, self.node.peer_addrs(), self.node.receive,
            cluster_id=cfg.cluster_id, on_unreachable=self.node.report_unreachable,
            on_snapshot_status=self.node.report_snapshot,
            hello_info={"client_addr": cfg.client_addr}, on_hello=self._on_peer_hello,
            eager_connect=True)
        self.node.attach_transport(self.transport)
        if self.test_break == "ack_before_quorum":
            self.node.install_test_break(self.test_break)
        await self.transport.start()
        await self.node.start()
        host, port = split_addr(cfg.client_addr)
        self._servers.append(await asyncio.start_server(self._accept, host, port, limit=1 << 20))
        if cfg.http_addr:
            h, p = split_addr(cfg.http_addr)
            self._servers.append(await serve_http(h, p, self.health, self.metrics_text))
        self._progress_task = asyncio.get_running_loop().create_task(self._progress_loop())
        log.info("event=started name=%s client=%s peer=%s http=%s data_dir=%s members=%s",
                 cfg.name, cfg.client_addr, cfg.peer_addr, cfg.http_addr or "-", cfg.data_dir,
                 ",".join(sorted(self.node.members)))

    async def stop(self) -> None:
        log.info("event=stopping name=%s", self.cfg.name)
        for s in self._servers:
            s.close()
        if self._progress_task:
            self._progress_task.cancel()
        for conn_id in list(self._conns):
            self.api.cancel_connection(conn_id)
        if self.node:
            await self.node.stop()
        if self.transport:
            await self.transport.stop()
        for w in list(self._conns.values()):
            w.close()
        if self.node:
            self.node.storage.close()
        self._stopped.set()
        log.info("event=stopped name=%s", self.cfg.name)

    def _on_fatal(self, exc: BaseException) -> None:
        log.error("event=fatal_stop name=%s error=%r", self.cfg.name, exc)
        self.exit_code = 1
        asyncio.get_running_loop().create_task(self.stop())

    def _on_peer_hello(self, peer: str, info: dict) -> None:
        addr = info.get("client_addr") if isinstance(info, dict) else None
        if isinstance(addr, str) and addr:
            self.peer_client_addrs[peer] = addr

    def _on_snapshot_installed(self, meta) -> None:
        # The tree jumped to the snapshot's revision: watch history restarts there.
        self.hub.reset(self.tree.revision)

    async def _progress_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.progress_interval)
            self.hub.progress()

    # ------------------------------------------------------------ client connections
    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The one place client connections are accepted (auth / TLS checks land here)."""
        conn_id = next(self._conn_ids)
        self._conns[conn_id] = writer
        sock = writer.get_extra_info("socket")
        if sock is not None:
            import socket
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

        def send(frame: dict) -> None:
            if not writer.is_closing():
                writer.write(wire.encode_frame(frame))

        async def flow() -> None:
            # backpressure for watch streams: wait while this connection's send buffer is
            # large (the hub then queues, then switches the watcher to catch-up from history)
            if writer.transport.get_write_buffer_size() > WATCH_HIGH_WATER and not writer.is_closing():
                await writer.drain()

        send.flow = flow

        async def run(req):
            resp = await self.api.handle(req, send, conn_id)
            if resp is not None:
                send(resp)

        tasks: set[asyncio.Task] = set()
        try:
            while True:
                try:
                    req = await wire.read_frame(reader, wire.MAX_CLIENT_FRAME)
                except wire.FrameError as exc:
                    too_large = isinstance(exc, wire.FrameTooLarge)
                    send({"id": None, "error": errors.RequestTooLarge(str(exc)).to_wire()
                          if too_large else errors.InvalidInput(str(exc)).to_wire()})
                    break
                if req is None:
                    break
                if not isinstance(req, dict):
                    send({"id": None, "error": errors.InvalidInput("a request must be a map").to_wire()})
                    continue
                t = asyncio.get_running_loop().create_task(run(req))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
                if writer.transport.get_write_buffer_size() > (8 << 20):
                    await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.api.cancel_connection(conn_id)
            for t in tasks:
                t.cancel()
            self._conns.pop(conn_id, None)
            writer.close()

    # ------------------------------------------------------------ status
    def client_addr_of(self, name: str) -> str:
        if name == self.cfg.name:
            return self.cfg.client_addr
        if name in self.peer_client_addrs:
            return self.peer_client_addrs[name]
        info = self.node.members.get(name) if self.node else None
        return (info or {}).get("client_addr", "")

    def members(self) -> list[dict]:
        node = self.node
        out = []
        names = set(node.members) | set(node.raft.conf.voters) | set(node.raft.conf.learners)
        for name in sorted(names):
            info = node.members.get(name) or decode_member_info(b"")
            out.append({"name": name, "peer_addr": info.get("peer_addr", ""),
                        "client_addr": self.client_addr_of(name),
                        "voter": name in node.raft.conf.voters})
        return out

    def status(self) -> dict:
        st = self.node.status()
        leader = st["leader"]
        return {"name": self.cfg.name, "role": st["role"], "leader": leader,
                "leader_addr": self.client_addr_of(leader) if leader else "",
                "term": st["term"], "commit_index": st["commit_index"],
                "applied_index": st["applied_index"], "revision": self.tree.revision,
                "members": self.members(), "watchers": self.hub.subscribers,
                "uptime_s": round(time.time() - self.started_at, 1)}

    def health(self) -> tuple[bool, dict]:
        st = self.node.status()
        ok = bool(st["leader"]) and not st["fatal"]
        return ok, {"healthy": ok, "name": self.cfg.name, "role": st["role"], "leader": st["leader"],
                    "term": st["term"], "revision": self.tree.revision}

    def metrics_text(self) -> str:
        st = self.node.status()
        gauges = {"term": st["term"], "is_leader": 1 if st["role"] == "leader" else 0,
                  "has_leader": 1 if st["leader"] else 0,
                  "commit_index": st["commit_index"], "applied_index": st["applied_index"],
                  "revision": self.tree.revision, "watchers": self.hub.subscribers,
                  "client_connections": len(self._conns)}
        for k, v in self.node.stats.items():
            gauges[f"raft_{k}_total"] = v
        return self.metrics.render(gauges)

    # ------------------------------------------------------------ process entry
    async def run_until_signalled(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda s=sig: loop.create_task(self._signalled(s)))
        await self.start()
        await self._stopped.wait()
        return self.exit_code

    async def _signalled(self, sig) -> None:
        log.info("event=signal name=%s signal=%s", self.cfg.name, signal.Signals(sig).name)
        if not self._stopped.is_set():
            await self.stop()


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")


def run_server(cfg: ServerConfig) -> int:
    setup_logging(cfg.log_level)
    server = Server(cfg)
    try:
        return asyncio.run(server.run_until_signalled())
    except errors.AfsError as exc:
        log.error("event=startup_failed error=%s", exc)
        return 1
    except OSError as exc:
        log.error("event=startup_failed error=%s", exc)
        return 1
