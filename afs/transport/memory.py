"""A deterministic in-process network in virtual time (tests and the simulator).

Contract:
- No threads, no wall clock, no global randomness: every decision (drop, delay, duplicate)
  comes from the ``random.Random`` given to the constructor, and ties are broken by send
  order, so the same seed and the same calls give the same deliveries.
- ``send(msg, now)`` queues a message (routed by ``msg.frm`` -> ``msg.to``) and returns False
  if it was refused immediately because the link is cut (callers may report "unreachable").
  Random drops return True: the sender cannot tell a lost message from a delivered one.
- ``deliver(now)`` returns the messages due at or before ``now`` in due order. A message whose
  link is cut at delivery time is dropped (a partition also loses what was in flight).
- Messages are shallow-copied on send, so the sender may reuse or mutate its object.
- Faults: ``drop`` probability, ``delay`` range ``(lo, hi)`` in virtual time units (different
  delays reorder messages), ``duplicate`` probability (the copy gets its own delay),
  ``partition(groups)``, ``one_way_cut(a, b)`` (a -> b lost, b -> a fine), ``isolate(node)``,
  ``heal()``.
"""
from __future__ import annotations

import heapq
import random
from typing import Iterable

from afs.raft.messages import Message

__all__ = ["MemoryNetwork"]


def _clone(m: Message) -> Message:
    return Message(m.type, m.to, m.frm, m.term, m.log_term, m.index, list(m.entries), m.commit,
                   m.reject, m.reject_hint, m.context, m.snapshot)


class MemoryNetwork:
    def __init__(self, rng: random.Random, *, drop: float = 0.0, duplicate: float = 0.0,
                 delay: tuple[int, int] = (1, 1)):
        self.rng = rng
        self.drop = drop
        self.duplicate = duplicate
        self.delay = delay
        self._queue: list[tuple[int, int, Message]] = []
        self._seq = 0
        self._groups: dict[str, int] | None = None   # node -> group id; None = no partition
        self._cuts: set[tuple[str, str]] = set()     # (from, to) one-way cuts
        self._isolated: set[str] = set()
        self.stats = {"sent": 0, "delivered": 0, "dropped": 0, "duplicated": 0, "refused": 0}

    # ------------------------------------------------------------ configuration
    def set_faults(self, *, drop: float | None = None, duplicate: float | None = None,
                   delay: tuple[int, int] | None = None) -> None:
        if drop is not None:
            self.drop = drop
        if duplicate is not None:
            self.duplicate = duplicate
        if delay is not None:
            lo, hi = delay
            if lo < 0 or hi < lo:
                raise ValueError(f"bad delay range {delay!r}")
            self.delay = (lo, hi)

    def partition(self, groups: Iterable[Iterable[str]]) -> None:
        """Only nodes in the same group can talk. Nodes not named in any group are alone."""
        self._groups = {}
        for gid, group in enumerate(groups):
            for node in group:
                self._groups[node] = gid

    def one_way_cut(self, a: str, b: str) -> None:
        """Messages from ``a`` to ``b`` are lost; ``b`` to ``a`` still flow."""
        self._cuts.add((a, b))

    def isolate(self, node: str) -> None:
        self._isolated.add(node)

    def heal(self) -> None:
        self._groups = None
        self._cuts.clear()
        self._isolated.clear()

    def connected(self, a: str, b: str) -> bool:
        if a == b:
            return True
        if a in self._isolated or b in self._isolated:
            return False
        if (a, b) in self._cuts:
            return False
        if self._groups is not None:
            ga = self._groups.get(a, ("alone", a))
            gb = self._groups.get(b, ("alone", b))
            if ga != gb:
                return False
        return True

    def describe(self) -> str:
        parts = []
        if self._groups is not None:
            groups: dict[int, list[str]] = {}
            for n, g in self._groups.items():
                groups.setdefault(g, []).append(n)
            parts.append("partition=" + "|".join(",".join(sorted(v)) for _, v in sorted(groups.items())))
        if self._cuts:
            parts.append("cuts=" + ",".join(f"{a}->{b}" for a, b in sorted(self._cuts)))
        if self._isolated:
            parts.append("isolated=" + ",".join(sorted(self._isolated)))
        return " ".join(parts) or "healthy"

    # ------------------------------------------------------------ traffic
    def _push(self, msg: Message, now: int) -> None:
        lo, hi = self.delay
        due = now + (self.rng.randint(lo, hi) if hi > lo else lo)
        self._seq += 1
        heapq.heappush(self._queue, (due, self._seq, msg))

    def send(self, msg: Message, now: int) -> bool:
        self.stats["sent"] += 1
        if not self.connected(msg.frm, msg.to):
            self.stats["refused"] += 1
            return False
        if self.drop and self.rng.random() < self.drop:
            self.stats["dropped"] += 1
            return True
        self._push(_clone(msg), now)
        if self.duplicate and self.rng.random() < self.duplicate:
            self.stats["duplicated"] += 1
            self._push(_clone(msg), now)
        return True

    def next_due(self) -> int | None:
        return self._queue[0][0] if self._queue else None

    def deliver(self, now: int) -> list[Message]:
        out: list[Message] = []
        q = self._queue
        while q and q[0][0] <= now:
            _, _, m = heapq.heappop(q)
            if not self.connected(m.frm, m.to):
                self.stats["dropped"] += 1
                continue
            self.stats["delivered"] += 1
            out.append(m)
        return out

    def drop_to(self, node: str) -> int:
        """Forget everything in flight to ``node`` (e.g. it crashed). Returns how many."""
        keep = [e for e in self._queue if e[2].to != node]
        n = len(self._queue) - len(keep)
        if n:
            heapq.heapify(keep)
            self._queue = keep
        return n

    def pending(self) -> int:
        return len(self._queue)
