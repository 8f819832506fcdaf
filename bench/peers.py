"""Side-by-side benchmark: AFS against etcd and ZooKeeper (3-member clusters on 127.0.0.1, fsync
on, data on the real disk) and tmpfs (the physical limit for reads), in one run.

    python -m bench.peers [--quick] [--systems afs,etcd,zookeeper] [--no-write] [--keep]

Workloads (the same for each system). All three clusters are started first; then each workload
runs for AFS, etcd and ZooKeeper back to back (the idle clusters wait), so on a shared, noisy
machine the systems are compared seconds apart rather than minutes apart:
  1. read of a 1 KiB value by one client: AFS mount (warm open+read+close), AFS ``get``
     (linearizable / stale), etcd range (linearizable / serializable), ZooKeeper get (and
     sync+get), and open+read+close on tmpfs — median and p99 of per-operation timings;
  2. sequential writes of 100-byte values by one client — median and p99;
  3. write throughput of 32 concurrent clients (each with its own connection) for 10 s (quick 3 s);
  4. propagation: write acknowledged -> visible to a reader attached to another member (AFS:
     file content on the mount of an agent following a follower; etcd: watch on a follower;
     ZooKeeper: watch + get on a follower) — median and p99;
  5. fan-out: 1,000 watchers (quick 100) spread over the members see one write — p99;
  6. scale (AFS): a 100,000-node tree (quick 10,000): snapshot size, restart-to-serving time,
     server and agent RSS per stored byte.

The section ``peers`` of ``bench/results.json`` is replaced (see bench/results.py); the table in
docs/benchmarks.md is rendered from it by bench/report.py.

Client-side notes (recorded in the results): every client is Python in this process. etcd is
driven through its HTTP/JSON gateway (the Python gRPC clients pin old protobuf versions), which
adds a JSON/HTTP hop inside etcd that a Go client would not pay; ZooKeeper through kazoo.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

from bench import peer_setup, report
from bench.stats import summarize
from bench.systems import (AfsSystem, EtcdCluster, EtcdWatchStream, ZkCluster, dir_bytes,
                           rss_bytes, _b64)

REPO = Path(__file__).resolve().parents[1]

KEY_READ = "/bench/r1k"
KEY_SEQ = "/bench/seq"
KEY_PROP = "/bench/prop"
KEY_FAN = "/bench/fan"
VALUE_1K = (b"0123456789abcdef" * 64)[:1024]
now = time.perf_counter


def v100(i: int, tag: bytes = b"v") -> bytes:
    return (tag + b"%010d" % i).ljust(100, b".")


class Params:
    def __init__(self, quick: bool):
        self.quick = quick
        self.local_reads = 5_000 if quick else 50_000
        self.net_reads = 300 if quick else 3_000
        self.warmup = 200 if quick else 1_000
        self.seq_writes = 200 if quick else 2_000
        self.tp_clients = 32
        self.tp_seconds = 3.0 if quick else 10.0
        self.tp_warmup = 1.0 if quick else 2.0
        self.prop_n = 50 if quick else 300
        self.fan_watchers = 100 if quick else 1_000
        # kazoo runs 3 threads per session: 1,000 sessions in one Python process thrash the
        # machine (load > 400 on 2 CPUs, sessions expiring), which would measure kazoo, not
        # ZooKeeper. ZooKeeper's fan-out is measured with at most 100 sessions (recorded).
        self.zk_fan_watchers = min(self.fan_watchers, 100)
        self.fan_rounds = 3 if quick else 5
        self.scale_nodes = 10_000 if quick else 100_000


def log(msg: str) -> None:
    print(msg, flush=True)


# ============================================================================ measurement kernels

def time_ops(fn: Callable[[], object], n: int, warmup: int) -> list[float]:
    """Per-operation wall times (seconds) of ``fn`` called ``n`` times after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    out = [0.0] * n
    pc = time.perf_counter
    for i in range(n):
        t0 = pc()
        fn()
        out[i] = pc() - t0
    return out


