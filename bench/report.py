"""Targets and tables of the benchmark results (pure functions over the results dict; unit
tested). ``render_markdown(results)`` produces docs/benchmarks.md from bench/results.json.

Targets of the side-by-side section (``peers``), each judged on ratios measured in one run:
  - mount read <= 1.5x tmpfs (median);
  - mount read >= 100x faster than the fastest peer read (median);
  - write throughput with 32 clients >= the best of etcd and ZooKeeper;
  - sequential write median <= 1.2x the best peer;
  - propagation p99 <= the best peer's watch latency p99.
A target whose inputs are missing is reported as N/A, never as met.
"""
from __future__ import annotations

from typing import Any

from bench.stats import best, fmt_ratio, fmt_value, ratio

PEER_READS = ("etcd_get_linearizable", "etcd_get_serializable", "zookeeper_get", "zookeeper_sync_get")
PEER_SYSTEMS = ("etcd", "zookeeper")
PEER_PROP = ("etcd_watch", "zookeeper_watch_get")

READ_LABELS = {
    "tmpfs": "tmpfs open+read+close (physical limit)",
    "afs_mount": "AFS mount open+read+close (warm)",
    "afs_get_stale": "AFS get --stale (client, leader)",
    "afs_get_linearizable": "AFS get (linearizable, ReadIndex)",
    "etcd_get_serializable": "etcd range, serializable",
    "etcd_get_linearizable": "etcd range, linearizable",
    "zookeeper_get": "ZooKeeper get (server-local)",
    "zookeeper_sync_get": "ZooKeeper sync + get",
}
PROP_LABELS = {
    "afs_mount": "AFS: file on another host's mount",
    "etcd_watch": "etcd: watch on a follower",
    "zookeeper_watch_get": "ZooKeeper: watch + get on a follower",
}


def _get(d: dict | None, *keys, default=None):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def verdict(met: bool | None) -> str:
    return "N/A" if met is None else ("MET" if met else "MISSED")


def _target(name: str, what: str, value: float | None, threshold: float, higher_is_better: bool,
            unit: str = "x") -> dict:
    met = None if value is None else (value >= threshold if higher_is_better else value <= threshold)
    return {"name": name, "what": what, "value": None if value is None else round(value, 4),
            "threshold": threshold, "comparison": ">=" if higher_is_better else "<=",
            "unit": unit, "met": met}


def evaluate_peers(section: dict) -> dict:
    """``{"targets": [...]}`` for a ``peers`` section (figures + extras)."""
    f = section.get("figures") or {}
    reads = f.get("read") or {}
    # local reads: the batch figure (no per-call timer overhead) when present
    mount = _get(reads, "afs_mount", "median_batch_us") or _get(reads, "afs_mount", "median_us")
    tmpfs = _get(reads, "tmpfs", "median_batch_us") or _get(reads, "tmpfs", "median_us")
    fastest_peer_read = best(_get(reads, k, "median_us") for k in PEER_READS)
    tp = f.get("throughput") or {}
    best_tp = best((_get(tp, s, "writes_per_s") for s in PEER_SYSTEMS), higher_is_better=True)
    sw = f.get("seq_write") or {}
    best_sw = best(_get(sw, s, "median_ms") for s in PEER_SYSTEMS)
    prop = f.get("propagation") or {}
    best_prop = best(_get(prop, k, "p99_ms") for k in PEER_PROP)

    speedup = ratio(fastest_peer_read, mount)
    targets = [
        _target("mount_read_vs_tmpfs", "mount read median / tmpfs read median",
                ratio(mount, tmpfs), 1.5, False),
        _target("mount_read_vs_fastest_peer", "fastest peer read median / mount read median",
                speedup, 100.0, True),
        _target("write_throughput_32", "AFS writes/s / best peer writes/s (32 clients)",
                ratio(_get(tp, "afs", "writes_per_s"), best_tp), 1.0, True),
        _target("seq_write_median", "AFS sequential write median / best peer median",
                ratio(_get(sw, "afs", "median_ms"), best_sw), 1.2, False),
        _target("propagation_p99", "AFS propagation p99 / best peer watch p99",
                ratio(_get(prop, "afs_mount", "p99_ms"), best_prop), 1.0, False),
    ]
    return {"targets": targets}


