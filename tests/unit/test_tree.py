"""afs.tree: KeyTree semantics per op, txn, dedupe, events, snapshots, the Raft adapter."""
import io

import msgpack
import pytest

from afs.errors import (InvalidInput, IsADirectory, NotADirectory, NotFound, RevisionGap,
                        StorageCorrupt, UnsupportedFormat)
from afs.model import Event, EventType, NodeKind, Stat
from afs.ops import Chmod, Command, Compare, Create, Delete, Mkdir, Noop, Set, Txn
from afs.tree import KeyTree, TreeStateMachine

T0 = 1_700_000_000_000_000_000


class Runner:
    """Applies ops as commands with increasing mtime (and optional client ids)."""

    def __init__(self, tree=None):
        self.tree = tree or KeyTree()
        self.t = T0

    def __call__(self, op, cid="", seq=0, uid=1000, gid=100):
        self.t += 1000
        return self.tree.apply_command(Command(cid, seq, self.t, uid, gid, op))


@pytest.fixture
def run():
    return Runner()


def code(result):
    return result["error"]["code"] if "error" in result else None


def kinds(events):
    return [(e.type.value, e.path) for e in events]


# ------------------------------------------------------------------ basics

def test_empty_tree_root():
    """A new tree has only the root, a 0755 directory at revision 0."""
    t = KeyTree()
    assert t.revision == 0 and len(t) == 1
    st = t.stat("/")
    assert st.kind is NodeKind.DIR and st.mode == 0o755 and st.version == 0
    assert t.list("/") == []
    assert t.walk("/") == [("/", st, None)]


def test_create_file(run):
    """create makes a file with version 1, create=mod revision, command uid/gid and mtime."""
    res, ev = run(Create("/a", b"hello"), uid=7, gid=8)
    assert res == {"revision": 1}
    data, st = run.tree.get("/a")
    assert data == b"hello"
    assert st == Stat(NodeKind.FILE, 1, 1, 1, run.t, 0o644, 7, 8, 5)
    assert ev == [Event(1, EventType.CREATED, "/a", st, b"hello")]


def test_create_existing_and_missing_parent(run):
    """create: exists on an existing node; not_found naming the missing parent."""
    run(Create("/a"))
    res, ev = run(Create("/a"))
    assert code(res) == "exists" and ev == []
    res, _ = run(Create("/x/y"))
    assert code(res) == "not_found"
    assert "parent directory /x does not exist" in res["error"]["message"]
    assert res["error"]["details"]["missing"] == "/x"
    assert run.tree.revision == 1


def test_create_under_file_is_not_a_directory(run):
    """A file ancestor answers not_a_directory, with and without parents."""
    run(Create("/f"))
    for op in (Create("/f/x"), Create("/f/x/y", parents=True), Mkdir("/f/d"),
               Set("/f/x", b"", upsert=True)):
        res, _ = run(op)
        assert code(res) == "not_a_directory", op
    assert run.tree.revision == 1


def test_create_parents_events_top_down(run):
    """create with parents makes each missing dir (0755) with one created event each."""
    run(Mkdir("/a"))
    res, ev = run(Create("/a/b/c/f", b"x", mode=0o600, parents=True))
    assert res == {"revision": 2}
    assert kinds(ev) == [("created", "/a/b"), ("created", "/a/b/c"), ("created", "/a/b/c/f")]
    assert all(e.revision == 2 for e in ev)
    assert run.tree.stat("/a/b").mode == 0o755
    assert run.tree.stat("/a/b/c/f").mode == 0o600
    assert ev[0].data is None and ev[2].data == b"x"


def test_set_semantics(run):
    """set bumps version and mod_revision even for identical data, keeps owner, stamps mtime."""
    run(Create("/a", b"v1"), uid=1, gid=1)
    res, ev = run(Set("/a", b"v1"), uid=2, gid=2)
    assert res == {"revision": 2}
    st = run.tree.stat("/a")
    assert (st.version, st.create_revision, st.mod_revision, st.uid, st.mtime_ns) == \
        (2, 1, 2, 1, run.t)
    assert kinds(ev) == [("updated", "/a")] and ev[0].data == b"v1"
    run(Set("/a", b"v3", mode=0o600))
    assert run.tree.stat("/a").mode == 0o600 and run.tree.get("/a")[0] == b"v3"


