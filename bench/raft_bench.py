"""Raft engine benchmark: three real member processes on 127.0.0.1, fsync ON, no-op state
machine, 100-byte proposals.

    python -m bench.raft_bench [--quick] [--dir DIR] [--out bench/results.json] [--no-write]
                               [--profile on-miss|always|never] [--py-spy PATH] [--keep]
                               [--member-arg=--legacy-await]   # A/B of the driver change

Figures (one line each, with its target; a miss is reported with its real number):

  raft.fsync_reference.idle raw write(100 B) + fdatasync on the same disk, same directory,
  raft.fsync_reference.busy before and after the Raft runs (the disk is shared and noisy:
                            ratios to this are what compare across runs and machines); "busy"
                            repeats it with one spinning helper process, because on this VM an
                            fdatasync costs ~4 ms while every vCPU is idle and ~0.15 ms while one
                            is running (the completion is slow to reach a halted vCPU)
  raft.seq_commit_latency   one proposer inside the leader: propose -> applied on the leader;
                            median, p90, p99. Target: median <= 2 ms
  raft.throughput_c32       32 proposer tasks inside the leader's process for T seconds;
                            committed proposals/s, leader fsyncs/s and average batch
                            (proposals per leader fsync) from node.stats.
                            Target: >= 10,000 proposals/s
  raft.failover             SIGKILL the leader -> first successful proposal on the new leader
                            (each survivor probes in-process; its success time is taken on
                            the system-wide monotonic clock). Target: median <= 1.5 s
  raft.*_nofsync            the same seq/throughput with fsync OFF (reference only, no target:
                            what the engine costs without the disk)

Members run ``bench/raft_member.py`` with the server's default Raft timing (``NodeConfig()``:
50 ms tick, election timeout 0.5-1 s, heartbeat 100 ms). Data directories live on the real
disk (``bench/out/`` by default, which is git-ignored); tmpfs is refused because the fsync
figures would be meaningless. If the throughput target is missed (``--profile on-miss``, the
default) a second, profiled throughput run (cProfile on the leader's event loop, plus py-spy
on the whole leader process when available) reports where the time goes; its numbers are not
the figure. Results are merged into ``bench/results.json`` under "raft" (see bench/results.py).
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import os
import pstats
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import results as results_mod

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
NAMES = ("n1", "n2", "n3")
PROPOSAL_SIZE = 100

TARGET_SEQ_MEDIAN_MS = 2.0
TARGET_THROUGHPUT = 10_000.0
TARGET_FAILOVER_MEDIAN_MS = 1500.0


# ---------------------------------------------------------------------------- helpers

def pct(sorted_vals: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (q in 0..1)."""
    if not sorted_vals:
        return float("nan")
    k = max(0, min(len(sorted_vals) - 1, math.ceil(q * len(sorted_vals)) - 1))
    return sorted_vals[k]


def fs_type(path: str) -> str:
    """File system type of the mount holding ``path`` (longest mount-point prefix)."""
    real = os.path.realpath(path)
    best, best_type = "", "unknown"
    try:
        with open("/proc/self/mounts", encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mnt = parts[1].replace("\\040", " ")
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, best_type = mnt, parts[2]
    except OSError:
        pass
    return best_type


def raw_fsync_reference(directory: str, n: int = 200, size: int = PROPOSAL_SIZE) -> list[float]:
    """Seconds for each of ``n`` appends of ``size`` bytes + fdatasync (what the WAL does)."""
    path = os.path.join(directory, "fsync-reference.dat")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_TRUNC, 0o600)
    buf = os.urandom(size)
    sync = getattr(os, "fdatasync", os.fsync)
    out = []
    pc = time.perf_counter
    try:
        for _ in range(n):
            t0 = pc()
            os.write(fd, buf)
            sync(fd)
            out.append(pc() - t0)
    finally:
        os.close(fd)
        os.unlink(path)
    return out


