"""Operating a server: clean SIGTERM stop, /health and /metrics, server-side input checks
(nothing invalid is ever proposed), write de-duplication by (client_id, seq) across a leader
crash, and ``afs dev-cluster``."""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from afs import errors, wire
from afs.testing.cluster import ProcessCluster, wait_for_port

pytestmark = pytest.mark.integration

MiB = 1024 * 1024


class Raw:
    """A raw client-port connection speaking afs.wire frames (no client-side validation)."""

    def __init__(self, addr: str, timeout: float = 10.0):
        host, _, port = addr.rpartition(":")
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        self.rfile = self.sock.makefile("rb")
        self.ids = iter(range(1, 1 << 30))

    def send(self, req: dict) -> int:
        req = {"id": next(self.ids), **req}
        self.sock.sendall(wire.encode_frame(req))
        return req["id"]

    def recv(self) -> dict:
        frame = wire.read_frame_sync(self.rfile, 64 << 20)
        if frame is None:
            raise ConnectionError("server closed the connection")
        return frame

    def call(self, req: dict) -> dict:
        rid = self.send(req)
        while True:
            resp = self.recv()
            if resp.get("id") == rid:
                return resp

    def close(self) -> None:
        self.rfile.close()
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_req(client_id: str, seq: int, cmd: dict) -> dict:
    return {"op": "write", "client_id": client_id, "seq": seq, "cmd": cmd}


def create_cmd(path: str, data: bytes = b"x") -> dict:
    return {"op": "create", "path": path, "data": data, "mode": None, "parents": False}