def test_set_errors(run):
    """set: not_found without upsert, is_a_directory on dirs."""
    assert code(run(Set("/a", b"x"))[0]) == "not_found"
    run(Mkdir("/d"))
    assert code(run(Set("/d", b"x"))[0]) == "is_a_directory"
    assert code(run(Set("/d", b"x", upsert=True))[0]) == "is_a_directory"


def test_set_if_version_and_if_mod_revision(run):
    """Guards compare against the current stat; mismatches carry expected/actual."""
    run(Create("/a", b"1"))
    run(Create("/b", b"1"))
    res, _ = run(Set("/a", b"2", if_version=2))
    assert code(res) == "version_mismatch"
    assert res["error"]["details"]["expected"] == 2 and res["error"]["details"]["actual"] == 1
    assert run(Set("/a", b"2", if_version=1))[0] == {"revision": 3}
    assert code(run(Set("/a", b"3", if_mod_revision=1))[0]) == "version_mismatch"
    assert run(Set("/a", b"3", if_mod_revision=3))[0] == {"revision": 4}
    assert code(run(Set("/a", b"4", if_version=3, if_mod_revision=3))[0]) == "version_mismatch"


def test_set_upsert(run):
    """upsert creates a missing file (parents too with parents); if_version 0 = must not exist."""
    res, ev = run(Set("/p/q", b"x", upsert=True, parents=True, mode=0o640))
    assert res == {"revision": 1}
    assert kinds(ev) == [("created", "/p"), ("created", "/p/q")]
    assert run.tree.stat("/p/q").mode == 0o640
    assert code(run(Set("/p/r", b"x", upsert=True, if_version=3))[0]) == "version_mismatch"
    assert run(Set("/p/r", b"x", upsert=True, if_version=0))[0] == {"revision": 2}
    assert code(run(Set("/p/r", b"y", upsert=True, if_version=0))[0]) == "version_mismatch"
    assert code(run(Set("/z/r", b"x", upsert=True))[0]) == "not_found"


def test_mkdir(run):
    """mkdir: exists unless -p on an existing dir (success without a revision)."""
    assert run(Mkdir("/d", mode=0o700))[0] == {"revision": 1}
    assert run.tree.stat("/d").mode == 0o700
    assert code(run(Mkdir("/d"))[0]) == "exists"
    res, ev = run(Mkdir("/d", parents=True))
    assert res == {"revision": 1} and ev == []
    run(Create("/f"))
    assert code(run(Mkdir("/f", parents=True))[0]) == "exists"
    assert code(run(Mkdir("/x/y"))[0]) == "not_found"
    res, ev = run(Mkdir("/x/y/z", parents=True))
    assert kinds(ev) == [("created", "/x"), ("created", "/x/y"), ("created", "/x/y/z")]
    assert code(run(Mkdir("/"))[0]) == "exists"
    assert run(Mkdir("/", parents=True))[1] == []


def test_delete_file_and_guards(run):
    """delete: not_found, if_version, root refused; deleted event has the last stat."""
    assert code(run(Delete("/a"))[0]) == "not_found"
    run(Create("/a", b"x"))
    st = run.tree.stat("/a")
    assert code(run(Delete("/a", if_version=5))[0]) == "version_mismatch"
    res, ev = run(Delete("/a", if_version=1))
    assert res == {"revision": 2}
    assert ev == [Event(2, EventType.DELETED, "/a", st, None)]
    assert not run.tree.exists("/a")
    res, _ = run(Delete("/", recursive=True))
    assert code(res) == "invalid" and "root" in res["error"]["message"]


def test_delete_recursive_order(run):
    """Recursive delete emits children before parents, siblings sorted; not_empty without it."""
    for p in ("/d/b/y", "/d/b/x", "/d/a", "/d/c/z/w"):
        run(Create(p, parents=True))
    run(Create("/e"))
    assert code(run(Delete("/d"))[0]) == "not_empty"
    res, ev = run(Delete("/d", recursive=True))
    assert kinds(ev) == [("deleted", p) for p in
                         ("/d/a", "/d/b/x", "/d/b/y", "/d/b", "/d/c/z/w", "/d/c/z", "/d/c", "/d")]
    assert all(e.revision == res["revision"] for e in ev)
    assert [n for n, _ in run.tree.list("/")] == ["e"]
    run(Mkdir("/empty"))
    assert kinds(run(Delete("/empty"))[1]) == [("deleted", "/empty")]