# ---------------------------------------------------------------- tables

def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        out.append("| " + " | ".join(str(c) for c in r) + " |")
    return out


def peers_tables(section: dict) -> list[str]:
    """Markdown for the ``peers`` section: one table per workload and the targets."""
    f = section.get("figures") or {}
    lines: list[str] = []
    reads = f.get("read") or {}
    tmpfs = _get(reads, "tmpfs", "median_us")
    fastest = best(_get(reads, k, "median_us") for k in PEER_READS)
    if reads:
        rows = []
        for k in ("tmpfs", "afs_mount", "afs_get_stale", "afs_get_linearizable", *PEER_READS):
            if k not in reads:
                continue
            med, p99 = _get(reads, k, "median_us"), _get(reads, k, "p99_us")
            batch = _get(reads, k, "median_batch_us")
            rows.append([READ_LABELS.get(k, k), fmt_value(med, "µs"), fmt_value(p99, "µs"),
                         fmt_value(batch, "µs") if batch is not None else "-",
                         fmt_ratio(ratio(med, fastest)), fmt_ratio(ratio(med, tmpfs))])
        lines += ["### 1. Read of a 1 KiB value, one client", "",
                  *md_table(["what", "median", "p99", "median, batched (no timer overhead)",
                             "median vs fastest peer read", "median vs tmpfs"], rows), "",
                  "Per-call medians include ~0.1–0.3 µs of timer overhead per call; the "
                  "mount-read targets use the batched medians of the local reads.", ""]
    sw = f.get("seq_write") or {}
    if sw:
        bp = best(_get(sw, s, "median_ms") for s in PEER_SYSTEMS)
        rows = [[s, fmt_value(_get(sw, s, "median_ms"), "ms"), fmt_value(_get(sw, s, "p99_ms"), "ms"),
                 fmt_ratio(ratio(_get(sw, s, "median_ms"), bp))]
                for s in ("afs", *PEER_SYSTEMS) if s in sw]
        lines += ["### 2. Sequential writes of 100-byte values, one client", "",
                  *md_table(["system", "median", "p99", "median vs best peer"], rows), ""]
    tp = f.get("throughput") or {}
    if tp:
        bp = best((_get(tp, s, "writes_per_s") for s in PEER_SYSTEMS), higher_is_better=True)
        rows = [[s, fmt_value(_get(tp, s, "writes_per_s"), "/s"),
                 fmt_value(_get(tp, s, "lat_median_ms"), "ms"), fmt_value(_get(tp, s, "lat_p99_ms"), "ms"),
                 str(_get(tp, s, "errors", default="-")),
                 fmt_ratio(ratio(_get(tp, s, "writes_per_s"), bp))]
                for s in ("afs", *PEER_SYSTEMS) if s in tp]
        secs = next((_get(tp, s, "seconds") for s in tp), None)
        lines += [f"### 3. Write throughput, 32 concurrent clients ({fmt_value(secs, 's')})", "",
                  *md_table(["system", "writes/s", "latency median", "latency p99", "errors",
                             "vs best peer"], rows), ""]
    prop = f.get("propagation") or {}
    if prop:
        bp = best(_get(prop, k, "p99_ms") for k in PEER_PROP)
        rows = [[PROP_LABELS.get(k, k), fmt_value(_get(prop, k, "median_ms"), "ms"),
                 fmt_value(_get(prop, k, "p99_ms"), "ms"),
                 fmt_value(_get(prop, k, "issue_to_seen_median_ms"), "ms"),
                 fmt_ratio(ratio(_get(prop, k, "p99_ms"), bp))]
                for k in ("afs_mount", *PEER_PROP) if k in prop]
        lines += ["### 4. Change propagation: write acknowledged → visible on another host", "",
                  *md_table(["path", "median", "p99", "issue→seen median", "p99 vs best peer"], rows), ""]
    fan = f.get("fanout") or {}
    if fan:
        bp = best(_get(fan, s, "p99_ms") for s in PEER_SYSTEMS)
        rows = []
        for s in ("afs", *PEER_SYSTEMS):
            if s not in fan:
                continue
            if "skipped" in fan[s]:
                rows.append([s, "-", "-", "-", "-", "skipped: " + str(fan[s]["skipped"])])
                continue
            rows.append([s, str(_get(fan, s, "watchers")), fmt_value(_get(fan, s, "median_ms"), "ms"),
                         fmt_value(_get(fan, s, "p99_ms"), "ms"),
                         fmt_ratio(ratio(_get(fan, s, "p99_ms"), bp)), str(_get(fan, s, "method", default=""))])
        lines += ["### 5. Fan-out: watchers seeing one write (ack → each watcher)", "",
                  *md_table(["system", "watchers", "median", "p99", "p99 vs best peer", "how"], rows), ""]
    sc = _get(f, "scale", "afs")
    if sc:
        rs = sc.get("restart_to_serving_s") or {}
        rows = [["nodes / stored bytes", f"{sc.get('nodes'):,} / {sc.get('stored_bytes'):,} B"],
                ["snapshot size", f"{fmt_value(sc.get('snapshot_bytes'), 'B')} "
                                  f"({fmt_value(sc.get('snapshot_bytes_per_node'), 'B')}/node)"],
                ["restart to serving (SIGTERM / SIGKILL)",
                 f"{fmt_value(rs.get('sigterm'), 's')} / {fmt_value(rs.get('sigkill'), 's')}"],
                ["leader RSS per stored byte (total / growth)",
                 f"{fmt_value(sc.get('leader_rss_per_stored_byte'))} / "
                 f"{fmt_value(sc.get('leader_rss_growth_per_stored_byte'))}"],
                ["agent RSS per stored byte", fmt_value(sc.get("agent_rss_per_stored_byte"))],
                ["agent initial sync", fmt_value(sc.get("agent_initial_sync_s"), "s")],
                ["load time (txns of 250 ops)", fmt_value(sc.get("load_seconds"), "s")]]
        lines += [f"### 6. Scale: AFS with a {sc.get('nodes'):,}-node tree", "",
                  *md_table(["figure", "value"], rows), ""]
    targets = section.get("targets") or evaluate_peers(section)["targets"]
    rows = [[t["what"], f"{t['comparison']} {t['threshold']:g}{t['unit']}",
             fmt_ratio(t["value"]) if t["value"] is not None else "n/a", verdict(t["met"])]
            for t in targets]
    lines += ["### Targets", "", *md_table(["target", "threshold", "measured", "verdict"], rows), ""]
    return lines


