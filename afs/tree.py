"""KeyTree: the deterministic state machine of AFS, and its adapter for the Raft driver.

Contract
--------
- **Deterministic.** No I/O, no clock, no randomness, no dependence on dict/set iteration
  order for anything observable (children are sorted whenever they are listed, walked,
  deleted or snapshotted). The same sequence of :meth:`KeyTree.apply_command` calls produces
  the same results, events and :meth:`KeyTree.snapshot` bytes on every member.
- **Not thread-safe.** One thread (the apply loop) mutates; reads must run on that thread,
  between applies (they then see exactly one revision).
- **Domain failures are results.** ``apply_command`` returns ``{"error": AfsError.to_wire()}``
  for not_found / exists / version_mismatch / not_empty / not_a_directory / is_a_directory /
  invalid (deleting the root) / stale_request, and never raises for them. An exception from
  ``apply_command`` is a bug; the tree is rolled back to its state before the call first.
- **Revisions.** One dense global counter. Each command that changes something consumes
  exactly one revision (a txn is one revision); a command that changes nothing (a failure,
  ``noop``, ``mkdir -p`` of an existing dir, ``chmod`` to the same values, a txn whose chosen
  branch is empty or changes nothing) consumes none and answers the current revision. Hence
  every revision has at least one event.
- **All-or-nothing.** Every command is applied through an undo log; if any op of a txn's
  chosen branch fails, everything is undone and the error carries ``details.op_index`` and
  ``details.branch``.

Semantics (decisions; to be recorded in docs/)
----------------------------------------
- Created nodes have ``version`` 1 and ``create_revision == mod_revision`` = the revision;
  a missing node compares as version 0 / revisions 0 / value None / exists false.
- ``set`` always bumps ``version`` and ``mod_revision`` (even with identical data) and stamps
  ``mtime_ns``; ``mode`` given on ``set`` is applied too. ``chmod`` that changes something
  bumps ``version`` and ``mod_revision`` but keeps ``mtime_ns`` (data modification time).
- **Directory stats do not change when their child set changes** (etcd-like; no ZooKeeper
  ``cversion``): adding/removing a child emits an event for the child only. A directory's
  ``size`` is 0. Consumers that cache listings (the FUSE mount) invalidate the parent of
  every event path themselves.
- ``create``/``set(upsert)``/``mkdir`` with ``parents`` create missing ancestors with mode
  0755 and the command's uid/gid, emitting one ``created`` event per new directory, top-down.
- Recursive delete emits one ``deleted`` event per removed node, children before parents,
  siblings in name order; a deleted event carries the node's last stat and no data.
- Owner of created nodes: the command's ``uid``/``gid``; ``set`` on an existing file keeps it.

Dedupe
------
The tree remembers the last ``(seq, result)`` per non-empty ``client_id``. A command with the
same seq is answered from memory without applying; a lower seq answers ``stale_request``.
Bounded to ``dedupe_max_clients`` (least-recently-*stored* evicted first) and expiring after
``dedupe_ttl_ns`` of the tree's *state clock* (the maximum ``mtime_ns`` seen in commands — log
data, so deterministic; never the local clock). Both bounds and the table live in snapshots,
and a restored tree uses the snapshot's bounds.
"""
from __future__ import annotations

from collections import OrderedDict

import crc32c
import msgpack

from afs.errors import (AfsError, AlreadyExists, InvalidInput, IsADirectory, NotADirectory,
                        NotEmpty, NotFound, RevisionGap, StaleRequest, StorageCorrupt,
                        UnsupportedFormat, VersionMismatch)
from afs.model import DEFAULT_DIR_MODE, DEFAULT_FILE_MODE, Event, EventType, NodeKind, Stat
from afs.ops import Chmod, Command, Create, Delete, Mkdir, Noop, Set, Txn

ROOT = "/"
SNAPSHOT_FORMAT = 1
DEFAULT_DEDUPE_MAX_CLIENTS = 10_000
DEFAULT_DEDUPE_TTL_NS = 3600 * 10**9  # one hour of leader-stamped time

_DIR, _FILE = NodeKind.DIR, NodeKind.FILE
_KIND_CODE = {NodeKind.DIR: 0, NodeKind.FILE: 1}   # snapshot encoding (2 reserved: symlink)
_CREATED, _UPDATED, _DELETED = EventType.CREATED, EventType.UPDATED, EventType.DELETED

