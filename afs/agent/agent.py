"""``afs agent``: one per host. Keeps a full local replica, persists it, mounts it read-only.

Threads: the main thread runs the FUSE loop (or waits for a signal when no mount is asked for);
one sync thread runs the :class:`Follower` (the only writer of the replica); the mount's own
invalidation thread drops kernel caches for changed paths.

Order per revision (so a transaction becomes visible as a whole): the follower applies all
events of the revision to the replica and publishes the new immutable view, then asks the mount
to invalidate exactly the changed paths and their parents and waits for it.

Start-up: check the mount point first (missing, not a directory, busy, no ``fusermount3``, no
``/dev/fuse``: one ERROR line and exit 1 before anything else happens; a dead FUSE mount left by
a killed agent is cleared with ``fusermount3 -u -z``). Load the cache (a corrupt one is
discarded and re-fetched, never served); if this host has already served a newer revision than
the cache holds (``hwm``: after a corrupt cache, or a SIGKILL between two cache saves), wait for
the cluster before mounting (never go back in revision). Otherwise mount at once — also when no
member is reachable — and catch up in the background. SIGTERM/SIGINT unmount cleanly and save
the cache.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time

from afs import errors
from afs.agent.follower import Follower
from afs.agent.replica import Replica
from afs.config import AgentConfig

log = logging.getLogger("afs.agent")


class Agent:
    def __init__(self, cfg: AgentConfig):
        self.cfg = cfg
        self.replica = Replica.open(cfg.cache_dir)
        self.mount = None
        self.follower = Follower(cfg.endpoints, self.replica, on_change=self._on_change,
                                 connect_timeout=cfg.connect_timeout)
        self._sync_thread: threading.Thread | None = None
        self._stop = threading.Event()
        # >>> local watch socket (afs/agent/localwatch.py): fed by the follower's applied revisions
        self.localwatch = None
        if cfg.socket_path:
            from afs.agent.localwatch import LocalWatchServer
            self.localwatch = LocalWatchServer(cfg.socket_path, status_provider=self.status)
            self.localwatch.attach(self.follower)
        # <<< local watch socket

    def _on_change(self, paths: set[str], revision: int) -> None:
        if self.mount is not None:
            self.mount.invalidate(sorted(paths), wait=True)

    def status(self) -> dict:
        return self.follower.status()

    def start_sync(self) -> None:
        if self.localwatch is not None and self.localwatch.loop is None:   # local watch socket
            self.localwatch.start(self.replica.revision)                   # before the follower
        self._sync_thread = threading.Thread(target=self.follower.run, name="afs-agent-sync", daemon=True)
        self._sync_thread.start()

    def wait_servable(self) -> None:
        if self.replica.can_serve:
            return
        log.warning("event=waiting_for_cluster reason=%r hwm=%d cache_revision=%d",
                    "this host already served a newer revision than its cache holds",
                    self.replica.hwm, self.replica.revision)
        while not self.replica.can_serve and not self._stop.is_set():
            time.sleep(0.1)

    def stop(self) -> None:
        self._stop.set()
        self.follower.stop()
        if self._sync_thread is not None:
            self._sync_thread.join(timeout=10)
        if self.localwatch is not None:                                    # local watch socket
            self.localwatch.stop()
        try:
            self.replica.save()
        except OSError as exc:
            log.error("event=cache_save_failed error=%r", str(exc))
        self.replica.close()

    def run(self) -> int:
        cfg = self.cfg
        if not cfg.mountpoint:
            self.start_sync()
            log.info("event=started mount=- endpoints=%s", ",".join(cfg.endpoints))
            stop = threading.Event()
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: stop.set())
            stop.wait()
            self.stop()
            return 0
        try:
            from afs.fs.mount import Mount, MountError
        except (ImportError, OSError) as exc:
            log.error("event=mount_failed error=%s", str(exc).splitlines()[0] if str(exc) else exc)
            self.replica.close()
            return 1
        from afs.fs.view import FsView
        view = FsView(self.replica.current, status_provider=self.status)
        self.mount = Mount(view, cfg.mountpoint, entry_timeout=cfg.entry_timeout,
                           attr_timeout=cfg.entry_timeout, negative_timeout=cfg.negative_timeout,
                           allow_other=cfg.allow_other)
        try:
            self.mount.preflight()     # fail fast, before following the cluster
        except MountError as exc:
            log.error("event=mount_failed error=%s", exc)
            self.replica.close()
            return 1
        self.start_sync()
        if not self.replica.can_serve:
            # SIGTERM/SIGINT while waiting: stop without mounting. The default handlers are
            # restored before serve(): libfuse installs its own only over SIG_DFL.
            old = {sig: signal.signal(sig, lambda *_: self._stop.set())
                   for sig in (signal.SIGTERM, signal.SIGINT)}
            try:
                self.wait_servable()
            finally:
                for sig, h in old.items():
                    signal.signal(sig, h)
            if self._stop.is_set():
                self.stop()
                return 0
        log.info("event=mounting mount=%s revision=%d cache=%s", cfg.mountpoint,
                 self.replica.revision, self.replica.cache_state)
        try:
            self.mount.serve()
        except MountError as exc:
            log.error("event=mount_failed error=%s", exc)
            self.stop()
            return 1
        log.info("event=unmounted mount=%s", cfg.mountpoint)
        self.stop()
        log.info("event=stopped revision=%d", self.replica.revision)
        return 0


def run_agent(cfg: AgentConfig) -> int:
    logging.basicConfig(level=getattr(logging, cfg.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if cfg.mountpoint:
        cfg.mountpoint = os.path.abspath(cfg.mountpoint)
    cfg.cache_dir = os.path.abspath(cfg.cache_dir)
    if cfg.socket_path:
        cfg.socket_path = os.path.abspath(cfg.socket_path)
    # libfuse canonicalises the fsname against the working directory; run from /.
    os.chdir("/")
    try:
        agent = Agent(cfg)
    except (errors.AfsError, OSError) as exc:
        log.error("event=startup_failed error=%s", exc)
        return 1
    try:
        return agent.run()
    except (errors.AfsError, OSError) as exc:     # e.g. the local watch socket cannot be bound
        where = f" (local watch socket {cfg.socket_path})" if cfg.socket_path else ""
        log.error("event=startup_failed error=%s%s", exc, where)
        try:
            agent.stop()
        except Exception:  # noqa: BLE001 - best effort on a failed start
            pass
        return 1
