"""afs.client against the fake cluster (afs.testing.fakeserver): routing, retries, errors."""
from __future__ import annotations

import threading
import time

import pytest

from afs import errors, ops
from afs.client import Client, GetResult, WriteResult, plan_batches
from afs.limits import Limits
from afs.model import NodeKind
from afs.testing.fakeserver import FakeCluster


@pytest.fixture
def fc():
    with FakeCluster(3) as c:
        yield c


@pytest.fixture
def client(fc):
    with Client(fc.endpoints, timeout=2.0, connect_timeout=0.5) as c:
        yield c


def _writes(fc):
    return [(r["client_id"], r["seq"]) for r in fc.writes()]


# ---------------------------------------------------------------- basics

def test_crud_round_trip_returns_revisions(client):
    """Each write returns the committed revision; reads reflect it."""
    assert client.mkdir("/app/db", parents=True).revision == 1
    r = client.put("/app/db/primary", b"10.0.0.1")
    assert isinstance(r, WriteResult) and r.revision == 2 and int(r) == 2
    data, st = client.get("/app/db/primary")
    assert data == b"10.0.0.1" and st.kind is NodeKind.FILE and st.version == 1
    assert client.get("/app/db/primary").revision == 2
    assert client.set("/app/db/primary", b"x", if_version=1).revision == 3
    assert client.create("/app/new", b"").revision == 4
    assert [n for n, _ in client.list("/app")] == ["db", "new"]
    assert client.chmod("/app/new", mode=0o600, uid=7).revision == 5
    st = client.stat("/app/new")
    assert (st.mode, st.uid) == (0o600, 7)
    assert client.exists("/app/new") and not client.exists("/nope")
    walk = client.walk("/app")
    assert [p for p, _, _ in walk] == ["/app", "/app/db", "/app/db/primary", "/app/new"]
    assert walk[2][2] == b"x" and walk.revision == 5
    assert [p for p, _, d in client.walk("/app", data=False) if d is not None] == []
    assert client.delete("/app", recursive=True).revision == 6
    assert not client.exists("/app")


def test_get_result_unpacks_as_pair_and_carries_revision(client):
    """get() returns (data, stat) with a .revision attribute."""
    client.put("/k", b"v")
    res = client.get("/k")
    assert isinstance(res, GetResult) and len(res) == 2
    assert res.data == b"v" and res.stat.size == 1 and res.revision == 1


def test_txn_accepts_ops_objects_and_protocol_dicts(client):
    """txn() takes afs.ops objects or protocol dicts and reports the branch taken."""
    client.put("/a", b"1")
    res = client.txn([ops.Compare("/a", "value", "==", b"1")],
                     [{"op": "set", "path": "/a", "data": b"2"}, ops.Create("/b", b"")],
                     [])
    assert res.succeeded is True and res.revision == 2
    res = client.txn([{"path": "/a", "target": "version", "cmp": "==", "value": 99}],
                     [ops.Delete("/a")], [ops.Set("/c", b"3", upsert=True)])
    assert res.succeeded is False and client.get("/c")[0] == b"3" and client.exists("/a")


def test_seq_increments_per_write_with_one_client_id(fc, client):
    """Every write carries this client's id and the next seq."""
    for i in range(3):
        client.put(f"/k{i}", b"")
    cids = {c for c, _ in _writes(fc)}
    assert cids == {client.client_id} and [s for _, s in _writes(fc)] == [1, 2, 3]


# ---------------------------------------------------------------- routing

def test_write_follows_not_leader_redirect(fc):
    """A follower's not_leader with leader_addr sends the write straight to the leader."""
    with Client([fc.member("n2").addr], timeout=2) as c:
        assert c.put("/x", b"1").revision == 1
    seen = [(m, r["seq"]) for m, r in fc.requests if r["op"] == "write"]
    assert seen == [("n2", 1), ("n1", 1)]


