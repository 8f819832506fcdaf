"""``afs cluster ...``: cluster-level commands. Others add subcommands to :data:`cluster`."""
from __future__ import annotations

import click

from afs_cli.common import client_options

_COLUMNS = ("NAME", "ENDPOINT", "ROLE", "LEADER", "TERM", "COMMIT", "APPLIED", "REVISION")


@click.group()
def cluster():
    """Cluster membership and health."""


@cluster.command("status")
@client_options
def status(env):
    """Members, roles, leader, term, revision and applied index (one row per member)."""
    members = env.client.cluster_status()
    if env.json:
        env.emit_json(members)
        return
    rows = []
    for m in members:
        if "error" in m:
            rows.append((m.get("name", "?"), m["endpoint"], "unreachable", "", "", "", "", ""))
        else:
            rows.append((m.get("name", ""), m["endpoint"], m.get("role", ""), m.get("leader", ""),
                         str(m.get("term", "")), str(m.get("commit_index", "")),
                         str(m.get("applied_index", "")), str(m.get("revision", ""))))
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(_COLUMNS)]
    for r in (_COLUMNS, *rows):
        click.echo("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    for m in members:
        if "error" in m:
            click.echo(f"{m.get('name') or m['endpoint']}: {m['error']}", err=True)
    leaders = {m.get("leader") for m in members if "error" not in m and m.get("leader")}
    if not leaders:
        click.echo("warning: no member reports a leader", err=True)
    elif len(leaders) > 1:
        click.echo(f"warning: members disagree about the leader: {', '.join(sorted(leaders))}",
                   err=True)
