"""History checkers for the Jepsen-style fault suite (:mod:`afs.testing.chaos`).

Each checker takes plain recorded data and returns a dict with integer counters plus a few
examples (``examples`` lists at most 5 human-readable lines per problem kind). Nothing here
talks to a cluster; the recorders live in chaos.py. Time stamps are ``time.monotonic()``
values from ONE process (the driver), so real-time order between ops is meaningful.

- :func:`check_registers`: per-key linearizability with :mod:`afs.testing.linearizability`
  (ops that timed out / lost their connection are ``info`` = indeterminate).
- :func:`check_lists`: the list-append workload: lost acknowledged appends, duplicates,
  phantoms (an element never attempted), reordering (acknowledged a before b was invoked but b
  precedes a), and reads that are not prefixes of the final list or miss an append
  acknowledged before the read began (stale).
- :func:`check_history`: the committed history (a watch from revision 1 after healing) must be
  dense; every acknowledged register write must appear in it; no unique value is applied
  twice (duplicate applies).
- :func:`check_watches`: each watcher's stream is strictly increasing, has no gap between its
  first and last revision (revisions are dense and every revision touches the watched "/"),
  and matches the committed history event for event.
- :func:`check_mount`: the revision a mount shows (``/.afs/status``) never goes back.
- :func:`check_states`: every member reports the same revision and state hash.
"""
from __future__ import annotations

import bisect

import math
from typing import Any, Iterable

from afs.testing.linearizability import FAIL, INFO, OK, KVModel, Op, check_partition

__all__ = ["check_registers", "check_lists", "check_history", "check_watches", "check_mount",
           "check_states"]


def _ex(out: dict, kind: str, line: str) -> None:
    lst = out.setdefault("examples", {}).setdefault(kind, [])
    if len(lst) < 5:
        lst.append(line)


# ---------------------------------------------------------------- registers

def check_registers(ops: list[Op], initial: Any = None, max_states: int = 500_000) -> dict:
    """Per-key linearizability. ``violations`` = number of keys with no linearization."""
    model = KVModel(initial)
    parts = model.partition(ops)
    out = {"ops": len(ops), "keys": len(parts), "violations": 0, "unknown_keys": [],
           "indeterminate": sum(1 for o in ops if o.status == INFO)}
    for key in sorted(parts, key=repr):
        ok, why = check_partition(parts[key], model, max_states=max_states)
        if not ok:
            out["violations"] += 1
            _ex(out, "linearizability", f"key {key!r}: {why}")
        elif why:
            out["unknown_keys"].append(key)
    return out


# ---------------------------------------------------------------- list append

