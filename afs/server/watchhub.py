"""Recent-event history and watch subscriptions (used by the server and by the agent's local
watch socket, :mod:`afs.agent.localwatch`).

Threading: a hub belongs to ONE asyncio event loop; every method is called on that loop's
thread (the server's loop; the agent feeds its hub with ``loop.call_soon_threadsafe``).

Contract:
- ``publish(revision, events)`` is called once per applied revision, in revision order, with all
  events of that revision (a transaction's events arrive together). Revisions are dense: every
  revision has at least one event (see afs/tree.py), so history holds consecutive revisions.
  ``reset(revision)`` says the state jumped to ``revision`` without events (snapshot install).
- History keeps the most recent revisions within BOTH bounds, ``max_revisions`` and
  ``max_bytes`` (the newest revision is always kept, even if alone it exceeds ``max_bytes``).
  ``oldest`` is the oldest revision a new subscription can start from.
- A subscription for ``prefix`` from ``start_revision`` (None: "from now", i.e. revision+1)
  receives, in order and each exactly once, every revision >= start whose events touch the
  prefix (only those events), first from history, then live. A start revision in the future is
  allowed (it is delivered once published). A start older than ``oldest`` raises
  :class:`afs.errors.Compacted` (never a silent gap).
- A slow subscriber never blocks ``publish`` nor other subscribers: each subscriber has a
  bounded queue of pending revisions; when it is full the subscriber is marked *lagging* and
  is refilled from history as it drains (:meth:`refill_if_lagging`). If history no longer holds
  the revision it needs, it is cancelled with ``Compacted`` ("watcher fell behind ...").
  A cancelled subscription's queue ends with ``("error", exc)`` after the revisions it did get,
  so what was delivered is still a gap-free prefix.
- ``progress()`` puts ``("progress", R)`` into the queue of every idle subscriber (nothing
  queued, not lagging): it means "every revision <= R that touches your prefix was delivered".
- :func:`serve` is the one loop that turns a subscription into wire frames (server and agent).
"""
from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from afs import errors, paths
from afs.model import Event

__all__ = ["WatchHub", "Subscription", "serve", "event_size"]


def _touches(prefix: str, path: str) -> bool:
    if prefix == "/":
        return True
    return path == prefix or path.startswith(prefix + "/")


def event_size(e: Event) -> int:
    return 64 + len(e.path) + (len(e.data) if e.data else 0)


def parse_watch_request(req: dict, max_depth: int | None = paths.DEFAULT_MAX_DEPTH
                        ) -> tuple[str, int | None, bool]:
    """Validate a ``watch`` request: ``(prefix, start_revision or None, with_data)``.
    Raises InvalidPath / InvalidInput with one clear line."""
    p = req.get("path")
    if not isinstance(p, str):
        raise errors.InvalidPath("'path' must be a string path")
    prefix = paths.normalize(p, max_depth=max_depth)
    start = req.get("start_revision")
    if start is not None and (isinstance(start, bool) or not isinstance(start, int) or start < 0):
        raise errors.InvalidInput("'start_revision' must be a non-negative integer")
    with_data = req.get("data", True)
    if not isinstance(with_data, bool):
        raise errors.InvalidInput("'data' must be a boolean")
    return prefix, start, with_data


@dataclass(eq=False)
class Subscription:
    id: int
    prefix: str
    next_revision: int                  # the next revision this subscriber must receive
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    lagging: bool = False               # overflowed; will be refilled from history
    cancelled: BaseException | None = None


