"""Raft core rules, one test per rule (Raft paper / thesis sections in the docstrings).

Several :class:`Raft` instances are driven by hand through a tiny in-test router: a node's
Ready is "persisted" into an in-memory store, then its messages are queued for delivery.
"""
from __future__ import annotations

import random

import msgpack
import pytest

from afs.errors import NotLeader, Unavailable
from afs.raft.core import Config, Raft, Ready, Role
from afs.raft.messages import (
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    EntryType,
    HardState,
    Message,
    MsgType,
    SnapshotMeta,
    decode_conf_change,
)


class Store:
    def __init__(self, snap: SnapshotMeta) -> None:
        self.snap = snap
        self.entries: list[Entry] = []
        self.hs = HardState()
        self.applied: list[Entry] = []
        self.sm_index = snap.index

    def persist(self, rd: Ready) -> None:
        if rd.snapshot is not None:
            self.snap = rd.snapshot
            self.entries = [e for e in self.entries if e.index > rd.snapshot.index]
            self.sm_index = rd.snapshot.index
            self.applied = []  # the state machine is restored from the snapshot
        if rd.entries:
            first = rd.entries[0].index
            if self.entries and self.entries[-1].index >= first:
                self.entries = [e for e in self.entries if e.index < first]
            self.entries.extend(rd.entries)
        if rd.hard_state is not None:
            self.hs = rd.hard_state


class Net:
    """Nodes + stores + a FIFO message queue with optional drops/partitions."""

    def __init__(self, voters, learners=(), **cfg) -> None:
        self.cfg = {"election_tick": 10, "heartbeat_tick": 1, **cfg}
        conf = ConfState(tuple(voters), tuple(learners))
        self.nodes: dict[str, Raft] = {}
        self.stores: dict[str, Store] = {}
        for i in (*voters, *learners):
            self.add_node(i, SnapshotMeta(0, 0, conf))
        self.queue: list[Message] = []
        self.cut: set[frozenset] = set()
        self.down: set[str] = set()
        self.drop = lambda m: False
        self.read_states: dict[str, list] = {i: [] for i in self.nodes}
        self.sent: list[Message] = []
        self.report_snapshots = False  # act like a driver: every SNAP ends in report_snapshot

    def add_node(self, i: str, snap: SnapshotMeta, **extra) -> Raft:
        self.stores[i] = Store(snap)
        n = Raft(Config(i, **{**self.cfg, **extra}), snapshot=snap)
        self.nodes[i] = n
        if hasattr(self, "read_states"):
            self.read_states[i] = []
        return n

    def restart(self, i: str) -> Raft:
        """Crash and restart: the in-memory state machine is rebuilt from the snapshot."""
        st = self.stores[i]
        st.applied, st.sm_index = [], st.snap.index
        n = Raft(Config(i, **self.cfg), hard_state=st.hs, snapshot=st.snap,
                 entries=st.entries, applied=st.sm_index)
        self.nodes[i] = n
        return n

    def isolate(self, i: str) -> None:
        for j in self.nodes:
            if j != i:
                self.cut.add(frozenset((i, j)))

    def heal(self) -> None:
        self.cut.clear()

    def process(self, i: str) -> Ready:
        n = self.nodes[i]
        rd = n.ready()
        st = self.stores[i]
        st.persist(rd)
        for m in rd.messages:
            assert m.frm == i
            self.queue.append(m)
            self.sent.append(m)
        for e in rd.committed:
            assert e.index == st.sm_index + 1, (i, e.index, st.sm_index)
            st.applied.append(e)
            st.sm_index = e.index
        self.read_states[i].extend(rd.read_states)
        n.advance(rd)
        return rd

    def deliver(self, m: Message) -> bool:
        if m.to not in self.nodes or m.to in self.down or m.frm in self.down:
            return False
        if frozenset((m.frm, m.to)) in self.cut or self.drop(m):
            return False
        self.nodes[m.to].step(m)
        return True

    def deliver_reporting(self, m: Message) -> None:
        """Deliver like a driver would: a SNAP transfer always ends in report_snapshot."""
        ok = self.deliver(m)
        if m.type == MsgType.SNAP and m.frm not in self.down:
            self.nodes[m.frm].report_snapshot(m.to, ok)

    def stabilize(self, limit: int = 10000) -> None:
        for _ in range(limit):
            busy = False
            for i, n in self.nodes.items():
                if i not in self.down and n.has_ready():
                    self.process(i)
                    busy = True
            if self.queue:
                q, self.queue = self.queue, []
                for m in q:
                    if self.report_snapshots:
                        self.deliver_reporting(m)
                    else:
                        self.deliver(m)
                busy = True
            if not busy:
                return
        raise AssertionError("did not stabilize")

    def tick(self, i: str, k: int = 1) -> None:
        for _ in range(k):
            self.nodes[i].tick()

    def tick_all(self, k: int = 1) -> None:
        for _ in range(k):
            for i, n in self.nodes.items():
                if i not in self.down:
                    n.tick()
            self.stabilize()

    def elect(self, i: str) -> Raft:
        self.nodes[i].campaign()
        self.stabilize()
        assert self.nodes[i].role == Role.LEADER
        return self.nodes[i]

    def leader(self) -> Raft | None:
        ls = [n for i, n in self.nodes.items() if n.role == Role.LEADER and i not in self.down]
        return max(ls, key=lambda n: n.term) if ls else None

    def data(self, i: str) -> list[bytes]:
        return [e.data for e in self.stores[i].applied if e.type == EntryType.NORMAL and e.data]


def bootstrap(i: str, voters=("a",), **cfg) -> Raft:
    return Raft(Config(i, **cfg), snapshot=SnapshotMeta(0, 0, ConfState(tuple(voters))))


def drain(n: Raft) -> Ready:
    rd = n.ready()
    n.advance(rd)
    return rd