def check_lists(appends: list[dict], reads: list[dict], final: dict[str, list]) -> dict:
    """``appends``: {key, elem, invoke, complete, status ok|fail|info}; ``reads``: {key, value
    (list), invoke, complete} (ok reads only); ``final``: key -> list read after healing."""
    out = {"appends": len(appends), "reads": len(reads), "lost": 0, "duplicated": 0,
           "phantoms": 0, "reordered": 0, "stale_reads": 0, "nonprefix_reads": 0}
    by_key: dict[str, list[dict]] = {}
    for a in appends:
        by_key.setdefault(a["key"], []).append(a)
    for key, fin in final.items():
        attempted = {a["elem"]: a for a in by_key.get(key, []) if a["status"] != FAIL}
        pos: dict = {}
        for i, e in enumerate(fin):
            if e in pos:
                out["duplicated"] += 1
                _ex(out, "duplicated", f"{key}: element {e} at {pos[e]} and {i}")
            else:
                pos[e] = i
            if e not in attempted:
                out["phantoms"] += 1
                _ex(out, "phantom", f"{key}: element {e} was never (possibly) appended")
        acked = sorted((a for a in by_key.get(key, []) if a["status"] == OK),
                       key=lambda a: a["complete"])
        for a in acked:
            if a["elem"] not in pos:
                out["lost"] += 1
                _ex(out, "lost", f"{key}: acknowledged append {a['elem']} (acked at "
                                 f"{a['complete']:.3f}) missing from the final list")
        # real-time order of acknowledged appends must be kept: b is reordered if some a
        # completed before b was invoked yet sits after b. Sweep b by invoke time keeping the
        # furthest position among appends completed so far (O(n log n), not O(n^2)).
        present = [a for a in acked if a["elem"] in pos]        # sorted by complete
        best = None                                             # append with max pos so far
        j = 0
        for b in sorted(present, key=lambda a: a["invoke"]):
            while j < len(present) and present[j]["complete"] < b["invoke"]:
                if best is None or pos[present[j]["elem"]] > pos[best["elem"]]:
                    best = present[j]
                j += 1
            if best is not None and best is not b and pos[best["elem"]] > pos[b["elem"]]:
                out["reordered"] += 1
                _ex(out, "reordered", f"{key}: {best['elem']} acked before {b['elem']} began "
                                      f"but comes after it")
    # Stale reads: a read misses an append acknowledged before it began. For a read that is a
    # prefix of the final list, the acknowledged appends it contains are exactly those at final
    # positions < len(read); so it is stale iff the furthest final position (lost = infinite)
    # among appends acknowledged before its invocation is >= len(read). Prefix maxima over the
    # appends sorted by completion make that O(log n) per read; reads that are not prefixes
    # (already a violation) fall back to the direct scan.
    sweep: dict[str, tuple[list[float], list[tuple[float, dict]]]] = {}
    for key, items in by_key.items():
        fin_pos: dict = {}
        for i, e in enumerate(final.get(key) or []):
            fin_pos.setdefault(e, i)             # first occurrence (duplicates counted above)
        acked = sorted((a for a in items if a["status"] == OK), key=lambda a: a["complete"])
        completes, maxima, best = [], [], (-1.0, None)
        for a in acked:
            p_ = fin_pos.get(a["elem"], float("inf"))
            if p_ > best[0]:
                best = (p_, a)
            completes.append(a["complete"])
            maxima.append(best)
        sweep[key] = (completes, maxima)
    for r in reads:
        fin = final.get(r["key"])
        val = r["value"]
        if len(set(val)) != len(val):
            out["duplicated"] += 1
            _ex(out, "duplicated", f"{r['key']}: a read returned duplicates: {val}")
        is_prefix = fin is not None and val == fin[:len(val)]
        if fin is not None and not is_prefix:
            out["nonprefix_reads"] += 1
            _ex(out, "nonprefix", f"{r['key']}: read {val[-5:]}... (len {len(val)}) is not a "
                                  f"prefix of the final list")
        missed = None
        if is_prefix:
            completes, maxima = sweep.get(r["key"], ([], []))
            k = bisect.bisect_left(completes, r["invoke"])
            if k and maxima[k - 1][0] >= len(val):
                missed = maxima[k - 1][1]
        else:
            seen = set(val)
            for a in by_key.get(r["key"], []):
                if a["status"] == OK and a["complete"] < r["invoke"] and a["elem"] not in seen:
                    missed = a
                    break
        if missed is not None:
            out["stale_reads"] += 1
            _ex(out, "stale", f"{r['key']}: read at {r['invoke']:.3f} misses {missed['elem']} "
                              f"acknowledged at {missed['complete']:.3f}")
    return out


# ---------------------------------------------------------------- committed history

def check_history(history: dict[int, list], first: int, last: int,
                  acked_writes: Iterable[tuple[str, bytes]],
                  unique_prefixes: tuple[str, ...]) -> dict:
    """``history``: revision -> [(type, path, data)] for revisions first..last (a watch from
    ``first`` after healing). ``acked_writes``: (path, data) of acknowledged register writes /
    successful CAS; ``unique_prefixes``: paths under which every written value is unique."""
    out = {"first": first, "last": last, "gaps": 0, "lost": 0, "duplicate_applies": 0}
    for rev in range(first, last + 1):
        if rev not in history:
            out["gaps"] += 1
            _ex(out, "gap", f"committed history has no revision {rev}")
    written: dict[tuple[str, bytes], int] = {}
    for rev in sorted(history):
        for typ, path, data in history[rev]:
            if typ == "deleted" or data is None or not path.startswith(unique_prefixes):
                continue
            k = (path, bytes(data))
            if k in written and written[k] != rev:
                out["duplicate_applies"] += 1
                _ex(out, "duplicate", f"{path}={data!r} applied at revisions {written[k]} and {rev}")
            else:
                written[k] = rev
    if first <= 1 and out["gaps"] == 0:     # with gaps (reported above) absence proves nothing
        for path, data in acked_writes:
            if (path, bytes(data)) not in written:
                out["lost"] += 1
                _ex(out, "lost", f"acknowledged write {path}={data!r} is not in the committed history")
    return out


