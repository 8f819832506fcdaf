"""Mount read-path benchmark: tmpfs vs the AFS FUSE mount, side by side in one run.

    python -m bench.mount_bench [--out results.json] [--iterations 20000] [--quick]

Figures (medians of batch medians, per operation):
  warm_read_us        os.open + os.read + os.close of the same 1 KiB file, warm caches
  ls_l_us             os.scandir + stat of every entry of a warm 1,000-entry directory
  first_read_after_change_us
                      AFS only: the first open+read+close of a file right after the daemon's
                      invalidate() returned (the read must see the new content)
  invalidate_us       AFS only: daemon-side time to invalidate one changed file (+ its parent)

Targets: warm read <= 1.5x tmpfs, ls -l <= 2x tmpfs, first read after change <= 100 us.
The AFS daemon runs in a subprocess (a process must not read its own FUSE mount). Needs root
(mounts a private tmpfs and the FUSE file system); unmounts both on exit.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from afs.testing.fusectl import DevControl

REPO = Path(__file__).resolve().parents[1]
FILE = "/f1k"
DIR = "/dir1000"
N_DIR = 1000


def payload(i: int = 0) -> bytes:
    return (f"{i:08d}".encode() * 128)[:1024]


Control = DevControl


def read_loop(path: str, n: int) -> float:
    """Seconds for n open+read+close."""
    o, r, c = os.open, os.read, os.close
    flags = os.O_RDONLY
    t0 = time.perf_counter()
    for _ in range(n):
        fd = o(path, flags)
        r(fd, 4096)
        c(fd)
    return time.perf_counter() - t0


def ls_l(path: str) -> float:
    t0 = time.perf_counter()
    with os.scandir(path) as it:
        for e in it:
            e.stat(follow_symlinks=False)
    return time.perf_counter() - t0


def start_afs(tmp: Path, extra: list[str]) -> tuple[subprocess.Popen, Path, Control]:
    mnt = tmp / "afs"
    mnt.mkdir()
    nodes = {FILE: {"data": payload().decode()}}
    for i in range(N_DIR):
        nodes[f"{DIR}/entry-{i:04d}"] = {"data": f"{i}\n"}
    fx = tmp / "fixture.json"
    fx.write_text(json.dumps({"revision": 1, "nodes": nodes}))
    sock = tmp / "ctl.sock"
    log = open(tmp / "daemon.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "afs.fs", str(mnt), "--fixture", str(fx),
                             "--control", str(sock), *extra], stdout=log, stderr=log,
                            env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=str(tmp))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError((tmp / "daemon.log").read_text())
        if sock.exists() and os.path.ismount(mnt):
            try:
                os.stat(mnt / FILE.lstrip("/"))
                ctl = Control(str(sock))
                if ctl.call(op="ping")["ready"]:
                    return proc, mnt, ctl
            except OSError:
                pass
        time.sleep(0.05)
    stop_afs(proc, mnt)
    raise RuntimeError("AFS mount did not come up: " + (tmp / "daemon.log").read_text())


def stop_afs(proc: subprocess.Popen, mnt: Path) -> None:
    if os.path.ismount(mnt):
        if subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True).returncode:
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def setup_tmpfs(tmp: Path) -> tuple[Path, bool]:
    d = tmp / "tmpfs"
    d.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "afs-bench", str(d)],
                             capture_output=True).returncode == 0
    if not mounted:   # fall back to /dev/shm (tmpfs on Debian)
        d = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="afs-bench-"))
    (d / FILE.lstrip("/")).write_bytes(payload())
    (d / DIR.lstrip("/")).mkdir()
    for i in range(N_DIR):
        (d / DIR.lstrip("/") / f"entry-{i:04d}").write_bytes(f"{i}\n".encode())
    return d, mounted


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the JSON results here (default: stdout only)")
    ap.add_argument("--iterations", type=int, default=20_000)
    ap.add_argument("--batch", type=int, default=200)
    ap.add_argument("--ls-rounds", type=int, default=40)
    ap.add_argument("--changes", type=int, default=100)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--daemon-arg", action="append", default=[],
                    help="extra argument for the AFS daemon (python -m afs.fs)")
    args = ap.parse_args(argv)
    if args.quick:
        args.iterations, args.ls_rounds, args.changes = 5_000, 10, 30
    if os.geteuid() != 0:
        print("mount_bench needs root (tmpfs + FUSE mounts)", file=sys.stderr)
        return 2

    tmp = Path(tempfile.mkdtemp(prefix="afs-mount-bench-"))
    tmpfs, tmpfs_mounted = setup_tmpfs(tmp)
    proc = mnt = None
    try:
        proc, mnt, ctl = start_afs(tmp, args.daemon_arg)
        t_file, a_file = str(tmpfs) + FILE, str(mnt) + FILE
        t_dir, a_dir = str(tmpfs) + DIR, str(mnt) + DIR
        assert open(a_file, "rb").read() == payload()

        # warm up both (page cache, dentries, attributes)
        read_loop(t_file, 2000), read_loop(a_file, 2000)
        ls_l(t_dir), ls_l(a_dir), ls_l(t_dir), ls_l(a_dir)

        # 1. warm open+read+close, interleaved batches
        tb, ab = [], []
        for _ in range(max(1, args.iterations // args.batch)):
            tb.append(read_loop(t_file, args.batch) / args.batch)
            ab.append(read_loop(a_file, args.batch) / args.batch)
        warm_t, warm_a = statistics.median(tb) * 1e6, statistics.median(ab) * 1e6

        # 2. ls -l of a warm 1,000-entry directory
        tl, al = [], []
        for _ in range(args.ls_rounds):
            tl.append(ls_l(t_dir))
            al.append(ls_l(a_dir))
        ls_t, ls_a = statistics.median(tl) * 1e6, statistics.median(al) * 1e6

        # 3. first read after a change (content and size change), AFS only
        first, inval, rtt, batch_us = [], [], [], []
        for i in range(1, args.changes + 1):
            new = payload(i)[: 1024 - (i % 7)]
            t0 = time.perf_counter()
            r = ctl.call(op="apply", put={FILE: {"data": new.decode()}})
            rtt.append((time.perf_counter() - t0) * 1e6)
            inval.append(r["invalidate_us"])
            batch_us.append(r["batch_us"])
            t1 = time.perf_counter()
            fd = os.open(a_file, os.O_RDONLY)
            got = os.read(fd, 4096)
            os.close(fd)
            first.append((time.perf_counter() - t1) * 1e6)
            if got != new:
                raise RuntimeError(f"stale read after invalidate at change {i}")
        # second read after a change (already re-cached) for comparison
        fd = os.open(a_file, os.O_RDONLY)
        os.read(fd, 4096)
        os.close(fd)
        stats = ctl.call(op="status")["stats"]

        res = {
            "warm_read_us": {"tmpfs": warm_t, "afs": warm_a, "ratio": warm_a / warm_t,
                             "target_ratio": 1.5},
            "ls_l_1000_us": {"tmpfs": ls_t, "afs": ls_a, "ratio": ls_a / ls_t,
                             "target_ratio": 2.0},
            "first_read_after_change_us": {"afs": statistics.median(first),
                                           "p90": sorted(first)[int(len(first) * 0.9)],
                                           "target": 100.0},
            "invalidate_us": {"daemon_batch": statistics.median(batch_us),
                              "invalidate_call": statistics.median(inval),
                              "control_round_trip": statistics.median(rtt)},
            "config": {"iterations": args.iterations, "batch": args.batch,
                       "ls_rounds": args.ls_rounds, "changes": args.changes,
                       "tmpfs": "private tmpfs" if tmpfs_mounted else "/dev/shm",
                       "daemon_args": args.daemon_arg, "invalidator_stats": stats},
        }
        print(f"warm open+read+close 1KiB : tmpfs {warm_t:8.2f} us  afs {warm_a:8.2f} us  "
              f"ratio {warm_a / warm_t:5.2f} (target <= 1.5)")
        print(f"ls -l 1000 entries        : tmpfs {ls_t:8.1f} us  afs {ls_a:8.1f} us  "
              f"ratio {ls_a / ls_t:5.2f} (target <= 2.0)")
        print(f"first read after change   : afs {statistics.median(first):8.1f} us median "
              f"(p90 {res['first_read_after_change_us']['p90']:.1f}) (target <= 100)")
        print(f"invalidate one file       : daemon batch {statistics.median(batch_us):8.1f} us, "
              f"control round trip {statistics.median(rtt):8.1f} us")
        out = json.dumps(res, indent=2)
        if args.out:
            Path(args.out).write_text(out + "\n")
        else:
            print(out)
        return 0
    finally:
        if proc is not None:
            stop_afs(proc, mnt)
        if tmpfs_mounted:
            subprocess.run(["umount", str(tmpfs)], capture_output=True)
        else:
            shutil.rmtree(tmpfs, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
