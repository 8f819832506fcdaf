"""Data commands: get, put, create, mkdir, rm, chmod, chown, ls, tree, stat, txn.

Each one parses its input (bad input raises InvalidInput before anything is sent), makes one
client call, and prints. Error translation is not done here (see ``AfsGroup.invoke``).
"""
from __future__ import annotations

import base64
import binascii
import json

import click

from afs.client import DEFAULT_LIMITS
from afs.errors import InvalidInput, RequestTooLarge
from afs_cli.common import (binary_stdin, client_options, fmt_time, mode_string, parse_mode,
                            parse_owner, parse_uint, read_local_file, read_value, stat_fields,
                            value_json, write_stdout_bytes)

MAX_VALUE = DEFAULT_LIMITS.max_value_bytes
PATH = click.argument("path", metavar="PATH")


@click.command()
@PATH
@click.option("--stale", is_flag=True,
              help="Serve from any member (not linearizable); says which revision it reflects")
@client_options
def get(env, path, stale):
    """Print a file's bytes to stdout."""
    res = env.client.get(path, stale=stale)
    if env.json:
        env.emit_json({"path": path, "revision": res.revision, **stat_fields(res.stat),
                       **value_json(res.data)})
        return
    write_stdout_bytes(res.data)
    if stale:
        click.echo(f"stale read at revision {res.revision}", err=True)


def _value_options(f):
    f = click.option("--mode", metavar="MODE", help="Permission bits, octal (e.g. 0644)")(f)
    f = click.option("-p", "--parents", is_flag=True, help="Create missing parent directories")(f)
    f = click.option("--file", "file", metavar="FILE",
                     help="Read the value from FILE ('-' for stdin)")(f)
    f = click.argument("value", required=False, metavar="[VALUE|-]")(f)
    return PATH(f)


@click.command()
@_value_options
@click.option("--if-version", "if_version", metavar="N",
              help="Only if the file's version is N (0: only if it does not exist)")
@client_options
def put(env, path, value, file, parents, mode, if_version):
    """Create or replace a file (VALUE, --file FILE, or - for stdin)."""
    mode_i = parse_mode(mode)
    ver = parse_uint(if_version, "--if-version")
    data = read_value(value, file, MAX_VALUE, required=True)
    res = env.client.put(path, data, if_version=ver, mode=mode_i, parents=parents)
    env.emit_write(res, path=path)


@click.command()
@_value_options
@client_options
def create(env, path, value, file, parents, mode):
    """Create a file; fails (exit 4) if it exists. The value defaults to empty."""
    mode_i = parse_mode(mode)
    data = read_value(value, file, MAX_VALUE, required=False)
    res = env.client.create(path, data, mode=mode_i, parents=parents)
    env.emit_write(res, path=path)


@click.command()
@click.option("-p", "--parents", is_flag=True,
              help="Create missing parents; an existing directory is not an error")
@click.option("--mode", metavar="MODE", help="Permission bits, octal (default 0755)")
@PATH
@client_options
def mkdir(env, parents, mode, path):
    """Create a directory."""
    res = env.client.mkdir(path, parents=parents, mode=parse_mode(mode))
    env.emit_write(res, path=path)


@click.command()
@click.option("-r", "--recursive", is_flag=True, help="Delete a directory and everything in it")
@click.option("--if-version", "if_version", metavar="N", help="Only if the version is N")
@PATH
@client_options
def rm(env, recursive, if_version, path):
    """Delete a file or directory (a non-empty directory needs -r)."""
    ver = parse_uint(if_version, "--if-version")
    res = env.client.delete(path, recursive=recursive, if_version=ver)
    env.emit_write(res, path=path)


@click.command()
@click.argument("mode", metavar="MODE")
@PATH
@client_options
def chmod(env, mode, path):
    """Set permission bits: octal MODE such as 0640."""
    res = env.client.chmod(path, mode=parse_mode(mode))
    env.emit_write(res, path=path)


@click.command()
@click.argument("owner", metavar="UID[:GID]")
@PATH
@client_options
def chown(env, owner, path):
    """Set the numeric owner (UID, UID:GID or :GID)."""
    uid, gid = parse_owner(owner)
    res = env.client.chmod(path, uid=uid, gid=gid)
    env.emit_write(res, path=path)


@click.command()
@click.option("-l", "long_", is_flag=True, help="Long format: mode uid gid size version "
                                               "mod_revision mtime name")
@PATH
@client_options
def ls(env, long_, path):
    """List a directory (directories end with '/')."""
    items = env.client.list(path)
    if env.json:
        env.emit_json({"path": path, "revision": items.revision,
                       "children": [{"name": n, **stat_fields(st)} for n, st in items]})
        return
    for name, st in items:
        shown = name + ("/" if st.kind.value == "dir" else "")
        if long_:
            click.echo(f"{mode_string(st)} {st.uid:>5} {st.gid:>5} {st.size:>8} "
                       f"v{st.version:<4} r{st.mod_revision:<6} {fmt_time(st.mtime_ns)} {shown}")
        else:
            click.echo(shown)


