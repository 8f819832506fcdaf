"""The Jepsen-style fault suite and its negative controls (DESIGN.md §10: a check that cannot
fail is a defect). Each negative control starts the servers with one TEST-ONLY break
(``AFS_TEST_BREAK``, read only in afs/server/server.py) or without fsync, and asserts that the
suite reports the violation it must catch."""
from __future__ import annotations

import os

import pytest

from afs.testing import checker
from afs.testing.linearizability import FAIL, INFO, OK, Op

SEED = os.environ.get("AFS_CHAOS_SEED", "20240601")


def _fields(line: str) -> dict:
    return {k: int(v) for k, v in (kv.split("=") for kv in line.split())}


# ------------------------------------------------------------------ the suite

@pytest.mark.fault
def test_quick_profile_finds_no_violation(chaos):
    """Random faults (kill -9, pauses, partitions, restarts, agent kill) under concurrent
    register, list-append, watch and mount workloads: nothing lost, duplicated or
    non-linearizable, watches complete, mount monotonic, members identical."""
    rc, rep, line, err = chaos("--profile", "quick", "--seed", SEED, timeout=300)
    f = _fields(line)
    assert rc == 0, f"{line}\n{err}"
    assert f["ops"] > 500 and f["faults"] >= 5, line
    assert rep["checks"]["watches"]["events"] > 0
    if rep["checks"]["mount"] is not None:
        assert rep["checks"]["mount"]["samples"] > 0


@pytest.mark.fault
def test_power_loss_with_fsync_loses_nothing(chaos):
    """A power cut of every member (unsynced bytes dropped) loses no acknowledged write."""
    rc, rep, line, err = chaos("--seed", SEED, "--duration", "8", "--faults", "power_loss",
                               "--sync-tracker", "--no-mount")
    assert rc == 0, f"{line}\n{err}"
    assert _fields(line)["faults"] >= 1


# ------------------------------------------------------------------ negative controls

@pytest.mark.fault
def test_negative_power_loss_without_fsync_is_caught(chaos):
    """--unsafe-no-fsync + power cut: the lost-write check must fire."""
    rc, rep, line, err = chaos("--seed", SEED, "--duration", "8", "--faults", "power_loss",
                               "--sync-tracker", "--no-fsync", "--no-mount")
    assert rc == 1, f"{line}\n{err}"
    assert _fields(line)["lost"] > 0, line


@pytest.mark.fault
def test_negative_ack_before_quorum_is_caught(chaos):
    """A leader that acknowledges before a majority has the entry, then is isolated."""
    rc, rep, line, err = chaos("--seed", SEED, "--duration", "10", "--faults", "partition_leader",
                               "--break", "ack_before_quorum", "--no-mount")
    f = _fields(line)
    assert rc == 1, f"{line}\n{err}"
    assert f["lost"] + f["linearizability_violations"] + f["state_divergence"] > 0, line


@pytest.mark.fault
def test_negative_dropped_watch_event_is_caught(chaos):
    """A server that silently skips watch events: the watch-completeness check must fire."""
    rc, rep, line, err = chaos("--seed", SEED, "--duration", "3", "--faults", "none",
                               "--break", "drop_watch_event", "--no-mount")
    assert rc == 1, f"{line}\n{err}"
    assert _fields(line)["watch_gaps"] > 0, line


@pytest.mark.fault
def test_negative_stale_read_is_caught(chaos):
    """Members that answer 'linearizable' reads from local state: under partitions the
    linearizability checker must fire."""
    rc, rep, line, err = chaos("--seed", SEED, "--duration", "10", "--faults",
                               "partition_split,partition_leader", "--break", "stale_read",
                               "--no-mount")
    assert rc == 1, f"{line}\n{err}"
    assert _fields(line)["linearizability_violations"] > 0, line


# ------------------------------------------------------------------ the checkers themselves

def test_list_checker_finds_lost_duplicate_and_reordered():
    """Lost acked appends, duplicates and real-time reordering are each reported."""
    appends = [{"key": "l", "elem": "a", "invoke": 0, "complete": 1, "status": OK},
               {"key": "l", "elem": "b", "invoke": 2, "complete": 3, "status": OK},
               {"key": "l", "elem": "c", "invoke": 4, "complete": 5, "status": OK}]
    out = checker.check_lists(appends, [], {"l": ["b", "a", "a"]})
    assert out["lost"] == 1 and out["duplicated"] == 1 and out["reordered"] == 1


def test_list_checker_accepts_indeterminate_appends():
    """An append that timed out may or may not be present."""
    appends = [{"key": "l", "elem": "a", "invoke": 0, "complete": None, "status": INFO},
               {"key": "l", "elem": "b", "invoke": 2, "complete": 3, "status": OK}]
    out = checker.check_lists(appends, [{"key": "l", "value": ["a"], "invoke": 1, "complete": 1.5}],
                              {"l": ["a", "b"]})
    assert sum(v for k, v in out.items() if k not in ("appends", "reads")) == 0


def test_register_checker_flags_stale_read():
    """A read after an acknowledged write that returns the old value is not linearizable."""
    h = [Op(1, "write", "k", "x", None, 0, 1, OK), Op(2, "read", "k", None, "0", 2, 3, OK),
         Op(3, "write", "k", "y", None, 0, None, INFO), Op(4, "write", "k", "z", None, 5, 6, FAIL)]
    assert checker.check_registers(h, initial="0")["violations"] == 1


def test_watch_checker_flags_gap_duplicate_and_mismatch():
    """Gaps, duplicates and events that differ from the committed history are reported."""
    hist = {r: [("updated", "/k", str(r).encode())] for r in range(1, 6)}
    w = {"name": "w", "start": 1, "frames": [(1, hist[1]), (2, hist[2]), (2, hist[2]), (4, hist[4]),
                                             (5, [("updated", "/k", b"bad")])]}
    out = checker.check_watches([w], hist, 1)
    assert out["gaps"] == 1 and out["duplicates"] == 1 and out["mismatches"] == 1


def test_mount_and_state_checkers():
    """A mount going back in revision and members that disagree are reported."""
    assert checker.check_mount([(0, 1, 5), (1, 1, 6), (2, 2, 4)])["regressions"] == 1
    st = checker.check_states({"a": {"revision": 3, "hash": "x"}, "b": {"revision": 3, "hash": "y"}})
    assert st["divergent"] == 1
