"""Raft value types and their wire encoding.

Contract:
- Every type here is a small immutable-by-convention value; nothing here does I/O.
- ``encode_message``/``decode_message`` turn a :class:`Message` into a msgpack-friendly
  list and back. Decoding validates shape and types and raises ``ValueError`` on anything
  malformed; it never evaluates or unpickles input.
- Node ids are short strings (the member names, e.g. ``"n1"``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum


class MsgType(IntEnum):
    """Message kinds. ``local`` kinds are only ever stepped into the local core."""

    HUP = 0              # local: start an election now (campaign)
    APP = 1              # leader -> follower: append entries
    APP_RESP = 2
    VOTE = 3
    VOTE_RESP = 4
    PREVOTE = 5
    PREVOTE_RESP = 6
    HEARTBEAT = 7
    HEARTBEAT_RESP = 8
    SNAP = 9             # leader -> follower: install snapshot (metadata; the driver streams data)
    SNAP_STATUS = 10     # local: the driver reports a snapshot transfer finished (reject=failed)
    TIMEOUT_NOW = 11     # leader -> transferee: campaign now (leadership transfer)
    READ_INDEX = 12      # follower -> leader: forwarded read_index request
    READ_INDEX_RESP = 13
    UNREACHABLE = 14     # local: the transport could not reach ``frm``
    TRANSFER_LEADER = 15  # local: ask the leader to transfer to ``frm``


class EntryType(IntEnum):
    NORMAL = 0
    CONF_CHANGE = 1


class ConfChangeType(IntEnum):
    ADD_VOTER = 0
    ADD_LEARNER = 1
    REMOVE = 2
    PROMOTE = 3  # learner -> voter


@dataclass(slots=True, frozen=True)
class Entry:
    index: int
    term: int
    type: EntryType = EntryType.NORMAL
    data: bytes = b""


@dataclass(slots=True, frozen=True)
class HardState:
    """What must be durable before any message depending on it is sent."""

    term: int = 0
    vote: str = ""       # "" = no vote in this term
    commit: int = 0


@dataclass(slots=True, frozen=True)
class ConfState:
    voters: tuple[str, ...] = ()
    learners: tuple[str, ...] = ()

    def members(self) -> tuple[str, ...]:
        return self.voters + self.learners


@dataclass(slots=True, frozen=True)
class ConfChange:
    """A single-server membership change. ``context`` is opaque to Raft (e.g. the peer address)."""

    type: ConfChangeType
    node: str
    context: bytes = b""


@dataclass(slots=True, frozen=True)
class SnapshotMeta:
    index: int = 0
    term: int = 0
    conf: ConfState = field(default_factory=ConfState)


@dataclass(slots=True, frozen=True)
class ReadState:
    """A linearizable read may be served once the state machine has applied ``index``."""

    index: int
    ctx: bytes


@dataclass(slots=True)
class Message:
    type: MsgType
    to: str = ""
    frm: str = ""
    term: int = 0
    log_term: int = 0
    index: int = 0
    entries: list[Entry] = field(default_factory=list)
    commit: int = 0
    reject: bool = False
    reject_hint: int = 0
    context: bytes = b""
    snapshot: SnapshotMeta | None = None


# ---------------------------------------------------------------- encoding

def encode_entry(e: Entry) -> list:
    return [e.index, e.term, int(e.type), e.data]


def decode_entry(raw) -> Entry:
    if not isinstance(raw, (list, tuple)) or len(raw) != 4:
        raise ValueError("malformed entry")
    index, term, typ, data = raw
    if not (isinstance(index, int) and isinstance(term, int) and isinstance(data, bytes)):
        raise ValueError("malformed entry fields")
    return Entry(index, term, EntryType(typ), data)


def encode_conf_state(c: ConfState) -> list:
    return [list(c.voters), list(c.learners)]


def decode_conf_state(raw) -> ConfState:
    if not isinstance(raw, (list, tuple)) or len(raw) != 2:
        raise ValueError("malformed conf state")
    voters, learners = raw
    if not all(isinstance(x, str) for x in (*voters, *learners)):
        raise ValueError("malformed conf state members")
    return ConfState(tuple(voters), tuple(learners))


def encode_snapshot_meta(s: SnapshotMeta) -> list:
    return [s.index, s.term, encode_conf_state(s.conf)]


def decode_snapshot_meta(raw) -> SnapshotMeta:
    if not isinstance(raw, (list, tuple)) or len(raw) != 3:
        raise ValueError("malformed snapshot meta")
    index, term, conf = raw
    if not (isinstance(index, int) and isinstance(term, int)):
        raise ValueError("malformed snapshot meta fields")
    return SnapshotMeta(index, term, decode_conf_state(conf))


def encode_hard_state(h: HardState) -> list:
    return [h.term, h.vote, h.commit]


def decode_hard_state(raw) -> HardState:
    if not isinstance(raw, (list, tuple)) or len(raw) != 3:
        raise ValueError("malformed hard state")
    term, vote, commit = raw
    if not (isinstance(term, int) and isinstance(vote, str) and isinstance(commit, int)):
        raise ValueError("malformed hard state fields")
    return HardState(term, vote, commit)


def encode_conf_change(cc: ConfChange) -> list:
    return [int(cc.type), cc.node, cc.context]


def decode_conf_change(raw) -> ConfChange:
    if not isinstance(raw, (list, tuple)) or len(raw) != 3:
        raise ValueError("malformed conf change")
    typ, node, ctx = raw
    if not (isinstance(node, str) and isinstance(ctx, bytes)):
        raise ValueError("malformed conf change fields")
    return ConfChange(ConfChangeType(typ), node, ctx)


def encode_message(m: Message) -> list:
    return [
        int(m.type), m.to, m.frm, m.term, m.log_term, m.index,
        [encode_entry(e) for e in m.entries], m.commit, m.reject, m.reject_hint,
        m.context, encode_snapshot_meta(m.snapshot) if m.snapshot is not None else None,
    ]


def decode_message(raw) -> Message:
    if not isinstance(raw, (list, tuple)) or len(raw) != 12:
        raise ValueError("malformed message")
    (typ, to, frm, term, log_term, index, entries, commit, reject, hint, ctx, snap) = raw
    if not (isinstance(to, str) and isinstance(frm, str) and isinstance(term, int)
            and isinstance(log_term, int) and isinstance(index, int) and isinstance(commit, int)
            and isinstance(reject, bool) and isinstance(hint, int) and isinstance(ctx, bytes)
            and isinstance(entries, (list, tuple))):
        raise ValueError("malformed message fields")
    return Message(
        MsgType(typ), to, frm, term, log_term, index, [decode_entry(e) for e in entries],
        commit, reject, hint, ctx, decode_snapshot_meta(snap) if snap is not None else None,
    )
