"""A pure Raft core, modelled on etcd-io/raft.

Contract:
- No clock, sockets, files, threads or global randomness. Time advances only through
  :meth:`Raft.tick`; the only randomness is a private ``random.Random`` seeded from
  ``Config.seed`` and the node id (so equal seeds on different nodes still differ).
- Inputs: :meth:`tick`, :meth:`step`, :meth:`propose`, :meth:`propose_conf_change`,
  :meth:`read_index`, :meth:`campaign`, :meth:`transfer_leadership`,
  :meth:`report_snapshot`, :meth:`report_unreachable`, :meth:`compact`.
- Output: :meth:`ready` returns a :class:`Ready`; the driver must, in this order,
  1. persist ``snapshot`` (if any), then ``entries`` (replacing any persisted suffix from
     ``entries[0].index``), then ``hard_state`` -- all durably (fsync);
  2. send ``messages`` (they may depend on the vote/term/entries just persisted);
  3. restore ``snapshot`` into the state machine, then apply ``committed`` in order;
  4. call :meth:`advance` with the same Ready, before calling :meth:`ready` again.
  (A driver may send leader APP/HEARTBEAT/SNAP messages before its own fsync, Raft thesis
  §10.2.1: the leader counts itself towards a quorum only for entries :meth:`advance`
  confirmed durable. Everything else must wait.)
- ``committed`` only ever contains entries that are both committed and durable locally.
- :meth:`step` ignores stale or malformed messages; it raises only if it detects a violation of
  Raft's safety invariants (a committed entry would be overwritten), which is a bug elsewhere.
- Pending ReadIndex requests are dropped when the node loses leadership; drivers time them out.
- Single-threaded: callers serialize all calls.
"""
from __future__ import annotations

import enum
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

import msgpack

from afs.errors import NotLeader, Unavailable
from afs.raft.messages import (
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    EntryType,
    HardState,
    Message,
    MsgType,
    ReadState,
    SnapshotMeta,
    decode_conf_change,
    encode_conf_change,
)

__all__ = ["Role", "Config", "SoftState", "Ready", "Raft", "ProgressState", "TRANSFER_CONTEXT"]

TRANSFER_CONTEXT = b"transfer"
_LOCAL_TYPES = frozenset({MsgType.HUP, MsgType.SNAP_STATUS, MsgType.UNREACHABLE,
                          MsgType.TRANSFER_LEADER})


class Role(enum.Enum):
    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre_candidate"
    CANDIDATE = "candidate"
    LEADER = "leader"


@dataclass
class Config:
    id: str
    election_tick: int = 10          # randomized timeout in [election_tick, 2*election_tick)
    heartbeat_tick: int = 1
    pre_vote: bool = True
    check_quorum: bool = True
    max_size_per_msg: int = 1 << 20  # bytes of entry data per APP message (at least one entry)
    max_inflight_msgs: int = 256     # APP messages in flight per follower (flow control)
    max_uncommitted_bytes: int = 64 << 20  # proposals beyond this are rejected with Unavailable
    seed: int = 0                    # seeds a private random.Random for election jitter

    def validate(self) -> None:
        if not self.id:
            raise ValueError("raft config: id must be non-empty")
        if self.heartbeat_tick < 1:
            raise ValueError("raft config: heartbeat_tick must be >= 1")
        if self.election_tick <= self.heartbeat_tick:
            raise ValueError("raft config: election_tick must be > heartbeat_tick")
        if self.max_inflight_msgs < 1:
            raise ValueError("raft config: max_inflight_msgs must be >= 1")
        if self.max_size_per_msg < 0 or self.max_uncommitted_bytes < 0:
            raise ValueError("raft config: sizes must be >= 0")


@dataclass
class SoftState:
    leader: str
    role: Role


@dataclass
class Ready:
    soft_state: SoftState | None
    hard_state: HardState | None
    entries: list[Entry]
    snapshot: SnapshotMeta | None
    messages: list[Message]
    committed: list[Entry]
    read_states: list[ReadState] = field(default_factory=list)


class ProgressState(enum.IntEnum):
    PROBE = 0
    REPLICATE = 1
    SNAPSHOT = 2


class _Progress:
    """The leader's view of one follower (etcd tracker.Progress)."""

    __slots__ = ("match", "next", "state", "probe_sent", "inflights", "pending_snapshot",
                 "recent_active", "is_learner")

    def __init__(self, next_index: int, is_learner: bool) -> None:
        self.match = 0
        self.next = next_index
        self.state = ProgressState.PROBE
        self.probe_sent = False
        self.inflights: deque[int] = deque()
        self.pending_snapshot = 0
        self.recent_active = False
        self.is_learner = is_learner

    def become_probe(self) -> None:
        if self.state == ProgressState.SNAPSHOT:
            self.next = max(self.match + 1, self.pending_snapshot + 1)
            self.pending_snapshot = 0
        else:
            self.next = self.match + 1
        self.state = ProgressState.PROBE
        self.probe_sent = False
        self.inflights.clear()

    def become_replicate(self) -> None:
        self.state = ProgressState.REPLICATE
        self.next = self.match + 1
        self.probe_sent = False
        self.inflights.clear()

    def become_snapshot(self, index: int) -> None:
        self.state = ProgressState.SNAPSHOT
        self.pending_snapshot = index
        self.probe_sent = False
        self.inflights.clear()

    def maybe_update(self, n: int) -> bool:
        updated = False
        if self.match < n:
            self.match = n
            self.probe_sent = False
            updated = True
        if self.next < n + 1:
            self.next = n + 1
        return updated

    def maybe_decr_to(self, rejected: int, match_hint: int) -> bool:
        if self.state == ProgressState.REPLICATE:
            if rejected <= self.match:
                return False  # stale rejection
            self.next = self.match + 1
            return True
        if self.next - 1 != rejected:
            return False  # stale rejection
        self.next = max(min(rejected, match_hint + 1), self.match + 1)
        self.probe_sent = False
        return True

    def free_le(self, index: int) -> None:
        inf = self.inflights
        while inf and inf[0] <= index:
            inf.popleft()

    def paused(self, max_inflight: int) -> bool:
        st = self.state
        if st == ProgressState.PROBE:
            return self.probe_sent
        if st == ProgressState.REPLICATE:
            return len(self.inflights) >= max_inflight
        return True

    def as_dict(self) -> dict:
        return {"match": self.match, "next": self.next, "state": self.state.name.lower(),
                "inflight": len(self.inflights), "recent_active": self.recent_active,
                "learner": self.is_learner}


