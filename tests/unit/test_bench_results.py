"""The benchmark results helper (bench/results.py): merging sections into results.json."""
from __future__ import annotations

import datetime as dt
import json
import os
import subprocess

import pytest

from bench import results

NOW = dt.datetime(2026, 5, 9, 10, 11, 12, tzinfo=dt.timezone.utc)


def test_record_creates_file_with_context_and_figures(tmp_path):
    """A new file gets one section with date, machine, python, git fields and the figures."""
    path = tmp_path / "sub" / "results.json"
    sec = results.record("raft", {"raft.x": {"median_ms": 1.5}}, path=path, now=NOW)
    data = json.loads(path.read_text())
    assert data == {"raft": sec}
    assert sec["date"] == "2026-05-09T10:11:12+00:00"
    assert sec["figures"] == {"raft.x": {"median_ms": 1.5}}
    assert sec["python"].startswith(".".join(map(str, __import__("sys").version_info[:2])))
    assert sec["machine"]["cpu_count"] == os.cpu_count()
    assert {"git_commit", "git_dirty"} <= set(sec)


def test_record_replaces_only_its_own_section(tmp_path):
    """Other benchmarks' sections survive; the same section is replaced, not merged."""
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"mount": {"figures": {"warm_read_us": 3}}}))
    results.record("raft", {"a": 1, "b": 2}, path=path, now=NOW)
    results.record("raft", {"c": 3}, path=path, now=NOW)
    data = json.loads(path.read_text())
    assert data["mount"] == {"figures": {"warm_read_us": 3}}
    assert data["raft"]["figures"] == {"c": 3}


def test_extra_keys_are_added_but_cannot_shadow_context(tmp_path):
    """Extra keys land in the section; a collision with a standard key is refused."""
    path = tmp_path / "results.json"
    sec = results.record("raft", {}, path=path, extra={"mode": "quick"}, now=NOW)
    assert sec["mode"] == "quick"
    for bad in ("date", "figures", "git_commit"):
        with pytest.raises(ValueError):
            results.record("raft", {}, path=path, extra={bad: 1}, now=NOW)
    assert json.loads(path.read_text())["raft"]["mode"] == "quick"


@pytest.mark.parametrize("content", ["{not json", "[1, 2]"])
def test_damaged_file_is_an_error_and_is_left_alone(tmp_path, content):
    """A results file that is not a JSON object is reported, never silently overwritten."""
    path = tmp_path / "results.json"
    path.write_text(content)
    with pytest.raises(ValueError):
        results.record("raft", {"x": 1}, path=path, now=NOW)
    assert path.read_text() == content


def test_empty_or_missing_file_loads_as_empty(tmp_path):
    """load() of a missing or blank file is {}."""
    assert results.load(tmp_path / "nope.json") == {}
    (tmp_path / "blank.json").write_text("  \n")
    assert results.load(tmp_path / "blank.json") == {}


def test_nan_is_refused_and_no_temp_file_is_left(tmp_path):
    """Figures must be real JSON (NaN is not); a failed write leaves no temp file behind."""
    path = tmp_path / "results.json"
    with pytest.raises(ValueError):
        results.record("raft", {"x": float("nan")}, path=path, now=NOW)
    assert os.listdir(tmp_path) == []


def test_empty_section_name_is_refused(tmp_path):
    with pytest.raises(ValueError):
        results.record("", {}, path=tmp_path / "r.json", now=NOW)


def test_git_info_outside_a_repository_is_none(tmp_path):
    """Without a git repository the commit is recorded as None, not an error."""
    assert results.git_info(tmp_path) == {"git_commit": None, "git_dirty": None}


def test_git_info_reports_commit_and_dirty_state(tmp_path):
    """In a repository: HEAD's sha, and dirty once a tracked file changes."""
    def git(*a):
        subprocess.run(["git", "-C", str(tmp_path), *a], check=True, capture_output=True)
    try:
        git("init", "-q")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("git unavailable")
    (tmp_path / "f").write_text("1")
    git("add", "f")
    git("-c", "user.name=t", "-c", "user.email=t@example.invalid", "commit", "-qm", "c")
    sha = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True,
                         text=True, check=True).stdout.strip()
    assert results.git_info(tmp_path) == {"git_commit": sha, "git_dirty": False}
    (tmp_path / "f").write_text("2")
    assert results.git_info(tmp_path) == {"git_commit": sha, "git_dirty": True}
