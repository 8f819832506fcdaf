"""Frames: u32 length | msgpack payload (afs/wire.py)."""
from __future__ import annotations

import asyncio
import io
import struct
import threading

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from afs.wire import (
    MAX_CLIENT_FRAME, MAX_PEER_FRAME, FrameDecoder, FrameError, decode_payload, encode_frame,
    read_frame, read_frame_sync,
)

SAMPLES = [
    {"id": 1, "op": "get", "path": "/a/b", "stale": False},
    {"id": 2, "ok": {"data": b"\x00\xffbinary", "stat": {"version": 3}, "revision": 2**40}},
    [1, "n1", "n2", 5, 0, 7, [[8, 5, 0, b"x" * 100]], 7, False, 0, b"", None],
    "a string", b"bytes", 0, -1, 2**63 - 1, 1.5, True, [], {}, [None],
]


def frame_of(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def async_reader(data: bytes, eof: bool = True) -> asyncio.StreamReader:
    r = asyncio.StreamReader()
    r.feed_data(data)
    if eof:
        r.feed_eof()
    return r


def read_all_async(data: bytes, max_len: int = MAX_CLIENT_FRAME) -> list:
    async def go():
        r = async_reader(data)
        out = []
        while (obj := await read_frame(r, max_len)) is not None:
            out.append(obj)
        return out
    return asyncio.run(go())


def read_all_sync(data: bytes, max_len: int = MAX_CLIENT_FRAME) -> list:
    f = io.BufferedReader(io.BytesIO(data))
    out = []
    while (obj := read_frame_sync(f, max_len)) is not None:
        out.append(obj)
    return out


def read_all_decoder(data: bytes, step: int, max_len: int = MAX_CLIENT_FRAME) -> list:
    d = FrameDecoder(max_len)
    out = []
    for i in range(0, len(data), step):
        out += d.feed(data[i:i + step])
    d.eof()
    return out


# ---------------------------------------------------------------- round trips

def test_constants():
    """The documented frame limits."""
    assert MAX_CLIENT_FRAME == 8 * 1024 * 1024
    assert MAX_PEER_FRAME == 16 * 1024 * 1024


def test_frame_layout_is_u32_big_endian_length_then_msgpack():
    """A frame is exactly the 4-byte big-endian payload length followed by the msgpack bytes."""
    obj = {"id": 7, "op": "get"}
    payload = msgpack.packb(obj, use_bin_type=True)
    assert encode_frame(obj) == struct.pack(">I", len(payload)) + payload


@pytest.mark.parametrize("obj", SAMPLES, ids=range(len(SAMPLES)))
def test_round_trip_all_readers(obj):
    """Every reader (async, blocking, incremental) returns what encode_frame encoded."""
    data = encode_frame(obj) * 3
    assert read_all_async(data) == [obj] * 3
    assert read_all_sync(data) == [obj] * 3
    assert read_all_decoder(data, 1) == [obj] * 3
    assert read_all_decoder(data, 7) == [obj] * 3
    assert read_all_decoder(data, len(data)) == [obj] * 3


def test_str_and_bytes_stay_distinct():
    """use_bin_type/raw=False: bytes come back as bytes and str as str."""
    [out] = read_all_sync(encode_frame({"s": "x", "b": b"x"}))
    assert type(out["s"]) is str and type(out["b"]) is bytes


@settings(max_examples=60, deadline=None)
@given(objs=st.lists(st.recursive(
    st.booleans() | st.integers(-2**63, 2**64 - 1) | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=12), min_size=1, max_size=6), cuts=st.lists(st.integers(0, 400), max_size=8))
def test_decoder_any_chunking(objs, cuts):
    """The incremental decoder yields the same frames however the byte stream is split."""
    data = b"".join(encode_frame(o) for o in objs)
    d = FrameDecoder(MAX_CLIENT_FRAME)
    out, prev = [], 0
    for c in sorted(set(min(c, len(data)) for c in cuts)) + [len(data)]:
        out += d.feed(data[prev:c])
        prev = c
    d.eof()
    assert out == objs


def test_clean_eof_at_boundary_returns_none():
    """EOF exactly between frames is not an error: the readers return None."""
    assert read_all_async(b"") == []
    assert read_all_sync(b"") == []
    FrameDecoder(10).eof()


def test_encode_frame_limit():
    """encode_frame refuses to build a frame the receiver would reject."""
    encode_frame(b"x" * 100, max_len=103)
    with pytest.raises(FrameError):
        encode_frame(b"x" * 100, max_len=50)


def test_encode_unencodable_raises_typeerror_and_packer_recovers():
    """An unencodable object raises TypeError and does not poison later frames."""
    with pytest.raises(TypeError):
        encode_frame({"x": object()})
    assert read_all_sync(encode_frame({"ok": 1})) == [{"ok": 1}]


def test_encode_from_many_threads():
    """encode_frame is safe to call from several threads at once."""
    errors = []

    def work(i):
        try:
            for j in range(2000):
                obj = {"t": i, "j": j, "pad": "p" * (i * 7)}
                assert decode_payload(encode_frame(obj)[4:]) == obj
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


# ---------------------------------------------------------------- bad input

HUGE = struct.pack(">I", 0xFFFFFFF0)


def test_oversize_length_rejected_before_waiting_async():
    """read_frame raises on an over-long length as soon as the header is in, without waiting
    for (or allocating) the payload: the stream is left open and no payload is ever sent."""
    async def go():
        r = async_reader(HUGE, eof=False)
        await asyncio.wait_for(read_frame(r, MAX_CLIENT_FRAME), 2)
    with pytest.raises(FrameError, match="exceeds limit"):
        asyncio.run(go())


def test_oversize_length_rejected_before_reading_sync():
    """read_frame_sync never asks the stream for more than max_len bytes of payload."""
    class Recorder(io.RawIOBase):
        def __init__(self, data):
            self.data, self.asked = data, []

        def read(self, n=-1):
            self.asked.append(n)
            out, self.data = self.data[:n], self.data[n:]
            return out

    f = Recorder(struct.pack(">I", MAX_CLIENT_FRAME + 1) + b"x" * 10)
    with pytest.raises(FrameError, match="exceeds limit"):
        read_frame_sync(f, MAX_CLIENT_FRAME)
    assert f.asked == [4]


def test_oversize_length_rejected_by_decoder_on_header():
    """FrameDecoder rejects an over-long length from its 4 header bytes alone."""
    d = FrameDecoder(1024)
    with pytest.raises(FrameError, match="exceeds limit"):
        d.feed(HUGE[:2])
        d.feed(HUGE[2:])
    assert d.pending == 0


def test_length_exactly_at_limit_accepted():
    """max_len is inclusive."""
    frame = encode_frame(b"x" * 1000)
    n = len(frame) - 4
    assert read_all_sync(frame, max_len=n) == [b"x" * 1000]
    assert read_all_async(frame, max_len=n) == [b"x" * 1000]
    assert read_all_decoder(frame, 3, max_len=n) == [b"x" * 1000]
    with pytest.raises(FrameError):
        read_all_sync(frame, max_len=n - 1)


@pytest.mark.parametrize("cut", [1, 3, 4, 10])
def test_truncated_frame(cut):
    """EOF inside a header or payload raises FrameError in every reader."""
    data = encode_frame({"k": "v" * 20})[:cut]
    with pytest.raises(FrameError, match="truncated"):
        read_all_async(data)
    with pytest.raises(FrameError, match="truncated"):
        read_all_sync(data)
    with pytest.raises(FrameError, match="truncated"):
        read_all_decoder(data, 2)


GARBAGE = {
    "reserved_byte": b"\xc1",
    "incomplete_msgpack": b"\x92\x01",
    "trailing_bytes": b"\x01\x02",
    "int_map_key": b"\x81\x01\x02",
    "list_map_key": b"\x81\x90\x01",
    "bad_utf8": b"\xa2\xff\xfe",
    "ext_type": msgpack.packb(msgpack.ExtType(5, b"abc")),
    "empty_ext": msgpack.packb(msgpack.ExtType(5, b"")),
    "timestamp_ext": msgpack.packb(msgpack.Timestamp(1, 0)),
    "too_deep": b"\x91" * 100_000 + b"\x00",
}


@pytest.mark.parametrize("name", sorted(GARBAGE))
def test_garbage_payload(name):
    """Undecodable payloads (bad msgpack, ext types, non-str map keys, bad UTF-8) raise
    FrameError, never anything else."""
    data = frame_of(GARBAGE[name])
    for read in (read_all_async, read_all_sync, lambda d: read_all_decoder(d, 5)):
        with pytest.raises(FrameError):
            read(data)


@pytest.mark.parametrize("payload", [b"", b"\xc0"], ids=["empty", "nil"])
def test_empty_or_nil_frame_is_an_error(payload):
    """A zero-length frame or a bare nil payload is rejected (None means EOF to readers)."""
    for read in (read_all_async, read_all_sync, lambda d: read_all_decoder(d, 4)):
        with pytest.raises(FrameError):
            read(frame_of(payload))
    with pytest.raises(FrameError):
        encode_frame(None)


def test_decoder_error_keeps_earlier_frames_and_stays_failed():
    """Frames completed before the bad one are on exc.frames; the decoder then refuses input."""
    d = FrameDecoder(1024)
    good = encode_frame({"a": 1})
    with pytest.raises(FrameError) as ei:
        d.feed(good + frame_of(b"\xc1") + good)
    assert ei.value.frames == [{"a": 1}]
    with pytest.raises(FrameError):
        d.feed(good)