def msgs_of(rd: Ready, typ: MsgType) -> list[Message]:
    return [m for m in rd.messages if m.type == typ]


def follower_with_log(terms: list[int], term: int, voters=("a", "b", "c"), i="b") -> Raft:
    """A follower restarted with a durable log whose entry k+1 has term terms[k]."""
    ents = [Entry(k + 1, t) for k, t in enumerate(terms)]
    n = Raft(Config(i), hard_state=HardState(term, "", 0),
             snapshot=SnapshotMeta(0, 0, ConfState(voters)), entries=ents)
    return n


# ============================================================ elections (§5.2, §5.4.1)

def test_election_randomized_timeout():
    """Election timeouts are drawn from [election_tick, 2*election_tick) and differ per node."""
    seen = set()
    for i in range(20):
        n = bootstrap(f"n{i}", voters=tuple(f"n{j}" for j in range(20)), pre_vote=False)
        ticks = 0
        while n.role == Role.FOLLOWER:
            n.tick()
            ticks += 1
        assert 10 <= ticks < 20
        seen.add(ticks)
    assert len(seen) > 1


def test_election_one_vote_per_term():
    """A node grants at most one vote per term, and re-grants to the same candidate."""
    n = bootstrap("a", voters=("a", "b", "c"))
    n.step(Message(MsgType.VOTE, to="a", frm="b", term=1))
    n.step(Message(MsgType.VOTE, to="a", frm="c", term=1))
    n.step(Message(MsgType.VOTE, to="a", frm="b", term=1))
    resp = msgs_of(n.ready(), MsgType.VOTE_RESP)
    assert [(m.to, m.reject) for m in resp] == [("b", False), ("c", True), ("b", False)]
    assert n.vote == "b"


def test_election_vote_persisted_before_response():
    """The vote appears in Ready.hard_state of the same Ready that carries the VOTE_RESP."""
    n = bootstrap("a", voters=("a", "b", "c"))
    drain(n)
    n.step(Message(MsgType.VOTE, to="a", frm="b", term=3))
    rd = n.ready()
    assert msgs_of(rd, MsgType.VOTE_RESP) and not rd.messages[0].reject
    assert rd.hard_state == HardState(3, "b", 0)


def test_election_up_to_date_check():
    """§5.4.1: a vote is denied to a candidate whose log is less up to date."""
    n = follower_with_log([1, 2], term=2, i="a")
    n.step(Message(MsgType.VOTE, frm="b", term=3, log_term=1, index=5))   # older last term
    n.step(Message(MsgType.VOTE, frm="c", term=4, log_term=2, index=1))   # same term, shorter
    resp = msgs_of(n.ready(), MsgType.VOTE_RESP)
    assert [m.reject for m in resp] == [True, True]
    n.step(Message(MsgType.VOTE, frm="c", term=5, log_term=2, index=2))
    assert not msgs_of(n.ready(), MsgType.VOTE_RESP)[0].reject


def test_election_higher_term_steps_down():
    """A leader or candidate that sees a higher term becomes a follower of that term."""
    net = Net(["a", "b", "c"])
    a = net.elect("a")
    a.step(Message(MsgType.APP_RESP, to="a", frm="b", term=a.term + 5))
    assert a.role == Role.FOLLOWER and a.term == net.nodes["b"].term + 5


def test_election_candidate_wins_with_majority():
    """A candidate that collects a majority becomes leader; followers learn it."""
    net = Net(["a", "b", "c"], pre_vote=False)
    net.elect("b")
    assert net.nodes["a"].leader == "b" and net.nodes["c"].leader == "b"
    assert len({n.term for n in net.nodes.values()}) == 1


def test_election_single_voter_becomes_leader_and_commits():
    """A single-voter cluster elects itself at once and commits its own durable entries."""
    n = bootstrap("a")
    n.campaign()
    assert n.role == Role.LEADER
    idx = n.propose(b"x")
    rd = drain(n)
    assert [e.index for e in rd.entries] == [1, 2] and idx == 2
    rd = drain(n)
    assert [e.data for e in rd.committed] == [b"", b"x"]


# ============================================================ prevote (§9.6) & check quorum

def test_prevote_does_not_bump_term():
    """A pre-candidate asks with term+1 but keeps its own term and vote."""
    n = bootstrap("a", voters=("a", "b", "c"))
    n.campaign()
    assert n.role == Role.PRE_CANDIDATE and n.term == 0 and n.vote == ""
    rd = n.ready()
    pv = msgs_of(rd, MsgType.PREVOTE)
    assert {m.to for m in pv} == {"b", "c"} and all(m.term == 1 for m in pv)
    assert rd.hard_state is None


def test_prevote_voters_do_not_change_state():
    """Granting a PREVOTE changes neither the voter's term nor its vote."""
    n = bootstrap("b", voters=("a", "b", "c"))
    n.step(Message(MsgType.PREVOTE, frm="a", term=1))
    rd = n.ready()
    assert n.term == 0 and n.vote == "" and rd.hard_state is None
    (resp,) = msgs_of(rd, MsgType.PREVOTE_RESP)
    assert not resp.reject and resp.term == 1


def test_prevote_lagging_node_cannot_disrupt():
    """A partitioned node rejoining with a lagging log neither bumps terms nor unseats the leader."""
    net = Net(["a", "b", "c"])
    a = net.elect("a")
    net.isolate("c")
    for k in range(5):
        a.propose(b"%d" % k)
    net.stabilize()
    c = net.nodes["c"]
    for _ in range(100):
        c.tick()
        net.stabilize()
    assert c.term == a.term  # prevote never succeeded, so no term inflation
    net.heal()
    c.campaign()
    net.stabilize()
    assert a.role == Role.LEADER and a.term == c.term
    net.tick_all(3)
    assert net.data("c") == [b"%d" % k for k in range(5)]