def http_get(addr: str, path: str, method: str = "GET") -> tuple[int, bytes]:
    req = urllib.request.Request(f"http://{addr}{path}", method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def leader_revision(cl: ProcessCluster) -> int:
    with cl.client() as c:
        return c.stat_with_revision("/")[1]


# ---------------------------------------------------------------- stopping

def test_sigterm_stops_member_cleanly(cluster):
    """SIGTERM: a follower and then the leader exit 0 and log `event=stopped`; the rest of the
    cluster keeps serving, and both come back with their data."""
    leader = cluster.wait_for_leader(5)
    follower = next(n for n in cluster.names if n != leader)
    with cluster.client() as c:
        c.put("/t/a", b"1", parents=True)
    assert cluster.stop(follower) == 0
    assert "event=stopped" in cluster.member(follower).log_text()
    assert cluster.stop(leader) == 0
    log = cluster.member(leader).log_text()
    assert "event=signal" in log and "signal=SIGTERM" in log and "event=stopped" in log
    assert "Traceback" not in log
    cluster.start()
    cluster.wait_for_leader(20)
    with cluster.client() as c:
        assert c.get("/t/a").data == b"1"
        rev = c.put("/t/b", b"2").revision
    cluster.wait_for_revision(rev)


# ---------------------------------------------------------------- HTTP

def test_health_and_metrics(cluster):
    """/health is 200 with a leader (503 without); /metrics is Prometheus text with the raft
    gauges and request counters."""
    leader = cluster.wait_for_leader(5)
    with cluster.client() as c:
        rev = c.put("/h", b"x").revision
        c.get("/h")
    cluster.wait_for_revision(rev)
    for name, m in cluster.members.items():
        code, body = http_get(m.http_addr, "/health")
        info = json.loads(body)
        assert code == 200 and info["healthy"] is True, (name, info)
        assert info["name"] == name and info["leader"] == leader and info["revision"] >= rev
    code, body = http_get(cluster.member(leader).http_addr, "/metrics")
    assert code == 200
    text = body.decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            values[key] = float(value)
    for gauge in ("afs_term", "afs_commit_index", "afs_applied_index", "afs_revision"):
        assert gauge in values, gauge
        assert f"# TYPE {gauge} gauge" in text
    assert values["afs_revision"] >= rev and values["afs_applied_index"] >= values["afs_revision"]
    assert values["afs_is_leader"] == 1
    assert values['afs_requests_total{op="write",outcome="ok"}'] >= 1
    assert values['afs_requests_total{op="get",outcome="ok"}'] >= 1
    assert "# TYPE afs_requests_total counter" in text
    assert http_get(cluster.member(leader).http_addr, "/nope")[0] == 404
    assert http_get(cluster.member(leader).http_addr, "/health", method="POST")[0] == 405
    # the last member standing loses its leader (CheckQuorum / election) and says so
    others = [n for n in cluster.names if n != leader]
    cluster.stop(others[0])
    cluster.stop(others[1])
    deadline = time.monotonic() + 10
    while True:
        code, body = http_get(cluster.member(leader).http_addr, "/health")
        if code == 503:
            assert json.loads(body)["healthy"] is False
            break
        assert time.monotonic() < deadline, f"/health still {code} {body!r} without a quorum"
        time.sleep(0.2)


# ---------------------------------------------------------------- server-side validation

def _txn(then: list, compare: list | None = None) -> dict:
    return {"op": "txn", "compare": compare or [], "then": then, "else": []}


def _set(path: str, data: bytes) -> dict:
    return {"op": "set", "path": path, "data": data, "upsert": True, "parents": False}


BAD_WRITES = [
    pytest.param(create_cmd("relative/x"), id="relative-path"),
    pytest.param(create_cmd("/v/a//b"), id="empty-component"),
    pytest.param(create_cmd("/v/../x"), id="dotdot"),
    pytest.param(create_cmd("/v/a\x00b"), id="nul"),
    pytest.param(create_cmd("/v/" + "n" * 256), id="long-name"),
    pytest.param(create_cmd("/.afs"), id="reserved"),
    pytest.param(create_cmd("/" + "/".join(["d"] * 65)), id="depth-65"),
    pytest.param(create_cmd("/v/big", b"x" * (MiB + 1)), id="value-over-1MiB"),
    pytest.param(_txn([_set(f"/v/r{i}", b"y" * (MiB - 64)) for i in range(5)]), id="request-over-4MiB"),
    pytest.param(_txn([_set(f"/v/o{i}", b"") for i in range(257)]), id="txn-257-ops"),
    pytest.param(_txn([_txn([])]), id="nested-txn"),
    pytest.param({"op": "create", "path": "/v/m", "data": b"", "mode": 0o77777}, id="mode-out-of-range"),
    pytest.param({"op": "chmod", "path": "/v", "mode": "0644"}, id="mode-string"),
    pytest.param({"op": "frobnicate", "path": "/v"}, id="unknown-op"),
    pytest.param({"op": "create", "path": "/v/x", "data": "text, not bytes"}, id="data-not-bytes"),
    pytest.param("not a map", id="cmd-not-map"),
    pytest.param(_txn([], compare=[{"path": "/v", "target": "colour", "cmp": "==", "value": 1}]),
                 id="bad-compare"),
]


@pytest.fixture(scope="module")
def v_cluster(shared_cluster):
    with shared_cluster.client() as c:
        c.mkdir("/v", parents=True)
    return shared_cluster


@pytest.mark.parametrize("cmd", BAD_WRITES)
def test_server_rejects_bad_writes_before_proposing(v_cluster, cmd):
    """A bad write sent straight to the leader (no client-side checks) is answered with an
    `invalid`-family error and nothing is applied (the revision does not move)."""
    leader = v_cluster.wait_for_leader(5)
    before = leader_revision(v_cluster)
    with Raw(v_cluster.member(leader).client_addr) as raw:
        resp = raw.call(write_req("bad-input", 1, cmd))
    assert "error" in resp, resp
    err = errors.from_wire(resp["error"])
    assert isinstance(err, errors.InvalidInput), resp["error"]
    assert leader_revision(v_cluster) == before


BAD_REQUESTS = [
    pytest.param({"op": "write", "seq": 1, "cmd": create_cmd("/v/x")}, id="no-client-id"),
    pytest.param(write_req("c", 0, create_cmd("/v/x")), id="seq-zero"),
    pytest.param(write_req("c" * 129, 1, create_cmd("/v/x")), id="client-id-too-long"),
    pytest.param({"op": "get", "path": "/v", "stale": "yes"}, id="stale-not-bool"),
    pytest.param({"op": "get", "path": 7}, id="path-not-string"),
    pytest.param({"op": "stat", "path": "/v/./x"}, id="read-bad-path"),
    pytest.param({"op": "list", "path": "/" + "/".join(["d"] * 65)}, id="read-too-deep"),
    pytest.param({"op": "launch-missiles"}, id="unknown-op"),
]


@pytest.mark.parametrize("req", BAD_REQUESTS)
def test_server_rejects_malformed_requests(v_cluster, req):
    """Malformed requests get an `invalid`-family error on a connection that stays usable."""
    leader = v_cluster.wait_for_leader(5)
    before = leader_revision(v_cluster)
    with Raw(v_cluster.member(leader).client_addr) as raw:
        resp = raw.call(req)
        assert isinstance(errors.from_wire(resp["error"]), errors.InvalidInput), resp
        assert "ok" in raw.call({"op": "status"})
    assert leader_revision(v_cluster) == before


def test_oversized_frame_is_refused_and_connection_closed(v_cluster):
    """A frame over the 8 MiB client limit is answered with request_too_large (read from the
    length header, before the payload) and the connection is closed; nothing is applied."""
    leader = v_cluster.wait_for_leader(5)
    before = leader_revision(v_cluster)
    with Raw(v_cluster.member(leader).client_addr) as raw:
        raw.sock.sendall((wire.MAX_CLIENT_FRAME + 1).to_bytes(4, "big"))
        resp = raw.recv()
        assert resp["error"]["code"] == "request_too_large", resp
        with pytest.raises((ConnectionError, OSError)):
            raw.recv()
    assert leader_revision(v_cluster) == before


# ---------------------------------------------------------------- de-duplication

def test_retry_after_leader_crash_is_answered_not_reapplied(cluster):
    """A write committed just before the leader is killed, retried with the same
    (client_id, seq) on the new leader, gets the original answer and is not applied again."""
    leader = cluster.wait_for_leader(5)
    with cluster.client() as c:
        c.mkdir("/d")
    req = write_req("dedupe-client", 1, create_cmd("/d/once", b"payload"))
    with Raw(cluster.member(leader).client_addr) as raw:
        first = raw.call(req)
    rev = first["ok"]["revision"]
    cluster.wait_for_revision(rev)        # on every member, so it survives the leader
    cluster.kill(leader)
    new = cluster.wait_for_leader(20, exclude=[leader])
    with Raw(cluster.member(new).client_addr) as raw:
        again = raw.call(req)
        assert again.get("ok", again).get("revision") == rev, again
        st = raw.call({"op": "stat", "path": "/d/once"})["ok"]
        assert st["stat"]["version"] == 1 and st["stat"]["create_revision"] == rev
        assert st["revision"] == rev                       # nothing else was applied
        # a genuinely new request (next seq) is applied normally
        nxt = raw.call(write_req("dedupe-client", 2, create_cmd("/d/once")))
        assert nxt["error"]["code"] == "exists"


def test_client_retry_with_same_seq_is_idempotent(shared_cluster):
    """The Client's own retry path: re-sending its last (client_id, seq) returns the same
    revision and changes nothing."""
    with shared_cluster.client(client_id="idem-client") as c:
        r1 = c.create("/idem", b"1")
        c._seq -= 1                       # make the next write reuse the same seq
        r2 = c.create("/idem", b"1")
        assert r2.revision == r1.revision
        st, rev = c.stat_with_revision("/idem")
        assert st.version == 1 and rev == r1.revision


def test_pipelined_writes_retried_after_leader_kill_apply_once(cluster):
    """40 pipelined creates (each its own client_id) are cut off by kill -9 of the leader;
    retrying all of them on the new leader applies each exactly once: every retry succeeds
    (a re-applied create would say `exists`) and the revision grows by exactly 40."""
    leader = cluster.wait_for_leader(5)
    with cluster.client() as c:
        base = c.mkdir("/burst").revision
    n = 40
    reqs = [write_req(f"burst-{k}", 1, create_cmd(f"/burst/{k:03d}", f"v{k}".encode()))
            for k in range(n)]
    raw = Raw(cluster.member(leader).client_addr)
    for r in reqs:
        raw.send(r)
    answered = [raw.recv() for _ in range(5)]   # some are surely committed before the crash
    cluster.kill(leader)
    raw.close()
    assert all("ok" in a for a in answered), answered
    new = cluster.wait_for_leader(20, exclude=[leader])
    results = {}
    with Raw(cluster.member(new).client_addr, timeout=30) as raw2:
        pending = {}
        for k, r in enumerate(reqs):
            pending[raw2.send(r)] = k
        deadline = time.monotonic() + 30
        while pending and time.monotonic() < deadline:
            resp = raw2.recv()
            k = pending.pop(resp["id"], None)
            if k is None:
                continue
            if "error" in resp and errors.from_wire(resp["error"]).retryable:
                time.sleep(0.1)
                pending[raw2.send(reqs[k])] = k          # same (client_id, seq)
                continue
            results[k] = resp
    assert len(results) == n, f"no answer for {sorted(set(range(n)) - set(results))}"
    bad = {k: r for k, r in results.items() if "ok" not in r}
    assert not bad, bad
    for a in answered:        # acknowledged before the crash: the retry gets the same answer
        k = a["id"] - 1                   # raw ids are 1, 2, ... in the order of reqs
        assert results[k]["ok"]["revision"] == a["ok"]["revision"], (k, a, results[k])
    cluster.restart(leader)
    with cluster.client() as c:
        nodes = c.walk("/burst", data=True)
    assert nodes.revision == base + n
    by_path = {p: (st, d) for p, st, d in nodes[1:]}
    for k in range(n):
        st, d = by_path[f"/burst/{k:03d}"]
        assert d == f"v{k}".encode() and st.version == 1
        assert st.create_revision == results[k]["ok"]["revision"]


# ---------------------------------------------------------------- afs dev-cluster

def _free_base_port() -> int:
    for _ in range(200):
        base = random.randrange(20000, 50000)
        ports = [base + off + i for off in (0, 100, 200) for i in (1, 2, 3)]
        ok = True
        for p in ports:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    pytest.skip("no free port block for dev-cluster")


def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    out.append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    return out


def test_dev_cluster_starts_reports_leader_and_stops_on_sigint(tmp_path):
    """`afs dev-cluster` starts 3 members, reports the leader, serves requests, and on SIGINT
    stops every member cleanly and exits 0."""
    base = _free_base_port()
    cmd = [os.path.join(os.path.dirname(sys.executable), "afs"), "dev-cluster",
           "--dir", str(tmp_path / "dev"), "--base-port", str(base)]
    if not os.path.exists(cmd[0]):
        cmd = [sys.executable, "-m", "afs_cli.main", *cmd[1:]]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    lines: list[str] = []
    leader_seen = threading.Event()

    def read():
        for raw in proc.stderr:
            line = raw.decode("utf-8", "replace")
            lines.append(line)
            if line.startswith("== leader is"):
                leader_seen.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    kids: list[int] = []
    try:
        assert leader_seen.wait(30), "".join(lines)
        kids = _children(proc.pid)
        assert len(kids) == 3, kids
        endpoints = [f"127.0.0.1:{base + i}" for i in (1, 2, 3)]
        from afs.client import Client
        with Client(endpoints, timeout=10) as c:
            rev = c.put("/dev", b"ok").revision
            assert c.get("/dev").data == b"ok" and rev >= 1
            assert {s["name"] for s in c.cluster_status()} == {"n1", "n2", "n3"}
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0, "".join(lines)
        reader.join(5)
        text = "".join(lines)
        assert "== stopped" in text and "Traceback" not in text, text
        for i in (1, 2, 3):
            log = (tmp_path / "dev" / f"n{i}" / "server.log").read_text()
            assert "event=stopped" in log, log[-2000:]
        for p in kids:
            assert not os.path.exists(f"/proc/{p}") or _is_zombie(p), f"member pid {p} still alive"
        assert not any(wait_for_port(e, 0.1) for e in endpoints)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for p in kids:                    # members this test started (through dev-cluster)
            try:
                if not _is_zombie(p):
                    os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True
