"""The operations that enter the Raft log, their wire form, and the log's ``Command`` envelope.

Contract:
- Each op is a small frozen dataclass. Constructing one validates every field (types, ranges,
  paths through :func:`afs.paths.normalize` — without the depth rule, which is a configurable
  limit checked by :func:`validate_limits`) and raises :class:`~afs.errors.InvalidInput` (or
  an InvalidPath/ReservedPath subclass) with a message naming the op and the field. So an op
  that exists is well-formed, wherever it came from.
- ``op.to_wire()`` gives the dict of docs/protocol.md "Op" (every key present, ``None`` for
  an unset optional); :func:`op_from_wire` accepts exactly those keys (optional ones may be
  absent), rejects unknown keys, wrong types and nested transactions.
- :class:`Command` is what a log entry holds: ``(client_id, seq, mtime_ns, uid, gid, op)``
  stamped by the leader's API layer. ``encode()`` is msgpack of a list whose first element is
  :data:`FORMAT_VERSION`; ``decode()`` raises InvalidInput on malformed bytes and
  :class:`~afs.errors.UnsupportedFormat` on an unknown format version.
- :func:`validate_limits` is the API's check before proposing; the state machine never calls it.
- Never pickle; msgpack with ``use_bin_type=True`` / ``raw=False``.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar, Union

import msgpack

from afs import paths
from afs.errors import (InvalidInput, PathTooDeep, RequestTooLarge, TooManyOps,
                        UnsupportedFormat, ValueTooLarge)
from afs.limits import DEFAULT_LIMITS, Limits

FORMAT_VERSION = 1
MAX_MODE = 0o7777
MAX_ID = 2**32 - 1
MAX_U64 = 2**64 - 1
MAX_CLIENT_ID_BYTES = 256

COMPARE_TARGETS = ("version", "mod_revision", "create_revision", "value", "exists")
COMPARE_OPS = ("==", "!=", "<", ">")


# ---------------------------------------------------------------- field checks

def _bad(where: str, msg: str, **details):
    raise InvalidInput(f"{where}: {msg}", **details)


def _path(where: str, v) -> str:
    if type(v) is not str:
        _bad(where, f"'path' must be a string, got {type(v).__name__}", field="path")
    return paths.normalize(v, max_depth=None)


def _bool(where: str, name: str, v) -> None:
    if type(v) is not bool:
        _bad(where, f"{name!r} must be a boolean, got {type(v).__name__}", field=name)


def _data(where: str, name: str, v) -> bytes:
    if type(v) is bytes:
        return v
    if isinstance(v, (bytearray, memoryview)):
        return bytes(v)
    _bad(where, f"{name!r} must be bytes, got {type(v).__name__}", field=name)


def _int(where: str, name: str, v, lo: int, hi: int, optional: bool = True) -> None:
    if v is None and optional:
        return
    if type(v) is not int:
        _bad(where, f"{name!r} must be an integer{' or null' if optional else ''}, "
                    f"got {type(v).__name__}", field=name)
    if not lo <= v <= hi:
        shown = oct(v) if name == "mode" else v
        _bad(where, f"{name!r} must be in [{lo}, {oct(hi) if name == 'mode' else hi}], "
                    f"got {shown}", field=name)


# ---------------------------------------------------------------- ops

@dataclass(frozen=True, slots=True)
class Create:
    """Create a file; ``exists`` if the path exists. ``parents`` creates missing dirs."""

    OP: ClassVar[str] = "create"
    path: str
    data: bytes = b""
    mode: int | None = None
    parents: bool = False

    def __post_init__(self):
        object.__setattr__(self, "path", _path("create", self.path))
        object.__setattr__(self, "data", _data("create", "data", self.data))
        _int("create", "mode", self.mode, 0, MAX_MODE)
        _bool("create", "parents", self.parents)

    def to_wire(self) -> dict:
        return {"op": "create", "path": self.path, "data": self.data, "mode": self.mode,
                "parents": self.parents}


@dataclass(frozen=True, slots=True)
class Set:
    """Replace a file's data (always bumps its version). ``if_version``/``if_mod_revision``
    guard it (0 = "must not exist"); ``upsert`` creates a missing file (``parents``: and its
    missing dirs); ``mode``, when given, is applied too."""

    OP: ClassVar[str] = "set"
    path: str
    data: bytes
    if_version: int | None = None
    if_mod_revision: int | None = None
    upsert: bool = False
    parents: bool = False
    mode: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "path", _path("set", self.path))
        object.__setattr__(self, "data", _data("set", "data", self.data))
        _int("set", "if_version", self.if_version, 0, MAX_U64)
        _int("set", "if_mod_revision", self.if_mod_revision, 0, MAX_U64)
        _bool("set", "upsert", self.upsert)
        _bool("set", "parents", self.parents)
        _int("set", "mode", self.mode, 0, MAX_MODE)

    def to_wire(self) -> dict:
        return {"op": "set", "path": self.path, "data": self.data, "if_version": self.if_version,
                "if_mod_revision": self.if_mod_revision, "upsert": self.upsert,
                "parents": self.parents, "mode": self.mode}


@dataclass(frozen=True, slots=True)
class Mkdir:
    """Create a directory. With ``parents`` (mkdir -p): missing ancestors too, and an existing
    directory is success without a change."""

    OP: ClassVar[str] = "mkdir"
    path: str
    parents: bool = False
    mode: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "path", _path("mkdir", self.path))
        _bool("mkdir", "parents", self.parents)
        _int("mkdir", "mode", self.mode, 0, MAX_MODE)

    def to_wire(self) -> dict:
        return {"op": "mkdir", "path": self.path, "parents": self.parents, "mode": self.mode}


@dataclass(frozen=True, slots=True)
class Delete:
    """Delete a node; a non-empty directory needs ``recursive``."""

    OP: ClassVar[str] = "delete"
    path: str
    recursive: bool = False
    if_version: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "path", _path("delete", self.path))
        _bool("delete", "recursive", self.recursive)
        _int("delete", "if_version", self.if_version, 0, MAX_U64)

    def to_wire(self) -> dict:
        return {"op": "delete", "path": self.path, "recursive": self.recursive,
                "if_version": self.if_version}


@dataclass(frozen=True, slots=True)
class Chmod:
    """Change mode and/or owner; ``None`` leaves a field unchanged."""

    OP: ClassVar[str] = "chmod"
    path: str
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "path", _path("chmod", self.path))
        _int("chmod", "mode", self.mode, 0, MAX_MODE)
        _int("chmod", "uid", self.uid, 0, MAX_ID)
        _int("chmod", "gid", self.gid, 0, MAX_ID)

    def to_wire(self) -> dict:
        return {"op": "chmod", "path": self.path, "mode": self.mode, "uid": self.uid,
                "gid": self.gid}


@dataclass(frozen=True, slots=True)
class Noop:
    """Changes nothing, consumes no revision (used to order reads through the log)."""

    OP: ClassVar[str] = "noop"

    def to_wire(self) -> dict:
        return {"op": "noop"}


@dataclass(frozen=True, slots=True)
class Compare:
    """A txn guard. A missing node has version/revisions 0, value ``None``, exists false; a
    directory's value is ``None``. ``<``/``>`` on values compare bytes lexicographically and
    are not allowed against ``None``; ``exists`` takes ``==``/``!=`` only."""

    path: str
    target: str
    cmp: str
    value: Any

    def __post_init__(self):
        object.__setattr__(self, "path", _path("compare", self.path))
        if self.target not in COMPARE_TARGETS:
            _bad("compare", f"'target' must be one of {', '.join(COMPARE_TARGETS)}, "
                            f"got {self.target!r}", field="target")
        if self.cmp not in COMPARE_OPS:
            _bad("compare", f"'cmp' must be one of {' '.join(COMPARE_OPS)}, got {self.cmp!r}",
                 field="cmp")
        v = self.value
        if self.target == "exists":
            _bool("compare", "value", v)
            if self.cmp not in ("==", "!="):
                _bad("compare", "target 'exists' only supports '==' and '!='", field="cmp")
        elif self.target == "value":
            if v is None:
                if self.cmp not in ("==", "!="):
                    _bad("compare", "a null value only supports '==' and '!='", field="cmp")
            else:
                object.__setattr__(self, "value", _data("compare", "value", v))
        else:
            _int("compare", "value", v, 0, MAX_U64, optional=False)

    def matches(self, actual) -> bool:
        """Evaluate against the node's actual target value (see class doc for missing nodes)."""
        want, c = self.value, self.cmp
        if c == "==":
            return actual == want
        if c == "!=":
            return actual != want
        if actual is None:  # value of a missing node / a directory: not ordered
            return False
        return actual < want if c == "<" else actual > want

    def to_wire(self) -> dict:
        return {"path": self.path, "target": self.target, "cmp": self.cmp, "value": self.value}

    @classmethod
    def from_wire(cls, d) -> "Compare":
        if not isinstance(d, dict):
            _bad("compare", f"must be a map, got {type(d).__name__}")
        _check_keys("compare", d, ("path", "target", "cmp", "value"), required=("path", "target",
                                                                                "cmp", "value"))
        return cls(d["path"], d["target"], d["cmp"], d["value"])