def test_prevote_without_it_a_rejoining_node_disrupts():
    """Negative control: without prevote/check-quorum an isolated node inflates its term."""
    net = Net(["a", "b", "c"], pre_vote=False, check_quorum=False)
    a = net.elect("a")
    net.isolate("c")
    for _ in range(40):
        net.nodes["c"].tick()
        net.stabilize()
    assert net.nodes["c"].term > a.term


def test_check_quorum_leader_steps_down():
    """A leader that has not heard from a quorum within an election timeout steps down."""
    net = Net(["a", "b", "c"])
    a = net.elect("a")
    net.isolate("a")
    for _ in range(2 * a.cfg.election_tick):
        a.tick()
        net.stabilize()
        if a.role != Role.LEADER:
            break
    assert a.role == Role.FOLLOWER


def test_check_quorum_leader_with_quorum_stays():
    """A leader that hears from a quorum keeps leading across many election timeouts."""
    net = Net(["a", "b", "c"])
    a = net.elect("a")
    net.down.add("c")
    net.tick_all(50)
    assert a.role == Role.LEADER


def test_check_quorum_follower_in_lease_ignores_votes():
    """A follower that heard from the leader within the election timeout ignores (pre)votes."""
    net = Net(["a", "b", "c"])
    a = net.elect("a")
    b = net.nodes["b"]
    term = b.term
    b.step(Message(MsgType.VOTE, to="b", frm="c", term=term + 1, log_term=a.term, index=100))
    b.step(Message(MsgType.PREVOTE, to="b", frm="c", term=term + 1, log_term=a.term, index=100))
    assert b.term == term and b.leader == "a"
    assert not msgs_of(b.ready(), MsgType.VOTE_RESP)


def test_check_quorum_transfer_vote_bypasses_lease():
    """A VOTE with context b"transfer" is considered even by a follower in lease."""
    net = Net(["a", "b", "c"])
    a = net.elect("a")
    b = net.nodes["b"]
    b.step(Message(MsgType.VOTE, to="b", frm="c", term=a.term + 1, log_term=a.term,
                   index=100, context=b"transfer"))
    (resp,) = msgs_of(b.ready(), MsgType.VOTE_RESP)
    assert not resp.reject and b.vote == "c"


# ============================================================ log replication (§5.3)

def test_replication_reject_with_hint_fast_backoff():
    """A follower rejects a mismatched APP with a hint that lets the leader skip a whole term."""
    f = follower_with_log([1, 1, 3, 3, 3, 3, 3], term=3)
    f.step(Message(MsgType.APP, frm="a", term=4, index=7, log_term=4, commit=0))
    (r,) = msgs_of(f.ready(), MsgType.APP_RESP)
    assert r.reject and r.index == 7
    assert (r.reject_hint, r.log_term) == (7, 3)
    f2 = follower_with_log([1, 1, 3, 3, 3, 3, 3], term=3)
    f2.step(Message(MsgType.APP, frm="a", term=4, index=7, log_term=2, commit=0))
    (r,) = msgs_of(f2.ready(), MsgType.APP_RESP)
    assert (r.reject_hint, r.log_term) == (2, 1)  # skipped all term-3 entries at once
    f3 = follower_with_log([1], term=3)
    f3.step(Message(MsgType.APP, frm="a", term=4, index=9, log_term=4, commit=0))
    (r,) = msgs_of(f3.ready(), MsgType.APP_RESP)
    assert (r.reject_hint, r.log_term) == (1, 1)  # its last index


def test_replication_leader_backs_off_to_match():
    """A leader uses rejection hints to find the match point and repairs a divergent follower."""
    net = Net(["a", "b", "c"])
    a = net.elect("a")
    net.isolate("c")
    for k in range(30):
        a.propose(b"%d" % k)
    net.stabilize()
    net.heal()
    before = len(net.sent)
    net.tick_all(2)
    rejects = [m for m in net.sent[before:] if m.type == MsgType.APP_RESP and m.reject]
    assert len(rejects) <= 1
    assert net.data("c") == net.data("a") == [b"%d" % k for k in range(30)]


def test_replication_no_truncation_on_duplicated_or_reordered_app():
    """An APP whose entries are already present with matching terms never truncates the log."""
    f = follower_with_log([], term=1)
    e = [Entry(i, 1, EntryType.NORMAL, b"%d" % i) for i in range(1, 6)]
    f.step(Message(MsgType.APP, frm="a", term=1, index=0, log_term=0, entries=e[:2]))
    f.step(Message(MsgType.APP, frm="a", term=1, index=0, log_term=0, entries=e[:5]))
    # a stale, reordered copy of the first message arrives last
    f.step(Message(MsgType.APP, frm="a", term=1, index=0, log_term=0, entries=e[:2]))
    f.step(Message(MsgType.APP, frm="a", term=1, index=1, log_term=1, entries=e[1:3]))
    assert f.last_index == 5 and f.log_entries(1, 6) == e
    resp = msgs_of(f.ready(), MsgType.APP_RESP)
    assert [m.index for m in resp] == [2, 5, 2, 3] and not any(m.reject for m in resp)


def test_replication_conflict_truncation():
    """An APP with a conflicting term truncates the follower's log from the conflict on."""
    f = follower_with_log([1, 1, 2, 2], term=2)
    drain(f)
    new = [Entry(3, 3, EntryType.NORMAL, b"x"), Entry(4, 3, EntryType.NORMAL, b"y"),
           Entry(5, 3, EntryType.NORMAL, b"z")]
    f.step(Message(MsgType.APP, frm="a", term=3, index=2, log_term=1, entries=new, commit=2))
    assert [e.term for e in f.log_entries(1, 10)] == [1, 1, 3, 3, 3]
    assert f.stable_index == 2
    rd = f.ready()
    assert rd.entries == new  # the persisted suffix from index 3 must be replaced
    assert [e.index for e in rd.committed] == [1, 2]


