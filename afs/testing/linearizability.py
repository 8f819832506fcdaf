"""A linearizability checker for client histories (Wing & Gong search, Lowe's memoization).

Contract:
- A history is a list of :class:`Op`. Each op has an invocation time and, if it completed,
  a completion time. ``status`` is one of:

  * ``"ok"``   -- the op took effect exactly once and returned ``output``;
  * ``"fail"`` -- the op definitely did NOT take effect (it is ignored);
  * ``"info"`` -- indeterminate (timed out, connection lost): it may or may not have taken
    effect, at any point after its invocation. Its output is unknown and never checked.

- A *model* describes the object(s) operated on. It must provide::

      init() -> state                       # hashable initial state (of one partition)
      step(state, op) -> (ok, new_state)    # apply op; ok=False if op.output is impossible
                                            # (for "info" ops, the output is not checked)
      partition(ops) -> dict[key, list[Op]] # independent sub-histories (optional)

  States must be hashable and compare by value (they are memoized).
- ``check_history(ops, model)`` returns :class:`Result`; ``ok`` is False iff no linearization
  exists, in which case ``bad_key`` names the offending partition and ``explanation`` says
  which operations could not be ordered.

Time ties: an invocation at the same instant as another op's completion is treated as
concurrent with it (the permissive choice; it never reports a false violation).

Everything is deterministic: no hashing of objects whose hash is salted per process is used
to decide anything that is reported.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Hashable, Iterable

__all__ = ["Op", "Result", "RegisterModel", "KVModel", "check_history", "check_partition"]

OK, FAIL, INFO = "ok", "fail", "info"


@dataclass
class Op:
    """One client operation. ``kind`` is model-defined (``read``/``write``/``cas`` for the
    register and KV models). For ``cas``, ``value`` is ``(expected, new)`` and ``output`` is
    ``True`` if the swap happened. For ``read``, ``output`` is the value read (``None`` for an
    absent key). For ``write``, ``value`` is the value written."""

    process: Any
    kind: str
    key: Any = None
    value: Any = None
    output: Any = None
    invoke: float = 0.0
    complete: float | None = None
    status: str = OK

    def describe(self) -> str:
        when = f"[{self.invoke}, {self.complete if self.complete is not None else 'inf'}]"
        if self.kind == "read":
            body = f"read({self.key!r}) -> {self.output!r}" if self.status == OK else f"read({self.key!r})"
        elif self.kind == "write":
            body = f"write({self.key!r}, {self.value!r})"
        elif self.kind == "cas":
            exp, new = self.value
            tail = f" -> {self.output!r}" if self.status == OK else ""
            body = f"cas({self.key!r}, {exp!r}, {new!r}){tail}"
        else:
            body = f"{self.kind}({self.key!r}, {self.value!r}) -> {self.output!r}"
        return f"p{self.process} {body} {self.status} {when}"


@dataclass
class Result:
    ok: bool
    bad_key: Any = None
    explanation: str = ""
    checked_ops: int = 0
    partitions: int = 0
    unknown: list = field(default_factory=list)   # partitions whose search budget ran out

    def __bool__(self) -> bool:
        return self.ok


# ---------------------------------------------------------------------- models

class RegisterModel:
    """A single register holding any hashable value (initially ``initial``).

    Ops: ``read`` (output = value), ``write`` (value), ``cas`` (value=(expected, new),
    output = bool swapped)."""

    def __init__(self, initial: Hashable = None):
        self.initial = initial

    def init(self):
        return self.initial

    def step(self, state, op: Op):
        info = op.status == INFO
        if op.kind == "read":
            return (info or op.output == state), state
        if op.kind == "write":
            return True, op.value
        if op.kind == "cas":
            expected, new = op.value
            swapped = state == expected
            if info:
                return True, (new if swapped else state)
            if op.output:
                return swapped, (new if swapped else state)
            return (not swapped), state
        raise ValueError(f"unknown op kind {op.kind!r}")

    def partition(self, ops: list[Op]) -> dict:
        return {None: list(ops)}


class KVModel(RegisterModel):
    """A map of independent registers, one per ``op.key``: checked key by key."""

    def partition(self, ops: list[Op]) -> dict:
        out: dict = {}
        for op in ops:
            out.setdefault(op.key, []).append(op)
        return out


# ---------------------------------------------------------------------- search

@dataclass
class _Node:
    """A doubly linked list entry: a call (match = the return node) or a return."""

    op: int                 # index into the partition's op list
    is_call: bool
    time: float
    match: "_Node | None" = None
    prev: "_Node | None" = None
    next: "_Node | None" = None


def _build_list(ops: list[Op]) -> _Node:
    events = []
    for i, op in enumerate(ops):
        end = op.complete if (op.status == OK and op.complete is not None) else math.inf
        # Calls sort before returns at the same instant (treat ties as concurrent).
        events.append((op.invoke, 0, i))
        events.append((end, 1, i))
    events.sort(key=lambda e: (e[0], e[1], e[2]))
    head = _Node(-1, False, -math.inf)
    calls: dict[int, _Node] = {}
    prev = head
    for t, kind, i in events:
        n = _Node(i, kind == 0, t, prev=prev)
        prev.next = n
        prev = n
        if kind == 0:
            calls[i] = n
        else:
            calls[i].match = n
            n.match = calls[i]
    return head


def _lift(call: _Node) -> None:
    call.prev.next = call.next
    if call.next is not None:
        call.next.prev = call.prev
    ret = call.match
    ret.prev.next = ret.next
    if ret.next is not None:
        ret.next.prev = ret.prev


def _unlift(call: _Node) -> None:
    ret = call.match
    ret.prev.next = ret
    if ret.next is not None:
        ret.next.prev = ret
    call.prev.next = call
    if call.next is not None:
        call.next.prev = call


def check_partition(ops: list[Op], model, *, max_states: int = 2_000_000) -> tuple[bool, str]:
    """Check one independent sub-history. Returns (ok, explanation)."""
    # "fail" ops never happened; indeterminate reads cannot affect anything.
    ops = [op for op in ops if op.status != FAIL and not (op.status == INFO and op.kind == "read")]
    if not ops:
        return True, ""
    ops.sort(key=lambda o: (o.invoke, o.complete if o.complete is not None else math.inf))
    n_required = sum(1 for op in ops if op.status == OK)
    head = _build_list(ops)
    state = model.init()
    linearized = 0          # bitmask of linearized ops
    done_required = 0
    stack: list[tuple[_Node, Any, int]] = []   # (call node, state before, required?)
    cache: set = {(0, state)}
    best: list[int] = []
    explored = 0
    entry = head.next
    while True:
        if done_required == n_required:
            return True, ""
        if entry is not None and entry.is_call:
            op = ops[entry.op]
            ok, new_state = model.step(state, op)
            if ok:
                bits = linearized | (1 << entry.op)
                key = (bits, new_state)
                if key not in cache:
                    explored += 1
                    if explored > max_states:
                        return True, f"UNKNOWN: search budget of {max_states} states exhausted"
                    cache.add(key)
                    req = 1 if op.status == OK else 0
                    stack.append((entry, state, req))
                    state = new_state
                    linearized = bits
                    done_required += req
                    _lift(entry)
                    entry = head.next
                    continue
            entry = entry.next
            continue
        # A return node (an ok op must be linearized before this point) or end: backtrack.
        if len(stack) > len(best):
            best = [c.op for c, _, _ in stack]
        if not stack:
            return False, _explain(ops, best, entry)
        call, state, req = stack.pop()
        linearized &= ~(1 << call.op)
        done_required -= req
        _unlift(call)
        entry = call.next


def _explain(ops: list[Op], best: list[int], stuck: _Node | None) -> str:
    lines = [f"no linearization of {len(ops)} ops exists."]
    if best:
        lines.append(f"longest linearizable prefix ({len(best)} ops):")
        for i in best[-12:]:
            lines.append("  " + ops[i].describe())
    done = set(best)
    pending = [ops[i] for i in range(len(ops)) if i not in done and ops[i].status == OK]
    pending.sort(key=lambda o: (o.complete if o.complete is not None else math.inf, o.invoke))
    if pending:
        lines.append("then none of these can be linearized next (first ones shown):")
        for op in pending[:8]:
            lines.append("  " + op.describe())
    return "\n".join(lines)


def check_history(ops: Iterable[Op], model=None) -> Result:
    """Check a whole history; partitions (e.g. keys) are checked independently, in a
    deterministic order (by the repr of the key)."""
    model = model if model is not None else KVModel()
    ops = list(ops)
    parts = model.partition(ops) if hasattr(model, "partition") else {None: ops}
    total = 0
    unknown = []
    for key in sorted(parts, key=repr):
        sub = parts[key]
        total += len(sub)
        ok, why = check_partition(sub, model)
        if not ok:
            return Result(False, key, f"key {key!r}: {why}", total, len(parts), unknown)
        if why:
            unknown.append(key)
    return Result(True, None, "", total, len(parts), unknown)
