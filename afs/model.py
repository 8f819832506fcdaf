"""Frozen value types shared by the tree, the server, the agent, the mount and the client.

Nothing here does I/O. ``Stat.to_dict``/``from_dict`` give the stable field names used on the
wire and by ``afs stat -o json``.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class NodeKind(str, Enum):
    DIR = "dir"
    FILE = "file"
    # room for SYMLINK = "symlink"


class EventType(str, Enum):
    CREATED = "created"
    UPDATED = "updated"
    DELETED = "deleted"


DEFAULT_FILE_MODE = 0o644
DEFAULT_DIR_MODE = 0o755


@dataclass(slots=True, frozen=True)
class Stat:
    kind: NodeKind
    create_revision: int
    mod_revision: int
    version: int
    mtime_ns: int
    mode: int
    uid: int
    gid: int
    size: int

    FIELDS = ("kind", "create_revision", "mod_revision", "version", "mtime_ns", "mode", "uid",
              "gid", "size")

    def to_dict(self) -> dict:
        return {
            "kind": self.kind.value, "create_revision": self.create_revision,
            "mod_revision": self.mod_revision, "version": self.version,
            "mtime_ns": self.mtime_ns, "mode": self.mode, "uid": self.uid, "gid": self.gid,
            "size": self.size,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Stat":
        return cls(NodeKind(d["kind"]), int(d["create_revision"]), int(d["mod_revision"]),
                   int(d["version"]), int(d["mtime_ns"]), int(d["mode"]), int(d["uid"]),
                   int(d["gid"]), int(d["size"]))


@dataclass(slots=True, frozen=True)
class Event:
    """One change at ``revision``. ``data`` is the file's new content (None for dirs, deletes,
    or metadata-only watches)."""

    revision: int
    type: EventType
    path: str
    stat: Stat
    data: bytes | None = None

    def to_wire(self) -> list:
        return [self.revision, self.type.value, self.path, self.stat.to_dict(), self.data]

    @classmethod
    def from_wire(cls, raw) -> "Event":
        rev, typ, path, stat, data = raw
        return cls(int(rev), EventType(typ), str(path), Stat.from_dict(stat), data)
