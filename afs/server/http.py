"""A tiny HTTP endpoint for ``/health`` and ``/metrics`` (Prometheus text format).

Threading: runs on the server's event loop. Only GET is served; anything else is 405/404.
"""
from __future__ import annotations

import asyncio
import bisect
import json
import logging
from collections import defaultdict

log = logging.getLogger("afs.http")

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    """Request counters and latency histograms per op. Loop-thread only."""

    def __init__(self):
        self.requests = defaultdict(int)          # (op, outcome) -> count
        self.hist = defaultdict(lambda: [0] * (len(LATENCY_BUCKETS) + 1))
        self.hist_sum = defaultdict(float)

    def observe(self, op: str, outcome: str, seconds: float) -> None:
        self.requests[(op, outcome)] += 1
        self.hist[op][bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.hist_sum[op] += seconds

    def render(self, gauges: dict[str, float]) -> str:
        out = []
        for name, value in sorted(gauges.items()):
            out.append(f"# TYPE afs_{name} gauge")
            out.append(f"afs_{name} {value}")
        out.append("# TYPE afs_requests_total counter")
        for (op, outcome), n in sorted(self.requests.items()):
            out.append(f'afs_requests_total{{op="{op}",outcome="{outcome}"}} {n}')
        out.append("# TYPE afs_request_duration_seconds histogram")
        for op, buckets in sorted(self.hist.items()):
            acc = 0
            for le, n in zip(LATENCY_BUCKETS, buckets):
                acc += n
                out.append(f'afs_request_duration_seconds_bucket{{op="{op}",le="{le}"}} {acc}')
            acc += buckets[-1]
            out.append(f'afs_request_duration_seconds_bucket{{op="{op}",le="+Inf"}} {acc}')
            out.append(f'afs_request_duration_seconds_sum{{op="{op}"}} {self.hist_sum[op]:.6f}')
            out.append(f'afs_request_duration_seconds_count{{op="{op}"}} {acc}')
        return "\n".join(out) + "\n"


async def serve_http(host: str, port: int, health, metrics_text) -> asyncio.AbstractServer:
    """``health()`` -> (ok: bool, dict); ``metrics_text()`` -> str."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            while True:  # drain headers
                h = await asyncio.wait_for(reader.readline(), 5)
                if h in (b"\r\n", b"\n", b""):
                    break
            parts = line.decode("latin-1").split()
            if len(parts) < 2 or parts[0] != "GET":
                status, ctype, body = "405 Method Not Allowed", "text/plain", b"only GET\n"
            elif parts[1].split("?")[0] == "/health":
                ok, info = health()
                status = "200 OK" if ok else "503 Service Unavailable"
                ctype, body = "application/json", json.dumps(info).encode() + b"\n"
            elif parts[1].split("?")[0] == "/metrics":
                status, ctype = "200 OK", "text/plain; version=0.0.4"
                body = metrics_text().encode()
            else:
                status, ctype, body = "404 Not Found", "text/plain", b"not found\n"
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                         f"Connection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)
