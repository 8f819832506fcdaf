"""Path validation and normalisation — the only place in AFS that parses paths.

Contract:
- A *normalised* path is a ``str``: absolute, ``/``-separated, no trailing slash (except the
  root ``/`` itself), every component a non-empty UTF-8 name of at most 255 bytes that is not
  ``.`` or ``..`` and contains no control character (U+0000–U+001F, U+007F–U+009F); the whole
  path is at most 4096 bytes of UTF-8 and at most ``max_depth`` components deep (default 64).
  Names starting with ``.afs`` directly below the root are reserved (the mount's status files).
- :func:`normalize` collapses nothing silently: ``a//b``, ``/a/./b``, ``/a/../b`` are errors,
  never rewritten. The single exception is ONE trailing slash (``/a/b/`` → ``/a/b``), which
  names the same node unambiguously. No Unicode normalisation is applied (names are compared
  as given).
- Every rejection raises :class:`~afs.errors.InvalidPath`, :class:`~afs.errors.PathTooDeep`
  or :class:`~afs.errors.ReservedPath` with a message naming the path and the rule, and
  ``details = {"path": ..., "rule": ...}``.
- The other helpers (:func:`split`, :func:`components`, :func:`join`, :func:`is_ancestor`,
  :func:`is_within`, :func:`depth`, :func:`ancestors`) expect normalised input and are cheap.
- Pure functions, no I/O, thread-safe. :func:`normalize` memoises valid results (bounded).
"""
from __future__ import annotations

import re
from functools import lru_cache

from afs.errors import InvalidPath, PathTooDeep, ReservedPath

ROOT = "/"
SEP = "/"
MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 4096
DEFAULT_MAX_DEPTH = 64
RESERVED_PREFIX = ".afs"

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")

__all__ = [
    "ROOT", "MAX_NAME_BYTES", "MAX_PATH_BYTES", "DEFAULT_MAX_DEPTH", "RESERVED_PREFIX",
    "normalize", "validate_name", "split", "components", "join", "is_ancestor", "is_within",
    "depth", "ancestors", "parent",
]


def _show(path) -> str:
    """A printable, bounded rendering of a (possibly hostile) path for error messages."""
    text = repr(path)
    return text if len(text) <= 200 else text[:160] + "..." + text[-30:]


def _safe(path) -> str:
    """The path as a msgpack-safe str for error details (bounded; lone surrogates escaped)."""
    if not isinstance(path, str):
        return _show(path)
    s = path.encode("utf-8", "backslashreplace").decode("utf-8")
    return s if len(s) <= 4200 else s[:4200]


def _fail(cls, path, rule: str, why: str):
    raise cls(f"invalid path {_show(path)}: {why}", path=_safe(path), rule=rule)


def normalize(path: str, max_depth: int | None = DEFAULT_MAX_DEPTH) -> str:
    """Return the normalised form of ``path`` or raise InvalidPath/PathTooDeep/ReservedPath.

    ``max_depth=None`` skips the depth rule (the caller checks it against its own limit).
    """
    if type(path) is not str:
        if isinstance(path, str):
            path = str(path)
        else:
            _fail(InvalidPath, path, "type", f"must be a str, got {type(path).__name__}")
    norm, d = _normalize(path)
    if max_depth is not None and d > max_depth:
        raise PathTooDeep(
            f"invalid path {_show(path)}: depth {d} exceeds the limit of {max_depth} components",
            path=_safe(path), rule="depth", limit=max_depth, actual=d)
    return norm


