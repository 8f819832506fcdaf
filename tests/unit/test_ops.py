"""afs.ops: wire round trips, invalid shapes, the Command envelope and request limits."""
import msgpack
import pytest
from hypothesis import given, strategies as st

from afs.errors import (InvalidInput, InvalidPath, PathTooDeep, RequestTooLarge, ReservedPath,
                        TooManyOps, UnsupportedFormat, ValueTooLarge)
from afs.limits import Limits
from afs.ops import (FORMAT_VERSION, Chmod, Command, Compare, Create, Delete, Mkdir, Noop, Set,
                     Txn, op_from_wire, validate_limits)

# ------------------------------------------------------------------ strategies

name = st.sampled_from(["a", "b", "c", "日本", "x y"])
path = st.lists(name, min_size=1, max_size=4).map(lambda p: "/" + "/".join(p))
data = st.binary(max_size=64)
opt_mode = st.none() | st.integers(0, 0o7777)
opt_ver = st.none() | st.integers(0, 2**63)
opt_id = st.none() | st.integers(0, 2**32 - 1)

simple_ops = st.one_of(
    st.builds(Create, path, data, opt_mode, st.booleans()),
    st.builds(Set, path, data, opt_ver, opt_ver, st.booleans(), st.booleans(), opt_mode),
    st.builds(Mkdir, path, st.booleans(), opt_mode),
    st.builds(Delete, path, st.booleans(), opt_ver),
    st.builds(Chmod, path, opt_mode, opt_id, opt_id),
    st.just(Noop()),
)
compares = st.one_of(
    st.builds(Compare, path, st.sampled_from(["version", "mod_revision", "create_revision"]),
              st.sampled_from(["==", "!=", "<", ">"]), st.integers(0, 2**40)),
    st.builds(Compare, path, st.just("value"), st.sampled_from(["==", "!=", "<", ">"]), data),
    st.builds(Compare, path, st.just("value"), st.sampled_from(["==", "!="]), st.none()),
    st.builds(Compare, path, st.just("exists"), st.sampled_from(["==", "!="]), st.booleans()),
)
txns = st.builds(Txn, st.lists(compares, max_size=3), st.lists(simple_ops, max_size=3),
                 st.lists(simple_ops, max_size=3))
ops = simple_ops | txns


def _through_msgpack(obj):
    return msgpack.unpackb(msgpack.packb(obj, use_bin_type=True), raw=False)


@given(ops)
def test_op_wire_roundtrip(op):
    """op_from_wire(to_wire(op)) == op, also through msgpack."""
    assert op_from_wire(op.to_wire()) == op
    assert op_from_wire(_through_msgpack(op.to_wire())) == op


@given(ops, st.text(max_size=20), st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1),
       st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_command_roundtrip(op, cid, seq, mtime, uid, gid):
    """Command.decode(encode()) is the identity and the encoding starts with the version."""
    cmd = Command(cid, seq, mtime, uid, gid, op)
    raw = cmd.encode()
    assert Command.decode(raw) == cmd
    assert msgpack.unpackb(raw, raw=False)[0] == FORMAT_VERSION


def test_wire_shapes_match_protocol():
    """to_wire emits exactly the docs/protocol.md keys."""
    assert Create("/a").to_wire() == {"op": "create", "path": "/a", "data": b"", "mode": None,
                                      "parents": False}
    assert set(Set("/a", b"").to_wire()) == {"op", "path", "data", "if_version",
                                             "if_mod_revision", "upsert", "parents", "mode"}
    assert set(Mkdir("/a").to_wire()) == {"op", "path", "parents", "mode"}
    assert set(Delete("/a").to_wire()) == {"op", "path", "recursive", "if_version"}
    assert set(Chmod("/a").to_wire()) == {"op", "path", "mode", "uid", "gid"}
    assert Noop().to_wire() == {"op": "noop"}
    assert Txn().to_wire() == {"op": "txn", "compare": [], "then": [], "else": []}
    assert Compare("/a", "exists", "==", True).to_wire() == {
        "path": "/a", "target": "exists", "cmp": "==", "value": True}


def test_optional_keys_may_be_absent():
    """Optional fields default when missing from the wire dict."""
    assert op_from_wire({"op": "set", "path": "/a", "data": b"x"}) == Set("/a", b"x")
    assert op_from_wire({"op": "txn"}) == Txn()
    assert op_from_wire({"op": "delete", "path": "/a/"}) == Delete("/a")  # normalised