def fsync_references(directory: str, n: int) -> dict[str, list[float]]:
    """The raw fsync reference twice: on an otherwise idle machine, and with one CPU kept busy
    by a spinning helper process. On this VM (virtio disk) an fdatasync issued while every
    vCPU is idle costs ~4 ms, but ~0.15 ms while another vCPU is running: the completion is
    slow to reach a halted vCPU. A Raft cluster under load is somewhere in between, so both
    are reported."""
    idle = raw_fsync_reference(directory, n)
    spin = subprocess.Popen([PY, "-c", "while True: pass"], stdin=subprocess.DEVNULL)
    try:
        time.sleep(0.2)
        busy = raw_fsync_reference(directory, n)
    finally:
        os.kill(spin.pid, signal.SIGKILL)   # the helper this function started, by its pid
        spin.wait()
    return {"idle": idle, "busy": busy}


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def verdict(met: bool) -> str:
    return "MET" if met else "MISSED"


# ---------------------------------------------------------------------------- cluster

class MemberProc:
    def __init__(self, name: str, data_dir: Path, peer_port: int, control_port: int,
                 log_path: Path):
        self.name = name
        self.data_dir = data_dir
        self.peer_addr = f"127.0.0.1:{peer_port}"
        self.control_addr = ("127.0.0.1", control_port)
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None


class Cluster:
    """Three bench members on 127.0.0.1, each in its own process and data directory."""

    def __init__(self, root: Path, *, fsync: bool, member_args: tuple[str, ...] = ()):
        self.root = root
        self.fsync = fsync
        self.member_args = tuple(member_args)
        ports = free_ports(2 * len(NAMES))
        self.members = {
            name: MemberProc(name, root / name, ports[2 * i], ports[2 * i + 1], root / f"{name}.log")
            for i, name in enumerate(NAMES)}
        self.cluster_spec = ",".join(f"{m.name}={m.peer_addr}" for m in self.members.values())

    def spawn(self, name: str) -> None:
        m = self.members[name]
        cmd = [PY, "-m", "bench.raft_member", "--name", name, "--data-dir", str(m.data_dir),
               "--peer-addr", m.peer_addr, "--control-addr", f"{m.control_addr[0]}:{m.control_addr[1]}",
               "--cluster", self.cluster_spec]
        if not self.fsync:
            cmd.append("--no-fsync")
        cmd += self.member_args
        log = open(m.log_path, "ab")
        try:
            m.proc = subprocess.Popen(cmd, cwd=str(REPO), stdout=log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL)
        finally:
            log.close()

    async def call(self, name: str, req: dict, timeout: float = 60.0) -> dict:
        m = self.members[name]
        reader, writer = await asyncio.wait_for(asyncio.open_connection(*m.control_addr), 5.0)
        try:
            writer.write(json.dumps(req).encode() + b"\n")
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), timeout)
            if not line:
                raise RuntimeError(f"{name}: control connection closed (see {m.log_path})")
            resp = json.loads(line)
        finally:
            writer.close()
        if "error" in resp and resp.get("ok") is not False:
            raise RuntimeError(f"{name}: {resp['error']}")
        return resp

    async def wait_control(self, name: str, timeout: float = 30.0) -> None:
        m = self.members[name]
        deadline = time.monotonic() + timeout
        while True:
            if m.proc is not None and m.proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {m.proc.returncode}: {self.log_tail(name)}")
            try:
                await self.call(name, {"cmd": "status"}, timeout=5.0)
                return
            except (OSError, asyncio.TimeoutError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name}: control port not up after {timeout}s") from None
                await asyncio.sleep(0.05)

    def log_tail(self, name: str, n: int = 2000) -> str:
        try:
            return self.members[name].log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    async def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for name in NAMES:
            self.spawn(name)
        for name in NAMES:
            await self.wait_control(name)

    async def statuses(self, names=None) -> dict[str, dict]:
        names = list(names or NAMES)
        res = await asyncio.gather(*(self.call(n, {"cmd": "status"}, 5.0) for n in names))
        return dict(zip(names, res))

    async def wait_stable(self, timeout: float = 30.0, alive=None) -> str:
        """Until every live member agrees on one leader and has applied its commit index."""
        alive = list(alive or NAMES)
        deadline = time.monotonic() + timeout
        while True:
            try:
                st = await self.statuses(alive)
                leaders = {s["status"]["leader"] for s in st.values()}
                if len(leaders) == 1 and "" not in leaders:
                    leader = leaders.pop()
                    if leader in st and st[leader]["status"]["role"] == "leader":
                        commit = st[leader]["status"]["commit_index"]
                        if all(s["status"]["applied_index"] >= commit for s in st.values()):
                            return leader
            except (OSError, asyncio.TimeoutError, RuntimeError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"no stable leader within {timeout}s")
            await asyncio.sleep(0.05)

    def kill9(self, name: str) -> None:
        p = self.members[name].proc
        os.kill(p.pid, signal.SIGKILL)

    def reap(self, name: str) -> None:
        p = self.members[name].proc
        if p is not None:
            p.wait(timeout=10)

    async def stop(self) -> None:
        for name, m in self.members.items():
            if m.proc is None or m.proc.poll() is not None:
                continue
            try:
                await self.call(name, {"cmd": "quit"}, timeout=5.0)
            except (OSError, asyncio.TimeoutError, RuntimeError, json.JSONDecodeError):
                pass
        for name, m in self.members.items():
            if m.proc is None:
                continue
            try:
                m.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                m.proc.kill()     # only the member processes this benchmark started
                m.proc.wait(timeout=10)