def test_replication_probe_then_replicate_pipelining():
    """Probe sends one APP and waits; replicate pipelines up to max_inflight_msgs APPs."""
    net = Net(["a", "b"], max_inflight_msgs=3, max_size_per_msg=0)
    a = net.elect("a")
    assert a.status()["progress"]["b"]["state"] == "replicate"
    net.down.add("b")
    for k in range(10):
        a.propose(b"%d" % k)
    rd = net.process("a")
    apps = msgs_of(rd, MsgType.APP)
    assert len(apps) == 3 and all(len(m.entries) == 1 for m in apps)  # bounded by inflight
    assert [m.index for m in apps] == [1, 2, 3]  # optimistic, no waiting for acks
    net.down.discard("b")
    net.queue.clear()
    net.tick_all(3)
    assert net.data("b") == [b"%d" % k for k in range(10)]
    # a rejection moves the follower back to probe: exactly one APP outstanding
    a.step(Message(MsgType.UNREACHABLE, frm="b"))
    assert a.status()["progress"]["b"]["state"] == "probe"


def test_replication_batching():
    """One APP carries many entries, bounded by max_size_per_msg (but at least one entry)."""
    net = Net(["a", "b"], max_size_per_msg=250)
    a = net.elect("a")
    for k in range(10):
        a.propose(b"x" * 100)
    a.propose(b"y" * 1000)
    rd = net.process("a")
    apps = msgs_of(rd, MsgType.APP)
    assert [len(m.entries) for m in apps] == [2, 2, 2, 2, 2, 1]
    net.stabilize()
    assert len(net.data("b")) == 11


def test_replication_group_commit_single_ready():
    """All proposals between two ready() calls land in one Ready.entries (one fsync)."""
    net = Net(["a", "b", "c"])
    a = net.elect("a")
    idx = [a.propose(b"%d" % k) for k in range(50)]
    rd = net.process("a")
    assert [e.index for e in rd.entries] == idx
    assert len(msgs_of(rd, MsgType.APP)) == 2  # one batched APP per follower


# ============================================================ commit (§5.4.2)

def test_commit_only_current_term_entries_by_counting():
    """§5.4.2 (figure 8): a leader does not commit an old-term entry by counting replicas."""
    c2 = Raft(Config("c", pre_vote=False), hard_state=HardState(2, "", 0),
              snapshot=SnapshotMeta(0, 0, ConfState(("c", "d", "e"))),
              entries=[Entry(1, 1), Entry(2, 2, EntryType.NORMAL, b"old")])
    c2.campaign()
    c2.step(Message(MsgType.VOTE_RESP, frm="d", term=3))
    assert c2.role == Role.LEADER
    drain(c2)  # persists the empty entry at index 3
    c2.step(Message(MsgType.APP_RESP, frm="d", term=3, index=2))
    assert c2.commit_index == 0  # index 2 (term 2) is replicated on a majority but not committed
    c2.step(Message(MsgType.APP_RESP, frm="d", term=3, index=3))
    assert c2.commit_index == 3


def test_commit_leader_counts_itself_only_when_persisted():
    """The leader's own match index advances in advance(), not when appending."""
    net = Net(["a", "b", "c"])
    a = net.elect("a")
    base = a.commit_index
    idx = a.propose(b"x")
    rd = a.ready()  # not yet advanced: not durable on the leader
    for m in msgs_of(rd, MsgType.APP):
        if m.to == "b":
            net.nodes["b"].step(m)
    rd_b = net.process("b")
    (ack,) = msgs_of(rd_b, MsgType.APP_RESP)
    # b's ack alone is not a majority: a's own entry is not persisted yet
    ack.to = "a"
    a.step(ack)
    assert a.commit_index == base
    a.advance(rd)
    assert a.commit_index == idx


def test_commit_follower_applies_only_durable_entries():
    """A follower hands out committed entries only up to its durable index."""
    f = follower_with_log([], term=1)
    e = [Entry(i, 1, EntryType.NORMAL, b"%d" % i) for i in range(1, 4)]
    f.step(Message(MsgType.APP, frm="a", term=1, index=0, log_term=0, entries=e, commit=3))
    rd = f.ready()
    assert f.commit_index == 3 and rd.committed == [] and rd.entries == e
    assert rd.hard_state.commit == 3
    f.advance(rd)
    assert f.ready().committed == e


def test_commit_new_leader_appends_empty_entry():
    """On election a leader appends an empty NORMAL entry of its term."""
    net = Net(["a", "b", "c"])
    a = net.elect("a")
    (e,) = a.log_entries(1, 2)
    assert (e.term, e.type, e.data) == (a.term, EntryType.NORMAL, b"")
    assert all(n.commit_index == 1 for n in net.nodes.values())


def test_commit_heartbeat_carries_min_of_match_and_commit():
    """Heartbeats carry commit = min(follower match, leader commit)."""
    net = Net(["a", "b", "c"])
    a = net.elect("a")
    net.down.add("c")
    for k in range(3):
        a.propose(b"%d" % k)
    net.stabilize()
    a.tick()
    hb = {m.to: m.commit for m in msgs_of(a.ready(), MsgType.HEARTBEAT)}
    assert hb == {"b": 4, "c": 1}  # c acked only the leader's empty entry


# ============================================================ snapshots

def _leader_with_compacted_log(net: Net, n_entries: int = 10) -> Raft:
    a = net.elect("a")
    net.down.add("c")
    for k in range(n_entries):
        a.propose(b"%d" % k)
    net.stabilize()
    meta = a.compact(a.applied_index)
    assert meta.index == a.applied_index and meta.conf == a.conf
    assert a.log_entries(1, meta.index + 1) == []
    return a


