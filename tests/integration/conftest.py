"""Fixtures for tests against real ``afs server`` processes on 127.0.0.1.

- ``make_cluster(**kw)``: a started :class:`afs.testing.cluster.ProcessCluster` (with a leader)
  in a fresh directory under the test's tmp_path; always stopped in teardown.
- ``shared_cluster``: one 3-member cluster per module, for tests that only read and write
  (each test uses its own subtree, so they stay independent).
- ``afs_cli``: run the real ``afs`` console script in a subprocess against a cluster.
- On a failing test, the tail of every member log of the clusters it used is attached to the
  report (section "cluster logs").
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass

import pytest

from afs.testing.cluster import ProcessCluster

_ACTIVE: list[ProcessCluster] = []     # clusters of the running test / module, for failure logs


def afs_command() -> list[str]:
    """The installed ``afs`` console script next to this interpreter, else ``python -m``."""
    script = os.path.join(os.path.dirname(sys.executable), "afs")
    if os.path.exists(script):
        return [script]
    found = shutil.which("afs")
    return [found] if found else [sys.executable, "-m", "afs_cli.main"]


@dataclass
class CliResult:
    code: int
    out: bytes
    err: str

    @property
    def text(self) -> str:
        return self.out.decode("utf-8", "replace")

    def json(self):
        return json.loads(self.out)

    def __repr__(self) -> str:   # readable assertion failures
        return f"CliResult(code={self.code}, out={self.out[:500]!r}, err={self.err[:500]!r})"


class AfsCli:
    """Runs ``afs ARGS`` with ``AFS_ENDPOINTS`` set to a cluster's endpoints."""

    def __init__(self, endpoints: list[str]):
        self.endpoints = endpoints
        self.cmd = afs_command()

    def __call__(self, *args, input: bytes | str | None = None, endpoints: list[str] | None = None,
                 timeout: float = 60.0, env: dict | None = None) -> CliResult:
        e = dict(os.environ)
        e.pop("AFS_CONFIG", None)
        e["AFS_ENDPOINTS"] = ",".join(endpoints or self.endpoints)
        e.setdefault("AFS_TIMEOUT", "10")
        e.update(env or {})
        if isinstance(input, str):
            input = input.encode()
        p = subprocess.run([*self.cmd, *map(str, args)], input=input if input is not None else b"",
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=e, timeout=timeout)
        return CliResult(p.returncode, p.stdout, p.stderr.decode("utf-8", "replace"))


def _start(base_dir, **kw) -> ProcessCluster:
    cl = ProcessCluster(base_dir, **kw)
    _ACTIVE.append(cl)
    try:
        cl.start()
        cl.wait_for_leader(30)
    except BaseException:
        cl.stop_all()
        raise
    return cl


@pytest.fixture
def make_cluster(tmp_path):
    made: list[ProcessCluster] = []

    def make(name: str = "cluster", **kw) -> ProcessCluster:
        cl = _start(tmp_path / f"{name}{len(made)}", **kw)
        made.append(cl)
        return cl

    yield make
    for cl in made:
        cl.stop_all()
        _ACTIVE.remove(cl)


@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory):
    cl = _start(tmp_path_factory.mktemp("shared"))
    yield cl
    cl.stop_all()
    _ACTIVE.remove(cl)


@pytest.fixture
def cluster(make_cluster) -> ProcessCluster:
    """A fresh 3-member cluster with a leader, for tests that kill or restart members."""
    return make_cluster()


@pytest.fixture(scope="module")
def afs_cli(shared_cluster) -> AfsCli:
    return AfsCli(shared_cluster.endpoints)


@pytest.fixture
def cli_for():
    """``cli_for(cluster)`` -> an :class:`AfsCli` bound to that cluster's endpoints."""
    return lambda cl: AfsCli(cl.endpoints)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed and _ACTIVE:
        rep.sections.append(("cluster logs", "\n".join(cl.tail_logs(30) for cl in _ACTIVE)))
