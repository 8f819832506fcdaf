"""WatchHub: history window, subscriptions by prefix, catch-up, compaction, slow subscribers,
progress, and the frame loop (afs.server.watchhub.serve)."""
from __future__ import annotations

import asyncio

import pytest

from afs import errors
from afs.model import Event, EventType, NodeKind, Stat
from afs.server.watchhub import WatchHub, serve


def ev(rev: int, path: str, data: bytes | None = b"v", typ: EventType = EventType.UPDATED) -> Event:
    st = Stat(NodeKind.FILE, 1, rev, rev, 0, 0o644, 0, 0, len(data or b""))
    return Event(rev, typ, path, st, data)


def drain(sub) -> list:
    out = []
    while not sub.queue.empty():
        out.append(sub.queue.get_nowait())
    return out


def revs(items) -> list[int]:
    return [it[1] for it in items if it[0] == "events"]


def run(coro):
    return asyncio.run(coro)


def fill(hub: WatchHub, upto: int, path=lambda r: f"/a/{r}") -> None:
    for r in range(hub.revision + 1, upto + 1):
        hub.publish(r, [ev(r, path(r))])


def test_live_delivery_in_order_each_revision_once():
    """A subscriber from 'now' gets every later revision once, in order."""
    async def main():
        hub = WatchHub()
        fill(hub, 3)
        sub = hub.subscribe("/", None)
        assert sub.next_revision == 4
        fill(hub, 8)
        hub.publish(8, [ev(8, "/dup")])          # a repeated revision is ignored
        return revs(drain(sub))
    assert run(main()) == [4, 5, 6, 7, 8]


def test_catch_up_from_history_then_live():
    """A start revision inside history replays history, then continues live, no gap/dup."""
    async def main():
        hub = WatchHub()
        fill(hub, 10)
        sub = hub.subscribe("/", 3)
        fill(hub, 12)
        return revs(drain(sub))
    assert run(main()) == list(range(3, 13))


def test_prefix_filter_is_component_wise_and_keeps_txn_together():
    """Only events under the prefix (component-wise: /a does not match /ab) are delivered;
    a transaction's matching events arrive as one group."""
    async def main():
        hub = WatchHub()
        sub = hub.subscribe("/a", 1)
        hub.publish(1, [ev(1, "/a"), ev(1, "/ab/x"), ev(1, "/a/b")])
        hub.publish(2, [ev(2, "/ab")])
        hub.publish(3, [ev(3, "/b"), ev(3, "/a/c/d")])
        return drain(sub)
    items = run(main())
    assert [(it[1], [e.path for e in it[2]]) for it in items] == [(1, ["/a", "/a/b"]), (3, ["/a/c/d"])]


def test_compacted_by_revision_window_is_explicit():
    """A start revision older than the window raises Compacted naming oldest and current."""
    async def main():
        hub = WatchHub(max_revisions=5)
        fill(hub, 20)
        assert hub.oldest == 16
        with pytest.raises(errors.Compacted) as ei:
            hub.subscribe("/", 15)
        assert ei.value.details == {"oldest": 16, "current": 20}
        assert revs(drain(hub.subscribe("/", 16))) == [16, 17, 18, 19, 20]
    run(main())


def test_compacted_by_byte_window():
    """The byte bound trims history too; the newest revision is always kept."""
    async def main():
        hub = WatchHub(max_bytes=3000)
        for r in range(1, 11):
            hub.publish(r, [ev(r, "/big", b"x" * 1000)])
        assert hub.oldest == 9              # (64+4+1000) * 2 <= 3000 < * 3
        with pytest.raises(errors.Compacted):
            hub.subscribe("/", 8)
        hub.publish(11, [ev(11, "/huge", b"y" * 10_000)])
        assert hub.oldest == 11
        assert revs(drain(hub.subscribe("/", 11))) == [11]
    run(main())


def test_future_start_revision_waits():
    """A start revision beyond the current one is delivered once published."""
    async def main():
        hub = WatchHub()
        fill(hub, 2)
        sub = hub.subscribe("/", 5)
        fill(hub, 6)
        return revs(drain(sub))
    assert run(main()) == [5, 6]


def test_start_zero_means_from_the_first_revision():
    async def main():
        hub = WatchHub()
        fill(hub, 3)
        return revs(drain(hub.subscribe("/", 0)))
    assert run(main()) == [1, 2, 3]


