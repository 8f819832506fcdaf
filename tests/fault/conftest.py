"""Fixtures for the Jepsen-style fault suite (afs.testing.chaos).

Every run is a SUBPROCESS (``python -m afs.testing.chaos``) with a hard timeout, so a hung
cluster can never hang pytest; the harness itself kills only the PIDs it started and deletes
the namespaces, veths, bridge and iptables rules it created (also on failure).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _skip_reason() -> str | None:
    if sys.platform != "linux":
        return "Linux only"
    if os.geteuid() != 0:
        return "fault tests run as root (network namespaces, iptables, FUSE)"
    return None


@pytest.fixture
def chaos(tmp_path):
    """``chaos(*args, timeout=...)`` -> (exit code, report dict, final line, stderr)."""
    why = _skip_reason()
    if why:
        pytest.skip(why)

    def run(*args: str, timeout: float = 240.0):
        report = tmp_path / f"report-{len(list(tmp_path.iterdir()))}.json"
        argv = [sys.executable, "-m", "afs.testing.chaos", "--report", str(report), *args]
        p = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            # SIGTERM first: the harness then stops its servers and deletes its namespaces
            p.terminate()
            try:
                p.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.communicate()
            raise
        lines = out.strip().splitlines()
        final = lines[-1] if lines else ""
        rep = json.loads(report.read_text()) if report.exists() else {}
        if rep.get("workdir") and os.path.isdir(rep["workdir"]):
            import shutil
            shutil.rmtree(rep["workdir"], ignore_errors=True)
        return p.returncode, rep, final, err[-6000:]

    return run