class _ReadRequest:
    __slots__ = ("index", "frm", "ctx", "acks")

    def __init__(self, index: int, frm: str, ctx: bytes, acks: set[str]) -> None:
        self.index = index
        self.frm = frm
        self.ctx = ctx
        self.acks = acks


def apply_conf_change(conf: ConfState, cc: ConfChange) -> ConfState:
    """The membership after ``cc``. Lenient: an inapplicable change leaves ``conf`` unchanged."""
    voters = list(conf.voters)
    learners = list(conf.learners)
    n = cc.node
    t = cc.type
    if t == ConfChangeType.ADD_VOTER or t == ConfChangeType.PROMOTE:
        if n in learners:
            learners.remove(n)
        if n not in voters and (t == ConfChangeType.ADD_VOTER or n in conf.learners):
            voters.append(n)
    elif t == ConfChangeType.ADD_LEARNER:
        if n not in voters and n not in learners:
            learners.append(n)
    elif t == ConfChangeType.REMOVE:
        if n in voters:
            voters.remove(n)
        if n in learners:
            learners.remove(n)
    return ConfState(tuple(voters), tuple(learners))


def validate_conf_change(conf: ConfState, cc: ConfChange) -> str | None:
    """Why ``cc`` is not a valid single-server change of ``conf``, or None if it is."""
    n = cc.node
    if not isinstance(n, str) or not n:
        return "empty node id"
    t = cc.type
    if t == ConfChangeType.ADD_VOTER:
        if n in conf.voters or n in conf.learners:
            return f"{n} is already a member"
    elif t == ConfChangeType.ADD_LEARNER:
        if n in conf.voters or n in conf.learners:
            return f"{n} is already a member"
    elif t == ConfChangeType.REMOVE:
        if n not in conf.voters and n not in conf.learners:
            return f"{n} is not a member"
        if n in conf.voters and len(conf.voters) == 1:
            return "cannot remove the last voter"
    elif t == ConfChangeType.PROMOTE:
        if n not in conf.learners:
            return f"{n} is not a learner"
    else:
        return "unknown conf change type"
    return None


def decode_conf_entry(data: bytes) -> ConfChange | None:
    try:
        return decode_conf_change(msgpack.unpackb(data))
    except Exception:  # malformed entry data: a no-op change
        return None