def test_snapshot_sent_when_follower_needs_compacted_entries():
    """A follower that needs compacted entries gets a SNAP; report_snapshot resumes probing."""
    net = Net(["a", "b", "c"])
    a = _leader_with_compacted_log(net)
    net.down.discard("c")
    a.tick()
    snaps = []
    net.drop = lambda m: m.type == MsgType.SNAP and not snaps.append(m)
    net.stabilize()
    (s,) = snaps
    assert s.to == "c" and s.snapshot == a.snapshot_meta and s.context == b""
    assert a.status()["progress"]["c"]["state"] == "snapshot"
    a.report_snapshot("c", False)   # transfer failed: probe again after a heartbeat
    assert a.status()["progress"]["c"]["state"] == "probe"
    net.drop = lambda m: False
    net.tick_all(1)
    assert a.status()["progress"]["c"]["state"] == "replicate"
    c = net.nodes["c"]
    assert net.stores["c"].snap == a.snapshot_meta and c.commit_index == a.commit_index
    a.propose(b"after")
    net.stabilize()
    assert net.data("c")[-1] == b"after" and c.applied_index == a.applied_index


def test_snapshot_accepted_restores_follower():
    """A follower accepts a snapshot beyond its commit: Ready.snapshot set, log replaced."""
    f = follower_with_log([1, 1], term=2)
    drain(f)
    snap = SnapshotMeta(10, 2, ConfState(("a", "b", "c")))
    f.step(Message(MsgType.SNAP, frm="a", term=2, snapshot=snap))
    rd = f.ready()
    assert rd.snapshot == snap and rd.committed == []
    assert f.last_index == 10 and f.commit_index == 10 and f.log_entries(1, 11) == []
    (r,) = msgs_of(rd, MsgType.APP_RESP)
    assert r.index == 10 and not r.reject
    f.advance(rd)
    assert f.applied_index == 10


def test_snapshot_fast_forward_when_entry_present():
    """A snapshot whose last entry the follower already has only fast-forwards the commit."""
    f = follower_with_log([1, 1, 2, 2], term=2)
    drain(f)
    f.step(Message(MsgType.SNAP, frm="a", term=2, snapshot=SnapshotMeta(3, 2, ConfState(("a",)))))
    rd = f.ready()
    assert rd.snapshot is None and f.commit_index == 3 and f.last_index == 4
    assert [e.index for e in rd.committed] == [1, 2, 3]


def test_snapshot_ignored_if_not_beyond_commit():
    """A snapshot at or below the follower's commit index is not installed."""
    f = follower_with_log([1, 1, 2, 2], term=2)
    f.step(Message(MsgType.APP, frm="a", term=2, index=4, log_term=2, commit=4))
    drain(f)
    f.step(Message(MsgType.SNAP, frm="a", term=2, snapshot=SnapshotMeta(3, 5, ConfState(("a",)))))
    rd = f.ready()
    assert rd.snapshot is None and f.last_index == 4
    assert msgs_of(rd, MsgType.APP_RESP)[0].index == 4


def test_snapshot_compact_and_restart():
    """compact() drops entries <= index; a restart from snapshot + entries re-applies the rest."""
    net = Net(["a"])
    a = net.elect("a")
    for k in range(5):
        a.propose(b"%d" % k)
    net.stabilize()
    meta = a.compact(3)
    st = net.stores["a"]
    st.snap, st.entries, st.sm_index = meta, [e for e in st.entries if e.index > 3], 3
    with pytest.raises(ValueError):
        a.compact(a.applied_index + 1)
    st.applied = []
    n = net.restart("a")
    assert n.commit_index == 6 and n.last_index == 6
    net.stabilize()
    assert [e.index for e in st.applied] == [4, 5, 6]
    n.campaign()
    net.stabilize()
    assert n.role == Role.LEADER and n.commit_index == 7


# ============================================================ membership (thesis §4)

def _cc_entry_conf(e: Entry) -> ConfChange:
    return decode_conf_change(msgpack.unpackb(e.data))


def test_membership_add_voter_effective_when_appended():
    """A conf change takes effect on append (before commit), on leader and followers."""
    net = Net(["a", "b", "c"])
    a = net.elect("a")
    idx = a.propose_conf_change(ConfChange(ConfChangeType.ADD_VOTER, "d", b"addr"))
    assert a.conf.voters == ("a", "b", "c", "d") and a.commit_index < idx
    (e,) = a.log_entries(idx, idx + 1)
    assert e.type == EntryType.CONF_CHANGE and _cc_entry_conf(e) == ConfChange(
        ConfChangeType.ADD_VOTER, "d", b"addr")
    net.add_node("d", SnapshotMeta(0, 0, ConfState()))
    net.stabilize()
    assert net.nodes["d"].conf.voters == ("a", "b", "c", "d")
    assert [e.index for e in net.stores["d"].applied][-1] == idx


def test_membership_conf_reverted_on_truncation():
    """A conf change entry removed by log truncation reverts the configuration."""
    cc = msgpack.packb([int(ConfChangeType.ADD_LEARNER), "z", b""])
    f = Raft(Config("b"), hard_state=HardState(2, "", 1),
             snapshot=SnapshotMeta(0, 0, ConfState(("a", "b", "c"))),
             entries=[Entry(1, 1), Entry(2, 2, EntryType.CONF_CHANGE, cc)])
    assert f.conf.learners == ("z",)
    f.step(Message(MsgType.APP, frm="a", term=3, index=1, log_term=1, entries=[Entry(2, 3)]))
    assert f.conf == ConfState(("a", "b", "c"))


def test_membership_single_pending_conf_change():
    """A leader rejects a conf change while another one is uncommitted."""
    net = Net(["a", "b", "c"])
    a = net.elect("a")
    net.down.update({"b", "c"})
    a.propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, "d"))
    net.stabilize()
    with pytest.raises(Unavailable):
        a.propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, "e"))
    net.down.clear()
    net.tick_all(2)
    a.propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, "e"))
    assert a.conf.learners == ("d", "e")


