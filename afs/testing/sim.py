"""Deterministic discrete-event simulation of an AFS Raft cluster (real ``afs.raft.core``).

Run: ``python -m afs.testing.sim --seeds 500 [--nodes 3|5] [--seed S] [--ops K] [--variant V]``.

What one seed does
------------------
A cluster of 3 or 5 voters, each a real :class:`afs.raft.core.Raft` behind a simulated driver
that mimics ``afs.raft.node``: one Ready at a time; the Ready's snapshot/entries/hard state go
to a per-node simulated disk as UNSYNCED writes and are "fsynced" after a random virtual delay
(proposals arriving meanwhile accumulate in the core: group commit); only then are messages
sent (except the leader's APP/HEARTBEAT/SNAP, which the real driver sends before its own fsync),
committed entries applied, and the Ready advanced. The state machine is a small KV store of
registers with msgpack snapshots, deduplicating by (client_id, seq).

Faults, chosen from the seed: partitions, isolated leaders, one-way cuts, message drops,
duplicates and reordering delays, crashes that lose unsynced writes (or keep a prefix of them,
as a torn WAL tail would), crashes at durability points (before/after fsync, after send, right
after granting a vote with an immediate restart), power loss of a majority or of every node,
clean restarts, disk stalls (fsync takes 20-250 ms), clock drift (ticks of 8-12 ms), periodic
snapshots + log compaction (so lagging nodes get InstallSnapshot), membership changes (add a
learner -- new, unconfigured or bootstrapped, or a removed node with its old disk -- promote,
remove a voter including the leader, remove a learner) and leadership transfers. After the
client phase everything is healed and restarted and the cluster must converge.

Clients issue read (ReadIndex, at the leader or forwarded from a follower), write and CAS on a
few keys, with per-attempt timeouts and retries that reuse (client_id, seq); an op that never
got an answer is indeterminate.

Checkers (each violation is a line ``[kind] t=<virtual ms> ...``):
  vote-safety (one vote per server and term, as sent on the wire), election-safety, log-matching, leader-completeness, state-machine-safety, durability
  (an acknowledged or committed entry is never overwritten or lost), linearizability of the
  client history (``afs.testing.linearizability``), a final convergence/liveness check after
  healing everything, and driver-contract checks (gaps, snapshots without data, core
  exceptions).

Determinism: all randomness comes from ``random.Random(seed)`` (and seeds derived from it);
virtual time only; events are ordered by (time, sequence number); no iteration over sets or
hash-ordered containers decides anything. A failing seed reproduces exactly.

Variants (negative controls; a check that cannot fail proves nothing):
  ``ack_before_fsync`` -- the driver sends every message before its fsync;
  ``forget_vote``      -- the vote is not restored on restart;
  ``stale_reads``      -- reads are answered from the local state machine without ReadIndex
                          (proves the linearizability check bites end to end);
  ``unguarded_compact``-- the driver compacts like ``afs.raft.node.take_snapshot`` does, even
                          while the core holds an accepted-but-not-yet-ready leader snapshot
                          (then ``compact(applied)`` returns the newer snapshot's meta).
"""
from __future__ import annotations

import argparse
import heapq
import os
import random
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import msgpack

from afs import errors
from afs.raft.core import Config as RaftConfig
from afs.raft.core import Raft, Role
from afs.raft.messages import (
    ConfChange, ConfChangeType, ConfState, Entry, EntryType, HardState, Message, MsgType,
    SnapshotMeta, decode_conf_change,
)
from afs.testing.linearizability import KVModel, Op, check_history
from afs.transport.memory import MemoryNetwork

__all__ = ["SimOptions", "SimResult", "Simulation", "run_seed", "main", "VARIANTS"]

VARIANTS = ("normal", "ack_before_fsync", "forget_vote", "stale_reads", "unguarded_compact")

TICK_MS = 10                 # one Raft tick = 10 virtual ms
ELECTION_TICK = 10           # election timeout 100..200 ms
HEARTBEAT_TICK = 2
ATTEMPT_TIMEOUT = 250        # client: one attempt
OP_DEADLINE = 1200           # client: whole op, retries included
MAX_RUN_MS = 60_000          # stop the fault phase after this much virtual time
CONVERGE_MS = 15_000         # after healing, the cluster must converge within this
KEYS = ("a", "b", "c")
N_CLIENTS = 3


@dataclass
class SimOptions:
    nodes: int = 3
    ops: int = 800
    variant: str = "normal"
    trace: bool = False


@dataclass
class SimResult:
    seed: int
    options: SimOptions
    violations: list[str] = field(default_factory=list)
    ops_done: int = 0            # ok + indeterminate client ops
    ops_ok: int = 0
    ops_info: int = 0
    virtual_ms: int = 0
    stats: dict = field(default_factory=dict)
    trace: list[str] = field(default_factory=list)

    def repro(self) -> str:
        o = self.options
        return (f"python -m afs.testing.sim --seeds 1 --seed {self.seed} --nodes {o.nodes} "
                f"--ops {o.ops} --variant {o.variant}")


class _Abort(Exception):
    """Stop the seed at once (the state is no longer meaningful)."""


# ====================================================================== state machine

class KVStateMachine:
    """Registers keyed by string; dedupes by (client_id, seq): at most once per seq."""

    __slots__ = ("kv", "last")

    def __init__(self) -> None:
        self.kv: dict[str, int] = {}
        self.last: dict[int, tuple[int, Any]] = {}

    @staticmethod
    def encode(cid: int, seq: int, kind: str, key: str, a: Any, b: Any) -> bytes:
        return msgpack.packb([cid, seq, kind, key, a, b])

    def apply(self, data: bytes) -> Any:
        cid, seq, kind, key, a, b = msgpack.unpackb(data)
        prev = self.last.get(cid)
        if prev is not None:
            if seq == prev[0]:
                return prev[1]           # a retry of an applied request: answer, do not apply
            if seq < prev[0]:
                return None              # a stale duplicate: ignored
        if kind == "write":
            self.kv[key] = a
            result = None
        elif kind == "cas":
            if self.kv.get(key) == a:
                self.kv[key] = b
                result = True
            else:
                result = False
        else:
            raise ValueError(f"unknown op {kind!r}")
        self.last[cid] = (seq, result)
        return result

    def snapshot(self) -> bytes:
        return msgpack.packb([sorted(self.kv.items()),
                              sorted([c, s, r] for c, (s, r) in self.last.items())])

    def restore(self, data: bytes) -> None:
        kv, last = msgpack.unpackb(data)
        self.kv = {k: v for k, v in kv}
        self.last = {c: (s, r) for c, s, r in last}


EMPTY_SM = KVStateMachine().snapshot()


# ====================================================================== disk

class _ContractError(Exception):
    pass