def test_chmod(run):
    """chmod bumps version/mod_revision, keeps mtime; same values change nothing."""
    run(Create("/a", b"x"), uid=1, gid=1)
    mtime = run.tree.stat("/a").mtime_ns
    res, ev = run(Chmod("/a", mode=0o600, uid=5))
    assert res == {"revision": 2} and kinds(ev) == [("updated", "/a")]
    st = run.tree.stat("/a")
    assert (st.mode, st.uid, st.gid, st.version, st.mod_revision, st.mtime_ns) == \
        (0o600, 5, 1, 2, 2, mtime)
    assert ev[0].data == b"x"
    res, ev = run(Chmod("/a", mode=0o600))
    assert res == {"revision": 2} and ev == []
    assert run(Chmod("/", mode=0o711))[0] == {"revision": 3}
    assert code(run(Chmod("/nope", mode=0))[0]) == "not_found"


def test_directory_stat_unchanged_by_children(run):
    """Adding/removing children does not change a directory's stat (documented choice)."""
    run(Mkdir("/d"))
    before = run.tree.stat("/d")
    run(Create("/d/a"))
    run(Delete("/d/a"))
    assert run.tree.stat("/d") == before and before.size == 0


def test_noop(run):
    """noop answers the current revision and consumes none."""
    run(Create("/a"))
    assert run(Noop()) == ({"revision": 1}, [])
    assert run.tree.revision == 1


def test_failures_consume_no_revision(run):
    """Revisions stay dense: a failed op consumes nothing."""
    run(Create("/a"))
    run(Create("/a"))
    run(Delete("/zz"))
    assert run(Create("/b"))[0] == {"revision": 2}


# ------------------------------------------------------------------ reads

def test_reads_raise(run):
    """get/stat/list/walk raise NotFound / NotADirectory / IsADirectory."""
    run(Create("/d/f", b"x", parents=True))
    with pytest.raises(NotFound):
        run.tree.get("/nope")
    with pytest.raises(IsADirectory):
        run.tree.get("/d")
    with pytest.raises(NotADirectory):
        run.tree.list("/d/f")
    with pytest.raises(NotADirectory):
        run.tree.stat("/d/f/x")
    with pytest.raises(NotFound):
        run.tree.walk("/x")


def test_list_and_walk_sorted(run):
    """list is sorted by name; walk is pre-order with siblings sorted, data optional."""
    for p in ("/b/z", "/b/a", "/a-c", "/a/x"):
        run(Create(p, p.encode(), parents=True))
    assert [n for n, _ in run.tree.list("/")] == ["a", "a-c", "b"]
    walked = run.tree.walk("/")
    assert [p for p, _, _ in walked] == ["/", "/a", "/a/x", "/a-c", "/b", "/b/a", "/b/z"]
    assert walked[2][2] == b"/a/x"
    assert all(d is None for _, _, d in run.tree.walk("/", with_data=False))
    assert [p for p, _, _ in run.tree.walk("/b")] == ["/b", "/b/a", "/b/z"]


# ------------------------------------------------------------------ txn

def test_txn_then_branch_one_revision(run):
    """A successful txn is one revision; its events share it; results per op."""
    run(Create("/a", b"1"))
    res, ev = run(Txn((Compare("/a", "value", "==", b"1"), Compare("/b", "exists", "==", False)),
                      (Create("/b", b"2"), Set("/a", b"3"), Delete("/a")), ()))
    assert res == {"revision": 2, "succeeded": True, "results": [{"revision": 2}] * 3}
    assert kinds(ev) == [("created", "/b"), ("updated", "/a"), ("deleted", "/a")]
    assert {e.revision for e in ev} == {2}


