"""Follows the cluster's revision stream into a :class:`Replica`.

Protocol (docs/protocol.md): ``snapshot`` gives ``(R, tree)``; ``watch /`` from ``R+1`` gives one
frame per revision with all its events, and ``progress`` frames when idle. After a disconnect
the follower resumes with ``watch`` from its own revision + 1 (on any member); only when that
revision has left the member's history (``compacted``) does it fetch a fresh snapshot.

Member choice: prefer followers (the leader's CPU is for writes), and spread agents across them
by a stable hash of the host name; fall back to the leader, then the configured endpoints.

Threading: ``run()`` is the agent's sync thread; it is the only writer of the replica.
``on_change(paths, revision)`` is called on that thread after each published revision; then
``on_events(revision, events)`` with all events of that revision (the agent's local watch hub;
after the mount was invalidated, so a local watcher that gets R can read R from the mount), and
``on_reset(revision)`` after a snapshot install (the replica jumped: no events for the skipped
revisions exist here).
``status()`` may be called from any thread.
"""
from __future__ import annotations

import logging
import socket
import threading
import time
import zlib
from typing import Callable

from afs import errors, wire
from afs.agent.replica import Replica
from afs.model import Event

log = logging.getLogger("afs.agent")

MAX_STREAM_FRAME = 1 << 30  # a snapshot of a large tree arrives as one frame