@click.command()
@PATH
@client_options
def tree(env, path):
    """Show a subtree (one consistent revision)."""
    nodes = env.client.walk(path, data=False)
    if env.json:
        env.emit_json({"path": path, "revision": nodes.revision,
                       "nodes": [{"path": p, **stat_fields(st)} for p, st, _ in nodes]})
        return
    if not nodes:
        return
    root = nodes[0][0]
    click.echo(root + ("/" if nodes[0][1].kind.value == "dir" and root != "/" else ""))
    rel = [tuple(p[len(root):].lstrip("/").split("/")) for p, _, _ in nodes[1:]]
    last_child = {}                        # parent parts -> its last child's parts
    for parts in rel:                      # pre-order, sorted: the last one seen is the last
        last_child[parts[:-1]] = parts
    for parts, (_, st, _) in zip(rel, nodes[1:]):
        prefix = ""
        for depth in range(1, len(parts) + 1):
            last = last_child[parts[:depth - 1]] == parts[:depth]
            if depth == len(parts):
                prefix += "└── " if last else "├── "
            else:
                prefix += "    " if last else "│   "
        click.echo(prefix + parts[-1] + ("/" if st.kind.value == "dir" else ""))


@click.command()
@PATH
@client_options
def stat(env, path):
    """Show a node's metadata."""
    st, rev = env.client.stat_with_revision(path)
    if env.json:
        env.emit_json({"path": path, "revision": rev, **stat_fields(st)})
        return
    d = stat_fields(st)
    click.echo(f"path: {path}")
    for k, v in d.items():
        if k == "mode":
            v = f"{v:04o} ({mode_string(st)})"
        elif k == "mtime_ns":
            v = f"{v} ({fmt_time(v)})"
        click.echo(f"{k}: {v}")
    click.echo(f"revision: {rev}")


# ---------------------------------------------------------------- txn

_TXN_INPUT_LIMIT = 3 * DEFAULT_LIMITS.max_request_bytes   # base64 + JSON overhead


@click.command()
@click.argument("source", required=False, metavar="[-]")
@click.option("--file", "file", metavar="FILE", help="Read the transaction JSON from FILE")
@client_options
def txn(env, source, file):
    """Run a transaction given as JSON (stdin by default).

    \b
    {"compare": [{"path": "/a", "target": "version", "cmp": "==", "value": 3}],
     "then":    [{"op": "set", "path": "/a", "value": "new"}],
     "else":    []}
    """
    if source not in (None, "-"):
        raise click.UsageError("the only argument txn takes is '-' (stdin); use --file FILE")
    if file not in (None, "-"):
        raw = read_local_file(file, _TXN_INPUT_LIMIT)
    else:
        raw = binary_stdin().read(_TXN_INPUT_LIMIT + 1)
        if len(raw) > _TXN_INPUT_LIMIT:
            raise RequestTooLarge(f"transaction input exceeds {_TXN_INPUT_LIMIT} bytes")
    compare, then, else_ = parse_txn_json(raw)
    res = env.client.txn(compare, then, else_)
    if env.json:
        env.emit_json({"revision": res.revision, "succeeded": res.succeeded,
                       "results": _jsonable(res.results)})
    else:
        click.echo(f"revision {res.revision}")
        click.echo("succeeded" if res.succeeded else "compare failed: else branch applied")


def _jsonable(v):
    if isinstance(v, bytes):
        return value_json(v)
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def parse_txn_json(raw: bytes):
    """JSON text -> (compare, then, else) lists of protocol dicts (values as bytes)."""
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInput(f"bad transaction JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidInput("bad transaction JSON: expected an object with compare/then/else")
    unknown = set(doc) - {"compare", "then", "else"}
    if unknown:
        raise InvalidInput(f"bad transaction JSON: unknown key {sorted(unknown)[0]!r} "
                           f"(expected compare, then, else)")
    lists = {}
    for key in ("compare", "then", "else"):
        v = doc.get(key) or []
        if not isinstance(v, list):
            raise InvalidInput(f"bad transaction JSON: {key!r} must be a list")
        lists[key] = v
    compare = [_json_compare(c, i) for i, c in enumerate(lists["compare"])]
    then = [_json_op(o, f"then[{i}]") for i, o in enumerate(lists["then"])]
    else_ = [_json_op(o, f"else[{i}]") for i, o in enumerate(lists["else"])]
    return compare, then, else_


def _bytes_field(d: dict, where: str, text_keys: tuple[str, ...]) -> tuple[bool, bytes | None]:
    """Pop a value given as text (one of ``text_keys``) or ``value_b64``."""
    given = [k for k in (*text_keys, "value_b64") if k in d]
    if len(given) > 1:
        raise InvalidInput(f"{where}: give only one of {', '.join(given)}")
    if not given:
        return False, None
    k = given[0]
    v = d.pop(k)
    if v is None:
        return True, None
    if not isinstance(v, str):
        raise InvalidInput(f"{where}: {k!r} must be a string")
    if k == "value_b64":
        try:
            return True, base64.b64decode(v, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidInput(f"{where}: 'value_b64' is not valid base64") from None
    return True, v.encode("utf-8")


def _json_op(o, where: str) -> dict:
    if not isinstance(o, dict):
        raise InvalidInput(f"{where}: each op must be an object")
    d = dict(o)
    if d.get("op") == "put":                       # CLI convenience: put = set + upsert
        d["op"] = "set"
        d.setdefault("upsert", True)
    if d.get("op") in ("create", "set"):
        given, data = _bytes_field(d, where, ("value", "data"))
        d["data"] = data if data is not None else b""
    if isinstance(d.get("mode"), str):
        d["mode"] = parse_mode(d["mode"])
    return d


def _json_compare(c, i: int) -> dict:
    where = f"compare[{i}]"
    if not isinstance(c, dict):
        raise InvalidInput(f"{where}: each compare must be an object")
    d = dict(c)
    if d.get("target") == "value":
        given, v = _bytes_field(d, where, ("value",))
        if not given:
            raise InvalidInput(f"{where}: missing 'value' (or 'value_b64')")
        d["value"] = v
    return d
