"""Commands that start long-running processes: ``afs server``, ``afs agent``, ``afs dev-cluster``.

Layering: this is the ONLY CLI module that reaches past ``afs.client``; it imports the daemon
entry points (``afs.server.server.run_server``, ``afs.agent.agent.run_agent``) lazily inside the
commands, so the everyday CLI commands never load server code. See docs/architecture.md.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import click

from afs import errors
from afs.config import AgentConfig, ServerConfig, load


@click.command("server")
@click.option("--name", help="This member's name (must appear in --initial-cluster).")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Where the WAL and snapshots live (created 0700).")
@click.option("--client-addr", help="HOST:PORT for clients, e.g. 127.0.0.1:7001.")
@click.option("--peer-addr", help="HOST:PORT for Raft peers, e.g. 127.0.0.1:7101.")
@click.option("--initial-cluster", help="NAME=PEER_ADDR,... of the founding members (checked on restart).")
@click.option("--http-addr", default=None, help="HOST:PORT serving /health and /metrics.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="TOML config file ([server] table).")
@click.option("--log-level", default=None, help="DEBUG, INFO, WARNING or ERROR.")
@click.option("--unsafe-no-fsync", "no_fsync", is_flag=True, default=None, hidden=True,
              help="Benchmarks only: never fsync (acknowledged writes can be lost).")
def server_cmd(name, data_dir, client_addr, peer_addr, initial_cluster, http_addr, config_file,
               log_level, no_fsync):
    """Run one member of an AFS cluster (Raft + key tree + client API)."""
    overrides = {"name": name, "data_dir": data_dir, "client_addr": client_addr,
                 "peer_addr": peer_addr, "initial_cluster": initial_cluster, "http_addr": http_addr,
                 "log_level": log_level, "fsync": False if no_fsync else None}
    cfg = load(ServerConfig, overrides=overrides, config_file=config_file)
    from afs.server.server import run_server
    sys.exit(run_server(cfg))


@click.command("agent")
@click.option("--endpoints", envvar="AFS_ENDPOINTS", default=None, help="Cluster members' client addresses.")
@click.option("--mount", "mountpoint", default=None, help="Where to mount the read-only tree (e.g. /afs).")
@click.option("--cache-dir", default=None, help="Where the replica cache lives (e.g. /var/lib/afs-agent).")
@click.option("--socket", "socket_path", default=None, help="Local watch socket path.")
@click.option("--http-addr", default=None, help="HOST:PORT serving /health and /metrics.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="TOML config file ([agent] table).")
@click.option("--log-level", default=None)
def agent_cmd(endpoints, mountpoint, cache_dir, socket_path, http_addr, config_file, log_level):
    """Keep a local replica of the tree and mount it read-only through FUSE."""
    overrides = {"endpoints": endpoints, "mountpoint": mountpoint, "cache_dir": cache_dir,
                 "socket_path": socket_path, "http_addr": http_addr, "log_level": log_level}
    cfg = load(AgentConfig, overrides=overrides, config_file=config_file)
    from afs.agent.agent import run_agent
    sys.exit(run_agent(cfg))


# ---------------------------------------------------------------- dev-cluster

def _spawn(args: list[str], log_path: str) -> subprocess.Popen:
    logf = open(log_path, "ab")
    return subprocess.Popen([sys.executable, "-m", "afs_cli.main", *args], stdout=logf,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)


def _stop(procs: list[tuple[str, subprocess.Popen]], timeout: float = 15.0) -> None:
    for _, p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for name, p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            click.echo(f"afs: {name} did not stop in {timeout:.0f}s; killing it", err=True)
            p.kill()
            p.wait()


def _wait_for_leader(endpoints: list[str], timeout: float) -> dict:
    from afs.client import Client
    deadline = time.monotonic() + timeout
    last = None
    with Client(endpoints, timeout=2.0) as c:
        while time.monotonic() < deadline:
            try:
                st = c.status()
                if st.get("leader"):
                    return st
            except errors.AfsError as exc:
                last = exc
            time.sleep(0.2)
    raise errors.Unavailable(f"no leader after {timeout:.0f}s ({last})")


@click.command("dev-cluster")
@click.option("--size", default=3, show_default=True, type=click.IntRange(1, 7), help="Number of members.")
@click.option("--dir", "base_dir", default="afs-dev", show_default=True, type=click.Path(file_okay=False),
              help="Data and logs of every member (reused on the next start: the cluster resumes).")
@click.option("--base-port", default=7000, show_default=True, type=click.IntRange(1024, 60000),
              help="Member i listens on base+i (client), base+100+i (peer), base+200+i (http).")
@click.option("--load", "load_dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="Import this local directory into / once the cluster is up (skipped if / is not empty).")
@click.option("--mount", "mountpoint", default=None, type=click.Path(file_okay=False),
              help="Also start an agent mounting the tree read-only here.")
@click.option("--fresh", is_flag=True, help="Delete --dir first.")
def dev_cluster_cmd(size, base_dir, base_port, load_dir, mountpoint, fresh):
    """Run a local multi-process cluster to try things; Ctrl-C stops it cleanly."""
    import shutil
    if fresh and os.path.isdir(base_dir):
        shutil.rmtree(base_dir)
    os.makedirs(base_dir, exist_ok=True)
    names = [f"n{i}" for i in range(1, size + 1)]
    client = {n: f"127.0.0.1:{base_port + i}" for i, n in enumerate(names, 1)}
    peer = {n: f"127.0.0.1:{base_port + 100 + i}" for i, n in enumerate(names, 1)}
    http = {n: f"127.0.0.1:{base_port + 200 + i}" for i, n in enumerate(names, 1)}
    initial = ",".join(f"{n}={peer[n]}" for n in names)
    endpoints = [client[n] for n in names]
    procs: list[tuple[str, subprocess.Popen]] = []
    stopping = False

    def on_signal(signum, frame):
        nonlocal stopping
        stopping = True

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        click.echo(f"== starting {size} members under {base_dir}/ (logs: {base_dir}/nN/server.log)", err=True)
        for n in names:
            d = os.path.join(base_dir, n)
            os.makedirs(d, exist_ok=True)
            procs.append((n, _spawn(["server", "--name", n, "--data-dir", os.path.join(d, "data"),
                                     "--client-addr", client[n], "--peer-addr", peer[n],
                                     "--initial-cluster", initial, "--http-addr", http[n]],
                                    os.path.join(d, "server.log"))))
        st = _wait_for_leader(endpoints, 30.0)
        click.echo(f"== leader is {st['leader']} (term {st['term']}, revision {st['revision']})", err=True)
        if load_dir:
            _load_examples(endpoints, load_dir)
        if mountpoint:
            os.makedirs(mountpoint, exist_ok=True)
            agent_dir = os.path.join(base_dir, "agent")
            os.makedirs(agent_dir, exist_ok=True)
            procs.append(("agent", _spawn(["agent", "--endpoints", ",".join(endpoints), "--mount", mountpoint,
                                           "--cache-dir", os.path.join(agent_dir, "cache"),
                                           "--socket", os.path.join(agent_dir, "agent.sock")],
                                          os.path.join(agent_dir, "agent.log"))))
            _wait_for_mount(mountpoint, procs[-1][1], 20.0)
        _print_tour(endpoints, mountpoint, base_dir)
        while not stopping:
            time.sleep(0.3)
            for name, p in procs:
                if p.poll() is not None and not stopping:
                    click.echo(f"afs: {name} exited with code {p.returncode} (see its log under {base_dir}/)", err=True)
                    stopping = True
    except errors.AfsError as exc:
        click.echo(f"afs: {exc}", err=True)
        _stop(list(reversed(procs)))
        sys.exit(exc.exit_code)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    click.echo("\n== stopping (unmounting, then members)", err=True)
    _stop(list(reversed(procs)))
    click.echo("== stopped; data kept under " + base_dir, err=True)


def _wait_for_mount(mountpoint: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise errors.Unavailable(f"the agent exited with code {proc.returncode} before mounting")
        if os.path.ismount(mountpoint) and os.path.exists(os.path.join(mountpoint, ".afs", "status")):
            return
        time.sleep(0.1)
    raise errors.Unavailable(f"the agent did not mount {mountpoint} within {timeout:.0f}s")


def _load_examples(endpoints: list[str], load_dir: str) -> None:
    from afs.client import Client
    with Client(endpoints) as c:
        if c.list("/"):
            click.echo("== / is not empty; skipping the example import", err=True)
            return
    rc = subprocess.call([sys.executable, "-m", "afs_cli.main", "import", load_dir, "/",
                          "--endpoints", ",".join(endpoints)], stdin=subprocess.DEVNULL)
    if rc != 0:
        raise errors.AfsError(f"importing {load_dir} failed (exit code {rc})")
    click.echo(f"== imported {load_dir}/ into /", err=True)


def _print_tour(endpoints: list[str], mountpoint: str | None, base_dir: str) -> None:
    ep = ",".join(endpoints)
    lines = [
        "",
        "AFS dev cluster is up. In another shell:",
        f"  export AFS_ENDPOINTS={ep}",
        "  afs cluster status",
        "  afs tree /",
        "  afs get /services/db/primary",
        "  afs put /features/new-checkout true",
        "  afs stat /features/new-checkout -o json",
    ]
    if mountpoint:
        mp = os.path.abspath(mountpoint)
        lines += [f"  cat {mp}/services/db/primary        # a local file read, no network",
                  f"  ls -l {mp}/services",
                  f"  cat {mp}/.afs/status                # replica revision and staleness"]
    lines += ["  afs watch /features -o json          # stream changes (Ctrl-C to stop)",
              "", f"(the afs command is in .venv/bin; data and logs under {base_dir}/; Ctrl-C stops everything)"]
    click.echo("\n".join(lines), err=True)
    sys.stderr.flush()