def _splice(log: list[Entry], snap_index: int, ents: list[Entry]) -> None:
    """Persist ``ents``: replace the suffix of ``log`` (entries after ``snap_index``)."""
    ents = [e for e in ents if e.index > snap_index]
    if not ents:
        return
    first = ents[0].index
    last = snap_index + len(log)
    if first > last + 1:
        raise _ContractError(f"entries start at {first} but the log ends at {last} (gap)")
    del log[first - snap_index - 1:]
    log.extend(ents)


class Disk:
    """Synced state plus an ordered list of unsynced writes (lost on crash)."""

    def __init__(self, snap: SnapshotMeta, data: bytes) -> None:
        self.hs = HardState()
        self.snap = snap
        self.snap_data = data
        self.entries: list[Entry] = []
        self.pending: list[tuple] = []

    def write(self, w: tuple) -> None:
        self.pending.append(w)

    def _do(self, w: tuple) -> None:
        kind = w[0]
        if kind == "snap":
            self.snap, self.snap_data = w[1], w[2]
            self.entries = []
        elif kind == "ents":
            _splice(self.entries, self.snap.index, w[1])
        elif kind == "hs":
            self.hs = w[1]

    def sync(self) -> None:
        for w in self.pending:
            self._do(w)
        self.pending = []

    def crash(self, keep: int) -> None:
        for w in self.pending[:keep]:
            self._do(w)
        self.pending = []

    def compact(self, meta: SnapshotMeta, data: bytes) -> None:
        """A local snapshot: written to a temp file, fsynced and renamed (durable at once)."""
        drop = meta.index - self.snap.index
        if drop > 0:
            self.entries = self.entries[drop:]
        self.snap, self.snap_data = meta, data

    def last_index(self) -> int:
        return self.snap.index + len(self.entries)


# ====================================================================== nodes & clients

class SimNode:
    def __init__(self, nid: str, disk: Disk, seed: int) -> None:
        self.id = nid
        self.disk = disk
        self.seed = seed
        self.core: Raft | None = None
        self.up = False
        self.gen = 0
        self.sm = KVStateMachine()
        self.applied = 0
        self.busy = False
        self.snap_meta = disk.snap
        self.snap_data = disk.snap_data
        self.incoming: dict[tuple[int, int], bytes] = {}
        self.proposals: dict[int, tuple[int, tuple]] = {}
        self.reads: dict[bytes, tuple[tuple, str]] = {}
        self.read_wait: list[tuple[int, tuple, str]] = []
        self.crash_point: str | None = None
        self.persisted_hs = HardState()
        self.decommissioned = False
        self.joined_at = -1
        self.leader_terms_seen: set[int] = set()
        self.seen_commit = 0
        self.tick_ms = TICK_MS
        self.disk_stall_until = -1


@dataclass
class SimClient:
    cid: int
    seq: int = 0
    attempt: int = 0
    guess: str = ""
    op: Op | None = None
    kind: str = ""
    key: str = ""
    a: Any = None
    b: Any = None
    read_mode: str = "leader"
    proposed: bool = False
    deadline: int = 0
    last_seen: dict = field(default_factory=dict)


# ====================================================================== simulation