def peers_lines(section: dict) -> list[str]:
    """Console summary: one line per figure and per target."""
    f = section.get("figures") or {}
    out = []
    for k, v in (f.get("read") or {}).items():
        out.append(f"read.{k} median={v['median_us']}us p99={v['p99_us']}us")
    for k, v in (f.get("seq_write") or {}).items():
        out.append(f"seq_write.{k} median={v['median_ms']}ms p99={v['p99_ms']}ms")
    for k, v in (f.get("throughput") or {}).items():
        out.append(f"throughput.{k} writes/s={v['writes_per_s']} errors={v['errors']}")
    for k, v in (f.get("propagation") or {}).items():
        out.append(f"propagation.{k} median={v['median_ms']}ms p99={v['p99_ms']}ms "
                   f"(seen_before_ack={v.get('seen_before_ack')})")
    for k, v in (f.get("fanout") or {}).items():
        if "skipped" in v:
            out.append(f"fanout.{k} skipped: {v['skipped']}")
        else:
            out.append(f"fanout.{k} watchers={v['watchers']} median={v['median_ms']}ms p99={v['p99_ms']}ms")
    for k, v in (f.get("scale") or {}).items():
        out.append(f"scale.{k} " + " ".join(f"{a}={b}" for a, b in v.items() if not isinstance(b, dict)))
    targets = section.get("targets") or evaluate_peers(section)["targets"]
    for t in targets:
        val = "n/a" if t["value"] is None else f"{t['value']:.3g}"
        out.append(f"target {t['name']}: {val} {t['comparison']} {t['threshold']:g} {verdict(t['met'])}")
    return out


