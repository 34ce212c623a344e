"""Benchmark: does `edgecds profile`'s harness measure what the engine does, no slower, no bigger?

In one run on this machine, for one variant:

1. decode speed: edgecds's measurement (a fresh process, warm-up, repeats) against a bare
   llama-cpp-python loop in its own fresh process (load, then decode one token at a time, picking
   the next greedily: load, evaluate, sample, nothing else) on the same file, context, batch and
   threads; the two alternate `--rounds` times, each going first in turn, so machine noise hits both alike. Target: edgecds's
   median at least 0.97 of the bare loop's.
2. peak memory: edgecds's reading (the child's VmHWM) against `/usr/bin/time -v`'s maximum
   resident set for the same work (the same measuring command, run under time). Target: within 2%.
3. repeatability: two profile measurements of the variant (each `--repeats` fresh processes, as
   `edgecds profile` takes them); each figure's medians must differ by no more than the spread
   (range of repeats) the runs report.

    python -m edgecds.hwbench.bench.bench_profile edgecds-out/SmolLM2-135M-Instruct --type Q4_K_M

Writes JSON (default bench-results/profile.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgecds import __version__
from edgecds.adopt import open_variants
from edgecds.atomic import write_json
from edgecds.engine import RunSettings
from edgecds.hwbench.measure import PEAK_RSS_RESOLUTION, Measurement, Workload, measure_in_subprocess, measure_repeated
from edgecds.results import Stat
from edgecds.variants import variant_file

DECODE_TARGET = 0.97
MEMORY_TOLERANCE_PERCENT = 2.0

# The baseline: llama-cpp-python's low-level calls and nothing else. Arguments: model, n_ctx,
# n_batch, threads, tokens, repeats. Prints one JSON line of decode seconds per repeat.
BARE_LOOP = r"""
import json, sys, time
import numpy as np
import llama_cpp
model, n_ctx, n_batch, threads, n, repeats = sys.argv[1], *map(int, sys.argv[2:])
llm = llama_cpp.Llama(model_path=model, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, n_threads=threads,
                      n_threads_batch=threads, verbose=False)
ctx, n_vocab = llm.ctx, llm.n_vocab()
def decode(count):
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
    token, seconds = llm.token_bos(), time.perf_counter()
    for pos in range(count):
        batch = llama_cpp.llama_batch_get_one((llama_cpp.llama_token * 1)(token), 1)
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise SystemExit("llama_decode failed")
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
        token = int(np.argmax(logits))
    return time.perf_counter() - seconds
decode(1)  # warm-up, as edgecds does
print(json.dumps([decode(n) for _ in range(repeats)]))
"""


def bare_decode_tps(model: Path, settings: RunSettings, repeats: int) -> list[float]:
    args = [str(model), str(settings.n_ctx), str(settings.n_batch), str(settings.threads), str(settings.decode_tokens), str(repeats)]
    proc = subprocess.run([sys.executable, "-c", BARE_LOOP, *args], capture_output=True, text=True, check=True, timeout=600)
    return [settings.decode_tokens / s for s in json.loads(proc.stdout.strip().splitlines()[-1])]


def time_v_maxrss(model: Path, settings: RunSettings, workload: Workload) -> int:
    """`/usr/bin/time -v`'s maximum resident set of edgecds's measuring command, in bytes."""
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "edgecds.hwbench.measure", str(model),
           "--settings", json.dumps(asdict(settings)), "--workload", json.dumps(asdict(workload))]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600)
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    if not match:
        raise SystemExit("/usr/bin/time -v printed no maximum resident set size")
    return int(match.group(1)) * 1024


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", type=Path, help="a variants.json written by edgecds quantize, or its folder")
    parser.add_argument("--type", default="Q4_K_M", help="the variant to measure")
    parser.add_argument("--rounds", type=int, default=5, help="alternations of edgecds and the bare loop")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--output", type=Path, default=Path("bench-results/profile.json"))
    return parser.parse_args(argv)


def _alternate(model: Path, settings: RunSettings, workload: Workload, rounds: int) -> tuple[list[float], list[float], list[Measurement]]:
    """Decode tokens/s of edgecds's measurement and of the bare loop, `rounds` times each, alternating."""
    edgecds_tps: list[float] = []
    bare_tps: list[float] = []
    runs = []
    for n in range(rounds):
        # alternate which goes first, so a drift in the machine's speed favours neither
        if n % 2:
            bare_tps.append(statistics.median(bare_decode_tps(model, settings, workload.repeats)))
        m = measure_in_subprocess(model, settings, workload)
        runs.append(m)
        edgecds_tps.append(m.decode_tps)
        if not n % 2:
            bare_tps.append(statistics.median(bare_decode_tps(model, settings, workload.repeats)))
        print(f"round {n + 1}/{rounds}: decode edgecds {edgecds_tps[-1]:.1f}, bare {bare_tps[-1]:.1f} tok/s", file=sys.stderr)
    return edgecds_tps, bare_tps, runs


