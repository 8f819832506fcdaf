"""Shared pieces of the ``afs`` commands: the client options, the output helpers, and the
parsers for user input (values, modes, owners, versions).

Contract: every parser raises :class:`afs.errors.InvalidInput` (exit 7) with one line naming
the input, before any client call is made; commands never print tracebacks (the boundary in
``afs_cli.main.AfsGroup`` turns every AfsError into ``afs: <message>`` and its exit code).
"""
from __future__ import annotations

import base64
import functools
import json
import os
import re
import stat as _stat_mod
import sys
import time

import click

from afs.client import Client
from afs.config import ClientConfig, load as load_config
from afs.errors import InvalidInput, ValueTooLarge
from afs.model import Stat

ENDPOINTS_HELP = ("Comma-separated HOST:PORT client addresses of the cluster "
                  "[env AFS_ENDPOINTS; default 127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003]")


class Env:
    """Per-invocation state handed to each command: options, the lazily built client, output."""

    def __init__(self, endpoints, timeout, config, output):
        self.endpoints, self.timeout, self.config_file, self.output = (
            endpoints, timeout, config, output)
        self._client: Client | None = None

    @property
    def json(self) -> bool:
        return self.output == "json"

    def config(self) -> ClientConfig:
        return load_config(ClientConfig, config_file=self.config_file,
                           overrides={"endpoints": self.endpoints, "timeout": self.timeout})

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = Client.from_config(self.config())
            click.get_current_context().call_on_close(self._client.close)
        return self._client

    # ---- output ----
    def emit_json(self, obj) -> None:
        click.echo(json.dumps(obj, indent=None, sort_keys=False))

    def emit_write(self, res, **extra) -> None:
        """A write's outcome: ``revision N`` or ``{"revision": N, ...}``."""
        if self.json:
            self.emit_json({"revision": res.revision, **extra})
        else:
            click.echo(f"revision {res.revision}")


def client_options(f):
    """Add --endpoints/--timeout/--config/-o to a command; pass ``env`` instead of them."""

    @click.option("--endpoints", "endpoints", metavar="HOST:PORT,...", help=ENDPOINTS_HELP)
    @click.option("--timeout", type=float, metavar="SECONDS",
                  help="Overall deadline per call, retries included [env AFS_TIMEOUT; 5]")
    @click.option("--config", "config", metavar="FILE",
                  help="TOML config file with a [client] table [env AFS_CONFIG]")
    @click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text",
                  show_default=True, help="Output format")
    @functools.wraps(f)
    def wrapper(endpoints, timeout, config, output, **kwargs):
        return f(Env(endpoints, timeout, config, output), **kwargs)

    return wrapper


# ---------------------------------------------------------------- input parsers

_MODE_RE = re.compile(r"^(?:0o|0)?([0-7]{1,4})$")


def parse_mode(text: str | None) -> int | None:
    """``644``, ``0644``, ``0o644`` -> int. Symbolic modes are not supported."""
    if text is None:
        return None
    m = _MODE_RE.match(text.strip())
    if not m:
        raise InvalidInput(f"bad mode {text!r}: expected octal permission bits like 0644")
    return int(m.group(1), 8)


def parse_uint(text: str | None, what: str) -> int | None:
    if text is None:
        return None
    s = text.strip()
    if not s.isdigit():
        raise InvalidInput(f"bad {what} {text!r}: expected a non-negative integer")
    return int(s)


def parse_owner(text: str) -> tuple[int | None, int | None]:
    """``UID``, ``UID:GID``, ``:GID``, ``UID:`` (numeric ids only)."""
    uid_s, sep, gid_s = text.partition(":")
    uid = parse_uint(uid_s, "uid") if uid_s else None
    gid = parse_uint(gid_s, "gid") if gid_s else None
    if uid is None and gid is None:
        raise InvalidInput(f"bad owner {text!r}: expected UID, UID:GID or :GID (numeric)")
    return uid, gid


def binary_stdin():
    """stdin as bytes (``sys.stdin.buffer``; click.get_binary_stream is deprecated in 8.5)."""
    return getattr(sys.stdin, "buffer", sys.stdin)


def read_stdin(limit: int) -> bytes:
    data = binary_stdin().read(limit + 1)
    if len(data) > limit:
        raise ValueTooLarge(f"standard input is larger than the limit of {limit} bytes")
    return data


def read_local_file(path: str, limit: int) -> bytes:
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size > limit:
                raise ValueTooLarge(f"{path}: {size} bytes, the limit is {limit}")
            data = fh.read(limit + 1)
    except IsADirectoryError:
        raise InvalidInput(f"cannot read {path}: is a directory") from None
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise ValueTooLarge(f"{path}: larger than the limit of {limit} bytes")
    return data


def read_value(value: str | None, file: str | None, limit: int, required: bool) -> bytes:
    """The bytes to write from exactly one of VALUE, ``--file F`` or ``-`` (stdin)."""
    if value is not None and file is not None:
        raise click.UsageError("give either VALUE or --file, not both")
    if value == "-" or file == "-":
        return read_stdin(limit)
    if file is not None:
        return read_local_file(file, limit)
    if value is not None:
        data = os.fsencode(value)       # argv bytes exactly as given (surrogateescape)
        if len(data) > limit:
            raise ValueTooLarge(f"value is {len(data)} bytes, the limit is {limit}")
        return data
    if required:
        raise click.UsageError("missing value: give VALUE, --file FILE or - (stdin)")
    return b""


# ---------------------------------------------------------------- rendering

def stat_fields(st: Stat) -> dict:
    return st.to_dict()


def value_json(data: bytes) -> dict:
    """``{"value": text}`` when the bytes are UTF-8, else ``{"value_b64": ...}``."""
    try:
        return {"value": data.decode("utf-8")}
    except UnicodeDecodeError:
        return {"value_b64": base64.b64encode(data).decode("ascii")}


def mode_string(st: Stat) -> str:
    kind = _stat_mod.S_IFDIR if st.kind.value == "dir" else _stat_mod.S_IFREG
    return _stat_mod.filemode(kind | st.mode)


def fmt_time(ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ns / 1e9))


def write_stdout_bytes(data: bytes) -> None:
    sys.stdout.flush()
    out = getattr(sys.stdout, "buffer", sys.stdout)
    out.write(data)
    out.flush()


def progress(length: int, label: str, show: bool):
    """A click progress bar on stderr (renders only on a terminal); a no-op when not shown."""
    if not show:
        return _NoBar()
    return click.progressbar(length=length, label=label, file=sys.stderr)


class _NoBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n):
        pass
