"""``afs import`` / ``afs export``: copy a local directory tree in and out of AFS.

import: reads and validates the WHOLE local tree first (bad names, oversized files: exit 7,
nothing sent), then writes it as ONE transaction; only when it exceeds the per-transaction
limits is it split into several (announced on stderr — then it is not atomic).
export: one ``walk`` (one consistent revision), then writes local files. Modes and owners are
not carried either way; existing local/remote nodes not in the source are left alone.
"""
from __future__ import annotations

import os
import stat as _st

import click

from afs.errors import InvalidInput, NotADirectory
from afs_cli.common import client_options, progress, read_local_file

_BAR_THRESHOLD = 200          # show progress bars from this many files (or several txns)


def _join(base: str, rel: str) -> str:
    return (base.rstrip("/") + "/" + rel) if rel else base


@click.command("import")
@click.argument("local_dir", metavar="LOCAL_DIR")
@click.argument("path", metavar="PATH")
@client_options
def import_cmd(env, local_dir, path):
    """Copy LOCAL_DIR's contents into PATH (created if missing), in one transaction."""
    if not os.path.isdir(local_dir):
        raise InvalidInput(f"{local_dir}: not a local directory")
    client = env.client
    limit = client.limits.max_value_bytes
    ops = [] if path.rstrip("/") == "" else [{"op": "mkdir", "path": path, "parents": True}]
    files: list[tuple[str, str]] = []          # (local file, remote path)
    skipped: list[str] = []
    ndirs = 0
    for top, dirs, names in os.walk(local_dir, onerror=_raise):
        dirs.sort()
        rel_top = os.path.relpath(top, local_dir)
        rel_top = "" if rel_top == "." else rel_top.replace(os.sep, "/")
        for d in list(dirs):
            full = os.path.join(top, d)
            if os.path.islink(full):
                skipped.append(full)
                dirs.remove(d)
                continue
            ops.append({"op": "mkdir", "path": _join(path, _join(rel_top, d).lstrip("/")),
                        "parents": True})
            ndirs += 1
        for n in sorted(names):
            full = os.path.join(top, n)
            if not _st.S_ISREG(os.lstat(full).st_mode):
                skipped.append(full)
                continue
            files.append((full, _join(path, _join(rel_top, n).lstrip("/"))))
    for s in skipped:
        click.echo(f"afs: skipping {s} (not a regular file or directory)", err=True)
    big = len(files) >= _BAR_THRESHOLD
    with progress(len(files), "reading", big) as bar:
        for full, remote in files:
            ops.append({"op": "set", "path": remote, "data": read_local_file(full, limit),
                        "upsert": True, "parents": True})
            bar.update(1)
    batches = client.plan_batches(ops)        # validates everything; raises before sending
    if len(batches) > 1:
        click.echo(f"afs: {len(ops)} operations exceed the per-transaction limits; importing "
                   f"in {len(batches)} transactions (NOT atomic: a failure leaves the earlier "
                   f"ones applied)", err=True)
    if not batches:
        click.echo(f"afs: nothing to import ({local_dir} is empty)", err=True)
        if env.json:
            env.emit_json({"revision": None, "transactions": 0, "revisions": [], "files": 0,
                           "dirs": 0, "path": path})
        return
    revisions = []
    with progress(len(batches), "importing", big or len(batches) > 1) as bar:
        for batch in batches:
            revisions.append(client.txn([], batch).revision)
            bar.update(1)
    out = {"revision": revisions[-1], "transactions": len(batches), "revisions": revisions,
           "files": len(files), "dirs": ndirs, "path": path}
    if env.json:
        env.emit_json(out)
    else:
        click.echo(f"revision {revisions[-1]}")
        click.echo(f"imported {len(files)} files and {ndirs} directories "
                   f"into {path} ({len(batches)} transaction{'s' if len(batches) > 1 else ''})",
                   err=True)


def _raise(exc: OSError):
    raise exc


@click.command("export")
@click.argument("path", metavar="PATH")
@click.argument("local_dir", metavar="LOCAL_DIR")
@client_options
def export_cmd(env, path, local_dir):
    """Write the subtree at PATH (one consistent revision) into LOCAL_DIR."""
    nodes = env.client.walk(path, data=True)
    if not nodes or nodes[0][1].kind.value != "dir":
        raise NotADirectory(f"{path}: not a directory (use 'afs get' for a file)")
    root = nodes[0][0]
    local_root = os.path.abspath(local_dir)
    os.makedirs(local_root, exist_ok=True)
    files = dirs = 0
    with progress(len(nodes), "exporting", len(nodes) >= _BAR_THRESHOLD) as bar:
        for p, st, data in nodes[1:]:
            rel = p[len(root):].lstrip("/").split("/")
            if any(c in ("", ".", "..") or os.sep in c or "\x00" in c for c in rel):
                raise InvalidInput(f"refusing to export unsafe name {p!r}")
            target = os.path.join(local_root, *rel)
            if st.kind.value == "dir":
                os.makedirs(target, exist_ok=True)
                dirs += 1
            else:
                tmp = f"{target}.afs-tmp"
                with open(tmp, "wb") as fh:
                    fh.write(data or b"")
                os.replace(tmp, target)
                files += 1
            bar.update(1)
    if env.json:
        env.emit_json({"revision": nodes.revision, "files": files, "dirs": dirs, "path": path,
                       "local_dir": local_dir})
    else:
        click.echo(f"exported {files} files and {dirs} directories from {path} at revision "
                   f"{nodes.revision}")
