"""TCP peer transport (afs/transport/tcp.py) on 127.0.0.1."""
from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import statistics
import struct
import time

import pytest

from afs.raft.messages import (
    ConfState, Entry, Message, MsgType, SnapshotMeta, encode_message,
)
from afs.transport.tcp import TcpTransport
from afs.wire import encode_frame

LOCAL = "127.0.0.1:0"


def run_async(timeout=30):
    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*a, **kw):
            return asyncio.run(asyncio.wait_for(fn(*a, **kw), timeout))
        return wrapper
    return deco


class Node:
    """A transport plus what it received and reported."""

    def __init__(self, name, listen=LOCAL, **kw):
        self.name = name
        self.got: list[Message] = []
        self.unreachable: list[str] = []
        self.snap_status: list[tuple[str, bool]] = []
        self.arrived = asyncio.Event()
        self.t = TcpTransport(name, listen, {}, self._on_message,
                              on_unreachable=self.unreachable.append,
                              on_snapshot_status=lambda p, ok: self.snap_status.append((p, ok)),
                              **kw)

    def _on_message(self, m):
        self.got.append(m)
        self.arrived.set()

    @property
    def addr(self):
        return self.t.bound_addr

    async def wait_for(self, pred, timeout=10.0):
        deadline = time.monotonic() + timeout
        while not pred():
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{self.name}: condition not met; got {len(self.got)} msgs")
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), min(left, 0.05))
            except asyncio.TimeoutError:
                pass


async def mesh(n, **kw) -> list[Node]:
    nodes = [Node(f"n{i + 1}", **kw) for i in range(n)]
    for x in nodes:
        await x.t.start()
    addrs = {x.name: x.addr for x in nodes}
    for x in nodes:
        x.t.update_peers(addrs)
    return nodes


async def stop_all(nodes):
    for x in nodes:
        await x.t.stop()


def msg(frm, to, i=0, **kw):
    return Message(MsgType.APP, to=to, frm=frm, term=3, log_term=2, index=i, commit=i, **kw)


def raw_connect(addr):
    host, port = addr.rsplit(":", 1)
    return socket.create_connection((host, int(port)))


async def closed_by_peer(sock, timeout=5.0):
    """True when the other side closes the raw socket."""
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        try:
            data = sock.recv(1024)
        except BlockingIOError:
            await asyncio.sleep(0.01)
            continue
        except ConnectionResetError:
            return True
        if not data:
            return True
    return False


# ---------------------------------------------------------------- basic exchange

@run_async()
async def test_two_transports_exchange_messages_in_order():
    """Messages flow both ways, intact and in send order (1000 each way, with entries)."""
    a, b = await mesh(2)
    try:
        ents = [Entry(7, 3, data=b"payload-%d" % k) for k in range(3)]
        for i in range(1000):
            a.t.send([msg("n1", "n2", i, entries=ents if i % 10 == 0 else [])])
            b.t.send([msg("n2", "n1", i)])
        await b.wait_for(lambda: len(b.got) == 1000)
        await a.wait_for(lambda: len(a.got) == 1000)
        assert [m.index for m in b.got] == list(range(1000))
        assert [m.index for m in a.got] == list(range(1000))
        assert b.got[0] == msg("n1", "n2", 0, entries=ents)
        assert all(m.frm == "n1" and m.to == "n2" for m in b.got)
        assert not a.unreachable and not b.unreachable
    finally:
        await stop_all([a, b])


@run_async()
async def test_three_transports_full_mesh():
    """Every node of three reaches every other; one send() call may address several peers."""
    nodes = await mesh(3)
    try:
        for x in nodes:
            x.t.send([msg(x.name, y.name, 1) for y in nodes if y is not x])
        for x in nodes:
            await x.wait_for(lambda x=x: len(x.got) == 2)
            assert sorted(m.frm for m in x.got) == sorted(y.name for y in nodes if y is not x)
    finally:
        await stop_all(nodes)