def test_membership_requires_committed_entry_of_term():
    """A new leader accepts conf changes only once an entry of its term has committed."""
    net = Net(["a", "b", "c"])
    a = net.nodes["a"]
    a.campaign()
    for _ in range(4):   # prevote round, vote round: not yet replicated the empty entry
        net.process("a")
        for m in net.queue:
            net.deliver(m)
        net.queue.clear()
        for i in "bc":
            net.process(i)
        for m in net.queue:
            net.deliver(m)
        net.queue.clear()
        if a.role == Role.LEADER:
            break
    assert a.role == Role.LEADER and a.commit_index == 0
    with pytest.raises(Unavailable):
        a.propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, "d"))
    net.stabilize()
    a.propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, "d"))


def test_membership_invalid_change_rejected():
    """Invalid single-server changes are rejected with Unavailable."""
    net = Net(["a", "b"], learners=["l"])
    a = net.elect("a")
    for cc in (ConfChange(ConfChangeType.ADD_VOTER, "b"), ConfChange(ConfChangeType.ADD_LEARNER, "l"),
               ConfChange(ConfChangeType.REMOVE, "zz"), ConfChange(ConfChangeType.PROMOTE, "b")):
        with pytest.raises(Unavailable):
            a.propose_conf_change(cc)


def test_membership_learner_not_counted_in_quorum():
    """Learners receive the log but never count towards commit, never campaign."""
    net = Net(["a", "b"], learners=["l1", "l2"])
    a = net.elect("a")
    net.down.add("b")
    a.propose(b"x")
    net.stabilize()
    assert a.log_entries(2, 3)[0].data == b"x"
    assert a.commit_index == 1  # two learners acked, but the only other voter did not
    assert net.nodes["l1"].last_index == 2
    l1 = net.nodes["l1"]
    for _ in range(100):
        l1.tick()
    assert l1.role == Role.FOLLOWER and not l1.has_ready() or not msgs_of(
        l1.ready(), MsgType.PREVOTE)
    net.down.clear()
    net.tick_all(1)
    assert net.data("l2") == [b"x"]


def test_membership_promote_learner():
    """PROMOTE turns a learner into a voter that counts towards the quorum."""
    net = Net(["a"], learners=["l"])
    a = net.elect("a")
    a.propose_conf_change(ConfChange(ConfChangeType.PROMOTE, "l"))
    assert a.conf == ConfState(("a", "l"), ())
    net.stabilize()
    assert net.nodes["l"].conf.voters == ("a", "l")
    net.down.add("l")
    a.propose(b"x")
    net.stabilize()
    assert a.commit_index == a.last_index - 1  # now needs l


def test_membership_removed_leader_steps_down_after_commit():
    """A leader that removes itself keeps leading until the removal commits, then steps down."""
    net = Net(["a", "b", "c"])
    a = net.elect("a")
    idx = a.propose_conf_change(ConfChange(ConfChangeType.REMOVE, "a"))
    assert a.role == Role.LEADER and "a" not in a.conf.voters
    net.stabilize()
    assert a.role == Role.FOLLOWER and a.commit_index >= idx
    assert all(net.nodes[i].commit_index >= idx for i in "bc")
    net.tick_all(40)
    new = net.leader()
    assert new is not None and new.id in ("b", "c")
    new.propose(b"y")
    net.stabilize()
    assert net.data("b")[-1] == b"y"


# ============================================================ ReadIndex (thesis §6.4)

def test_read_index_needs_quorum():
    """A ReadState is released only after a quorum acks the heartbeat carrying the ctx."""
    net = Net(["a", "b", "c"])
    a = net.elect("a")
    net.down.update({"b", "c"})
    a.read_index(b"r1")
    net.stabilize()
    assert net.read_states["a"] == []
    net.down.discard("b")
    a.read_index(b"r2")
    net.stabilize()
    assert [(r.index, r.ctx) for r in net.read_states["a"]] == [(1, b"r1"), (1, b"r2")]


def test_read_index_waits_for_commit_in_current_term():
    """A leader without a committed entry of its term queues reads until it has one."""
    net = Net(["a", "b", "c"])
    a = net.nodes["a"]
    a.campaign()
    for _ in range(2):
        net.process("a")
        for m in net.queue:
            net.deliver(m)
        net.queue.clear()
        for i in "bc":
            net.process(i)
        for m in net.queue:
            net.deliver(m)
        net.queue.clear()
    assert a.role == Role.LEADER and a.commit_index == 0
    a.read_index(b"r")
    assert not net.process("a").read_states
    net.stabilize()
    assert [(r.index, r.ctx) for r in net.read_states["a"]] == [(1, b"r")]


def test_read_index_single_voter_immediate():
    """A single-voter leader releases a ReadState at once."""
    net = Net(["a"])
    a = net.elect("a")
    a.propose(b"x")
    net.stabilize()
    a.read_index(b"r")
    rd = a.ready()
    assert [(r.index, r.ctx) for r in rd.read_states] == [(2, b"r")] and not rd.messages


def test_read_index_forwarded_from_follower():
    """A follower forwards READ_INDEX to the leader and emits the ReadState from the reply."""
    net = Net(["a", "b", "c"])
    net.elect("a")
    b = net.nodes["b"]
    b.read_index(b"rb")
    rd = net.process("b")
    assert [(m.type, m.to) for m in rd.messages] == [(MsgType.READ_INDEX, "a")]
    net.stabilize()
    assert [(r.index, r.ctx) for r in net.read_states["b"]] == [(1, b"rb")]
    with pytest.raises(NotLeader) as ei:
        bootstrap("x", voters=("x", "y", "z")).read_index(b"q")
    assert ei.value.details == {"leader": ""}


# ============================================================ leadership transfer

