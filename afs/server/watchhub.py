"""Recent-event history and watch subscriptions.

Threading: the hub is used from the server's event-loop thread only.

Contract:
- ``publish(revision, events)`` is called once per applied revision, in revision order, with all
  events of that revision (a transaction's events arrive together).
- A subscription for ``prefix`` from ``start_revision`` first receives every retained revision
  >= start_revision whose events touch the prefix, then live revisions, in order, each revision
  once. If ``start_revision`` is older than the history window, subscribing raises
  :class:`afs.errors.Compacted` (never a silent gap).
- A slow subscriber never blocks ``publish``: each subscriber has a bounded queue of pending
  revisions; when it overflows the subscriber is switched to catching up from history, and if
  history no longer has what it needs it is cancelled with ``Compacted`` and a clear reason.
- Idle subscribers can be sent progress notifications (the current revision).
"""
from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass, field

from afs import errors
from afs.model import Event


def _touches(prefix: str, path: str) -> bool:
    if prefix == "/":
        return True
    return path == prefix or path.startswith(prefix + "/")


def event_size(e: Event) -> int:
    return 64 + len(e.path) + (len(e.data) if e.data else 0)


@dataclass
class Subscription:
    id: int
    prefix: str
    next_revision: int                  # the next revision this subscriber must receive
    queue: asyncio.Queue = field(default_factory=lambda: asyncio.Queue())
    lagging: bool = False               # overflowed; will be refilled from history
    cancelled: BaseException | None = None


class WatchHub:
    def __init__(self, *, max_revisions: int = 100_000, max_bytes: int = 64 << 20,
                 subscriber_queue: int = 1024):
        self.max_revisions = max_revisions
        self.max_bytes = max_bytes
        self.subscriber_queue = subscriber_queue
        self._history: collections.deque[tuple[int, list[Event], int]] = collections.deque()
        self._bytes = 0
        self.revision = 0           # last published revision
        self.oldest = 1             # oldest revision still answerable from history
        self._subs: dict[int, Subscription] = {}
        self._next_id = 1
        self.stats = {"published": 0, "overflows": 0, "cancelled": 0}

    # ------------------------------------------------------------ producer side
    def reset(self, revision: int) -> None:
        """After a snapshot install: history restarts at ``revision``; subscribers that need
        revisions the snapshot skipped are cancelled with Compacted."""
        self._history.clear()
        self._bytes = 0
        self.revision = revision
        self.oldest = revision + 1
        for sub in list(self._subs.values()):
            if sub.next_revision <= revision:
                self._cancel(sub, errors.Compacted(
                    f"history restarted at revision {revision} (snapshot install); resume from a snapshot"))

    def publish(self, revision: int, events: list[Event]) -> None:
        if revision <= self.revision:
            return
        size = sum(event_size(e) for e in events)
        self._history.append((revision, events, size))
        self._bytes += size
        self.revision = revision
        self.stats["published"] += 1
        while self._history and (len(self._history) > self.max_revisions or self._bytes > self.max_bytes):
            old_rev, _, old_size = self._history.popleft()
            self._bytes -= old_size
            self.oldest = old_rev + 1
        for sub in list(self._subs.values()):
            if sub.cancelled is not None:
                continue
            if sub.lagging:
                self._refill(sub)
                continue
            if sub.next_revision > revision:
                continue
            self._offer(sub, revision, events)

    # ------------------------------------------------------------ consumer side
    def subscribe(self, prefix: str, start_revision: int | None) -> Subscription:
        start = self.revision + 1 if start_revision is None else max(1, start_revision)
        if start < self.oldest and start <= self.revision:
            raise errors.Compacted(
                f"revision {start} is no longer in history (oldest retained is {self.oldest}); "
                "re-read the state and watch from its revision", oldest=self.oldest, current=self.revision)
        sub = Subscription(self._next_id, prefix, start)
        self._next_id += 1
        self._subs[sub.id] = sub
        self._refill(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subs.pop(sub.id, None)

    def progress(self) -> None:
        """Send the current revision to subscribers with nothing queued (idle)."""
        for sub in self._subs.values():
            if sub.cancelled is None and not sub.lagging and sub.queue.empty():
                sub.queue.put_nowait(("progress", self.revision))

    def _offer(self, sub: Subscription, revision: int, events: list[Event]) -> None:
        mine = [e for e in events if _touches(sub.prefix, e.path)]
        sub.next_revision = revision + 1
        if not mine:
            return
        if sub.queue.qsize() >= self.subscriber_queue:
            sub.lagging = True
            sub.next_revision = revision  # re-deliver this one from history
            self.stats["overflows"] += 1
            return
        sub.queue.put_nowait(("events", revision, mine))

    def _refill(self, sub: Subscription) -> None:
        """Fill a subscriber's queue from history up to its bound."""
        if sub.next_revision > self.revision:
            sub.lagging = False
            return
        if sub.next_revision < self.oldest:
            self._cancel(sub, errors.Compacted(
                f"watcher fell behind: revision {sub.next_revision} left history "
                f"(oldest retained {self.oldest})", oldest=self.oldest, current=self.revision))
            return
        # history is dense in revisions from self.oldest
        start = sub.next_revision - self._history[0][0] if self._history else 0
        for i in range(max(0, start), len(self._history)):
            if sub.queue.qsize() >= self.subscriber_queue:
                sub.lagging = True
                return
            rev, events, _ = self._history[i]
            self._offer(sub, rev, events)
            if sub.lagging:
                return
        sub.lagging = False

    def refill_if_lagging(self, sub: Subscription) -> None:
        """Called by the consumer after draining its queue."""
        if sub.lagging and sub.queue.qsize() < self.subscriber_queue // 2:
            self._refill(sub)

    def _cancel(self, sub: Subscription, exc: BaseException) -> None:
        sub.cancelled = exc
        self.stats["cancelled"] += 1
        sub.queue.put_nowait(("error", exc))
        self._subs.pop(sub.id, None)

    @property
    def subscribers(self) -> int:
        return len(self._subs)
