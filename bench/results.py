"""Merge one benchmark section into ``bench/results.json``.

Every benchmark (``raft``, ``mount``, ...) owns one top-level section of the file and replaces
only that section; the others are kept as they are. Each section records where its numbers
come from, because these machines are shared and noisy and a figure without its context
(date, machine, Python, commit) cannot be compared with anything::

    {
      "raft": {
        "date": "2026-05-09T10:11:12+00:00",
        "machine": {"hostname": ..., "cpu_count": 2, "cpu_model": ..., ...},
        "python": "3.11.7 (CPython)",
        "git_commit": "38a01f4...",  "git_dirty": true,
        "figures": {...}                      # whatever the benchmark measured
        ...                                   # plus any extra keys the benchmark passes
      },
      "mount": {...}
    }

The file is rewritten atomically (temp file + rename), so an interrupted run never leaves a
half-written results file. A results file that is not a JSON object is an error (we never
silently discard other benchmarks' sections).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PATH = REPO / "bench" / "results.json"

__all__ = ["DEFAULT_PATH", "machine_info", "python_version", "git_info", "section", "record",
           "load"]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or ""


def _mem_total_bytes() -> int | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def machine_info() -> dict[str, Any]:
    """Where the numbers were measured (no secrets: hostname, CPU, memory, kernel)."""
    return {
        "hostname": platform.node(),
        "system": platform.system(),
        "kernel": platform.release(),
        "arch": platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "mem_total_bytes": _mem_total_bytes(),
    }


def python_version() -> str:
    return f"{platform.python_version()} ({platform.python_implementation()})"


def git_info(repo: str | os.PathLike = REPO) -> dict[str, Any]:
    """``{"git_commit": sha or None, "git_dirty": bool or None}``; None when git or the
    repository is unavailable (the benchmark still records its numbers)."""
    def run(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True,
                                 text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout if out.returncode == 0 else None

    sha = run("rev-parse", "HEAD")
    if sha is None:
        return {"git_commit": None, "git_dirty": None}
    status = run("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": sha.strip(), "git_dirty": None if status is None else bool(status.strip())}


def section(figures: dict[str, Any], *, extra: dict[str, Any] | None = None,
            now: _dt.datetime | None = None, repo: str | os.PathLike = REPO) -> dict[str, Any]:
    """Build one section: context (date, machine, python, git) + ``figures`` + ``extra``."""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    out: dict[str, Any] = {
        "date": now.isoformat(timespec="seconds"),
        "machine": machine_info(),
        "python": python_version(),
    }
    out.update(git_info(repo))
    if extra:
        for k in extra:
            if k in out or k == "figures":
                raise ValueError(f"extra key {k!r} collides with a standard section key")
        out.update(extra)
    out["figures"] = figures
    return out


def load(path: str | os.PathLike = DEFAULT_PATH) -> dict[str, Any]:
    """The whole results file; ``{}`` if it does not exist. Raises ValueError if it is not a
    JSON object (so a damaged file is noticed instead of being overwritten)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    if not text.strip():
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{p}: not valid JSON ({exc}); fix or remove it") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected a JSON object of sections, got {type(data).__name__}")
    return data


def record(name: str, figures: dict[str, Any], *, path: str | os.PathLike = DEFAULT_PATH,
           extra: dict[str, Any] | None = None, now: _dt.datetime | None = None,
           repo: str | os.PathLike = REPO) -> dict[str, Any]:
    """Replace section ``name`` of the results file at ``path`` (other sections are kept) and
    return the new section. Atomic: temp file in the same directory, fsync, rename."""
    if not isinstance(name, str) or not name:
        raise ValueError("section name must be a non-empty string")
    p = Path(path)
    data = load(p)
    sec = section(figures, extra=extra, now=now, repo=repo)
    data[name] = sec
    text = json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n"
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=str(p.parent))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return sec


if __name__ == "__main__":  # pragma: no cover - tiny inspection aid
    json.dump(load(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_PATH), sys.stdout, indent=2)
    print()
