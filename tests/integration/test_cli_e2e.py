"""The ``afs`` command line end to end: the real console script in a subprocess against a real
3-member cluster (docs/cli.md: commands, JSON shapes, exit codes, one-line errors)."""
from __future__ import annotations

import base64
import json
import os

import pytest

from afs.errors import ExitCode

pytestmark = pytest.mark.integration

STAT_KEYS = {"kind", "create_revision", "mod_revision", "version", "mtime_ns", "mode", "uid",
             "gid", "size"}
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def client(shared_cluster):
    with shared_cluster.client() as c:
        yield c


@pytest.fixture
def revision(client):
    """The cluster's current revision, read linearizably."""
    return lambda: client.stat_with_revision("/")[1]


def ok(r, code: int = 0):
    assert r.code == code, r
    return r


def one_error_line(r, code: int) -> str:
    """The command failed with ``code`` and printed exactly one line ``afs: ...`` on stderr."""
    assert r.code == code, r
    lines = r.err.strip().splitlines()
    assert len(lines) == 1, r
    assert lines[0].startswith("afs: "), r
    assert "Traceback" not in r.err
    return lines[0]


# ---------------------------------------------------------------- reading and writing

def test_put_get_stat_text_and_json(afs_cli, revision):
    """put prints the revision it committed; get returns the exact bytes; stat and JSON shapes
    carry the Stat fields and the revision."""
    r = ok(afs_cli("put", "/cli/rw/motd", "hello world", "-p"))
    assert r.text.startswith("revision ")
    rev = int(r.text.split()[1])
    assert revision() == rev
    assert ok(afs_cli("get", "/cli/rw/motd")).out == b"hello world"      # no newline added
    j = ok(afs_cli("get", "/cli/rw/motd", "-o", "json")).json()
    assert set(j) == {"path", "revision", "value"} | STAT_KEYS
    assert j["value"] == "hello world" and j["kind"] == "file" and j["size"] == 11
    assert j["version"] == 1 and j["mod_revision"] == rev and j["mode"] == 0o644
    j = ok(afs_cli("put", "/cli/rw/motd", "-", "-o", "json", input=b"from stdin\n")).json()
    assert j == {"revision": rev + 1, "path": "/cli/rw/motd"}
    assert ok(afs_cli("get", "/cli/rw/motd")).out == b"from stdin\n"
    text = ok(afs_cli("stat", "/cli/rw/motd")).text
    assert "kind: file" in text and "version: 2" in text and "mode: 0644 (-rw-r--r--)" in text
    assert f"revision: {rev + 1}" in text
    j = ok(afs_cli("stat", "/cli/rw/motd", "-o", "json")).json()
    assert set(j) == {"path", "revision"} | STAT_KEYS and j["version"] == 2


def test_binary_values_and_files(afs_cli, tmp_path):
    """Binary data round-trips through --file and get; JSON uses value_b64 for non-UTF-8."""
    blob = bytes(range(256)) * 4
    f = tmp_path / "blob"
    f.write_bytes(blob)
    ok(afs_cli("put", "/cli/bin/blob", "--file", f, "-p"))
    assert ok(afs_cli("get", "/cli/bin/blob")).out == blob
    j = ok(afs_cli("get", "/cli/bin/blob", "-o", "json")).json()
    assert "value" not in j and base64.b64decode(j["value_b64"]) == blob
    # exactly 1 MiB is allowed
    big = tmp_path / "big"
    big.write_bytes(b"x" * MiB)
    ok(afs_cli("put", "/cli/bin/big", "--file", big))
    assert ok(afs_cli("get", "/cli/bin/big")).out == b"x" * MiB


def test_stale_get_reports_revision(afs_cli, shared_cluster):
    """get --stale (from any member) says which revision it reflects."""
    rev = int(ok(afs_cli("put", "/cli/stale", "s", "-p")).text.split()[1])
    shared_cluster.wait_for_revision(rev)
    for m in shared_cluster.members.values():
        r = ok(afs_cli("get", "/cli/stale", "--stale", endpoints=[m.client_addr]))
        assert r.out == b"s"
        assert r.err.strip().startswith("stale read at revision ")
        assert int(r.err.split()[-1]) >= rev
        j = ok(afs_cli("get", "/cli/stale", "--stale", "-o", "json", endpoints=[m.client_addr])).json()
        assert j["revision"] >= rev


