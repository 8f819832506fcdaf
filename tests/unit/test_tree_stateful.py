"""KeyTree against a plain dict-of-paths model (Hypothesis stateful test).

The model re-implements the documented semantics as naively as possible (children found by
scanning keys, txns applied to a copy). Alongside, a replica KeyTree is fed only the event
groups, and snapshots are round-tripped mid-run; all three must agree after every step.
"""
import copy

from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from afs.model import NodeKind, Stat
from afs.ops import Chmod, Command, Compare, Create, Delete, Mkdir, Noop, Set, Txn
from afs.tree import KeyTree

NAMES = ["a", "b", "c"]
paths_st = st.lists(st.sampled_from(NAMES), min_size=1, max_size=3).map(
    lambda p: "/" + "/".join(p))
data_st = st.sampled_from([b"", b"x", b"y", b"zz"])
mode_st = st.none() | st.sampled_from([0o600, 0o644, 0o755])
ver_st = st.none() | st.integers(0, 4)
ids_st = st.none() | st.sampled_from([0, 1, 2])

simple_st = st.one_of(
    st.builds(Create, paths_st, data_st, mode_st, st.booleans()),
    st.builds(Set, paths_st, data_st, ver_st, ver_st, st.booleans(), st.booleans(), mode_st),
    st.builds(Mkdir, paths_st, st.booleans(), mode_st),
    st.builds(Delete, paths_st, st.booleans(), ver_st),
    st.builds(Chmod, paths_st, mode_st, ids_st, ids_st),
    st.just(Noop()),
)
compare_st = st.one_of(
    st.builds(Compare, paths_st, st.sampled_from(["version", "mod_revision", "create_revision"]),
              st.sampled_from(["==", "!=", "<", ">"]), st.integers(0, 6)),
    st.builds(Compare, paths_st, st.just("value"), st.sampled_from(["==", "!=", "<", ">"]),
              data_st),
    st.builds(Compare, paths_st, st.just("exists"), st.sampled_from(["==", "!="]),
              st.booleans()),
)
txn_st = st.builds(Txn, st.lists(compare_st, max_size=2), st.lists(simple_st, max_size=4),
                   st.lists(simple_st, max_size=3))


class Fail(Exception):
    def __init__(self, code):
        self.code = code


def parent_of(p):
    return p.rsplit("/", 1)[0] or "/"


def ancestors(p):
    parts = p.split("/")[1:-1]
    return ["/" + "/".join(parts[:i + 1]) for i in range(len(parts))]