SimpleOp = Union[Create, Set, Mkdir, Delete, Chmod, Noop]


@dataclass(frozen=True, slots=True)
class Txn:
    """If every compare holds, apply ``then_ops`` else ``else_ops``: all-or-nothing, one
    revision. Nested transactions are not allowed."""

    OP: ClassVar[str] = "txn"
    compares: tuple = ()
    then_ops: tuple = ()
    else_ops: tuple = ()

    def __post_init__(self):
        for name, kinds in (("compares", (Compare,)), ("then_ops", _SIMPLE), ("else_ops", _SIMPLE)):
            seq = getattr(self, name)
            if not isinstance(seq, (list, tuple)):
                _bad("txn", f"{name!r} must be a list, got {type(seq).__name__}", field=name)
            for i, item in enumerate(seq):
                if isinstance(item, Txn):
                    _bad("txn", f"nested transactions are not allowed ({name}[{i}])",
                         field=name, op_index=i)
                if not isinstance(item, kinds):
                    _bad("txn", f"{name}[{i}] must be a "
                                f"{'Compare' if name == 'compares' else 'non-txn op'}, "
                                f"got {type(item).__name__}", field=name, op_index=i)
            object.__setattr__(self, name, tuple(seq))

    def to_wire(self) -> dict:
        return {"op": "txn", "compare": [c.to_wire() for c in self.compares],
                "then": [o.to_wire() for o in self.then_ops],
                "else": [o.to_wire() for o in self.else_ops]}


