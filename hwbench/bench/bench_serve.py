"""Load test: `edgecds serve` with more concurrent clients than it has slots, loopback only.

Starts the server on a bundle (a child process on 127.0.0.1 and a free port), sends `--requests`
chat completions from `--clients` threads at once, bounded by `--seconds`, and checks that every
answer is 200 or 503, that the server still answers afterwards, and that its peak memory (VmHWM)
stayed within the bundle's device budget. Writes JSON: served, refused, latency percentiles,
peak memory.

    python -m edgecds.hwbench.bench.bench_serve edgecds-out/bundle --clients 8 --requests 32
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgecds.atomic import write_json

PROMPT = "A 58-year-old man has sudden severe headache with vomiting and neck stiffness. What is the most likely diagnosis?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _request(port: int, token: str, body: dict[str, Any], timeout: float) -> int:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(body).encode(), method="POST",
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            resp.read()
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def peak_rss(pid: int) -> int:
    """A running process's peak resident set (VmHWM), bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def start_server(bundle: Path, slots: int, queue: int, max_tokens: int, *extra: str,
                 env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], int, str]:
    """`edgecds serve` on a free loopback port, its token in the environment; `extra` options are
    added (the bundle is checked at start unless they say --no-verify). Its stdout and stderr are
    kept, for a caller to read what it printed."""
    port, token = free_port(), secrets.token_urlsafe(16)
    cmd = [sys.executable, "-m", "edgecds", "serve", str(bundle), "--port", str(port), "--slots", str(slots), "--queue", str(queue),
           "--max-tokens", str(max_tokens), *extra]
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {}), "EDGECDS_SERVE_TOKEN": token}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read().decode(errors='replace')[-500:] if proc.stderr else ''}")
        try:
            with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/v1/models",
                                                               headers={"Authorization": f"Bearer {token}"}), timeout=2):
                return proc, port, token
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("the server did not start within 120 s")


def run_load(bundle: Path, clients: int, requests: int, seconds: float, slots: int = 1, queue: int = 2, max_tokens: int = 32,
             *extra: str) -> dict[str, Any]:
    manifest = json.loads((bundle / "manifest.json").read_text())
    budget = int(manifest["device"]["budget_gib"] * 1024**3)
    proc, port, token = start_server(bundle, slots, queue, max_tokens, "--no-verify", *extra)
    results: list[tuple[int, float]] = []
    lock = threading.Lock()
    remaining = [requests]
    stop_at = time.monotonic() + seconds

    def client() -> None:
        while time.monotonic() < stop_at:
            with lock:
                if remaining[0] <= 0:
                    return
                remaining[0] -= 1
            start = time.perf_counter()
            try:
                code = _request(port, token, {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens}, seconds)
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                code = 0  # no answer at all: counted, and fails the check below
            with lock:
                results.append((code, time.perf_counter() - start))
            if code == 503:
                time.sleep(0.25)  # a polite client backs off before retrying

    try:
        threads = [threading.Thread(target=client) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        alive = proc.poll() is None and _request(port, token, {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}, 60) == 200
        peak = peak_rss(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    codes = [c for c, _ in results]
    served = [t for c, t in results if c == 200]

    def pct(values: list[float], q: int) -> float | None:
        return round(statistics.quantiles(values, n=100)[q - 1], 3) if len(values) >= 2 else (round(values[0], 3) if values else None)

    return {
        "clients": clients, "slots": slots, "queue": queue, "requests": len(results), "codes": codes, "served": len(served),
        "refused_503": codes.count(503),
        "other": sorted({c for c in codes if c not in (200, 503)}), "only_200_or_503": all(c in (200, 503) for c in codes),
        "server_alive_after": alive, "latency_seconds_served": {"p50": pct(served, 50), "p90": pct(served, 90), "p99": pct(served, 99)},
        "peak_memory_bytes": peak, "device_budget_bytes": budget, "within_budget": 0 < peak <= budget,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--slots", type=int, default=1)
    parser.add_argument("--queue", type=int, default=2)
    parser.add_argument("--output", type=Path, default=Path("bench-results/serve.json"))
    args = parser.parse_args(argv)
    report = {"schema_version": 1, "benchmark": "edgecds serve under more concurrent clients than slots, loopback only",
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "bundle": str(args.bundle),
              **run_load(args.bundle, args.clients, args.requests, args.seconds, args.slots, args.queue)}
    write_json(args.output, report)
    print(json.dumps({k: report[k] for k in ("requests", "served", "refused_503", "only_200_or_503", "server_alive_after",
                                             "latency_seconds_served", "peak_memory_bytes", "within_budget")}))
    ok = report["only_200_or_503"] and report["server_alive_after"] and report["within_budget"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
