"""Dev entry point: mount an in-memory replica built from a JSON fixture.

    python -m afs.fs MOUNTPOINT --fixture tree.json [--control /run/afs-dev.sock]

The fixture is ``{"revision": N, "nodes": {"/path": spec, ...}}`` where ``spec`` is
``{"kind": "file"|"dir", "data": "text" | "data_b64": "...", "mode": 420, "uid": 0, "gid": 0,
"mtime_ns": 0}`` (all optional; missing parents become directories).

The control socket (unix stream, one JSON request per line, one JSON reply per line) lets tests
and benchmarks change the replica the way the agent will: build the next revision, swap it in
atomically, then ``Mount.invalidate(changed paths)`` and reply when that finished:

    {"op": "apply", "put": {"/a": spec}, "delete": ["/b"]}  -> {"ok": true, "revision": N+1, ...}
    {"op": "status"} / {"op": "ping"} / {"op": "set_status", "status": {...}}

This is a test/dev tool: the real agent serves the replica it follows from the cluster.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import sys
import threading
import time

from afs.errors import AfsError
from afs.fs.view import DictReplicaReader, FsView
from afs.model import DEFAULT_DIR_MODE, DEFAULT_FILE_MODE, NodeKind, Stat


def _spec_data(spec: dict) -> bytes | None:
    if "data_b64" in spec:
        return base64.b64decode(spec["data_b64"])
    if "data" in spec:
        d = spec["data"]
        return d.encode() if isinstance(d, str) else bytes(d)
    return None


class MemReplica:
    """A mutable holder of immutable :class:`DictReplicaReader` revisions."""

    def __init__(self, fixture: dict):
        self.nodes: dict[str, tuple[Stat, bytes | None]] = {}
        rev = int(fixture.get("revision", 1))
        mt = time.time_ns()
        self.nodes["/"] = (Stat(NodeKind.DIR, 1, 1, 0, mt, DEFAULT_DIR_MODE, 0, 0, 0), None)
        for path, spec in (fixture.get("nodes") or {}).items():
            self._put(path, spec, rev, mt)
        self.reader = DictReplicaReader(rev, dict(self.nodes))
        self.lock = threading.Lock()

    def _put(self, path: str, spec: dict, rev: int, mt: int) -> None:
        parts = [p for p in path.split("/") if p]
        for i in range(1, len(parts)):
            pp = "/" + "/".join(parts[:i])
            if pp not in self.nodes:
                self.nodes[pp] = (Stat(NodeKind.DIR, rev, rev, 0, mt, DEFAULT_DIR_MODE, 0, 0, 0),
                                  None)
        kind = NodeKind(spec.get("kind", "dir" if spec.get("dir") else "file"))
        data = _spec_data(spec) if kind is NodeKind.FILE else None
        if kind is NodeKind.FILE and data is None:
            data = b""
        old = self.nodes.get(path)
        version = old[0].version + 1 if old is not None else 0
        create = old[0].create_revision if old is not None else rev
        default_mode = DEFAULT_FILE_MODE if kind is NodeKind.FILE else DEFAULT_DIR_MODE
        st = Stat(kind, create, rev, int(spec.get("version", version)),
                  int(spec.get("mtime_ns", mt)), int(spec.get("mode", default_mode)),
                  int(spec.get("uid", 0)), int(spec.get("gid", 0)),
                  len(data) if data is not None else 0)
        self.nodes[path] = (st, data)

    def apply(self, put: dict, delete: list[str]) -> tuple[int, list[str]]:
        """Build and publish the next revision; return it and the changed paths."""
        with self.lock:
            rev = self.reader.revision + 1
            mt = time.time_ns()
            changed: list[str] = []
            for path in delete:
                gone = [p for p in self.nodes if p == path or p.startswith(path.rstrip("/") + "/")]
                for p in gone:
                    del self.nodes[p]
                changed.extend(gone)
            before = set(self.nodes)
            for path, spec in put.items():
                self._put(path, spec, rev, mt)
                changed.append(path)
            changed.extend(p for p in self.nodes if p not in before and p not in changed)
            self.reader = DictReplicaReader(rev, dict(self.nodes))   # atomic swap
            return rev, changed


def _serve_control(sock_path: str, replica: MemReplica, mount, status: dict) -> None:
    if os.path.exists(sock_path):
        os.unlink(sock_path)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(sock_path)
    srv.listen(4)

    def handle(conn: socket.socket) -> None:
        f = conn.makefile("rwb")
        for line in f:
            try:
                req = json.loads(line)
                op = req.get("op")
                if op == "apply":
                    t0 = time.perf_counter()
                    rev, changed = replica.apply(req.get("put") or {}, req.get("delete") or [])
                    t1 = time.perf_counter()
                    ok = mount.invalidate(changed, wait=True)
                    t2 = time.perf_counter()
                    resp = {"ok": ok, "revision": rev, "changed": changed,
                            "apply_us": (t1 - t0) * 1e6, "invalidate_us": (t2 - t1) * 1e6,
                            "batch_us": mount.stats["last_batch_us"]}
                elif op == "status":
                    resp = {"ok": True, "revision": replica.reader.revision,
                            "stats": mount.stats, "hidden": mount.view.hidden_summary(),
                            "calls": mount.view.calls}
                elif op == "set_status":
                    status.update(req.get("status") or {})
                    resp = {"ok": True}
                elif op == "unmount":
                    mount.unmount()
                    resp = {"ok": True}
                elif op == "ping":
                    resp = {"ok": True, "ready": mount.wait_ready(0)}
                else:
                    resp = {"ok": False, "error": f"unknown op {op!r}"}
            except Exception as e:  # report, keep serving
                resp = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            f.write(json.dumps(resp).encode() + b"\n")
            f.flush()
        conn.close()

    def loop() -> None:
        while True:
            conn, _ = srv.accept()
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=loop, name="afs-dev-control", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    from afs.fs.mount import Mount   # the binding is imported only here

    ap = argparse.ArgumentParser(prog="python -m afs.fs", description=__doc__.splitlines()[0])
    ap.add_argument("mountpoint")
    ap.add_argument("--fixture", help="JSON fixture file (default: empty tree)")
    ap.add_argument("--control", help="unix socket path for the control channel")
    ap.add_argument("--entry-timeout", type=float, default=3600.0)
    ap.add_argument("--attr-timeout", type=float, default=3600.0)
    ap.add_argument("--negative-timeout", type=float, default=1.0)
    ap.add_argument("--no-nested-entry-invalidation", action="store_true")
    ap.add_argument("--threads", action="store_true", help="multi-threaded FUSE loop")
    ap.add_argument("--no-prewarm", action="store_true")
    ap.add_argument("--no-revision-pinning", action="store_true",
                    help="negative control: serve reads from the newest revision only")
    ap.add_argument("--no-allow-other", action="store_true")
    ap.add_argument("--debug", action="store_true")
    args = ap.parse_args(argv)

    fixture = {}
    if args.fixture:
        with open(args.fixture) as f:
            fixture = json.load(f)
    replica = MemReplica(fixture)
    status = {"connected": True, "connected_member": "dev", "last_contact": time.time(),
              "staleness_seconds": 0.0}
    view = FsView(lambda: replica.reader, status_provider=lambda: dict(status))
    if args.no_revision_pinning:
        view.recent_revisions = 0
    mount = Mount(view, args.mountpoint, entry_timeout=args.entry_timeout,
                  attr_timeout=args.attr_timeout, negative_timeout=args.negative_timeout,
                  nested_entry_invalidation=not args.no_nested_entry_invalidation,
                  threads=args.threads, prewarm=not args.no_prewarm, allow_other=not args.no_allow_other,
                  debug=args.debug)
    if args.control:
        _serve_control(args.control, replica, mount, status)
    try:
        mount.serve()
    except AfsError as e:
        print(f"afs mount: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