def test_create_mkdir_ls_tree(afs_cli):
    """create/mkdir build a tree; ls, ls -l and tree render it; JSON shapes are documented."""
    ok(afs_cli("mkdir", "-p", "/cli/t/services/db"))
    ok(afs_cli("create", "/cli/t/services/db/primary", "10.0.0.1:5432"))
    ok(afs_cli("create", "/cli/t/services/motd"))                         # empty by default
    ok(afs_cli("mkdir", "--mode", "0700", "/cli/t/services/web"))
    assert ok(afs_cli("get", "/cli/t/services/motd")).out == b""
    assert ok(afs_cli("ls", "/cli/t/services")).text.splitlines() == ["db/", "motd", "web/"]
    long_ = ok(afs_cli("ls", "-l", "/cli/t/services")).text.splitlines()
    assert long_[0].startswith("drwxr-xr-x") and long_[0].endswith(" db/")
    assert long_[1].startswith("-rw-r--r--") and long_[1].endswith(" motd")
    assert long_[2].startswith("drwx------") and long_[2].endswith(" web/")
    j = ok(afs_cli("ls", "/cli/t/services", "-o", "json")).json()
    assert set(j) == {"path", "revision", "children"}
    assert [c["name"] for c in j["children"]] == ["db", "motd", "web"]
    assert all(set(c) == {"name"} | STAT_KEYS for c in j["children"])
    assert ok(afs_cli("tree", "/cli/t/services")).text.splitlines() == [
        "/cli/t/services/", "├── db/", "│   └── primary", "├── motd", "└── web/"]
    j = ok(afs_cli("tree", "/cli/t/services", "-o", "json")).json()
    assert set(j) == {"path", "revision", "nodes"}
    assert [n["path"] for n in j["nodes"]] == [
        "/cli/t/services", "/cli/t/services/db", "/cli/t/services/db/primary",
        "/cli/t/services/motd", "/cli/t/services/web"]
    assert all(set(n) == {"path"} | STAT_KEYS for n in j["nodes"])
    # mkdir -p of an existing directory changes nothing and prints the current revision
    r1 = ok(afs_cli("mkdir", "-p", "/cli/t/services/db")).text
    r2 = ok(afs_cli("mkdir", "-p", "/cli/t/services/db")).text
    assert r1 == r2


def test_rm_and_domain_exit_codes(afs_cli, revision):
    """not found 3, exists 4, version mismatch 5, not empty 6, not a dir 9, is a dir 10 —
    each one line on stderr, and none of them consumes a revision."""
    ok(afs_cli("put", "/cli/rm/dir/file", "v", "-p"))
    before = revision()
    assert "/cli/rm/missing" in one_error_line(afs_cli("get", "/cli/rm/missing"), ExitCode.NOT_FOUND)
    one_error_line(afs_cli("rm", "/cli/rm/missing"), ExitCode.NOT_FOUND)
    one_error_line(afs_cli("put", "/cli/rm/nodir/x", "v"), ExitCode.NOT_FOUND)   # parent missing
    one_error_line(afs_cli("create", "/cli/rm/dir/file", "v"), ExitCode.EXISTS)
    one_error_line(afs_cli("mkdir", "/cli/rm/dir"), ExitCode.EXISTS)
    one_error_line(afs_cli("put", "/cli/rm/dir/file", "v2", "--if-version", "7"),
                   ExitCode.VERSION_MISMATCH)
    one_error_line(afs_cli("put", "/cli/rm/dir/file", "v2", "--if-version", "0"),
                   ExitCode.VERSION_MISMATCH)
    one_error_line(afs_cli("rm", "--if-version", "9", "/cli/rm/dir/file"), ExitCode.VERSION_MISMATCH)
    one_error_line(afs_cli("rm", "/cli/rm/dir"), ExitCode.NOT_EMPTY)
    one_error_line(afs_cli("ls", "/cli/rm/dir/file"), ExitCode.NOT_A_DIRECTORY)
    one_error_line(afs_cli("put", "/cli/rm/dir/file/below", "v"), ExitCode.NOT_A_DIRECTORY)
    one_error_line(afs_cli("get", "/cli/rm/dir"), ExitCode.IS_A_DIRECTORY)
    one_error_line(afs_cli("put", "/cli/rm/dir", "v"), ExitCode.IS_A_DIRECTORY)
    assert revision() == before
    ok(afs_cli("put", "/cli/rm/dir/file", "v2", "--if-version", "1"))
    ok(afs_cli("put", "/cli/rm/dir/new", "n", "--if-version", "0"))
    ok(afs_cli("rm", "--if-version", "2", "/cli/rm/dir/file"))
    ok(afs_cli("rm", "-r", "/cli/rm/dir"))
    one_error_line(afs_cli("stat", "/cli/rm/dir"), ExitCode.NOT_FOUND)
    assert revision() == before + 4