class _Conn:
    def __init__(self, endpoint: str, connect_timeout: float):
        host, _, port = endpoint.rpartition(":")
        self.endpoint = endpoint
        self.sock = socket.create_connection((host, int(port)), timeout=connect_timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.file = self.sock.makefile("rb")
        self._id = 0

    def request(self, op: str, **args) -> int:
        self._id += 1
        self.sock.sendall(wire.encode_frame({"id": self._id, "op": op, **args}))
        return self._id

    def read(self, timeout: float | None):
        self.sock.settimeout(timeout)
        frame = wire.read_frame_sync(self.file, MAX_STREAM_FRAME)
        if frame is None:
            raise ConnectionError(f"{self.endpoint} closed the connection")
        return frame

    def call(self, op: str, timeout: float, **args):
        rid = self.request(op, **args)
        while True:
            frame = self.read(timeout)
            if frame.get("id") != rid:
                continue
            if "error" in frame:
                raise errors.from_wire(frame["error"])
            return frame.get("ok")

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class Follower:
    def __init__(self, endpoints: list[str], replica: Replica, *,
                 on_change: Callable[[set[str], int], None] | None = None,
                 on_events: Callable[[int, list[Event]], None] | None = None,
                 on_reset: Callable[[int], None] | None = None,
                 connect_timeout: float = 1.0, idle_timeout: float = 5.0,
                 save_interval: float = 1.0):
        self.endpoints = list(endpoints)
        self.replica = replica
        self.on_change = on_change
        self.on_events = on_events
        self.on_reset = on_reset
        #: on the first stream, ask for this many revisions BEFORE the replica's revision and hand
        #: them to ``on_events`` only (never re-applied): primes the local watch history after a
        #: restart, so local watchers can resume from before the cache's revision
        self.history_warmup = 0
        self._warmed = False
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout      # no frame for this long => reconnect
        self.save_interval = save_interval
        self._stop = threading.Event()
        self._conn: _Conn | None = None
        self._lock = threading.Lock()
        self.connected_member = ""
        self.last_contact = 0.0                # unix time of the last frame from a member
        self.member_revision = 0               # the member's revision at last contact
        self.synced = False                    # caught up with a member at least once
        self.stats = {"snapshots": 0, "revisions": 0, "reconnects": 0, "compacted": 0}
        self._last_save = 0.0
        self._host_key = zlib.crc32(socket.gethostname().encode())

    # ------------------------------------------------------------ status
    def status(self) -> dict:
        now = time.time()
        connected = self._conn is not None
        return {
            "revision": self.replica.revision,
            "connected": connected,
            "connected_member": self.connected_member if connected else "",
            "last_contact": round(self.last_contact, 3) if self.last_contact else None,
            "staleness_seconds": round(now - self.last_contact, 3) if self.last_contact else None,
            "synced": self.synced,
            "cache": self.replica.cache_state,
        }

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            if self._conn is not None:
                try:
                    self._conn.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    # ------------------------------------------------------------ member choice
    def _candidates(self) -> list[str]:
        """Followers first (spread by host), then the leader, then configured endpoints."""
        for ep in self.endpoints:
            try:
                c = _Conn(ep, self.connect_timeout)
            except OSError:
                continue
            try:
                st = c.call("status", self.connect_timeout * 2)
            except (OSError, errors.AfsError, wire.FrameError):
                continue
            finally:
                c.close()
            members = st.get("members") or []
            leader = st.get("leader", "")
            followers = sorted(m["client_addr"] for m in members
                               if m.get("client_addr") and m.get("name") != leader and m.get("voter", True))
            leaders = [m["client_addr"] for m in members if m.get("name") == leader and m.get("client_addr")]
            if followers:
                k = self._host_key % len(followers)
                followers = followers[k:] + followers[:k]
            out = followers + leaders + [e for e in self.endpoints if e not in followers + leaders]
            return list(dict.fromkeys(out))
        return list(self.endpoints)

    # ------------------------------------------------------------ main loop
    def run(self) -> None:
        backoff = 0.05
        while not self._stop.is_set():
            progressed = False
            for ep in self._candidates():
                if self._stop.is_set():
                    break
                try:
                    progressed |= self._follow(ep)
                except (OSError, ConnectionError, wire.FrameError, errors.AfsError) as exc:
                    if not self._stop.is_set():
                        log.info("event=stream_lost member=%s error=%r", ep, str(exc))
                finally:
                    with self._lock:
                        if self._conn is not None:
                            self._conn.close()
                            self._conn = None
                self._maybe_save(force=True)
                self.stats["reconnects"] += 1
            if progressed:
                backoff = 0.05
            self._stop.wait(backoff)
            backoff = min(backoff * 2, 2.0)
        self._maybe_save(force=True)

    def _follow(self, endpoint: str) -> bool:
        conn = _Conn(endpoint, self.connect_timeout)
        with self._lock:
            self._conn = conn
        self.connected_member = endpoint
        progressed = False
        if self.replica.revision == 0 and not self.synced:
            progressed |= self._snapshot(conn)
        while not self._stop.is_set():
            start = self.replica.revision + 1
            if self.history_warmup and not self._warmed and self.replica.revision > 0:
                start = max(1, start - self.history_warmup)
            rid = conn.request("watch", path="/", start_revision=start)
            first = self._read_reply(conn, rid)
            if "error" in first:
                exc = errors.from_wire(first["error"])
                if isinstance(exc, errors.Compacted) and start <= self.replica.revision:
                    self._warmed = True         # warm-up history not available: skip it
                    continue
                if isinstance(exc, errors.Compacted):
                    self.stats["compacted"] += 1
                    log.info("event=history_compacted member=%s wanted=%d; fetching a snapshot", endpoint, start)
                    if not self._snapshot(conn):
                        return progressed
                    progressed = True
                    continue
                raise exc
            self._warmed = True
            self._contact(first.get("ok", {}).get("revision", 0))
            log.info("event=streaming member=%s from_revision=%d", endpoint, start)
            progressed |= self._stream(conn, rid)
            return progressed
        return progressed

    def _read_reply(self, conn: _Conn, rid: int) -> dict:
        while True:
            frame = conn.read(self.idle_timeout)
            if frame.get("id") == rid:
                return frame

    def _snapshot(self, conn: _Conn) -> bool:
        res = conn.call("snapshot", max(self.idle_timeout, 30.0))
        changed = self.replica.install_snapshot(res["data"])
        self._contact(int(res.get("revision", 0)))
        if changed is None:
            log.warning("event=snapshot_refused member=%s their_revision=%s ours=%d (never go back)",
                         conn.endpoint, res.get("revision"), self.replica.revision)
            return False
        self.stats["snapshots"] += 1
        log.info("event=snapshot_installed member=%s revision=%d nodes=%d", conn.endpoint,
                 self.replica.revision, len(self.replica.tree))
        self._published(changed)
        if self.on_reset:
            self.on_reset(self.replica.revision)
        return True

    def _stream(self, conn: _Conn, rid: int) -> bool:
        progressed = False
        while not self._stop.is_set():
            frame = conn.read(self.idle_timeout)
            if frame.get("id") != rid:
                continue
            if "events" in frame:
                events = [Event.from_wire(e) for e in frame["events"]]
                rev = int(frame.get("revision") or events[0].revision)
                if rev <= self.replica.revision:
                    if self.on_events:            # warm-up: local watch history only
                        self.on_events(rev, events)
                    continue                      # already have it (never apply twice)
                try:
                    changed = self.replica.apply(rev, events)
                except (errors.RevisionGap, errors.InvalidInput) as exc:
                    log.warning("event=replica_mismatch revision=%d error=%r; resyncing", rev, str(exc))
                    self._snapshot(conn)
                    return True
                self.stats["revisions"] += 1
                self._contact(rev)
                self._published(changed)
                if self.on_events:
                    self.on_events(rev, events)
                progressed = True
            elif "progress" in frame:
                self._contact(int(frame["progress"]))
            elif "error" in frame:
                raise errors.from_wire(frame["error"])
            self._maybe_save()
        return progressed

    def _contact(self, member_revision: int) -> None:
        self.last_contact = time.time()
        self.member_revision = max(self.member_revision, member_revision)
        if self.replica.revision >= member_revision:
            self.synced = True

    def _published(self, changed: set[str]) -> None:
        if self.on_change and changed:
            self.on_change(changed, self.replica.revision)

    def _maybe_save(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_save < self.save_interval:
            return
        try:
            if self.replica.save():
                self._last_save = now
        except OSError as exc:
            log.error("event=cache_save_failed error=%r", str(exc))
