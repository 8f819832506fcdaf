"""Watches end to end against real server (and agent) processes: every watcher's stream is
compared with the committed history — same revisions, same order, same data, a transaction as
one group, each revision exactly once — across kill -9 of the watched member, leader change,
client disconnects at random points, and agent restart; compaction is an explicit error."""
from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from afs import errors, ops
from afs.client import Client
from afs.model import EventType, NodeKind
from afs.testing.cluster import wait_for_port  # noqa: F401  (harness is shared)

pytestmark = pytest.mark.integration


# ---------------------------------------------------------------- helpers

class Collector:
    """Iterates a Watch on a thread and keeps every group it yields."""

    def __init__(self, watch):
        self.watch = watch
        self.groups = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            for g in self.watch:
                self.groups.append(g)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    @property
    def last(self) -> int:
        return self.groups[-1].revision if self.groups else 0

    def wait_for(self, revision: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.last < revision and time.monotonic() < deadline and self.error is None:
            time.sleep(0.02)
        assert self.error is None, f"watch failed: {self.error!r}"
        assert self.last >= revision, f"watcher at {self.last}, expected {revision}"

    def stop(self):
        self.watch.cancel()
        self.thread.join(10)
        assert not self.thread.is_alive()


def shape(groups):
    return [(g.revision, [(e.type.value, e.path, e.data, e.stat.version) for e in g.events])
            for g in groups]


def reference(endpoints, prefix, start, upto):
    """The committed history of ``prefix`` from ``start`` to ``upto``, read afresh."""
    out = []
    with Client(endpoints).watch(prefix, start) as w:
        for g in w:
            out.append(g)
            if g.revision >= upto:
                break
    return out


def check(cl_endpoints, client, prefix, start, groups, acked):
    """The stream equals the committed history, contains every acknowledged write, and
    replays to the final state."""
    revs = [g.revision for g in groups]
    assert revs == sorted(set(revs)), "out of order or duplicated revisions"
    assert groups and revs[0] >= start
    ref = reference(cl_endpoints, prefix, start, revs[-1])
    assert shape(groups) == shape(ref)
    by_rev = {g.revision: g for g in groups}
    for rev, expect in acked:
        assert rev in by_rev, f"acknowledged revision {rev} missing"
        got = {(e.path, e.data) for e in by_rev[rev].events}
        assert set(expect) <= got, f"revision {rev}: {expect} not in {got}"
    files = {}
    for g in groups:
        for e in g.events:
            if e.type is EventType.DELETED:
                files = {p: d for p, d in files.items() if p != e.path and not p.startswith(e.path + "/")}
            elif e.stat.kind is NodeKind.FILE:
                files[e.path] = e.data
    walked = client.walk(prefix)
    assert walked.revision >= revs[-1]
    final = {p: d for p, st, d in walked if st.kind is NodeKind.FILE}
    assert files == final


class Writer:
    """Writes puts and 2-op transactions under ``prefix``; records acknowledged writes."""

    def __init__(self, client, prefix, seed=1):
        self.c = client
        self.prefix = prefix
        self.rnd = random.Random(seed)
        self.acked: list[tuple[int, list]] = []
        self.i = 0

    def step(self):
        self.i += 1
        k = f"{self.prefix}/k{self.rnd.randrange(6)}"
        v = f"v{self.i}".encode()
        try:
            if self.i % 5 == 0:
                k2 = f"{self.prefix}/t{self.i % 3}"
                r = self.c.txn(then=[ops.Set(k, v, upsert=True), ops.Set(k2, v + b"t", upsert=True)])
                self.acked.append((r.revision, [(k, v), (k2, v + b"t")]))
            elif self.i % 11 == 0:
                self.c.delete(k)
                # a delete of a missing key changes nothing (no revision): not recorded
            else:
                r = self.c.put(k, v)
                self.acked.append((r.revision, [(k, v)]))
        except errors.NotFound:
            pass
        except errors.Unavailable:
            pass            # unknown outcome: the history comparison still covers it

    @property
    def last(self) -> int:
        return max((r for r, _ in self.acked), default=0)


# ---------------------------------------------------------------- cluster scenarios

@pytest.mark.parametrize("victim", ["follower", "leader"])
def test_exactly_once_across_kill9_of_watched_member(make_cluster, victim):
    """kill -9 of the member a watcher streams from (a follower; the leader, which also
    changes leadership), then its restart: the watcher resumes elsewhere, no gap, no dup."""
    cl = make_cluster(fsync=False)
    leader = cl.wait_for_leader(20)
    name = leader if victim == "leader" else next(n for n in cl.names if n != leader)
    others = [cl.member(n).client_addr for n in cl.names if n != name]
    with cl.client(timeout=15) as c:
        base = c.mkdir("/kw", parents=True).revision
        col = Collector(Client([cl.member(name).client_addr, *others]).watch(
            "/kw", base + 1, reconnect_timeout=30))
        assert col.watch.endpoint == cl.member(name).client_addr
        wr = Writer(c, "/kw", seed=hash(victim) & 0xFF)
        for _ in range(40):
            wr.step()
        cl.kill(name)
        if victim == "leader":
            cl.wait_for_leader(20, exclude=[name])
        for _ in range(40):
            wr.step()
        cl.restart(name)
        for _ in range(40):
            wr.step()
        col.wait_for(wr.last)
        col.stop()
        assert col.watch.reconnects >= 1
        check(cl.endpoints, c, "/kw", base + 1, col.groups, wr.acked)


def test_exactly_once_with_random_client_disconnects(shared_cluster):
    """The watcher's connection is cut at random moments (also mid-frame); every revision
    still arrives once, in order, with its data."""
    cl = shared_cluster
    rnd = random.Random(7)
    with cl.client(timeout=15) as c:
        base = c.mkdir("/cut", parents=True).revision
        col = Collector(Client(cl.endpoints).watch("/cut", base + 1, reconnect_timeout=30))
        stop = threading.Event()

        def cutter():
            while not stop.is_set():
                time.sleep(rnd.uniform(0.005, 0.08))
                conn = col.watch._conn
                if conn is not None:
                    try:
                        conn.sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        t = threading.Thread(target=cutter, daemon=True)
        t.start()
        wr = Writer(c, "/cut", seed=3)
        for _ in range(150):
            wr.step()
        stop.set()
        t.join()
        col.wait_for(wr.last)
        col.stop()
        assert col.watch.reconnects >= 5
        check(cl.endpoints, c, "/cut", base + 1, col.groups, wr.acked)
        # negative controls: the check notices a gap and a duplicate
        g = col.groups
        for bad in (g[:5] + g[6:], g[:5] + [g[4]] + g[5:]):
            with pytest.raises(AssertionError):
                check(cl.endpoints, c, "/cut", base + 1, bad, wr.acked)


def test_transaction_arrives_as_one_group_and_prefix_is_componentwise(shared_cluster):
    cl = shared_cluster
    with cl.client() as c:
        c.mkdir("/grp", parents=True)
        with Client(cl.endpoints).watch("/grp/a") as w:
            c.put("/grp/ab", b"not mine")
            r = c.txn(then=[ops.Set("/grp/a/x", b"1", upsert=True, parents=True),
                            ops.Set("/grp/b", b"2", upsert=True),
                            ops.Set("/grp/a/y", b"3", upsert=True)])
            g = next(w)
        assert g.revision == r.revision
        assert [(e.path, e.data) for e in g if e.stat.kind is NodeKind.FILE] == \
            [("/grp/a/x", b"1"), ("/grp/a/y", b"3")]


def test_start_none_means_from_now_and_client_keeps_working(shared_cluster):
    """A watch from 'now' sees only later writes; the Client's own calls still work while a
    watch streams (the watch has its own connection)."""
    cl = shared_cluster
    with cl.client() as c:
        c.put("/now/a", b"old", parents=True)
        w = c.watch("/now")
        r = c.put("/now/a", b"new")
        assert c.get("/now/a").data == b"new"
        g = next(w)
        w.cancel()
        assert g.revision == r.revision and g.events[0].data == b"new"
        assert list(w) == []


def test_compacted_is_an_explicit_error(make_cluster):
    """Asking for a revision that left every member's history raises Compacted (client) and
    exits COMPACTED with one clear line (CLI)."""
    from tests.integration.conftest import AfsCli
    cl = make_cluster(env={"AFS_SERVER_HISTORY_REVISIONS": "10"}, fsync=False)
    with cl.client() as c:
        for i in range(30):
            last = c.put("/cmp/k", str(i).encode(), parents=True).revision
        # a lagging member still holds the early revisions and may legitimately answer:
        # wait until every member has trimmed its history past them
        cl.wait_for_revision(last)
        with pytest.raises(errors.Compacted) as ei:
            c.watch("/cmp", 2)
        assert "no longer in history" in ei.value.message
        last = c.get("/cmp/k").revision
        with c.watch("/cmp", last - 5) as w:
            assert next(w).revision == last - 5
    res = AfsCli(cl.endpoints)("watch", "/cmp", "--from", "1")
    assert res.code == errors.ExitCode.COMPACTED
    assert res.err.startswith("afs: ") and "no longer in history" in res.err and res.err.count("\n") == 1


def _afs_proc(args, endpoints, **kw):
    from tests.integration.conftest import afs_command
    env = dict(os.environ, AFS_ENDPOINTS=",".join(endpoints), PYTHONUNBUFFERED="1")
    env.pop("AFS_CONFIG", None)
    return subprocess.Popen([*afs_command(), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **kw)


def _read_lines(stream, n, timeout=20.0):
    import selectors
    sel = selectors.DefaultSelector()
    sel.register(stream, selectors.EVENT_READ)
    lines = []
    buf = b""
    deadline = time.monotonic() + timeout
    while len(lines) < n and time.monotonic() < deadline:
        if sel.select(0.2):
            chunk = os.read(stream.fileno(), 65536)
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                lines.append(line.decode())
    return lines


def test_cli_watch_json_text_exec_and_ctrl_c(shared_cluster, tmp_path):
    """``afs watch -o json`` prints one object per event; text mode one line per event;
    --exec gets AFS_* and the value on stdin; SIGINT (Ctrl-C) exits 0."""
    import json
    cl = shared_cluster
    with cl.client() as c:
        base = c.mkdir("/cliw", parents=True).revision
        pj = _afs_proc(["watch", "/cliw", "--from", str(base + 1), "-o", "json"], cl.endpoints)
        pt = _afs_proc(["watch", "/cliw", "--from", str(base + 1)], cl.endpoints)
        out = tmp_path / "exec.log"
        pe = _afs_proc(["watch", "/cliw", "--from", str(base + 1), "--exec",
                        f'printf "%s %s %s " "$AFS_REVISION" "$AFS_TYPE" "$AFS_PATH" >> {out}; '
                        f'cat >> {out}; echo >> {out}'], cl.endpoints)
        try:
            r1 = c.put("/cliw/a", b"hello")
            r2 = c.put("/cliw/bin", b"\xff\x00")
            r3 = c.delete("/cliw/a")
            js = [json.loads(x) for x in _read_lines(pj.stdout, 3)]
            tx = _read_lines(pt.stdout, 3)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and (not out.exists() or out.read_bytes().count(b"\n") < 3):
                time.sleep(0.05)
        finally:
            for p in (pj, pt, pe):
                p.send_signal(signal.SIGINT)
            codes = [p.wait(20) for p in (pj, pt, pe)]
    assert js == [
        {"revision": r1.revision, "type": "created", "path": "/cliw/a", "version": 1, "value": "hello"},
        {"revision": r2.revision, "type": "created", "path": "/cliw/bin", "version": 1, "value_b64": "/wA="},
        {"revision": r3.revision, "type": "deleted", "path": "/cliw/a", "version": js[2]["version"], "value": None},
    ]
    assert tx[0] == f'{r1.revision} created /cliw/a version=1 value="hello"'
    assert tx[2] == f"{r3.revision} deleted /cliw/a"
    lines = out.read_bytes().split(b"\n")
    assert lines[0] == f"{r1.revision} created /cliw/a hello".encode()
    assert lines[1] == f"{r2.revision} created /cliw/bin ".encode() + b"\xff\x00"
    assert codes == [0, 0, 0], [p.stderr.read() for p in (pj, pt, pe)]


# ---------------------------------------------------------------- the agent's local socket

class AgentProc:
    def __init__(self, base, endpoints):
        self.dir = str(base)
        self.sock = os.path.join(self.dir, "agent.sock")
        self.endpoints = endpoints
        self.proc = None

    def start(self):
        from tests.integration.conftest import afs_command
        log = open(os.path.join(self.dir, "agent.log"), "ab")
        self.proc = subprocess.Popen(
            [*afs_command(), "agent", "--endpoints", ",".join(self.endpoints), "--cache-dir",
             os.path.join(self.dir, "cache"), "--socket", self.sock],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                Client.local(self.sock, timeout=1).status()
                return
            except errors.AfsError:
                assert self.proc.poll() is None, self.log()
                time.sleep(0.05)
        raise AssertionError("agent socket did not come up\n" + self.log())

    def log(self):
        with open(os.path.join(self.dir, "agent.log"), errors="replace") as fh:
            return fh.read()[-3000:]

    def kill(self, sig=signal.SIGKILL):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(15)


@pytest.fixture
def agent_factory(tmp_path):
    made = []

    def make(endpoints, name="agent"):
        d = tmp_path / name
        d.mkdir()
        a = AgentProc(d, endpoints)
        made.append(a)
        a.start()
        return a

    yield make
    for a in made:
        a.kill(signal.SIGTERM)


def test_local_watchers_share_one_stream_and_survive_agent_restart(shared_cluster, agent_factory):
    """Several watchers on the agent's socket cost the cluster one stream; across kill -9 and
    restart of the agent each resumes exactly once, in order, against committed history."""
    cl = shared_cluster
    with cl.client(timeout=15) as c:
        base = c.mkdir("/agw", parents=True).revision
        before = sum(s.get("watchers", 0) for s in cl.status().values() if isinstance(s, dict))
        agent = agent_factory(cl.endpoints)
        cols = [Collector(Client.local(agent.sock).watch("/agw", base + 1, reconnect_timeout=30))
                for _ in range(4)]
        wr = Writer(c, "/agw", seed=11)
        for _ in range(30):
            wr.step()
        for col in cols:
            col.wait_for(wr.last)
        after = sum(s.get("watchers", 0) for s in cl.status().values() if isinstance(s, dict))
        assert after - before == 1, "local watchers must cost the cluster one stream"
        assert Client.local(agent.sock).status()["watchers"] == 4
        agent.kill(signal.SIGKILL)
        for _ in range(30):
            wr.step()
        agent.start()
        for _ in range(30):
            wr.step()
        for col in cols:
            col.wait_for(wr.last)
            col.stop()
            assert col.watch.reconnects >= 1
            check(cl.endpoints, c, "/agw", base + 1, col.groups, wr.acked)


def test_local_socket_serves_watch_status_only_and_replays_history(shared_cluster, agent_factory):
    cl = shared_cluster
    agent = agent_factory(cl.endpoints, "agent2")
    lc = Client.local(agent.sock, timeout=2)
    with pytest.raises(errors.InvalidInput):
        lc.get("/x", stale=True)
    with cl.client() as c:
        for i in range(3):
            c.put("/agc/k", str(i).encode(), parents=True)
        rev = c.get("/agc/k").revision
    deadline = time.monotonic() + 10
    while lc.status()["revision"] < rev and time.monotonic() < deadline:
        time.sleep(0.05)
    with lc.watch("/agc", rev) as w:       # inside the warm-up window: replayed
        assert next(w).revision == rev
