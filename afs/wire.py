"""Frames: the only framing code in AFS (client port, peer port, agent socket).

A frame is ``u32 big-endian length | msgpack payload``.

Contract:
- Payloads are packed with ``use_bin_type=True`` and unpacked with ``raw=False``: ``str`` and
  ``bytes`` stay distinct. Map keys must be ``str`` (or ``bytes``); msgpack's
  ``strict_map_key`` stays on, so a map with int/list keys is rejected as undecodable.
  Extension types (including the msgpack timestamp) are refused on decode. Nothing is ever
  unpickled or evaluated.
- The length is checked against ``max_len`` *before* any buffer for the payload is
  allocated or any payload byte is awaited; an over-long length raises :class:`FrameError`.
- A zero-length frame is an error (empty input is not a msgpack value), and so is a frame
  whose payload is nil: ``None`` is what the readers return at EOF, so it cannot be a frame.
- Every decoding failure (bad length, truncated frame, bad payload) raises
  :class:`FrameError`; after one, the byte stream is out of sync and the connection must be
  closed. Nothing else is raised for bad input.
- Clean EOF exactly at a frame boundary is not an error: the readers return ``None``.
- Thread safety: :func:`encode_frame` and the decode functions may be called from any thread
  (the packer is per thread). A :class:`FrameDecoder` instance belongs to one reader.
"""
from __future__ import annotations

import asyncio
import struct
import threading

import msgpack

__all__ = [
    "MAX_CLIENT_FRAME", "MAX_PEER_FRAME", "HEADER_SIZE", "FrameError", "FrameDecoder",
    "encode_frame", "decode_payload", "read_frame", "read_frame_sync",
]

MAX_CLIENT_FRAME = 8 << 20   # client port and agent socket
MAX_PEER_FRAME = 16 << 20    # peer (Raft) port
HEADER_SIZE = 4
_MAX_U32 = 0xFFFFFFFF

_LEN = struct.Struct(">I")
_pack_len = _LEN.pack
_unpack_len_from = _LEN.unpack_from
_unpackb = msgpack.unpackb


class FrameError(ValueError):
    """The peer sent something that is not a valid frame; close the connection."""


class FrameTooLarge(FrameError):
    """A frame's length is over the limit (checked from the header, before allocating)."""


def _refuse_ext(code: int, data: bytes):
    raise FrameError(f"msgpack extension type {code} not allowed")


# msgpack.Packer reused per thread: about twice as fast as packb() (which builds a Packer per
# call) for the small frames that dominate; per thread because a Packer is not thread safe.
_tls = threading.local()


def _packer() -> msgpack.Packer:
    p = msgpack.Packer(use_bin_type=True)
    _tls.packer = p
    return p


def encode_frame(obj, max_len: int | None = None) -> bytes:
    """Return ``obj`` as one frame (header + payload).

    Raises :class:`FrameError` if ``obj`` is ``None`` or the payload is longer than ``max_len``
    (when given) or than a u32 can express, and ``TypeError`` for objects msgpack cannot encode.
    """
    if obj is None:
        raise FrameError("None cannot be sent as a frame (it means EOF to readers)")
    try:
        packer = _tls.packer
    except AttributeError:
        packer = _packer()
    try:
        payload = packer.pack(obj)
    except BaseException:
        packer.reset()  # a failed pack leaves partial bytes in the buffer
        raise
    n = len(payload)
    if n > _MAX_U32 or (max_len is not None and n > max_len):
        raise FrameTooLarge(f"frame of {n} bytes exceeds limit {max_len if max_len else _MAX_U32}")
    return _pack_len(n) + payload


def decode_payload(payload) -> object:
    """Decode one frame's payload (bytes-like). Raises :class:`FrameError` if undecodable."""
    if len(payload) == 1 and payload[0] == 0xC0:
        raise FrameError("nil frame")
    try:
        return _unpackb(payload, raw=False, max_ext_len=0, ext_hook=_refuse_ext)
    except FrameError:
        raise
    except Exception as exc:  # msgpack raises ValueError, FormatError, StackError, ExtraData ...
        raise FrameError(f"undecodable frame payload: {type(exc).__name__}: {exc}") from None


def _check_len(n: int, max_len: int) -> None:
    if n > max_len:
        raise FrameTooLarge(f"frame length {n} exceeds limit {max_len}")
    if n == 0:
        raise FrameError("empty frame")