def test_transfer_leadership():
    """The leader catches the target up, sends TIMEOUT_NOW; the target wins at once."""
    net = Net(["a", "b", "c"])
    a = net.elect("a")
    net.down.add("c")
    for k in range(3):
        a.propose(b"%d" % k)
    net.stabilize()
    net.down.discard("c")
    a.transfer_leadership("c")
    with pytest.raises(Unavailable):
        a.propose(b"no")
    votes = []
    net.drop = lambda m: m.type == MsgType.VOTE and votes.append(m) and False
    net.stabilize()
    c = net.nodes["c"]
    assert c.role == Role.LEADER and a.role == Role.FOLLOWER and a.leader == "c"
    assert votes and all(m.context == b"transfer" for m in votes)
    assert not any(m.type == MsgType.PREVOTE for m in net.sent if m.frm == "c")
    c.propose(b"z")
    net.stabilize()
    assert net.data("a") == [b"0", b"1", b"2", b"z"]


def test_transfer_aborts_after_election_timeout():
    """A transfer to an unreachable target aborts after an election timeout."""
    net = Net(["a", "b", "c"])
    a = net.elect("a")
    net.down.add("c")
    a.transfer_leadership("c")
    assert a.lead_transferee == "c"
    with pytest.raises(Unavailable):
        a.propose(b"x")
    net.tick_all(a.cfg.election_tick)
    assert a.lead_transferee == "" and a.role == Role.LEADER
    a.propose(b"x")


# ============================================================ terms in messages

def test_terms_lower_term_messages_ignored():
    """Messages with a lower term are ignored; a stale leader is told the newer term."""
    b = follower_with_log([1, 1], term=3)
    b.step(Message(MsgType.VOTE, frm="a", term=3, log_term=1, index=2))
    drain(b)
    b.step(Message(MsgType.APP, frm="c", term=2, index=2, log_term=1,
                   entries=[Entry(3, 2)], commit=3))
    b.step(Message(MsgType.VOTE, frm="c", term=2, index=99, log_term=99))
    b.step(Message(MsgType.VOTE_RESP, frm="c", term=2))
    rd = b.ready()
    assert b.last_index == 2 and b.vote == "a" and b.term == 3 and b.commit_index == 0
    assert [(m.type, m.to, m.term) for m in rd.messages] == [(MsgType.APP_RESP, "c", 3)]


def test_terms_higher_term_prevote_does_not_change_receiver_term():
    """A PREVOTE with a higher term leaves the receiver's term unchanged (granted or not)."""
    n = follower_with_log([1, 2], term=2, i="a")
    n.step(Message(MsgType.PREVOTE, frm="b", term=7, log_term=1, index=1))   # rejected
    n.step(Message(MsgType.PREVOTE, frm="c", term=7, log_term=2, index=2))   # granted
    resp = msgs_of(n.ready(), MsgType.PREVOTE_RESP)
    assert [(m.reject, m.term) for m in resp] == [(True, 2), (False, 7)]
    assert n.term == 2 and n.vote == ""


# ============================================================ proposals / API errors

def test_proposal_errors():
    """Followers raise NotLeader with the leader id; too many uncommitted bytes -> Unavailable."""
    net = Net(["a", "b", "c"], max_uncommitted_bytes=100)
    a = net.elect("a")
    with pytest.raises(NotLeader) as ei:
        net.nodes["b"].propose(b"x")
    assert ei.value.details == {"leader": "a"}
    net.down.update({"b", "c"})
    a.propose(b"x" * 60)
    with pytest.raises(Unavailable):
        a.propose(b"x" * 60)
    net.down.clear()
    net.tick_all(2)
    a.propose(b"x" * 60)  # committed bytes were released


def test_restart_rehands_committed_entries():
    """After a restart, entries in (applied, commit] are handed out again in committed."""
    net = Net(["a", "b", "c"])
    a = net.elect("a")
    for k in range(4):
        a.propose(b"%d" % k)
    net.stabilize()
    st = net.stores["b"]
    st.applied, st.sm_index = [], 0
    n = net.restart("b")
    assert n.role == Role.FOLLOWER and n.term == a.term
    rd = net.process("b")
    assert [e.index for e in rd.committed] == [1, 2, 3, 4, 5] and rd.hard_state is None


# ============================================================ randomized safety