@pytest.mark.parametrize("bad,needle", [
    ("not a dict", "must be a map"),
    ({}, "unknown op"),
    ({"op": "rename", "path": "/a"}, "unknown op"),
    ({"op": 1}, "unknown op"),
    ({"op": "create"}, "missing required field 'path'"),
    ({"op": "set", "path": "/a"}, "missing required field 'data'"),
    ({"op": "create", "path": "/a", "bogus": 1}, "unknown field 'bogus'"),
    ({"op": "create", "path": 5}, "'path' must be a string"),
    ({"op": "create", "path": "/a", "data": "text"}, "'data' must be bytes"),
    ({"op": "create", "path": "/a", "parents": 1}, "'parents' must be a boolean"),
    ({"op": "create", "path": "/a", "mode": 0o10000}, "'mode' must be in"),
    ({"op": "create", "path": "/a", "mode": -1}, "'mode' must be in"),
    ({"op": "create", "path": "/a", "mode": True}, "'mode' must be an integer"),
    ({"op": "set", "path": "/a", "data": b"", "if_version": "1"}, "'if_version' must be"),
    ({"op": "set", "path": "/a", "data": b"", "if_version": -1}, "'if_version' must be in"),
    ({"op": "chmod", "path": "/a", "uid": 2**32}, "'uid' must be in"),
    ({"op": "delete", "path": "/a", "recursive": "yes"}, "'recursive' must be a boolean"),
    ({"op": "txn", "then": {}}, "'then' must be a list"),
    ({"op": "txn", "then": [{"op": "txn"}]}, "nested transactions"),
    ({"op": "txn", "else": [{"op": "txn", "then": []}]}, "nested transactions"),
    ({"op": "txn", "then": [5]}, "must be a map"),
    ({"op": "txn", "compare": [{"path": "/a", "target": "size", "cmp": "==", "value": 1}]},
     "'target' must be one of"),
    ({"op": "txn", "compare": [{"path": "/a", "target": "version", "cmp": "<=", "value": 1}]},
     "'cmp' must be one of"),
    ({"op": "txn", "compare": [{"path": "/a", "target": "version", "cmp": "==", "value": "1"}]},
     "'value' must be an integer"),
    ({"op": "txn", "compare": [{"path": "/a", "target": "exists", "cmp": "<", "value": True}]},
     "only supports"),
    ({"op": "txn", "compare": [{"path": "/a", "target": "exists", "cmp": "==", "value": 1}]},
     "'value' must be a boolean"),
    ({"op": "txn", "compare": [{"path": "/a", "target": "value", "cmp": ">", "value": None}]},
     "null value only supports"),
    ({"op": "txn", "compare": [{"path": "/a", "target": "value", "cmp": "=="}]},
     "missing required field 'value'"),
])
def test_invalid_wire_shapes(bad, needle):
    """Malformed op dicts raise InvalidInput with a message naming the problem."""
    with pytest.raises(InvalidInput) as ei:
        op_from_wire(bad)
    assert needle in str(ei.value)


def test_invalid_paths_in_ops():
    """Paths go through afs.paths (InvalidPath / ReservedPath); depth is a limit, not a shape."""
    with pytest.raises(InvalidPath):
        op_from_wire({"op": "mkdir", "path": "/a//b"})
    with pytest.raises(ReservedPath):
        Create("/.afs/x")
    deep = "/a" * 100
    assert Mkdir(deep).path == deep


def test_txn_constructor_rejects_nested_and_foreign_items():
    """Txn validates its lists in code too, not only on the wire."""
    with pytest.raises(InvalidInput, match="nested"):
        Txn((), (Txn(),), ())
    with pytest.raises(InvalidInput):
        Txn((Create("/a"),), (), ())
    with pytest.raises(InvalidInput):
        Txn((), ({"op": "noop"},), ())