def test_chmod_chown(afs_cli):
    """chmod sets the permission bits, chown the numeric owner; stat shows both."""
    ok(afs_cli("put", "/cli/perm/cert", "pem", "-p", "--mode", "0640"))
    assert ok(afs_cli("stat", "/cli/perm/cert", "-o", "json")).json()["mode"] == 0o640
    j = ok(afs_cli("chmod", "600", "/cli/perm/cert", "-o", "json")).json()
    assert set(j) == {"revision", "path"}
    ok(afs_cli("chown", "1000:2000", "/cli/perm/cert"))
    st = ok(afs_cli("stat", "/cli/perm/cert", "-o", "json")).json()
    assert (st["mode"], st["uid"], st["gid"]) == (0o600, 1000, 2000)
    ok(afs_cli("chown", ":7", "/cli/perm/cert"))
    st = ok(afs_cli("stat", "/cli/perm/cert", "-o", "json")).json()
    assert (st["uid"], st["gid"]) == (1000, 7)
    one_error_line(afs_cli("chmod", "0600", "/cli/perm/missing"), ExitCode.NOT_FOUND)


def test_txn(afs_cli, tmp_path, revision):
    """txn applies the then branch (one revision), the else branch when a compare fails, and
    nothing at all when an op of the chosen branch fails."""
    ok(afs_cli("put", "/cli/txn/primary", "10.0.0.1", "-p"))
    doc = {"compare": [{"path": "/cli/txn/primary", "target": "value", "cmp": "==", "value": "10.0.0.1"}],
           "then": [{"op": "set", "path": "/cli/txn/primary", "value": "10.0.0.2"},
                    {"op": "put", "path": "/cli/txn/by", "value": "alice"}],
           "else": []}
    before = revision()
    r = ok(afs_cli("txn", input=json.dumps(doc)))
    assert r.text.splitlines() == [f"revision {before + 1}", "succeeded"]
    assert ok(afs_cli("get", "/cli/txn/primary")).out == b"10.0.0.2"
    assert ok(afs_cli("stat", "/cli/txn/by", "-o", "json")).json()["mod_revision"] == before + 1
    # compare fails now: else branch
    doc["else"] = [{"op": "put", "path": "/cli/txn/else", "value_b64": base64.b64encode(b"\xff").decode()}]
    f = tmp_path / "txn.json"
    f.write_text(json.dumps(doc))
    j = ok(afs_cli("txn", "--file", f, "-o", "json")).json()
    assert set(j) == {"revision", "succeeded", "results"}
    assert j["succeeded"] is False and j["revision"] == before + 2
    assert ok(afs_cli("get", "/cli/txn/else")).out == b"\xff"
    # a failing op in the chosen branch: nothing applied, that op's exit code
    bad = {"then": [{"op": "put", "path": "/cli/txn/ok", "value": "x"},
                    {"op": "create", "path": "/cli/txn/primary", "value": "dup"}]}
    one_error_line(afs_cli("txn", input=json.dumps(bad)), ExitCode.EXISTS)
    one_error_line(afs_cli("get", "/cli/txn/ok"), ExitCode.NOT_FOUND)
    assert revision() == before + 2


