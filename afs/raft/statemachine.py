"""The contract between the Raft driver and the replicated state machine.

The driver calls these methods from ONE thread (the asyncio event-loop thread), in log order.

- ``apply(index, data)`` is called exactly once per committed NORMAL entry with non-empty data,
  in index order, on every member. It must be deterministic: the same sequence of calls must
  produce the same results and the same state on every member (no clock, no randomness, no
  I/O whose outcome can differ). Domain failures (e.g. "no such node") are *results*, returned
  normally; an exception from ``apply`` means the state machine is broken and stops the node.
- ``snapshot()`` returns bytes that capture the state after the last applied index. It is
  called between ``apply`` calls, so it sees a consistent state.
- ``restore(data)`` replaces the whole state with a snapshot produced by ``snapshot()`` (on this
  or another member). It may raise ``afs.errors.StorageCorrupt`` on a bad checksum.
"""
from __future__ import annotations

from typing import Any, Protocol


class StateMachine(Protocol):
    def apply(self, index: int, data: bytes) -> Any: ...

    def snapshot(self) -> bytes: ...

    def restore(self, data: bytes) -> None: ...
