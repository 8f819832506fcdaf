"""The benchmark harness's own logic: percentiles, ratios, targets, table rendering, the JSON
merge of results sections. (Not the benchmark itself: nothing here starts a cluster.)"""
from __future__ import annotations

import datetime as dt
import json

import pytest

from bench import report, results
from bench.stats import best, fmt_ratio, fmt_value, percentile, ratio, summarize


# ---------------------------------------------------------------- percentiles

def test_percentile_nearest_rank_returns_a_real_sample():
    """p99 of 1..100 is 99 and p50 is 50: nearest rank, no interpolation."""
    vals = list(range(1, 101))
    assert percentile(vals, 99) == 99
    assert percentile(vals, 50) == 50
    assert percentile(vals, 100) == 100
    assert percentile(vals, 0) == 1


def test_percentile_ignores_input_order_and_small_samples():
    """Unsorted input is sorted; with 3 samples p99 is the largest."""
    assert percentile([3.0, 1.0, 2.0], 99) == 3.0
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([7.0], 99) == 7.0


def test_percentile_rejects_empty_and_bad_q():
    """An empty sample or q outside [0, 100] is an error, not a made-up number."""
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_summarize_scales_and_names_units():
    """Seconds scaled to ms give median/p99/mean/min/max keys with the unit suffix."""
    s = summarize([0.001, 0.002, 0.003, 0.004], 1e3, "ms")
    assert s["n"] == 4
    assert s["median_ms"] == 2.0
    assert s["p99_ms"] == 4.0
    assert s["min_ms"] == 1.0 and s["max_ms"] == 4.0
    assert s["mean_ms"] == 2.5


# ---------------------------------------------------------------- ratios

def test_ratio_and_best_handle_missing_values():
    """Missing or zero references give None; best skips None and knows the direction."""
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(None, 2.0) is None
    assert ratio(1.0, 0) is None
    assert best([3.0, None, 2.0]) == 2.0
    assert best([3.0, None, 2.0], higher_is_better=True) == 3.0
    assert best([None, None]) is None


def test_formatting():
    """Figures keep 3 significant digits; ratios get an x; missing values are explicit."""
    assert fmt_value(1.234, "µs") == "1.23 µs"
    assert fmt_value(45.67, "ms") == "45.7 ms"
    assert fmt_value(12345.0, "/s") == "12,345 /s"
    assert fmt_value(None) == "n/a"
    assert fmt_ratio(0.25) == "0.25x"
    assert fmt_ratio(250.0) == "250x"
    assert fmt_ratio(None) == "-"


# ---------------------------------------------------------------- targets

def _figures(**over):
    f = {
        "read": {"tmpfs": {"median_us": 2.0, "p99_us": 3.0, "median_batch_us": 1.0},
                 "afs_mount": {"median_us": 2.5, "p99_us": 4.0, "median_batch_us": 1.4},
                 "etcd_get_serializable": {"median_us": 300.0, "p99_us": 900.0},
                 "zookeeper_get": {"median_us": 200.0, "p99_us": 800.0}},
        "seq_write": {"afs": {"median_ms": 2.0, "p99_ms": 9.0},
                      "etcd": {"median_ms": 1.5, "p99_ms": 5.0},
                      "zookeeper": {"median_ms": 3.0, "p99_ms": 20.0}},
        "throughput": {"afs": {"writes_per_s": 1500.0, "errors": 0, "seconds": 10.0},
                       "etcd": {"writes_per_s": 1200.0, "errors": 0, "seconds": 10.0},
                       "zookeeper": {"writes_per_s": 1000.0, "errors": 0, "seconds": 10.0}},
        "propagation": {"afs_mount": {"median_ms": 1.0, "p99_ms": 6.0},
                        "etcd_watch": {"median_ms": 0.5, "p99_ms": 5.0},
                        "zookeeper_watch_get": {"median_ms": 1.5, "p99_ms": 7.0}},
    }
    for k, v in over.items():
        f[k] = v
    return f


def _targets(figures):
    return {t["name"]: t for t in report.evaluate_peers({"figures": figures})["targets"]}


def test_targets_use_same_run_ratios():
    """Each target is judged on a ratio of figures from the same run, in the right direction."""
    t = _targets(_figures())
    assert t["mount_read_vs_tmpfs"]["value"] == pytest.approx(1.4)      # batched medians
    assert t["mount_read_vs_tmpfs"]["met"] is True
    assert t["mount_read_vs_fastest_peer"]["value"] == pytest.approx(200 / 1.4)
    assert t["mount_read_vs_fastest_peer"]["met"] is True
    assert t["write_throughput_32"]["value"] == pytest.approx(1.25)
    assert t["write_throughput_32"]["met"] is True
    assert t["seq_write_median"]["value"] == pytest.approx(2.0 / 1.5, abs=1e-3)
    assert t["seq_write_median"]["met"] is False                         # 1.33 > 1.2
    assert t["propagation_p99"]["value"] == pytest.approx(6.0 / 5.0, abs=1e-3)
    assert t["propagation_p99"]["met"] is False