def test_import_export_round_trip(afs_cli, tmp_path):
    """import copies a local tree in ONE transaction; export writes it back identically."""
    src = tmp_path / "src"
    (src / "db").mkdir(parents=True)
    (src / "web" / "empty").mkdir(parents=True)
    (src / "db" / "primary").write_bytes(b"10.0.0.1:5432")
    (src / "db" / "bin").write_bytes(bytes(range(256)))
    (src / "motd").write_text("hello\n")
    j = ok(afs_cli("import", src, "/cli/imp", "-o", "json")).json()
    assert set(j) == {"revision", "revisions", "transactions", "files", "dirs", "path"}
    assert (j["transactions"], j["files"], j["dirs"], j["revisions"]) == (1, 3, 3, [j["revision"]])
    # every node imported carries the one revision
    nodes = ok(afs_cli("tree", "/cli/imp", "-o", "json")).json()["nodes"]
    assert {n["mod_revision"] for n in nodes} == {j["revision"]}
    r = ok(afs_cli("export", "/cli/imp", tmp_path / "out"))
    assert r.text.startswith("exported 3 files and 3 directories from /cli/imp at revision ")

    def snapshot(root):
        out = {}
        for top, dirs, files in os.walk(root):
            rel = os.path.relpath(top, root)
            out[rel] = None
            for n in files:
                with open(os.path.join(top, n), "rb") as fh:
                    out[os.path.join(rel, n)] = fh.read()
        return out

    assert snapshot(tmp_path / "out") == snapshot(src)
    j = ok(afs_cli("export", "/cli/imp", tmp_path / "out2", "-o", "json")).json()
    assert set(j) == {"revision", "files", "dirs", "path", "local_dir"}
    one_error_line(afs_cli("export", "/cli/imp/motd", tmp_path / "out3"), ExitCode.NOT_A_DIRECTORY)


def test_cluster_status(afs_cli, shared_cluster):
    """cluster status lists every member with one agreed leader (table and JSON)."""
    leader = shared_cluster.wait_for_leader(10)
    r = ok(afs_cli("cluster", "status"))
    lines = r.text.splitlines()
    assert lines[0].split() == ["NAME", "ENDPOINT", "ROLE", "LEADER", "TERM", "COMMIT", "APPLIED", "REVISION"]
    rows = {ln.split()[0]: ln.split() for ln in lines[1:]}
    assert set(rows) == {"n1", "n2", "n3"}
    assert rows[leader][2] == "leader" and all(row[3] == leader for row in rows.values())
    assert "warning" not in r.err
    j = ok(afs_cli("cluster", "status", "-o", "json")).json()
    assert [m["name"] for m in j] == ["n1", "n2", "n3"]
    for m in j:
        assert {"name", "endpoint", "role", "leader", "leader_addr", "term", "commit_index",
                "applied_index", "revision", "members"} <= set(m)
        assert m["endpoint"] == shared_cluster.member(m["name"]).client_addr
        assert m["leader_addr"] == shared_cluster.member(leader).client_addr
        assert len(m["members"]) == 3


# ---------------------------------------------------------------- bad input

def _big_txn(n_ops: int, value: bytes = b"v") -> str:
    return json.dumps({"then": [{"op": "put", "path": f"/cli/bad/t{i}", "value": value.decode()}
                                for i in range(n_ops)]})