# undo-log record kinds
_U_ADD, _U_REMOVE, _U_REPLACE = 0, 1, 2


class _Node:
    """A directory (``children`` is a set of names, ``data`` None) or a file (``data`` bytes,
    ``children`` None)."""

    __slots__ = ("stat", "data", "children")

    def __init__(self, stat: Stat, data: bytes | None, children: set | None):
        self.stat = stat
        self.data = data
        self.children = children


def _split(path: str) -> tuple[str, str]:
    i = path.rfind("/")
    return (path[:i] or ROOT), path[i + 1:]


def _child(path: str, name: str) -> str:
    return ("/" + name) if path == ROOT else (path + "/" + name)


def _ancestors(path: str) -> list[str]:
    """Proper ancestors below the root, top-down: /a/b/c -> [/a, /a/b]."""
    out = []
    i = path.find("/", 1)
    while i != -1:
        out.append(path[:i])
        i = path.find("/", i + 1)
    return out


def _kind_name(node: _Node) -> str:
    return "directory" if node.children is not None else "file"


class KeyTree:
    """The replicated key tree. See the module docstring for the contract."""

    def __init__(self, *, dedupe_max_clients: int = DEFAULT_DEDUPE_MAX_CLIENTS,
                 dedupe_ttl_ns: int = DEFAULT_DEDUPE_TTL_NS):
        if dedupe_max_clients < 1 or dedupe_ttl_ns < 1:
            raise InvalidInput("dedupe bounds must be positive")
        self._nodes: dict[str, _Node] = {
            ROOT: _Node(Stat(_DIR, 0, 0, 0, 0, DEFAULT_DIR_MODE, 0, 0, 0), None, set())}
        self._revision = 0
        self._dedupe: OrderedDict[str, list] = OrderedDict()  # cid -> [seq, result, clock]
        self._dedupe_max = dedupe_max_clients
        self._dedupe_ttl = dedupe_ttl_ns
        self._clock = 0
        # per-apply scratch
        self._undo: list | None = None
        self._events: list | None = None
        self._rev = 0

    # ------------------------------------------------------------------ properties

    @property
    def revision(self) -> int:
        """The revision of the last committed change (0: empty tree)."""
        return self._revision

    def __len__(self) -> int:
        """Number of nodes, root included."""
        return len(self._nodes)

    def exists(self, path: str) -> bool:
        return path in self._nodes

    @property
    def dedupe_size(self) -> int:
        return len(self._dedupe)

    # ------------------------------------------------------------------ reads

    def _not_found(self, path: str, what: str = "") -> AfsError:
        """The error for a missing ``path``: NotADirectory if an ancestor is a file, else
        NotFound (saying which parent is missing, if it is)."""
        prefix = f"{what} {path}: " if what else f"{path}: "
        for a in _ancestors(path):
            n = self._nodes.get(a)
            if n is None:
                return NotFound(f"{prefix}no such node (parent directory {a} does not exist)",
                                path=path, missing=a)
            if n.children is None:
                return NotADirectory(f"{prefix}{a} is a file, not a directory",
                                     path=path, file=a)
        return NotFound(f"{prefix}no such node", path=path)

    def _node(self, path: str) -> _Node:
        node = self._nodes.get(path)
        if node is None:
            raise self._not_found(path)
        return node

    def node_entry(self, path: str) -> tuple[Stat, bytes | None, tuple[str, ...] | None] | None:
        """``(stat, data, children)`` of ``path`` (children sorted; data None for a directory,
        children None for a file), or None if missing. For replicas that build read views."""
        n = self._nodes.get(path)
        if n is None:
            return None
        return (n.stat, n.data, tuple(sorted(n.children)) if n.children is not None else None)

    def all_entries(self) -> dict[str, tuple[Stat, bytes | None, tuple[str, ...] | None]]:
        """Every node as :meth:`node_entry` gives it (O(n); for building a replica view)."""
        return {p: (n.stat, n.data, tuple(sorted(n.children)) if n.children is not None else None)
                for p, n in self._nodes.items()}

    def stat(self, path: str) -> Stat:
        """Stat of the node at a normalised ``path``; NotFound / NotADirectory."""
        return self._node(path).stat

    def get(self, path: str) -> tuple[bytes, Stat]:
        """``(data, stat)`` of a file; IsADirectory for a directory."""
        node = self._node(path)
        if node.children is not None:
            raise IsADirectory(f"{path}: is a directory", path=path)
        return node.data, node.stat

    def list(self, path: str) -> list[tuple[str, Stat]]:
        """``[(name, stat)]`` of a directory's children, sorted by name; NotADirectory."""
        node = self._node(path)
        if node.children is None:
            raise NotADirectory(f"{path}: is a file, not a directory", path=path)
        nodes = self._nodes
        return [(name, nodes[_child(path, name)].stat) for name in sorted(node.children)]

    def walk(self, path: str = ROOT, with_data: bool = True
             ) -> list[tuple[str, Stat, bytes | None]]:
        """``[(path, stat, data|None)]`` of ``path`` and everything below it, pre-order,
        siblings sorted by name (data None for dirs or when ``with_data`` is false)."""
        self._node(path)
        nodes = self._nodes
        out = []
        stack = [path]
        while stack:
            p = stack.pop()
            n = nodes[p]
            out.append((p, n.stat, n.data if with_data else None))
            if n.children:
                stack.extend(_child(p, c) for c in sorted(n.children, reverse=True))
        return out

    # ------------------------------------------------------------------ mutation primitives

    def _add(self, path: str, node: _Node, data: bytes | None) -> None:
        parent, name = _split(path)
        self._nodes[path] = node
        self._nodes[parent].children.add(name)
        self._undo.append((_U_ADD, path))
        self._events.append(Event(self._rev, _CREATED, path, node.stat, data))

    def _remove(self, path: str) -> None:
        parent, name = _split(path)
        node = self._nodes.pop(path)
        self._nodes[parent].children.discard(name)
        self._undo.append((_U_REMOVE, path, node))
        self._events.append(Event(self._rev, _DELETED, path, node.stat, None))

    def _replace(self, path: str, node: _Node, stat: Stat, data: bytes | None) -> None:
        self._undo.append((_U_REPLACE, node, node.stat, node.data))
        node.stat = stat
        node.data = data
        self._events.append(Event(self._rev, _UPDATED, path, stat, data))

    def _begin(self, rev: int) -> None:
        self._undo = []
        self._events = []
        self._rev = rev

    def _rollback(self) -> None:
        nodes = self._nodes
        for rec in reversed(self._undo):
            if rec[0] == _U_ADD:
                parent, name = _split(rec[1])
                del nodes[rec[1]]
                nodes[parent].children.discard(name)
            elif rec[0] == _U_REMOVE:
                parent, name = _split(rec[1])
                nodes[rec[1]] = rec[2]
                nodes[parent].children.add(name)
            else:
                rec[1].stat, rec[1].data = rec[2], rec[3]
        self._undo = self._events = None

    def _commit(self) -> list[Event]:
        events = self._events
        if events:
            self._revision = self._rev
        self._undo = self._events = None
        return events

    # ------------------------------------------------------------------ ops

    def _new_dir(self, path: str, mode: int | None, cmd: Command) -> None:
        rev = self._rev
        self._add(path, _Node(Stat(_DIR, rev, rev, 1, cmd.mtime_ns,
                                   DEFAULT_DIR_MODE if mode is None else mode,
                                   cmd.uid, cmd.gid, 0), None, set()), None)

    def _new_file(self, path: str, data: bytes, mode: int | None, cmd: Command) -> None:
        rev = self._rev
        self._add(path, _Node(Stat(_FILE, rev, rev, 1, cmd.mtime_ns,
                                   DEFAULT_FILE_MODE if mode is None else mode,
                                   cmd.uid, cmd.gid, len(data)), data, None), data)

    def _ensure_parent(self, path: str, what: str, parents: bool, cmd: Command) -> None:
        """Make sure ``path``'s parent is a directory (creating missing ones if ``parents``)."""
        parent = _split(path)[0]
        p = self._nodes.get(parent)
        if p is not None:
            if p.children is None:
                raise NotADirectory(f"{what} {path}: {parent} is a file, not a directory",
                                    path=path, file=parent)
            return
        if not parents:
            raise self._not_found(path, what)
        for a in _ancestors(path):
            n = self._nodes.get(a)
            if n is None:
                self._new_dir(a, None, cmd)
            elif n.children is None:
                raise NotADirectory(f"{what} {path}: {a} is a file, not a directory",
                                    path=path, file=a)

    def _op_create(self, op: Create, cmd: Command) -> None:
        node = self._nodes.get(op.path)
        if node is not None:
            raise AlreadyExists(f"create {op.path}: already exists (a {_kind_name(node)})",
                                path=op.path)
        self._ensure_parent(op.path, "create", op.parents, cmd)
        self._new_file(op.path, op.data, op.mode, cmd)

    def _op_set(self, op: Set, cmd: Command) -> None:
        path = op.path
        node = self._nodes.get(path)
        if node is None:
            if not op.upsert:
                raise self._not_found(path, "set")
            for name, want in (("if_version", op.if_version),
                               ("if_mod_revision", op.if_mod_revision)):
                if want:  # None or 0 ("must not exist") pass
                    raise VersionMismatch(f"set {path}: {name} {want} expected, but the node "
                                          f"does not exist", path=path, expected=want, actual=0,
                                          field=name)
            self._ensure_parent(path, "set", op.parents, cmd)
            self._new_file(path, op.data, op.mode, cmd)
            return
        if node.children is not None:
            raise IsADirectory(f"set {path}: is a directory", path=path)
        st = node.stat
        if op.if_version is not None and op.if_version != st.version:
            raise VersionMismatch(f"set {path}: if_version {op.if_version} expected, the node "
                                  f"is at version {st.version}", path=path,
                                  expected=op.if_version, actual=st.version, field="if_version")
        if op.if_mod_revision is not None and op.if_mod_revision != st.mod_revision:
            raise VersionMismatch(f"set {path}: if_mod_revision {op.if_mod_revision} expected, "
                                  f"the node is at mod_revision {st.mod_revision}", path=path,
                                  expected=op.if_mod_revision, actual=st.mod_revision,
                                  field="if_mod_revision")
        data = op.data
        self._replace(path, node, Stat(_FILE, st.create_revision, self._rev, st.version + 1,
                                       cmd.mtime_ns, st.mode if op.mode is None else op.mode,
                                       st.uid, st.gid, len(data)), data)

    def _op_mkdir(self, op: Mkdir, cmd: Command) -> None:
        node = self._nodes.get(op.path)
        if node is not None:
            if op.parents and node.children is not None:
                return  # mkdir -p of an existing directory: success, no change
            raise AlreadyExists(f"mkdir {op.path}: already exists (a {_kind_name(node)})",
                                path=op.path)
        self._ensure_parent(op.path, "mkdir", op.parents, cmd)
        self._new_dir(op.path, op.mode, cmd)

    def _op_delete(self, op: Delete, cmd: Command) -> None:
        path = op.path
        if path == ROOT:
            raise InvalidInput("delete /: the root directory cannot be deleted", path=path)
        node = self._nodes.get(path)
        if node is None:
            raise self._not_found(path, "delete")
        if op.if_version is not None and op.if_version != node.stat.version:
            raise VersionMismatch(f"delete {path}: if_version {op.if_version} expected, the "
                                  f"node is at version {node.stat.version}", path=path,
                                  expected=op.if_version, actual=node.stat.version,
                                  field="if_version")
        if node.children:
            if not op.recursive:
                raise NotEmpty(f"delete {path}: directory has {len(node.children)} "
                               f"children (use recursive)", path=path,
                               children=len(node.children))
            # reversed (node, then children in descending order) pre-order == post-order
            # with siblings ascending: children before parents, deterministic.
            nodes = self._nodes
            order = []
            stack = [path]
            while stack:
                p = stack.pop()
                order.append(p)
                ch = nodes[p].children
                if ch:
                    stack.extend(_child(p, c) for c in sorted(ch))
            for p in reversed(order):
                self._remove(p)
        else:
            self._remove(path)

    def _op_chmod(self, op: Chmod, cmd: Command) -> None:
        node = self._nodes.get(op.path)
        if node is None:
            raise self._not_found(op.path, "chmod")
        st = node.stat
        mode = st.mode if op.mode is None else op.mode
        uid = st.uid if op.uid is None else op.uid
        gid = st.gid if op.gid is None else op.gid
        if (mode, uid, gid) == (st.mode, st.uid, st.gid):
            return  # nothing changes: no revision
        self._replace(op.path, node, Stat(st.kind, st.create_revision, self._rev,
                                          st.version + 1, st.mtime_ns, mode, uid, gid, st.size),
                      node.data)

    _DISPATCH = {Create: _op_create, Set: _op_set, Mkdir: _op_mkdir, Delete: _op_delete,
                 Chmod: _op_chmod}

    def _compare(self, c) -> bool:
        node = self._nodes.get(c.path)
        t = c.target
        if t == "exists":
            actual = node is not None
        elif node is None:
            actual = None if t == "value" else 0
        elif t == "value":
            actual = node.data
        else:
            actual = getattr(node.stat, t)
        return c.matches(actual)

    # ------------------------------------------------------------------ apply

    def apply_command(self, cmd: Command) -> tuple[dict, list[Event]]:
        """Apply one log command; returns ``(result, events)`` (see module docstring).

        ``result`` is the docs/protocol.md write result or ``{"error": {...}}``; treat it as
        read-only (the dedupe table keeps a reference)."""
        if cmd.mtime_ns > self._clock:
            self._clock = cmd.mtime_ns
        self._expire()
        cid = cmd.client_id
        if cid:
            entry = self._dedupe.get(cid)
            if entry is not None:
                if cmd.seq == entry[0]:
                    return entry[1], []
                if cmd.seq < entry[0]:
                    err = StaleRequest(f"request {cmd.seq} of client {cid!r} is older than its "
                                       f"last applied request {entry[0]}; its result is no "
                                       f"longer known and it was not applied",
                                       client_id=cid, seq=cmd.seq, last_seq=entry[0])
                    return {"error": err.to_wire()}, []
        result, events = self._execute(cmd)
        if cid:
            d = self._dedupe
            d[cid] = [cmd.seq, result, self._clock]
            d.move_to_end(cid)
            while len(d) > self._dedupe_max:
                d.popitem(last=False)
        return result, events

    def _expire(self) -> None:
        d = self._dedupe
        horizon = self._clock - self._dedupe_ttl
        # entries are in store order and the state clock never decreases: oldest first
        while d:
            first = next(iter(d.values()))
            if first[2] >= horizon:
                break
            d.popitem(last=False)

    def _execute(self, cmd: Command) -> tuple[dict, list[Event]]:
        op = cmd.op
        if isinstance(op, Noop):
            return {"revision": self._revision}, []
        self._begin(self._revision + 1)
        txn = isinstance(op, Txn)
        succeeded = True
        n = 0
        try:
            if txn:
                succeeded = all(self._compare(c) for c in op.compares)
                branch = op.then_ops if succeeded else op.else_ops
                bname = "then" if succeeded else "else"
                for i, o in enumerate(branch):
                    if isinstance(o, Noop):
                        continue
                    try:
                        self._DISPATCH[type(o)](self, o, cmd)
                    except AfsError as exc:
                        exc.details["op_index"] = i
                        exc.details["branch"] = bname
                        exc.message = f"txn {bname}[{i}]: {exc.message}"
                        raise
                n = len(branch)
            else:
                self._DISPATCH[type(op)](self, op, cmd)
        except AfsError as exc:
            self._rollback()
            return {"error": exc.to_wire()}, []
        except BaseException:
            self._rollback()
            raise
        events = self._commit()
        rev = self._revision
        if txn:
            return {"revision": rev, "succeeded": succeeded,
                    "results": [{"revision": rev} for _ in range(n)]}, events
        return {"revision": rev}, events

    # ------------------------------------------------------------------ replicas

    def apply_events(self, revision: int, events: list[Event]) -> None:
        """Apply one server-produced event group (all events of ``revision``) to this replica.

        Atomic: on any inconsistency nothing changes. RevisionGap if ``revision`` is not
        ``self.revision + 1``; InvalidInput if the events do not fit this tree (the replica
        must then resync from a snapshot). Events must carry file data."""
        if revision != self._revision + 1:
            raise RevisionGap(f"events of revision {revision} do not follow the replica's "
                              f"revision {self._revision}", revision=revision,
                              expected=self._revision + 1)
        if not events:
            raise InvalidInput(f"revision {revision} has no events")
        self._begin(revision)
        nodes = self._nodes
        try:
            for ev in events:
                path, st = ev.path, ev.stat
                if ev.revision != revision:
                    raise InvalidInput(f"event for {path} has revision {ev.revision}, "
                                       f"expected {revision}")
                is_dir = st.kind is _DIR
                if not is_dir and ev.type is not _DELETED and \
                        (ev.data is None or len(ev.data) != st.size):
                    raise InvalidInput(f"event for file {path} lacks its data (or its size "
                                       f"does not match)")
                if ev.type is _CREATED:
                    if path in nodes:
                        raise InvalidInput(f"created event for existing node {path}")
                    if path == ROOT:
                        raise InvalidInput("created event for the root")
                    p = nodes.get(_split(path)[0])
                    if p is None or p.children is None:
                        raise InvalidInput(f"created event for {path}: parent is not a "
                                           f"directory in the replica")
                    self._add(path, _Node(st, None if is_dir else ev.data,
                                          set() if is_dir else None), ev.data)
                elif ev.type is _UPDATED:
                    node = nodes.get(path)
                    if node is None or (node.children is not None) != is_dir:
                        raise InvalidInput(f"updated event for {path} does not match the "
                                           f"replica's node")
                    self._replace(path, node, st, None if is_dir else ev.data)
                else:
                    node = nodes.get(path)
                    if node is None or path == ROOT:
                        raise InvalidInput(f"deleted event for missing node {path}")
                    if node.children:
                        raise InvalidInput(f"deleted event for non-empty directory {path}")
                    self._remove(path)
        except BaseException:
            self._rollback()
            raise
        self._commit()

    # ------------------------------------------------------------------ snapshots

    def _records(self) -> list:
        nodes = self._nodes
        out = []
        stack = [ROOT]
        kinds = _KIND_CODE
        while stack:
            p = stack.pop()
            n = nodes[p]
            s = n.stat
            out.append([p, kinds[s.kind], s.create_revision, s.mod_revision, s.version,
                        s.mtime_ns, s.mode, s.uid, s.gid, n.data])
            ch = n.children
            if ch:
                if p == ROOT:
                    stack.extend("/" + c for c in sorted(ch, reverse=True))
                else:
                    pre = p + "/"
                    stack.extend(pre + c for c in sorted(ch, reverse=True))
        return out

    def _payload(self, include_dedupe: bool) -> bytes:
        dedupe = None
        if include_dedupe:
            dedupe = [self._dedupe_max, self._dedupe_ttl, self._clock,
                      [[cid, e[0], e[1], e[2]] for cid, e in self._dedupe.items()]]
        return msgpack.packb([self._revision, self._records(), dedupe], use_bin_type=True)

    def snapshot(self, include_dedupe: bool = True) -> bytes:
        """Versioned msgpack ``[SNAPSHOT_FORMAT, crc32c(payload), payload]``; the payload is
        ``[revision, nodes (pre-order, sorted), dedupe]``. ``include_dedupe=False`` gives the
        replica form (what an agent's tree, built from events, reproduces byte for byte)."""
        payload = self._payload(include_dedupe)
        return msgpack.packb([SNAPSHOT_FORMAT, crc32c.crc32c(payload), payload],
                             use_bin_type=True)

    def state_hash(self) -> int:
        """A deterministic digest of revision + all nodes (not the dedupe table): crc32c of
        the replica snapshot payload. O(nodes); for checkers and tests."""
        return crc32c.crc32c(self._payload(False))

    @classmethod
    def restore(cls, data) -> "KeyTree":
        """Rebuild a tree from :meth:`snapshot` bytes (or a binary stream). StorageCorrupt on a
        bad checksum or malformed content; UnsupportedFormat on an unknown version."""
        if hasattr(data, "read"):
            data = data.read()
        try:
            outer = msgpack.unpackb(data, raw=False)
        except Exception as exc:
            raise StorageCorrupt(f"snapshot: undecodable ({type(exc).__name__})") from None
        if not isinstance(outer, list) or len(outer) != 3 or type(outer[0]) is not int:
            raise StorageCorrupt("snapshot: not a [version, crc, payload] list")
        version, crc, payload = outer
        if version != SNAPSHOT_FORMAT:
            raise UnsupportedFormat(f"snapshot: format version {version} is not supported "
                                    f"(this build reads {SNAPSHOT_FORMAT})", version=version)
        if not isinstance(payload, bytes) or crc32c.crc32c(payload) != crc:
            raise StorageCorrupt("snapshot: checksum mismatch (crc32c)")
        try:
            return cls._from_payload(payload)
        except StorageCorrupt:
            raise
        except Exception as exc:
            raise StorageCorrupt(f"snapshot: malformed content ({type(exc).__name__}: {exc})"
                                 ) from None

    @classmethod
    def _from_payload(cls, payload: bytes) -> "KeyTree":
        revision, records, dedupe = msgpack.unpackb(payload, raw=False)
        if dedupe is None:
            tree = cls()
        else:
            max_clients, ttl, clock, entries = dedupe
            tree = cls(dedupe_max_clients=max_clients, dedupe_ttl_ns=ttl)
            tree._clock = clock
            for cid, seq, result, t in entries:
                tree._dedupe[cid] = [seq, result, t]
        if type(revision) is not int or revision < 0:
            raise StorageCorrupt("snapshot: bad revision")
        tree._revision = revision
        nodes: dict[str, _Node] = {}
        for p, k, cr, mr, v, mt, mode, uid, gid, d in records:
            if k == 1:
                if type(d) is not bytes:
                    raise StorageCorrupt(f"snapshot: file {p!r} without data")
                node = _Node(Stat(_FILE, cr, mr, v, mt, mode, uid, gid, len(d)), d, None)
            elif k == 0:
                node = _Node(Stat(_DIR, cr, mr, v, mt, mode, uid, gid, 0), None, set())
            else:
                raise StorageCorrupt(f"snapshot: unknown node kind {k!r} for {p!r}")
            if p == ROOT:
                if nodes or k != 0:
                    raise StorageCorrupt("snapshot: the root must come first, as a directory")
            else:
                i = p.rfind("/")
                parent = nodes.get(p[:i] or ROOT)
                if parent is None or parent.children is None or i < 0 or p in nodes:
                    raise StorageCorrupt(f"snapshot: node {p!r} out of order or orphaned")
                parent.children.add(p[i + 1:])
            nodes[p] = node
        if ROOT not in nodes:
            raise StorageCorrupt("snapshot: no root")
        tree._nodes = nodes
        return tree