def test_txn_else_branch(run):
    """A failing compare runs the else branch; succeeded is false."""
    run(Create("/a", b"1"))
    res, ev = run(Txn((Compare("/a", "version", ">", 1),), (Delete("/a"),),
                      (Set("/a", b"else"),)))
    assert res["succeeded"] is False and res["revision"] == 2
    assert run.tree.get("/a")[0] == b"else"


def test_txn_all_or_nothing(run):
    """A failing op in the chosen branch undoes every earlier op of the txn."""
    run(Create("/d/a", b"1", parents=True))
    snap = run.tree.snapshot(include_dedupe=False)
    res, ev = run(Txn((), (Set("/d/a", b"2"), Create("/n/x", parents=True), Mkdir("/m"),
                           Chmod("/d", mode=0o700), Delete("/d", recursive=True),
                           Create("/d/a", parents=True)), ()))
    assert code(res) is None and res["succeeded"]
    assert kinds(ev)[-2:] == [("created", "/d"), ("created", "/d/a")]
    # now one that fails at index 5 after doing all sorts of changes
    run2 = Runner()
    run2(Create("/d/a", b"1", parents=True))
    snap = run2.tree.snapshot(include_dedupe=False)
    res, ev = run2(Txn((), (Set("/d/a", b"2"), Create("/n/x", parents=True), Mkdir("/m"),
                            Chmod("/d", mode=0o700), Delete("/d", recursive=True),
                            Delete("/d/a")), ()))
    assert code(res) == "not_found" and ev == []
    assert res["error"]["details"]["op_index"] == 5
    assert res["error"]["details"]["branch"] == "then"
    assert run2.tree.snapshot(include_dedupe=False) == snap
    assert run2.tree.revision == 1


def test_txn_compare_targets_on_missing_nodes(run):
    """A missing node compares as version 0, revisions 0, value None, exists false."""
    cs = (Compare("/m", "version", "==", 0), Compare("/m", "mod_revision", "==", 0),
          Compare("/m", "create_revision", "<", 1), Compare("/m", "value", "==", None),
          Compare("/m", "exists", "!=", True))
    assert run(Txn(cs, (Create("/m"),), ()))[0]["succeeded"]
    run(Mkdir("/d"))
    assert run(Txn((Compare("/d", "value", "==", None),), (), ()))[0]["succeeded"]
    assert not run(Txn((Compare("/q", "value", "<", b"z"),), (), ()))[0]["succeeded"]
    assert run(Txn((Compare("/m", "value", "<", b"z"),), (), ()))[0]["succeeded"]


def test_txn_without_change_consumes_no_revision(run):
    """A txn whose chosen branch is empty or changes nothing answers the current revision."""
    run(Create("/a"))
    assert run(Txn((Compare("/a", "exists", "==", False),), (Create("/b"),), ())) == \
        ({"revision": 1, "succeeded": False, "results": []}, [])
    res, ev = run(Txn((), (Mkdir("/", parents=True), Noop()), ()))
    assert res == {"revision": 1, "succeeded": True, "results": [{"revision": 1}] * 2}
    assert ev == [] and run.tree.revision == 1


# ------------------------------------------------------------------ dedupe

def test_dedupe_retry_answered_not_reapplied(run):
    """The same (client_id, seq) returns the remembered result without applying again."""
    r1, ev1 = run(Create("/a", b"x"), cid="c1", seq=1)
    assert r1 == {"revision": 1} and ev1
    r2, ev2 = run(Create("/a", b"x"), cid="c1", seq=1)
    assert r2 == r1 and ev2 == [] and run.tree.revision == 1
    # failed results are remembered too
    e1, _ = run(Delete("/zz"), cid="c1", seq=2)
    run(Create("/zz"))
    assert run(Delete("/zz"), cid="c1", seq=2)[0] == e1
    assert run.tree.exists("/zz")


def test_dedupe_stale_seq(run):
    """A lower seq answers stale_request and does not apply."""
    run(Create("/a"), cid="c", seq=5)
    res, ev = run(Create("/b"), cid="c", seq=4)
    assert code(res) == "stale_request" and ev == []
    assert res["error"]["details"] == {"client_id": "c", "seq": 4, "last_seq": 5}
    assert not run.tree.exists("/b")
    assert run(Create("/b"), cid="c", seq=6)[0] == {"revision": 2}