@run_async()
async def test_batch_send_coalesced():
    """A send() of many messages to an idle connected peer goes out in one write."""
    a, b = await mesh(2)
    try:
        a.t.send([msg("n1", "n2", 0)])
        await b.wait_for(lambda: len(b.got) == 1)
        writes = []
        w = a.t._peers["n2"].writer
        orig = w.write
        w.write = lambda data: (writes.append(len(data)), orig(data))
        a.t.send([msg("n1", "n2", i) for i in range(1, 51)])
        await b.wait_for(lambda: len(b.got) == 51)
        assert len(writes) == 1
    finally:
        await stop_all([a, b])


@run_async()
async def test_send_to_unknown_peer_reports_unreachable():
    """A message for a peer without an address is dropped and reported (deferred, not
    re-entrantly from send())."""
    a, = await mesh(1)
    try:
        a.t.send([msg("n1", "ghost")])
        assert a.unreachable == []   # not called from inside send()
        await asyncio.sleep(0)
        assert a.unreachable == ["ghost"]
    finally:
        await a.t.stop()


@run_async()
async def test_stop_is_idempotent_and_closes_listener():
    """stop() twice is fine; afterwards the port no longer accepts connections."""
    a, b = await mesh(2)
    a.t.send([msg("n1", "n2")])
    await b.wait_for(lambda: len(b.got) == 1)
    addr = b.addr
    await b.t.stop()
    await b.t.stop()
    with pytest.raises(OSError):
        raw_connect(addr).close()
    await a.t.stop()
    a.t.send([msg("n1", "n2")])   # after stop: silently dropped
    await a.t.stop()


# ---------------------------------------------------------------- failures

@run_async()
async def test_peer_restart_reconnects_and_messages_flow_again():
    """When a peer goes away, the sender reports it unreachable; when it comes back on the
    same address, the sender reconnects (with backoff) and messages flow again."""
    a, b = await mesh(2)
    try:
        a.t.send([msg("n1", "n2", 1)])
        await b.wait_for(lambda: len(b.got) == 1)
        addr = b.addr
        await b.t.stop()
        # keep sending while the peer is down: the link breaks and is reported
        for i in range(40):
            a.t.send([msg("n1", "n2", 100 + i)])
            await asyncio.sleep(0.01)
            if a.unreachable:
                break
        await a.wait_for(lambda: "n2" in a.unreachable)
        b2 = Node("n2", listen=addr)
        await b2.t.start()
        b2.t.update_peers({"n1": a.addr})
        try:
            deadline = time.monotonic() + 10
            i = 0
            while not any(m.index >= 1000 for m in b2.got):
                assert time.monotonic() < deadline, "no message after restart"
                a.t.send([msg("n1", "n2", 1000 + i)])
                i += 1
                await asyncio.sleep(0.02)
            b2.t.send([msg("n2", "n1", 5)])
            await a.wait_for(lambda: any(m.index == 5 for m in a.got))
        finally:
            await b2.t.stop()
    finally:
        await a.t.stop()


@run_async()
async def test_queue_overflow_drops_and_reports_unreachable():
    """With the peer down, at most queue_limit messages wait; the rest are dropped and the
    peer is reported unreachable."""
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_addr = "127.0.0.1:%d" % dead.getsockname()[1]
    dead.close()   # nothing listens there
    a = Node("n1", queue_limit=10)
    await a.t.start()
    a.t.update_peers({"n2": dead_addr})
    try:
        a.t.send([msg("n1", "n2", i) for i in range(50)])
        assert a.t.stats["dropped_overflow"] == 40
        assert len(a.t._peers["n2"].queue) == 10
        await asyncio.sleep(0)
        assert a.unreachable == ["n2"]   # one report per peer per burst
        await a.wait_for(lambda: a.t.stats["link_failures"] >= 2)   # retries with backoff
        assert a.unreachable.count("n2") >= 2
    finally:
        await a.t.stop()


