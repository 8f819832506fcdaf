"""``make bench``: every benchmark of bench/, then docs/benchmarks.md from bench/results.json.

    python -m bench.run [--quick] [--only peers,mount,raft,propagation,watch] [--dir DIR]

1. ``peers`` (bench/peers.py, in this process): AFS side by side with etcd, ZooKeeper and tmpfs;
   installs the peers first if they are missing (bench/peer_setup.py, idempotent).
2. the other benchmark modules that exist (``mount_bench``, ``raft_bench``,
   ``propagation_bench``, ``watch_bench``), each as ``python -m bench.<module> [--quick]`` in a
   subprocess with a time limit (a crash or hang in one does not stop the others). A module that
   records its own section of results.json is left to do so; one that only prints JSON to
   ``--out`` (mount_bench) has that JSON recorded here under its section name.
3. docs/benchmarks.md rendered from the whole results file (bench/report.py).

Exit code: 0 when every step ran, 1 when a step failed (the document is still rendered from
what was measured).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import report
from bench import results as results_mod

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "benchmarks.md"

#: (step name, module, section it records, time limit in seconds for full / quick)
MODULES = [
    ("mount", "mount_bench", "mount", 900, 300),
    ("raft", "raft_bench", None, 1800, 600),
    ("propagation", "propagation_bench", None, 1200, 400),
    ("watch", "watch_bench", None, 1200, 400),
]


def module_path(module: str) -> Path:
    return REPO / "bench" / f"{module}.py"


def records_itself(module: str) -> bool:
    """Whether a module writes its own section (it uses bench/results.py's ``record``)."""
    try:
        src = module_path(module).read_text(encoding="utf-8")
    except OSError:
        return False
    return "record(" in src and ("bench.results" in src or "results_mod" in src or "from bench import results" in src)


def run_module(module: str, section: str | None, quick: bool, limit: float, out: str) -> tuple[bool, str]:
    argv = [sys.executable, "-m", f"bench.{module}"]
    if quick:
        argv.append("--quick")
    tmp_out = None
    self_recording = records_itself(module)
    if self_recording:
        src = module_path(module).read_text(encoding="utf-8")
        if '"--out"' in src and out != str(results_mod.DEFAULT_PATH):
            argv += ["--out", out]
    else:
        fd, tmp_out = tempfile.mkstemp(prefix=f"{module}-", suffix=".json")
        os.close(fd)
        argv += ["--out", tmp_out]
    print(f"\n== {' '.join(argv[2:])} (limit {limit:.0f}s)", flush=True)
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, cwd=str(REPO), start_new_session=True)
    try:
        rc = proc.wait(limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 15)   # its own session: only what it started
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
        return False, f"{module}: timed out after {limit:.0f}s"
    except KeyboardInterrupt:
        os.killpg(proc.pid, 2)
        proc.wait(30)
        raise
    finally:
        pass
    msg = f"{module}: exit {rc} in {time.monotonic() - t0:.0f}s"
    if tmp_out is not None:
        try:
            text = Path(tmp_out).read_text(encoding="utf-8")
            if text.strip() and section:
                figures = json.loads(text)
                results_mod.record(section, figures, path=out, extra={"quick": quick})
                msg += f"; recorded section {section!r}"
        except (OSError, ValueError) as exc:
            msg += f"; no results ({exc})"
            rc = rc or 1
        finally:
            os.unlink(tmp_out)
    return rc == 0, msg


def render(out: str, doc: Path = DOC) -> None:
    results = results_mod.load(out)
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(report.render_markdown(results), encoding="utf-8")
    print(f"wrote {doc}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run every AFS benchmark and render docs/benchmarks.md")
    ap.add_argument("--quick", action="store_true", help="smoke run of a few minutes")
    ap.add_argument("--only", default="", help="comma list of steps: peers,mount,raft,propagation,watch")
    ap.add_argument("--dir", help="parent directory of the clusters' data (real disk)")
    ap.add_argument("--out", default=str(results_mod.DEFAULT_PATH))
    ap.add_argument("--render-only", action="store_true", help="only regenerate docs/benchmarks.md")
    args = ap.parse_args(argv)
    if args.render_only:
        render(args.out)
        return 0
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    want = lambda step: not only or step in only  # noqa: E731
    summary: list[tuple[str, bool, str]] = []
    t0 = time.monotonic()
    try:
        if want("peers"):
            from bench import peers
            pargs = ["--out", args.out] + (["--quick"] if args.quick else []) + \
                (["--dir", args.dir] if args.dir else [])
            try:
                rc = peers.main(pargs)
                summary.append(("peers", rc == 0, f"peers: exit {rc}"))
            except Exception as exc:  # noqa: BLE001 - render what we have
                import traceback
                traceback.print_exc()
                summary.append(("peers", False, f"peers: {type(exc).__name__}: {exc}"))
        for step, module, section, full_limit, quick_limit in MODULES:
            if not want(step):
                continue
            if not module_path(module).exists():
                summary.append((step, True, f"{module}: not present, skipped"))
                continue
            ok, msg = run_module(module, section, args.quick, quick_limit if args.quick else full_limit,
                                 args.out)
            summary.append((step, ok, msg))
    finally:
        try:
            render(args.out)
        except Exception as exc:  # noqa: BLE001
            summary.append(("render", False, f"render: {exc}"))
        print(f"\n== bench summary ({time.monotonic() - t0:.0f}s)")
        for _step, ok, msg in summary:
            print(f"  {'ok  ' if ok else 'FAIL'} {msg}")
    return 0 if all(ok for _, ok, _ in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