class Model:
    """nodes: path -> dict(kind, data, cr, mr, ver, mtime, mode, uid, gid)."""

    def __init__(self):
        self.nodes = {"/": dict(kind="dir", data=None, cr=0, mr=0, ver=0, mtime=0, mode=0o755,
                                uid=0, gid=0)}
        self.revision = 0

    def missing(self, p):
        for a in ancestors(p):
            if a not in self.nodes:
                return Fail("not_found")
            if self.nodes[a]["kind"] == "file":
                return Fail("not_a_directory")
        return Fail("not_found")

    def make_parent(self, nodes, p, parents, rev, cmd):
        par = parent_of(p)
        if par in nodes:
            if nodes[par]["kind"] == "file":
                raise Fail("not_a_directory")
            return
        if not parents:
            saved, self.nodes = self.nodes, nodes
            try:
                raise self.missing(p)
            finally:
                self.nodes = saved
        for a in ancestors(p):
            if a not in nodes:
                nodes[a] = dict(kind="dir", data=None, cr=rev, mr=rev, ver=1, mtime=cmd.mtime_ns,
                                mode=0o755, uid=cmd.uid, gid=cmd.gid)
            elif nodes[a]["kind"] == "file":
                raise Fail("not_a_directory")

    def op(self, nodes, op, rev, cmd):
        """Apply op to ``nodes`` in place; return True when it changed something."""
        before = copy.deepcopy(nodes)
        self.nodes, saved = nodes, self.nodes
        try:
            self._op(nodes, op, rev, cmd)
        finally:
            self.nodes = saved
        return nodes != before

    def _op(self, nodes, op, rev, cmd):
        p = getattr(op, "path", None)
        n = nodes.get(p)
        if isinstance(op, Noop):
            return
        if isinstance(op, Create):
            if n:
                raise Fail("exists")
            self.make_parent(nodes, p, op.parents, rev, cmd)
            nodes[p] = dict(kind="file", data=op.data, cr=rev, mr=rev, ver=1, mtime=cmd.mtime_ns,
                            mode=0o644 if op.mode is None else op.mode, uid=cmd.uid, gid=cmd.gid)
        elif isinstance(op, Set):
            if n is None:
                if not op.upsert:
                    raise self.missing(p)
                if op.if_version or op.if_mod_revision:
                    raise Fail("version_mismatch")
                self.make_parent(nodes, p, op.parents, rev, cmd)
                nodes[p] = dict(kind="file", data=op.data, cr=rev, mr=rev, ver=1,
                                mtime=cmd.mtime_ns, mode=0o644 if op.mode is None else op.mode,
                                uid=cmd.uid, gid=cmd.gid)
                return
            if n["kind"] == "dir":
                raise Fail("is_a_directory")
            if op.if_version is not None and op.if_version != n["ver"]:
                raise Fail("version_mismatch")
            if op.if_mod_revision is not None and op.if_mod_revision != n["mr"]:
                raise Fail("version_mismatch")
            n.update(data=op.data, mr=rev, ver=n["ver"] + 1, mtime=cmd.mtime_ns)
            if op.mode is not None:
                n["mode"] = op.mode
        elif isinstance(op, Mkdir):
            if n:
                if op.parents and n["kind"] == "dir":
                    return
                raise Fail("exists")
            self.make_parent(nodes, p, op.parents, rev, cmd)
            nodes[p] = dict(kind="dir", data=None, cr=rev, mr=rev, ver=1, mtime=cmd.mtime_ns,
                            mode=0o755 if op.mode is None else op.mode, uid=cmd.uid, gid=cmd.gid)
        elif isinstance(op, Delete):
            if n is None:
                raise self.missing(p)
            if op.if_version is not None and op.if_version != n["ver"]:
                raise Fail("version_mismatch")
            below = [k for k in nodes if k.startswith(p + "/")]
            if below and not op.recursive:
                raise Fail("not_empty")
            for k in below + [p]:
                del nodes[k]
        elif isinstance(op, Chmod):
            if n is None:
                raise self.missing(p)
            new = dict(mode=n["mode"] if op.mode is None else op.mode,
                       uid=n["uid"] if op.uid is None else op.uid,
                       gid=n["gid"] if op.gid is None else op.gid)
            if any(n[k] != v for k, v in new.items()):
                n.update(new, mr=rev, ver=n["ver"] + 1)

    def compare(self, c):
        n = self.nodes.get(c.path)
        if c.target == "exists":
            actual = n is not None
        elif n is None:
            actual = None if c.target == "value" else 0
        else:
            actual = {"version": n["ver"], "mod_revision": n["mr"], "create_revision": n["cr"],
                      "value": n["data"]}[c.target]
        return c.matches(actual)

    def apply(self, cmd):
        """Return the expected result dict (error results reduced to their code)."""
        rev = self.revision + 1
        nodes = copy.deepcopy(self.nodes)
        op = cmd.op
        try:
            if isinstance(op, Txn):
                ok = all(self.compare(c) for c in op.compares)
                branch = op.then_ops if ok else op.else_ops
                changed = False
                for i, o in enumerate(branch):
                    try:
                        changed |= self.op(nodes, o, rev, cmd)
                    except Fail as f:
                        f.code = (f.code, i)
                        raise
            else:
                changed = self.op(nodes, op, rev, cmd)
        except Fail as f:
            return {"error": f.code}
        if changed:
            self.nodes = nodes
            self.revision = rev
        if isinstance(op, Txn):
            return {"revision": self.revision, "succeeded": ok,
                    "results": [{"revision": self.revision}] * len(branch)}
        return {"revision": self.revision}