@run_async()
async def test_wrong_cluster_id_rejected(caplog):
    """A peer with another cluster id is refused with a log line; nothing is delivered and the
    sender sees its link fail."""
    a = Node("n1", cluster_id="blue")
    b = Node("n2", cluster_id="green")
    for x in (a, b):
        await x.t.start()
    a.t.update_peers({"n2": b.addr})
    try:
        with caplog.at_level(logging.WARNING, logger="afs.transport.tcp"):
            for i in range(20):
                a.t.send([msg("n1", "n2", i)])
                await asyncio.sleep(0.02)
            await a.wait_for(lambda: "n2" in a.unreachable)
        assert b.got == []
        assert any("cluster 'blue', expected 'green'" in r.getMessage() for r in caplog.records)
    finally:
        await stop_all([a, b])


def _hello(name="n1", cluster="afs"):
    return encode_frame({"hello": name, "cluster": cluster})


BAD_STREAMS = {
    "no_hello_garbage": b"GET / HTTP/1.1\r\n\r\n",
    "hello_not_a_map": encode_frame([1, 2]),
    "oversize_length": _hello() + struct.pack(">I", 0xFFFFFFFF) + b"xx",
    "undecodable_payload": _hello() + struct.pack(">I", 1) + b"\xc1",
    "malformed_message": _hello() + encode_frame([1, 2, 3]),
    "bad_message_field": _hello() + encode_frame(
        encode_message(msg("n1", "n2"))[:-2] + ["not-bytes", None]),
    "spoofed_sender": _hello("n1") + encode_frame(encode_message(msg("n3", "n2"))),
    "unexpected_map": _hello() + encode_frame({"what": 1}),
    "chunk_without_snapshot": _hello() + encode_frame({"chunk": 0, "of": 1, "data": b"x"}),
    "chunk_out_of_order": _hello() + encode_frame(encode_message(
        Message(MsgType.SNAP, to="n2", frm="n1", snapshot=SnapshotMeta(5, 2))))
        + encode_frame({"chunk": 1, "of": 3, "data": b"x"}),
    "two_snapshot_headers": _hello() + encode_frame(encode_message(
        Message(MsgType.SNAP, to="n2", frm="n1", snapshot=SnapshotMeta(5, 2)))) * 2,
    "truncated_then_eof": _hello() + encode_frame(encode_message(msg("n1", "n2")))[:-3],
}


@pytest.mark.parametrize("name", sorted(BAD_STREAMS))
@run_async()
async def test_malformed_frames_from_raw_socket_do_not_kill_transport(name, caplog):
    """Garbage on an inbound connection closes that connection with a log line; nothing bad is
    delivered and the transport keeps serving its real peers."""
    a, b = await mesh(2)
    try:
        with caplog.at_level(logging.WARNING, logger="afs.transport.tcp"):
            s = raw_connect(b.addr)
            try:
                s.sendall(BAD_STREAMS[name])
                if name == "truncated_then_eof":
                    s.shutdown(socket.SHUT_WR)
                assert await closed_by_peer(s), "connection not closed"
            finally:
                s.close()
        assert b.got == []
        assert [r for r in caplog.records if r.name == "afs.transport.tcp"]
        a.t.send([msg("n1", "n2", 9)])
        await b.wait_for(lambda: len(b.got) == 1)
        assert b.got[0].index == 9
    finally:
        await stop_all([a, b])


@run_async()
async def test_raw_client_with_valid_frames_is_delivered():
    """Negative control for the test above: a well-formed raw stream is delivered, so the
    rejections are due to the malformed input."""
    a, b = await mesh(2)
    try:
        s = raw_connect(b.addr)
        s.sendall(_hello() + encode_frame(encode_message(msg("n1", "n2", 4))))
        await b.wait_for(lambda: len(b.got) == 1)
        assert b.got[0].index == 4
        s.close()
    finally:
        await stop_all([a, b])