class TreeStateMachine:
    """Adapter between the Raft driver (afs.raft.statemachine.StateMachine) and a KeyTree.

    ``apply(index, data)`` returns ``(result, events)``: ``result`` is the write result for the
    proposal's future (None for Raft's empty no-op entry, which consumes no revision), and
    ``events`` go to the watch hub. Undecodable command bytes answer an ``invalid`` error
    result (identical on every member); an unknown command format version raises
    UnsupportedFormat (this member cannot follow the log: stop rather than diverge).
    Same threading contract as KeyTree: one thread.
    """

    def __init__(self, tree: KeyTree | None = None):
        self.tree = tree if tree is not None else KeyTree()
        #: last index given to apply (0 = unknown, e.g. right after restore without index)
        self.applied_index = 0

    def apply(self, index: int, data: bytes) -> tuple[dict | None, list[Event]]:
        if index <= self.applied_index:
            raise ValueError(f"apply({index}) after applied index {self.applied_index}")
        self.applied_index = index
        if not data:
            return None, []
        try:
            cmd = Command.decode(data)
        except UnsupportedFormat:
            raise
        except InvalidInput as exc:
            return {"error": exc.to_wire()}, []
        return self.tree.apply_command(cmd)

    def snapshot(self) -> bytes:
        return self.tree.snapshot()

    def restore(self, data, index: int = 0) -> None:
        """Replace the state with a snapshot (bytes or a binary stream)."""
        self.tree = KeyTree.restore(data)
        self.applied_index = index

    @property
    def revision(self) -> int:
        return self.tree.revision
