"""Helpers shared by the FUSE tests, the mount benchmark and the fault suite.

- :func:`fuse_available` says why real mounts cannot run here (None if they can).
- :class:`DevControl` is the client of the control socket of the dev mount daemon
  (``python -m afs.fs``): one JSON line per request and reply.
"""
from __future__ import annotations

import json
import os
import shutil
import socket


def fuse_available() -> str | None:
    """None if /dev/fuse, fusermount3 and root are all there; else the reason."""
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if shutil.which("fusermount3") is None:
        return "no fusermount3"
    if os.geteuid() != 0:
        return "real mounts need root (allow_other, setuid children)"
    return None


class DevControl:
    """Client of the dev mount daemon's control socket."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.f = self.sock.makefile("rwb")

    def call(self, **req) -> dict:
        self.f.write(json.dumps(req).encode() + b"\n")
        self.f.flush()
        line = self.f.readline()
        if not line:
            raise RuntimeError("control channel closed")
        resp = json.loads(line)
        if not resp.get("ok"):
            raise RuntimeError(f"control call failed: {resp}")
        return resp

    def apply(self, put: dict | None = None, delete: list[str] | None = None) -> dict:
        return self.call(op="apply", put=put or {}, delete=delete or [])

    def close(self) -> None:
        try:
            self.f.close()
            self.sock.close()
        except OSError:
            pass
