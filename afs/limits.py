"""Request limits, enforced at the API *before* a write is proposed (see ops.validate_limits).

Contract: the limits protect the cluster (log entry size, apply time, snapshot size); they are
not part of the replicated state, so members may be configured differently without diverging
(the state machine never checks them). ``Limits`` follows the afs.config conventions
(``SECTION``, ``ENV_PREFIX``, ``validate()`` returning self) so ``afs.config.load(Limits)``
works: ``[limits]`` in the config file, ``AFS_MAX_VALUE_BYTES=...`` in the environment.
"""
from __future__ import annotations

from dataclasses import dataclass

from afs.errors import InvalidInput
from afs.paths import DEFAULT_MAX_DEPTH, MAX_PATH_BYTES

MiB = 1024 * 1024


@dataclass
class Limits:
    """Per-request limits (defaults from DESIGN.md §2)."""

    SECTION = "limits"
    ENV_PREFIX = "AFS_"

    #: largest file value (bytes) in one create/set (and in a txn compare's value)
    max_value_bytes: int = 1 * MiB
    #: largest request: sum of all data, compare values and path bytes in one op/txn
    max_request_bytes: int = 4 * MiB
    #: deepest path, in components (``/a/b`` is 2)
    max_depth: int = DEFAULT_MAX_DEPTH
    #: most entries in EACH of a txn's compare / then / else lists (etcd's --max-txn-ops rule)
    max_txn_ops: int = 256

    def validate(self) -> "Limits":
        for name in ("max_value_bytes", "max_request_bytes", "max_depth", "max_txn_ops"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise InvalidInput(f"{name}: must be a positive integer, got {v!r}")
        if self.max_value_bytes > self.max_request_bytes:
            raise InvalidInput(f"max_value_bytes ({self.max_value_bytes}) must not exceed "
                               f"max_request_bytes ({self.max_request_bytes})")
        if self.max_depth > MAX_PATH_BYTES // 2:
            raise InvalidInput(f"max_depth: {self.max_depth} can never be reached by a path "
                               f"of at most {MAX_PATH_BYTES} bytes (max {MAX_PATH_BYTES // 2})")
        return self


DEFAULT_LIMITS = Limits()
