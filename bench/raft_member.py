"""One Raft member for the Raft engine benchmark (bench only; not part of the server).

    python -m bench.raft_member --name n1 --data-dir DIR --peer-addr 127.0.0.1:P \
        --control-addr 127.0.0.1:C --cluster n1=127.0.0.1:P1,n2=...,n3=... [--no-fsync]

It runs a real :class:`afs.raft.node.RaftNode` with a no-op state machine, a
:class:`afs.storage.raftlog.RaftStorage` (fsync on unless ``--no-fsync``) and a
:class:`afs.transport.tcp.TcpTransport`, wired as ``afs.server.server`` wires them, with the
server's default timing (``NodeConfig()``). Workloads run INSIDE this process as asyncio tasks,
so they measure the engine, not a client.

Control port: one JSON object per line in each direction, one request at a time per
connection (open several connections for concurrent requests). Requests:

- ``{"cmd": "status"}`` -> node status, ``node.stats``, transport stats, pid.
- ``{"cmd": "seq", "n": N, "size": B, "warmup": W}`` -> W unmeasured then N sequential
  proposals of B bytes; ``{"lat": [seconds, ...]}``.
- ``{"cmd": "conc", "c": C, "seconds": T, "warmup": W, "size": B, "profile": path|null}`` ->
  C proposer tasks loop ``await node.propose()`` for W + T seconds; only the last T seconds
  count: ``{"committed", "elapsed", "stats_delta", "lat_median", ...}``. With ``profile``,
  cProfile runs on the event-loop thread during the T seconds and is dumped to ``path``.
- ``{"cmd": "failover_probe", "old_leader": X, "timeout": S}`` -> loops until either this
  member is leader and a proposal succeeded (``{"ok": true, "t": time.monotonic()}``; the
  monotonic clock is system-wide on Linux, so the orchestrator can compare it with the time
  it sent SIGKILL) or another member (not ``old_leader``) is known as leader
  (``{"ok": false, "leader": ...}``).
- ``{"cmd": "propose", "size": B}`` -> one proposal: ``{"ok": true}`` or the error.
- ``{"cmd": "quit"}`` -> stops the node cleanly and exits.
Errors: ``{"error": "..."}``.
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import logging
import os
import statistics
import sys
import time

from afs import errors
from afs.raft.node import NodeConfig, RaftNode
from afs.storage.raftlog import RaftStorage
from afs.transport.tcp import TcpTransport, parse_addr


class NoopStateMachine:
    """apply -> None, snapshot -> b"", restore -> nothing: the engine's cost only."""

    def apply(self, index: int, data: bytes):
        return None

    def snapshot(self) -> bytes:
        return b""

    def restore(self, data: bytes) -> None:
        pass


def parse_cluster(spec: str) -> dict[str, str]:
    out = {}
    for part in spec.split(","):
        name, _, addr = part.partition("=")
        if not name or not addr:
            raise SystemExit(f"bad --cluster item {part!r}: expected name=host:port")
        out[name] = addr
    return out