# ---------------------------------------------------------------------------- measurements

async def measure_seq(cl: Cluster, leader: str, n: int, warmup: int) -> dict:
    r = await cl.call(leader, {"cmd": "seq", "n": n, "size": PROPOSAL_SIZE, "warmup": warmup},
                      timeout=600)
    lat = sorted(r["lat"])
    d = r["stats_delta"]
    return {"n": n, "median_ms": statistics.median(lat) * 1e3, "p90_ms": pct(lat, 0.90) * 1e3,
            "p99_ms": pct(lat, 0.99) * 1e3, "max_ms": lat[-1] * 1e3,
            "mean_ms": statistics.fmean(lat) * 1e3, "leader_fsyncs": d.get("fsyncs"),
            "leader_ready_batches": d.get("ready_batches")}


async def measure_conc(cl: Cluster, leader: str, c: int, seconds: float, warmup: float,
                       profile: str | None = None) -> dict:
    followers = [n for n in NAMES if n != leader]
    f0 = await cl.statuses(followers)
    r = await cl.call(leader, {"cmd": "conc", "c": c, "seconds": seconds, "warmup": warmup,
                               "size": PROPOSAL_SIZE, "profile": profile},
                      timeout=seconds + warmup + 120)
    f1 = await cl.statuses(followers)
    d = r["stats_delta"]
    el = r["elapsed"]
    fsyncs = d.get("fsyncs", 0)
    fol_fsyncs = [(f1[n]["stats"]["fsyncs"] - f0[n]["stats"]["fsyncs"]) / el for n in followers]
    return {"concurrency": c, "seconds": round(el, 3), "committed": r["committed"],
            "proposals_per_s": r["committed"] / el,
            "fsyncs_per_s": fsyncs / el,
            "avg_batch": (d.get("proposals", 0) / fsyncs) if fsyncs else None,
            "ready_batches_per_s": d.get("ready_batches", 0) / el,
            "follower_fsyncs_per_s": [round(x, 1) for x in fol_fsyncs],
            "lat_median_ms": r["lat_median"] * 1e3 if r["lat_median"] is not None else None,
            "lat_p99_ms": r["lat_p99"] * 1e3 if r["lat_p99"] is not None else None,
            "errors": r["errors"]}