def test_dedupe_without_client_id(run):
    """An empty client_id disables dedupe."""
    run(Set("/a", b"1", upsert=True), cid="", seq=1)
    run(Set("/a", b"1", upsert=True), cid="", seq=1)
    assert run.tree.revision == 2 and run.tree.dedupe_size == 0


def test_dedupe_bounded_lru():
    """Beyond max clients the least recently stored entry is evicted first."""
    run = Runner(KeyTree(dedupe_max_clients=2))
    run(Create("/a"), cid="c1", seq=1)
    run(Create("/b"), cid="c2", seq=1)
    run(Create("/c"), cid="c1", seq=2)   # c1 refreshed: c2 is now oldest
    run(Create("/d"), cid="c3", seq=1)   # evicts c2
    assert run.tree.dedupe_size == 2
    run(Delete("/b"), cid="c2", seq=1)   # c2 forgotten: applied as new
    assert not run.tree.exists("/b")
    assert run(Create("/c"), cid="c1", seq=2)[1] == []  # c1 remembered


def test_dedupe_expires_by_command_time():
    """Entries older than the TTL of the state clock (max mtime_ns seen) are forgotten."""
    t = KeyTree(dedupe_ttl_ns=100)
    t.apply_command(Command("c", 1, 1000, 0, 0, Create("/a")))
    t.apply_command(Command("d", 1, 1050, 0, 0, Noop()))
    assert t.dedupe_size == 2
    t.apply_command(Command("e", 1, 1101, 0, 0, Noop()))
    assert t.dedupe_size == 2  # c expired
    # a clock going backwards (new leader) does not revive or re-date anything
    t.apply_command(Command("c", 1, 900, 0, 0, Delete("/a")))
    assert not t.exists("/a")


def test_dedupe_survives_snapshot():
    """The dedupe table, its bounds and the state clock are part of the snapshot."""
    t = KeyTree(dedupe_max_clients=3, dedupe_ttl_ns=10**9)
    r = t.apply_command(Command("c", 7, 5, 0, 0, Create("/a")))[0]
    t2 = KeyTree.restore(t.snapshot())
    assert t2.apply_command(Command("c", 7, 6, 0, 0, Create("/a")))[0] == r
    assert t2.snapshot() == KeyTree.restore(t2.snapshot()).snapshot()
    assert t2._dedupe_max == 3 and t2._dedupe_ttl == 10**9


# ------------------------------------------------------------------ snapshots

def _populate(run):
    run(Create("/svc/db/primary", b"10.0.0.1", parents=True), cid="a", seq=1)
    run(Create("/svc/db/replicas/r1", b"10.0.0.2", parents=True, mode=0o600), cid="b", seq=1)
    run(Chmod("/svc", uid=3))
    run(Set("/svc/db/primary", b"10.0.0.9"), cid="a", seq=2)
    run(Mkdir("/empty"))


def test_snapshot_roundtrip(run):
    """restore(snapshot()) reproduces the tree and the snapshot bytes exactly."""
    _populate(run)
    snap = run.tree.snapshot()
    t2 = KeyTree.restore(snap)
    assert t2.snapshot() == snap
    assert t2.walk("/") == run.tree.walk("/")
    assert t2.revision == run.tree.revision
    assert t2.state_hash() == run.tree.state_hash()
    assert KeyTree.restore(io.BytesIO(snap)).snapshot() == snap


def test_snapshot_checksum_detects_corruption(run):
    """A flipped payload bit raises StorageCorrupt; garbage and wrong versions are refused."""
    _populate(run)
    snap = bytearray(run.tree.snapshot())
    snap[-5] ^= 0x01
    with pytest.raises(StorageCorrupt, match="checksum"):
        KeyTree.restore(bytes(snap))
    with pytest.raises(StorageCorrupt):
        KeyTree.restore(b"garbage")
    with pytest.raises(StorageCorrupt):
        KeyTree.restore(msgpack.packb([1, 2]))
    ver, crc, payload = msgpack.unpackb(run.tree.snapshot())
    with pytest.raises(UnsupportedFormat):
        KeyTree.restore(msgpack.packb([99, crc, payload]))