class Simulation:
    def __init__(self, seed: int, options: SimOptions | None = None) -> None:
        self.seed = seed
        self.opt = options or SimOptions()
        if self.opt.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.opt.variant!r}; choose from {VARIANTS}")
        if self.opt.nodes < 1:
            raise ValueError("need at least one node")
        self.rng = random.Random(seed)
        self.net = MemoryNetwork(random.Random(self.rng.getrandbits(64)))
        self.now = 0
        self._heap: list = []
        self._seq = 0
        self.phase = "run"
        self.violations: list[str] = []
        self.trace_on = self.opt.trace
        self.trace: list[str] = []
        self.stats = {"crashes": 0, "power_loss": 0, "snapshots_taken": 0,
                      "snapshots_installed": 0, "conf_changes": 0, "transfers": 0,
                      "elections": 0, "partitions": 0, "readies": 0, "fsyncs": 0,
                      "compact_deferred": 0}

        # the seed's fault profile
        r = self.rng
        self.base_delay = (1, r.choice((3, 5, 8)))
        self.net.set_faults(delay=self.base_delay)
        self.fsync_range = (1, r.choice((3, 6, 12)))
        self.snap_threshold = r.randint(4, 40)
        self.fault_gap = (r.choice((40, 80, 150)), r.choice((250, 400, 700)))
        self.leader_fast_path = r.random() < 0.8
        self.membership_on = r.random() < 0.6
        self.joiner_unconfigured = r.random() < 0.7
        self.clock_drift = r.random() < 0.5

        # cluster
        n = self.opt.nodes
        self.initial_voters = tuple(f"n{i}" for i in range(1, n + 1))
        self.bootstrap_meta = SnapshotMeta(0, 0, ConfState(voters=self.initial_voters))
        self.nodes: dict[str, SimNode] = {}
        self.next_node = n + 1
        self.min_voters = 3 if n <= 4 else n - 1
        self.max_voters = n + 1
        for nid in self.initial_voters:
            node = SimNode(nid, Disk(self.bootstrap_meta, EMPTY_SM), r.getrandbits(32))
            self.nodes[nid] = node

        # global knowledge for the checkers
        self.leader_of_term: dict[int, str] = {}
        self.entry_at: dict[tuple[int, int], Entry] = {}     # (index, term) -> entry
        self.committed: dict[int, Entry] = {}                # index -> entry (any node applied)
        self.max_committed = 0
        self.sm_bytes_at: dict[int, bytes] = {}              # index -> canonical SM snapshot
        self.acked: dict[int, Entry] = {}                    # index -> entry acked to a client
        self.commit_term: dict[int, tuple[Entry, int]] = {}  # index -> (entry, term of the leader that committed it)
        self.max_commit_term_index = 0
        self.votes: dict[tuple[str, int], str] = {}           # (voter, term) -> candidate

        # clients
        self.clients = [SimClient(cid=i + 1) for i in range(N_CLIENTS)]
        self.history: list[Op] = []
        self.ops_started = 0
        self.topology_fault = False
        self.final_leader: str | None = None
        self.events = 0
        self.max_events = 30_000 + 100 * self.opt.ops

    # ------------------------------------------------------------ helpers
    def tr(self, msg: str) -> None:
        if self.trace_on:
            self.trace.append(f"{self.now:>7} {msg}")

    def violation(self, kind: str, msg: str) -> None:
        line = f"[{kind}] t={self.now} {msg}"
        self.tr("VIOLATION " + line)
        if len(self.violations) < 50:
            self.violations.append(line)

    def at(self, t: int, fn: Callable, *args) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, fn, args))

    def after(self, dt: int, fn: Callable, *args) -> None:
        self.at(self.now + max(0, dt), fn, *args)

    def members_of(self, conf: ConfState) -> tuple[str, ...]:
        return conf.voters + conf.learners

    def current_leader(self) -> SimNode | None:
        best = None
        for node in self.nodes.values():
            if node.up and node.core.role == Role.LEADER:
                if best is None or node.core.term > best.core.term:
                    best = node
        return best

    def up_nodes(self) -> list[SimNode]:
        return [n for n in self.nodes.values() if n.up]

    # ------------------------------------------------------------ node lifecycle
    def start_node(self, node: SimNode) -> None:
        assert not node.up
        d = node.disk
        hs = d.hs
        if self.opt.variant == "forget_vote":
            hs = HardState(hs.term, "", hs.commit)
        node.gen += 1
        cfg = RaftConfig(id=node.id, election_tick=ELECTION_TICK, heartbeat_tick=HEARTBEAT_TICK,
                         pre_vote=True, check_quorum=True, max_size_per_msg=4096,
                         max_inflight_msgs=64, seed=node.seed * 1000 + node.gen)
        node.core = Raft(cfg, hard_state=hs, snapshot=d.snap, entries=list(d.entries),
                         applied=d.snap.index)
        node.sm = KVStateMachine()
        node.sm.restore(d.snap_data)
        node.applied = d.snap.index
        node.snap_meta, node.snap_data = d.snap, d.snap_data
        node.persisted_hs = hs
        node.busy = False
        node.incoming = {}
        node.proposals = {}
        node.reads = {}
        node.read_wait = []
        node.crash_point = None
        node.up = True
        node.decommissioned = False
        self.tr(f"{node.id} start gen={node.gen} term={hs.term} vote={hs.vote!r} commit={hs.commit} "
                f"snap={d.snap.index} last={d.last_index()}")
        # the durable log must itself obey log matching
        for e in d.entries:
            self.note_entry(node, e)
        # clocks drift: each incarnation ticks at its own rate (8..12 virtual ms)
        node.tick_ms = TICK_MS + self.rng.randint(-2, 2) if self.clock_drift else TICK_MS
        self.after(self.rng.randint(1, TICK_MS), self.on_tick, node, node.gen)
        self.pump(node)

    def crash_node(self, node: SimNode, *, lose: bool = True, why: str = "crash") -> None:
        if not node.up:
            return
        keep = 0
        if not lose:
            keep = len(node.disk.pending)
        elif node.disk.pending and self.rng.random() < 0.3:
            keep = self.rng.randint(0, len(node.disk.pending))   # a torn tail: a prefix survived
        self.tr(f"{node.id} {why} (unsynced writes {len(node.disk.pending)}, kept {keep})")
        node.disk.crash(keep)
        node.up = False
        node.core = None
        node.busy = False
        node.gen += 1
        node.incoming = {}
        node.proposals = {}
        node.reads = {}
        node.read_wait = []
        node.crash_point = None
        self.stats["crashes"] += 1

    def on_tick(self, node: SimNode, gen: int) -> None:
        if not node.up or node.gen != gen:
            return
        node.core.tick()
        self.pump(node)
        self.after(node.tick_ms, self.on_tick, node, gen)

    def restart_later(self, node: SimNode, delay: int) -> None:
        self.after(delay, self._restart, node, node.gen)

    def _restart(self, node: SimNode, gen: int) -> None:
        if node.up or node.gen != gen or node.decommissioned:
            return
        self.start_node(node)

    # ------------------------------------------------------------ the driver
    def pump(self, node: SimNode) -> None:
        """Process Readys until one needs an fsync (then wait for it) or none is left."""
        while node.up:
            self.observe(node)
            if node.busy or not node.core.has_ready():
                return
            self.handle_ready(node)

    def observe(self, node: SimNode) -> None:
        core = node.core
        if core.role == Role.LEADER and core.commit_index > node.seen_commit:
            lo = max(node.seen_commit + 1, core.first_index)
            for e in core.log_entries(lo, core.commit_index + 1):
                prev = self.commit_term.get(e.index)
                if prev is None:
                    self.commit_term[e.index] = (e, core.term)
                    if e.index > self.max_commit_term_index:
                        self.max_commit_term_index = e.index
                elif prev[0] != e:
                    self.violation("state-machine-safety",
                                   f"{node.id} (leader, term {core.term}) committed index {e.index} term {e.term}, "
                                   f"but term {prev[1]} committed term {prev[0].term} there")
            node.seen_commit = core.commit_index
        if core.role == Role.LEADER and core.term not in node.leader_terms_seen:
            node.leader_terms_seen.add(core.term)
            self.stats["elections"] += 1
            prev = self.leader_of_term.setdefault(core.term, node.id)
            self.tr(f"{node.id} LEADER term={core.term} last={core.last_index} commit={core.commit_index}")
            if prev != node.id:
                self.violation("election-safety", f"two leaders in term {core.term}: {prev} and {node.id}")
            self.check_leader_completeness(node)

    def handle_ready(self, node: SimNode) -> None:
        core = node.core
        rd = core.ready()
        self.stats["readies"] += 1
        if rd.soft_state is not None and rd.soft_state.role != Role.LEADER:
            # like the real driver: reads waiting at a deposed leader fail
            for ctx, (token, key) in list(node.reads.items()):
                if token[3] == "leader":
                    del node.reads[ctx]
                    self.reply(token, "err", None, rd.soft_state.leader)
        hs = rd.hard_state
        hs_durable = hs is None or (hs.term == node.persisted_hs.term and hs.vote == node.persisted_hs.vote)
        early: list[Message] = []
        late = rd.messages
        if self.opt.variant == "ack_before_fsync":
            early, late = rd.messages, []
        elif (self.leader_fast_path and hs_durable and rd.snapshot is None
              and core.role == Role.LEADER):
            early = [m for m in rd.messages if m.type in (MsgType.APP, MsgType.HEARTBEAT, MsgType.SNAP)]
            late = [m for m in rd.messages if m.type not in (MsgType.APP, MsgType.HEARTBEAT, MsgType.SNAP)]
        self.send(node, early)
        if not node.up:
            return
        data = None
        try:
            if rd.snapshot is not None:
                key = (rd.snapshot.index, rd.snapshot.term)
                data = node.incoming.pop(key, None)
                node.incoming = {k: v for k, v in node.incoming.items() if k[0] > key[0]}
                if data is None:
                    self.violation("driver-contract", f"{node.id} accepted snapshot {key} whose data never arrived")
                    raise _Abort()
                node.disk.write(("snap", rd.snapshot, data))
            if rd.entries:
                for e in rd.entries:
                    self.note_entry(node, e)
                node.disk.write(("ents", list(rd.entries)))
            if hs is not None:
                node.disk.write(("hs", hs))
        except _ContractError as exc:
            self.violation("driver-contract", f"{node.id}: {exc}")
            raise _Abort() from None
        need_sync = bool(rd.entries) or rd.snapshot is not None or not hs_durable
        if hs is not None:
            node.persisted_hs = hs
        if need_sync:
            if node.crash_point == "before_fsync":
                self.crash_node(node, why="crash point before_fsync")
                self.restart_later(node, self.rng.randint(0, 300))
                return
            node.busy = True
            delay = self.rng.randint(*self.fsync_range)
            if self.now < node.disk_stall_until:
                delay += self.rng.randint(20, 250)      # a disk hiccup: fsync takes ages
            self.after(delay, self.fsync_done, node, node.gen, rd, late, data)
        else:
            self.finish_ready(node, rd, late, data, synced=False)

    def fsync_done(self, node: SimNode, gen: int, rd, late, data) -> None:
        if not node.up or node.gen != gen:
            return
        self.finish_ready(node, rd, late, data, synced=True)
        self.pump(node)

    def finish_ready(self, node: SimNode, rd, late: list[Message], data, synced: bool) -> None:
        if synced:
            try:
                node.disk.sync()
            except _ContractError as exc:
                self.violation("driver-contract", f"{node.id}: {exc}")
                raise _Abort() from None
            self.stats["fsyncs"] += 1
            if node.crash_point == "after_fsync":
                self.crash_node(node, why="crash point after_fsync")
                self.restart_later(node, self.rng.randint(0, 300))
                return
        if rd.snapshot is not None:
            self.install_snapshot(node, rd.snapshot, data)
        self.send(node, late)
        if not node.up:
            return
        if node.crash_point == "after_send" and late:
            self.crash_node(node, why="crash point after_send")
            self.restart_later(node, self.rng.randint(0, 300))
            return
        if node.crash_point == "after_vote" and any(
                m.type == MsgType.VOTE_RESP and not m.reject for m in late):
            # the vote is durable and sent; a supervisor restarts the process at once
            self.crash_node(node, why="crash point after_vote")
            self.restart_later(node, self.rng.randint(0, 10))
            return
        if rd.committed:
            self.apply(node, rd.committed)
        for rs in rd.read_states:
            pending = node.reads.pop(rs.ctx, None)
            if pending is not None:
                node.read_wait.append((rs.index, pending[0], pending[1]))
        self.serve_reads(node)
        node.core.advance(rd)
        node.busy = False
        self.maybe_compact(node)

    def install_snapshot(self, node: SimNode, meta: SnapshotMeta, data: bytes) -> None:
        self.stats["snapshots_installed"] += 1
        self.tr(f"{node.id} install snapshot index={meta.index} term={meta.term}")
        if meta.index < node.applied:
            self.violation("driver-contract", f"{node.id} got snapshot {meta.index} < applied {node.applied}")
        node.sm.restore(data)
        node.applied = meta.index
        node.snap_meta, node.snap_data = meta, data
        self.check_sm_bytes(node, meta.index, data)
        c = self.committed.get(meta.index)
        if c is not None and c.term != meta.term:
            self.violation("state-machine-safety",
                           f"{node.id} installed snapshot at {meta.index} term {meta.term}, committed entry has term {c.term}")
        # a stale read waiting for an index covered by the snapshot can now be served
        self.serve_reads(node)

    def send(self, node: SimNode, msgs: list[Message]) -> None:
        core = node.core
        for m in msgs:
            if m.type == MsgType.VOTE_RESP and not m.reject:
                self.note_vote(node.id, m.term, m.to)
            elif m.type == MsgType.VOTE:
                self.note_vote(node.id, m.term, node.id)
            if m.type == MsgType.SNAP:
                if m.snapshot is None or m.snapshot.index != node.snap_meta.index:
                    self.violation("driver-contract",
                                   f"{node.id} asked to send snapshot {m.snapshot} but holds {node.snap_meta}")
                    core.report_snapshot(m.to, False)
                    continue
                m.context = node.snap_data
                ok = self.net.send(m, self.now)
                core.report_snapshot(m.to, ok)
                self.tr(f"{node.id} -> {m.to} SNAP index={m.snapshot.index} sent={ok}")
                continue
            ok = self.net.send(m, self.now)
            if not ok and core.role == Role.LEADER and m.type in (MsgType.APP, MsgType.HEARTBEAT):
                core.report_unreachable(m.to)

    def deliver(self, m: Message) -> None:
        node = self.nodes.get(m.to)
        if node is None or not node.up:
            return
        if m.type == MsgType.SNAP and m.snapshot is not None:
            # Keep the data of every snapshot received since the last Ready: an older SNAP
            # (reordered, duplicated) may arrive after the core accepted a newer one and
            # before that Ready is handed out (afs.raft.node keeps only the last one).
            node.incoming[(m.snapshot.index, m.snapshot.term)] = m.context
            m.context = b""
        for e in m.entries:
            self.note_entry(None, e)
        node.core.step(m)
        self.pump(node)

    # ------------------------------------------------------------ apply & reads
    def apply(self, node: SimNode, entries: list[Entry]) -> None:
        for e in entries:
            if e.index != node.applied + 1:
                self.violation("driver-contract", f"{node.id} applies {e.index} after {node.applied}")
                raise _Abort()
            prev = self.committed.get(e.index)
            if prev is None:
                self.committed[e.index] = e
                if e.index > self.max_committed:
                    self.max_committed = e.index
            elif prev != e:
                self.violation("state-machine-safety",
                               f"{node.id} applied index {e.index} term {e.term} but another node applied term {prev.term} "
                               f"(data {e.data!r} vs {prev.data!r})")
            ct = self.commit_term.get(e.index)
            if ct is not None and ct[0] != e:
                self.violation("state-machine-safety", f"{node.id} applies index {e.index} term {e.term}, but a leader "
                               f"of term {ct[1]} committed term {ct[0].term} there")
            result = None
            if e.type == EntryType.NORMAL and e.data:
                result = node.sm.apply(e.data)
            elif e.type == EntryType.CONF_CHANGE:
                self.stats["conf_changes"] += 1
                cc = decode_conf_change(msgpack.unpackb(e.data))
                self.tr(f"{node.id} apply conf {cc.type.name} {cc.node} at {e.index}")
            node.applied = e.index
            if e.index in self.sm_bytes_at:
                self.check_sm_bytes(node, e.index, node.sm.snapshot())
            p = node.proposals.pop(e.index, None)
            if p is not None:
                term, token = p
                if term == e.term:
                    if e.index not in self.acked:
                        self.acked[e.index] = e
                    self.reply(token, "ok", result, "", index=e.index)
                else:
                    self.reply(token, "dropped", None, "")
        if node.proposals and min(node.proposals) <= node.applied:
            for idx in sorted(i for i in node.proposals if i <= node.applied):
                _, token = node.proposals.pop(idx)
                self.reply(token, "dropped", None, "")
        self.serve_reads(node)

    def serve_reads(self, node: SimNode) -> None:
        if not node.read_wait:
            return
        keep = []
        for idx, token, key in node.read_wait:
            if node.applied >= idx:
                self.reply(token, "ok", node.sm.kv.get(key), "")
            else:
                keep.append((idx, token, key))
        node.read_wait = keep

    def maybe_compact(self, node: SimNode) -> None:
        if node.busy or node.applied - node.snap_meta.index < self.snap_threshold:
            return
        if node.core.snapshot_meta.index > node.applied and self.opt.variant != "unguarded_compact":
            # The core accepted a leader's snapshot that is not handed out in a Ready yet:
            # compact(applied) would return THAT snapshot's meta, which does not describe our
            # state machine data. Wait for the Ready (afs.raft.node lacks this guard).
            self.stats["compact_deferred"] += 1
            return
        data = node.sm.snapshot()
        meta = node.core.compact(node.applied)
        if meta.index != node.applied:
            self.violation("driver-contract", f"{node.id} compact({node.applied}) returned the snapshot meta of "
                           f"index {meta.index}: stored with state machine data of index {node.applied}")
            if self.opt.variant != "unguarded_compact":
                return
        c = self.committed.get(meta.index)
        if c is not None and c.term != meta.term:
            self.violation("state-machine-safety", f"{node.id} snapshot at {meta.index} has term {meta.term}, committed {c.term}")
        node.snap_meta, node.snap_data = meta, data
        # like the real driver: the log is compacted in memory now, the snapshot file is
        # saved in the background (temp, fsync, rename); until then the disk keeps the log
        self.after(self.rng.randint(*self.fsync_range), self._snapshot_saved, node, node.gen, meta, data)
        self.check_sm_bytes(node, meta.index, data)
        self.stats["snapshots_taken"] += 1
        self.tr(f"{node.id} compact to {meta.index}")

    def _snapshot_saved(self, node: SimNode, gen: int, meta: SnapshotMeta, data: bytes) -> None:
        if node.gen != gen or meta.index <= node.disk.snap.index:
            return      # crashed first (the old snapshot + log remain), or superseded
        if meta.index > node.disk.last_index():
            self.violation("driver-contract", f"{node.id} snapshot {meta.index} beyond its durable log {node.disk.last_index()}")
            return
        node.disk.compact(meta, data)

    # ------------------------------------------------------------ checkers
    def note_entry(self, node: SimNode | None, e: Entry) -> None:
        """Log matching (same index+term => same entry) and no committed entry overwritten."""
        k = (e.index, e.term)
        prev = self.entry_at.get(k)
        if prev is None:
            self.entry_at[k] = e
        elif prev != e:
            self.violation("log-matching", f"two different entries at index {e.index} term {e.term} "
                           f"({prev.data!r} vs {e.data!r})" + (f" in {node.id}'s log" if node else " in a message"))
        if node is not None:
            # an entry of a later term than the one that committed this index must be it
            ct = self.commit_term.get(e.index)
            if ct is not None and e.term > ct[1] and e != ct[0]:
                kind = "durability" if e.index in self.acked else "leader-completeness"
                self.violation(kind, f"{node.id} persists index {e.index} term {e.term} although a different "
                               f"entry (term {ct[0].term}) was committed there in term {ct[1]}"
                               + (" and acknowledged to a client" if e.index in self.acked else ""))

    def note_vote(self, voter: str, term: int, candidate: str) -> None:
        """Vote safety (Raft §5.2): a server votes for at most one candidate per term. Recorded
        when the vote leaves the node (a granting VOTE_RESP, or a candidate's own VOTE requests)."""
        prev = self.votes.setdefault((voter, term), candidate)
        if prev != candidate:
            self.violation("vote-safety", f"{voter} voted for {prev} and for {candidate} in term {term}")

    def check_sm_bytes(self, node: SimNode, index: int, data: bytes) -> None:
        prev = self.sm_bytes_at.setdefault(index, data)
        if prev != data:
            self.violation("state-machine-safety", f"{node.id}'s state at index {index} differs from another node's")

    def check_leader_completeness(self, node: SimNode) -> None:
        """Every entry committed in an earlier term is in the new leader's log."""
        core = node.core
        first = core.first_index
        for idx in range(max(first, 1), self.max_commit_term_index + 1):
            ct = self.commit_term.get(idx)
            if ct is None or ct[1] >= core.term:
                continue
            t = core.term_at(idx)
            if t != ct[0].term:
                self.violation("leader-completeness",
                               f"{node.id} leads term {core.term} without entry {idx} (term {ct[0].term}) committed "
                               f"in term {ct[1]}; its log has term {t} there (last {core.last_index})")
                return

    def check_log_matching_pairwise(self) -> None:
        logs = []
        for node in self.nodes.values():
            if node.up:
                c = node.core
                logs.append((node.id, c.first_index, c.log_entries(c.first_index, c.last_index + 1)))
            else:
                d = node.disk
                logs.append((node.id + "(disk)", d.snap.index + 1, d.entries))
        for i in range(len(logs)):
            for j in range(i + 1, len(logs)):
                na, fa, la = logs[i]
                nb, fb, lb = logs[j]
                lo = max(fa, fb)
                hi = min(fa + len(la), fb + len(lb)) - 1
                # highest index where both have the same term
                top = None
                for idx in range(hi, lo - 1, -1):
                    if la[idx - fa].term == lb[idx - fb].term:
                        top = idx
                        break
                if top is None:
                    continue
                for idx in range(lo, top + 1):
                    if la[idx - fa] != lb[idx - fb]:
                        self.violation("log-matching", f"{na} and {nb} agree at index {top} but differ at {idx}")
                        return

    # ------------------------------------------------------------ clients
    def client_issue(self, c: SimClient) -> None:
        if self.phase != "run" or self.ops_started >= self.opt.ops:
            return
        self.ops_started += 1
        r = self.rng
        c.seq += 1
        c.attempt = 0
        c.proposed = False
        c.deadline = self.now + OP_DEADLINE
        c.key = r.choice(KEYS)
        x = r.random()
        if x < 0.4:
            c.kind, c.a, c.b = "read", None, None
            c.read_mode = "leader" if r.random() < 0.75 else "any"
            op = Op(c.cid, "read", c.key, None, None, self.now, None, "info")
        elif x < 0.75:
            c.kind, c.a, c.b = "write", c.cid * 1_000_000 + c.seq, None
            op = Op(c.cid, "write", c.key, c.a, None, self.now, None, "info")
        else:
            exp = c.last_seen.get(c.key) if r.random() < 0.8 else r.choice((None, 0))
            c.kind, c.a, c.b = "cas", exp, c.cid * 1_000_000 + c.seq
            op = Op(c.cid, "cas", c.key, (c.a, c.b), None, self.now, None, "info")
        c.op = op
        self.tr(f"client{c.cid} invoke #{c.seq} {c.kind} {c.key} {c.a} {c.b}")
        self.client_attempt(c)

    def pick_target(self, c: SimClient) -> str:
        if c.guess and c.guess in self.nodes and not self.nodes[c.guess].decommissioned:
            return c.guess
        cands = [n.id for n in self.nodes.values() if not n.decommissioned]
        return self.rng.choice(cands)

    def client_attempt(self, c: SimClient) -> None:
        c.attempt += 1
        mode = c.read_mode if c.kind == "read" else "-"
        if c.kind == "read" and mode == "any":
            target = self.rng.choice([n.id for n in self.nodes.values() if not n.decommissioned])
        else:
            target = self.pick_target(c)
        token = (c.cid, c.seq, c.attempt, mode, target)
        self.after(self.rng.randint(1, 3), self.node_request, target, token)
        self.after(ATTEMPT_TIMEOUT, self.client_timeout, token)

    def node_request(self, target: str, token: tuple) -> None:
        cid, seq, attempt, mode, _ = token
        c = self.clients[cid - 1]
        if c.seq != seq or c.op is None or c.attempt != attempt:
            return
        node = self.nodes.get(target)
        if node is None or not node.up:
            return              # no answer: the client times out
        core = node.core
        try:
            if c.kind == "read" and self.opt.variant == "stale_reads":
                self.reply(token, "ok", node.sm.kv.get(c.key), "")   # no ReadIndex: may be stale
                return
            if c.kind == "read":
                if mode == "leader" and core.role != Role.LEADER:
                    raise errors.NotLeader("not the leader", leader=core.leader)
                ctx = f"{cid}:{seq}:{attempt}".encode()
                core.read_index(ctx)
                node.reads[ctx] = (token, c.key)
            else:
                data = KVStateMachine.encode(cid, seq, c.kind, c.key, c.a, c.b)
                idx = core.propose(data)
                c.proposed = True
                node.proposals[idx] = (core.term, token)
                self.tr(f"{node.id} propose client{cid}#{seq} at {idx} term {core.term}")
        except errors.NotLeader as exc:
            self.reply(token, "err", None, exc.details.get("leader", "") or "")
            return
        except errors.Unavailable:
            self.reply(token, "err", None, "")
            return
        self.pump(node)

    def reply(self, token: tuple, status: str, value: Any, hint: str, index: int = 0) -> None:
        self.after(self.rng.randint(1, 3), self.client_reply, token, status, value, hint)

    def client_reply(self, token: tuple, status: str, value: Any, hint: str) -> None:
        cid, seq, attempt, mode, target = token
        c = self.clients[cid - 1]
        if c.op is None or c.seq != seq or c.attempt != attempt:
            return
        if status == "ok":
            c.guess = target if mode != "any" else c.guess
            if c.kind == "read":
                c.last_seen[c.key] = value
                self.finish_op(c, "ok", value)
            elif c.kind == "write":
                c.last_seen[c.key] = c.a
                self.finish_op(c, "ok", None)
            else:
                if value:
                    c.last_seen[c.key] = c.b
                self.finish_op(c, "ok", bool(value))
            return
        # err / dropped: retry elsewhere
        if hint and hint in self.nodes:
            c.guess = hint
        else:
            c.guess = ""
        self.client_retry(c, backoff=self.rng.randint(2, 20) if not hint else 1)

    def client_timeout(self, token: tuple) -> None:
        cid, seq, attempt, _, _ = token
        c = self.clients[cid - 1]
        if c.op is None or c.seq != seq or c.attempt != attempt:
            return
        c.guess = ""
        self.client_retry(c, backoff=0)

    def client_retry(self, c: SimClient, backoff: int) -> None:
        if self.now + backoff >= c.deadline:
            self.finish_op(c, "info" if (c.proposed and c.kind != "read") else "fail", None)
            return
        c.attempt += 1          # invalidates the outstanding attempt
        seq, att = c.seq, c.attempt

        def go() -> None:
            if c.op is not None and c.seq == seq and c.attempt == att:
                self.client_attempt(c)
        self.after(backoff, go)

    def finish_op(self, c: SimClient, status: str, output: Any) -> None:
        op = c.op
        c.op = None
        op.status = status
        if status == "ok":
            op.output = output
            op.complete = self.now
        self.tr(f"client{c.cid} complete #{c.seq} {op.kind} {op.key} -> {status} {output!r}")
        self.history.append(op)
        self.after(self.rng.randint(0, 15), self.client_issue, c)

    # ------------------------------------------------------------ faults
    def schedule_fault(self) -> None:
        self.after(self.rng.randint(*self.fault_gap), self.fault)

    def fault(self) -> None:
        if self.phase != "run":
            return
        self.schedule_fault()
        r = self.rng
        members = [n for n in self.nodes.values() if not n.decommissioned]
        leader = self.current_leader()
        choice = r.choices(
            ["partition", "isolate_leader", "one_way", "crash", "crash_point", "power_loss",
             "restart", "net_profile", "transfer", "disk_stall"],
            weights=[10, 8, 6, 14, 8, 4, 5, 8, 5, 4])[0]
        if choice in ("partition", "isolate_leader", "one_way") and self.topology_fault:
            return
        if choice == "partition":
            ids = [n.id for n in members]
            r.shuffle(ids)
            cut = r.randint(1, max(1, len(ids) // 2))
            groups = [ids[:cut], ids[cut:]]
            self.net.partition(groups)
            self._topology(f"partition {groups}")
        elif choice == "isolate_leader":
            if leader is None:
                return
            self.net.isolate(leader.id)
            self._topology(f"isolate leader {leader.id}")
        elif choice == "one_way":
            ids = [n.id for n in members]
            if len(ids) < 2:
                return
            a, b = r.sample(ids, 2)
            if leader is not None and r.random() < 0.5:
                a = leader.id
                b = r.choice([i for i in ids if i != a] or [b])
            self.net.one_way_cut(a, b)
            if r.random() < 0.3 and leader is not None:
                others = [i for i in ids if i not in (a, leader.id)]
                if others:
                    self.net.one_way_cut(r.choice(others), leader.id)
            self._topology(f"one-way cut {self.net.describe()}")
        elif choice == "crash":
            ups = [n for n in members if n.up]
            if not ups:
                return
            node = leader if (leader is not None and r.random() < 0.4) else r.choice(ups)
            self.crash_node(node)
            self.restart_later(node, r.randint(0, 600))
        elif choice == "crash_point":
            ups = [n for n in members if n.up]
            if not ups:
                return
            node = leader if (leader is not None and r.random() < 0.4) else r.choice(ups)
            point = r.choice(("before_fsync", "after_fsync", "after_send", "after_vote"))
            if point == "after_vote":
                # votes happen in elections: arm every voter, then force an election
                for n in members:
                    if n.up:
                        n.crash_point = point
                self.tr("armed crash point after_vote everywhere")
                if leader is not None and r.random() < 0.7:
                    self.crash_node(leader)
                    self.restart_later(leader, r.randint(0, 300))
            else:
                node.crash_point = point
                self.tr(f"{node.id} armed crash point {node.crash_point}")
        elif choice == "power_loss":
            ups = [n for n in members if n.up]
            if not ups:
                return
            self.stats["power_loss"] += 1
            if r.random() < 0.5:
                victims = ups
            else:
                victims = r.sample(ups, max(1, len(ups) // 2 + 1))
            self.tr(f"power loss on {[v.id for v in victims]}")
            for v in victims:
                self.crash_node(v, why="power loss")
            base = r.randint(5, 300)
            for v in victims:
                self.restart_later(v, base + r.randint(0, 40))
        elif choice == "restart":
            ups = [n for n in members if n.up]
            if not ups:
                return
            node = r.choice(ups)
            self.crash_node(node, lose=False, why="clean restart")
            self.restart_later(node, r.randint(0, 100))
        elif choice == "net_profile":
            drop = r.choice((0.0, 0.02, 0.1, 0.25))
            dup = r.choice((0.0, 0.05, 0.2))
            delay = r.choice(((1, 5), (1, 20), (5, 40)))
            self.net.set_faults(drop=drop, duplicate=dup, delay=delay)
            self.tr(f"net profile drop={drop} dup={dup} delay={delay}")
            self.after(r.randint(200, 1500), self._calm_net)
        elif choice == "disk_stall":
            ups = [n for n in members if n.up]
            if not ups:
                return
            node = leader if (leader is not None and r.random() < 0.5) else r.choice(ups)
            node.disk_stall_until = self.now + r.randint(100, 1000)
            self.tr(f"{node.id} disk stalls until {node.disk_stall_until}")
        elif choice == "transfer":
            if leader is None:
                return
            voters = [v for v in leader.core.conf.voters if v != leader.id]
            if not voters:
                return
            to = r.choice(voters)
            self.stats["transfers"] += 1
            self.tr(f"transfer leadership {leader.id} -> {to}")
            leader.core.transfer_leadership(to)
            self.pump(leader)

    def _topology(self, what: str) -> None:
        self.topology_fault = True
        self.stats["partitions"] += 1
        self.tr(f"net {what}")
        self.after(self.rng.randint(100, 1000), self._heal)

    def _heal(self) -> None:
        self.net.heal()
        self.topology_fault = False
        self.tr("net heal")

    def _calm_net(self) -> None:
        self.net.set_faults(drop=0.0, duplicate=0.0, delay=self.base_delay)

    # ------------------------------------------------------------ membership
    def admin(self) -> None:
        if self.phase != "run":
            return
        r = self.rng
        self.after(r.randint(150, 700), self.admin)
        leader = self.current_leader()
        if leader is None:
            return
        core = leader.core
        conf = core.conf
        members = self.members_of(conf)
        # decommission nodes that are no longer members (they keep their disks)
        for node in self.nodes.values():
            if node.up and node.id not in members and self.now - node.joined_at > 1500:
                self.crash_node(node, lose=False, why="decommission")
                node.decommissioned = True
        status = core.status()
        prog = status.get("progress", {})
        opts = []
        for l in conf.learners:
            p = prog.get(l)
            if p is not None and p["match"] >= core.commit_index:
                opts += [("promote", l)] * 3
            opts.append(("remove", l))
        if len(conf.voters) < self.max_voters and len(members) < self.max_voters + 1:
            opts += [("add", "")] * 2
        if len(conf.voters) > self.min_voters:
            victims = [v for v in conf.voters if v != leader.id or r.random() < 0.2]
            for v in victims:
                opts.append(("remove", v))
        if not opts:
            return
        action, who = r.choice(opts)
        if action == "add":
            spare = [n for n in self.nodes.values() if n.decommissioned and n.id not in members]
            if spare and r.random() < 0.5:
                node = r.choice(spare)
                self.tr(f"admin re-add {node.id} (old disk, last {node.disk.last_index()})")
                node.decommissioned = False
                node.joined_at = self.now
                if not node.up:
                    self.start_node(node)
            else:
                nid = f"n{self.next_node}"
                self.next_node += 1
                # a joiner starts unconfigured (as a real server does) or, in some seeds, with
                # the cluster's bootstrap configuration at index 0; both must work
                base = SnapshotMeta() if self.joiner_unconfigured else self.bootstrap_meta
                node = SimNode(nid, Disk(base, EMPTY_SM), r.getrandbits(32))
                node.joined_at = self.now
                self.nodes[nid] = node
                self.tr(f"admin add new node {nid}")
                self.start_node(node)
            cc = ConfChange(ConfChangeType.ADD_LEARNER, node.id)
        elif action == "promote":
            cc = ConfChange(ConfChangeType.PROMOTE, who)
        else:
            cc = ConfChange(ConfChangeType.REMOVE, who)
        if not leader.up:
            return
        try:
            idx = leader.core.propose_conf_change(cc)
            self.tr(f"admin propose {cc.type.name} {cc.node} at {idx} via {leader.id}")
        except errors.Unavailable as exc:
            self.tr(f"admin {cc.type.name} {cc.node} refused: {exc}")
            return
        self.pump(leader)

    # ------------------------------------------------------------ main loop
    def _step_until(self, t_end: int, stop: Callable[[], bool] | None = None) -> None:
        heap = self._heap
        net = self.net
        n = 0
        while True:
            t_ev = heap[0][0] if heap else None
            t_net = net.next_due()
            if t_ev is None and t_net is None:
                return
            if t_net is not None and (t_ev is None or t_net <= t_ev):
                t = t_net
                if t > t_end:
                    return
                self.now = t
                msgs = net.deliver(t)
                self.events += len(msgs)
                for m in msgs:
                    self.deliver(m)
            else:
                t = t_ev
                if t > t_end:
                    return
                self.now = t
                _, _, fn, args = heapq.heappop(heap)
                fn(*args)
            n += 1
            self.events += 1
            if self.events > self.max_events:
                self.violation("liveness", f"event budget of {self.max_events} exhausted: a message storm or "
                               f"livelock (net: {self.net.stats})")
                raise _Abort()
            if stop is not None and n % 64 == 0 and stop():
                return

    def _clients_done(self) -> bool:
        return self.ops_started >= self.opt.ops and all(c.op is None for c in self.clients)

    def run(self) -> SimResult:
        res = SimResult(self.seed, self.opt)
        try:
            for node in self.nodes.values():
                self.start_node(node)
            for c in self.clients:
                self.after(self.rng.randint(50, 300), self.client_issue, c)
            self.schedule_fault()
            if self.membership_on:
                self.after(self.rng.randint(100, 600), self.admin)
            self._step_until(MAX_RUN_MS, self._clients_done)
            self.final_phase()
        except _Abort:
            pass
        except Exception as exc:  # noqa: BLE001 - a crash of the core (or the sim) is a finding
            tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
            self.violation("exception", f"{type(exc).__name__}: {exc}\n" + "".join(tb[-6:]))
        # pending ops are indeterminate
        for c in self.clients:
            if c.op is not None:
                op, c.op = c.op, None
                op.status = "info" if (c.proposed and op.kind != "read") else "fail"
                self.history.append(op)
        if not any(v.startswith("[exception]") for v in self.violations):
            lin = check_history(self.history, KVModel())
            if not lin.ok:
                self.violation("linearizability", lin.explanation)
        res.violations = list(self.violations)
        res.ops_ok = sum(1 for op in self.history if op.status == "ok")
        res.ops_info = sum(1 for op in self.history if op.status == "info")
        res.ops_done = res.ops_ok + res.ops_info
        res.virtual_ms = self.now
        res.stats = dict(self.stats, net=dict(self.net.stats))
        res.trace = self.trace
        return res

    def final_phase(self) -> None:
        """Heal everything, restart every node, and require convergence (liveness) plus the
        final safety checks."""
        self.phase = "final"
        self.tr("final phase: heal, restart all, converge")
        self.net.heal()
        self.topology_fault = False
        self._calm_net()
        for node in self.nodes.values():
            node.crash_point = None
        for node in self.nodes.values():
            if not node.up:
                self.start_node(node)
        # let pending client ops finish or time out, then wait for convergence; the check
        # below runs at the very instant the loop stopped
        self._step_until(self.now + OP_DEADLINE + ATTEMPT_TIMEOUT, lambda: all(c.op is None for c in self.clients))
        self._step_until(self.now + CONVERGE_MS, self._converged)
        leader = self.current_leader()
        if not self._converged():
            desc = ", ".join(
                f"{n.id}:{'up' if n.up else 'down'}"
                + (f"/{n.core.role.value}/t{n.core.term}/c{n.core.commit_index}/a{n.applied}/l{n.core.last_index}"
                   if n.up else "") for n in self.nodes.values())
            self.violation("liveness", f"cluster did not converge {CONVERGE_MS} ms after healing: {desc}")
        self.check_log_matching_pairwise()
        if leader is None:
            return
        self.final_leader = leader.id
        core = leader.core
        # durability: every acknowledged entry is still in the leader's log (or its snapshot)
        for idx, e in self.acked.items():
            if idx > core.snapshot_meta.index:
                t = core.term_at(idx)
                if t != e.term:
                    self.violation("durability", f"acknowledged entry {idx} (term {e.term}) lost: leader "
                                   f"{leader.id} has term {t} there")
            elif idx > self.max_committed:
                self.violation("durability", f"acknowledged entry {idx} beyond anything committed")
        # all members converged to the same state
        states = {}
        for nid in self.members_of(core.conf):
            node = self.nodes.get(nid)
            if node is not None and node.up:
                states.setdefault(node.sm.snapshot(), []).append(f"{nid}@{node.applied}")
        if len(states) > 1:
            self.violation("state-machine-safety", f"members disagree after convergence: {list(states.values())}")

    def _converged(self) -> bool:
        leader = self.current_leader()
        if leader is None:
            return False
        core = leader.core
        if core.commit_index != core.last_index or core.term_at(core.commit_index) != core.term:
            return False
        if leader.applied != core.commit_index:
            return False
        for nid in self.members_of(core.conf):
            node = self.nodes.get(nid)
            if node is None or not node.up or node.applied != core.commit_index:
                return False
        return True


# ====================================================================== entry points

def run_seed(seed: int, options: SimOptions | None = None) -> SimResult:
    return Simulation(seed, options).run()


def _run_one(args: tuple[int, SimOptions]) -> SimResult:
    seed, opt = args
    res = run_seed(seed, opt)
    if not opt.trace:
        res.trace = []
    return res


def run_seeds(seeds: range | list[int], options: SimOptions, jobs: int = 1):
    """Yield results in seed order (deterministic output whatever ``jobs`` is)."""
    work = [(s, options) for s in seeds]
    if jobs <= 1 or len(work) <= 1:
        for w in work:
            yield _run_one(w)
        return
    import multiprocessing as mp
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    with ctx.Pool(jobs) as pool:
        yield from pool.imap(_run_one, work, chunksize=4)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m afs.testing.sim", description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=1, help="how many seeds to run")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--nodes", type=int, default=3, choices=(1, 3, 5), help="initial voters")
    p.add_argument("--ops", type=int, default=SimOptions.ops, help="client ops per seed")
    p.add_argument("--variant", default="normal", choices=VARIANTS)
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="worker processes")
    p.add_argument("--trace", action="store_true", help="print the event trace of failing seeds")
    p.add_argument("--verbose", "-v", action="store_true", help="a line per seed")
    a = p.parse_args(argv)
    opt = SimOptions(nodes=a.nodes, ops=a.ops, variant=a.variant, trace=a.trace)
    t0 = time.monotonic()
    total_ops = 0
    total_v = 0
    failing = 0
    for res in run_seeds(range(a.seed, a.seed + a.seeds), opt, jobs=a.jobs):
        total_ops += res.ops_done
        total_v += len(res.violations)
        if a.verbose:
            print(f"seed={res.seed} ops={res.ops_done} (ok {res.ops_ok}, info {res.ops_info}) "
                  f"vms={res.virtual_ms} violations={len(res.violations)} {res.stats}", flush=True)
        if res.violations:
            failing += 1
            if a.trace:
                print("\n".join(res.trace))
            first = res.violations[0].splitlines()
            print(f"FAIL seed={res.seed} violations={len(res.violations)} {first[0]}", flush=True)
            for line in first[1:] + [v.splitlines()[0] for v in res.violations[1:5]]:
                print(f"    {line}")
            print(f"    reproduce: {res.repro()}", flush=True)
    dt = time.monotonic() - t0
    sys.stdout.flush()
    print(f"# {a.seeds} seeds in {dt:.1f}s ({dt / max(1, a.seeds):.3f} s/seed, jobs={a.jobs}), "
          f"failing seeds={failing}", file=sys.stderr, flush=True)
    print(f"seeds={a.seeds} nodes={a.nodes} ops={total_ops} violations={total_v}", flush=True)
    return 1 if total_v else 0


if __name__ == "__main__":
    sys.exit(main())