def _repeatability(model: Path, settings: RunSettings, repeats: int) -> list[dict[str, Any]]:
    """Two profile measurements, as `edgecds profile` takes them; each figure's medians must
    differ by no more than the larger range the two report."""
    profiles = [measure_repeated(model, settings, repeats) for _ in range(2)]
    checks = []
    for name, pick, resolution in (("prompt_tps", lambda m: m.prompt_tps, 0.0), ("decode_tps", lambda m: m.decode_tps, 0.0),
                                   ("ttft_seconds", lambda m: m.ttft_seconds[0], 0.0), ("load_seconds", lambda m: m.load_seconds, 0.0),
                                   ("peak_rss_bytes", lambda m: m.peak_rss_bytes, PEAK_RSS_RESOLUTION)):
        a, b = (Stat.of([float(pick(m)) for m in run], resolution) for run in profiles)  # as results.json reports them
        difference = abs(a.median - b.median)
        spread = max(a.spread, b.spread)
        checks.append({"figure": name, "run_1": a.samples, "run_2": b.samples,
                       "difference": round(difference, 6), "reported_spread": round(spread, 6), "holds": difference <= spread})
    return checks


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    folder, record = open_variants(args.variants)
    if args.type not in record.by_type():
        print(f"no {args.type} variant recorded in {folder}", file=sys.stderr)
        return 2
    model = variant_file(folder, record.by_type()[args.type])
    settings = RunSettings(n_ctx=2048, threads=args.threads, prompt_tokens=512, decode_tokens=128)
    workload = Workload(repeats=args.repeats)

    edgecds_tps, bare_tps, runs = _alternate(model, settings, workload, args.rounds)
    ratio = statistics.median(edgecds_tps) / statistics.median(bare_tps)
    paired = [e / b for e, b in zip(edgecds_tps, bare_tps, strict=True)]

    edgecds_peak = runs[-1].peak_rss_bytes
    time_peak = time_v_maxrss(model, settings, workload)
    memory_error = (edgecds_peak - time_peak) / time_peak * 100

    checks = _repeatability(model, settings, args.repeats)
    report: dict[str, Any] = {
        "schema_version": 1,
        "benchmark": "edgecds profile harness against a bare llama-cpp-python loop and /usr/bin/time -v",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": {"machine": platform.machine(), "cpus": os.cpu_count()},
        "versions": {"edgecds": __version__, "python": platform.python_version()},
        "variant": model.name,
        "settings": asdict(settings),
        "workload": asdict(workload),
        "decode": {
            "edgecds_tps_per_round": [round(x, 2) for x in edgecds_tps],
            "bare_tps_per_round": [round(x, 2) for x in bare_tps],
            "paired_ratios": [round(x, 4) for x in paired],
            "ratio_of_medians": round(ratio, 4),
            "target": DECODE_TARGET,
            "holds": ratio >= DECODE_TARGET,
        },
        "memory": {
            "edgecds_peak_bytes": edgecds_peak,
            "time_v_max_rss_bytes": time_peak,
            "error_percent": round(memory_error, 3),
            "tolerance_percent": MEMORY_TOLERANCE_PERCENT,
            "holds": abs(memory_error) <= MEMORY_TOLERANCE_PERCENT,
        },
        "repeatability": {"pairs_checked": len(checks), "holding": sum(c["holds"] for c in checks), "checks": checks},
    }
    write_json(args.output, report)
    d, mem, rep = report["decode"], report["memory"], report["repeatability"]
    print(f"decode: edgecds/bare = {d['ratio_of_medians']} (target >= {DECODE_TARGET}); memory: edgecds {edgecds_peak / 2**20:.1f} MiB "
          f"vs time -v {time_peak / 2**20:.1f} MiB ({memory_error:+.2f}%); repeatability: {rep['holding']}/{rep['pairs_checked']} within the reported spread")
    print(f"written to {args.output}")
    return 0 if d["holds"] and mem["holds"] else 1


if __name__ == "__main__":
    sys.exit(main())
