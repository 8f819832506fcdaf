"""``afs watch PATH``: print (or act on) every change under PATH, in revision order.

Parses, opens one :meth:`afs.client.Client.watch` (on the cluster, or with ``--local`` on this
host's agent socket), prints one line per event. The watch resumes by itself after a member
failure (no gap, no duplicate). Ctrl-C exits 0. A start revision that left history exits
COMPACTED (11) with one ``afs: ...`` line (the boundary in ``afs_cli.main.AfsGroup``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import click

from afs.client import Client
from afs.errors import InvalidInput
from afs.model import Event
from afs_cli.common import client_options, parse_uint, value_json

SOCKET_ENV = "AFS_AGENT_SOCKET_PATH"


def event_json(ev: Event) -> dict:
    out = {"revision": ev.revision, "type": ev.type.value, "path": ev.path,
           "version": ev.stat.version}
    if ev.data is None:
        out["value"] = None
    else:
        out.update(value_json(ev.data))
    return out


def event_text(ev: Event) -> str:
    line = f"{ev.revision} {ev.type.value} {ev.path}"
    if ev.type.value == "deleted":
        return line
    line += f" version={ev.stat.version}"
    if ev.stat.kind.value == "dir":
        return line + " (dir)"
    if ev.data is None:
        return line + f" size={ev.stat.size}"
    try:
        text = ev.data.decode("utf-8")
    except UnicodeDecodeError:
        return line + f" <{len(ev.data)} bytes, binary>"
    if len(text) > 120 or not text.isprintable():
        shown = json.dumps(text[:120], ensure_ascii=False)
        return line + f" value={shown}{'...' if len(text) > 120 else ''}"
    return line + f" value={json.dumps(text, ensure_ascii=False)}"


def run_exec(cmd: str, ev: Event) -> None:
    env = dict(os.environ)
    env.update({"AFS_REVISION": str(ev.revision), "AFS_PATH": ev.path, "AFS_TYPE": ev.type.value,
                "AFS_VERSION": str(ev.stat.version)})
    sys.stdout.flush()
    rc = subprocess.run(cmd, shell=True, input=ev.data or b"", env=env).returncode
    if rc != 0:
        click.echo(f"afs: --exec command exited {rc} for {ev.type.value} {ev.path} "
                   f"at revision {ev.revision}", err=True)


@click.command("watch")
@click.argument("path", metavar="PATH")
@click.option("--from", "from_rev", metavar="REV",
              help="Start at revision REV (replays history from there); default: from now")
@click.option("--exec", "exec_cmd", metavar="CMD",
              help="Run CMD (via sh -c) per event, with AFS_REVISION, AFS_PATH, AFS_TYPE, "
                   "AFS_VERSION in its environment and the value on stdin")
@click.option("--local", is_flag=True,
              help="Watch through this host's agent (its local socket) instead of the cluster")
@click.option("--socket", "socket_path", metavar="PATH",
              help=f"The agent's socket for --local [env {SOCKET_ENV}]")
@click.option("--metadata-only", is_flag=True, help="Events without file contents")
@client_options
def watch(env, path, from_rev, exec_cmd, local, socket_path, metadata_only):
    """Print every change under PATH as it is committed (one line per event).

    Events come in revision order, each once, also across member failures; a transaction's
    events share one revision. -o json prints one object per line:
    {"revision", "type", "path", "version", "value" | "value_b64"}.
    """
    start = parse_uint(from_rev, "--from")
    if socket_path and not local:
        raise click.UsageError("--socket is only used with --local")
    if local:
        sock = socket_path or os.environ.get(SOCKET_ENV)
        if not sock:
            raise InvalidInput(f"--local needs the agent's socket: --socket PATH or {SOCKET_ENV}")
        cfg = env.config()
        client = Client.local(sock, timeout=cfg.timeout, connect_timeout=cfg.connect_timeout)
        click.get_current_context().call_on_close(client.close)
    else:
        client = env.client
    w = None
    try:
        w = client.watch(path, start, data=not metadata_only)
        for group in w:
            for ev in group:
                if exec_cmd:
                    run_exec(exec_cmd, ev)
                elif env.json:
                    env.emit_json(event_json(ev))
                else:
                    click.echo(event_text(ev))
    except KeyboardInterrupt:
        pass
    finally:
        if w is not None:
            w.cancel()