@run_async()
async def test_message_for_another_node_is_dropped():
    """A message whose ``to`` is not this node is not delivered (the link stays up)."""
    a, b = await mesh(2)
    try:
        s = raw_connect(b.addr)
        s.sendall(_hello() + encode_frame(encode_message(msg("n1", "n7", 1)))
                  + encode_frame(encode_message(msg("n1", "n2", 2))))
        await b.wait_for(lambda: len(b.got) == 1)
        assert b.got[0].index == 2 and b.t.stats["dropped_misrouted"] == 1
        s.close()
    finally:
        await stop_all([a, b])


# ---------------------------------------------------------------- snapshots

def snap_msg(data: bytes, frm="n1", to="n2") -> Message:
    return Message(MsgType.SNAP, to=to, frm=frm, term=4, context=data,
                   snapshot=SnapshotMeta(100, 4, ConfState(("n1", "n2", "n3"), ())))


@run_async()
async def test_snapshot_of_5_mib_streamed_in_chunks_arrives_intact():
    """A 5 MiB snapshot goes out as a header plus 1 MiB chunks, interleaved with other
    traffic, and is delivered once, complete, after its last chunk; the sender reports it."""
    a, b = await mesh(2)
    try:
        data = os.urandom(5 * 1024 * 1024 + 123)
        a.t.send([snap_msg(data), msg("n1", "n2", 1)])
        await b.wait_for(lambda: any(m.type == MsgType.SNAP for m in b.got))
        snaps = [m for m in b.got if m.type == MsgType.SNAP]
        assert len(snaps) == 1
        assert snaps[0].context == data
        assert snaps[0].snapshot == SnapshotMeta(100, 4, ConfState(("n1", "n2", "n3"), ()))
        assert any(m.index == 1 for m in b.got)
        assert a.snap_status == [("n2", True)]
        # header + 6 chunks (5 full + the 123-byte tail) + the APP
        assert a.t.stats["frames_sent"] == 1 + 6 + 1
    finally:
        await stop_all([a, b])


@run_async()
async def test_small_and_empty_snapshots():
    """Snapshots at or under one chunk (including an empty one) arrive intact."""
    a, b = await mesh(2, snapshot_chunk=1000)
    try:
        a.t.send([snap_msg(b""), snap_msg(b"x" * 1000), snap_msg(b"y" * 1001)])
        await b.wait_for(lambda: len(b.got) == 3)
        assert [m.context for m in b.got] == [b"", b"x" * 1000, b"y" * 1001]
        assert a.snap_status == [("n2", True)] * 3
    finally:
        await stop_all([a, b])


@run_async()
async def test_snapshot_interrupted_reports_failure():
    """If the link breaks before the last chunk is written, on_snapshot_status reports False
    (and the peer is reported unreachable)."""
    async def hang_up(reader, writer):
        await reader.readexactly(100_000)
        writer.transport.abort()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    a = Node("n1", snapshot_chunk=256 * 1024)
    await a.t.start()
    a.t.update_peers({"n2": f"127.0.0.1:{port}"})
    try:
        a.t.send([snap_msg(b"s" * (64 << 20))])
        await a.wait_for(lambda: a.snap_status)
        assert a.snap_status == [("n2", False)]
        await a.wait_for(lambda: "n2" in a.unreachable)
    finally:
        await a.t.stop()
        server.close()


@run_async()
async def test_snapshot_larger_than_limit_is_refused(monkeypatch):
    """Reassembly is bounded: a stream exceeding MAX_SNAPSHOT_BYTES drops the connection."""
    import afs.transport.tcp as tcp
    monkeypatch.setattr(tcp, "MAX_SNAPSHOT_BYTES", 3000)
    a, b = await mesh(2, snapshot_chunk=1000)
    try:
        a.t.send([snap_msg(b"z" * 3001)])
        await b.wait_for(lambda: b.t.stats["inbound_dropped"] == 1)
        assert b.got == []
        a.t.send([snap_msg(b"z" * 3000)])   # control: at the limit it passes
        await b.wait_for(lambda: len(b.got) == 1)
        assert b.got[0].context == b"z" * 3000
    finally:
        await stop_all([a, b])