def test_snapshot_structural_checks():
    """A checksummed but inconsistent payload (orphan node) is still refused."""
    import crc32c
    payload = msgpack.packb([1, [["/", 0, 0, 0, 0, 0, 0o755, 0, 0, None],
                                 ["/a/b", 1, 1, 1, 1, 0, 0o644, 0, 0, b""]], None])
    with pytest.raises(StorageCorrupt, match="orphan"):
        KeyTree.restore(msgpack.packb([1, crc32c.crc32c(payload), payload]))


def test_state_hash_changes_with_state(run):
    """state_hash differs after a change and ignores the dedupe table."""
    h0 = run.tree.state_hash()
    run(Create("/a"))
    h1 = run.tree.state_hash()
    assert h0 != h1
    run(Create("/a"), cid="x", seq=1)   # failure: only dedupe changes
    assert run.tree.state_hash() == h1


def test_determinism_same_commands_same_bytes():
    """Two trees fed the same commands produce identical results, events and snapshots."""
    outs = []
    for _ in range(2):
        r = Runner()
        log = []
        _populate(r)
        log.append(r(Txn((Compare("/svc/db/primary", "version", "==", 2),),
                         (Delete("/svc", recursive=True), Create("/x")), ())))
        outs.append((log, r.tree.snapshot()))
    assert outs[0] == outs[1]


# ------------------------------------------------------------------ replicas

def test_replica_via_events(run):
    """A replica built from the snapshot then event groups equals the source tree."""
    _populate(run)
    replica = KeyTree.restore(run.tree.snapshot())
    for op in (Delete("/svc/db", recursive=True), Create("/n/a/b", b"q", parents=True),
               Txn((), (Set("/n/a/b", b"r"), Chmod("/n", mode=0o700), Delete("/empty")), ()),
               Create("/n/a/b")):  # failure: no events
        res, ev = run(op)
        if ev:
            replica.apply_events(res["revision"], ev)
    assert replica.snapshot(include_dedupe=False) == run.tree.snapshot(include_dedupe=False)


def test_replica_rejects_gaps_and_bad_events_atomically(run):
    """apply_events refuses gaps and inconsistent groups and leaves the replica unchanged."""
    replica = KeyTree()
    _, ev1 = run(Create("/a", b"1"))
    _, ev2 = run(Create("/b", b"2"))
    with pytest.raises(RevisionGap):
        replica.apply_events(2, ev2)
    replica.apply_events(1, ev1)
    with pytest.raises(RevisionGap):
        replica.apply_events(1, ev1)
    before = replica.snapshot()
    bad = [ev2[0], Event(2, EventType.DELETED, "/zzz", ev2[0].stat, None)]
    with pytest.raises(InvalidInput):
        replica.apply_events(2, bad)
    assert replica.snapshot() == before
    meta_only = [Event(2, EventType.CREATED, "/b", ev2[0].stat, None)]
    with pytest.raises(InvalidInput, match="data"):
        replica.apply_events(2, meta_only)
    replica.apply_events(2, ev2)
    assert replica.snapshot(False) == run.tree.snapshot(False)


# ------------------------------------------------------------------ Raft adapter

def test_state_machine_adapter():
    """apply decodes commands, returns (result, events); b'' is Raft's no-op (no revision)."""
    fsm = TreeStateMachine()
    assert fsm.apply(1, b"") == (None, [])
    res, ev = fsm.apply(2, Command("c", 1, T0, 0, 0, Create("/a", b"x")).encode())
    assert res == {"revision": 1} and len(ev) == 1
    res, ev = fsm.apply(3, b"\xc1garbage")
    assert res["error"]["code"] == "invalid" and ev == []
    with pytest.raises(UnsupportedFormat):
        fsm.apply(4, msgpack.packb([2, "c", 1, 1, 1, 1, {"op": "noop"}]))
    with pytest.raises(ValueError):
        fsm.apply(3, b"")  # indexes must increase
    snap = fsm.snapshot()
    other = TreeStateMachine()
    other.restore(io.BytesIO(snap), index=10)
    assert other.revision == 1 and other.applied_index == 10
    assert other.tree.snapshot() == snap