def test_target_with_missing_inputs_is_not_met():
    """A target whose figures are missing is N/A (None), never MET."""
    f = _figures()
    del f["throughput"]["etcd"], f["throughput"]["zookeeper"]
    t = _targets(f)
    assert t["write_throughput_32"]["met"] is None
    assert report.verdict(None) == "N/A"


def test_per_call_median_used_when_no_batch_figure():
    """Without a batched figure the per-call medians are compared."""
    f = _figures()
    for k in ("tmpfs", "afs_mount"):
        del f["read"][k]["median_batch_us"]
    assert _targets(f)["mount_read_vs_tmpfs"]["value"] == pytest.approx(1.25)


# ---------------------------------------------------------------- rendering

def test_peers_tables_show_every_figure_ratio_and_verdict():
    """The markdown has each workload's table, ratios to the best peer and to tmpfs, and a
    MET/MISSED line per target; a missed figure stays in with its value."""
    sec = {"figures": _figures(fanout={"afs": {"skipped": "no watch API"},
                                       "etcd": {"watchers": 100, "median_ms": 3.0, "p99_ms": 9.0,
                                                "method": "watch"}})}
    md = "\n".join(report.peers_tables(sec))
    assert "### 1. Read of a 1 KiB value" in md
    assert "| AFS mount open+read+close (warm) | 2.50 µs | 4.00 µs | 1.40 µs | 0.01x | 1.25x |" in md
    assert "1.33x" in md                       # AFS seq write vs best peer (etcd)
    assert "1,500 /s" in md
    assert "MISSED" in md and "MET" in md
    assert "skipped: no watch API" in md
    lines = [l for l in md.splitlines() if l.startswith("| AFS sequential write")]
    assert lines and lines[0].endswith("| MISSED |")


def test_render_markdown_includes_other_sections():
    """Sections written by other benchmarks appear with their numeric figures and targets."""
    res = {"peers": {"date": "d", "figures": _figures(), "versions": {"etcd": "3.4"}, "machine": {}},
           "mount": {"date": "d2", "figures": {"warm_read_us": {"tmpfs": 1.0, "afs": 1.2, "ratio": 1.2,
                                                                "target_ratio": 1.5}}},
           "raft": {"date": "d3", "figures": {"raft.seq": {"median_ms": 2.0, "met": False,
                                                           "target": "median<=1ms"}}}}
    md = report.render_markdown(res)
    assert md.startswith("# Benchmarks")
    assert "## mount" in md and "warm_read_us.afs" in md
    assert "| warm_read_us | <= 1.5x | 1.20x | MET |" in md
    assert "| raft.seq | median<=1ms |  | MISSED |" in md
    assert "etcd 3.4" in md


def test_peers_lines_list_targets():
    lines = report.peers_lines({"figures": _figures()})
    assert any(l.startswith("target seq_write_median:") and l.endswith("MISSED") for l in lines)
    assert any(l.startswith("read.afs_mount median=2.5us") for l in lines)


# ---------------------------------------------------------------- JSON merge

def test_record_replaces_only_its_section(tmp_path):
    """Recording a section keeps the others and stamps date, machine and versions."""
    p = tmp_path / "results.json"
    p.write_text(json.dumps({"raft": {"figures": {"x": 1}}}))
    now = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    sec = results.record("peers", {"read": {}}, path=p, extra={"versions": {"etcd": "3.4"}},
                         now=now, repo=tmp_path)
    data = json.loads(p.read_text())
    assert data["raft"] == {"figures": {"x": 1}}
    assert data["peers"]["date"] == "2026-01-02T03:04:05+00:00"
    assert data["peers"]["versions"] == {"etcd": "3.4"}
    assert data["peers"]["figures"] == {"read": {}}
    assert "machine" in data["peers"] and sec["git_commit"] is None   # tmp_path is no repo
    results.record("peers", {"read": {"a": 1}}, path=p, now=now, repo=tmp_path)
    data = json.loads(p.read_text())
    assert data["peers"]["figures"] == {"read": {"a": 1}} and "raft" in data


def test_record_refuses_a_damaged_file(tmp_path):
    """A results file that is not a JSON object is an error, not silently replaced."""
    p = tmp_path / "results.json"
    p.write_text("[1, 2]")
    with pytest.raises(ValueError):
        results.record("peers", {}, path=p)
    assert p.read_text() == "[1, 2]"
