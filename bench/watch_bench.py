"""Watch benchmark: three real ``afs server`` processes on 127.0.0.1 (fsync on) and one agent.

    python -m bench.watch_bench [--quick] [--dir DIR] [--out PATH] [--no-write]

Figures (one line each, with its target and MET|MISSED; a miss is reported with its number):

  watch.ack_to_event      one writer (Client to the leader), one watcher connected to ANOTHER
                          member (a follower); per write: event received by the watcher minus
                          write acknowledged to the writer, both on the system-wide monotonic
                          clock. Can be negative (the follower may deliver before the ack reaches
                          the writer). Targets: median <= 1 ms, p99 <= 5 ms.
  watch.write_to_event    the same from the moment the write was sent (reference, no target).
  watch.fanout_local      1,000 watchers on one agent's local socket (in 4 client processes),
                          one write: all delivered? p99 (and max) of ack -> event.
                          Target: all delivered, p99 <= 200 ms.
  watch.cluster_streams   watchers the cluster sees for those 1,000 local watchers (sum of
                          ``status().watchers`` over members, minus the count before the agent
                          started). Target: 1.

Results are merged into bench/results.json under "watch" (bench/results.py).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from afs.client import Client  # noqa: E402
from afs.testing.cluster import ProcessCluster  # noqa: E402

now = time.monotonic        # CLOCK_MONOTONIC: comparable across processes on this host


def pct(xs, p):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = min(len(xs) - 1, max(0, int(round(p / 100 * (len(xs) - 1)))))
    return xs[k]


def line(name, value, unit, target, met):
    mark = "" if target is None else (" MET" if met else " MISSED")
    tgt = "" if target is None else f" (target {target})"
    print(f"{name}: {value}{unit}{tgt}{mark}", flush=True)


# ---------------------------------------------------------------- fan-out child

def fanout_child(n: int, sock: str, prefix: str) -> None:
    """N watchers on the agent socket; prints 'ready', then one JSON list of receive times."""
    watches = [Client.local(sock, timeout=30).watch(prefix, idle_timeout=60) for _ in range(n)]
    times = [None] * n

    def run(i):
        g = next(watches[i])
        times[i] = [now(), g.revision]

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    print("ready", flush=True)
    for t in threads:
        t.join(30)
    print(json.dumps(times), flush=True)
    for w in watches:
        w.cancel()


# ---------------------------------------------------------------- main

def total_watchers(cl) -> int:
    return sum(s.get("watchers", 0) for s in cl.status().values() if isinstance(s, dict))


def bench_latency(cl, leader, n, figures):
    follower = next(name for name in cl.names if name != leader)
    faddr = cl.member(follower).client_addr
    recv: dict[int, float] = {}
    with cl.client(timeout=10) as c:
        c.mkdir("/bench/lat", parents=True)
        w = Client([faddr]).watch("/bench/lat")

        def reader():
            for g in w:
                recv[g.revision] = now()

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        sent, acked = {}, {}
        for i in range(n + 20):
            t0 = now()
            r = c.put("/bench/lat/k", b"x" * 100)
            t1 = now()
            if i >= 20:                      # warm-up
                sent[r.revision], acked[r.revision] = t0, t1
            time.sleep(0.002)
        deadline = now() + 10
        while now() < deadline and not all(rv in recv for rv in acked):
            time.sleep(0.01)
        w.cancel()
        t.join(5)
    got = [rv for rv in acked if rv in recv]
    a2e = [(recv[rv] - acked[rv]) * 1000 for rv in got]
    w2e = [(recv[rv] - sent[rv]) * 1000 for rv in got]
    med, p99 = statistics.median(a2e), pct(a2e, 99)
    line("watch.ack_to_event.median", f"{med:.3f}", " ms", "<= 1 ms", med <= 1.0)
    line("watch.ack_to_event.p99", f"{p99:.3f}", " ms", "<= 5 ms", p99 <= 5.0)
    line("watch.write_to_event.median", f"{statistics.median(w2e):.3f}", " ms", None, None)
    line("watch.write_to_event.p99", f"{pct(w2e, 99):.3f}", " ms", None, None)
    line("watch.ack_to_event.delivered", f"{len(got)}/{len(acked)}", "", f"{len(acked)}/{len(acked)}",
         len(got) == len(acked))
    figures["ack_to_event_ms"] = {"median": med, "p90": pct(a2e, 90), "p99": p99, "max": max(a2e),
                                  "min": min(a2e), "n": len(a2e), "watcher_member": follower,
                                  "writer_member": leader}
    figures["write_to_event_ms"] = {"median": statistics.median(w2e), "p99": pct(w2e, 99)}
    figures["write_ms"] = {"median": statistics.median([(acked[r] - sent[r]) * 1000 for r in got])}


def bench_fanout(cl, base_dir, n_watchers, procs, figures):
    before = total_watchers(cl)
    adir = os.path.join(base_dir, "agent")
    os.makedirs(adir, exist_ok=True)
    sock = os.path.join(adir, "agent.sock")
    log = open(os.path.join(adir, "agent.log"), "ab")
    agent = subprocess.Popen([sys.executable, "-m", "afs_cli.main", "agent", "--endpoints",
                              ",".join(cl.endpoints), "--cache-dir", os.path.join(adir, "cache"),
                              "--socket", sock, "--log-level", "WARNING"],
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    children = []
    try:
        deadline = now() + 20
        while True:
            try:
                Client.local(sock, timeout=1).status()
                break
            except Exception:  # noqa: BLE001
                if now() > deadline or agent.poll() is not None:
                    raise RuntimeError("agent did not start")
                time.sleep(0.05)
        with cl.client(timeout=10) as c:
            c.mkdir("/bench/fan", parents=True)
            per = n_watchers // procs
            for _ in range(procs):
                children.append(subprocess.Popen(
                    [sys.executable, "-m", "bench.watch_bench", "--fanout-child", str(per), sock, "/bench/fan"],
                    cwd=REPO, stdout=subprocess.PIPE, text=True))
            for ch in children:
                assert ch.stdout.readline().strip() == "ready"
            time.sleep(0.5)
            local = Client.local(sock).status()
            streams = total_watchers(cl) - before
            t0 = now()
            r = c.put("/bench/fan/k", b"fan-out")
            t1 = now()
        times = []
        for ch in children:
            out = ch.stdout.readline()
            times += json.loads(out) if out else []
            ch.wait(30)
        lat = [(t - t1) * 1000 for t, rev in (x for x in times if x) if rev == r.revision]
        delivered = len(lat)
        p99 = pct(lat, 99) if lat else float("nan")
        line("watch.fanout_local.delivered", f"{delivered}/{per * procs}", "", f"{per * procs}/{per * procs}",
             delivered == per * procs)
        line("watch.fanout_local.p99", f"{p99:.1f}", " ms", "<= 200 ms", delivered == per * procs and p99 <= 200)
        line("watch.fanout_local.median", f"{statistics.median(lat) if lat else float('nan'):.1f}", " ms", None, None)
        line("watch.fanout_local.min", f"{min(lat) if lat else float('nan'):.1f}", " ms", None, None)
        line("watch.fanout_local.max", f"{max(lat) if lat else float('nan'):.1f}", " ms", None, None)
        line("watch.cluster_streams", f"{streams}", "", "1", streams == 1)
        figures["fanout_local"] = {"watchers": per * procs, "client_processes": procs,
                                   "delivered": delivered, "median_ms": statistics.median(lat) if lat else None,
                                   "p99_ms": p99, "max_ms": max(lat) if lat else None,
                                   "agent_watchers": local.get("watchers"), "write_ms": (t1 - t0) * 1000}
        figures["cluster_streams"] = streams
    finally:
        for ch in children:
            if ch.poll() is None:
                ch.kill()
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(15)
        except subprocess.TimeoutExpired:
            agent.kill()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dir", default=None, help="working directory (default: a temp dir under bench/out)")
    ap.add_argument("--out", default=None, help="results file (default bench/results.json)")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--watchers", type=int, default=1000)
    ap.add_argument("--procs", type=int, default=4, help="client processes for the fan-out")
    ap.add_argument("--only", choices=["latency", "fanout"], default=None)
    ap.add_argument("--fanout-child", nargs=3, metavar=("N", "SOCK", "PREFIX"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.fanout_child:
        n, sock, prefix = args.fanout_child
        fanout_child(int(n), sock, prefix)
        return 0
    n = 200 if args.quick else 1000
    root = os.path.join(REPO, "bench", "out")
    os.makedirs(root, exist_ok=True)
    base = args.dir or tempfile.mkdtemp(prefix="watch-", dir=root)
    figures: dict = {}
    print(f"== watch bench ({'quick' if args.quick else 'full'}) in {base}", flush=True)
    cl = ProcessCluster(os.path.join(base, "cluster"), 3, log_level="WARNING")
    try:
        cl.start()
        leader = cl.wait_for_leader(30)
        if args.only != "fanout":
            bench_latency(cl, leader, n, figures)
        if args.only != "latency":
            bench_fanout(cl, base, args.watchers, args.procs, figures)
    finally:
        cl.stop_all()
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)
    if not args.no_write:
        try:
            from bench import results
            kw = {"path": args.out} if args.out else {}
            results.record("watch", figures, extra={"mode": "quick" if args.quick else "full"}, **kw)
        except ImportError:
            out = args.out or os.path.join(REPO, "bench", "out", "watch.json")
            with open(out, "w") as fh:
                json.dump(figures, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