async def measure_failover(cl: Cluster, runs: int, log) -> dict:
    times_ms: list[float] = []
    details = []
    for i in range(runs):
        leader = await cl.wait_stable()
        await asyncio.sleep(0.5)   # let the restarted member settle into heartbeats
        survivors = [n for n in NAMES if n != leader]
        probes = [asyncio.create_task(cl.call(n, {"cmd": "failover_probe", "old_leader": leader,
                                                  "timeout": 20.0}, timeout=30.0))
                  for n in survivors]
        await asyncio.sleep(0.05)  # the probes are running in the survivors
        t_kill = time.monotonic()
        cl.kill9(leader)
        res = await asyncio.gather(*probes, return_exceptions=True)
        cl.reap(leader)
        ok = [r for r in res if isinstance(r, dict) and r.get("ok")]
        if not ok:
            log(f"  failover run {i + 1}: no survivor accepted a write: {res!r}")
            details.append({"killed": leader, "ok": False})
        else:
            t = min(r["t"] for r in ok) - t_kill
            new = min(ok, key=lambda r: r["t"])
            times_ms.append(t * 1e3)
            details.append({"killed": leader, "new_leader": new["name"], "term": new["term"],
                            "ms": round(t * 1e3, 1)})
            log(f"  failover run {i + 1}/{runs}: killed {leader} -> {new['name']} accepted a "
                f"write after {t * 1e3:.0f} ms (term {new['term']})")
        cl.spawn(leader)           # back to three members for the next run
        await cl.wait_control(leader)
    await cl.wait_stable()
    s = sorted(times_ms)
    return {"runs": runs, "succeeded": len(s),
            "median_ms": statistics.median(s) if s else None,
            "min_ms": s[0] if s else None, "max_ms": s[-1] if s else None,
            "all_ms": [round(x, 1) for x in times_ms], "details": details}


def summarize_cprofile(path: str, top: int = 20) -> dict:
    st = pstats.Stats(path)
    total = st.total_tt
    rows = []
    for (fn, line, func), (cc, nc, tt, ct, _callers) in st.stats.items():
        rows.append((tt, ct, nc, f"{os.path.relpath(fn, REPO) if fn.startswith(str(REPO)) else fn}:{line}({func})"))
    by_tt = sorted(rows, reverse=True)[:top]
    by_ct = sorted(rows, key=lambda r: r[1], reverse=True)[:top]
    fmt = lambda r: {"func": r[3], "tottime_s": round(r[0], 4), "cumtime_s": round(r[1], 4),
                     "calls": r[2], "tottime_pct": round(100 * r[0] / total, 1) if total else None}
    return {"total_s": round(total, 3), "by_tottime": [fmt(r) for r in by_tt],
            "by_cumtime": [fmt(r) for r in by_ct]}


def summarize_pyspy(path: str, top: int = 20) -> dict:
    """Self and inclusive sample shares per frame from py-spy's collapsed ('raw') output."""
    self_c: collections.Counter = collections.Counter()
    incl_c: collections.Counter = collections.Counter()
    thread_c: collections.Counter = collections.Counter()
    total = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            total += n
            frames = stack.split(";")
            thread_c[frames[0]] += n
            self_c[frames[-1]] += n
            for fr in set(frames[1:]):
                incl_c[fr] += n
    share = lambda c: [{"frame": k, "pct": round(100 * v / total, 1)} for k, v in c.most_common(top)]
    return {"samples": total, "threads": share(thread_c), "self": share(self_c),
            "inclusive": share(incl_c)}


# ---------------------------------------------------------------------------- main

def find_py_spy(explicit: str | None) -> str | None:
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    for cand in (shutil.which("py-spy"), "/var/tmp/afs-bench-tools/bin/py-spy"):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