_SIMPLE = (Create, Set, Mkdir, Delete, Chmod, Noop)
Op = Union[Create, Set, Mkdir, Delete, Chmod, Noop, Txn]

_BY_NAME: dict[str, type] = {c.OP: c for c in (Create, Set, Mkdir, Delete, Chmod, Noop, Txn)}
_REQUIRED = {"create": ("path",), "set": ("path", "data"), "mkdir": ("path",),
             "delete": ("path",), "chmod": ("path",), "noop": (), "txn": ()}


def _check_keys(where: str, d: dict, allowed, required) -> None:
    for k in d:
        if k not in allowed:
            _bad(where, f"unknown field {k!r} (allowed: {', '.join(allowed)})", field=str(k))
    for k in required:
        if k not in d:
            _bad(where, f"missing required field {k!r}", field=k)


def op_from_wire(d, *, _nested: bool = False) -> Op:
    """Build an op from its docs/protocol.md dict; InvalidInput (with the reason) otherwise."""
    if not isinstance(d, dict):
        _bad("op", f"must be a map, got {type(d).__name__}")
    name = d.get("op")
    cls = _BY_NAME.get(name) if isinstance(name, str) else None
    if cls is None:
        _bad("op", f"unknown op {name!r} (expected one of {', '.join(_BY_NAME)})", field="op")
    if cls is Txn:
        if _nested:
            _bad("txn", "nested transactions are not allowed")
        _check_keys("txn", d, ("op", "compare", "then", "else"), ())
        lists = {}
        for key in ("compare", "then", "else"):
            v = d.get(key, [])
            if v is None:
                v = []
            if not isinstance(v, (list, tuple)):
                _bad("txn", f"{key!r} must be a list, got {type(v).__name__}", field=key)
            lists[key] = v
        compares = [Compare.from_wire(c) for c in lists["compare"]]
        then_ops = []
        for i, o in enumerate(lists["then"]):
            then_ops.append(_nested_op(o, "then", i))
        else_ops = []
        for i, o in enumerate(lists["else"]):
            else_ops.append(_nested_op(o, "else", i))
        return Txn(tuple(compares), tuple(then_ops), tuple(else_ops))
    names = [f.name for f in fields(cls)]
    _check_keys(name, d, ("op", *names), _REQUIRED[name])
    kwargs = {k: v for k, v in d.items() if k != "op"}
    # optional booleans may be sent as null by lenient clients: treat as the default
    for f in fields(cls):
        if f.name in kwargs and kwargs[f.name] is None and f.default is False:
            kwargs[f.name] = False
    return cls(**kwargs)


def _nested_op(o, branch: str, i: int):
    if isinstance(o, dict) and o.get("op") == "txn":
        _bad("txn", f"nested transactions are not allowed ({branch}[{i}])",
             field=branch, op_index=i)
    return op_from_wire(o, _nested=True)


# ---------------------------------------------------------------- the log envelope

