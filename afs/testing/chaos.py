"""Jepsen-style fault suite: real servers (and an agent with a FUSE mount) in network
namespaces, random faults from a seed, concurrent workloads, and history checkers.

Run::

    python -m afs.testing.chaos --profile quick|long [--seed S] [--report FILE]

Hosts: each server ``nX`` (and the agent) runs in its own network namespace joined to a private
bridge (:mod:`afs.testing.netns`); the driver (this process: clients, watchers, nemesis)
stays in the root namespace and reaches every host through the bridge. A partition is an
iptables DROP rule between namespaces. Without namespaces (not root, no iptables, ...) the
servers run on 127.0.0.1 and partition faults are skipped; the report says so (``fallback``).

Faults (chosen with ``random.Random(seed)``): kill -9 of a follower / the leader / a minority /
all members at once, SIGSTOP+SIGCONT pauses, partitions (leader isolated, majority/minority
split, one-way cut, agent isolated), graceful restarts, agent kill -9 + restart, and (with
``--sync-tracker``) a power cut of every member that drops whatever was not fsynced.

Workloads (threads): read/write/CAS registers on many keys (plus linearizable reads pinned to
one member, which must refuse unless it is the leader), list-append (read + set if_version),
watchers resuming across faults (``Client.watch``), and a reader of the mount's
``/.afs/status`` revision. Checkers: :mod:`afs.testing.checker`.

Output: a JSON report (``--report``) and ONE final line
``ops=N faults=M lost=0 duplicated=0 linearizability_violations=0 watch_gaps=0
mount_regressions=0 state_divergence=0 other=0``; the exit status is 1 on any violation
(the seed is printed to reproduce the schedule), 2 if the harness itself failed.

Negative controls (tests/fault): ``--break NAME`` starts the servers with
``AFS_TEST_BREAK=NAME`` (see afs/server/server.py); ``--no-fsync --sync-tracker --faults
power_loss`` must report lost writes, the same with fsync must not.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field

import msgpack

from afs import errors, ops
from afs.testing.fusectl import fuse_available
from afs.client import Client
from afs.testing import checker, netns
from afs.testing.cluster import ClusterError, ProcessCluster
from afs.testing.linearizability import FAIL, INFO, OK, Op
from afs.wire import encode_frame, read_frame_sync

ALL_FAULTS = ("kill_follower", "kill_leader", "kill_minority", "kill_all", "pause_leader",
              "pause_follower", "partition_leader", "partition_split", "partition_oneway",
              "partition_agent", "restart", "agent_kill", "power_loss")
PARTITION_FAULTS = {"partition_leader", "partition_split", "partition_oneway", "partition_agent"}


@dataclass
class Profile:
    servers: int = 3
    duration: float = 50.0          # seconds of faults
    calm: tuple = (1.0, 3.0)        # quiet time between faults
    hold: tuple = (1.0, 4.0)        # how long a fault lasts
    reg_workers: int = 5
    reg_keys: int = 10
    list_workers: int = 2
    list_keys: int = 3
    watchers: int = 2
    mount: bool = True
    faults: tuple = tuple(f for f in ALL_FAULTS if f != "power_loss")
    op_timeout: float = 4.0


PROFILES = {
    "quick": Profile(),
    "long": Profile(servers=5, duration=600.0, reg_workers=8, reg_keys=16, list_workers=3,
                    list_keys=4, watchers=3, faults=ALL_FAULTS, calm=(1.0, 5.0), hold=(1.0, 8.0)),
}


def _now() -> float:
    return time.monotonic()


def raw_call(addr: str, body: dict, timeout: float) -> dict:
    """One request on a fresh connection to exactly ``addr`` (no redirects, no retries)."""
    host, _, port = addr.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.settimeout(timeout)
        s.sendall(encode_frame({"id": 1, **body}))
        with s.makefile("rb") as f:
            resp = read_frame_sync(f, 256 << 20)
    if not isinstance(resp, dict):
        raise ConnectionError("no response")
    if "error" in resp:
        raise errors.from_wire(resp["error"])
    return resp.get("ok")


def _definite_failure(exc: BaseException) -> bool:
    """True if the write certainly did not take effect."""
    return isinstance(exc, errors.AfsError) and not isinstance(exc, errors.Unavailable)


# ------------------------------------------------------------------ the agent host

class AgentHost:
    """``afs agent`` with a FUSE mount, in its own namespace host (or the root namespace)."""

    def __init__(self, base: str, endpoints: list[str], prefix: list[str]):
        self.dir = os.path.join(base, "agent")
        self.mnt = os.path.join(self.dir, "mnt")
        self.cache = os.path.join(self.dir, "cache")
        os.makedirs(self.mnt, exist_ok=True)
        self.endpoints = endpoints
        self.prefix = prefix
        self.proc: subprocess.Popen | None = None
        self.incarnation = 0
        self.lock = threading.Lock()

    def start(self, timeout: float = 20.0) -> None:
        with self.lock:
            self.incarnation += 1
            log = open(os.path.join(self.dir, "agent.log"), "ab")
            argv = self.prefix + [sys.executable, "-m", "afs_cli.main", "agent", "--endpoints",
                                  ",".join(self.endpoints), "--mount", self.mnt, "--cache-dir", self.cache]
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env, start_new_session=True)
            log.close()
        deadline = _now() + timeout
        while _now() < deadline:
            if self.proc.poll() is not None:
                raise ClusterError(f"agent exited with {self.proc.returncode}")
            if self.status() is not None:
                return
            time.sleep(0.1)
        raise ClusterError("agent mount did not come up")

    def status(self) -> dict | None:
        try:
            with open(os.path.join(self.mnt, ".afs", "status")) as fh:
                return json.loads(fh.read())
        except (OSError, ValueError):
            return None

    def kill(self) -> None:
        with self.lock:
            if self.proc is not None and self.proc.poll() is None:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
            self._unmount()

    def _unmount(self) -> None:
        for args in (["fusermount3", "-u", self.mnt], ["fusermount3", "-u", "-z", self.mnt]):
            if subprocess.run(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0:
                return

    def stop(self) -> None:
        with self.lock:
            if self.proc is not None and self.proc.poll() is None:
                os.kill(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    os.kill(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(10)
            self._unmount()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


# ------------------------------------------------------------------ the run

@dataclass
class Recorder:
    reg_ops: list = field(default_factory=list)
    appends: list = field(default_factory=list)
    list_reads: list = field(default_factory=list)
    acked_writes: list = field(default_factory=list)   # (path, data) of acked register writes
    watchers: list = field(default_factory=list)
    mount_samples: list = field(default_factory=list)
    faults: list = field(default_factory=list)
    errors: list = field(default_factory=list)


class Chaos:
    def __init__(self, profile: Profile, seed: int, *, break_name: str = "", fsync: bool = True,
                 sync_tracker: bool = False, use_netns: bool = True, workdir: str | None = None,
                 log=print):
        self.p = profile
        self.seed = seed
        self.rng = random.Random(seed)
        self.break_name = break_name
        self.fsync = fsync
        self.sync_tracker = sync_tracker
        self.log = log
        self.rec = Recorder()
        self.stop_work = threading.Event()
        self.stop_nemesis = threading.Event()
        self.watch_stop = threading.Event()
        self.mount_stop = threading.Event()
        self.base = workdir or tempfile.mkdtemp(prefix="afs-chaos-")
        self.fallbacks: list[str] = []
        why = netns.available() if use_netns else "disabled by --no-netns"
        self.net = None
        if why is None:
            self.net = netns.NetnsNetwork()
        else:
            self.fallbacks.append(f"network namespaces unavailable ({why}): servers on 127.0.0.1, "
                                  "partition faults skipped")
        self.cluster: ProcessCluster | None = None
        self.agent: AgentHost | None = None
        self.threads: list[threading.Thread] = []
        self.watches: list = []
        self.t0 = _now()

    # ---------------------------------------------------------- set-up / teardown
    def _tracker_file(self, name: str) -> str:
        return os.path.join(self.base, name, "sync-tracker.json")

    def setup(self) -> None:
        env = {"AFS_TEST_BREAK": self.break_name} if self.break_name else {}
        member_env = {}
        if self.sync_tracker:
            member_env = {f"n{i}": {"AFS_TEST_SYNC_TRACKER": self._tracker_file(f"n{i}")}
                          for i in range(1, self.p.servers + 1)}
        kw = dict(fsync=self.fsync, env=env, member_env=member_env, log_level="INFO", startup_timeout=30.0)
        if self.net is not None:
            self.net.setup()
            self.cluster = netns.NsCluster(self.net, self.base, self.p.servers, **kw)
        else:
            self.cluster = netns.LocalCluster(self.base, self.p.servers, **kw)
        self.cluster.start()
        self.cluster.wait_for_leader(30)
        with self.client() as c:
            for d in ("/chaos/reg", "/chaos/list"):
                c.mkdir(d, parents=True)
            for k in range(self.p.reg_keys):
                c.put(f"/chaos/reg/k{k}", b"0")
            for k in range(self.p.list_keys):
                c.put(f"/chaos/list/l{k}", b"")
        if self.p.mount:
            why = fuse_available()
            if why:
                self.fallbacks.append(f"FUSE unavailable ({why}): no mount reader")
            else:
                prefix = []
                if self.net is not None:
                    self.net.add_host("agent")
                    prefix = self.net.exec_prefix("agent")
                self.agent = AgentHost(self.base, self.cluster.endpoints, prefix)
                self.agent.start()

    def teardown(self) -> None:
        for w in self.watches:
            try:
                w.cancel()
            except Exception:  # noqa: BLE001
                pass
        if self.agent is not None:
            try:
                self.agent.stop()
            except Exception as exc:  # noqa: BLE001
                self.rec.errors.append(f"agent stop: {exc!r}")
        if self.cluster is not None:
            try:
                self.cluster.stop_all()
            except Exception as exc:  # noqa: BLE001
                self.rec.errors.append(f"cluster stop: {exc!r}")
        if self.net is not None:
            self.net.teardown()

    def client(self, rotate: int = 0, timeout: float | None = None) -> Client:
        eps = self.cluster.endpoints
        r = rotate % len(eps)
        return Client(eps[r:] + eps[:r], timeout=timeout or self.p.op_timeout, connect_timeout=0.5)

    def note(self, msg: str) -> None:
        self.log(f"[{_now() - self.t0:7.2f}s] {msg}")

    # ---------------------------------------------------------- workloads
    def _reg_worker(self, wid: int) -> None:
        rng = random.Random(self.seed * 1000 + wid)
        c = self.client(rotate=wid)
        last_seen: dict[int, str] = {}
        n = 0
        try:
            while not self.stop_work.is_set():
                k = rng.randrange(self.p.reg_keys)
                path = f"/chaos/reg/k{k}"
                r = rng.random()
                t = _now()
                if r < 0.45:
                    pinned = rng.random() < 0.3
                    try:
                        if pinned:
                            addr = rng.choice(self.cluster.endpoints)
                            res = raw_call(addr, {"op": "get", "path": path, "stale": False}, 1.0)
                            val = bytes(res["data"]).decode()
                        else:
                            val = c.get(path).data.decode()
                    except (errors.AfsError, OSError, KeyError, TypeError):
                        continue                  # a failed read has no effect: not recorded
                    last_seen[k] = val
                    self.rec.reg_ops.append(Op(wid, "read", k, None, val, t, _now(), OK))
                    continue
                n += 1
                new = f"w{wid}-{n}"
                if r < 0.75:
                    op = Op(wid, "write", k, new, None, t)
                    try:
                        c.put(path, new.encode())
                        op.status, op.complete = OK, _now()
                        self.rec.acked_writes.append((path, new.encode()))
                    except errors.AfsError as exc:
                        op.status = FAIL if _definite_failure(exc) else INFO
                        op.complete = _now() if op.status == FAIL else None
                else:
                    exp = last_seen.get(k, "0")
                    op = Op(wid, "cas", k, (exp, new), None, t)
                    try:
                        res = c.txn(compare=[ops.Compare(path, "value", "==", exp.encode())],
                                    then=[ops.Set(path, new.encode())])
                        op.status, op.output, op.complete = OK, bool(res.succeeded), _now()
                        if res.succeeded:
                            self.rec.acked_writes.append((path, new.encode()))
                            last_seen[k] = new
                    except errors.AfsError as exc:
                        op.status = FAIL if _definite_failure(exc) else INFO
                        op.complete = _now() if op.status == FAIL else None
                self.rec.reg_ops.append(op)
        except Exception:  # noqa: BLE001
            self.rec.errors.append(f"reg worker {wid}: {traceback.format_exc()}")
        finally:
            c.close()

    def _list_worker(self, wid: int) -> None:
        rng = random.Random(self.seed * 2000 + wid)
        c = self.client(rotate=wid + 1)
        n = 0
        try:
            while not self.stop_work.is_set():
                k = rng.randrange(self.p.list_keys)
                path = f"/chaos/list/l{k}"
                if rng.random() < 0.3:
                    t = _now()
                    try:
                        data = c.get(path).data.decode()
                    except errors.AfsError:
                        continue
                    self.rec.list_reads.append({"key": path, "value": data.split(), "invoke": t,
                                                "complete": _now()})
                    continue
                n += 1
                elem = f"{wid}.{n}"
                a = {"key": path, "elem": elem, "invoke": _now(), "complete": None, "status": FAIL}
                deadline = _now() + 2 * self.p.op_timeout
                while _now() < deadline and not self.stop_work.is_set():
                    try:
                        res = c.get(path)
                    except errors.AfsError:
                        continue
                    cur = res.data.decode().split()
                    try:
                        c.set(path, " ".join(cur + [elem]).encode(), if_version=res.stat.version)
                        a["status"], a["complete"] = OK, _now()
                        break
                    except errors.AfsError as exc:
                        if _definite_failure(exc):
                            continue              # someone else appended first: retry
                        a["status"] = INFO        # may or may not have been applied
                        break
                self.rec.appends.append(a)
        except Exception:  # noqa: BLE001
            self.rec.errors.append(f"list worker {wid}: {traceback.format_exc()}")
        finally:
            c.close()

    def _watcher(self, wid: int, start: int) -> None:
        rec = {"name": f"watch{wid}", "start": start, "frames": [], "resumes": 0, "errors": []}
        self.rec.watchers.append(rec)
        c = self.client(rotate=wid)
        nxt = start
        try:
            while not self.watch_stop.is_set():
                try:
                    w = c.watch("/", start_revision=nxt, idle_timeout=3.0, reconnect_timeout=None)
                except errors.AfsError as exc:
                    rec["errors"].append(repr(exc))
                    time.sleep(0.5)
                    continue
                self.watches.append(w)
                try:
                    for group in w:
                        rec["frames"].append((group.revision, [(e.type.value, e.path, e.data)
                                                               for e in group.events]))
                        nxt = group.revision + 1
                except errors.AfsError as exc:
                    rec["errors"].append(repr(exc))
                    time.sleep(0.2)
                finally:
                    rec["resumes"] += w.reconnects
        except Exception:  # noqa: BLE001
            self.rec.errors.append(f"watcher {wid}: {traceback.format_exc()}")
        finally:
            c.close()

    def _mount_reader(self) -> None:
        a = self.agent
        while not self.mount_stop.is_set():
            inc = a.incarnation
            st = a.status()
            if st is not None and isinstance(st.get("revision"), int):
                self.rec.mount_samples.append((_now() - self.t0, inc, st["revision"]))
            time.sleep(0.02)

    # ---------------------------------------------------------- nemesis
    def _leader_or_random(self) -> str:
        try:
            ld = self.cluster.leader()
        except Exception:  # noqa: BLE001
            ld = None
        running = [n for n in self.cluster.running() if not self.cluster.member(n).paused]
        return ld or self.rng.choice(running or self.cluster.names)

    def _followers(self, leader: str) -> list[str]:
        return [n for n in self.cluster.names if n != leader]

    def _restart_down(self) -> None:
        down = [n for n in self.cluster.names if not self.cluster.member(n).running]
        if down:
            self.cluster.start(down)

    def inject(self, kind: str) -> dict:
        cl, rng = self.cluster, self.rng
        hold = rng.uniform(*self.p.hold)
        ev = {"kind": kind, "t": round(_now() - self.t0, 3)}
        if kind in ("kill_follower", "kill_leader", "kill_minority", "restart"):
            leader = self._leader_or_random()
            if kind == "kill_leader":
                victims = [leader]
            elif kind == "kill_follower":
                victims = [rng.choice(self._followers(leader))]
            elif kind == "restart":
                victims = [rng.choice(cl.names)]
            else:
                victims = rng.sample(cl.names, (len(cl.names) - 1) // 2)
            ev["targets"] = victims
            for v in victims:
                if kind == "restart":
                    cl.stop(v)
                else:
                    cl.kill(v)
            self.note(f"fault {kind} {victims} for {hold:.1f}s")
            self.stop_nemesis.wait(hold)
            self._restart_down()
        elif kind == "kill_all":
            ev["targets"] = cl.names
            self.note(f"fault kill_all for {hold:.1f}s")
            cl.kill_all()
            self.stop_nemesis.wait(min(hold, 1.0))
            self._restart_down()
        elif kind == "power_loss":
            ev["targets"] = cl.names
            cl.kill_all()
            from afs.storage.faults import load_sync_tracker
            actions = {}
            for n in cl.names:
                t = load_sync_tracker(self._tracker_file(n))
                actions[n] = len(t.simulate_power_loss(os.path.join(cl.member(n).data_dir, "raft")))
            ev["dropped"] = actions
            self.note(f"fault power_loss: rewound files {actions}")
            self._restart_down()
        elif kind in ("pause_leader", "pause_follower"):
            leader = self._leader_or_random()
            v = leader if kind == "pause_leader" else rng.choice(self._followers(leader))
            if cl.member(v).running:
                ev["targets"] = [v]
                self.note(f"fault {kind} {v} for {hold:.1f}s")
                cl.pause(v)
                self.stop_nemesis.wait(hold)
                cl.resume(v)
        elif kind in PARTITION_FAULTS:
            net = self.net
            leader = self._leader_or_random()
            if kind == "partition_leader":
                groups = [[leader], self._followers(leader)]
                net.partition(groups)
            elif kind == "partition_split":
                names = list(cl.names)
                rng.shuffle(names)
                k = (len(names) - 1) // 2
                groups = [names[:k], names[k:]]
                net.partition(groups)
            elif kind == "partition_oneway":
                src = leader if rng.random() < 0.5 else rng.choice(cl.names)
                dst = rng.choice([n for n in cl.names if n != src])
                groups = [[src], [dst]]
                net.cut(src, dst)
            else:
                groups = [["agent"], list(cl.names)]
                net.partition(groups)
            ev["targets"] = groups
            self.note(f"fault {kind} {groups} for {hold:.1f}s")
            self.stop_nemesis.wait(hold)
            net.heal()
        elif kind == "agent_kill":
            self.note("fault agent_kill (kill -9, unmount, restart)")
            self.agent.kill()
            time.sleep(0.3)
            self.agent.start()
        ev["hold"] = round(hold, 2)
        return ev

    def _eligible(self) -> list[str]:
        out = []
        for f in self.p.faults:
            if f in PARTITION_FAULTS and self.net is None:
                continue
            if f == "partition_agent" and self.agent is None:
                continue
            if f == "agent_kill" and self.agent is None:
                continue
            if f == "power_loss" and not self.sync_tracker:
                continue
            out.append(f)
        return out

    def _nemesis(self) -> None:
        faults = self._eligible()
        if not faults:
            self.stop_nemesis.wait(self.p.duration)
            return
        end = _now() + self.p.duration
        try:
            while _now() < end and not self.stop_nemesis.is_set():
                self.stop_nemesis.wait(self.rng.uniform(*self.p.calm))
                if self.stop_nemesis.is_set() or _now() >= end:
                    break
                ev = self.inject(self.rng.choice(faults))
                self.rec.faults.append(ev)
        except Exception:  # noqa: BLE001
            self.rec.errors.append(f"nemesis: {traceback.format_exc()}")

    def heal_all(self) -> None:
        if self.net is not None:
            self.net.heal()
        for n in self.cluster.names:
            m = self.cluster.member(n)
            if m.running and m.paused:
                self.cluster.resume(n)
        self._restart_down()
        if self.agent is not None and not self.agent.running:
            self.agent.kill()
            self.agent.start()

    # ---------------------------------------------------------- final checks
    def _state_hashes(self) -> dict:
        out = {}
        for n in self.cluster.names:
            addr = self.cluster.member(n).client_addr
            try:
                res = raw_call(addr, {"op": "walk", "path": "/", "data": True, "stale": True}, 10.0)
                h = hashlib.sha256(msgpack.packb(res["nodes"], use_bin_type=True)).hexdigest()
                out[n] = {"revision": res["revision"], "hash": h, "nodes": len(res["nodes"])}
            except Exception as exc:  # noqa: BLE001
                out[n] = {"error": repr(exc)}
        return out

    def _reference_history(self, final_rev: int) -> tuple[dict, int]:
        c = self.client(timeout=10.0)
        hist: dict[int, list] = {}
        first = 1
        try:
            try:
                w = c.watch("/", start_revision=1, idle_timeout=3.0, reconnect_timeout=10.0)
            except errors.Compacted as exc:
                first = int(exc.details.get("oldest", 1)) if hasattr(exc, "details") else 1
                w = c.watch("/", start_revision=first, idle_timeout=3.0, reconnect_timeout=10.0)
            if final_rev < first:
                return hist, first
            # A server that drops events (the negative control) may never send final_rev:
            # bound the read, and let the history checker report the gaps.
            timer = threading.Timer(30.0, w.cancel)
            timer.start()
            try:
                for group in w:
                    hist[group.revision] = [(e.type.value, e.path, e.data) for e in group.events]
                    if group.revision >= final_rev:
                        break
            finally:
                timer.cancel()
            w.cancel()
        finally:
            c.close()
        return hist, first

    def run(self) -> dict:
        report: dict = {"seed": self.seed, "profile": self.p.__dict__, "break": self.break_name,
                        "fsync": self.fsync, "sync_tracker": self.sync_tracker, "workdir": self.base}
        try:
            self.setup()
            report["hosts"] = dict(self.net.hosts) if self.net is not None else "127.0.0.1"
            with self.client() as c:
                start_rev = c.status()["revision"]
            self.note(f"cluster up ({self.p.servers} servers), revision {start_rev}; seed {self.seed}")
            for i in range(self.p.reg_workers):
                self.threads.append(threading.Thread(target=self._reg_worker, args=(i,), daemon=True))
            for i in range(self.p.list_workers):
                self.threads.append(threading.Thread(target=self._list_worker, args=(i,), daemon=True))
            for i in range(self.p.watchers):
                s = 1 if i == 0 else start_rev + 1
                self.threads.append(threading.Thread(target=self._watcher, args=(i, s), daemon=True))
            if self.agent is not None:
                self.threads.append(threading.Thread(target=self._mount_reader, daemon=True))
            for t in self.threads:
                t.start()
            nem = threading.Thread(target=self._nemesis, daemon=True)
            nem.start()
            nem.join(self.p.duration + 120)
            self.stop_nemesis.set()
            nem.join(60)
            self.note(f"faults over ({len(self.rec.faults)}); healing")
            self.heal_all()
            self.cluster.wait_for_leader(30)
            time.sleep(2.0)                     # the workload runs on the healed cluster
            # stop the client workload; watchers and the mount reader run until the final revision
            self.stop_work.set()
            for t in self.threads[:self.p.reg_workers + self.p.list_workers]:
                t.join(3 * self.p.op_timeout)
            try:
                final_rev = self.cluster.wait_converged(timeout=20)
            except ClusterError as exc:         # divergent members never converge: check anyway
                report["not_converged"] = str(exc)[:3000]
                self.note("members did NOT converge")
                with self.client(timeout=10.0) as c:
                    final_rev = c.get("/chaos/reg/k0").revision
            self.note(f"converged at revision {final_rev}; final reads")
            # final linearizable reads (part of the histories)
            def final_get(c, path):
                try:
                    return c.get(path).data.decode()
                except errors.NotFound:          # e.g. everything lost in a power cut
                    return None
            with self.client(timeout=10.0) as c:
                for k in range(self.p.reg_keys):
                    t = _now()
                    v = final_get(c, f"/chaos/reg/k{k}")
                    self.rec.reg_ops.append(Op("final", "read", k, None, v, t, _now(), OK))
                final_lists = {f"/chaos/list/l{k}": (final_get(c, f"/chaos/list/l{k}") or "").split()
                               for k in range(self.p.list_keys)}
            states = self._state_hashes()
            hist, hist_first = self._reference_history(final_rev)
            deadline = _now() + 20
            while _now() < deadline:
                lasts = [w["frames"][-1][0] if w["frames"] else 0 for w in self.rec.watchers]
                mrev = self.rec.mount_samples[-1][2] if self.rec.mount_samples else 0
                if all(x >= final_rev for x in lasts) and (self.agent is None or mrev >= final_rev):
                    break
                time.sleep(0.1)
            self.watch_stop.set()
            self.mount_stop.set()
            for w in list(self.watches):
                w.cancel()
            for t in self.threads[self.p.reg_workers + self.p.list_workers:]:
                t.join(5)
            report["final_revision"] = final_rev
            report["checks"] = self.check(final_lists, states, hist, hist_first, final_rev)
        except Exception:  # noqa: BLE001
            report["harness_error"] = traceback.format_exc()
            try:
                report["logs"] = self.cluster.tail_logs(40) if self.cluster else ""
            except Exception:  # noqa: BLE001
                pass
        finally:
            self.stop_nemesis.set()
            self.stop_work.set()
            self.watch_stop.set()
            self.mount_stop.set()
            self.teardown()
        report["faults"] = self.rec.faults
        counts: dict[str, int] = {}
        for f in self.rec.faults:
            counts[f["kind"]] = counts.get(f["kind"], 0) + 1
        report["faults_by_type"] = counts
        report["fallbacks"] = self.fallbacks
        report["errors"] = self.rec.errors
        report["summary"] = self.summary(report)
        return report

    def check(self, final_lists, states, hist, hist_first, final_rev) -> dict:
        reg = checker.check_registers(self.rec.reg_ops, initial="0")
        lists = checker.check_lists(self.rec.appends, self.rec.list_reads, final_lists)
        history = checker.check_history(hist, hist_first, final_rev, self.rec.acked_writes,
                                        ("/chaos/reg/",))
        watches = checker.check_watches(self.rec.watchers, hist, hist_first)
        for w in self.rec.watchers:
            watches.setdefault("per_watcher", {})[w["name"]] = {
                "start": w["start"], "frames": len(w["frames"]),
                "last": w["frames"][-1][0] if w["frames"] else None, "errors": w["errors"][:5]}
        mount = checker.check_mount(self.rec.mount_samples) if self.agent is not None else None
        st = checker.check_states(states)
        return {"registers": reg, "lists": lists, "history": history, "watches": watches,
                "mount": mount, "states": st}

    def summary(self, report: dict) -> dict:
        ch = report.get("checks") or {}
        reg, li, hi = ch.get("registers", {}), ch.get("lists", {}), ch.get("history", {})
        wa, mo, st = ch.get("watches", {}), ch.get("mount") or {}, ch.get("states", {})
        return {
            "ops": len(self.rec.reg_ops) + len(self.rec.appends) + len(self.rec.list_reads),
            "faults": len(self.rec.faults),
            "lost": li.get("lost", 0) + hi.get("lost", 0),
            "duplicated": li.get("duplicated", 0) + hi.get("duplicate_applies", 0),
            "linearizability_violations": reg.get("violations", 0) + li.get("stale_reads", 0)
            + li.get("nonprefix_reads", 0) + li.get("reordered", 0),
            "watch_gaps": wa.get("total_problems", 0) + hi.get("gaps", 0),
            "mount_regressions": mo.get("regressions", 0),
            "state_divergence": st.get("divergent", 0) + st.get("unreachable", 0)
            + (1 if "not_converged" in report else 0),
            "other": li.get("phantoms", 0) + len(self.rec.errors)
            + (1 if "harness_error" in report else 0),
        }


def final_line(s: dict) -> str:
    return " ".join(f"{k}={s[k]}" for k in ("ops", "faults", "lost", "duplicated",
                                             "linearizability_violations", "watch_gaps",
                                             "mount_regressions", "state_divergence", "other"))


def violations(s: dict) -> int:
    return sum(v for k, v in s.items() if k not in ("ops", "faults"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m afs.testing.chaos", description=__doc__.split("\n")[0])
    ap.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--report", default=None, help="write the JSON report here")
    ap.add_argument("--duration", type=float, default=None, help="seconds of faults (overrides the profile)")
    ap.add_argument("--servers", type=int, default=None)
    ap.add_argument("--faults", default=None, help="comma-separated fault kinds (default: the profile's); "
                    f"'none' for no faults. Kinds: {', '.join(ALL_FAULTS)}")
    ap.add_argument("--break", dest="break_name", default="",
                    help="negative control: start servers with AFS_TEST_BREAK=NAME")
    ap.add_argument("--no-fsync", action="store_true", help="servers run with --unsafe-no-fsync")
    ap.add_argument("--sync-tracker", action="store_true",
                    help="servers record unsynced writes (enables the power_loss fault)")
    ap.add_argument("--no-netns", action="store_true", help="127.0.0.1 processes, no partitions")
    ap.add_argument("--no-mount", action="store_true")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    prof = Profile(**PROFILES[a.profile].__dict__)
    if a.duration is not None:
        prof.duration = a.duration
    if a.servers is not None:
        prof.servers = a.servers
    if a.faults is not None:
        prof.faults = () if a.faults == "none" else tuple(f.strip() for f in a.faults.split(",") if f.strip())
        bad = [f for f in prof.faults if f not in ALL_FAULTS]
        if bad:
            ap.error(f"unknown fault kinds: {bad}")
    if a.no_mount:
        prof.mount = False
    seed = a.seed if a.seed is not None else random.SystemRandom().randrange(1 << 31)
    log = (lambda *_: None) if a.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    ch = Chaos(prof, seed, break_name=a.break_name, fsync=not a.no_fsync, sync_tracker=a.sync_tracker,
               use_netns=not a.no_netns, workdir=a.workdir, log=log)

    def _terminated(signum, frame):
        # SIGTERM (e.g. a test's timeout): unwind so Chaos.run's teardown stops the servers
        # and removes the namespaces instead of orphaning them.
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _terminated)
    report = ch.run()
    s = report["summary"]
    bad = violations(s)
    report["ok"] = bad == 0
    if a.report:
        with open(a.report, "w") as fh:
            json.dump(report, fh, indent=1, default=repr)
    if "harness_error" in report:
        print(report["harness_error"], file=sys.stderr)
    if bad:
        for name, c in (report.get("checks") or {}).items():
            for kind, ex in ((c or {}).get("examples") or {}).items():
                for line in ex[:3]:
                    print(f"VIOLATION {name}/{kind}: {line}", file=sys.stderr)
        print(f"FAILED: seed={seed} (rerun: python -m afs.testing.chaos --profile {a.profile} "
              f"--seed {seed})", file=sys.stderr)
    if not a.keep and not bad and a.workdir is None:
        shutil.rmtree(ch.base, ignore_errors=True)
    elif bad:
        print(f"work directory kept: {ch.base}", file=sys.stderr)
    print(final_line(s), flush=True)
    if "harness_error" in report:
        return 2
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