def test_command_validation_and_decode_errors():
    """Bad envelopes raise InvalidInput; an unknown format version raises UnsupportedFormat."""
    with pytest.raises(InvalidInput):
        Command(1, 0, 0, 0, 0, Noop())
    with pytest.raises(InvalidInput):
        Command("c", -1, 0, 0, 0, Noop())
    with pytest.raises(InvalidInput):
        Command("c", 0, 0, 2**32, 0, Noop())
    with pytest.raises(InvalidInput):
        Command("c", 0, 0, 0, 0, {"op": "noop"})
    with pytest.raises(InvalidInput):
        Command("x" * 300, 0, 0, 0, 0, Noop())
    for raw in (b"", b"\xc1", msgpack.packb({"a": 1}), msgpack.packb([FORMAT_VERSION, "c"]),
                msgpack.packb([FORMAT_VERSION, "c", 1, 1, 1, 1, {"op": "nope"}])):
        with pytest.raises(InvalidInput):
            Command.decode(raw)
    with pytest.raises(UnsupportedFormat):
        Command.decode(msgpack.packb([99, "c", 1, 1, 1, 1, {"op": "noop"}]))


def test_compare_matches():
    """Compare semantics, including missing values that are never ordered."""
    assert Compare("/a", "version", "<", 3).matches(2)
    assert not Compare("/a", "version", ">", 3).matches(3)
    assert Compare("/a", "value", "==", None).matches(None)
    assert not Compare("/a", "value", "<", b"b").matches(None)
    assert Compare("/a", "value", "<", b"b").matches(b"a")
    assert Compare("/a", "exists", "!=", True).matches(False)


# ------------------------------------------------------------------ limits

def test_limits_defaults_and_validate():
    """Defaults are the DESIGN.md figures; validate() rejects nonsense."""
    lim = Limits().validate()
    assert (lim.max_value_bytes, lim.max_request_bytes, lim.max_depth, lim.max_txn_ops) == \
        (1 << 20, 4 << 20, 64, 256)
    for bad in (dict(max_value_bytes=0), dict(max_depth=-1), dict(max_txn_ops=True),
                dict(max_value_bytes=10, max_request_bytes=5), dict(max_depth=5000)):
        with pytest.raises(InvalidInput):
            Limits(**bad).validate()


def test_value_too_large():
    """A value over max_value_bytes raises ValueTooLarge naming limit and size."""
    validate_limits(Set("/a", b"x" * (1 << 20)))
    with pytest.raises(ValueTooLarge) as ei:
        validate_limits(Set("/a", b"x" * ((1 << 20) + 1)))
    assert ei.value.details["limit"] == 1 << 20
    assert ei.value.details["actual"] == (1 << 20) + 1
    assert "1048577" in str(ei.value) and "1048576" in str(ei.value)
    with pytest.raises(ValueTooLarge):
        validate_limits(Txn((Compare("/a", "value", "==", b"x" * 11),), (), ()),
                        Limits(max_value_bytes=10))


def test_request_too_large():
    """Data and paths of all ops count towards max_request_bytes."""
    lim = Limits(max_value_bytes=100, max_request_bytes=250)
    validate_limits(Txn((), (Create("/a", b"x" * 100), Create("/b", b"x" * 100)), ()), lim)
    with pytest.raises(RequestTooLarge) as ei:
        validate_limits(Txn((), (Create("/a", b"x" * 100), Create("/b", b"x" * 100)),
                            (Delete("/" + "p" * 60),)), lim)
    assert ei.value.details == {"limit": 250, "actual": 204 + 61}


def test_path_too_deep():
    """Any path of an op or txn deeper than max_depth raises PathTooDeep."""
    validate_limits(Mkdir("/a" * 64))
    with pytest.raises(PathTooDeep) as ei:
        validate_limits(Mkdir("/a" * 65))
    assert ei.value.details["actual"] == 65
    with pytest.raises(PathTooDeep):
        validate_limits(Txn((Compare("/a/b/c", "exists", "==", True),), (), ()),
                        Limits(max_depth=2))


def test_too_many_ops():
    """Each txn list (compare, then, else) is limited to max_txn_ops entries."""
    validate_limits(Txn((), (Noop(),) * 256, (Noop(),) * 256))
    with pytest.raises(TooManyOps) as ei:
        validate_limits(Txn((), (Noop(),) * 257, ()))
    assert ei.value.details["limit"] == 256 and ei.value.details["actual"] == 257
    with pytest.raises(TooManyOps):
        validate_limits(Txn((Compare("/a", "exists", "==", True),) * 3, (), ()),
                        Limits(max_txn_ops=2))


def test_limit_errors_are_distinct_classes():
    """Each limit has its own error code on the wire."""
    codes = {c.code for c in (ValueTooLarge, RequestTooLarge, PathTooDeep, TooManyOps)}
    assert len(codes) == 4