BAD_INPUT = [
    # bad path rules
    pytest.param(["put", "relative/path", "v"], None, id="relative-path"),
    pytest.param(["put", "/cli/bad//x", "v"], None, id="empty-component"),
    pytest.param(["put", "/cli/bad/./x", "v"], None, id="dot-component"),
    pytest.param(["put", "/cli/bad/../x", "v"], None, id="dotdot-component"),
    pytest.param(["put", "/cli/bad/a\x01b", "v"], None, id="control-char"),
    pytest.param(["put", "/cli/bad/" + "n" * 256, "v"], None, id="name-over-255-bytes"),
    pytest.param(["put", "/" + "/".join(["d" * 200] * 21), "v"], None, id="path-over-4096-bytes"),
    pytest.param(["put", "/.afs-status", "v"], None, id="reserved-path"),
    pytest.param(["mkdir", "-p", "/" + "/".join(["d"] * 65)], None, id="depth-over-64"),
    pytest.param(["get", "/" + "/".join(["d"] * 65)], None, id="get-depth-over-64"),
    # sizes
    pytest.param(["put", "/cli/bad/big", "-"], b"x" * (MiB + 1), id="value-over-1MiB-stdin"),
    pytest.param(["put", "/cli/bad/big", "--file", "{big}"], None, id="value-over-1MiB-file"),
    pytest.param(["txn"], _big_txn(5, b"y" * (MiB - 100)), id="request-over-4MiB"),
    pytest.param(["txn"], _big_txn(257), id="txn-over-256-ops"),
    # txn JSON
    pytest.param(["txn"], "{not json", id="txn-syntax"),
    pytest.param(["txn"], "[1, 2]", id="txn-not-object"),
    pytest.param(["txn"], '{"then": [], "when": []}', id="txn-unknown-key"),
    pytest.param(["txn"], '{"then": [{"op": "frobnicate", "path": "/cli/bad/x"}]}', id="txn-unknown-op"),
    pytest.param(["txn"], '{"then": [{"op": "txn", "compare": [], "then": [], "else": []}]}',
                 id="txn-nested"),
    pytest.param(["txn"], '{"then": [{"op": "put", "path": "/cli/bad/x", "value_b64": "!!"}]}',
                 id="txn-bad-base64"),
    pytest.param(["txn"], '{"compare": [{"path": "/cli/bad/x", "target": "colour", "cmp": "==", "value": 1}]}',
                 id="txn-bad-compare"),
    pytest.param(["txn"], '{"then": [{"op": "put", "path": "cli/bad/x", "value": "v"}]}', id="txn-bad-path"),
    # modes, owners, versions
    pytest.param(["put", "/cli/bad/m", "v", "--mode", "999"], None, id="mode-not-octal"),
    pytest.param(["put", "/cli/bad/m", "v", "--mode", "u+rw"], None, id="mode-symbolic"),
    pytest.param(["chmod", "77777", "/cli"], None, id="chmod-mode-too-long"),
    pytest.param(["chmod", "abc", "/cli"], None, id="chmod-garbage"),
    pytest.param(["chown", "alice", "/cli"], None, id="chown-name"),
    pytest.param(["chown", "1.5:2", "/cli"], None, id="chown-not-integer"),
    pytest.param(["put", "/cli/bad/v", "v", "--if-version", "x"], None, id="bad-if-version"),
    pytest.param(["put", "/cli/bad/v", "--file", "/nonexistent/file"], None, id="unreadable-file"),
]


@pytest.mark.parametrize("args,stdin", BAD_INPUT)
def test_bad_input_exits_7_and_changes_nothing(afs_cli, client, revision, tmp_path, args, stdin):
    """Every class of bad input: one line on stderr, exit 7, and the revision is unchanged."""
    big = tmp_path / "big"
    if "{big}" in args:
        big.write_bytes(b"z" * (MiB + 1))
        args = [str(big) if a == "{big}" else a for a in args]
    client.mkdir("/cli/bad", parents=True)
    before = revision()
    r = afs_cli(*args, input=stdin)
    one_error_line(r, ExitCode.INVALID)
    assert revision() == before
    assert not r.out


def test_usage_errors_exit_2(afs_cli, revision):
    """click usage errors (unknown option, missing argument, VALUE and --file) exit 2."""
    before = revision()
    assert afs_cli("put", "/cli/u").code == ExitCode.USAGE
    assert afs_cli("put", "/cli/u", "v", "--file", "/etc/hostname").code == ExitCode.USAGE
    assert afs_cli("get", "/cli/u", "--bogus").code == ExitCode.USAGE
    assert afs_cli("get", "/cli/u", "-o", "yaml").code == ExitCode.USAGE
    assert revision() == before


def test_cluster_unavailable_exits_8(make_cluster, cli_for):
    """With every member stopped, reads, writes and cluster status fail with exit 8 and one
    line, within --timeout."""
    cl = make_cluster()
    cli = cli_for(cl)
    ok(cli("put", "/u", "v"))
    # one member down: listed as unreachable, still exit 0
    down = cl.names[-1]
    cl.stop(down)
    r = ok(cli("cluster", "status"))
    rows = {ln.split()[0]: ln.split() for ln in r.text.splitlines()[1:]}
    assert rows[down][2] == "unreachable" and len(rows) == 3, r
    assert down in r.err
    j = ok(cli("cluster", "status", "-o", "json")).json()
    assert {m["name"] for m in j} == set(cl.names)
    assert set(next(m for m in j if m["name"] == down)) == {"name", "endpoint", "error"}
    cl.stop_all()
    for args in (["get", "/u"], ["get", "/u", "--stale"], ["put", "/u", "w"], ["ls", "/"],
                 ["cluster", "status"]):
        line = one_error_line(cli(*args, "--timeout", "1"), ExitCode.UNAVAILABLE)
        assert "unavailable" in line or "no member" in line or "refused" in line, line