@lru_cache(maxsize=8192)
def _normalize(path: str) -> tuple[str, int]:
    # Only valid paths are cached: the function raises for everything else.
    if not path:
        _fail(InvalidPath, path, "empty", "the path is empty")
    if path[0] != SEP:
        _fail(InvalidPath, path, "absolute", "must be absolute (start with '/')")
    try:
        raw = path.encode("utf-8")
    except UnicodeEncodeError:
        _fail(InvalidPath, path, "utf8", "is not valid UTF-8 (lone surrogate)")
    if len(raw) > MAX_PATH_BYTES:
        _fail(InvalidPath, path, "path_length",
              f"is {len(raw)} bytes of UTF-8, the limit is {MAX_PATH_BYTES}")
    if path == ROOT:
        return ROOT, 0
    norm = path[:-1] if path[-1] == SEP else path  # one trailing slash is allowed
    m = _CONTROL.search(norm)
    if m:
        _fail(InvalidPath, path, "control_char",
              f"contains the control character U+{ord(m.group()):04X} at offset {m.start()}")
    parts = norm.split(SEP)
    # parts[0] == "" (leading slash)
    for i in range(1, len(parts)):
        name = parts[i]
        if not name:
            _fail(InvalidPath, path, "empty_component",
                  "has an empty component ('//' or a second trailing '/')")
        if name == "." or name == "..":
            _fail(InvalidPath, path, "dot_component",
                  f"has a {name!r} component (relative components are not allowed)")
        if len(name) > MAX_NAME_BYTES // 4 and len(name.encode("utf-8")) > MAX_NAME_BYTES:
            _fail(InvalidPath, path, "name_length",
                  f"component {_show(name[:40])}... is {len(name.encode('utf-8'))} bytes, "
                  f"the limit is {MAX_NAME_BYTES}")
    if parts[1].startswith(RESERVED_PREFIX):
        _fail(ReservedPath, path, "reserved",
              f"names starting with {RESERVED_PREFIX!r} at the root are reserved")
    return norm, len(parts) - 1


def validate_name(name: str) -> str:
    """Validate one path component (no '/'), e.g. for :func:`join`; returns it unchanged."""
    if type(name) is not str or not name or SEP in name:
        raise InvalidPath(f"invalid name {_show(name)}: must be a non-empty str without '/'",
                          path=_safe(name), rule="name")
    _normalize(SEP + "x" + SEP + name)  # component rules (the 'x' parent avoids the root rule)
    return name


def split(path: str) -> tuple[str, str]:
    """``/a/b/c`` → ``("/a/b", "c")``; ``/a`` → ``("/", "a")``. The root has no parent."""
    if path == ROOT:
        raise InvalidPath("invalid path '/': the root has no parent", path=ROOT, rule="root")
    i = path.rfind(SEP)
    return (path[:i] or ROOT), path[i + 1:]


def parent(path: str) -> str:
    """The parent of a non-root normalised path."""
    return split(path)[0]


def components(path: str) -> list[str]:
    """``/a/b`` → ``["a", "b"]``; ``/`` → ``[]``."""
    return [] if path == ROOT else path[1:].split(SEP)


def depth(path: str) -> int:
    """Number of components: ``/`` is 0, ``/a/b`` is 2."""
    return 0 if path == ROOT else path.count(SEP)


def ancestors(path: str) -> list[str]:
    """Proper ancestors from the root down, root included: ``/a/b/c`` → ``["/", "/a", "/a/b"]``."""
    if path == ROOT:
        return []
    out = [ROOT]
    i = path.find(SEP, 1)
    while i != -1:
        out.append(path[:i])
        i = path.find(SEP, i + 1)
    return out


def join(base: str, *names: str) -> str:
    """Append validated names to a normalised path: ``join("/a", "b", "c") == "/a/b/c"``.

    Each name is one component (no '/'); the result is normalised (depth is not checked).
    """
    out = base
    for name in names:
        validate_name(name)
        out = (SEP + name) if out == ROOT else (out + SEP + name)
    return normalize(out, max_depth=None)


def is_ancestor(a: str, b: str) -> bool:
    """True when ``a`` is a *proper* ancestor of ``b`` (``/a`` of ``/a/b``; not of ``/ab``
    and not of itself). The root is an ancestor of every other path."""
    if a == b:
        return False
    if a == ROOT:
        return True
    return b.startswith(a) and b[len(a)] == SEP


def is_within(path: str, prefix: str) -> bool:
    """True when ``path`` is ``prefix`` or below it (what a watch on ``prefix`` covers)."""
    return path == prefix or is_ancestor(prefix, path)
