"""The afs CLI against the fake cluster: via click's CliRunner and via the installed script."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from afs import errors
from afs.config import ClientConfig, DEFAULT_ENDPOINTS, load
from afs.errors import ExitCode
from afs.testing.fakeserver import FakeCluster
from afs_cli.main import cli

AFS_BIN = Path(sys.executable).parent / "afs"


@pytest.fixture
def fc():
    with FakeCluster(3) as c:
        yield c


@pytest.fixture
def run(fc, monkeypatch):
    """run(*args, input=None) -> click Result, against the fake cluster (via AFS_ENDPOINTS)."""
    monkeypatch.setenv("AFS_ENDPOINTS", ",".join(fc.endpoints))
    monkeypatch.setenv("AFS_TIMEOUT", "2")
    monkeypatch.delenv("AFS_CONFIG", raising=False)
    runner = CliRunner()

    def _run(*args, input=None):
        return runner.invoke(cli, list(args), input=input, catch_exceptions=False)
    return _run


def ok(result, code=0):
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    return result


def one_error_line(result, code):
    """Exactly one stderr line 'afs: ...' and the expected exit code; no traceback."""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("afs: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def jout(result):
    return json.loads(result.stdout)


# ---------------------------------------------------------------- commands, text and json

def test_put_get_stat_text_and_json(run, fc):
    """put prints the revision; get prints raw bytes; stat -o json has Stat fields+path+revision."""
    assert ok(run("put", "/app/db/primary", "10.0.0.1", "-p")).stdout == "revision 1\n"
    assert ok(run("get", "/app/db/primary")).stdout == "10.0.0.1"
    out = jout(ok(run("put", "/app/db/primary", "x", "-o", "json")))
    assert out == {"revision": 2, "path": "/app/db/primary"}
    st = jout(ok(run("stat", "/app/db/primary", "-o", "json")))
    assert set(st) == {"path", "revision", "kind", "create_revision", "mod_revision", "version",
                       "mtime_ns", "mode", "uid", "gid", "size"}
    assert (st["path"], st["revision"], st["kind"], st["version"], st["mode"]) == (
        "/app/db/primary", 2, "file", 2, 0o644)
    text = ok(run("stat", "/app/db/primary")).stdout
    assert "version: 2" in text and "mode: 0644 (-rw-r--r--)" in text
    g = jout(ok(run("get", "/app/db/primary", "-o", "json")))
    assert g["value"] == "x" and g["revision"] == 2 and g["size"] == 1


def test_get_binary_and_stale(run, fc):
    """Binary values round-trip through stdin/stdout; --stale says which revision it read."""
    blob = bytes(range(256))
    ok(run("put", "/bin", "-", input=blob))
    assert ok(run("get", "/bin")).stdout_bytes == blob
    assert jout(ok(run("get", "/bin", "-o", "json")))["value_b64"]
    r = ok(run("get", "/bin", "--stale"))
    assert r.stdout_bytes == blob and "revision 1" in r.stderr


def test_value_sources(run, fc, tmp_path):
    """VALUE, --file F, '-' and --file - all work; create defaults to an empty value."""
    f = tmp_path / "v"
    f.write_bytes(b"from-file")
    ok(run("put", "/a", "--file", str(f)))
    ok(run("put", "/b", "-", input=b"from-stdin"))
    ok(run("put", "/c", "--file", "-", input=b"stdin2"))
    ok(run("create", "/d"))
    ok(run("create", "/e", "val", "--mode", "0600"))
    assert [fc.tree.nodes[p].data for p in "/a /b /c /d /e".split()] == [
        b"from-file", b"from-stdin", b"stdin2", b"", b"val"]
    assert fc.tree.nodes["/e"].mode == 0o600


def test_mkdir_ls_tree_rm(run, fc):
    ok(run("mkdir", "-p", "/app/db"))
    ok(run("mkdir", "/app/web", "--mode", "0750"))
    ok(run("put", "/app/db/primary", "p"))
    ok(run("put", "/app/x", "x"))
    assert ok(run("ls", "/app")).stdout == "db/\nweb/\nx\n"
    long_ = ok(run("ls", "-l", "/app")).stdout.splitlines()
    assert long_[1].startswith("drwxr-x---") and long_[2].startswith("-rw-r--r--")
    ls = jout(ok(run("ls", "/app", "-o", "json")))
    assert ls["path"] == "/app" and ls["revision"] == 4
    assert [(c["name"], c["kind"]) for c in ls["children"]] == [("db", "dir"), ("web", "dir"),
                                                                ("x", "file")]
    assert ok(run("tree", "/app")).stdout == (
        "/app/\n├── db/\n│   └── primary\n├── web/\n└── x\n")
    t = jout(ok(run("tree", "/app", "-o", "json")))
    assert [n["path"] for n in t["nodes"]] == ["/app", "/app/db", "/app/db/primary", "/app/web",
                                               "/app/x"]
    one_error_line(run("rm", "/app"), ExitCode.NOT_EMPTY)
    assert ok(run("rm", "-r", "/app")).stdout == "revision 5\n"
    assert "/app" not in fc.tree.nodes


def test_chmod_chown(run, fc):
    ok(run("put", "/f", "x"))
    assert ok(run("chmod", "0640", "/f")).stdout == "revision 2\n"
    ok(run("chown", "1000:100", "/f"))
    ok(run("chown", ":7", "/f"))
    n = fc.tree.nodes["/f"]
    assert (n.mode, n.uid, n.gid) == (0o640, 1000, 7)


def test_if_version(run, fc):
    ok(run("put", "/f", "1"))
    one_error_line(run("put", "/f", "2", "--if-version", "9"), ExitCode.VERSION_MISMATCH)
    ok(run("put", "/f", "2", "--if-version", "1"))
    one_error_line(run("rm", "--if-version", "1", "/f"), ExitCode.VERSION_MISMATCH)
    ok(run("rm", "--if-version", "2", "/f"))


def test_txn_from_stdin_and_file(run, fc, tmp_path):
    """txn reads JSON (text values or value_b64) and reports the branch taken."""
    ok(run("put", "/cfg", "old"))
    doc = {"compare": [{"path": "/cfg", "target": "value", "cmp": "==", "value": "old"}],
           "then": [{"op": "set", "path": "/cfg", "value": "new"},
                    {"op": "put", "path": "/bin", "value_b64": "AAEC"},
                    {"op": "mkdir", "path": "/d", "mode": "0700"}],
           "else": [{"op": "delete", "path": "/cfg"}]}
    r = ok(run("txn", input=json.dumps(doc)))
    assert r.stdout == "revision 2\nsucceeded\n"
    assert fc.tree.nodes["/cfg"].data == b"new" and fc.tree.nodes["/bin"].data == b"\0\1\2"
    assert fc.tree.nodes["/d"].mode == 0o700
    f = tmp_path / "t.json"
    f.write_text(json.dumps(doc))
    out = jout(ok(run("txn", "--file", str(f), "-o", "json")))
    assert out["revision"] == 3 and out["succeeded"] is False and "/cfg" not in fc.tree.nodes
    ok(run("txn", "-", input='{"then": [{"op": "create", "path": "/n"}]}'))
    assert "/n" in fc.tree.nodes


def test_cluster_status_table_and_json(run, fc):
    out = ok(run("cluster", "status")).stdout.splitlines()
    assert out[0].split() == ["NAME", "ENDPOINT", "ROLE", "LEADER", "TERM", "COMMIT", "APPLIED",
                              "REVISION"]
    assert out[1].split()[:4] == ["n1", fc.member("n1").addr, "leader", "n1"]
    js = jout(ok(run("cluster", "status", "-o", "json")))
    assert isinstance(js, list) and [m["name"] for m in js] == ["n1", "n2", "n3"]
    assert {"role", "leader", "term", "revision", "applied_index", "endpoint"} <= set(js[0])
    fc.member("n2").stop()
    r = ok(run("cluster", "status"))
    assert "unreachable" in r.stdout and "n2" in r.stderr


def test_import_export_round_trip(run, fc, tmp_path):
    """import writes a local tree in one transaction; export writes it back identically."""
    src = tmp_path / "src"
    (src / "db" / "empty").mkdir(parents=True)
    (src / "db" / "primary").write_bytes(b"10.0.0.1")
    (src / "web").mkdir()
    (src / "web" / "blob").write_bytes(bytes(range(256)))
    (src / "top").write_text("hello\n")
    r = ok(run("import", str(src), "/imp"))
    assert r.stdout == "revision 1\n" and fc.tree.revision == 1          # ONE transaction
    assert len(fc.writes()) == 1 and fc.writes()[0]["cmd"]["op"] == "txn"
    assert fc.tree.nodes["/imp/db/primary"].data == b"10.0.0.1"
    dst = tmp_path / "dst"
    out = jout(ok(run("export", "/imp", str(dst), "-o", "json")))
    assert out["files"] == 3 and out["dirs"] == 3 and out["revision"] == 1

    def snapshot(root):
        return sorted((str(p.relative_to(root)), p.read_bytes() if p.is_file() else None)
                      for p in root.rglob("*"))
    assert snapshot(dst) == snapshot(src)
    # importing again changes values in place and adds nothing else
    js = jout(ok(run("import", str(src), "/imp", "-o", "json")))
    assert (js["transactions"], js["files"], js["dirs"]) == (1, 3, 3)


def test_import_into_root_and_empty_dir(run, fc, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = ok(run("import", str(empty), "/"))
    assert "nothing to import" in r.stderr and fc.requests == []
    (empty / "f").write_text("x")
    ok(run("import", str(empty), "/"))
    assert fc.tree.nodes["/f"].data == b"x"


def test_import_splits_over_limits_and_says_so(run, fc, tmp_path):
    """More ops than one txn allows: several txns, announced on stderr."""
    src = tmp_path / "many"
    src.mkdir()
    for i in range(300):
        (src / f"f{i:03}").write_text(str(i))
    r = ok(run("import", str(src), "/many", "-o", "json"))
    assert "2 transactions" in r.stderr and "NOT atomic" in r.stderr
    assert jout(r)["transactions"] == 2 and len(fc.writes()) == 2
    assert len([p for p in fc.tree.nodes if p.startswith("/many/")]) == 300


def test_export_of_a_file_is_not_a_directory(run, fc, tmp_path):
    ok(run("put", "/f", "x"))
    one_error_line(run("export", "/f", str(tmp_path / "o")), ExitCode.NOT_A_DIRECTORY)


# ---------------------------------------------------------------- exit codes

def test_exit_codes_for_domain_errors(run, fc):
    """Each AfsError maps to its ExitCode with one 'afs: ...' line on stderr."""
    ok(run("put", "/f", "x"))
    ok(run("mkdir", "/d"))
    one_error_line(run("get", "/nope"), ExitCode.NOT_FOUND)
    one_error_line(run("create", "/f"), ExitCode.EXISTS)
    one_error_line(run("put", "/f", "y", "--if-version", "7"), ExitCode.VERSION_MISMATCH)
    ok(run("put", "/d/x", "1"))
    one_error_line(run("rm", "/d"), ExitCode.NOT_EMPTY)
    one_error_line(run("ls", "/f"), ExitCode.NOT_A_DIRECTORY)
    one_error_line(run("get", "/d"), ExitCode.IS_A_DIRECTORY)


@pytest.mark.parametrize("exc,code", [
    (errors.PermissionDenied("denied"), ExitCode.PERMISSION),
    (errors.Compacted("compacted"), ExitCode.COMPACTED),
    (errors.AfsError("boom"), ExitCode.ERROR),
    (errors.InvalidInput("server says no"), ExitCode.INVALID),
])
def test_exit_codes_for_injected_errors(run, fc, exc, code):
    fc.inject_error(exc, op="get")
    line = one_error_line(run("get", "/x"), code)
    assert exc.message in line


def test_unavailable_exit_code(fc, monkeypatch):
    monkeypatch.delenv("AFS_CONFIG", raising=False)
    eps = ",".join(fc.endpoints)
    for m in fc.members:
        m.stop()
    r = CliRunner().invoke(cli, ["get", "/x", "--endpoints", eps, "--timeout", "0.3"])
    line = one_error_line(r, ExitCode.UNAVAILABLE)
    assert "unavailable" in line


def test_usage_errors_exit_2(run):
    assert run("get").exit_code == ExitCode.USAGE
    assert run("put", "/a").exit_code == ExitCode.USAGE            # no value given
    assert run("put", "/a", "v", "--file", "f").exit_code == ExitCode.USAGE
    assert run("bogus").exit_code == ExitCode.USAGE


# ---------------------------------------------------------------- bad input: exit 7, nothing sent

@pytest.mark.parametrize("args,stdin", [
    (["get", "relative/path"], None),
    (["put", "/a/../b", "v"], None),
    (["put", "/a//b", "v"], None),
    (["mkdir", "/.afs"], None),
    (["put", "/a", "--file", "/nonexistent/file"], None),
    (["put", "/a", "-"], b"x" * (1024 * 1024 + 1)),
    (["put", "/a", "v", "--mode", "rw-r--r--"], None),
    (["put", "/a", "v", "--mode", "0999"], None),
    (["put", "/a", "v", "--if-version", "abc"], None),
    (["chmod", "u+x", "/a"], None),
    (["chown", "root", "/a"], None),
    (["txn"], b"{not json"),
    (["txn"], b'["a list"]'),
    (["txn"], b'{"then": [{"op": "txn"}]}'),
    (["txn"], b'{"then": [{"op": "set", "path": "/a", "value_b64": "!!"}]}'),
    (["txn"], b'{"then": [{"op": "create", "path": "bad"}]}'),
    (["txn"], b'{"compare": [{"path": "/a", "target": "nope", "cmp": "==", "value": 1}]}'),
    (["txn"], b'{"thne": []}'),
    (["txn", "--file", "/nonexistent.json"], None),
    (["import", "/nonexistent-dir", "/x"], None),
    (["--help-not"], None),
])
def test_bad_input_exits_invalid_and_changes_nothing(run, fc, args, stdin):
    """Bad input: one line, exit 7 (usage errors: 2), and no request reaches the cluster."""
    r = run(*args, input=stdin)
    if args == ["--help-not"]:
        assert r.exit_code == ExitCode.USAGE
    else:
        one_error_line(r, ExitCode.INVALID)
    assert fc.requests == [] and fc.tree.revision == 0


def test_import_with_oversized_file_sends_nothing(run, fc, tmp_path):
    src = tmp_path / "s"
    src.mkdir()
    (src / "ok").write_text("fine")
    (src / "huge").write_bytes(b"x" * (1024 * 1024 + 1))
    one_error_line(run("import", str(src), "/x"), ExitCode.INVALID)
    assert fc.requests == []


def test_import_with_bad_name_sends_nothing(run, fc, tmp_path):
    src = tmp_path / "s"
    src.mkdir()
    (src / "ok").write_text("fine")
    (src / "bad\x01name").write_text("x")
    one_error_line(run("import", str(src), "/x"), ExitCode.INVALID)
    assert fc.requests == []


# ---------------------------------------------------------------- config precedence

def test_config_precedence_flag_env_file_default(tmp_path):
    """ClientConfig: CLI flag > AFS_* env > config file > default."""
    f = tmp_path / "afs.toml"
    f.write_text('[client]\nendpoints = ["h1:1"]\ntimeout = 3.0\nconnect_timeout = 0.7\n')
    assert load(ClientConfig, env={}).endpoints == list(DEFAULT_ENDPOINTS)
    c = load(ClientConfig, env={"AFS_CONFIG": str(f)})
    assert (c.endpoints, c.timeout, c.connect_timeout) == (["h1:1"], 3.0, 0.7)
    c = load(ClientConfig, env={"AFS_CONFIG": str(f), "AFS_ENDPOINTS": "h2:2,h3:3",
                                "AFS_TIMEOUT": "9"})
    assert (c.endpoints, c.timeout) == (["h2:2", "h3:3"], 9.0)
    c = load(ClientConfig, env={"AFS_CONFIG": str(f), "AFS_ENDPOINTS": "h2:2"},
             overrides={"endpoints": "h4:4", "timeout": None})
    assert (c.endpoints, c.timeout) == (["h4:4"], 3.0)


@pytest.mark.parametrize("kwargs", [
    {"env": {"AFS_TIMEOUT": "soon"}},
    {"env": {"AFS_ENDPOINTS": "nohost"}},
    {"env": {"AFS_TIMEOUT": "-1"}},
    {"env": {"AFS_CONFIG": "/nonexistent.toml"}},
])
def test_config_errors_are_invalid_input(kwargs):
    with pytest.raises(errors.InvalidInput):
        load(ClientConfig, **kwargs)


def test_cli_config_file_and_flag(fc, tmp_path, monkeypatch):
    """--config supplies endpoints; --endpoints beats it; a bad config file exits 7."""
    monkeypatch.delenv("AFS_ENDPOINTS", raising=False)
    monkeypatch.delenv("AFS_CONFIG", raising=False)
    f = tmp_path / "c.toml"
    f.write_text(f'[client]\nendpoints = ["{fc.endpoints[0]}"]\n')
    ok(CliRunner().invoke(cli, ["put", "/a", "1", "--config", str(f)]))
    bad = tmp_path / "bad.toml"
    bad.write_text('[client]\nendpoints = ["127.0.0.1:1"]\ntimeout = 0.3\n')
    ok(CliRunner().invoke(cli, ["get", "/a", "--config", str(bad), "--endpoints",
                                fc.endpoints[1]]))
    bad.write_text("[client\n")
    one_error_line(CliRunner().invoke(cli, ["get", "/a", "--config", str(bad)]),
                   ExitCode.INVALID)


# ---------------------------------------------------------------- the installed script

def sh(fc, *args, input=None, env_extra=None):
    env = {**os.environ, "AFS_ENDPOINTS": ",".join(fc.endpoints), "AFS_TIMEOUT": "2"}
    env.pop("AFS_CONFIG", None)
    env.update(env_extra or {})
    return subprocess.run([str(AFS_BIN), *args], input=input, capture_output=True, env=env,
                          timeout=30)


def test_script_help_works():
    p = subprocess.run([str(AFS_BIN), "--help"], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0 and "get" in p.stdout and "cluster" in p.stdout


def test_script_end_to_end(fc, tmp_path):
    """The real console script: stdin input, raw output, json, exit codes, no tracebacks."""
    p = sh(fc, "put", "/svc/db", "-", "-p", input=b"primary\n")
    assert (p.returncode, p.stdout) == (0, b"revision 1\n")
    p = sh(fc, "get", "/svc/db")
    assert (p.returncode, p.stdout) == (0, b"primary\n")
    p = sh(fc, "stat", "/svc/db", "-o", "json")
    assert json.loads(p.stdout)["version"] == 1
    p = sh(fc, "get", "/svc/nope")
    assert p.returncode == ExitCode.NOT_FOUND
    assert p.stderr.decode().strip().startswith("afs: ") and b"Traceback" not in p.stderr
    p = sh(fc, "put", "/bad//path", "x")
    assert p.returncode == ExitCode.INVALID and len(p.stderr.splitlines()) == 1
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a" / "f").write_bytes(b"F")
    assert sh(fc, "import", str(src), "/tree").returncode == 0
    assert sh(fc, "export", "/tree", str(tmp_path / "out")).returncode == 0
    assert (tmp_path / "out" / "a" / "f").read_bytes() == b"F"
    p = sh(fc, "cluster", "status", "-o", "json")
    assert p.returncode == 0 and len(json.loads(p.stdout)) == 3


def test_script_unavailable(fc):
    eps = ",".join(fc.endpoints)
    for m in fc.members:
        m.stop()
    p = sh(fc, "get", "/x", env_extra={"AFS_ENDPOINTS": eps, "AFS_TIMEOUT": "0.3"})
    assert p.returncode == ExitCode.UNAVAILABLE and b"Traceback" not in p.stderr


def test_cli_layer_rule_imports_only_client_errors_config_model():
    """cli/ data commands import only afs.client, afs.errors, afs.config, afs.model (+ afs_cli)."""
    import ast
    allowed = {"afs.client", "afs.errors", "afs.config", "afs.model"}
    root = Path(__file__).resolve().parents[2] / "cli"
    for name in ("main.py", "common.py", "data.py", "transfer.py", "cluster.py"):
        tree = ast.parse((root / name).read_text())
        for node in ast.walk(tree):
            mods = []
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                mods = [node.module]
            for m in mods:
                if m == "afs" or m.startswith("afs."):
                    assert m in allowed, f"cli/{name} imports {m}"