def reduce(result):
    if "error" in result:
        err = result["error"]
        if "op_index" in err.get("details", {}):
            return {"error": (err["code"], err["details"]["op_index"])}
        return {"error": err["code"]}
    return result


@settings(max_examples=150, stateful_step_count=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
class TreeVsModel(RuleBasedStateMachine):

    @initialize()
    def setup(self):
        self.tree = KeyTree()
        self.replica = KeyTree()
        self.model = Model()
        self.mtime = 1_000_000
        self.seq = 0
        self.last = None

    def _run(self, op, uid):
        self.mtime += 7
        self.seq += 1
        cmd = Command("client", self.seq, self.mtime, uid, uid + 10, op)
        before = self.tree.revision
        res, events = self.tree.apply_command(cmd)
        expected = self.model.apply(cmd)
        assert reduce(res) == expected, (op, res, expected)
        if events:
            assert res["revision"] == before + 1
            assert {e.revision for e in events} == {before + 1}
            self.replica.apply_events(res["revision"], events)
        else:
            assert self.tree.revision == before
        self.last = (cmd, res)

    @rule(op=simple_st, uid=st.sampled_from([0, 1]))
    def simple(self, op, uid):
        self._run(op, uid)

    @rule(op=txn_st, uid=st.sampled_from([0, 1]))
    def txn(self, op, uid):
        self._run(op, uid)

    @rule()
    def retry_last(self):
        """A retried command is answered from memory and changes nothing."""
        if self.last is None:
            return
        cmd, res = self.last
        snap = self.tree.snapshot(include_dedupe=False)
        res2, ev = self.tree.apply_command(cmd)
        assert res2 == res and ev == []
        assert self.tree.snapshot(include_dedupe=False) == snap

    @rule()
    def snapshot_roundtrip(self):
        """restore(snapshot()) is byte-identical; continue on the restored tree."""
        snap = self.tree.snapshot()
        restored = KeyTree.restore(snap)
        assert restored.snapshot() == snap
        assert restored.state_hash() == self.tree.state_hash()
        self.tree = restored

    @invariant()
    def matches_model(self):
        if not hasattr(self, "tree"):
            return
        m = self.model
        assert self.tree.revision == m.revision
        assert len(self.tree) == len(m.nodes)
        for p, n in m.nodes.items():
            kind = NodeKind.DIR if n["kind"] == "dir" else NodeKind.FILE
            size = 0 if n["data"] is None else len(n["data"])
            assert self.tree.stat(p) == Stat(kind, n["cr"], n["mr"], n["ver"], n["mtime"],
                                             n["mode"], n["uid"], n["gid"], size), p
            if kind is NodeKind.FILE:
                assert self.tree.get(p)[0] == n["data"]
            else:
                kids = sorted(k.rsplit("/", 1)[1] for k in m.nodes
                              if k != "/" and parent_of(k) == p)
                assert [name for name, _ in self.tree.list(p)] == kids

    @invariant()
    def replica_matches(self):
        if not hasattr(self, "tree"):
            return
        assert self.replica.snapshot(include_dedupe=False) == \
            self.tree.snapshot(include_dedupe=False)


TestTreeVsModel = TreeVsModel.TestCase


def test_determinism_over_random_logs():
    """Replaying the same random command log on two fresh trees gives identical bytes."""
    from hypothesis import given

    @settings(max_examples=50, deadline=None)
    @given(st.lists(simple_st | txn_st, max_size=30))
    def check(ops):
        snaps = []
        for _ in range(2):
            t = KeyTree()
            outs = [t.apply_command(Command(f"c{i % 3}", i // 3 + 1, 10 * i, 0, 0, op))
                    for i, op in enumerate(ops)]
            snaps.append((outs, t.snapshot()))
        assert snaps[0] == snaps[1]
    check()