class WatchHub:
    def __init__(self, *, max_revisions: int = 100_000, max_bytes: int = 64 << 20,
                 subscriber_queue: int = 1024):
        if max_revisions < 1 or max_bytes < 1 or subscriber_queue < 2:
            raise errors.InvalidInput("watch hub: max_revisions and max_bytes must be >= 1, "
                                      "subscriber_queue >= 2")
        self.max_revisions = max_revisions
        self.max_bytes = max_bytes
        self.subscriber_queue = subscriber_queue
        self._history: collections.deque[tuple[int, list[Event], int]] = collections.deque()
        self._bytes = 0
        self.revision = 0           # last published revision
        self.oldest = 1             # oldest revision still answerable from history
        self._subs: dict[int, Subscription] = {}
        self._next_id = 1
        self.stats = {"published": 0, "overflows": 0, "cancelled": 0, "resets": 0}

    # ------------------------------------------------------------ producer side
    def reset(self, revision: int) -> None:
        """The state jumped to ``revision`` (snapshot install, start-up): history restarts
        there; subscribers that still need revisions <= ``revision`` are cancelled with
        Compacted (those revisions' events will never exist here)."""
        self._history.clear()
        self._bytes = 0
        self.revision = revision
        self.oldest = revision + 1
        self.stats["resets"] += 1
        for sub in list(self._subs.values()):
            if sub.next_revision <= revision:
                self._cancel(sub, errors.Compacted(
                    f"history restarted at revision {revision} (snapshot install); "
                    f"revision {sub.next_revision} is not available here",
                    oldest=self.oldest, current=self.revision))

    def publish(self, revision: int, events: list[Event]) -> None:
        if revision <= self.revision:
            return                  # already have it (idempotent)
        if revision != self.revision + 1 and (self._history or self._subs):
            # a hole in the stream must never become a silent gap for a watcher
            self.reset(revision - 1)
        size = sum(event_size(e) for e in events)
        self._history.append((revision, events, size))
        self._bytes += size
        self.revision = revision
        self.stats["published"] += 1
        while len(self._history) > 1 and (len(self._history) > self.max_revisions
                                          or self._bytes > self.max_bytes):
            old_rev, _, old_size = self._history.popleft()
            self._bytes -= old_size
            self.oldest = old_rev + 1
        if len(self._history) == 1:
            self.oldest = revision
        for sub in list(self._subs.values()):
            if sub.cancelled is not None:
                continue
            if sub.lagging:
                if sub.queue.qsize() < self.subscriber_queue // 2:
                    self._refill(sub)
                elif sub.next_revision < self.oldest:
                    self._refill(sub)        # cancels it now: what it needs is gone
                continue
            if sub.next_revision > revision:
                continue
            self._offer(sub, revision, events)

    # ------------------------------------------------------------ consumer side
    def subscribe(self, prefix: str, start_revision: int | None) -> Subscription:
        start = self.revision + 1 if start_revision is None else max(1, start_revision)
        if start < self.oldest and start <= self.revision:
            raise errors.Compacted(
                f"revision {start} is no longer in history (oldest retained is {self.oldest}, "
                f"current {self.revision}); re-read the state and watch from its revision + 1",
                oldest=self.oldest, current=self.revision)
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
        if sub.prefix == "/":
            mine = events
        else:
            mine = [e for e in events if _touches(sub.prefix, e.path)]
        if not mine:
            sub.next_revision = revision + 1
            return
        if sub.queue.qsize() >= self.subscriber_queue:
            sub.lagging = True
            sub.next_revision = revision     # deliver this one later, from history
            self.stats["overflows"] += 1
            return
        sub.next_revision = revision + 1
        sub.queue.put_nowait(("events", revision, mine))

    def _refill(self, sub: Subscription) -> None:
        """Fill a subscriber's queue from history up to its bound."""
        if sub.next_revision > self.revision:
            sub.lagging = False
            return
        if sub.next_revision < self.oldest or not self._history:
            self._cancel(sub, errors.Compacted(
                f"watcher fell behind: revision {sub.next_revision} left history "
                f"(oldest retained {self.oldest}, current {self.revision}); it read too slowly",
                oldest=self.oldest, current=self.revision))
            return
        # history holds consecutive revisions starting at self._history[0][0]
        first = self._history[0][0]
        for i in range(sub.next_revision - first, len(self._history)):
            if sub.queue.qsize() >= self.subscriber_queue:
                sub.lagging = True
                return
            rev, events, _ = self._history[i]
            self._offer(sub, rev, events)
            if sub.lagging:
                return
        sub.lagging = False

    def refill_if_lagging(self, sub: Subscription) -> None:
        """Called by the consumer after taking an item from its queue."""
        if sub.lagging and sub.cancelled is None and sub.queue.qsize() < self.subscriber_queue // 2:
            self._refill(sub)

    def _cancel(self, sub: Subscription, exc: BaseException) -> None:
        sub.cancelled = exc
        sub.lagging = False
        self.stats["cancelled"] += 1
        sub.queue.put_nowait(("error", exc))
        self._subs.pop(sub.id, None)

    @property
    def subscribers(self) -> int:
        return len(self._subs)


# ---------------------------------------------------------------- the frame loop

Send = Callable[[dict], None]


def _event_wire(e: Event, with_data: bool) -> list:
    w = e.to_wire()
    if not with_data:
        w[4] = None
    return w


async def serve(hub: WatchHub, sub: Subscription, rid, send: Send, *, with_data: bool = True,
                flow: Callable[[], Awaitable[None]] | None = None) -> None:
    """Write ``sub``'s frames through ``send`` until it is cancelled (by the hub: an error
    frame is sent; by the caller: task cancellation, nothing is sent). Frames:
    ``{"id", "revision", "events": [Event wire...]}`` per revision, ``{"id", "progress": R}``,
    and a final ``{"id", "error": {...}}``.

    ``flow`` (optional) is awaited after each events frame; it returns once the connection's
    send buffer is below its high-water mark. While it waits, the hub keeps queueing for this
    subscriber up to its bound, then switches it to catch-up from history — so a watcher that
    reads slowly costs bounded memory and never blocks ``publish``.
    Always unsubscribes on exit."""
    try:
        while True:
            item = await sub.queue.get()
            kind = item[0]
            if kind == "events":
                send({"id": rid, "revision": item[1],
                      "events": [_event_wire(e, with_data) for e in item[2]]})
                hub.refill_if_lagging(sub)
                if flow is not None:
                    await flow()
            elif kind == "progress":
                send({"id": rid, "progress": item[1]})
            else:
                exc = item[1]
                send({"id": rid, "error": exc.to_wire() if isinstance(exc, errors.AfsError)
                      else {"code": "internal", "message": str(exc)}})
                return
    finally:
        hub.unsubscribe(sub)