@pytest.mark.parametrize("seed", range(12))
def test_randomized_safety_with_drops_reorders_and_crashes(seed):
    """Under drops, reordering, partitions and crash-restarts: one leader per term, logs agree."""
    rng = random.Random(seed)
    ids = ["a", "b", "c", "d", "e"] if seed % 2 else ["a", "b", "c"]
    net = Net(ids, seed=seed)
    leaders: dict[int, str] = {}
    proposed = 0
    for step in range(1500):
        r = rng.random()
        if r < 0.3:
            i = rng.choice(ids)
            if i not in net.down:
                net.nodes[i].tick()
        elif r < 0.35:
            lead = net.leader()
            if lead is not None:
                try:
                    lead.propose(b"v%d" % proposed)
                    proposed += 1
                except Unavailable:
                    pass
        elif r < 0.37:
            net.cut = {frozenset(rng.sample(ids, 2)) for _ in range(rng.randint(0, 3))}
        elif r < 0.38:
            i = rng.choice(ids)
            if i in net.down:
                net.down.discard(i)
                net.restart(i)
            elif len(net.down) < len(ids) // 2:
                net.down.add(i)
        elif r < 0.39:
            lead = net.leader()
            if lead is not None and lead.applied_index > 5:
                meta = lead.compact(lead.applied_index - 2)
                st = net.stores[lead.id]
                st.snap = meta
                st.entries = [e for e in st.entries if e.index > meta.index]
        else:
            for i in ids:
                if i not in net.down and net.nodes[i].has_ready():
                    net.process(i)
            rng.shuffle(net.queue)
            keep = []
            for m in net.queue:
                x = rng.random()
                if x < 0.1:
                    if m.type == MsgType.SNAP and m.frm not in net.down:
                        net.nodes[m.frm].report_snapshot(m.to, False)
                    continue          # drop
                if x < 0.2:
                    keep.append(m)    # delay (reorder)
                    continue
                net.deliver_reporting(m)
            net.queue = keep
        for i, n in net.nodes.items():
            if n.role == Role.LEADER:
                assert leaders.setdefault(n.term, i) == i, "two leaders in one term"
    # state machine safety: applied sequences are prefixes of one another
    applied_at: dict[int, tuple] = {}
    for i in ids:
        for e in net.stores[i].applied:
            assert applied_at.setdefault(e.index, (e.term, e.data)) == (e.term, e.data), \
                f"{i} applied a different entry at {e.index}"
    # log matching between every pair of in-memory logs
    for i in ids:
        for j in ids:
            ni, nj = net.nodes[i], net.nodes[j]
            lo = max(ni.first_index, nj.first_index)
            hi = min(ni.last_index, nj.last_index)
            common = [(x, y) for x, y in zip(ni.log_entries(lo, hi + 1), nj.log_entries(lo, hi + 1))]
            same = [k for k, (x, y) in enumerate(common) if x.term == y.term]
            if same:
                k = same[-1]
                assert [x for x, _ in common[:k + 1]] == [y for _, y in common[:k + 1]]
    # liveness after healing
    net.cut.clear()
    for i in list(net.down):
        net.down.discard(i)
        net.restart(i)
    net.drop = lambda m: False

    net.report_snapshots = True
    for _ in range(200):
        net.tick_all(1)
    lead = net.leader()
    assert lead is not None
    lead.propose(b"final")
    net.stabilize()
    net.tick_all(2)
    for i in ids:
        assert net.nodes[i].applied_index == lead.applied_index, (i, net.nodes[i].status())


@pytest.mark.parametrize("seed", range(12))
def test_randomized_membership_transfer_and_reads(seed):
    """Random conf changes, transfers and reads under message loss keep safety; reads are fresh."""
    rng = random.Random(1000 + seed)
    universe = ["a", "b", "c", "d", "e"]
    net = Net(["a", "b", "c"], seed=seed)
    net.report_snapshots = True
    for j in ("d", "e"):
        net.add_node(j, SnapshotMeta(0, 0, ConfState()))
    leaders: dict[int, str] = {}
    read_floor: dict[bytes, int] = {}
    nread = 0
    for _ in range(2000):
        r = rng.random()
        lead = net.leader()
        if r < 0.3:
            net.nodes[rng.choice(universe)].tick()
        elif r < 0.34 and lead is not None:
            try:
                lead.propose(b"p")
            except Unavailable:
                pass
        elif r < 0.36 and lead is not None:
            conf = lead.conf
            node = rng.choice(universe)
            if node in conf.learners:
                cc = ConfChange(rng.choice([ConfChangeType.PROMOTE, ConfChangeType.REMOVE]), node)
            elif node in conf.voters:
                cc = ConfChange(ConfChangeType.REMOVE, node)
            else:
                cc = ConfChange(rng.choice([ConfChangeType.ADD_LEARNER, ConfChangeType.ADD_VOTER]),
                                node)
            if cc.type == ConfChangeType.REMOVE and len(conf.voters) <= 2 and node in conf.voters:
                continue
            try:
                lead.propose_conf_change(cc)
            except Unavailable:
                pass
        elif r < 0.37 and lead is not None:
            lead.transfer_leadership(rng.choice(universe))
        elif r < 0.40:
            i = rng.choice(universe)
            ctx = b"r%d" % nread
            nread += 1
            try:
                net.nodes[i].read_index(ctx)
                read_floor[ctx] = max(n.commit_index for n in net.nodes.values())
            except NotLeader:
                pass
        else:
            for i in universe:
                if net.nodes[i].has_ready():
                    net.process(i)
            rng.shuffle(net.queue)
            keep = []
            for m in net.queue:
                x = rng.random()
                if x < 0.05:
                    if m.type == MsgType.SNAP:
                        net.nodes[m.frm].report_snapshot(m.to, False)
                    continue
                if x < 0.15:
                    keep.append(m)
                    continue
                net.deliver_reporting(m)
            net.queue = keep
        for i, n in net.nodes.items():
            if n.role == Role.LEADER:
                assert leaders.setdefault(n.term, i) == i, "two leaders in one term"
    applied_at: dict[int, tuple] = {}
    for i in universe:
        for e in net.stores[i].applied:
            assert applied_at.setdefault(e.index, (e.term, e.data)) == (e.term, e.data)
        for rs in net.read_states[i]:
            assert rs.index >= read_floor[rs.ctx], "stale read index"
    # liveness: heal and let the cluster converge
    net.queue.clear()
    for _ in range(100):
        net.tick_all(1)
    lead = net.leader()
    assert lead is not None
    lead.propose(b"final")
    net.stabilize()
    net.tick_all(2)
    for i in lead.conf.members():
        assert net.nodes[i].applied_index == lead.applied_index, (i, net.nodes[i].status())


def test_snapshot_message_uses_latest_compaction():
    """A SNAP queued before a later compact() is sent with the snapshot the driver now holds."""
    net = Net(["a", "b", "c"])
    a = net.elect("a")
    net.down.add("b")
    for k in range(6):
        a.propose(b"%d" % k)
    net.stabilize()
    a.compact(3)
    a.report_unreachable("b")                                  # back to probing from match+1
    a.step(Message(MsgType.HEARTBEAT_RESP, frm="b", term=a.term))  # queues SNAP at index 3
    meta = a.compact(5)                                        # the driver compacts further
    (snap,) = msgs_of(a.ready(), MsgType.SNAP)
    assert snap.snapshot == meta and a.status()["progress"]["b"]["state"] == "snapshot"