def test_leader_change_is_followed(fc, client):
    """After a leader change the old leader redirects and the client follows."""
    client.put("/x", b"1")
    fc.set_leader("n3")
    assert client.put("/x", b"2").revision == 2
    assert [m for m, r in fc.requests if r["op"] == "write"][-2:] == ["n1", "n3"]
    assert client.get("/x")[0] == b"2"
    assert fc.requests[-1][0] == "n3"


def test_linearizable_read_goes_to_leader_stale_read_to_any(fc):
    """Reads go to the leader unless stale=True, which any member serves."""
    fc.set_leader("n1")
    with Client([fc.member("n3").addr], timeout=2) as c:
        c.put("/k", b"v")
        fc.requests.clear()
        assert c.get("/k", stale=True)[0] == b"v"
        assert [m for m, _ in fc.requests] == ["n1"]        # the open connection is reused
    with Client([fc.member("n3").addr], timeout=2) as c:
        fc.requests.clear()
        assert c.get("/k", stale=True)[0] == b"v"
        assert [m for m, _ in fc.requests] == ["n3"]        # no leader needed
        fc.requests.clear()
        c.get("/k")
        assert [m for m, _ in fc.requests] == ["n3", "n1"]  # redirected


def test_dead_endpoint_is_skipped(fc):
    """A refused connection moves on to the next endpoint."""
    fc.member("n2").stop()
    with Client([fc.member("n2").addr, fc.member("n1").addr], timeout=2) as c:
        assert c.put("/x", b"1").revision == 1


def test_no_leader_known_tries_other_endpoints(fc):
    """not_leader without an address makes the client try the next endpoint."""
    fc.inject_error(errors.NotLeader("no leader elected yet", leader="", leader_addr=""),
                    member="n1")
    with Client(fc.endpoints, timeout=2) as c:
        assert c.put("/x", b"1").revision == 1
    assert [m for m, r in fc.requests if r["op"] == "write"] == ["n1", "n2", "n1"]


# ---------------------------------------------------------------- retries

def test_retry_after_lost_response_keeps_client_id_and_seq(fc, client):
    """A write whose answer is lost is retried with the same (client_id, seq), applied once."""
    client.put("/before", b"")
    fc.drop_after_apply(1)
    res = client.put("/x", b"1")
    assert res.revision == 2 and fc.tree.revision == 2          # applied exactly once
    assert _writes(fc)[-2:] == [(client.client_id, 2), (client.client_id, 2)]
    assert client.put("/y", b"").revision == 3 and _writes(fc)[-1][1] == 3


def test_retry_on_unavailable_keeps_seq(fc, client):
    """Retryable errors (Unavailable family) are retried with the same (client_id, seq)."""
    fc.inject_error(errors.Unavailable("no quorum"), op="write", count=2)
    fc.inject_error(errors.ProposalDropped("dropped"), op="write", count=1)
    assert client.put("/x", b"1").revision == 1
    assert _writes(fc) == [(client.client_id, 1)] * 4


def test_retry_after_leader_crash_mid_write(fc):
    """The leader dies after applying; the retry at the new leader is answered, not re-applied."""
    with Client(fc.endpoints, timeout=3) as c:
        c.put("/a", b"")
        fc.drop_after_apply(1)
        orig = fc.tree.write

        def crash_then_write(req):
            r = orig(req)
            fc.member("n1").stop()
            fc.set_leader("n2")
            fc.tree.write = orig
            return r
        fc.tree.write = crash_then_write
        assert c.put("/b", b"1").revision == 2
    assert fc.tree.revision == 2
    assert [(m, r["seq"]) for m, r in fc.requests if r["op"] == "write"][-2:] == [("n1", 2),
                                                                                   ("n2", 2)]


