"""One error hierarchy for AFS.

Every error class carries:
- ``code``: a stable wire string (what the server puts in ``error.code``),
- ``errno``: what the FUSE layer / OS-facing code reports,
- ``exit_code``: what the CLI exits with (see :class:`ExitCode`, documented in docs/cli.md),
- ``retryable``: whether a client may retry the same request (same ``(client_id, seq)``).

Translation happens in exactly one place per boundary: ``to_wire``/``from_wire`` for the
network, ``ExitCode`` for the CLI, ``errno`` for FUSE.
"""
from __future__ import annotations

import errno as _errno
from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    ERROR = 1              # unexpected failure
    USAGE = 2              # click's own usage errors
    NOT_FOUND = 3
    EXISTS = 4
    VERSION_MISMATCH = 5
    NOT_EMPTY = 6
    INVALID = 7            # invalid input: bad path, value too large, bad JSON, ...
    UNAVAILABLE = 8        # cluster unavailable / no leader / timed out
    NOT_A_DIRECTORY = 9
    IS_A_DIRECTORY = 10
    COMPACTED = 11         # watch start revision no longer in history
    PERMISSION = 12


class AfsError(Exception):
    code = "internal"
    errno = _errno.EIO
    exit_code = ExitCode.ERROR
    retryable = False

    def __init__(self, message: str = "", **details):
        super().__init__(message or self.code)
        self.message = message or self.code
        self.details = details

    def to_wire(self) -> dict:
        out = {"code": self.code, "message": self.message}
        if self.details:
            out["details"] = self.details
        return out

    def __str__(self) -> str:
        return self.message


class NotFound(AfsError):
    code, errno, exit_code = "not_found", _errno.ENOENT, ExitCode.NOT_FOUND


class AlreadyExists(AfsError):
    code, errno, exit_code = "exists", _errno.EEXIST, ExitCode.EXISTS


class VersionMismatch(AfsError):
    code, errno, exit_code = "version_mismatch", _errno.ESTALE, ExitCode.VERSION_MISMATCH


class NotEmpty(AfsError):
    code, errno, exit_code = "not_empty", _errno.ENOTEMPTY, ExitCode.NOT_EMPTY


class NotADirectory(AfsError):
    code, errno, exit_code = "not_a_directory", _errno.ENOTDIR, ExitCode.NOT_A_DIRECTORY


class IsADirectory(AfsError):
    code, errno, exit_code = "is_a_directory", _errno.EISDIR, ExitCode.IS_A_DIRECTORY


class InvalidInput(AfsError):
    code, errno, exit_code = "invalid", _errno.EINVAL, ExitCode.INVALID


class InvalidPath(InvalidInput):
    code = "invalid_path"


class ValueTooLarge(InvalidInput):
    code, errno = "value_too_large", _errno.EFBIG


class RequestTooLarge(InvalidInput):
    code, errno = "request_too_large", _errno.E2BIG


class PathTooDeep(InvalidInput):
    code, errno = "path_too_deep", _errno.ENAMETOOLONG


class TooManyOps(InvalidInput):
    code, errno = "too_many_ops", _errno.E2BIG


class ReservedPath(InvalidInput):
    code, errno = "reserved_path", _errno.EPERM


class StaleRequest(AfsError):
    """A write whose ``seq`` is lower than the last one the state machine remembers for its
    ``client_id``: its result is no longer known, and it was not applied."""

    code, errno, exit_code = "stale_request", _errno.ESTALE, ExitCode.ERROR


class UnsupportedFormat(AfsError):
    """Encoded data (log command, snapshot) has a format version this build cannot read.
    Raised, never returned: a member must not apply a log it cannot understand."""

    code, errno = "unsupported_format", _errno.EPROTO


class RevisionGap(AfsError):
    """A replica was given events that do not follow its revision (a skipped or repeated
    revision); the replica is unchanged and must resync (snapshot or resume)."""

    code, errno = "revision_gap", _errno.ESTALE


class PermissionDenied(AfsError):
    code, errno, exit_code = "permission_denied", _errno.EACCES, ExitCode.PERMISSION


class ReadOnly(AfsError):
    code, errno, exit_code = "read_only", _errno.EROFS, ExitCode.PERMISSION


class Unavailable(AfsError):
    """The cluster cannot serve the request now (no leader, no quorum, unreachable)."""

    code, errno, exit_code, retryable = "unavailable", _errno.EAGAIN, ExitCode.UNAVAILABLE, True


class NotLeader(Unavailable):
    """Sent with ``details.leader`` (the leader's member name, "" if unknown) and
    ``details.leader_addr`` (its client address, "" if unknown)."""

    code = "not_leader"


class Timeout(Unavailable):
    code, errno = "timeout", _errno.ETIMEDOUT


class ProposalDropped(Unavailable):
    """The entry was overwritten by a new leader; the request may or may not be retried safely
    (it is safe with the same (client_id, seq))."""

    code = "proposal_dropped"


class Compacted(AfsError):
    code, errno, exit_code = "compacted", _errno.ERANGE, ExitCode.COMPACTED


class StorageCorrupt(AfsError):
    """Data on disk failed its checksum outside the repairable tail. Fatal for the process."""

    code, errno = "storage_corrupt", _errno.EIO


class FatalStorageError(AfsError):
    """An fsync or write failed: the process must stop (never continue after a failed fsync)."""

    code, errno = "storage_fatal", _errno.EIO


def _all_subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _all_subclasses(sub)


_BY_CODE: dict[str, type[AfsError]] = {}


def _build_registry() -> None:
    _BY_CODE.clear()
    _BY_CODE[AfsError.code] = AfsError
    for cls in _all_subclasses(AfsError):
        _BY_CODE.setdefault(cls.code, cls)


def from_wire(err: dict) -> AfsError:
    """Rebuild an error received from the network. Unknown codes become a plain AfsError."""
    if not _BY_CODE:
        _build_registry()
    code = err.get("code", "internal") if isinstance(err, dict) else "internal"
    message = err.get("message", code) if isinstance(err, dict) else str(err)
    details = err.get("details") or {} if isinstance(err, dict) else {}
    cls = _BY_CODE.get(code)
    if cls is None:
        exc = AfsError(f"{code}: {message}")
    else:
        exc = cls(message, **details)
    return exc