class Member:
    def __init__(self, args):
        self.args = args
        self.cluster = parse_cluster(args.cluster)
        self.storage = RaftStorage.open(args.data_dir, fsync=not args.no_fsync)
        bootstrap = {n: {"peer_addr": a, "client_addr": ""} for n, a in self.cluster.items()}
        self.node = RaftNode(args.name, self.storage, NoopStateMachine(), config=NodeConfig(),
                             bootstrap=bootstrap, on_fatal=self._on_fatal)
        self.transport = TcpTransport(args.name, args.peer_addr, self.node.peer_addrs(),
                                      self.node.receive, cluster_id="afs-bench",
                                      on_unreachable=self.node.report_unreachable,
                                      on_snapshot_status=self.node.report_snapshot)
        self.node.attach_transport(self.transport)
        self.done = asyncio.Event()
        self.server: asyncio.AbstractServer | None = None

    def _on_fatal(self, exc: BaseException) -> None:
        logging.error("fatal: %r", exc)
        self.done.set()

    async def start(self) -> None:
        await self.transport.start()
        await self.node.start()
        host, port = parse_addr(self.args.control_addr)
        self.server = await asyncio.start_server(self._control, host, port, reuse_address=True)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        await self.node.stop()
        await self.transport.stop()
        self.storage.close()

    # ------------------------------------------------------------ control port
    async def _control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                try:
                    req = json.loads(line)
                    resp = await self.handle(req)
                except Exception as exc:  # noqa: BLE001 - report it to the orchestrator
                    resp = {"error": f"{type(exc).__name__}: {exc}"}
                writer.write(json.dumps(resp).encode() + b"\n")
                await writer.drain()
                if req.get("cmd") == "quit":
                    self.done.set()
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def handle(self, req: dict) -> dict:
        cmd = req.get("cmd")
        if cmd == "status":
            return {"status": self.node.status(), "stats": dict(self.node.stats),
                    "transport": dict(self.transport.stats), "pid": os.getpid()}
        if cmd == "seq":
            return await self.run_seq(int(req.get("n", 1000)), int(req.get("size", 100)),
                                      int(req.get("warmup", 50)))
        if cmd == "conc":
            return await self.run_conc(int(req.get("c", 32)), float(req.get("seconds", 10)),
                                       float(req.get("warmup", 1.0)), int(req.get("size", 100)),
                                       req.get("profile"))
        if cmd == "failover_probe":
            return await self.failover_probe(str(req.get("old_leader", "")),
                                             float(req.get("timeout", 20.0)),
                                             int(req.get("size", 100)))
        if cmd == "propose":
            try:
                await self.node.propose(os.urandom(int(req.get("size", 100))), timeout=2.0)
                return {"ok": True}
            except errors.AfsError as exc:
                return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        if cmd == "quit":
            return {"ok": True}
        return {"error": f"unknown command {cmd!r}"}

    # ------------------------------------------------------------ workloads
    def _require_leader(self) -> None:
        if not self.node.is_leader:
            raise errors.NotLeader("not the leader", leader=self.node.leader)

    async def run_seq(self, n: int, size: int, warmup: int) -> dict:
        self._require_leader()
        node = self.node
        payloads = [os.urandom(size) for _ in range(64)]
        for i in range(warmup):
            await node.propose(payloads[i % 64])
        lat = []
        pc = time.perf_counter
        s0 = dict(node.stats)
        t_start = pc()
        for i in range(n):
            t0 = pc()
            await node.propose(payloads[i % 64])
            lat.append(pc() - t0)
        elapsed = pc() - t_start
        return {"lat": lat, "elapsed": elapsed,
                "stats_delta": {k: node.stats[k] - s0.get(k, 0) for k in node.stats}}

    async def run_conc(self, c: int, seconds: float, warmup: float, size: int,
                       profile: str | None) -> dict:
        self._require_leader()
        node = self.node
        payloads = [os.urandom(size) for _ in range(64)]
        pc = time.perf_counter
        state = {"stop": False, "measuring": False, "done": 0}
        lat: list[float] = []
        errs: dict[str, int] = {}

        async def proposer(i: int) -> None:
            k = i
            while not state["stop"]:
                t0 = pc()
                try:
                    await node.propose(payloads[k % 64])
                except errors.AfsError as exc:
                    errs[type(exc).__name__] = errs.get(type(exc).__name__, 0) + 1
                    await asyncio.sleep(0.01)
                    continue
                k += 1
                if state["measuring"]:
                    state["done"] += 1
                    lat.append(pc() - t0)

        tasks = [asyncio.create_task(proposer(i)) for i in range(c)]
        await asyncio.sleep(warmup)
        prof = cProfile.Profile() if profile else None
        s0 = dict(node.stats)
        state["measuring"] = True
        t0 = pc()
        if prof is not None:
            prof.enable()
        await asyncio.sleep(seconds)
        if prof is not None:
            prof.disable()
        state["measuring"] = False
        elapsed = pc() - t0
        committed = state["done"]
        s1 = dict(node.stats)
        state["stop"] = True
        await asyncio.gather(*tasks, return_exceptions=True)
        if prof is not None:
            prof.dump_stats(profile)
        lat.sort()
        return {"committed": committed, "elapsed": elapsed, "errors": errs,
                "stats_delta": {k: s1[k] - s0.get(k, 0) for k in s1},
                "lat_median": statistics.median(lat) if lat else None,
                "lat_p99": lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else None}

    async def failover_probe(self, old_leader: str, timeout: float, size: int) -> dict:
        node = self.node
        payload = os.urandom(size)
        deadline = time.monotonic() + timeout
        attempts = 0
        while time.monotonic() < deadline:
            if node.is_leader:
                attempts += 1
                try:
                    await node.propose(payload, timeout=max(0.01, deadline - time.monotonic()))
                    return {"ok": True, "t": time.monotonic(), "term": node.raft.term,
                            "attempts": attempts, "name": self.args.name}
                except errors.AfsError:
                    pass
            else:
                leader = node.leader
                if leader and leader != old_leader:
                    return {"ok": False, "leader": leader, "name": self.args.name}
            await asyncio.sleep(0.001)
        return {"ok": False, "error": "timeout", "name": self.args.name}


async def amain(args) -> int:
    m = Member(args)
    await m.start()
    print(f"READY {args.name} pid={os.getpid()}", flush=True)
    await m.done.wait()
    await m.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--name", required=True)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--peer-addr", required=True)
    ap.add_argument("--control-addr", required=True)
    ap.add_argument("--cluster", required=True, help="n1=host:port,n2=host:port,...")
    ap.add_argument("--no-fsync", action="store_true", help="reference runs only")
    ap.add_argument("--log-level", default="WARNING")
    ap.add_argument("--legacy-await", action="store_true",
                    help="A/B aid: RaftNode._await as before the bench's driver change "
                         "(asyncio.wait_for(asyncio.shield(fut)))")
    args = ap.parse_args(argv)
    if args.legacy_await:
        async def _await(self, fut, timeout, what):
            try:
                return await asyncio.wait_for(asyncio.shield(fut), timeout)
            except asyncio.TimeoutError:
                raise errors.Timeout(f"{what} timed out after {timeout:.1f}s") from None
        RaftNode._await = _await
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.WARNING),
                        stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
