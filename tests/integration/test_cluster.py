"""Replication and durability against real server processes: leader kill -9 under a running
writer, full-cluster restart (SIGTERM and kill -9), stale and redirected reads
(docs/guarantees.md G1, G3, G6)."""
from __future__ import annotations

import signal
import threading
import time

import pytest

from afs import errors
from afs.testing.cluster import ProcessCluster

pytestmark = pytest.mark.integration


class Writer(threading.Thread):
    """Creates ``prefix/00000``, ``prefix/00001``, ... one at a time with one Client, recording
    every acknowledged write (path -> (value, revision)) and every failure."""

    def __init__(self, cl: ProcessCluster, prefix: str, timeout: float = 20.0):
        super().__init__(daemon=True, name=f"writer{prefix}")
        self.cl, self.prefix, self.timeout = cl, prefix, timeout
        self.acked: dict[str, tuple[bytes, int]] = {}
        self.failed: list[tuple[str, errors.AfsError]] = []
        self.stopping = threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        with self.cl.client(timeout=self.timeout) as c:
            i = 0
            while not self.stopping.is_set():
                path, value = f"{self.prefix}/{i:05d}", f"value-{i}".encode()
                try:
                    r = c.create(path, value)
                except errors.AfsError as exc:
                    with self.lock:
                        self.failed.append((path, exc))
                else:
                    with self.lock:
                        self.acked[path] = (value, r.revision)
                i += 1

    def count(self) -> int:
        with self.lock:
            return len(self.acked)

    def wait_for(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.count() < n:
            if time.monotonic() > deadline or not self.is_alive():
                raise AssertionError(f"writer reached {self.count()} acknowledged writes, wanted {n}; "
                                     f"failures: {self.failed[-3:]}")
            time.sleep(0.02)

    def finish(self) -> None:
        self.stopping.set()
        self.join(60)
        assert not self.is_alive(), "writer thread did not finish"


def check_acknowledged(cl: ProcessCluster, w: Writer, base_revision: int) -> int:
    """Every acknowledged write is present with its value and revision; acknowledged revisions
    increase; the writer's subtree accounts for every revision after ``base_revision`` (dense:
    one create per revision, nothing applied twice). Returns the current revision."""
    # a duplicate apply of a retried create would have surfaced as `exists`
    assert not [f for f in w.failed if isinstance(f[1], errors.AlreadyExists)], w.failed
    revs = [rev for _, rev in w.acked.values()]
    assert revs == sorted(revs) and len(set(revs)) == len(revs), "acknowledged revisions not increasing"
    with cl.client() as c:
        nodes = c.walk(w.prefix, data=True)
    present = {p: (d, st) for p, st, d in nodes[1:]}
    missing = [p for p in w.acked if p not in present]
    assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {missing[:5]}"
    for path, (value, rev) in w.acked.items():
        data, st = present[path]
        assert data == value, path
        assert st.create_revision == rev and st.version == 1, (path, st, rev)
    creates = sorted(st.create_revision for _, st in present.values())
    assert len(set(creates)) == len(creates)
    assert nodes.revision == base_revision + len(present), (
        f"revision {nodes.revision} != {base_revision} + {len(present)} creates: revisions not dense")
    assert creates == list(range(base_revision + 1, nodes.revision + 1))
    return nodes.revision


def check_members_identical(cl: ProcessCluster, path: str = "/") -> int:
    """Every member holds the same tree at the same revision (stale reads from each)."""
    rev = cl.wait_converged(timeout=20)
    walks = {}
    for name in cl.running():
        with cl.member_client(name) as c:
            w = c.walk(path, data=True, stale=True)
        walks[name] = (w.revision, [(p, st.to_dict(), d) for p, st, d in w])
    first_name, first = next(iter(walks.items()))
    for name, w in walks.items():
        assert w[0] == first[0] == rev, {n: x[0] for n, x in walks.items()}
        assert w[1] == first[1], f"{name} differs from {first_name}"
    return rev


def test_leader_kill9_with_running_writer(cluster):
    """kill -9 of the leader while a writer runs: writes resume on a new leader, nothing
    acknowledged is lost, no retried write is applied twice, all members converge."""
    with cluster.client() as c:
        base = c.mkdir("/w").revision
    w = Writer(cluster, "/w")
    w.start()
    try:
        w.wait_for(40, 20)
        old = cluster.wait_for_leader(5)
        assert cluster.kill(old) == -signal.SIGKILL
        at_kill = w.count()
        new = cluster.wait_for_leader(20, exclude=[old])
        assert new != old
        w.wait_for(at_kill + 40, 30)          # writes resumed on the new leader
    finally:
        w.finish()
    cluster.restart(old)
    rev = check_acknowledged(cluster, w, base)
    assert check_members_identical(cluster) == rev
    # the restarted old leader serves stale reads of everything acknowledged
    last = max(w.acked, key=lambda p: w.acked[p][1])
    with cluster.member_client(old) as c:
        data, st = c.get(last, stale=True)
        assert data == w.acked[last][0]


def test_follower_kill9_minority_keeps_writing(cluster):
    """kill -9 of one follower: the majority keeps committing; the follower catches up on
    restart."""
    leader = cluster.wait_for_leader(5)
    follower = next(n for n in cluster.names if n != leader)
    with cluster.client() as c:
        c.put("/m/a", b"1", parents=True)
        cluster.kill(follower)
        for i in range(20):
            c.put(f"/m/k{i}", str(i).encode())
        rev = c.put("/m/last", b"x").revision
    cluster.restart(follower)
    cluster.wait_for_revision(rev, [follower])
    assert check_members_identical(cluster) == rev


def _write_batch(cl: ProcessCluster, prefix: str, n: int) -> dict[str, tuple[bytes, int]]:
    out = {}
    with cl.client() as c:
        for i in range(n):
            p = f"{prefix}/{i:05d}"
            out[p] = (f"v{i}".encode(), c.create(p, f"v{i}".encode(), parents=True).revision)
    return out


def test_full_cluster_restart_sigterm(cluster):
    """SIGTERM of every member (clean exit 0, `event=stopped`), then restart: all data is
    there, the revision continues densely."""
    acked = _write_batch(cluster, "/r", 60)
    last = max(rev for _, rev in acked.values())
    codes = cluster.stop_all(timeout=20)
    assert codes == {n: 0 for n in cluster.names}, codes
    for m in cluster.members.values():
        assert "event=stopped" in m.log_text(), m.tail()
    cluster.start()
    cluster.wait_for_leader(30)
    with cluster.client() as c:
        nodes = c.walk("/r", data=True)
        assert nodes.revision == last
        got = {p: (d, st.create_revision) for p, st, d in nodes[1:]}
        assert got == acked
        assert c.put("/r/after", b"x").revision == last + 1
    assert check_members_identical(cluster) == last + 1


def test_kill9_all_members_then_restart(cluster):
    """kill -9 of ALL members at once while a writer runs: after restart every acknowledged
    write is present and revisions stay dense (G6)."""
    with cluster.client() as c:
        base = c.mkdir("/k").revision
    w = Writer(cluster, "/k", timeout=30)
    w.start()
    try:
        w.wait_for(50, 20)
        codes = cluster.kill_all()
        assert all(code == -signal.SIGKILL for code in codes.values()), codes
        acked_at_crash = dict(w.acked)
        cluster.start()
        cluster.wait_for_leader(30)
        w.wait_for(len(acked_at_crash) + 10, 30)   # the writer's client found the new leader
    finally:
        w.finish()
    rev = check_acknowledged(cluster, w, base)
    assert all(p in w.acked for p in acked_at_crash)
    with cluster.client() as c:
        assert c.put("/k2", b"x").revision == rev + 1
    assert check_members_identical(cluster) == rev + 1


def test_stale_reads_and_redirected_linearizable_reads(cluster):
    """A follower answers --stale reads with the revision it reflects (even without a leader);
    a linearizable read or a write sent to a follower is redirected to the leader."""
    leader = cluster.wait_for_leader(5)
    follower = next(n for n in cluster.names if n != leader)
    with cluster.client() as c:
        rev = c.put("/s/a", b"one", parents=True).revision
    cluster.wait_for_revision(rev, [follower])
    with cluster.member_client(follower) as fc:
        r = fc.get("/s/a", stale=True)
        assert r.data == b"one" and r.revision >= rev
        st, srev = fc.stat_with_revision("/s/a", stale=True)
        assert srev >= rev and st.mod_revision == rev
        assert fc.list("/s", stale=True).revision >= rev
        # linearizable: the follower answers not_leader with the leader's address; the client
        # follows it (the follower is the only endpoint it was given)
        r2 = fc.get("/s/a")
        assert r2.data == b"one" and r2.revision >= rev
        w = fc.put("/s/a", b"two")
        assert w.revision == rev + 1
        assert fc.get("/s/a").data == b"two"
    # with the leader frozen, a follower still serves stale reads of what it has applied
    cluster.wait_for_revision(rev + 1, [follower])
    cluster.pause(leader)
    try:
        with cluster.member_client(follower, timeout=3) as fc:
            r3 = fc.get("/s/a", stale=True)
            assert r3.data == b"two" and r3.revision >= rev + 1
    finally:
        cluster.resume(leader)
    cluster.wait_for_leader(20)
    assert check_members_identical(cluster) >= rev + 1


@pytest.mark.slow
def test_repeated_leader_kills_under_writes(cluster):
    """Five rounds of kill -9 of whoever leads (restarting the previous victim each time) under
    a continuous writer: nothing acknowledged is lost, nothing applied twice, members agree."""
    with cluster.client() as c:
        base = c.mkdir("/rk").revision
    w = Writer(cluster, "/rk", timeout=30)
    w.start()
    victim = None
    try:
        for _ in range(5):
            w.wait_for(w.count() + 25, 30)
            leader = cluster.wait_for_leader(20)
            cluster.kill(leader)
            if victim is not None:
                cluster.restart(victim)
            victim = leader
            cluster.wait_for_leader(20, exclude=[leader])
        w.wait_for(w.count() + 25, 30)
    finally:
        w.finish()
    cluster.restart(victim)
    rev = check_acknowledged(cluster, w, base)
    assert check_members_identical(cluster) == rev


def test_checks_detect_lost_changed_and_extra_writes(shared_cluster):
    """Negative control: check_acknowledged fails on a lost acknowledged write, a wrong value,
    and a revision not accounted for (so the checks above can fail)."""
    with shared_cluster.client() as c:
        base = c.mkdir("/neg").revision
        r1 = c.create("/neg/00000", b"a").revision
    w = Writer(shared_cluster, "/neg")
    w.acked = {"/neg/00000": (b"a", r1)}
    assert check_acknowledged(shared_cluster, w, base) == r1            # the positive case
    w.acked["/neg/00001"] = (b"b", r1 + 1)                               # acknowledged, absent
    with pytest.raises(AssertionError, match="lost"):
        check_acknowledged(shared_cluster, w, base)
    w.acked = {"/neg/00000": (b"other", r1)}                             # wrong value
    with pytest.raises(AssertionError):
        check_acknowledged(shared_cluster, w, base)
    w.acked = {"/neg/00000": (b"a", r1)}
    with shared_cluster.client() as c:
        c.put("/neg-elsewhere", b"x")                                    # a revision outside /neg
    with pytest.raises(AssertionError, match="dense"):
        check_acknowledged(shared_cluster, w, base)