def local_read_summary(fn: Callable[[], object], n: int, warmup: int, batch: int = 100) -> dict:
    """Per-operation median/p99 (µs) plus ``median_batch_us``: the median over batches of
    ``batch`` back-to-back calls of the mean call time, which carries no per-call timer
    overhead (the read targets are judged on it)."""
    out = summarize(time_ops(fn, n, warmup), 1e6, "us")
    pc = time.perf_counter
    means = []
    for _ in range(max(1, n // batch)):
        t0 = pc()
        for _ in range(batch):
            fn()
        means.append((pc() - t0) / batch)
    means.sort()
    out["median_batch_us"] = round(means[len(means) // 2] * 1e6, 3)
    return out


def file_reader(path: str) -> Callable[[], bytes]:
    o, r, c, flags = os.open, os.read, os.close, os.O_RDONLY

    def read() -> bytes:
        fd = o(path, flags)
        try:
            return r(fd, 4096)
        finally:
            c(fd)
    return read


def run_throughput(make_client: Callable[[int], object], write: Callable[[object, int, int], object],
                   close: Callable[[object], None], n_clients: int, seconds: float,
                   warmup: float) -> dict:
    """``n_clients`` threads, each with its own client, writing as fast as acknowledgements come
    back; counts the writes acknowledged inside the measuring window (after ``warmup``)."""
    clients = [make_client(i) for i in range(n_clients)]
    counts = [0] * n_clients
    errors = [0] * n_clients
    lats: list[list[float]] = [[] for _ in range(n_clients)]
    start_evt = threading.Event()
    t_begin = [0.0]
    t_stop = [0.0]

    def worker(i: int) -> None:
        c = clients[i]
        start_evt.wait()
        w0 = t_begin[0] + warmup
        end = t_stop[0]
        seq = 0
        while True:
            t0 = now()
            if t0 >= end:
                break
            seq += 1
            try:
                write(c, i, seq)
            except Exception:  # noqa: BLE001 - counted, not fatal
                errors[i] += 1
                continue
            t1 = now()
            if t0 >= w0 and t1 <= end:
                counts[i] += 1
                lats[i].append(t1 - t0)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n_clients)]
    for t in threads:
        t.start()
    t_begin[0] = now()
    t_stop[0] = t_begin[0] + warmup + seconds
    start_evt.set()
    for t in threads:
        t.join(warmup + seconds + 120)
    for c in clients:
        try:
            close(c)
        except Exception:  # noqa: BLE001
            pass
    total = sum(counts)
    all_lats = [x for l in lats for x in l]
    out = {"clients": n_clients, "seconds": seconds, "writes": total,
           "writes_per_s": round(total / seconds, 1), "errors": sum(errors)}
    if all_lats:
        s = summarize(all_lats, 1e3, "ms")
        out.update(lat_median_ms=s["median_ms"], lat_p99_ms=s["p99_ms"])
    return out


class Seen:
    """First-seen times of values, filled by an observer thread, awaited by the writer."""

    def __init__(self):
        self.cond = threading.Condition()
        self.times: dict[bytes, float] = {}

    def mark(self, value: bytes, t: float | None = None) -> None:
        t = now() if t is None else t
        with self.cond:
            if value not in self.times:
                self.times[value] = t
                self.cond.notify_all()

    def wait(self, value: bytes, timeout: float) -> float | None:
        deadline = now() + timeout
        with self.cond:
            while value not in self.times:
                left = deadline - now()
                if left <= 0:
                    return None
                self.cond.wait(left)
            return self.times[value]


def run_propagation(write: Callable[[bytes], object], seen: Seen, n: int, tag: bytes,
                    gap: float = 0.01) -> dict:
    """Write ``n`` distinct values one at a time; latency = first seen by the observer minus
    the write's acknowledgement (0 when the observer saw it before the ack reached the
    writer). Also reports issue -> seen for context."""
    ack_lat, issue_lat = [], []
    before_ack = missing = 0
    for i in range(n):
        val = v100(i, tag)
        t_issue = now()
        write(val)
        t_ack = now()
        t_seen = seen.wait(val, 10.0)
        if t_seen is None:
            missing += 1
            continue
        if t_seen < t_ack:
            before_ack += 1
        ack_lat.append(max(0.0, t_seen - t_ack))
        issue_lat.append(t_seen - t_issue)
        time.sleep(gap * (0.5 + random.random()))
    if not ack_lat:
        raise RuntimeError("propagation: the observer saw none of the writes")
    out = summarize(ack_lat, 1e3, "ms")
    iss = summarize(issue_lat, 1e3, "ms")
    out.update(issue_to_seen_median_ms=iss["median_ms"], issue_to_seen_p99_ms=iss["p99_ms"],
               seen_before_ack=before_ack, missing=missing)
    return out


def fanout_summary(lat_rounds: list[list[float]], watchers: int, method: str) -> dict:
    lats = [x for r in lat_rounds for x in r]
    got = [len(r) for r in lat_rounds]
    out = summarize([max(0.0, x) for x in lats], 1e3, "ms")
    out.update(watchers=watchers, rounds=len(lat_rounds), delivered_per_round=got,
               method=method)
    return out


def _run_watch_tasks(n: int, targets: list, one, stop: threading.Event, errors_out: list) -> None:
    """Run ``one(k, target, started)`` for k in 0..n-1 (targets round-robin) on a new event
    loop in this thread until ``stop``; the first task failure goes to ``errors_out``."""
    async def main() -> None:
        started: list = []
        tasks = []
        for k in range(n):
            tasks.append(asyncio.create_task(one(k, targets[k % len(targets)], started)))
            if k % 50 == 49:
                await asyncio.sleep(0)
        while not stop.is_set():
            await asyncio.sleep(0.05)
            for t in tasks:
                if t.done() and t.exception() is not None and not errors_out:
                    errors_out.append(repr(t.exception()))
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())


# ============================================================================ AFS

def _afs_raw_watchers_loop(addrs: list[str], n: int, path: str, start_rev: int,
                           ready: threading.Event, stop: threading.Event,
                           on_value: Callable[[int, bytes, float], None],
                           errors_out: list) -> None:
    """An asyncio thread holding ``n`` watches (client protocol frames, one connection each,
    spread over ``addrs``: members' HOST:PORT or an agent's ``unix:/path``); calls
    ``on_value(watcher, data, t)`` for each event on ``path``."""
    from afs import wire
    gate = asyncio.Semaphore(32)     # binds to the watcher thread's loop on first use

    async def open_connection(addr: str):
        if addr.startswith("unix:"):
            return await asyncio.open_unix_connection(addr[5:], limit=1 << 22)
        host, _, port = addr.rpartition(":")
        return await asyncio.open_connection(host, int(port), limit=1 << 22)

    async def subscribe(addr: str):
        """Connect and wait for the watch's ``ok``: at most 32 subscriptions in flight, with
        retries (a burst of 1,000 un-accepted connects overflows a listen backlog, and the
        excess connections are reset)."""
        req = {"id": 1, "op": "watch", "path": path}
        if not addr.startswith("unix:"):
            req["start_revision"] = start_rev     # the agent's socket: from now
        async with gate:
            for attempt in range(30):
                writer = None
                try:
                    reader, writer = await open_connection(addr)
                    writer.write(wire.encode_frame(req))
                    await writer.drain()
                    fr = await wire.read_frame(reader, 1 << 26)
                    if fr is not None and "ok" in fr:
                        return reader, writer
                    if fr is not None and "error" in fr:
                        raise RuntimeError(f"watch refused: {fr['error']}")
                    raise ConnectionError("closed before the watch was acknowledged")
                except (ConnectionError, OSError):
                    if writer is not None:
                        writer.close()
                    if attempt == 29:
                        raise
                    await asyncio.sleep(0.05 * (attempt + 1))

    async def one(k: int, addr: str, acked: list) -> None:
        reader, writer = await subscribe(addr)
        acked.append(k)
        if len(acked) == n:
            ready.set()
        try:
            while True:
                fr = await wire.read_frame(reader, 1 << 26)
                if fr is None:
                    return
                t = now()
                if "error" in fr:
                    errors_out.append(fr["error"])
                    return
                for ev in fr.get("events") or ():
                    if ev[2] == path and ev[4] is not None:
                        on_value(k, bytes(ev[4]), t)
        finally:
            writer.close()

    _run_watch_tasks(n, addrs, one, stop, errors_out)


class AfsBench:
    """AFS: 3 servers, one agent (mount) following a follower. Steps run interleaved with the
    peers' (see :func:`run`)."""
    name = "afs"

    def __init__(self, base: str, P: Params, res: dict, notes: list, tmpfs_read: Callable[[], bytes]):
        self.P, self.res, self.notes, self.tmpfs_read = P, res, notes, tmpfs_read
        self.sysm = AfsSystem(os.path.join(base, "afs"))

    def start(self) -> None:
        sysm = self.sysm
        sysm.start()
        self.L = L = sysm.leader_index()
        self.F = F = next(i for i in range(3) if i != L)
        log(f"afs: cluster up, leader n{L + 1}; agent follows n{F + 1}")
        self.c = c = sysm.client()
        for p, v in ((KEY_READ, VALUE_1K), (KEY_SEQ, v100(0)), (KEY_PROP, v100(0)), (KEY_FAN, v100(0))):
            c.put(p, v, parents=True)
        c.mkdir("/bench/tp", parents=True)
        self.sock = os.path.join(sysm.base_dir, "agent-b.sock")
        _ap, self.mnt = sysm.start_agent("agent-b", [sysm.addr(F)], socket_path=self.sock)
        sysm.wait_agent_revision(self.mnt, c.get(KEY_FAN).revision)
        self.lc = sysm.client(L)

    def read(self) -> None:
        P, res = self.P, self.res
        mread = file_reader(self.mnt + KEY_READ)
        assert mread() == VALUE_1K, "mount returned the wrong content"
        # mount and tmpfs back to back (both local, same timing loop)
        res["read"]["afs_mount"] = local_read_summary(mread, P.local_reads, P.warmup * 5)
        res["read"]["tmpfs"] = local_read_summary(self.tmpfs_read, P.local_reads, P.warmup * 5)
        lc = self.lc
        res["read"]["afs_get_linearizable"] = summarize(
            time_ops(lambda: lc.get(KEY_READ), P.net_reads, P.warmup), 1e6, "us")
        res["read"]["afs_get_stale"] = summarize(
            time_ops(lambda: lc.get(KEY_READ, stale=True), P.net_reads, P.warmup), 1e6, "us")
        log(f"afs: reads mount {res['read']['afs_mount']['median_us']} us, "
            f"tmpfs {res['read']['tmpfs']['median_us']} us, "
            f"get {res['read']['afs_get_linearizable']['median_us']} us")

    def seq(self) -> None:
        i, c = [0], self.c

        def seq_write():
            i[0] += 1
            c.put(KEY_SEQ, v100(i[0]))
        self.res["seq_write"]["afs"] = summarize(time_ops(seq_write, self.P.seq_writes, self.P.warmup // 4), 1e3, "ms")
        log(f"afs: seq write median {self.res['seq_write']['afs']['median_ms']} ms")

    def throughput(self) -> None:
        from afs.client import Client
        eps = self.sysm.cluster.endpoints
        self.res["throughput"]["afs"] = run_throughput(
            lambda k: Client(eps, timeout=30.0),
            lambda cl, k, s: cl.put(f"/bench/tp/c{k}", v100(s)),
            lambda cl: cl.close(), self.P.tp_clients, self.P.tp_seconds, self.P.tp_warmup)
        log(f"afs: throughput {self.res['throughput']['afs']['writes_per_s']} writes/s")

    def propagation(self) -> None:
        # write via the leader, observe the file content on the mount of the follower's agent
        seen = Seen()
        stop = threading.Event()
        pread = file_reader(self.mnt + KEY_PROP)
        c = self.c

        def poll():
            last = None
            while not stop.is_set():
                try:
                    d = pread()
                except OSError:
                    d = None
                if d != last and d is not None:
                    seen.mark(d)
                    last = d
                time.sleep(50e-6)
        th = threading.Thread(target=poll, daemon=True)
        th.start()
        try:
            r = run_propagation(lambda v: c.put(KEY_PROP, v), seen, self.P.prop_n, b"p")
            r["observer"] = "poll of the file on the mount every ~50 us (open+read+close)"
            self.res["propagation"]["afs_mount"] = r
        finally:
            stop.set()
            th.join(5)
        log(f"afs: propagation p99 {self.res['propagation']['afs_mount']['p99_ms']} ms")

    def fanout(self) -> None:
        self.res["fanout"]["afs"] = afs_fanout(self.sysm, self.c, self.P, self.notes, self.sock)

    def stop(self) -> None:
        for cl in (getattr(self, "c", None), getattr(self, "lc", None)):
            if cl is not None:
                cl.close()
        self.sysm.stop()


def afs_fanout(sysm: AfsSystem, c, P: Params, notes: list, sock: str | None) -> dict:
    """Watchers on the agent's local watch socket (the design's fan-out path: N watchers on a
    host cost the cluster one stream) when the agent has one; else cluster watches spread over
    the members."""
    if sock and os.path.exists(sock):
        addrs = ["unix:" + sock]
        method = "agent local watch socket (one agent following a follower; 1 cluster stream)"
    else:
        addrs = sysm.cluster.endpoints
        method = "cluster watches over the client protocol, spread over 3 members"
        notes.append("AFS fan-out: no agent local watch socket, so the watchers held cluster "
                     "watches spread over the members.")
    n = P.fan_watchers
    start_rev = c.get(KEY_FAN).revision + 1
    cur = {"val": None, "times": []}
    lock = threading.Lock()

    def on_value(k: int, data: bytes, t: float) -> None:
        with lock:
            if data == cur["val"]:
                cur["times"].append(t)

    ready, stop = threading.Event(), threading.Event()
    errs: list = []
    th = threading.Thread(target=_afs_raw_watchers_loop,
                          args=(addrs, n, KEY_FAN, start_rev, ready, stop, on_value, errs),
                          daemon=True)
    th.start()
    try:
        if not ready.wait(60):
            raise RuntimeError(f"AFS fan-out: watchers not ready ({errs[:3]})")
        return fanout_rounds(lambda v: c.put(KEY_FAN, v), cur, lock, n, P.fan_rounds, method)
    finally:
        stop.set()
        th.join(30)


def fanout_rounds(write: Callable[[bytes], object], cur: dict, lock: threading.Lock, n: int,
                  rounds: int, method: str) -> dict:
    """One primer round (not measured: proves every watcher is live), then ``rounds`` writes;
    latency of each watcher = its receipt time minus the write's ack."""
    lat_rounds = []
    for r in range(rounds + 1):
        val = v100(r, b"f")
        with lock:
            cur["val"], cur["times"] = val, []
        write(val)
        t_ack = now()
        deadline = t_ack + 30.0
        while now() < deadline:
            with lock:
                if len(cur["times"]) >= n:
                    break
            time.sleep(0.002)
        with lock:
            times = list(cur["times"])
        if r > 0:
            lat_rounds.append([t - t_ack for t in times])
        if len(times) < n:
            log(f"  fan-out round {r}: only {len(times)}/{n} watchers saw the write within 30 s")
        time.sleep(0.2)
    return fanout_summary(lat_rounds, n, method)


# ============================================================================ etcd

class EtcdBench:
    name = "etcd"

    def __init__(self, base: str, P: Params, res: dict, notes: list):
        self.P, self.res, self.notes = P, res, notes
        self.sysm = EtcdCluster(os.path.join(base, "etcd"))

    def start(self) -> None:
        self.sysm.start()
        self.L = L = self.sysm.leader_index()
        self.F = next(i for i in range(3) if i != L)
        log(f"etcd: cluster up, leader e{L + 1}")
        self.c = self.sysm.client(L)
        self.c.put(KEY_READ, VALUE_1K)

    def read(self) -> None:
        P, res, c = self.P, self.res, self.c
        res["read"]["etcd_get_linearizable"] = summarize(
            time_ops(lambda: c.get(KEY_READ), P.net_reads, P.warmup), 1e6, "us")
        res["read"]["etcd_get_serializable"] = summarize(
            time_ops(lambda: c.get(KEY_READ, serializable=True), P.net_reads, P.warmup), 1e6, "us")
        log(f"etcd: get {res['read']['etcd_get_linearizable']['median_us']} us")

    def seq(self) -> None:
        i, c = [0], self.c

        def seq_write():
            i[0] += 1
            c.put(KEY_SEQ, v100(i[0]))
        self.res["seq_write"]["etcd"] = summarize(time_ops(seq_write, self.P.seq_writes, self.P.warmup // 4), 1e3, "ms")
        log(f"etcd: seq write median {self.res['seq_write']['etcd']['median_ms']} ms")

    def throughput(self) -> None:
        sysm, L = self.sysm, self.L
        self.res["throughput"]["etcd"] = run_throughput(
            lambda k: sysm.client(L), lambda cl, k, s: cl.put(f"/bench/tp/c{k}", v100(s)),
            lambda cl: cl.close(), self.P.tp_clients, self.P.tp_seconds, self.P.tp_warmup)
        log(f"etcd: throughput {self.res['throughput']['etcd']['writes_per_s']} writes/s")

    def propagation(self) -> None:
        # watch on a follower, writes to the leader
        seen = Seen()
        ws = EtcdWatchStream(self.sysm.client_ports[self.F], KEY_PROP)
        c = self.c

        def observe():
            try:
                for val, _rev in ws.events():
                    seen.mark(val)
            except (OSError, ValueError, AttributeError):
                pass
        th = threading.Thread(target=observe, daemon=True)
        th.start()
        time.sleep(0.3)
        try:
            r = run_propagation(lambda v: c.put(KEY_PROP, v), seen, self.P.prop_n, b"p")
            r["observer"] = "watch stream (HTTP gateway) on a follower"
            self.res["propagation"]["etcd_watch"] = r
        finally:
            ws.close()
        log(f"etcd: propagation p99 {self.res['propagation']['etcd_watch']['p99_ms']} ms")

    def fanout(self) -> None:
        self.res["fanout"]["etcd"] = etcd_fanout(self.sysm, self.c, self.P)

    def stop(self) -> None:
        if getattr(self, "c", None) is not None:
            self.c.close()
        self.sysm.stop()


def _etcd_watchers_loop(ports: list[int], n: int, key: str, ready: threading.Event,
                        stop: threading.Event, on_value, errors_out: list) -> None:
    body = json.dumps({"create_request": {"key": _b64(key)}}).encode()

    async def one(k: int, port: int, created: list) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 22)
        writer.write(b"POST /v3/watch HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            if b" 200 " not in head.split(b"\r\n", 1)[0]:
                errors_out.append(head[:200])
                return
            chunked = b"chunked" in head.lower()
            buf = b""
            while True:
                if chunked:
                    size_line = await reader.readline()
                    if not size_line:
                        return
                    size = int(size_line.strip().split(b";")[0] or b"0", 16)
                    if size == 0:
                        return
                    data = await reader.readexactly(size + 2)
                    buf += data[:-2]
                else:
                    data = await reader.read(65536)
                    if not data:
                        return
                    buf += data
                t = now()
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if not line.strip():
                        continue
                    msg = json.loads(line)
                    r = msg.get("result") or {}
                    if r.get("created"):
                        created.append(k)
                        if len(created) == n:
                            ready.set()
                    for ev in r.get("events") or ():
                        kv = ev.get("kv") or {}
                        import base64
                        on_value(k, base64.b64decode(kv.get("value", "")), t)
        finally:
            writer.close()

    _run_watch_tasks(n, ports, one, stop, errors_out)


def etcd_fanout(sysm: EtcdCluster, c, P: Params) -> dict:
    n = P.fan_watchers
    cur = {"val": None, "times": []}
    lock = threading.Lock()

    def on_value(k, data, t):
        with lock:
            if data == cur["val"]:
                cur["times"].append(t)

    ready, stop = threading.Event(), threading.Event()
    errs: list = []
    th = threading.Thread(target=_etcd_watchers_loop,
                          args=(sysm.client_ports, n, KEY_FAN, ready, stop, on_value, errs), daemon=True)
    th.start()
    try:
        if not ready.wait(60):
            raise RuntimeError(f"etcd fan-out: watchers not ready ({errs[:3]})")
        return fanout_rounds(lambda v: c.put(KEY_FAN, v), cur, lock, n, P.fan_rounds,
                             "watch streams (HTTP gateway, one connection each), spread over 3 members")
    finally:
        stop.set()
        th.join(30)


# ============================================================================ ZooKeeper

def _zk_close(cl) -> None:
    try:
        cl.stop()
        cl.close()
    except Exception:  # noqa: BLE001
        pass


class ZkBench:
    name = "zookeeper"

    def __init__(self, base: str, P: Params, res: dict, notes: list):
        self.P, self.res, self.notes = P, res, notes
        self.sysm = ZkCluster(os.path.join(base, "zookeeper"))

    def start(self) -> None:
        sysm = self.sysm
        sysm.start()
        self.L = L = sysm.leader_index()
        self.F = next(i for i in range(3) if i != L)
        log(f"zookeeper: cluster up, leader z{L + 1}")
        self.zk = zk = sysm.client(L)
        for p, v in ((KEY_READ, VALUE_1K), (KEY_SEQ, v100(0)), (KEY_PROP, v100(0)), (KEY_FAN, v100(0))):
            zk.create(p, v, makepath=True)
        for k in range(self.P.tp_clients):
            zk.ensure_path(f"/bench/tp/c{k}")

    def read(self) -> None:
        P, res, zk = self.P, self.res, self.zk
        res["read"]["zookeeper_get"] = summarize(
            time_ops(lambda: zk.get(KEY_READ), P.net_reads, P.warmup), 1e6, "us")

        def sync_get():
            zk.sync(KEY_READ)
            return zk.get(KEY_READ)
        res["read"]["zookeeper_sync_get"] = summarize(time_ops(sync_get, P.net_reads, P.warmup), 1e6, "us")
        log(f"zookeeper: get {res['read']['zookeeper_get']['median_us']} us")

    def seq(self) -> None:
        i, zk = [0], self.zk

        def seq_write():
            i[0] += 1
            zk.set(KEY_SEQ, v100(i[0]))
        self.res["seq_write"]["zookeeper"] = summarize(
            time_ops(seq_write, self.P.seq_writes, self.P.warmup // 4), 1e3, "ms")
        log(f"zookeeper: seq write median {self.res['seq_write']['zookeeper']['median_ms']} ms")

    def throughput(self) -> None:
        sysm, L = self.sysm, self.L
        self.res["throughput"]["zookeeper"] = run_throughput(
            lambda k: sysm.client(L), lambda cl, k, s: cl.set(f"/bench/tp/c{k}", v100(s)), _zk_close,
            self.P.tp_clients, self.P.tp_seconds, self.P.tp_warmup)
        log(f"zookeeper: throughput {self.res['throughput']['zookeeper']['writes_per_s']} writes/s")

    def propagation(self) -> None:
        from kazoo.recipe.watchers import DataWatch
        seen = Seen()
        zf = self.sysm.client(self.F)
        zk = self.zk

        def on_data(data, stat):
            if data is not None:
                seen.mark(bytes(data))
        DataWatch(zf, KEY_PROP, on_data)
        time.sleep(0.3)
        try:
            r = run_propagation(lambda v: zk.set(KEY_PROP, v), seen, self.P.prop_n, b"p")
            r["observer"] = "kazoo DataWatch (watch + get) on a follower"
            self.res["propagation"]["zookeeper_watch_get"] = r
        finally:
            _zk_close(zf)
        log(f"zookeeper: propagation p99 {self.res['propagation']['zookeeper_watch_get']['p99_ms']} ms")

    def fanout(self) -> None:
        self.res["fanout"]["zookeeper"] = zk_fanout(self.sysm, self.zk, self.P)

    def stop(self) -> None:
        if getattr(self, "zk", None) is not None:
            _zk_close(self.zk)
        self.sysm.stop()


def zk_fanout(sysm: ZkCluster, zk, P: Params) -> dict:
    from kazoo.client import KazooClient
    from kazoo.recipe.watchers import DataWatch
    n = P.zk_fan_watchers
    cur = {"val": None, "times": []}
    lock = threading.Lock()
    registered = [0]

    old_stack = threading.stack_size(512 * 1024)
    clients = []
    try:
        for k in range(n):
            cl = KazooClient(hosts=sysm.hosts(k % 3), timeout=60.0)
            cl.start(timeout=60)
            clients.append(cl)

            def on_data(data, stat, _k=k):
                t = now()
                with lock:
                    registered[0] += 1
                    if data is not None and bytes(data) == cur["val"]:
                        cur["times"].append(t)
            DataWatch(cl, KEY_FAN, on_data)
        deadline = time.monotonic() + 60
        while registered[0] < n and time.monotonic() < deadline:
            time.sleep(0.05)
        return fanout_rounds(lambda v: zk.set(KEY_FAN, v), cur, lock, n, P.fan_rounds,
                             "kazoo DataWatch (watch + get), one session each, spread over 3 members")
    finally:
        threading.stack_size(old_stack)
        for cl in clients:
            try:
                cl.stop()
                cl.close()
            except Exception:  # noqa: BLE001
                pass


# ============================================================================ AFS scale

def bench_scale(base: str, P: Params, res: dict) -> None:
    from afs import ops, wire
    sysm = AfsSystem(os.path.join(base, "afs-scale"))
    try:
        sysm.start()
        L = sysm.leader_index()
        F = next(i for i in range(3) if i != L)
        c = sysm.client()
        c.mkdir("/scale", parents=True)
        rss0 = {n: rss_bytes(m.pid) for n, m in sysm.cluster.members.items()}
        n = P.scale_nodes
        per_dir = 1000
        n_dirs = max(1, n // per_dir)
        stored = 0
        batch = []
        t0 = now()

        def flush():
            nonlocal batch
            if batch:
                c.txn(then=batch)
                batch = []
        created = 0
        for d in range(n_dirs):
            dp = f"/scale/d{d:04d}"
            batch.append(ops.Mkdir(dp, False, None))
            stored += len(dp)
            created += 1
            for f in range(per_dir - 1):
                if created >= n:
                    break
                p = f"{dp}/n{f:05d}"
                data = v100(d * per_dir + f, b"s")
                batch.append(ops.Create(p, data, None, False))
                stored += len(p) + len(data)
                created += 1
                if len(batch) >= 250:
                    flush()
        flush()
        load_s = now() - t0
        last_rev = c.status(sysm.addr(L))["revision"]
        sysm.cluster.wait_for_revision(last_rev, timeout=120)
        log(f"afs scale: loaded {created} nodes ({stored} bytes) in {load_s:.1f}s, revision {last_rev}")

        # snapshot size (the tree snapshot encoding a member would write / stream)
        host, _, port = sysm.addr(F).rpartition(":")
        import socket
        with socket.create_connection((host, int(port)), timeout=60) as s:
            s.sendall(wire.encode_frame({"id": 1, "op": "snapshot"}))
            f = s.makefile("rb")
            fr = wire.read_frame_sync(f, 1 << 30)
        snap_bytes = len(fr["ok"]["data"]) if "ok" in fr else None

        _ap, mnt = sysm.start_agent("agent-scale", [sysm.addr(F)])
        agent_sync_s = sysm.wait_agent_revision(mnt, last_rev, timeout=300)
        time.sleep(1.0)
        agent_rss = rss_bytes(_ap.pid)
        rss1 = {n_: rss_bytes(m.pid) for n_, m in sysm.cluster.members.items()}
        data_dirs = {n_: dir_bytes(m.data_dir) for n_, m in sysm.cluster.members.items()}

        # restart-to-serving: restart a follower, time until it answers a stale read at the
        # last revision (clean stop and crash)
        restart = {}
        fname = sysm.cluster.names[F]
        from afs.client import Client
        from afs import errors as afs_errors
        for how, sig in (("sigterm", signal.SIGTERM), ("sigkill", signal.SIGKILL)):
            m = sysm.cluster.member(fname)
            if sig == signal.SIGTERM:
                sysm.cluster.stop(fname)
            else:
                sysm.cluster.kill(fname, signal.SIGKILL)
            t_start = now()
            sysm.cluster.start([fname], wait=False)
            ok = None
            while now() - t_start < 300:
                try:
                    with Client([m.client_addr], timeout=0.5, connect_timeout=0.2) as mc:
                        g = mc.get("/scale/d0000/n00000", stale=True)
                        if g.revision >= last_rev:
                            ok = now() - t_start
                            break
                except afs_errors.AfsError:
                    pass
                time.sleep(0.01)
            restart[how] = round(ok, 3) if ok is not None else None
            log(f"afs scale: restart ({how}) to serving: {restart[how]} s")

        L_name = sysm.cluster.names[L]
        res["scale"]["afs"] = {
            "nodes": created, "stored_bytes": stored, "revision": last_rev,
            "load_seconds": round(load_s, 2),
            "snapshot_bytes": snap_bytes,
            "snapshot_bytes_per_node": round(snap_bytes / created, 1) if snap_bytes else None,
            "data_dir_bytes": data_dirs,
            "restart_to_serving_s": restart,
            "agent_initial_sync_s": round(agent_sync_s, 2),
            "server_rss_bytes": rss1, "server_rss_before_load_bytes": rss0,
            "leader_rss_per_stored_byte": round(rss1[L_name] / stored, 2) if rss1.get(L_name) else None,
            "leader_rss_growth_per_stored_byte": round((rss1[L_name] - rss0[L_name]) / stored, 2)
            if rss1.get(L_name) and rss0.get(L_name) else None,
            "agent_rss_bytes": agent_rss,
            "agent_rss_per_stored_byte": round(agent_rss / stored, 2) if agent_rss else None,
            "stored_bytes_definition": "sum of path bytes + file data bytes",
        }
        c.close()
    finally:
        sysm.stop()


# ============================================================================ main

def tmpfs_file(base_tmpfs: str) -> tuple[str, Callable[[], bytes]]:
    os.makedirs(base_tmpfs, exist_ok=True)
    p = os.path.join(base_tmpfs, "r1k")
    with open(p, "wb") as fh:
        fh.write(VALUE_1K)
    return p, file_reader(p)


def fs_type(path: str) -> str:
    best, typ = "", "?"
    with open("/proc/mounts") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) > 2 and path.startswith(parts[1]) and len(parts[1]) > len(best):
                best, typ = parts[1], parts[2]
    return typ


def versions(setup_info: dict) -> dict:
    import platform
    out = {"python": platform.python_version()}
    try:
        from importlib import metadata
        out["afs"] = metadata.version("afs")
    except Exception:  # noqa: BLE001
        out["afs"] = "?"
    out.update({"etcd": setup_info.get("etcd"), "zookeeper": setup_info.get("zookeeper"),
                "debian_packages": setup_info.get("debian"), "python_clients": setup_info.get("pip")})
    try:
        r = subprocess.run(["java", "-version"], capture_output=True, text=True, timeout=20)
        out["java"] = (r.stderr or r.stdout).splitlines()[0]
    except Exception:  # noqa: BLE001
        pass
    return out


def run(args) -> int:
    P = Params(args.quick)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    log(f"== peers bench ({'quick' if args.quick else 'full'}): {', '.join(systems)}")
    setup_info = peer_setup.ensure_all(log=log) if {"etcd", "zookeeper"} & set(systems) else {}
    parent = args.dir or str(REPO / "bench" / "out")
    os.makedirs(parent, exist_ok=True)
    if fs_type(os.path.abspath(parent)) in ("tmpfs", "ramfs"):
        log(f"refusing to put the clusters' data on {fs_type(parent)} ({parent}); use a real disk")
        return 2
    base = tempfile.mkdtemp(prefix="peers-", dir=parent)
    shm = tempfile.mkdtemp(prefix="afs-peers-tmpfs-", dir="/dev/shm") \
        if fs_type("/dev/shm") == "tmpfs" else None
    if shm is None:
        raise SystemExit("/dev/shm is not a tmpfs: no reference for the read figures")
    _, tmpfs_read = tmpfs_file(shm)
    res: dict = {k: {} for k in ("read", "seq_write", "throughput", "propagation", "fanout", "scale")}
    notes: list[str] = [
        "All clients are Python threads in one process on the same 2-CPU machine as the servers.",
        "etcd is driven through its v3 HTTP/JSON gateway with http.client (no protobuf); a Go "
        "gRPC client would skip the gateway hop and the JSON encoding.",
        "Propagation: latency = first seen by the observer - write acknowledged to the writer "
        "(0 when seen before the ack; count in seen_before_ack); observers sit on a follower.",
    ]
    if P.zk_fan_watchers < P.fan_watchers:
        notes.append(f"ZooKeeper fan-out uses {P.zk_fan_watchers} kazoo sessions, not "
                     f"{P.fan_watchers}: kazoo runs 3 threads per session and 1,000 sessions in one "
                     "Python process thrash a 2-CPU machine (sessions expire).")
    failures = {}

    def guarded(name, fn, *a):
        try:
            fn(*a)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - one system failing must not hide the others
            import traceback
            traceback.print_exc()
            failures[name] = f"{type(exc).__name__}: {exc}"
            log(f"!! {name} failed: {exc}")

    benches = []
    try:
        makers = {"afs": lambda: AfsBench(base, P, res, notes, tmpfs_read),
                  "etcd": lambda: EtcdBench(base, P, res, notes),
                  "zookeeper": lambda: ZkBench(base, P, res, notes)}
        # All clusters up first, then each workload for every system back to back, so the
        # systems are compared seconds apart rather than minutes apart on a noisy machine.
        for name in systems:
            if name not in makers:
                continue
            b = makers[name]()
            benches.append(b)
            guarded(f"{name}.start", b.start)
        live = [b for b in benches if f"{b.name}.start" not in failures]
        for step in ("read", "seq", "throughput", "propagation", "fanout"):
            for b in live:
                guarded(f"{b.name}.{step}", getattr(b, step))
        for b in benches:
            guarded(f"{b.name}.stop", b.stop)
        benches = []
        if "afs" in systems and not args.skip_scale:
            guarded("afs.scale", bench_scale, base, P, res)
    finally:
        for b in benches:
            try:
                b.stop()
            except Exception:  # noqa: BLE001
                pass
        shutil.rmtree(shm, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
        else:
            log(f"kept {base}")

    figures = res
    extra = {"quick": args.quick, "versions": versions(setup_info), "notes": notes,
             "failures": failures, "data_fs": fs_type(os.path.abspath(parent)),
             "params": {k: v for k, v in vars(P).items()}}
    section = report.evaluate_peers({"figures": figures, **extra})
    extra["targets"] = section["targets"]
    if not args.no_write:
        from bench import results as results_mod
        results_mod.record("peers", figures, path=args.out, extra=extra)
        log(f"wrote section 'peers' of {args.out}")
    for line in report.peers_lines({"figures": figures, **extra}):
        log(line)
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    from bench import results as results_mod
    ap = argparse.ArgumentParser(description="AFS vs etcd vs ZooKeeper vs tmpfs, side by side")
    ap.add_argument("--quick", action="store_true", help="smoke run (a few minutes)")
    ap.add_argument("--systems", default="afs,etcd,zookeeper")
    ap.add_argument("--dir", help="parent of the data directories (real disk; default bench/out)")
    ap.add_argument("--out", default=str(results_mod.DEFAULT_PATH))
    ap.add_argument("--no-write", action="store_true", help="do not touch the results file")
    ap.add_argument("--keep", action="store_true", help="keep data directories and logs")
    ap.add_argument("--skip-scale", action="store_true")
    args = ap.parse_args(argv)
    sys.setswitchinterval(0.0005)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