@dataclass(frozen=True, slots=True)
class Command:
    """One log entry: who (``client_id``, ``seq`` for dedupe; ``""`` = no dedupe), when
    (``mtime_ns``, stamped by the leader when proposing), as whom (``uid``, ``gid``: owner of
    created nodes), and what (``op``)."""

    client_id: str
    seq: int
    mtime_ns: int
    uid: int
    gid: int
    op: Op

    def __post_init__(self):
        if type(self.client_id) is not str:
            _bad("command", f"'client_id' must be a string, got {type(self.client_id).__name__}",
                 field="client_id")
        if len(self.client_id) > MAX_CLIENT_ID_BYTES // 4 and \
                len(self.client_id.encode("utf-8", "surrogatepass")) > MAX_CLIENT_ID_BYTES:
            _bad("command", f"'client_id' is longer than {MAX_CLIENT_ID_BYTES} bytes",
                 field="client_id")
        _int("command", "seq", self.seq, 0, MAX_U64, optional=False)
        _int("command", "mtime_ns", self.mtime_ns, 0, MAX_U64, optional=False)
        _int("command", "uid", self.uid, 0, MAX_ID, optional=False)
        _int("command", "gid", self.gid, 0, MAX_ID, optional=False)
        if not isinstance(self.op, (*_SIMPLE, Txn)):
            _bad("command", f"'op' must be an op, got {type(self.op).__name__}", field="op")

    def encode(self) -> bytes:
        return msgpack.packb([FORMAT_VERSION, self.client_id, self.seq, self.mtime_ns, self.uid,
                              self.gid, self.op.to_wire()], use_bin_type=True)

    @classmethod
    def decode(cls, data: bytes) -> "Command":
        try:
            raw = msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True)
        except Exception as exc:  # msgpack raises several unrelated types
            raise InvalidInput(f"command: undecodable msgpack ({type(exc).__name__}: {exc})"
                               ) from None
        if not isinstance(raw, list) or not raw or type(raw[0]) is not int:
            _bad("command", "must be a list starting with a format version")
        if raw[0] != FORMAT_VERSION:
            raise UnsupportedFormat(f"command: format version {raw[0]} is not supported "
                                    f"(this build reads {FORMAT_VERSION})",
                                    version=raw[0], supported=FORMAT_VERSION)
        if len(raw) != 7:
            _bad("command", f"expected 7 elements, got {len(raw)}")
        _, client_id, seq, mtime_ns, uid, gid, op = raw
        return cls(client_id, seq, mtime_ns, uid, gid, op_from_wire(op))


# ---------------------------------------------------------------- limits

def _op_paths_and_data(op) -> list[tuple[str, bytes | None, str]]:
    """(path, value, kind) triples of an op: kind 'data' for file data, 'compare' for values."""
    if isinstance(op, Noop):
        return []
    if isinstance(op, (Create, Set)):
        return [(op.path, op.data, "data")]
    return [(op.path, None, "")]


def validate_limits(op: Op, limits: Limits = DEFAULT_LIMITS) -> None:
    """Raise TooManyOps / PathTooDeep / ValueTooLarge / RequestTooLarge (each naming the limit
    and the actual size) if ``op`` exceeds ``limits``. Request size = all data, compare values
    and path bytes. Txn op counts: compare, then and else are each limited separately."""
    items: list[tuple[str, bytes | None, str]] = []
    if isinstance(op, Txn):
        for name, seq in (("compare", op.compares), ("then", op.then_ops),
                          ("else", op.else_ops)):
            if len(seq) > limits.max_txn_ops:
                raise TooManyOps(f"txn {name!r} has {len(seq)} entries, the limit is "
                                 f"{limits.max_txn_ops}", limit=limits.max_txn_ops,
                                 actual=len(seq), field=name)
        for c in op.compares:
            items.append((c.path, c.value if isinstance(c.value, bytes) else None, "compare"))
        for o in (*op.then_ops, *op.else_ops):
            items.extend(_op_paths_and_data(o))
    else:
        items.extend(_op_paths_and_data(op))
    total = 0
    for path, value, kind in items:
        d = paths.depth(path)
        if d > limits.max_depth:
            raise PathTooDeep(f"path {path!r} has depth {d}, the limit is {limits.max_depth}",
                              path=path, limit=limits.max_depth, actual=d)
        total += len(path.encode("utf-8"))
        if value is not None:
            if len(value) > limits.max_value_bytes:
                what = "value" if kind == "data" else "compare value"
                raise ValueTooLarge(f"{what} for {path!r} is {len(value)} bytes, the limit is "
                                    f"{limits.max_value_bytes}", path=path,
                                    limit=limits.max_value_bytes, actual=len(value))
            total += len(value)
    if total > limits.max_request_bytes:
        raise RequestTooLarge(f"request is {total} bytes (data + compare values + paths), the "
                              f"limit is {limits.max_request_bytes}",
                              limit=limits.max_request_bytes, actual=total)