async def run(args) -> int:
    quick = args.quick
    seq_n = args.seq_n or (200 if quick else 2000)
    conc_s = args.seconds or (3.0 if quick else 10.0)
    conc_warm = 0.5 if quick else 1.0
    fo_runs = args.failover_runs or (3 if quick else 9)
    fsync_n = 50 if quick else 200
    lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)

    def line(msg: str) -> None:
        lines.append(msg)
        print(msg, flush=True)

    base = Path(args.dir) if args.dir else REPO / "bench" / "out"
    base.mkdir(parents=True, exist_ok=True)
    fstype = fs_type(str(base))
    if fstype in ("tmpfs", "ramfs"):
        print(f"refusing to run the fsync figures on {fstype} ({base}); use a real disk (--dir)",
              file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="raft-bench-", dir=str(base)))
    log(f"== raft bench ({'quick' if quick else 'full'}) in {root} ({fstype}); "
        f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    figures: dict = {}
    profile_info: dict = {}
    load_start = os.getloadavg()
    try:
        ref_before = fsync_references(str(root), fsync_n)

        cl = Cluster(root / "fsync", fsync=True, member_args=args.member_arg)
        try:
            await cl.start()
            leader = await cl.wait_stable()
            log(f"cluster up, leader {leader}")
            seq = await measure_seq(cl, leader, seq_n, warmup=50)
            conc = await measure_conc(cl, leader, args.concurrency, conc_s, conc_warm)
            missed_tp = conc["proposals_per_s"] < TARGET_THROUGHPUT
            if args.profile == "always" or (args.profile == "on-miss" and missed_tp):
                profile_info = await profile_leader(cl, args, root, conc_s, conc_warm, log)
            fo = await measure_failover(cl, fo_runs, log)
        finally:
            await cl.stop()
        ref_after = fsync_references(str(root), fsync_n)

        nofsync = None
        if not args.skip_nofsync:
            cl2 = Cluster(root / "nofsync", fsync=False, member_args=args.member_arg)
            try:
                await cl2.start()
                l2 = await cl2.wait_stable()
                nofsync = {"seq": await measure_seq(cl2, l2, seq_n, warmup=50),
                           "conc": await measure_conc(cl2, l2, args.concurrency, conc_s, conc_warm)}
            finally:
                await cl2.stop()
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    # ---- report
    load_end = os.getloadavg()
    log(f"load average (1/5/15 min) at start {load_start[0]:.1f}/{load_start[1]:.1f}/"
        f"{load_start[2]:.1f}, at end {load_end[0]:.1f}/{load_end[1]:.1f}/{load_end[2]:.1f} "
        f"on {os.cpu_count()} CPUs (other work on the machine distorts every figure)")
    ref = {}
    for kind in ("idle", "busy"):
        vals = sorted(ref_before[kind] + ref_after[kind])
        ref[kind] = {"n": len(vals), "median_ms": statistics.median(vals) * 1e3,
                     "p90_ms": pct(vals, 0.9) * 1e3, "p99_ms": pct(vals, 0.99) * 1e3,
                     "median_before_ms": statistics.median(ref_before[kind]) * 1e3,
                     "median_after_ms": statistics.median(ref_after[kind]) * 1e3}
    ref_med = ref["idle"]["median_ms"] / 1e3
    busy_med = ref["busy"]["median_ms"] / 1e3
    figures["raft.fsync_reference"] = dict(
        ref, fs_type=fstype,
        what=f"write({PROPOSAL_SIZE} B) + fdatasync appending to one file in the data directory's "
             f"file system; 'idle': nothing else running, 'busy': one spinning helper process")
    for kind in ("idle", "busy"):
        r = ref[kind]
        line(f"raft.fsync_reference.{kind} median={r['median_ms']:.2f}ms p90={r['p90_ms']:.2f}ms "
             f"p99={r['p99_ms']:.2f}ms (before={r['median_before_ms']:.2f}ms "
             f"after={r['median_after_ms']:.2f}ms, n={r['n']}, {fstype})")

    met = seq["median_ms"] <= TARGET_SEQ_MEDIAN_MS
    seq["ratio_to_fsync"] = seq["median_ms"] / (ref_med * 1e3)
    seq["ratio_to_fsync_busy"] = seq["median_ms"] / (busy_med * 1e3)
    seq.update(target=f"median<={TARGET_SEQ_MEDIAN_MS:g}ms", met=met)
    figures["raft.seq_commit_latency"] = seq
    line(f"raft.seq_commit_latency median={seq['median_ms']:.2f}ms p90={seq['p90_ms']:.2f}ms "
         f"p99={seq['p99_ms']:.2f}ms n={seq['n']} ratio_to_fsync={seq['ratio_to_fsync']:.2f}x(idle)/"
         f"{seq['ratio_to_fsync_busy']:.1f}x(busy) "
         f"target<={TARGET_SEQ_MEDIAN_MS:g}ms {verdict(met)}")

    met = conc["proposals_per_s"] >= TARGET_THROUGHPUT
    conc.update(target=f">={TARGET_THROUGHPUT:.0f}/s", met=met)
    figures[f"raft.throughput_c{args.concurrency}"] = conc
    line(f"raft.throughput_c{args.concurrency} proposals/s={conc['proposals_per_s']:.0f} "
         f"fsyncs/s={conc['fsyncs_per_s']:.0f} avg_batch={conc['avg_batch'] or 0:.1f} "
         f"lat_median={conc['lat_median_ms'] or 0:.2f}ms follower_fsyncs/s="
         f"{'/'.join(f'{x:.0f}' for x in conc['follower_fsyncs_per_s'])} "
         f"target>={TARGET_THROUGHPUT:.0f}/s {verdict(met)}")

    fmed = fo["median_ms"]
    met = fmed is not None and fmed <= TARGET_FAILOVER_MEDIAN_MS and fo["succeeded"] == fo["runs"]
    fo.update(target=f"median<={TARGET_FAILOVER_MEDIAN_MS:.0f}ms", met=met)
    figures["raft.failover"] = fo
    line(f"raft.failover median={fmed if fmed is not None else float('nan'):.0f}ms "
         f"min={fo['min_ms'] or 0:.0f}ms max={fo['max_ms'] or 0:.0f}ms "
         f"runs={fo['succeeded']}/{fo['runs']} target<={TARGET_FAILOVER_MEDIAN_MS:.0f}ms "
         f"{verdict(met)}")

    if nofsync is not None:
        s2, c2 = nofsync["seq"], nofsync["conc"]
        figures["raft.seq_commit_latency_nofsync"] = s2
        figures[f"raft.throughput_c{args.concurrency}_nofsync"] = c2
        line(f"raft.seq_commit_latency_nofsync median={s2['median_ms']:.2f}ms "
             f"p90={s2['p90_ms']:.2f}ms p99={s2['p99_ms']:.2f}ms (reference, no target)")
        line(f"raft.throughput_c{args.concurrency}_nofsync proposals/s={c2['proposals_per_s']:.0f} "
             f"ready_batches/s={c2['ready_batches_per_s']:.0f} "
             f"avg_batch={c2['avg_batch'] or 0:.1f} (reference, no target)")

    if profile_info:
        print_profile(profile_info)

    if not args.no_write:
        figures_out = {k: v for k, v in figures.items()}
        extra = {"mode": "quick" if quick else "full", "lines": lines,
                 "loadavg_start": list(load_start), "loadavg_end": list(load_end),
                 "setup": {"members": 3, "host": "127.0.0.1", "fsync": True,
                           "proposal_bytes": PROPOSAL_SIZE, "state_machine": "no-op",
                           "raft_config": "NodeConfig() defaults", "fs_type": fstype,
                           "member_args": list(args.member_arg)}}
        if profile_info:
            extra["profile"] = profile_info
        results_mod.record("raft", _json_safe(figures_out), path=args.out, extra=_json_safe(extra))
        log(f"wrote section 'raft' of {args.out}")
    return 0


def _json_safe(obj):
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else round(obj, 4)
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


async def profile_leader(cl: Cluster, args, root: Path, seconds: float, warmup: float,
                         log) -> dict:
    """A second throughput run on the leader under cProfile (event-loop thread) and, when
    available, py-spy (whole process, all threads). Its rate is NOT the figure."""
    leader = await cl.wait_stable()
    pid = cl.members[leader].proc.pid
    out: dict = {"leader": leader}
    prof_path = str(root / "leader.cprofile")
    spy = find_py_spy(args.py_spy)
    spy_proc = None
    spy_out = str(root / "leader.pyspy.txt")
    log(f"profiling the leader {leader} (pid {pid}) during a {seconds:g}s throughput run"
        f"{' with cProfile + py-spy' if spy else ' with cProfile'}")
    if spy:
        # py-spy first, in its own run (cProfile's overhead would distort its picture)
        spy_proc = subprocess.Popen([spy, "record", "-p", str(pid), "-d", str(int(seconds + warmup)),
                                     "-r", "250", "-f", "raw", "-o", spy_out, "--nonblocking"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        r_spy = await measure_conc(cl, leader, args.concurrency, seconds, warmup)
        try:
            _, err = spy_proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            spy_proc.kill()
            _, err = spy_proc.communicate()
        if os.path.exists(spy_out):
            out["py_spy"] = summarize_pyspy(spy_out)
            out["py_spy"]["run_proposals_per_s"] = round(r_spy["proposals_per_s"])
        else:
            out["py_spy_error"] = (err or b"").decode(errors="replace")[-500:]
    r = await measure_conc(cl, leader, args.concurrency, seconds, warmup, profile=prof_path)
    out["cprofile"] = summarize_cprofile(prof_path)
    out["cprofile"]["run_proposals_per_s"] = round(r["proposals_per_s"])
    return out


def print_profile(p: dict) -> None:
    print(f"\n== profile of the leader {p['leader']} during a throughput run "
          f"(these runs' rates are not the figure)")
    if "py_spy" in p:
        s = p["py_spy"]
        print(f"-- py-spy (whole process, {s['samples']} samples, run at "
              f"{s['run_proposals_per_s']} proposals/s); threads:")
        for r in s["threads"]:
            print(f"   {r['pct']:5.1f}%  {r['frame']}")
        print("   self (leaf frame):")
        for r in s["self"][:15]:
            print(f"   {r['pct']:5.1f}%  {r['frame']}")
        print("   inclusive:")
        for r in s["inclusive"][:20]:
            print(f"   {r['pct']:5.1f}%  {r['frame']}")
    elif "py_spy_error" in p:
        print(f"-- py-spy failed: {p['py_spy_error']}")
    c = p["cprofile"]
    print(f"-- cProfile (event-loop thread, {c['total_s']}s of profiled time, run at "
          f"{c['run_proposals_per_s']} proposals/s); by own time:")
    for r in c["by_tottime"]:
        print(f"   {r['tottime_pct']:5.1f}% {r['tottime_s']:8.3f}s {r['calls']:>9}  {r['func']}")
    print("   by cumulative time:")
    for r in c["by_cumtime"][:15]:
        print(f"   {r['cumtime_s']:8.3f}s {r['calls']:>9}  {r['func']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Raft engine benchmark (3 processes, fsync on)")
    ap.add_argument("--quick", action="store_true", help="smoke run in under a minute")
    ap.add_argument("--dir", help="parent directory for data dirs (real disk; default bench/out)")
    ap.add_argument("--out", default=str(results_mod.DEFAULT_PATH), help="results JSON file")
    ap.add_argument("--no-write", action="store_true", help="do not touch the results file")
    ap.add_argument("--keep", action="store_true", help="keep data dirs and member logs")
    ap.add_argument("--seq-n", type=int, default=0, help="sequential proposals (default 2000)")
    ap.add_argument("--seconds", type=float, default=0, help="throughput window (default 10)")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--failover-runs", type=int, default=0, help="default 9 (quick: 3)")
    ap.add_argument("--skip-nofsync", action="store_true", help="skip the fsync-off reference")
    ap.add_argument("--profile", choices=("on-miss", "always", "never"), default=None,
                    help="profile the leader if throughput misses (default on-miss; quick: never)")
    ap.add_argument("--py-spy", help="path to py-spy (default: $PATH or /var/tmp/afs-bench-tools)")
    ap.add_argument("--member-arg", action="append", default=[],
                    help="extra argument for every bench/raft_member.py (A/B runs)")
    args = ap.parse_args(argv)
    if args.profile is None:
        args.profile = "never" if args.quick else "on-miss"
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
