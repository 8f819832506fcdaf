"""The agent's local watch socket: the cluster's watch API, served on a unix socket from the
agent's replica, so N watchers on a host cost the cluster ONE stream (the follower's).

Protocol (docs/protocol.md "Watches"): the same frames as a member's client port, for the ops
``watch``, ``cancel`` and ``status`` (the agent's status plus ``watchers``); any other op is
answered ``invalid``. Clients connect with ``afs.client.Client.local(path)`` or the endpoint
``unix:/path``.

Contract:
- Fed by the follower (the replica's only writer): ``publish(revision, events)`` after each
  revision is applied to the replica and the mount invalidated, ``reset(revision)`` after a
  snapshot install. A local watcher that receives revision R can therefore read R (or newer)
  from the mount.
- History: the local hub keeps a window (``history_revisions``/``history_bytes``) of the
  revisions this agent applied since it started, primed at start-up with up to ``warmup``
  revisions before its cache's revision (re-streamed once from the cluster, not re-applied), so
  a local watcher can resume across an agent restart. A start revision older than that — or
  one skipped by a snapshot install — is answered ``compacted``, never a silent gap.
- Threading: one daemon thread runs an asyncio loop that owns the hub and the socket;
  ``publish``/``reset`` are thread-safe (they hand work to the loop in call order).
- The socket file is created with mode 0600 (watch events carry file data regardless of the
  files' modes); a stale socket file at the path is replaced.
"""
from __future__ import annotations

import asyncio
import logging
import os
import stat as _stat
import threading
from typing import Callable

from afs import errors, wire
from afs.model import Event
from afs.server import watchhub
from afs.server.watchhub import WatchHub

log = logging.getLogger("afs.agent.localwatch")

HIGH_WATER = 1 << 20


class LocalWatchServer:
    def __init__(self, socket_path: str, *, status_provider: Callable[[], dict] | None = None,
                 history_revisions: int = 10_000, history_bytes: int = 32 << 20,
                 progress_interval: float = 1.0, subscriber_queue: int = 1024,
                 warmup: int = 1000):
        self.socket_path = socket_path
        self.status_provider = status_provider
        self.progress_interval = progress_interval
        self.warmup = min(warmup, history_revisions)
        self.base = 0           # the replica's revision at start: "now" is never older than it
        self.hub = WatchHub(max_revisions=history_revisions, max_bytes=history_bytes,
                            subscriber_queue=subscriber_queue)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._server: asyncio.AbstractServer | None = None
        self._stopping: asyncio.Event | None = None
        self._tasks: set[asyncio.Task] = set()
        self.connections = 0

    # ------------------------------------------------------------ wiring
    def attach(self, follower) -> None:
        """Be fed by ``follower`` (an :class:`afs.agent.follower.Follower`)."""
        follower.on_events = self.publish
        follower.on_reset = self.reset
        follower.history_warmup = self.warmup

    def start(self, revision: int) -> None:
        """Listen; the local history starts after ``revision`` (the replica's revision now,
        before the follower applies anything). Raises OSError if the socket cannot be bound."""
        self.base = revision
        # the follower first re-streams up to ``warmup`` revisions before ``revision`` into this
        # hub (see Follower.history_warmup); if they do not come, the first live revision makes
        # the hub reset to ``revision`` (waiting watchers then get Compacted, never a gap)
        self.hub.reset(max(0, revision - self.warmup))
        self._thread = threading.Thread(target=self._run, name="afs-agent-localwatch", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error
        log.info("event=local_watch_listening socket=%s revision=%d", self.socket_path, revision)

    def stop(self) -> None:
        loop = self.loop
        if loop is not None and self._stopping is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._stopping.set)
            except RuntimeError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)

    # ------------------------------------------------------------ feed (follower thread)
    def publish(self, revision: int, events: list[Event]) -> None:
        loop = self.loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.hub.publish, revision, events)

    def reset(self, revision: int) -> None:
        loop = self.loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._reset, revision)

    def _reset(self, revision: int) -> None:
        if revision != self.hub.revision:      # same revision = same state: keep the history
            self.hub.reset(revision)

    # ------------------------------------------------------------ the loop
    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # noqa: BLE001 - reported to start() or logged
            if not self._ready.is_set():
                self._error = exc
                self._ready.set()
            else:
                log.exception("event=local_watch_crashed")

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        path = self.socket_path
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        else:
            if not _stat.S_ISSOCK(st.st_mode):
                raise errors.InvalidInput(f"socket path {path} exists and is not a socket")
            os.unlink(path)
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._accept, path, limit=1 << 20)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        progress = self.loop.create_task(self._progress_loop())
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            progress.cancel()
            self._server.close()
            for t in list(self._tasks):
                t.cancel()
            try:
                os.unlink(path)
            except OSError:
                pass

    async def _progress_loop(self) -> None:
        while True:
            await asyncio.sleep(self.progress_interval)
            self.hub.progress()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        me = asyncio.current_task()
        self._tasks.add(me)

        def send(frame: dict) -> None:
            if not writer.is_closing():
                writer.write(wire.encode_frame(frame))

        async def flow() -> None:
            if writer.transport.get_write_buffer_size() > HIGH_WATER and not writer.is_closing():
                await writer.drain()

        watches: dict[int, asyncio.Task] = {}
        try:
            while True:
                try:
                    req = await wire.read_frame(reader, wire.MAX_CLIENT_FRAME)
                except wire.FrameError as exc:
                    send({"id": None, "error": errors.InvalidInput(str(exc)).to_wire()})
                    break
                if req is None:
                    break
                rid = req.get("id") if isinstance(req, dict) else None
                op = req.get("op") if isinstance(req, dict) else None
                try:
                    if not isinstance(rid, int) or not isinstance(op, str):
                        raise errors.InvalidInput("request needs an integer 'id' and a string 'op'")
                    if op == "watch":
                        sub, with_data = self._subscribe(req)
                        send({"id": rid, "ok": {"watch_id": rid, "revision": max(self.hub.revision, self.base),
                                                "oldest": self.hub.oldest}})
                        t = asyncio.get_running_loop().create_task(
                            watchhub.serve(self.hub, sub, rid, send, with_data=with_data, flow=flow))
                        watches[rid] = t
                        t.add_done_callback(lambda _t, r=rid: watches.pop(r, None))
                    elif op == "cancel":
                        t = watches.get(req.get("watch_id"))
                        if t is not None:
                            t.cancel()
                        send({"id": rid, "ok": {}})
                    elif op == "status":
                        st = dict(self.status_provider() if self.status_provider else {})
                        st.update({"watchers": self.hub.subscribers, "watch_revision": self.hub.revision,
                                   "watch_oldest": self.hub.oldest, "role": "agent"})
                        send({"id": rid, "ok": st})
                    else:
                        raise errors.InvalidInput(
                            f"the agent's local socket serves only watch, cancel and status (got {op!r})")
                except errors.AfsError as exc:
                    send({"id": rid, "error": exc.to_wire()})
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            for t in list(watches.values()):
                t.cancel()
            self._tasks.discard(me)
            self.connections -= 1
            writer.close()

    def _subscribe(self, req: dict):
        prefix, start, with_data = watchhub.parse_watch_request(req)
        if start is None:          # "now" is the replica's revision, even while warming up
            start = max(self.hub.revision, self.base) + 1
        return self.hub.subscribe(prefix, start), with_data
