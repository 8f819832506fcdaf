"""TCP peer transport for Raft messages.

Contract:
- Threading: every method, and every callback (``on_message``, ``on_unreachable``,
  ``on_snapshot_status``), runs on the event loop thread that called :meth:`start`.
- :meth:`send` never blocks or awaits. Messages are fire-and-forget, as Raft expects: they may
  be lost (a connection dies with bytes in flight, a queue overflows, a peer is unknown) or be
  reordered across reconnections; they are never duplicated by the transport, never corrupted,
  and on one connection they arrive in the order they were sent (except that a streamed
  snapshot is delivered when its last chunk arrives, possibly after messages sent later).
- Lost-message reports: ``on_unreachable(peer)`` is called (deferred with ``call_soon``, so
  never re-entrantly from inside :meth:`send`; at most one pending report per peer) when a
  message is dropped because the peer's queue is full or its address is unknown, when a
  connection attempt fails, and when an established connection breaks.
- ``on_snapshot_status(peer, ok)`` (optional) reports the fate of each ``SNAP`` message:
  ``True`` once its last chunk is written to the socket (and ``drain()`` returned), ``False``
  if it was dropped (queue full, peer removed or moved) or the connection broke before that.
  It is what the Raft driver turns into ``SNAP_STATUS``. ``True`` does not mean the follower
  installed it; its ``APP_RESP`` says that.
- Every peer connection is opened by its sender and carries one direction only: a hello frame
  ``{"hello": node_id, "cluster": cluster_id}`` (plus ``"info": hello_info`` when given, a small
  map the receiver hands to ``on_hello(name, info)``, e.g. the sender's client address) then
  message frames. The receiving side never
  writes; reading EOF on an outbound connection means the peer closed it.
- Inbound connections are accepted in exactly one place, :meth:`TcpTransport._accept`
  (authentication lands there). A wrong cluster id, a bad hello, a malformed frame, a message
  whose ``frm`` is not the hello's name, or an inconsistent snapshot stream closes that
  connection with one log line; the transport itself keeps running.

Snapshot streaming (every ``SNAP`` message, so the receiver never has to guess): the message
frame is sent with an empty ``context``, followed by ``of >= 1`` chunk frames
``{"chunk": n, "of": of, "data": bytes}`` (``n`` = 0..of-1, each at most ``snapshot_chunk``
bytes; only a lone chunk may be empty). Other messages may be interleaved between chunks.
The receiver reassembles (at most ``MAX_SNAPSHOT_BYTES``) and only then calls ``on_message``
with the full ``context``. A new ``SNAP`` header before the previous stream completed, a chunk
out of sequence, or a chunk without a header is an inconsistency: the connection is dropped.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import random
import socket
from typing import Callable

from afs.raft.messages import Message, MsgType, decode_message, encode_message
from afs.wire import MAX_PEER_FRAME, FrameDecoder, FrameError, encode_frame, read_frame

log = logging.getLogger(__name__)

BACKOFF_MIN = 0.05            # seconds; reconnect delay doubles up to BACKOFF_MAX, jittered
BACKOFF_MAX = 2.0
CONNECT_TIMEOUT = 2.0
HELLO_TIMEOUT = 5.0
MAX_HELLO_FRAME = 4096
MAX_SNAPSHOT_BYTES = 1 << 30
WRITE_BATCH_BYTES = 256 << 10  # coalesce queued frames into writes of about this size
DRAIN_ABOVE = 1 << 20          # await drain() only when the transport buffer holds more than this
READ_CHUNK = 256 << 10
STREAM_LIMIT = 256 << 10       # StreamReader buffer limit (pauses reading above 2x)
TCP_USER_TIMEOUT_MS = 10_000   # unacknowledged data for this long kills the connection
KEEPALIVE = (5, 2, 3)          # idle, interval, count (seconds, seconds, probes)


def parse_addr(addr: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` -> ``(host, port)``."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"bad address {addr!r}: expected host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def format_addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _tune_socket(sock) -> None:
    """Low latency (NODELAY) and prompt detection of dead peers (keepalive, user timeout)."""
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            idle, intvl, cnt = KEEPALIVE
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, intvl)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, cnt)
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, TCP_USER_TIMEOUT_MS)
    except OSError as exc:  # not fatal: e.g. a non-TCP socket in tests
        log.debug("could not tune socket: %s", exc)


class _Drop(Exception):
    """An inbound connection must be closed (the reason is logged once)."""


class _SnapOut:
    """A snapshot being streamed to a peer."""

    __slots__ = ("msg", "data", "next", "of", "chunk")

    def __init__(self, msg: Message, chunk: int):
        self.msg = msg
        self.data = memoryview(msg.context)
        self.chunk = chunk
        self.of = max(1, -(-len(msg.context) // chunk))
        self.next = 0

    def next_frame(self) -> bytes:
        n = self.next
        piece = self.data[n * self.chunk:(n + 1) * self.chunk]
        self.next = n + 1
        return encode_frame({"chunk": n, "of": self.of, "data": piece})

    @property
    def done(self) -> bool:
        return self.next >= self.of


class _SnapIn:
    """A snapshot being reassembled from one inbound connection."""

    __slots__ = ("msg", "buf", "next", "of")

    def __init__(self, msg: Message):
        self.msg = msg
        self.buf = bytearray()
        self.next = 0
        self.of = 0


class _Peer:
    __slots__ = ("id", "addr", "queue", "wake", "task", "writer", "snap", "snap_backlog",
                 "closed", "down_logged", "connected_once")

    def __init__(self, peer_id: str, addr: str):
        self.id = peer_id
        self.addr = addr
        self.queue: collections.deque[Message] = collections.deque()
        self.wake = asyncio.Event()
        self.task: asyncio.Task | None = None
        self.writer: asyncio.StreamWriter | None = None   # set while connected (fast path)
        self.snap: _SnapOut | None = None                  # snapshot being streamed
        self.snap_backlog: collections.deque[Message] = collections.deque()
        self.closed = False
        self.down_logged = False
        self.connected_once = False


class TcpTransport:
    """Raft peer links over TCP: one outbound connection per peer, inbound from every peer."""

    def __init__(self, node_id: str, listen_addr: str, peers: dict[str, str],
                 on_message: Callable[[Message], None], *, cluster_id: str = "afs",
                 on_unreachable: Callable[[str], None] | None = None,
                 queue_limit: int = 4096, snapshot_chunk: int = 1 << 20, ssl_context=None,
                 client_ssl_context=None,
                 on_snapshot_status: Callable[[str, bool], None] | None = None,
                 hello_info: dict | None = None,
                 on_hello: Callable[[str, dict], None] | None = None,
                 eager_connect: bool = False):
        """``eager_connect``: open each outbound link once at start even with nothing to send,
        so every peer receives our hello (and ``hello_info``) early; later links are lazy."""
        if not 0 < snapshot_chunk <= MAX_PEER_FRAME - 1024:
            raise ValueError(f"snapshot_chunk must be in 1..{MAX_PEER_FRAME - 1024}")
        if queue_limit < 1:
            raise ValueError("queue_limit must be >= 1")
        parse_addr(listen_addr)
        self.node_id = node_id
        self.listen_addr = listen_addr
        self.cluster_id = cluster_id
        self.on_message = on_message
        self.on_unreachable = on_unreachable
        self.on_snapshot_status = on_snapshot_status
        self.on_hello = on_hello
        self.eager_connect = eager_connect
        hello = {"hello": node_id, "cluster": cluster_id}
        if hello_info:
            hello["info"] = hello_info
        self._hello_frame = encode_frame(hello, MAX_HELLO_FRAME)
        self.queue_limit = queue_limit
        self.snapshot_chunk = snapshot_chunk
        self.ssl_context = ssl_context                      # server side of inbound links
        self.client_ssl_context = client_ssl_context or ssl_context  # outbound links
        self._peers: dict[str, _Peer] = {}
        self._server: asyncio.AbstractServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inbound: dict[asyncio.Task, asyncio.StreamWriter] = {}
        self._inbound_by_name: dict[str, asyncio.StreamWriter] = {}
        self._unreachable_pending: set[str] = set()
        self._rng = random.Random()
        self._started = False
        self._stopped = False
        self.stats = collections.Counter()   # frames_sent, msgs_recv, dropped_*, connects, ...
        self.update_peers(peers)

    # ------------------------------------------------------------------ lifecycle

    @property
    def bound_addr(self) -> str:
        """The address actually listened on (useful with port 0)."""
        if self._server is None or not self._server.sockets:
            return self.listen_addr
        host, port = self._server.sockets[0].getsockname()[:2]
        return format_addr(host, port)

    async def start(self) -> None:
        if self._started:
            return
        self._loop = asyncio.get_running_loop()
        host, port = parse_addr(self.listen_addr)
        self._server = await asyncio.start_server(
            self._accept, host or None, port, ssl=self.ssl_context, limit=STREAM_LIMIT,
            reuse_address=True)
        self._started = True
        for peer in self._peers.values():
            self._spawn(peer)
        log.info("%s: peer transport listening on %s", self.node_id, self.bound_addr)

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._server is not None:
            self._server.close()
        tasks = []
        for peer in self._peers.values():
            tasks += self._close_peer(peer)
        for task, writer in list(self._inbound.items()):
            writer.close()
            task.cancel()
            tasks.append(task)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        await asyncio.sleep(0)  # let closed transports release their sockets

    def update_peers(self, peers: dict[str, str]) -> None:
        """Make the peer set equal to ``peers`` (own id ignored). Queued messages survive an
        address change; a removed peer's queue is dropped."""
        wanted = {pid: addr for pid, addr in peers.items() if pid != self.node_id}
        for addr in wanted.values():
            parse_addr(addr)
        for pid in list(self._peers):
            if pid not in wanted:
                self._close_peer(self._peers.pop(pid))
        for pid, addr in wanted.items():
            old = self._peers.get(pid)
            if old is not None and old.addr == addr:
                continue
            peer = _Peer(pid, addr)
            if old is not None:
                log.info("%s: peer %s moved %s -> %s", self.node_id, pid, old.addr, addr)
                peer.queue, old.queue = old.queue, collections.deque()
                peer.snap_backlog, old.snap_backlog = old.snap_backlog, collections.deque()
                self._close_peer(old)
            self._peers[pid] = peer
            if self._started and not self._stopped:
                self._spawn(peer)

    def _spawn(self, peer: _Peer) -> None:
        peer.task = self._loop.create_task(self._peer_loop(peer), name=f"afs-peer-{peer.id}")
        if peer.queue:
            peer.wake.set()

    def _close_peer(self, peer: _Peer) -> list[asyncio.Task]:
        peer.closed = True
        if peer.writer is not None:
            peer.writer.close()
            peer.writer = None
        if peer.task is not None and not peer.task.done():
            peer.task.cancel()
            return [peer.task]
        return []

    # ------------------------------------------------------------------ sending

    def send(self, msgs: list[Message]) -> None:
        """Queue ``msgs`` for their ``to`` peers. Never blocks; see the module contract.

        When a peer's link is up and idle, its frames are written to the socket before this
        returns (one write per peer per call); otherwise the peer's writer task is woken.
        """
        direct: dict[_Peer, list[bytes]] | None = None
        for m in msgs:
            peer = self._peers.get(m.to)
            if peer is None or self._stopped:
                self.stats["dropped_unknown"] += 1
                if m.to != self.node_id:
                    self._report_unreachable(m.to)
                continue
            if not peer.queue and peer.writer is not None and m.type != MsgType.SNAP \
                    and not peer.writer.transport.is_closing() \
                    and peer.writer.transport.get_write_buffer_size() < DRAIN_ABOVE:
                frame = self._encode(m)
                if frame is not None:
                    if direct is None:
                        direct = {}
                    direct.setdefault(peer, []).append(frame)
                continue
            if len(peer.queue) >= self.queue_limit:
                self.stats["dropped_overflow"] += 1
                self._report_unreachable(peer.id)
                if m.type == MsgType.SNAP and self._loop is not None:
                    self._loop.call_soon(self._snapshot_status, peer.id, False)  # not re-entrant
                continue
            peer.queue.append(m)
            peer.wake.set()
        if direct:
            for peer, frames in direct.items():
                peer.writer.write(frames[0] if len(frames) == 1 else b"".join(frames))
                self.stats["frames_sent"] += len(frames)

    def _encode(self, m: Message) -> bytes | None:
        try:
            return encode_frame(encode_message(m), MAX_PEER_FRAME)
        except (FrameError, TypeError, ValueError) as exc:
            self.stats["dropped_unencodable"] += 1
            log.error("%s: dropping %s to %s: %s", self.node_id, m.type.name, m.to, exc)
            return None

    def _report_unreachable(self, peer_id: str) -> None:
        if self.on_unreachable is None or self._stopped or peer_id in self._unreachable_pending:
            return
        loop = self._loop
        if loop is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:   # not started and no loop: nobody to tell yet
                return
        self._unreachable_pending.add(peer_id)
        loop.call_soon(self._fire_unreachable, peer_id)

    def _fire_unreachable(self, peer_id: str) -> None:
        self._unreachable_pending.discard(peer_id)
        if self._stopped:
            return
        try:
            self.on_unreachable(peer_id)
        except Exception:
            log.exception("%s: on_unreachable(%s) failed", self.node_id, peer_id)

    def _snapshot_status(self, peer_id: str, ok: bool) -> None:
        if self.on_snapshot_status is None or self._stopped:
            return
        try:
            self.on_snapshot_status(peer_id, ok)
        except Exception:
            log.exception("%s: on_snapshot_status(%s) failed", self.node_id, peer_id)

    async def _peer_loop(self, peer: _Peer) -> None:
        """Connect lazily (when there is something to send), pump the queue, reconnect with
        jittered exponential backoff."""
        backoff = BACKOFF_MIN
        loop = asyncio.get_running_loop()
        try:
            while not peer.closed:
                if not peer.queue and not peer.snap_backlog and \
                        (peer.connected_once or not self.eager_connect):
                    peer.wake.clear()
                    await peer.wake.wait()
                    continue
                try:
                    reader, writer = await self._connect(peer)
                except (OSError, asyncio.TimeoutError) as exc:
                    self._link_down(peer, f"connect failed: {exc or type(exc).__name__}")
                    await asyncio.sleep(backoff * (0.5 + self._rng.random() / 2))
                    backoff = min(backoff * 2, BACKOFF_MAX)
                    continue
                log.debug("%s: connected to peer %s at %s", self.node_id, peer.id, peer.addr)
                peer.connected_once = True
                self.stats["connects"] += 1
                since = loop.time()
                try:
                    await self._pump(peer, reader, writer)
                except (OSError, ConnectionError) as exc:
                    if loop.time() - since >= BACKOFF_MAX:
                        peer.down_logged = False   # it was healthy: this is a new outage
                    self._link_down(peer, f"connection lost: {exc or type(exc).__name__}")
                finally:
                    if peer.writer is writer:
                        peer.writer = None
                    writer.close()
                    self._abort_snapshot(peer)
                if loop.time() - since < BACKOFF_MAX:   # flapping (e.g. refused): keep backing off
                    await asyncio.sleep(backoff * (0.5 + self._rng.random() / 2))
                    backoff = min(backoff * 2, BACKOFF_MAX)
                else:
                    backoff = BACKOFF_MIN
        finally:
            self._abort_snapshot(peer)

    def _link_down(self, peer: _Peer, why: str) -> None:
        if peer.closed:
            return
        self.stats["link_failures"] += 1
        if not peer.down_logged:
            log.warning("%s: peer %s at %s unreachable (%s)", self.node_id, peer.id, peer.addr, why)
            peer.down_logged = True
        else:
            log.debug("%s: peer %s at %s still unreachable (%s)", self.node_id, peer.id,
                      peer.addr, why)
        self._report_unreachable(peer.id)

    def _abort_snapshot(self, peer: _Peer) -> None:
        if peer.snap is not None:
            peer.snap = None
            self._snapshot_status(peer.id, False)

    async def _connect(self, peer: _Peer):
        host, port = parse_addr(peer.addr)
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=self.client_ssl_context, limit=STREAM_LIMIT),
            CONNECT_TIMEOUT)
        _tune_socket(writer.get_extra_info("socket"))
        writer.write(self._hello_frame)
        return reader, writer

    async def _pump(self, peer: _Peer, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        # The receiver never writes: a completed read means EOF/reset, i.e. the link is dead.
        watch = asyncio.ensure_future(reader.read(1))

        def on_watch(f: asyncio.Future) -> None:
            if not f.cancelled():
                f.exception()   # retrieve it: the failure is handled via the wake-up below
            peer.wake.set()

        watch.add_done_callback(on_watch)
        transport = writer.transport
        peer.writer = writer   # enables the direct path in send()
        try:
            while not peer.closed:
                if watch.done() or transport.is_closing():
                    raise ConnectionResetError("closed by peer")
                data, finished = self._collect(peer)
                if data:
                    writer.write(data)
                    if finished is not None or transport.get_write_buffer_size() > DRAIN_ABOVE:
                        try:
                            await writer.drain()
                        except BaseException:
                            if finished is not None:
                                self._snapshot_status(peer.id, False)
                            raise
                    if finished is not None:
                        self._snapshot_status(peer.id, True)
                    elif peer.snap is not None:
                        await asyncio.sleep(0)   # one chunk per loop turn: don't hog the loop
                    continue
                peer.wake.clear()
                await peer.wake.wait()
        finally:
            watch.cancel()

    def _collect(self, peer: _Peer) -> tuple[bytes, Message | None]:
        """Take up to about WRITE_BATCH_BYTES of queued frames, plus the next snapshot chunk.
        Returns the bytes to write and the SNAP message whose stream they complete, if any."""
        frames: list[bytes] = []
        size = 0
        q = peer.queue
        while q and size < WRITE_BATCH_BYTES:
            m = q.popleft()
            if m.type == MsgType.SNAP:
                if peer.snap is not None:
                    peer.snap_backlog.append(m)
                    continue
                frame = self._encode(dataclasses.replace(m, context=b""))
                if frame is None:
                    self._snapshot_status(peer.id, False)
                    continue
                peer.snap = _SnapOut(m, self.snapshot_chunk)
            else:
                frame = self._encode(m)
                if frame is None:
                    continue
            frames.append(frame)
            size += len(frame)
        finished = None
        snap = peer.snap
        if snap is None and peer.snap_backlog:
            m = peer.snap_backlog.popleft()
            frame = self._encode(dataclasses.replace(m, context=b""))
            if frame is None:
                self._snapshot_status(peer.id, False)
            else:
                frames.append(frame)
                snap = peer.snap = _SnapOut(m, self.snapshot_chunk)
        if snap is not None:
            frames.append(snap.next_frame())
            if snap.done:
                finished, peer.snap = snap.msg, None
        self.stats["frames_sent"] += len(frames)
        if not frames:
            return b"", finished
        return (frames[0] if len(frames) == 1 else b"".join(frames)), finished

    # ------------------------------------------------------------------ receiving

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The one place inbound peer connections are accepted (auth/TLS checks go here)."""
        task = asyncio.current_task()
        self._inbound[task] = writer
        peername = writer.get_extra_info("peername")
        name = None
        try:
            if self._stopped:
                return
            _tune_socket(writer.get_extra_info("socket"))
            try:
                hello = await asyncio.wait_for(read_frame(reader, MAX_HELLO_FRAME), HELLO_TIMEOUT)
            except (FrameError, OSError, asyncio.TimeoutError) as exc:
                log.warning("%s: closing peer connection from %s: bad hello (%s)",
                            self.node_id, peername, exc or type(exc).__name__)
                return
            if not (isinstance(hello, dict) and isinstance(hello.get("hello"), str)
                    and hello["hello"] and isinstance(hello.get("cluster"), str)):
                if hello is not None:
                    log.warning("%s: closing peer connection from %s: malformed hello",
                                self.node_id, peername)
                return
            if hello["cluster"] != self.cluster_id:
                log.warning("%s: rejecting peer %r from %s: cluster %r, expected %r",
                            self.node_id, hello["hello"], peername, hello["cluster"],
                            self.cluster_id)
                return
            name = hello["hello"]
            if name == self.node_id:
                log.warning("%s: rejecting peer connection from %s claiming our own name",
                            self.node_id, peername)
                name = None
                return
            old = self._inbound_by_name.get(name)
            if old is not None:   # the peer reconnected; its previous link is dead
                log.debug("%s: new link from %s replaces the previous one", self.node_id, name)
                old.close()
            self._inbound_by_name[name] = writer
            if self.on_hello is not None:
                info = hello.get("info")
                try:
                    self.on_hello(name, info if isinstance(info, dict) else {})
                except Exception:
                    log.exception("%s: on_hello(%s) failed", self.node_id, name)
            await self._receive(name, reader)
        except _Drop as exc:
            self.stats["inbound_dropped"] += 1
            log.warning("%s: dropping peer connection from %s (%s): %s",
                        self.node_id, name, peername, exc)
        except (OSError, ConnectionError) as exc:
            log.debug("%s: peer connection from %s (%s) lost: %s", self.node_id, name,
                      peername, exc)
        except asyncio.CancelledError:
            pass  # stop(); the task ends here
        except Exception:  # a bug: never let it escape into asyncio's connection callback
            log.exception("%s: peer connection from %s (%s) failed", self.node_id, name,
                          peername)
        finally:
            self._inbound.pop(task, None)
            if name is not None and self._inbound_by_name.get(name) is writer:
                del self._inbound_by_name[name]
            writer.close()

    async def _receive(self, name: str, reader: asyncio.StreamReader) -> None:
        decoder = FrameDecoder(MAX_PEER_FRAME)
        snap: _SnapIn | None = None
        while True:
            data = await reader.read(READ_CHUNK)
            if not data:
                try:
                    decoder.eof()
                except FrameError as exc:
                    raise _Drop(str(exc)) from None
                if snap is not None:
                    log.info("%s: peer %s closed the link mid-snapshot", self.node_id, name)
                return
            try:
                frames = decoder.feed(data)
            except FrameError as exc:
                raise _Drop(str(exc)) from None
            for obj in frames:
                if isinstance(obj, list):
                    try:
                        m = decode_message(obj)
                    except (ValueError, TypeError) as exc:
                        raise _Drop(f"malformed message: {exc}") from None
                    if m.frm != name:
                        raise _Drop(f"message from {m.frm!r} on the link of {name!r}")
                    if m.type == MsgType.SNAP:
                        if snap is not None:
                            raise _Drop("new snapshot before the previous one completed")
                        snap = _SnapIn(m)
                        continue
                    self._deliver(m)
                elif isinstance(obj, dict) and "chunk" in obj:
                    if snap is None:
                        raise _Drop("snapshot chunk without a snapshot")
                    if self._add_chunk(snap, obj):
                        done, snap = snap, None
                        self._deliver(dataclasses.replace(done.msg, context=bytes(done.buf)))
                        del done
                else:
                    raise _Drop(f"unexpected frame of type {type(obj).__name__}")

    def _add_chunk(self, snap: _SnapIn, obj: dict) -> bool:
        """Append one chunk; True when the snapshot is complete. Raises _Drop if inconsistent."""
        n, of, data = obj.get("chunk"), obj.get("of"), obj.get("data")
        if not (type(n) is int and type(of) is int and isinstance(data, bytes)):
            raise _Drop("malformed snapshot chunk")
        if n != snap.next or of < 1 or (snap.of and of != snap.of) or n >= of:
            raise _Drop(f"snapshot chunk {n}/{of} out of sequence (expected {snap.next}/"
                        f"{snap.of or '?'})")
        if not data and of > 1:
            raise _Drop("empty snapshot chunk")
        if len(snap.buf) + len(data) > MAX_SNAPSHOT_BYTES:
            raise _Drop(f"snapshot larger than {MAX_SNAPSHOT_BYTES} bytes")
        snap.of = of
        snap.next = n + 1
        snap.buf += data
        return snap.next == of

    def _deliver(self, m: Message) -> None:
        if m.to != self.node_id:
            self.stats["dropped_misrouted"] += 1
            log.debug("%s: dropping %s addressed to %r", self.node_id, m.type.name, m.to)
            return
        self.stats["msgs_recv"] += 1
        try:
            self.on_message(m)
        except Exception:
            log.exception("%s: on_message failed for %s from %s", self.node_id, m.type.name,
                          m.frm)