class Raft:
    """One Raft member's consensus state. See the module docstring for the driver contract."""

    def __init__(self, config: Config, *, hard_state: HardState = HardState(),
                 snapshot: SnapshotMeta = SnapshotMeta(), entries: Sequence[Entry] = (),
                 applied: int = 0) -> None:
        config.validate()
        self.cfg = config
        self.id = config.id
        self._rand = random.Random(f"{config.seed}:{config.id}")
        self._max_inflight = config.max_inflight_msgs
        self._max_size = config.max_size_per_msg

        # --- log: self._ents[i] has index self._offset + 1 + i; self._snap is the compaction point
        self._snap = snapshot
        self._offset = snapshot.index
        ents = [e for e in entries if e.index > snapshot.index]
        for i, e in enumerate(ents):
            if e.index != snapshot.index + 1 + i:
                raise ValueError(f"raft: non-contiguous log at index {e.index}")
        self._ents: list[Entry] = ents
        # membership: base conf at the compaction point + conf changes in the log
        self._base_conf = snapshot.conf
        self._conf_log: list[tuple[int, ConfState]] = []
        self._conf = snapshot.conf
        for e in ents:
            if e.type == EntryType.CONF_CHANGE:
                self._note_conf_entry(e)
        self._voters: tuple[str, ...] = self._conf.voters

        last = self.last_index
        self.term = hard_state.term
        self.vote = hard_state.vote
        commit = max(hard_state.commit, snapshot.index)
        if commit > last:
            raise ValueError(f"raft: hard state commit {commit} beyond last log index {last}")
        self.commit_index = commit
        self._stable = last                 # durable last index
        self._persist_next = last + 1       # first index not yet handed out in a Ready
        self.applied_index = max(applied, snapshot.index)
        self._applying = self.applied_index  # committed entries handed out up to here
        self._pending_snapshot: SnapshotMeta | None = None

        self._msgs: list[Message] = []
        self._read_states: list[ReadState] = []
        self._prev_hs = (hard_state.term, hard_state.vote, hard_state.commit)
        self._prev_ss = ("", Role.FOLLOWER)

        self.role = Role.FOLLOWER
        self.leader = ""
        self._prs: dict[str, _Progress] = {}
        self._votes: dict[str, bool] = {}
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._randomized_timeout = config.election_tick
        self._lead_transferee = ""
        self._pending_conf_index = 0
        self._uncommitted_size = 0
        self._reads: dict[bytes, _ReadRequest] = {}
        self._read_queue: deque[_ReadRequest] = deque()
        self._reads_waiting: list[tuple[str, bytes]] = []  # until an entry of this term commits
        self._need_bcast = False
        self._commit_dirty = False
        self._snap_msgs = False  # a SNAP message is queued in self._msgs
        self._become_follower(self.term, "")

    # ------------------------------------------------------------------ introspection

    @property
    def last_index(self) -> int:
        return self._offset + len(self._ents)

    @property
    def first_index(self) -> int:
        return self._offset + 1

    @property
    def stable_index(self) -> int:
        return self._stable

    @property
    def conf(self) -> ConfState:
        return self._conf

    @property
    def lead_transferee(self) -> str:
        return self._lead_transferee

    @property
    def snapshot_meta(self) -> SnapshotMeta:
        return self._snap

    def last_term(self) -> int:
        return self._ents[-1].term if self._ents else self._snap.term

    def term_at(self, index: int) -> int | None:
        """Term of the entry at ``index``; None if compacted away or beyond the last index."""
        off = self._offset
        if index == off:
            return self._snap.term
        if off < index <= off + len(self._ents):
            return self._ents[index - off - 1].term
        return None

    def log_entries(self, lo: int, hi: int) -> list[Entry]:
        off = self._offset
        lo = max(lo, off + 1)
        hi = min(hi, off + len(self._ents) + 1)
        if lo >= hi:
            return []
        return self._ents[lo - off - 1:hi - off - 1]

    def status(self) -> dict:
        out = {
            "id": self.id, "term": self.term, "vote": self.vote, "role": self.role.value,
            "leader": self.leader, "commit": self.commit_index, "applied": self.applied_index,
            "first_index": self.first_index, "last_index": self.last_index,
            "stable_index": self._stable, "snapshot_index": self._snap.index,
            "voters": list(self._conf.voters), "learners": list(self._conf.learners),
            "lead_transferee": self._lead_transferee,
        }
        if self.role == Role.LEADER:
            out["progress"] = {k: p.as_dict() for k, p in self._prs.items()}
        return out

    # ------------------------------------------------------------------ log internals

    def _note_conf_entry(self, e: Entry) -> None:
        cc = decode_conf_entry(e.data)
        conf = self._conf if cc is None else apply_conf_change(self._conf, cc)
        self._conf_log.append((e.index, conf))
        self._conf = conf

    def _conf_at(self, index: int) -> ConfState:
        conf = self._base_conf
        for i, c in self._conf_log:
            if i > index:
                break
            conf = c
        return conf

    def _append(self, ents: Sequence[Entry]) -> None:
        """Append entries that directly follow the last index; applies conf changes at once."""
        self._ents.extend(ents)
        conf_changed = False
        for e in ents:
            if e.type == EntryType.CONF_CHANGE:
                self._note_conf_entry(e)
                conf_changed = True
        if conf_changed:
            self._on_conf_changed()

    def _truncate_from(self, index: int) -> None:
        if index <= self.commit_index:
            raise RuntimeError(
                f"raft safety violation: {self.id} asked to overwrite committed index {index} "
                f"(commit {self.commit_index})")
        del self._ents[index - self._offset - 1:]
        if self._stable >= index:
            self._stable = index - 1
        if self._persist_next > index:
            self._persist_next = index
        if self._conf_log and self._conf_log[-1][0] >= index:
            while self._conf_log and self._conf_log[-1][0] >= index:
                self._conf_log.pop()
            self._conf = self._conf_log[-1][1] if self._conf_log else self._base_conf
            self._on_conf_changed()

    def _find_conflict_by_term(self, index: int, term: int) -> tuple[int, int]:
        """Largest i <= index whose term is <= ``term`` (etcd findConflictByTerm)."""
        while index > 0:
            t = self.term_at(index)
            if t is None:
                return index, 0
            if t <= term:
                return index, t
            index -= 1
        return 0, 0

    def _is_up_to_date(self, log_term: int, index: int) -> bool:
        lt = self.last_term()
        return log_term > lt or (log_term == lt and index >= self.last_index)

    def _commit_to(self, index: int) -> None:
        if index > self.commit_index:
            self.commit_index = index

    # ------------------------------------------------------------------ membership

    def _on_conf_changed(self) -> None:
        conf = self._conf
        self._voters = conf.voters
        if self.role != Role.LEADER:
            return
        members = conf.voters + conf.learners
        learners = set(conf.learners)
        for k in list(self._prs):
            if k not in members:
                del self._prs[k]
        last = self.last_index
        for k in members:
            pr = self._prs.get(k)
            if pr is None:
                pr = _Progress(last, k in learners)  # probe from the last index
                pr.recent_active = True
                if k == self.id:
                    pr.match = self._stable
                    pr.next = last + 1
                self._prs[k] = pr
            else:
                pr.is_learner = k in learners
        if self._lead_transferee and self._lead_transferee not in conf.voters:
            self._lead_transferee = ""
        # the quorum changed: maybe more is committed, maybe pending reads are satisfied
        if self._maybe_commit():
            self._on_leader_commit()
        self._need_bcast = True

    def _promotable(self) -> bool:
        return self.id in self._voters

    def _quorum(self) -> int:
        return len(self._voters) // 2 + 1

    # ------------------------------------------------------------------ role changes

    def _reset(self, term: int) -> None:
        if term != self.term:
            self.term = term
            self.vote = ""
        self.leader = ""
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        et = self.cfg.election_tick
        self._randomized_timeout = et + self._rand.randrange(et)
        self._votes = {}
        self._lead_transferee = ""
        self._reads = {}
        self._read_queue.clear()
        self._reads_waiting = []
        self._prs = {}
        self._need_bcast = False
        self._commit_dirty = False
        self._uncommitted_size = 0

    def _become_follower(self, term: int, leader: str) -> None:
        self._reset(term)
        self.role = Role.FOLLOWER
        self.leader = leader

    def _become_pre_candidate(self) -> None:
        # term and vote unchanged (thesis §9.6); only the role changes
        self._votes = {}
        self.leader = ""
        self.role = Role.PRE_CANDIDATE
        self._election_elapsed = 0
        et = self.cfg.election_tick
        self._randomized_timeout = et + self._rand.randrange(et)

    def _become_candidate(self) -> None:
        self._reset(self.term + 1)
        self.vote = self.id
        self.role = Role.CANDIDATE

    def _become_leader(self) -> None:
        self._reset(self.term)
        self.role = Role.LEADER
        self.leader = self.id
        last = self.last_index
        learners = set(self._conf.learners)
        for k in self._conf.voters + self._conf.learners:
            pr = _Progress(last + 1, k in learners)
            if k == self.id:
                pr.match = self._stable
                pr.recent_active = True
            self._prs[k] = pr
        # conservatively block conf changes until everything so far is committed
        self._pending_conf_index = last
        self._append([Entry(last + 1, self.term, EntryType.NORMAL, b"")])
        self._need_bcast = True

    def _campaign(self, kind: str) -> None:
        """``kind``: "pre" (prevote round), "election", or "transfer" (election, forced)."""
        if not self._promotable():
            return
        if kind == "pre":
            self._become_pre_candidate()
            typ = MsgType.PREVOTE
            term = self.term + 1
        else:
            self._become_candidate()
            typ = MsgType.VOTE
            term = self.term
        if self._poll(self.id, True) is True:
            # single voter: won at once
            if typ == MsgType.PREVOTE:
                self._campaign("election")
            else:
                self._become_leader()
            return
        ctx = TRANSFER_CONTEXT if kind == "transfer" else b""
        li, lt = self.last_index, self.last_term()
        for v in self._voters:
            if v != self.id:
                self._msgs.append(Message(typ, to=v, frm=self.id, term=term, log_term=lt,
                                          index=li, context=ctx))

    def _poll(self, frm: str, granted: bool) -> bool | None:
        """Record a vote; True = won, False = lost, None = undecided."""
        if frm not in self._votes:
            self._votes[frm] = granted
        yes = no = 0
        for v in self._voters:
            g = self._votes.get(v)
            if g is True:
                yes += 1
            elif g is False:
                no += 1
        q = self._quorum()
        if yes >= q:
            return True
        if len(self._voters) - no < q:
            return False
        return None

    # ------------------------------------------------------------------ inputs

    def tick(self) -> None:
        if self.role == Role.LEADER:
            self._tick_heartbeat()
        else:
            self._election_elapsed += 1
            if self._promotable() and self._election_elapsed >= self._randomized_timeout:
                self._election_elapsed = 0
                self._campaign("pre" if self.cfg.pre_vote else "election")

    def _tick_heartbeat(self) -> None:
        self._heartbeat_elapsed += 1
        self._election_elapsed += 1
        if self._election_elapsed >= self.cfg.election_tick:
            self._election_elapsed = 0
            if self.cfg.check_quorum and not self._quorum_active():
                self._become_follower(self.term, "")
                return
            if self._lead_transferee:
                self._lead_transferee = ""  # transfer timed out
        if self._heartbeat_elapsed >= self.cfg.heartbeat_tick:
            self._heartbeat_elapsed = 0
            self._bcast_heartbeat(b"")

    def _quorum_active(self) -> bool:
        active = 0
        for v in self._voters:
            pr = self._prs.get(v)
            if pr is None:
                continue
            if v == self.id or pr.recent_active:
                active += 1
        for k, pr in self._prs.items():
            if k != self.id:
                pr.recent_active = False
        return active >= self._quorum()

    def campaign(self) -> None:
        self.step(Message(MsgType.HUP, frm=self.id))

    def transfer_leadership(self, to: str) -> None:
        self.step(Message(MsgType.TRANSFER_LEADER, frm=to))

    def report_snapshot(self, to: str, success: bool) -> None:
        self.step(Message(MsgType.SNAP_STATUS, frm=to, reject=not success))

    def report_unreachable(self, to: str) -> None:
        self.step(Message(MsgType.UNREACHABLE, frm=to))

    def propose(self, data: bytes) -> int:
        if self.role != Role.LEADER:
            raise NotLeader("not the leader", leader=self.leader)
        if self._lead_transferee:
            raise Unavailable("leadership transfer in progress")
        n = len(data)
        if self._uncommitted_size and self._uncommitted_size + n > self.cfg.max_uncommitted_bytes:
            raise Unavailable("too many uncommitted bytes")
        index = self._offset + len(self._ents) + 1
        self._ents.append(Entry(index, self.term, EntryType.NORMAL, data))
        self._uncommitted_size += n
        self._need_bcast = True
        return index

    def propose_conf_change(self, cc: ConfChange) -> int:
        if self.role != Role.LEADER:
            raise NotLeader("not the leader", leader=self.leader)
        if self._lead_transferee:
            raise Unavailable("leadership transfer in progress")
        if self._pending_conf_index > self.commit_index:
            raise Unavailable("a configuration change is still pending")
        if self.term_at(self.commit_index) != self.term:
            raise Unavailable("no entry of the leader's term committed yet")
        why = validate_conf_change(self._conf, cc)
        if why is not None:
            raise Unavailable(f"invalid configuration change: {why}")
        index = self.last_index + 1
        self._append([Entry(index, self.term, EntryType.CONF_CHANGE,
                            msgpack.packb(encode_conf_change(cc)))])
        self._pending_conf_index = index
        self._need_bcast = True
        return index

    def read_index(self, ctx: bytes) -> None:
        if self.role == Role.LEADER:
            self._leader_read_index(self.id, ctx)
            return
        if not self.leader:
            raise NotLeader("no leader known", leader="")
        self._msgs.append(Message(MsgType.READ_INDEX, to=self.leader, frm=self.id,
                                  term=self.term, context=ctx))

    def compact(self, index: int) -> SnapshotMeta:
        """Drop log entries <= ``index`` (the driver saved a state-machine snapshot there).
        Raises ValueError if the log already starts after ``index`` (e.g. an incoming snapshot
        was accepted but not yet handed out): the driver's snapshot would be mislabelled."""
        if index == self._offset:
            return self._snap
        if index < self._offset:
            raise ValueError(f"raft: cannot compact to {index}: the log already starts after "
                             f"{self._offset}")
        if index > self.applied_index:
            raise ValueError(f"raft: cannot compact to {index} beyond applied {self.applied_index}")
        term = self.term_at(index)
        assert term is not None
        conf = self._conf_at(index)
        del self._ents[:index - self._offset]
        self._offset = index
        self._snap = SnapshotMeta(index, term, conf)
        self._base_conf = conf
        self._conf_log = [(i, c) for i, c in self._conf_log if i > index]
        return self._snap

    # ------------------------------------------------------------------ step

    def step(self, m: Message) -> None:
        t = m.type
        if m.term == 0:
            pass  # local message (or a term-0 peer message before any election)
        elif t in _LOCAL_TYPES:
            return  # local-only kinds never come from the network
        elif m.term > self.term:
            if t == MsgType.VOTE or t == MsgType.PREVOTE:
                force = m.context == TRANSFER_CONTEXT
                in_lease = (self.cfg.check_quorum and self.leader != ""
                            and self._election_elapsed < self.cfg.election_tick)
                if not force and in_lease:
                    return  # heard from a live leader recently: do not disrupt it
            if t == MsgType.PREVOTE:
                pass  # never changes our term
            elif t == MsgType.PREVOTE_RESP and not m.reject:
                pass  # a granted prevote carries the future term; bump only on winning
            elif t == MsgType.APP or t == MsgType.HEARTBEAT or t == MsgType.SNAP:
                self._become_follower(m.term, m.frm)
            else:
                self._become_follower(m.term, "")
        elif m.term < self.term:
            if (self.cfg.check_quorum or self.cfg.pre_vote) and (
                    t == MsgType.HEARTBEAT or t == MsgType.APP):
                # tell a stale leader about the newer term so it steps down
                self._msgs.append(Message(MsgType.APP_RESP, to=m.frm, frm=self.id, term=self.term))
            elif t == MsgType.PREVOTE:
                self._msgs.append(Message(MsgType.PREVOTE_RESP, to=m.frm, frm=self.id,
                                          term=self.term, reject=True))
            return

        if t == MsgType.HUP:
            if self.role != Role.LEADER:
                self._campaign("pre" if self.cfg.pre_vote else "election")
            return
        if t == MsgType.VOTE or t == MsgType.PREVOTE:
            self._handle_vote_request(m)
            return
        role = self.role
        if role == Role.LEADER:
            self._step_leader(m)
        elif role == Role.FOLLOWER:
            self._step_follower(m)
        else:
            self._step_candidate(m)

    def _handle_vote_request(self, m: Message) -> None:
        prevote = m.type == MsgType.PREVOTE
        can_vote = (self.vote == m.frm
                    or (self.vote == "" and self.leader == "")
                    or (prevote and m.term > self.term))
        resp = MsgType.PREVOTE_RESP if prevote else MsgType.VOTE_RESP
        if can_vote and self._is_up_to_date(m.log_term, m.index):
            # the response carries the requested term so the candidate does not drop it
            self._msgs.append(Message(resp, to=m.frm, frm=self.id, term=m.term))
            if not prevote:
                self._election_elapsed = 0
                self.vote = m.frm  # persisted (hard_state) in the same Ready as the response
        else:
            self._msgs.append(Message(resp, to=m.frm, frm=self.id, term=self.term, reject=True))

    def _step_follower(self, m: Message) -> None:
        t = m.type
        if t == MsgType.APP:
            self._election_elapsed = 0
            self.leader = m.frm
            self._handle_append(m)
        elif t == MsgType.HEARTBEAT:
            self._election_elapsed = 0
            self.leader = m.frm
            self._handle_heartbeat(m)
        elif t == MsgType.SNAP:
            self._election_elapsed = 0
            self.leader = m.frm
            self._handle_snapshot(m)
        elif t == MsgType.TIMEOUT_NOW:
            self._campaign("transfer")
        elif t == MsgType.READ_INDEX_RESP:
            self._read_states.append(ReadState(m.index, m.context))
        # anything else (TRANSFER_LEADER on a non-leader, stale responses, forwarded reads
        # while not leader) is ignored

    def _step_candidate(self, m: Message) -> None:
        t = m.type
        if t == MsgType.APP or t == MsgType.HEARTBEAT or t == MsgType.SNAP:
            # a leader exists for our term
            self._become_follower(m.term, m.frm)
            self._step_follower(m)
            return
        want = MsgType.PREVOTE_RESP if self.role == Role.PRE_CANDIDATE else MsgType.VOTE_RESP
        if t != want:
            return
        res = self._poll(m.frm, not m.reject)
        if res is True:
            if self.role == Role.PRE_CANDIDATE:
                self._campaign("election")
            else:
                self._become_leader()
        elif res is False:
            self._become_follower(self.term, "")

    # ------------------------------------------------------------------ follower handlers

    def _unconfigured(self) -> bool:
        """A node joining a running cluster: no log, no snapshot, no membership yet."""
        return self._offset == 0 and not self._ents and not self._conf.voters \
            and not self._conf.learners

    def _handle_append(self, m: Message) -> None:
        if m.index == 0 and self._unconfigured():
            # we do not know the membership at index 0: ask for the leader's base snapshot
            self._msgs.append(Message(MsgType.APP_RESP, to=m.frm, frm=self.id, term=self.term,
                                      index=0, reject=True, reject_hint=0))
            return
        if m.index < self.commit_index:
            self._msgs.append(Message(MsgType.APP_RESP, to=m.frm, frm=self.id, term=self.term,
                                      index=self.commit_index))
            return
        if self.term_at(m.index) != m.log_term:
            last = self.last_index
            hint, hint_term = self._find_conflict_by_term(min(m.index, last), m.log_term)
            self._msgs.append(Message(MsgType.APP_RESP, to=m.frm, frm=self.id, term=self.term,
                                      index=m.index, reject=True, reject_hint=hint,
                                      log_term=hint_term))
            return
        ents = m.entries
        last_new = m.index + len(ents)
        if ents:
            if ents[0].index != m.index + 1 or ents[-1].index != last_new:
                return  # malformed: entries do not directly follow (index, log_term)
            last = self.last_index
            tail = ents[-1]
            if not (tail.index <= last and self.term_at(tail.index) == tail.term):
                # find the first entry that is new or conflicts; truncate only on a term conflict
                start = ents[0].index
                conflict = min(last, tail.index) + 1
                for idx in range(start, conflict):
                    if self.term_at(idx) != ents[idx - start].term:
                        conflict = idx
                        break
                if conflict <= last:
                    self._truncate_from(conflict)
                self._append(ents[conflict - start:])
        self._commit_to(min(m.commit, last_new))
        self._msgs.append(Message(MsgType.APP_RESP, to=m.frm, frm=self.id, term=self.term,
                                  index=last_new))

    def _handle_heartbeat(self, m: Message) -> None:
        self._commit_to(min(m.commit, self.last_index))
        self._msgs.append(Message(MsgType.HEARTBEAT_RESP, to=m.frm, frm=self.id, term=self.term,
                                  context=m.context))

    def _handle_snapshot(self, m: Message) -> None:
        s = m.snapshot
        if s is None:
            return
        joining = self._unconfigured() and bool(s.conf.members())
        if s.index <= self.commit_index and not joining:
            self._msgs.append(Message(MsgType.APP_RESP, to=m.frm, frm=self.id, term=self.term,
                                      index=self.commit_index))
            return
        if self.term_at(s.index) == s.term and not joining:
            # we already have the entry: just fast-forward the commit index
            self._commit_to(s.index)
            self._msgs.append(Message(MsgType.APP_RESP, to=m.frm, frm=self.id, term=self.term,
                                      index=self.commit_index))
            return
        # restore: the whole log is replaced by the snapshot
        self._ents = []
        self._offset = s.index
        self._snap = s
        self._base_conf = s.conf
        self._conf_log = []
        self._conf = s.conf
        self._voters = s.conf.voters
        self.commit_index = s.index
        self._stable = s.index
        self._persist_next = s.index + 1
        self._applying = s.index
        self._pending_snapshot = s
        self._msgs.append(Message(MsgType.APP_RESP, to=m.frm, frm=self.id, term=self.term,
                                  index=s.index))

    # ------------------------------------------------------------------ leader

    def _step_leader(self, m: Message) -> None:
        t = m.type
        if t == MsgType.READ_INDEX:
            self._leader_read_index(m.frm, m.context)
            return
        if t == MsgType.TRANSFER_LEADER:
            self._start_transfer(m.frm)
            return
        pr = self._prs.get(m.frm)
        if pr is None or m.frm == self.id:
            return
        if t == MsgType.APP_RESP:
            pr.recent_active = True
            if m.reject:
                if m.index == 0:
                    # only an unconfigured joiner rejects prev index 0: send the base snapshot
                    if pr.state != ProgressState.SNAPSHOT:
                        self._send_snapshot(m.frm, pr)
                    return
                next_probe = m.reject_hint
                if m.log_term > 0:
                    next_probe, _ = self._find_conflict_by_term(m.reject_hint, m.log_term)
                if pr.maybe_decr_to(m.index, next_probe):
                    if pr.state == ProgressState.REPLICATE:
                        pr.become_probe()
                    self._send_append(m.frm, pr, True)
                return
            updated = pr.maybe_update(m.index)
            if pr.state == ProgressState.SNAPSHOT and pr.match >= pr.pending_snapshot \
                    and pr.match + 1 >= self.first_index:
                # the follower installed the snapshot (or caught up otherwise)
                pr.become_probe()
                pr.become_replicate()
                updated = True
            if updated:
                if pr.state == ProgressState.PROBE:
                    pr.become_replicate()
                elif pr.state == ProgressState.REPLICATE:
                    pr.free_le(m.index)
                if self._maybe_commit():
                    self._on_leader_commit()
                if self.role != Role.LEADER:
                    return
                # keep the pipeline full
                while self._send_append(m.frm, pr, False):
                    pass
                if m.frm == self._lead_transferee and pr.match == self.last_index:
                    self._send_timeout_now(m.frm)
        elif t == MsgType.HEARTBEAT_RESP:
            pr.recent_active = True
            pr.probe_sent = False
            if pr.state == ProgressState.REPLICATE and len(pr.inflights) >= self._max_inflight:
                pr.inflights.popleft()
            if pr.match < self.last_index:
                self._send_append(m.frm, pr, True)
            if m.context:
                self._read_ack(m.frm, m.context)
        elif t == MsgType.SNAP_STATUS:
            if pr.state != ProgressState.SNAPSHOT:
                return
            if m.reject:
                pr.pending_snapshot = 0
                pr.become_probe()
                pr.probe_sent = True  # wait for a heartbeat response before retrying
            else:
                pr.become_probe()
                self._send_append(m.frm, pr, True)
        elif t == MsgType.UNREACHABLE:
            if pr.state == ProgressState.REPLICATE:
                pr.become_probe()

    def _start_transfer(self, to: str) -> None:
        pr = self._prs.get(to)
        if pr is None or pr.is_learner or to == self.id:
            return
        if self._lead_transferee == to:
            return
        self._lead_transferee = to
        self._election_elapsed = 0  # the transfer aborts after one election timeout
        if pr.match == self.last_index:
            self._send_timeout_now(to)
        else:
            self._send_append(to, pr, True)

    def _send_timeout_now(self, to: str) -> None:
        self._msgs.append(Message(MsgType.TIMEOUT_NOW, to=to, frm=self.id, term=self.term))

    def _send_append(self, to: str, pr: _Progress, send_if_empty: bool) -> bool:
        """Send one APP (or SNAP) to ``to`` if flow control allows; True if something was sent."""
        if pr.paused(self._max_inflight):
            return False
        prev = pr.next - 1
        off = self._offset
        if prev > off + len(self._ents):  # defensive: never probe beyond our log
            prev = off + len(self._ents)
            pr.next = prev + 1
        if prev < off:
            return self._send_snapshot(to, pr)
        prev_term = self._snap.term if prev == off else self._ents[prev - off - 1].term
        lo = prev - off  # position of entry pr.next in self._ents
        n = len(self._ents)
        if lo >= n:
            if not send_if_empty:
                return False
            ents: list[Entry] = []
        else:
            limit = self._max_size
            size = 0
            hi = lo
            src = self._ents
            while hi < n:
                size += len(src[hi].data)
                if size > limit and hi > lo:
                    break
                hi += 1
            ents = src[lo:hi]
        self._msgs.append(Message(MsgType.APP, to=to, frm=self.id, term=self.term,
                                  log_term=prev_term, index=prev, entries=ents,
                                  commit=self.commit_index))
        if ents:
            if pr.state == ProgressState.REPLICATE:
                last = ents[-1].index
                pr.next = last + 1
                pr.inflights.append(last)
            else:
                pr.probe_sent = True
        elif pr.state == ProgressState.PROBE:
            pr.probe_sent = True
        return True

    def _send_snapshot(self, to: str, pr: _Progress) -> bool:
        if not pr.recent_active:
            return False
        s = self._snap
        self._msgs.append(Message(MsgType.SNAP, to=to, frm=self.id, term=self.term,
                                  snapshot=s, context=b""))
        self._snap_msgs = True
        pr.become_snapshot(s.index)
        return True

    def _refresh_snap_msgs(self, msgs: list[Message]) -> None:
        """A compact() after a SNAP was queued replaced the snapshot the driver holds: point
        queued SNAP messages at the current one (the driver only keeps the latest)."""
        self._snap_msgs = False
        s = self._snap
        for m in msgs:
            if m.type == MsgType.SNAP and m.snapshot is not None and m.snapshot.index < s.index:
                m.snapshot = s
                pr = self._prs.get(m.to)
                if pr is not None and pr.state == ProgressState.SNAPSHOT:
                    pr.pending_snapshot = s.index

    def _bcast_append(self, send_if_empty: bool) -> None:
        for k, pr in self._prs.items():
            if k != self.id:
                if self._send_append(k, pr, send_if_empty):
                    # replicate state: keep pipelining until flow control or the log stops us
                    while pr.state == ProgressState.REPLICATE and self._send_append(k, pr, False):
                        pass

    def _bcast_heartbeat(self, ctx: bytes) -> None:
        commit = self.commit_index
        for k, pr in self._prs.items():
            if k != self.id:
                self._msgs.append(Message(MsgType.HEARTBEAT, to=k, frm=self.id, term=self.term,
                                          commit=min(pr.match, commit), context=ctx))

    def _maybe_commit(self) -> bool:
        voters = self._voters
        if not voters:
            return False
        prs = self._prs
        matches = sorted((prs[v].match if v in prs else 0) for v in voters)
        mci = matches[len(voters) - self._quorum()]
        # §5.4.2: only entries of the current term are committed by counting replicas
        if mci > self.commit_index and self.term_at(mci) == self.term:
            old = self.commit_index
            self.commit_index = mci
            self._release_uncommitted(old, mci)
            return True
        return False

    def _release_uncommitted(self, old: int, new: int) -> None:
        if self._uncommitted_size <= 0:
            return
        off = self._offset
        size = 0
        for e in self._ents[max(old - off, 0):new - off]:
            size += len(e.data)
        self._uncommitted_size = max(0, self._uncommitted_size - size)

    def _on_leader_commit(self) -> None:
        """The leader's commit index advanced."""
        self._commit_dirty = True
        if self._reads_waiting and self.term_at(self.commit_index) == self.term:
            waiting, self._reads_waiting = self._reads_waiting, []
            for frm, ctx in waiting:
                self._leader_read_index(frm, ctx)
        # a leader removed from the configuration steps down once the removal commits
        if self.id not in self._voters and self._conf_log and \
                self._conf_log[-1][0] <= self.commit_index:
            self._flush()
            self._become_follower(self.term, "")

    # ------------------------------------------------------------------ read index

    def _leader_read_index(self, frm: str, ctx: bytes) -> None:
        if self.term_at(self.commit_index) != self.term:
            self._reads_waiting.append((frm, ctx))  # served once an entry of this term commits
            return
        if self._voters == (self.id,):
            self._release_read(frm, self.commit_index, ctx)
            return
        if ctx in self._reads:
            return  # duplicate request in flight
        acks = {self.id} if self.id in self._voters else set()
        req = _ReadRequest(self.commit_index, frm, ctx, acks)
        self._reads[ctx] = req
        self._read_queue.append(req)
        self._bcast_heartbeat(ctx)

    def _read_ack(self, frm: str, ctx: bytes) -> None:
        req = self._reads.get(ctx)
        if req is None:
            return
        req.acks.add(frm)
        q = self._quorum()
        if sum(1 for v in self._voters if v in req.acks) < q:
            return
        # release this request and every one queued before it
        while self._read_queue:
            r = self._read_queue.popleft()
            self._reads.pop(r.ctx, None)
            self._release_read(r.frm, r.index, r.ctx)
            if r is req:
                break

    def _release_read(self, frm: str, index: int, ctx: bytes) -> None:
        if frm == self.id or frm == "":
            self._read_states.append(ReadState(index, ctx))
        else:
            self._msgs.append(Message(MsgType.READ_INDEX_RESP, to=frm, frm=self.id,
                                      term=self.term, index=index, context=ctx))

    # ------------------------------------------------------------------ output

    def _flush(self) -> None:
        """Send the batched appends (proposals since the last flush, commit updates)."""
        if self.role == Role.LEADER and (self._need_bcast or self._commit_dirty):
            empty = self._commit_dirty
            self._need_bcast = False
            self._commit_dirty = False
            self._bcast_append(empty)

    def has_ready(self) -> bool:
        self._flush()
        if self._msgs or self._read_states or self._pending_snapshot is not None:
            return True
        if self._persist_next <= self.last_index:
            return True
        if (self.term, self.vote, self.commit_index) != self._prev_hs:
            return True
        if (self.leader, self.role) != self._prev_ss:
            return True
        return min(self.commit_index, self._stable) > self._applying

    def ready(self) -> Ready:
        self._flush()
        ss = None
        if (self.leader, self.role) != self._prev_ss:
            self._prev_ss = (self.leader, self.role)
            ss = SoftState(self.leader, self.role)
        hs = None
        cur = (self.term, self.vote, self.commit_index)
        if cur != self._prev_hs:
            self._prev_hs = cur
            hs = HardState(*cur)
        off = self._offset
        last = off + len(self._ents)
        if self._persist_next <= last:
            entries = self._ents[self._persist_next - off - 1:]
            self._persist_next = last + 1
        else:
            entries = []
        snap = self._pending_snapshot
        self._pending_snapshot = None
        hi = min(self.commit_index, self._stable)
        if hi > self._applying:
            committed = self._ents[self._applying - off:hi - off]
            self._applying = hi
        else:
            committed = []
        msgs, self._msgs = self._msgs, []
        if self._snap_msgs:
            self._refresh_snap_msgs(msgs)
        reads, self._read_states = self._read_states, []
        return Ready(ss, hs, entries, snap, msgs, committed, reads)

    def advance(self, rd: Ready) -> None:
        if rd.snapshot is not None and rd.snapshot.index > self.applied_index:
            self.applied_index = rd.snapshot.index
        if rd.committed:
            last_applied = rd.committed[-1].index
            if last_applied > self.applied_index:
                self.applied_index = last_applied
        if rd.entries:
            tail = rd.entries[-1]
            if self.term_at(tail.index) == tail.term and tail.index > self._stable:
                self._stable = tail.index
            if self.role == Role.LEADER:
                pr = self._prs.get(self.id)
                if pr is not None and pr.maybe_update(self._stable):
                    if self._maybe_commit():
                        self._on_leader_commit()