def test_slow_subscriber_catches_up_from_history_without_gap():
    """Overflow switches a subscriber to catch-up; as it drains it gets every revision once,
    and publish never blocks nor affects a fast subscriber."""
    async def main():
        hub = WatchHub(subscriber_queue=4)
        slow = hub.subscribe("/", None)
        fast = hub.subscribe("/", None)
        got_fast = []
        for r in range(1, 31):
            hub.publish(r, [ev(r, f"/k{r}")])
            got_fast += revs(drain(fast))
        assert slow.lagging and slow.queue.qsize() == 4 and hub.stats["overflows"] >= 1
        got_slow = []
        while True:
            if slow.queue.empty():
                break
            item = slow.queue.get_nowait()
            got_slow.append(item[1])
            hub.refill_if_lagging(slow)
            if len(got_slow) == 15:
                fill(hub, 34)  # more arrive while it catches up (within fast's bound)
                got_fast += revs(drain(fast))
        return got_fast, got_slow, slow.lagging
    got_fast, got_slow, lagging = run(main())
    assert got_fast == list(range(1, 35))
    assert got_slow == list(range(1, 35)) and not lagging


def test_slow_subscriber_cancelled_when_history_moves_past_it():
    """A lagging subscriber whose next revision left history is cancelled with Compacted
    after the gap-free prefix it already had queued."""
    async def main():
        hub = WatchHub(max_revisions=10, subscriber_queue=4)
        slow = hub.subscribe("/", 1)
        fill(hub, 30)
        items = drain(slow)
        assert hub.subscribers == 0 and slow.cancelled is not None
        return items
    items = run(main())
    assert revs(items) == [1, 2, 3, 4]
    kind, exc = items[-1]
    assert kind == "error" and isinstance(exc, errors.Compacted)
    assert "fell behind" in exc.message and "revision 5" in exc.message


def test_reset_cancels_subscribers_that_need_skipped_revisions():
    """A snapshot install (reset) cancels watchers needing revisions it skipped, keeps others."""
    async def main():
        hub = WatchHub()
        fill(hub, 5)
        behind = hub.subscribe("/", None)       # needs 6..
        ahead = hub.subscribe("/", 20)
        hub.reset(10)
        assert isinstance(drain(behind)[-1][1], errors.Compacted)
        with pytest.raises(errors.Compacted):
            hub.subscribe("/", 10)
        fill(hub, 21)
        return revs(drain(ahead)), revs(drain(hub.subscribe("/", 11)))
    ahead, late = run(main())
    assert ahead == [20, 21] and late == list(range(11, 22))


def test_publish_hole_never_becomes_a_silent_gap():
    """If the producer skips revisions, subscribers needing them get Compacted, not a gap."""
    async def main():
        hub = WatchHub()
        fill(hub, 3)
        sub = hub.subscribe("/", None)
        hub.publish(6, [ev(6, "/x")])
        return drain(sub), hub.oldest
    items, oldest = run(main())
    assert items[0][0] == "error" and isinstance(items[0][1], errors.Compacted) and oldest == 6


def test_progress_only_to_idle_subscribers():
    async def main():
        hub = WatchHub()
        fill(hub, 2)
        idle = hub.subscribe("/b", None)
        busy = hub.subscribe("/", None)
        fill(hub, 4)
        hub.progress()
        return drain(idle), drain(busy)
    idle, busy = run(main())
    assert idle == [("progress", 4)]
    assert [k for k, *_ in busy] == ["events", "events"]


def test_invalid_sizes_rejected():
    with pytest.raises(errors.InvalidInput):
        WatchHub(max_revisions=0)


def test_serve_writes_frames_and_unsubscribes():
    """serve(): one frame per revision, progress frames, the final error frame; metadata-only
    watches carry no data; the hub forgets the subscription afterwards."""
    async def main():
        hub = WatchHub(max_revisions=3, subscriber_queue=2)
        frames = []
        sub = hub.subscribe("/", None)
        task = asyncio.get_running_loop().create_task(
            serve(hub, sub, 7, frames.append, with_data=False))
        hub.publish(1, [ev(1, "/a"), ev(1, "/b")])
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        hub.progress()
        await asyncio.sleep(0)
        fill(hub, 10)                           # floods the queue of a task that did not run
        await asyncio.wait_for(task, 2)
        return frames, hub.subscribers
    frames, n = run(main())
    assert frames[0]["revision"] == 1 and [e[2] for e in frames[0]["events"]] == ["/a", "/b"]
    assert frames[0]["events"][0][4] is None
    assert frames[1] == {"id": 7, "progress": 1}
    assert [f["revision"] for f in frames if "revision" in f] == [1, 2, 3]
    assert frames[-1]["error"]["code"] == "compacted" and n == 0