def test_timeout_when_all_members_down_raises_unavailable(fc):
    """With nothing reachable the call gives up after `timeout` with Unavailable."""
    for m in fc.members:
        m.stop()
    with Client(fc.endpoints, timeout=0.6, connect_timeout=0.2) as c:
        t0 = time.monotonic()
        with pytest.raises(errors.Unavailable) as ei:
            c.put("/x", b"1")
        assert 0.5 <= time.monotonic() - t0 < 2.0
        assert "connection refused" in ei.value.message
        assert ei.value.exit_code == errors.ExitCode.UNAVAILABLE


def test_no_leader_times_out_as_unavailable(fc):
    """When no member knows a leader, the call ends in Unavailable naming the cause."""
    fc.set_leader(None)
    with Client(fc.endpoints, timeout=0.5) as c, pytest.raises(errors.Unavailable) as ei:
        c.put("/x", b"1")
    assert "no leader" in ei.value.message
    assert len(fc.writes()) >= 3 and len({r["seq"] for r in fc.writes()}) == 1


def test_slow_server_raises_timeout(fc):
    """A server slower than the deadline yields errors.Timeout (an Unavailable)."""
    fc.delay = 1.0
    with Client(fc.endpoints, timeout=0.4) as c, pytest.raises(errors.Timeout):
        c.get("/")
    fc.delay = 0


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("setup,call,cls", [
    (lambda c: None, lambda c: c.get("/nope"), errors.NotFound),
    (lambda c: c.put("/a", b""), lambda c: c.create("/a"), errors.AlreadyExists),
    (lambda c: c.put("/a", b""), lambda c: c.put("/a", b"x", if_version=5),
     errors.VersionMismatch),
    (lambda c: c.put("/d/f", b"", parents=True), lambda c: c.delete("/d"), errors.NotEmpty),
    (lambda c: c.put("/a", b""), lambda c: c.list("/a"), errors.NotADirectory),
    (lambda c: c.mkdir("/d"), lambda c: c.get("/d"), errors.IsADirectory),
    (lambda c: c.put("/a", b""), lambda c: c.set("/b", b""), errors.NotFound),
])
def test_domain_errors_come_back_as_their_classes(client, setup, call, cls):
    """Server error frames are rebuilt into the matching afs.errors class."""
    setup(client)
    with pytest.raises(cls):
        call(client)


@pytest.mark.parametrize("exc", [errors.PermissionDenied("no", path="/a"),
                                 errors.Compacted("gone", revision=3),
                                 errors.ReadOnly("ro"), errors.StaleRequest("old"),
                                 errors.RequestTooLarge("big", limit=1)])
def test_injected_errors_keep_class_and_details(fc, client, exc):
    """Any wire error keeps its class, message and details; non-retryable ones are not retried."""
    fc.inject_error(exc, op="get")
    with pytest.raises(type(exc)) as ei:
        client.get("/")
    assert ei.value.message == exc.message and ei.value.details == exc.details
    assert [r["op"] for _, r in fc.requests] == ["get"]


def test_unknown_error_code_becomes_afs_error(fc, client):
    fc.inject_error({"code": "martian", "message": "??"}, op="get")
    with pytest.raises(errors.AfsError) as ei:
        client.get("/")
    assert type(ei.value) is errors.AfsError and "martian" in ei.value.message


def test_txn_branch_error_carries_op_index(client):
    client.put("/a", b"")
    with pytest.raises(errors.AlreadyExists) as ei:
        client.txn([], [ops.Create("/b"), ops.Create("/a")])
    assert ei.value.details["op_index"] == 1 and not client.exists("/b")


# ---------------------------------------------------------------- client-side validation