# ---------------------------------------------------------------- other sections

def _flatten(d: Any, prefix: str = "", depth: int = 0, max_depth: int = 3):
    if isinstance(d, dict) and depth < max_depth:
        for k, v in d.items():
            yield from _flatten(v, f"{prefix}.{k}" if prefix else str(k), depth + 1, max_depth)
    elif isinstance(d, (int, float)) and not isinstance(d, bool):
        yield prefix, d
    elif isinstance(d, bool):
        yield prefix, d


def generic_tables(name: str, section: dict) -> list[str]:
    """Figures of a section written by another benchmark: numeric leaves, and targets where the
    figure carries ``met`` (or ``ratio`` with ``target_ratio``)."""
    figs = section.get("figures") or {}
    rows = []
    targets = []
    for key, fig in figs.items():
        if isinstance(fig, dict):
            met = fig.get("met")
            if met is None and isinstance(fig.get("ratio"), (int, float)) and \
                    isinstance(fig.get("target_ratio"), (int, float)):
                met = fig["ratio"] <= fig["target_ratio"]
                targets.append([key, f"<= {fig['target_ratio']:g}x", fmt_ratio(fig["ratio"]), verdict(met)])
            elif isinstance(met, bool):
                targets.append([key, str(fig.get("target", "")), "", verdict(met)])
        for k, v in _flatten(fig, key, 1):
            if isinstance(v, bool) or k.endswith(".met") or k.split(".")[1:2] == ["config"] \
                    or k.startswith("config."):
                continue
            rows.append([k, fmt_value(v)])
    out = []
    if rows:
        out += md_table(["figure", "value"], rows[:60]) + [""]
    if targets:
        out += ["Targets:", ""] + md_table(["figure", "target", "measured", "verdict"], targets) + [""]
    return out


def render_markdown(results: dict) -> str:
    """docs/benchmarks.md from the whole results file."""
    lines = ["# Benchmarks", "",
             "Generated by `make bench` (`python -m bench.run`; `make bench QUICK=1` for a smoke run) "
             "from `bench/results.json` — do not edit by hand. These machines are shared and noisy: "
             "compare the ratios measured in the same run, not absolute times across runs.", ""]
    peers = results.get("peers")
    if peers:
        v = peers.get("versions") or {}
        m = peers.get("machine") or {}
        lines += ["## AFS side by side with etcd, ZooKeeper and tmpfs", "",
                  f"Run {peers.get('date')} ({'quick' if peers.get('quick') else 'full'}) on "
                  f"{m.get('cpu_count')} × {m.get('cpu_model')}, kernel {m.get('kernel')}; "
                  f"commit {str(peers.get('git_commit'))[:12]}{' (dirty)' if peers.get('git_dirty') else ''}; "
                  f"data on {peers.get('data_fs')}.", "",
                  f"Versions: AFS {v.get('afs')}, etcd {v.get('etcd')}, ZooKeeper {v.get('zookeeper')} "
                  f"({v.get('java')}), clients {v.get('python_clients')}, Python {v.get('python')}. "
                  "Each system is a 3-member cluster on 127.0.0.1 with its durable defaults "
                  "(fsync on), run one after another in the same process.", ""]
        lines += peers_tables(peers)
        if peers.get("failures"):
            lines += ["Failures in this run: " + "; ".join(f"{k}: {v}" for k, v in peers["failures"].items()), ""]
        if peers.get("notes"):
            lines += ["Notes:", ""] + [f"- {n}" for n in peers["notes"]] + [""]
    for name in sorted(k for k in results if k != "peers"):
        sec = results[name]
        if not isinstance(sec, dict):
            continue
        lines += [f"## {name}", "", f"Run {sec.get('date')}; commit {str(sec.get('git_commit'))[:12]}.", ""]
        lines += generic_tables(name, sec)
    return "\n".join(lines).rstrip() + "\n"