def check_watches(watchers: list[dict], history: dict[int, list], hist_first: int) -> dict:
    """``watchers``: {name, start (first revision asked for), frames: [(revision, [(type, path,
    data)])], resumes, errors}. A watcher must receive every revision from its first frame's
    revision (or ``start`` if it received one) up to its last, once, in order, identical to the
    committed history."""
    out = {"watchers": len(watchers), "events": 0, "gaps": 0, "duplicates": 0, "out_of_order": 0,
           "mismatches": 0, "resumes": sum(w.get("resumes", 0) for w in watchers)}
    for w in watchers:
        revs = [r for r, _ in w["frames"]]
        out["events"] += sum(len(ev) for _, ev in w["frames"])
        prev = None
        for r, ev in w["frames"]:
            if prev is not None:
                if r == prev:
                    out["duplicates"] += 1
                    _ex(out, "duplicate", f"{w['name']}: revision {r} delivered twice")
                elif r < prev:
                    out["out_of_order"] += 1
                    _ex(out, "order", f"{w['name']}: revision {r} after {prev}")
                elif r > prev + 1:
                    out["gaps"] += r - prev - 1
                    _ex(out, "gap", f"{w['name']}: jumped from revision {prev} to {r}")
            prev = r if prev is None else max(prev, r)
            if r >= hist_first and r in history and sorted(map(repr, ev)) != sorted(map(repr, history[r])):
                out["mismatches"] += 1
                _ex(out, "mismatch", f"{w['name']}: revision {r} events differ from the committed history")
        if revs and w.get("start") is not None and revs[0] > w["start"] and revs[0] - 1 <= max(history or [0]):
            # asked for `start`, first delivered later: the revisions in between were skipped
            missing = revs[0] - w["start"]
            out["gaps"] += missing
            _ex(out, "gap", f"{w['name']}: asked from {w['start']}, first got {revs[0]}")
    out["total_problems"] = out["gaps"] + out["duplicates"] + out["out_of_order"] + out["mismatches"]
    return out


# ---------------------------------------------------------------- mount / members

def check_mount(samples: list[tuple[float, int, int]]) -> dict:
    """``samples``: (time, agent incarnation, revision) of successful /.afs/status reads, in
    read order (incarnation lets the report tell regressions across agent restarts apart)."""
    out = {"samples": len(samples), "regressions": 0, "restarts_crossed": 0,
           "max_revision": max((s[2] for s in samples), default=0)}
    best = -math.inf
    last_inc = None
    for t, inc, rev in samples:
        if last_inc is not None and inc != last_inc:
            out["restarts_crossed"] += 1
        last_inc = inc
        if rev < best:
            out["regressions"] += 1
            _ex(out, "regression", f"t={t:.3f} agent#{inc}: revision {rev} after {best}")
        best = max(best, rev)
    return out


def check_states(states: dict[str, dict]) -> dict:
    """``states``: member -> {revision, hash} (or {error}). Every member must answer and agree."""
    out = {"members": len(states), "divergent": 0, "unreachable": 0, "states": states}
    good = {n: s for n, s in states.items() if "error" not in s}
    out["unreachable"] = len(states) - len(good)
    for n, s in states.items():
        if "error" in s:
            _ex(out, "unreachable", f"{n}: {s['error']}")
    distinct = {(s["revision"], s["hash"]) for s in good.values()}
    if len(distinct) > 1:
        out["divergent"] = len(distinct) - 1
        _ex(out, "divergent", "; ".join(f"{n}: rev {s['revision']} hash {s['hash'][:12]}"
                                         for n, s in sorted(good.items())))
    return out