@pytest.mark.parametrize("call,cls", [
    (lambda c: c.get("relative"), errors.InvalidPath),
    (lambda c: c.get("/a/../b"), errors.InvalidPath),
    (lambda c: c.put("/a//b", b""), errors.InvalidPath),
    (lambda c: c.put("/.afs/x", b""), errors.ReservedPath),
    (lambda c: c.put("/" + "/".join("d" * 65), b""), errors.PathTooDeep),
    (lambda c: c.put("/a", b"x" * (1024 * 1024 + 1)), errors.ValueTooLarge),
    (lambda c: c.put("/a", "text"), errors.InvalidInput),
    (lambda c: c.mkdir("/a", mode=0o17777), errors.InvalidInput),
    (lambda c: c.chmod("/a"), errors.InvalidInput),
    (lambda c: c.txn([], [ops.Create(f"/f{i}") for i in range(257)]), errors.TooManyOps),
    (lambda c: c.txn([], [{"op": "txn"}]), errors.InvalidInput),
    (lambda c: c.txn([], [{"op": "bogus", "path": "/a"}]), errors.InvalidInput),
    (lambda c: c.txn([{"path": "/a", "target": "size", "cmp": "==", "value": 1}], []),
     errors.InvalidInput),
    (lambda c: c.txn([], [ops.Set(f"/f{i}", b"x" * 1_000_000) for i in range(5)]),
     errors.RequestTooLarge),
])
def test_bad_input_never_leaves_the_client(fc, client, call, cls):
    """Invalid input raises InvalidInput (subclass) and sends nothing."""
    with pytest.raises(cls):
        call(client)
    assert fc.requests == []


def test_bad_endpoints_rejected():
    with pytest.raises(errors.InvalidInput):
        Client("nohostport")
    with pytest.raises(errors.InvalidInput):
        Client([])


def test_plan_batches_splits_by_count_and_size():
    """plan_batches keeps order, respects max_txn_ops and max_request_bytes."""
    lim = Limits(max_value_bytes=100, max_request_bytes=1000, max_txn_ops=10)
    small = [{"op": "mkdir", "path": f"/d{i}"} for i in range(25)]
    assert [len(b) for b in plan_batches(small, lim)] == [10, 10, 5]
    big = [ops.Set(f"/f{i}", b"x" * 100) for i in range(25)]
    batches = plan_batches(big, lim)
    assert all(sum(len(o.data) + len(o.path) for o in b) <= 1000 for b in batches)
    assert [o.path for b in batches for o in b] == [o.path for o in big]
    with pytest.raises(errors.ValueTooLarge):
        plan_batches([ops.Set("/x", b"x" * 101)], lim)


# ---------------------------------------------------------------- cluster / threads

def test_status_and_cluster_status(fc, client):
    """status() answers for one member; cluster_status() lists every member, marking dead ones."""
    st = client.status(fc.member("n2").addr)
    assert st["name"] == "n2" and st["role"] == "follower" and st["leader"] == "n1"
    assert client.status()["endpoint"] in fc.endpoints
    fc.member("n3").stop()
    rows = client.cluster_status()
    assert [r.get("name") for r in rows] == ["n1", "n2", "n3"]
    assert "error" in rows[2] and rows[0]["role"] == "leader"


def test_cluster_status_discovers_members_beyond_endpoints(fc):
    with Client([fc.member("n2").addr], timeout=2) as c:
        assert sorted(r["name"] for r in c.cluster_status()) == ["n1", "n2", "n3"]


def test_cluster_status_all_down_is_unavailable(fc):
    for m in fc.members:
        m.stop()
    with Client(fc.endpoints, timeout=0.5, connect_timeout=0.2) as c:
        with pytest.raises(errors.Unavailable):
            c.cluster_status()


def test_client_is_thread_safe(fc, client):
    """Concurrent writes from many threads all succeed with distinct seqs and revisions."""
    revs, errs = [], []

    def work(t):
        try:
            for i in range(15):
                revs.append(client.put(f"/t{t}/{i}", b"x", parents=True).revision)
        except Exception as exc:  # noqa: BLE001
            errs.append(exc)
    threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errs and sorted(revs) == list(range(1, 91))
    assert sorted(s for _, s in _writes(fc)) == list(range(1, 91))
