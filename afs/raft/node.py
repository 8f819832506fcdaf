"""The asyncio driver around the pure Raft core.

Threading: everything here runs on one asyncio event loop, except the blocking storage calls
(WAL append + fsync, snapshot save), which run on one dedicated I/O thread so that proposals and
messages keep arriving while an fsync is in flight. The core is only touched from the loop thread.

The Ready loop (one Ready at a time, as etcd-io/raft requires):
1. take ``rd = raft.ready()``;
2. leader fast path: if ``rd`` does not change term or vote, the leader's own APP/heartbeat
   messages are sent *before* its fsync (Raft thesis §10.2.1). This is safe because the core
   counts the leader itself towards a commit only for entries that ``advance`` confirmed durable;
3. persist: an accepted snapshot (data + meta), then hard state + entries with ONE fsync. Every
   proposal that arrived while the previous fsync was in flight is in this Ready: group commit;
4. send the remaining messages (votes, append responses, ...), which may depend on step 3;
5. apply committed entries to the state machine, resolve proposal futures and read barriers;
6. ``raft.advance(rd)``.

A failed fsync is fatal: the node stops and ``on_fatal`` is called (the server exits).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import heapq
import itertools
import logging
from dataclasses import dataclass
from typing import Any, Callable

import msgpack

from afs import errors
from afs.raft.core import Config as RaftConfig
from afs.raft.core import Raft, Role
from afs.raft.messages import (
    ConfChange, ConfChangeType, ConfState, EntryType, HardState, Message, MsgType, SnapshotMeta,
    decode_conf_change,
)
from afs.raft.statemachine import StateMachine

log = logging.getLogger("afs.raft")

SNAPSHOT_FORMAT = 1


@dataclass
class NodeConfig:
    """Timing and housekeeping of one member. ``validate()`` raises InvalidInput."""

    tick_interval: float = 0.05      # seconds per Raft tick
    election_tick: int = 10          # election timeout = 10..20 ticks = 0.5..1 s
    heartbeat_tick: int = 2          # heartbeat every 100 ms
    snapshot_every: int = 20000      # take a snapshot after this many applied entries
    pre_vote: bool = True
    check_quorum: bool = True
    max_inflight_msgs: int = 256
    max_size_per_msg: int = 1 << 20
    leader_sends_before_fsync: bool = True

    def validate(self) -> None:
        if self.tick_interval <= 0 or self.election_tick <= self.heartbeat_tick:
            raise errors.InvalidInput("raft timing: need tick_interval > 0 and election_tick > heartbeat_tick")
        if self.snapshot_every < 1:
            raise errors.InvalidInput("snapshot_every must be >= 1")


def _expire(fut: asyncio.Future, what: str, timeout: float) -> None:
    """Timer callback of RaftNode._await: fail a still-pending wait with Timeout."""
    if not fut.done():
        fut.set_exception(errors.Timeout(f"{what} timed out after {timeout:.1f}s (no quorum?)"))


def encode_member_info(peer_addr: str, client_addr: str = "") -> bytes:
    return msgpack.packb({"peer_addr": peer_addr, "client_addr": client_addr}, use_bin_type=True)


def decode_member_info(ctx: bytes) -> dict:
    try:
        info = msgpack.unpackb(ctx, raw=False) if ctx else {}
    except Exception:  # noqa: BLE001 - opaque bytes from the log; tolerate garbage
        info = {}
    if not isinstance(info, dict):
        info = {}
    return {"peer_addr": str(info.get("peer_addr", "")), "client_addr": str(info.get("client_addr", ""))}


class RaftNode:
    """One Raft member: core + durable storage + transport + state machine.

    ``members`` maps member name -> {"peer_addr", "client_addr"}; it is replicated through
    conf-change entries and carried in snapshots, so every member agrees on it.
    """

    def __init__(self, node_id: str, storage, sm: StateMachine, *, config: NodeConfig | None = None,
                 bootstrap: dict[str, dict] | None = None,
                 on_snapshot_installed: Callable[[SnapshotMeta], None] | None = None,
                 on_fatal: Callable[[BaseException], None] | None = None,
                 seed: int | None = None):
        self.id = node_id
        self.cfg = config or NodeConfig()
        self.cfg.validate()
        self.storage = storage
        self.sm = sm
        self.transport = None
        self.on_snapshot_installed = on_snapshot_installed
        self.on_fatal = on_fatal
        self.members: dict[str, dict] = {}
        self._io = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"raft-io-{node_id}")
        self._wake = asyncio.Event()
        self._running = False
        self._fatal: BaseException | None = None
        self._tasks: list[asyncio.Task] = []
        self._proposals: dict[int, tuple[int, asyncio.Future]] = {}
        self._read_pending: list[asyncio.Future] = []
        self._read_inflight: dict[bytes, list[asyncio.Future]] = {}
        self._read_seq = itertools.count(1)
        self._apply_waiters: list[tuple[int, int, asyncio.Future]] = []
        self._waiter_seq = itertools.count()
        self._snapshot: tuple[SnapshotMeta, bytes] | None = None
        self._pending_incoming: dict[tuple[int, int], bytes] = {}
        self._persisted_hs = HardState()
        self._applied_since_snapshot = 0
        self._snapshot_task: asyncio.Future | None = None
        self.applied_index = 0
        self.stats = {"proposals": 0, "applied": 0, "fsyncs": 0, "ready_batches": 0,
                      "snapshots_sent": 0, "snapshots_taken": 0, "snapshots_installed": 0}
        self.raft = self._restore(bootstrap, seed)

    # ------------------------------------------------------------ start-up / recovery
    def _restore(self, bootstrap: dict[str, dict] | None, seed: int | None) -> Raft:
        hs, snap_meta, entries = self.storage.initial_state()
        loaded = self.storage.load_snapshot()
        fresh = hs == HardState() and not entries and loaded is None
        if fresh:
            if not bootstrap:
                raise errors.InvalidInput("empty data directory and no initial cluster to bootstrap from")
            self.members = {name: dict(info) for name, info in sorted(bootstrap.items())}
            snap_meta = SnapshotMeta(0, 0, ConfState(voters=tuple(sorted(bootstrap))))
            data = self._encode_snapshot()
            self.storage.save_snapshot(snap_meta, data)
            loaded = (snap_meta, data)
        if loaded is not None:
            snap_meta, data = loaded
            self._restore_snapshot_data(data)
            self._snapshot = (snap_meta, data)
        if bootstrap and not fresh:
            self._check_bootstrap(bootstrap)
        self.applied_index = snap_meta.index
        rc = RaftConfig(
            id=self.id, election_tick=self.cfg.election_tick, heartbeat_tick=self.cfg.heartbeat_tick,
            pre_vote=self.cfg.pre_vote, check_quorum=self.cfg.check_quorum,
            max_size_per_msg=self.cfg.max_size_per_msg, max_inflight_msgs=self.cfg.max_inflight_msgs,
            seed=seed if seed is not None else hash((self.id, id(self))) & 0xFFFFFFFF,
        )
        self._persisted_hs = hs
        raft = Raft(rc, hard_state=hs, snapshot=snap_meta, entries=entries, applied=snap_meta.index)
        # Addresses of members added by not-yet-applied conf changes must be reachable now
        # (membership is effective when appended).
        self._pending_addrs: dict[str, str] = {}
        for e in entries:
            self._note_appended_conf(e)
        return raft

    def _check_bootstrap(self, bootstrap: dict[str, dict]) -> None:
        """On restart the initial cluster is only checked, never re-applied."""
        known = set(self.members)
        if self.id not in known and known:
            log.warning("event=bootstrap_mismatch detail=%r", f"{self.id} is not a member of the stored cluster {sorted(known)}")
        for name, info in bootstrap.items():
            stored = self.members.get(name)
            if stored and stored.get("peer_addr") != info.get("peer_addr"):
                log.warning("event=bootstrap_mismatch member=%s stored=%s given=%s", name,
                            stored.get("peer_addr"), info.get("peer_addr"))

    def _encode_snapshot(self) -> bytes:
        return msgpack.packb([SNAPSHOT_FORMAT, self.members, self.sm.snapshot()], use_bin_type=True)

    def _restore_snapshot_data(self, data: bytes) -> None:
        try:
            fmt, members, sm_data = msgpack.unpackb(data, raw=False)
        except Exception as exc:  # noqa: BLE001
            raise errors.StorageCorrupt(f"snapshot envelope unreadable: {exc}") from exc
        if fmt != SNAPSHOT_FORMAT:
            raise errors.StorageCorrupt(f"unknown snapshot format {fmt}")
        self.members = {str(k): dict(v) for k, v in members.items()}
        self.sm.restore(sm_data)

    def peer_addrs(self) -> dict[str, str]:
        addrs = {n: m["peer_addr"] for n, m in self.members.items() if n != self.id}
        for n, a in self._pending_addrs.items():
            if n != self.id:
                addrs.setdefault(n, a)
        return addrs

    # ------------------------------------------------------------ lifecycle
    def attach_transport(self, transport) -> None:
        self.transport = transport

    async def start(self) -> None:
        self._running = True
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._run(), name=f"raft-ready-{self.id}"),
                       loop.create_task(self._ticker(), name=f"raft-tick-{self.id}")]
        self._wake.set()

    async def stop(self) -> None:
        self._running = False
        self._wake.set()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        self._fail_all(errors.Unavailable("server is shutting down"))
        self._io.shutdown(wait=True)

    # ------------------------------------------------------------ inputs
    def receive(self, m: Message) -> None:
        """Called by the transport (loop thread) for each inbound message."""
        if not self._running:
            return
        if m.type == MsgType.SNAP and m.snapshot is not None:
            # Keep data by (index, term): a reordered older snapshot arriving after the core
            # accepted a newer one must not replace the accepted data. Bounded to 4 entries.
            self._pending_incoming[(m.snapshot.index, m.snapshot.term)] = m.context
            while len(self._pending_incoming) > 4:
                self._pending_incoming.pop(min(self._pending_incoming))
            m.context = b""
        self.raft.step(m)
        self._wake.set()

    def report_unreachable(self, peer: str) -> None:
        if self._running:
            self.raft.report_unreachable(peer)
            self._wake.set()

    def report_snapshot(self, peer: str, ok: bool) -> None:
        """The transport finished (ok) or failed to stream a snapshot to ``peer``."""
        if self._running:
            self.raft.report_snapshot(peer, ok)
            self._wake.set()

    def _check_running(self) -> None:
        if self._fatal is not None:
            raise errors.Unavailable(f"member stopped after a storage failure: {self._fatal}")
        if not self._running:
            raise errors.Unavailable("member is not running")

    async def propose(self, data: bytes, timeout: float = 5.0) -> Any:
        """Replicate ``data``; return the state machine's result once applied here.

        Raises NotLeader (with the leader's name), Unavailable, Timeout, ProposalDropped.
        """
        self._check_running()
        index = self.raft.propose(data)
        fut = asyncio.get_running_loop().create_future()
        self._proposals[index] = (self.raft.term, fut)
        self.stats["proposals"] += 1
        self._wake.set()
        return await self._await(fut, timeout, "proposal")

    async def propose_conf_change(self, cc: ConfChange, timeout: float = 10.0) -> Any:
        self._check_running()
        index = self.raft.propose_conf_change(cc)
        fut = asyncio.get_running_loop().create_future()
        self._proposals[index] = (self.raft.term, fut)
        self._wake.set()
        return await self._await(fut, timeout, "membership change")

    async def read_barrier(self, timeout: float = 5.0) -> int:
        """Linearizable read barrier (ReadIndex): returns once this member has applied
        everything committed before the call. Returns the applied index."""
        self._check_running()
        if self.raft.role != Role.LEADER:
            raise errors.NotLeader("not the leader", leader=self.raft.leader)
        fut = asyncio.get_running_loop().create_future()
        self._read_pending.append(fut)
        self._wake.set()
        return await self._await(fut, timeout, "read barrier")

    def install_test_break(self, name: str) -> None:
        """TEST-ONLY negative control (see afs/server/server.py): ``ack_before_quorum`` makes the
        leader count a quorum of ONE when it advances its commit index, so it commits, applies
        and acknowledges entries that only it has. Elections, CheckQuorum and ReadIndex still
        use the real quorum."""
        if name != "ack_before_quorum":
            return
        raft = self.raft
        orig = raft._maybe_commit

        def maybe_commit_without_quorum() -> bool:
            raft._quorum = lambda: 1
            try:
                return orig()
            finally:
                del raft._quorum

        raft._maybe_commit = maybe_commit_without_quorum

    def transfer_leadership(self, to: str) -> None:
        self._check_running()
        self.raft.transfer_leadership(to)
        self._wake.set()

    async def _await(self, fut: asyncio.Future, timeout: float, what: str):
        # One timer handle per call instead of wait_for(shield(fut)) (which costs a waiter
        # future, a shield future, a timer and ~4 extra callbacks per proposal: ~9 us of loop
        # time each, measured in bench/raft_bench.py). Each future here has exactly one awaiter,
        # and every resolver checks fut.done() first, so the timer may fail ``fut`` itself and a
        # cancelled caller may cancel it (its entry still commits; nobody is told).
        handle = fut.get_loop().call_later(timeout, _expire, fut, what, timeout)
        try:
            return await fut
        finally:
            handle.cancel()

    # ------------------------------------------------------------ loops
    async def _ticker(self) -> None:
        while self._running:
            await asyncio.sleep(self.cfg.tick_interval)
            self.raft.tick()
            self._wake.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._running:
                await self._wake.wait()
                self._wake.clear()
                self._start_read_round()
                while self._running and self.raft.has_ready():
                    await self._handle_ready(loop)
                    # Let the callers woken by this Ready (resolved proposals) run first, so
                    # their next proposals and the leader's new commit index leave in ONE
                    # append per follower instead of a commit-only append plus another.
                    await asyncio.sleep(0)
                    self._start_read_round()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - fatal: storage failure or broken state machine
            self._fatal = exc
            self._running = False
            log.error("event=fatal error=%r", exc)
            self._fail_all(errors.Unavailable(f"member stopped: {exc}"))
            if self.on_fatal:
                self.on_fatal(exc)

    def _start_read_round(self) -> None:
        if not self._read_pending:
            return
        waiters, self._read_pending = self._read_pending, []
        ctx = next(self._read_seq).to_bytes(8, "big")
        try:
            self.raft.read_index(ctx)
        except errors.AfsError as exc:
            for f in waiters:
                if not f.done():
                    f.set_exception(exc)
            return
        self._read_inflight[ctx] = waiters

    async def _handle_ready(self, loop) -> None:
        rd = self.raft.ready()
        self.stats["ready_batches"] += 1
        if rd.soft_state is not None:
            self._on_soft_state(rd.soft_state)
        hs_durable = rd.hard_state is None or (
            rd.hard_state.term == self._persisted_hs.term and rd.hard_state.vote == self._persisted_hs.vote)
        early: list[Message] = []
        late: list[Message] = rd.messages
        if (self.cfg.leader_sends_before_fsync and hs_durable and rd.snapshot is None
                and self.raft.role == Role.LEADER):
            early = [m for m in rd.messages if m.type in (MsgType.APP, MsgType.HEARTBEAT, MsgType.SNAP)]
            late = [m for m in rd.messages if m.type not in (MsgType.APP, MsgType.HEARTBEAT, MsgType.SNAP)]
            self._send(early)

        for e in rd.entries:
            self._note_appended_conf(e)
        if rd.snapshot is not None:
            data = self._pending_incoming.pop((rd.snapshot.index, rd.snapshot.term), None)
            for key in [k for k in self._pending_incoming if k[0] <= rd.snapshot.index]:
                del self._pending_incoming[key]
            if data is None:
                raise errors.StorageCorrupt("accepted a snapshot whose data was not received")
            await loop.run_in_executor(self._io, self.storage.save_snapshot, rd.snapshot, data)
            self._restore_snapshot_data(data)
            self._snapshot = (rd.snapshot, data)
            self.applied_index = rd.snapshot.index
            self._applied_since_snapshot = 0
            self.stats["snapshots_installed"] += 1
            self._refresh_peers()
            if self.on_snapshot_installed:
                self.on_snapshot_installed(rd.snapshot)
        need_save = bool(rd.entries) or (rd.hard_state is not None and not hs_durable)
        if need_save:
            await loop.run_in_executor(self._io, self.storage.save, rd.hard_state, rd.entries)
            self.stats["fsyncs"] += 1
            if rd.hard_state is not None:
                self._persisted_hs = rd.hard_state
        self._send(late)
        if rd.committed:
            self._apply(rd.committed)
        for rs in rd.read_states:
            waiters = self._read_inflight.pop(rs.ctx, None)
            if waiters:
                for f in waiters:
                    self._wait_applied(rs.index, f)
        self.raft.advance(rd)
        self._release_apply_waiters()
        self._maybe_snapshot(loop)

    def _send(self, msgs: list[Message]) -> None:
        if not msgs or self.transport is None:
            return
        for m in msgs:
            if m.type == MsgType.SNAP:
                if self._snapshot is None or m.snapshot is None or m.snapshot.index != self._snapshot[0].index:
                    self.raft.report_snapshot(m.to, False)
                    continue
                m.context = self._snapshot[1]
                self.stats["snapshots_sent"] += 1
                # The transport reports the outcome through report_snapshot().
        self.transport.send(msgs)

    def _on_soft_state(self, ss) -> None:
        log.info("event=role_change node=%s role=%s leader=%s term=%d", self.id, ss.role.value,
                 ss.leader or "-", self.raft.term)
        if ss.role != Role.LEADER:
            exc = errors.NotLeader("leadership changed during the read", leader=ss.leader)
            for waiters in self._read_inflight.values():
                for f in waiters:
                    if not f.done():
                        f.set_exception(exc)
            self._read_inflight.clear()

    # ------------------------------------------------------------ apply
    def _apply(self, entries) -> None:
        sm_apply = self.sm.apply
        for e in entries:
            result = None
            if e.type == EntryType.CONF_CHANGE:
                result = self._apply_conf_change(e.data)
            elif e.data:
                result = sm_apply(e.index, e.data)
            self.applied_index = e.index
            self._applied_since_snapshot += 1
            self.stats["applied"] += 1
            pending = self._proposals.pop(e.index, None)
            if pending is not None:
                term, fut = pending
                if not fut.done():
                    if term == e.term:
                        fut.set_result(result)
                    else:
                        fut.set_exception(errors.ProposalDropped("a new leader overwrote the request; retry"))
        # Proposals below the applied index that never showed up were overwritten.
        if self._proposals and min(self._proposals) <= self.applied_index:
            for idx in [i for i in self._proposals if i <= self.applied_index]:
                _, fut = self._proposals.pop(idx)
                if not fut.done():
                    fut.set_exception(errors.ProposalDropped("a new leader overwrote the request; retry"))

    def _note_appended_conf(self, e) -> None:
        if e.type != EntryType.CONF_CHANGE:
            return
        try:
            cc = decode_conf_change(msgpack.unpackb(e.data, raw=False))
        except Exception:  # noqa: BLE001
            return
        if cc.type in (ConfChangeType.ADD_VOTER, ConfChangeType.ADD_LEARNER):
            addr = decode_member_info(cc.context)["peer_addr"]
            if addr:
                self._pending_addrs[cc.node] = addr
                self._refresh_peers()

    def _apply_conf_change(self, data: bytes) -> dict:
        cc = decode_conf_change(msgpack.unpackb(data, raw=False))
        if cc.type in (ConfChangeType.ADD_VOTER, ConfChangeType.ADD_LEARNER):
            self.members[cc.node] = decode_member_info(cc.context)
        elif cc.type == ConfChangeType.REMOVE:
            self.members.pop(cc.node, None)
        self._pending_addrs.pop(cc.node, None)
        self._refresh_peers()
        log.info("event=conf_change type=%s node=%s", cc.type.name.lower(), cc.node)
        return {"conf": self.raft.conf.voters, "learners": self.raft.conf.learners}

    def _refresh_peers(self) -> None:
        if self.transport is not None:
            self.transport.update_peers(self.peer_addrs())

    def _wait_applied(self, index: int, fut: asyncio.Future) -> None:
        if self.applied_index >= index:
            if not fut.done():
                fut.set_result(self.applied_index)
        else:
            heapq.heappush(self._apply_waiters, (index, next(self._waiter_seq), fut))

    def _release_apply_waiters(self) -> None:
        w = self._apply_waiters
        while w and w[0][0] <= self.applied_index:
            _, _, fut = heapq.heappop(w)
            if not fut.done():
                fut.set_result(self.applied_index)

    # ------------------------------------------------------------ snapshots
    def _maybe_snapshot(self, loop) -> None:
        if self._applied_since_snapshot < self.cfg.snapshot_every:
            return
        if self._snapshot_task is not None and not self._snapshot_task.done():
            return
        self.take_snapshot(loop)

    def take_snapshot(self, loop=None):
        """Snapshot the state machine at the applied index, compact the in-memory log, and
        save the snapshot on the I/O thread (the WAL keeps everything until it is durable)."""
        loop = loop or asyncio.get_running_loop()
        if self.raft.snapshot_meta.index > self.applied_index:
            # An incoming snapshot was accepted but not applied yet: our state machine is
            # older than the log's base, so a snapshot now would be mislabelled. Skip.
            return None
        data = self._encode_snapshot()
        meta = self.raft.compact(self.applied_index)
        self._snapshot = (meta, data)
        self._applied_since_snapshot = 0
        self.stats["snapshots_taken"] += 1
        self._snapshot_task = loop.run_in_executor(self._io, self.storage.save_snapshot, meta, data)
        return self._snapshot_task

    # ------------------------------------------------------------ status
    def _fail_all(self, exc: errors.AfsError) -> None:
        for _, fut in self._proposals.values():
            if not fut.done():
                fut.set_exception(exc)
        self._proposals.clear()
        for f in self._read_pending:
            if not f.done():
                f.set_exception(exc)
        self._read_pending.clear()
        for waiters in self._read_inflight.values():
            for f in waiters:
                if not f.done():
                    f.set_exception(exc)
        self._read_inflight.clear()
        for _, _, f in self._apply_waiters:
            if not f.done():
                f.set_exception(exc)
        self._apply_waiters.clear()

    @property
    def is_leader(self) -> bool:
        return self.raft.role == Role.LEADER

    @property
    def leader(self) -> str:
        return self.raft.leader

    def status(self) -> dict:
        r = self.raft
        role = r.role.value
        if self.id in r.conf.learners:
            role = "learner"
        return {"name": self.id, "role": role, "leader": r.leader, "term": r.term,
                "commit_index": r.commit_index, "applied_index": self.applied_index,
                "last_index": r.last_index, "voters": list(r.conf.voters),
                "learners": list(r.conf.learners), "fatal": repr(self._fatal) if self._fatal else ""}