async def read_frame(reader: asyncio.StreamReader, max_len: int) -> object | None:
    """Read one frame from ``reader``.

    Returns the decoded object, or ``None`` on EOF at a frame boundary. Raises
    :class:`FrameError` on an over-long length (before waiting for the payload), a truncated
    frame or an undecodable payload. Connection errors (``OSError``) propagate unchanged.
    """
    try:
        header = await reader.readexactly(HEADER_SIZE)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise FrameError(f"truncated frame header ({len(exc.partial)} of 4 bytes)") from None
    (n,) = _unpack_len_from(header)
    _check_len(n, max_len)
    try:
        payload = await reader.readexactly(n)
    except asyncio.IncompleteReadError as exc:
        raise FrameError(f"truncated frame ({len(exc.partial)} of {n} bytes)") from None
    return decode_payload(payload)


def _read_exact(f, n: int) -> bytes:
    """Read exactly ``n`` bytes from a blocking file-like object (may return fewer at EOF)."""
    data = f.read(n)
    if data is None:
        raise FrameError("non-blocking stream passed to read_frame_sync")
    if len(data) == n or not data:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        more = f.read(n - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def read_frame_sync(sock_file, max_len: int) -> object | None:
    """Blocking variant of :func:`read_frame` for plain sockets.

    ``sock_file`` is any object with a blocking ``read(n)`` (e.g. ``sock.makefile("rb")``).
    Same results and errors as :func:`read_frame`. A socket timeout (``TimeoutError``) in the
    middle of a frame leaves the stream out of sync: close the connection.
    """
    header = _read_exact(sock_file, HEADER_SIZE)
    if len(header) < HEADER_SIZE:
        if not header:
            return None
        raise FrameError(f"truncated frame header ({len(header)} of 4 bytes)")
    (n,) = _unpack_len_from(header)
    _check_len(n, max_len)
    payload = _read_exact(sock_file, n)
    if len(payload) < n:
        raise FrameError(f"truncated frame ({len(payload)} of {n} bytes)")
    return decode_payload(payload)


class FrameDecoder:
    """Incremental decoder for non-asyncio readers (and for reading in large chunks).

    ``feed(data)`` returns the list of frames completed by ``data`` (possibly empty). On bad
    input it raises :class:`FrameError`; frames completed earlier in the same call are on
    ``exc.frames``. After an error the decoder refuses further input. ``eof()`` raises if a
    partial frame is pending (the stream was truncated).

    Memory is bounded by ``max_len`` + the size of one fed chunk: an over-long length is
    rejected as soon as its 4 header bytes arrive.
    """

    __slots__ = ("max_len", "_buf", "_failed")

    def __init__(self, max_len: int):
        self.max_len = max_len
        self._buf = bytearray()
        self._failed = False

    @property
    def pending(self) -> int:
        """Bytes buffered that do not yet form a complete frame."""
        return len(self._buf)

    def feed(self, data) -> list:
        if self._failed:
            raise FrameError("decoder already failed")
        buf = self._buf
        if not buf and len(data) >= HEADER_SIZE:
            # Nothing carried over: parse straight out of ``data``. Fastest when ``data`` is
            # exactly one frame (the common case for small request/response traffic).
            (n,) = _unpack_len_from(data)
            if n + HEADER_SIZE == len(data) and 0 < n <= self.max_len:
                try:
                    return [decode_payload(data[HEADER_SIZE:])]
                except FrameError as exc:
                    self._failed = True
                    exc.frames = []
                    raise
            frames = self._parse(data)
        else:
            buf += data
            frames = self._parse(buf)
        return frames

    def _parse(self, src) -> list:
        frames: list = []
        pos = 0
        end = len(src)
        max_len = self.max_len
        view = memoryview(src)   # slices of it decode without copying the payload
        try:
            while end - pos >= HEADER_SIZE:
                (n,) = _unpack_len_from(src, pos)
                _check_len(n, max_len)
                stop = pos + HEADER_SIZE + n
                if stop > end:
                    break
                frames.append(decode_payload(view[pos + HEADER_SIZE:stop]))
                pos = stop
        except FrameError as exc:
            self._failed = True
            self._buf = bytearray()
            exc.frames = frames
            raise
        finally:
            view.release()
        if src is self._buf:
            if pos:
                del self._buf[:pos]
        elif pos < end:
            self._buf += src[pos:]
        return frames

    def eof(self) -> None:
        """Call at end of stream: raises :class:`FrameError` if a partial frame is pending."""
        if self._buf:
            raise FrameError(f"truncated frame at EOF ({len(self._buf)} bytes pending)")