@run_async()
async def test_hello_info_reaches_on_hello():
    """hello_info travels in the hello frame and is handed to the receiver's on_hello."""
    seen = []
    a = Node("n1", hello_info={"client_addr": "10.0.0.1:7000"})
    b = Node("n2", on_hello=lambda name, info: seen.append((name, info)))
    for x in (a, b):
        await x.t.start()
    a.t.update_peers({"n2": b.addr})
    try:
        a.t.send([msg("n1", "n2", 1)])
        await b.wait_for(lambda: len(b.got) == 1)
        assert seen == [("n1", {"client_addr": "10.0.0.1:7000"})]
    finally:
        await stop_all([a, b])


# ---------------------------------------------------------------- membership

@run_async()
async def test_update_peers_moves_and_removes():
    """A changed address is used for new sends; a removed peer is no longer reachable."""
    a, b, c = await mesh(3)
    try:
        a.t.send([msg("n1", "n2", 1)])
        await b.wait_for(lambda: len(b.got) == 1)
        b2 = Node("n2")
        await b2.t.start()
        a.t.update_peers({"n2": b2.addr, "n3": c.addr})
        a.t.send([msg("n1", "n2", 2)])
        await b2.wait_for(lambda: len(b2.got) == 1)
        assert [m.index for m in b.got] == [1]
        a.t.update_peers({"n2": b2.addr})
        a.t.send([msg("n1", "n3", 3)])
        await asyncio.sleep(0.05)
        assert c.got == [] and "n3" in a.unreachable
        await b2.t.stop()
    finally:
        await stop_all([a, b, c])


# ---------------------------------------------------------------- latency

async def _ping_pong(n):
    a, b = await mesh(2)
    try:
        # b echoes every message straight back, from its on_message callback
        b.t.on_message = lambda m: b.t.send([msg("n2", "n1", m.index)])
        waiter: list[asyncio.Future] = []
        a.t.on_message = lambda m: waiter[0].set_result(None)
        loop = asyncio.get_running_loop()
        samples = []
        for i in range(n + 50):
            waiter[:] = [loop.create_future()]
            t0 = time.perf_counter()
            a.t.send([msg("n1", "n2", i)])
            await waiter[0]
            if i >= 50:   # warm-up: connections opened lazily
                samples.append(time.perf_counter() - t0)
        return samples
    finally:
        await stop_all([a, b])


@run_async(timeout=60)
async def test_ping_pong_of_small_messages_completes_every_round_trip():
    """500 sequential request/response round trips between two transports all complete (the
    latency is printed for information; timing is measured in bench/, never asserted here)."""
    samples = await _ping_pong(500)
    print(f"median round trip {statistics.median(samples) * 1e6:.0f} us over {len(samples)}")
    assert len(samples) == 500


# ---------------------------------------------------------------- TLS

def _tls_contexts(tmp_path):
    import shutil
    import ssl
    import subprocess
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not available")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=afs-test",
                    "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(cert))
    server.load_cert_chain(str(cert), str(key))
    server.verify_mode = ssl.CERT_REQUIRED          # mutual TLS
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
    client.load_cert_chain(str(cert), str(key))
    return server, client


def test_mutual_tls_link(tmp_path):
    """With server and client SSL contexts (mutual TLS), messages and a chunked snapshot flow;
    a plaintext client is refused without delivering anything."""
    server_ctx, client_ctx = _tls_contexts(tmp_path)

    @run_async()
    async def go():
        a, b = await mesh(2, ssl_context=server_ctx, client_ssl_context=client_ctx,
                          snapshot_chunk=4096)
        try:
            data = os.urandom(50_000)
            a.t.send([msg("n1", "n2", 1), snap_msg(data)])
            await b.wait_for(lambda: len(b.got) == 2)
            assert b.got[0].index == 1 and b.got[1].context == data
            s = raw_connect(b.addr)
            s.sendall(_hello() + encode_frame(encode_message(msg("n1", "n2", 2))))
            assert await closed_by_peer(s)
            s.close()
            await asyncio.sleep(0.05)
            assert len(b.got) == 2
        finally:
            await stop_all([a, b])
    go()
