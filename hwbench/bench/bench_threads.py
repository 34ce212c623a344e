"""Benchmark: two engines sharing a machine's CPUs, with and without each pinned to its own.

Why `engine.engine_threads` never gives an engine more threads than the CPUs its process may run
on, and why `make test` pins each test worker to a CPU: llama.cpp's threads wait for each other by
spinning, so two processes that each run a thread a CPU on the same CPUs slow each other far more
than their share. For one GGUF, in one run, rounds alternate between:

- alone: one process, a thread a usable CPU (the baseline);
- shared: two processes at once, each with that many threads, on all the CPUs;
- pinned: two processes at once, each pinned to its share of the CPUs, the threads asked for as
  before and cut to what it may use.

Each process loads the model, warms up, then times a greedy decode. Reported: median seconds
and each case's ratio to alone (for the two-process cases, the slower process). Writes JSON
(default bench-results/threads.json).

    python -m edgecds.hwbench.bench.bench_threads VARIANTS/*-Q4_K_M.gguf --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from edgecds.hwbench.bench.bench_fit import write_report

CHILD = """
import json, os, sys, time
cpus = json.loads(sys.argv[3])
if cpus:
    os.sched_setaffinity(0, set(cpus))
from edgecds.engine import EngineSettings, engine_threads, generate_greedy
from edgecds.engine.gguf_runtime import GgufRuntime
runtime = GgufRuntime(sys.argv[1], EngineSettings(n_ctx=512, threads=int(sys.argv[2])))
prompt = runtime.tokenize("A 64-year-old man has crushing chest pain radiating to the left arm. The most likely diagnosis is")
generate_greedy(runtime, prompt, 8)  # warm-up
start = time.perf_counter()
tokens = generate_greedy(runtime, prompt, int(sys.argv[4]))
print(json.dumps({"seconds": time.perf_counter() - start, "tokens": len(tokens), "threads": engine_threads(int(sys.argv[2]))}))
"""


def _run(model: Path, threads: int, pins: list[list[int]], tokens: int) -> list[dict[str, Any]]:
    """One process per entry of `pins` (an empty entry: unpinned), all started at once."""
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(model), str(threads), json.dumps(pin), str(tokens)],
                              stdout=subprocess.PIPE, text=True) for pin in pins]
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"a decode process failed: {[p.returncode for p in procs]}")
    return [json.loads(out.splitlines()[-1]) for out in outs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="a GGUF")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64, help="tokens decoded, timed")
    parser.add_argument("--output", type=Path, default=Path("bench-results/threads.json"))
    args = parser.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("needs two CPUs or more")
    threads = len(cpus)
    cases: dict[str, list[list[int]]] = {"alone": [[]], "shared": [[], []], "pinned": [cpus[0::2], cpus[1::2]]}
    seconds: dict[str, list[float]] = {name: [] for name in cases}
    seen_threads: dict[str, list[int]] = {}
    for _ in range(args.rounds):
        for name, pins in cases.items():
            runs = _run(args.model, threads, pins, args.tokens)
            seconds[name].append(max(r["seconds"] for r in runs))
            seen_threads[name] = [r["threads"] for r in runs]
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    result = {"model": args.model.name, "cpus": len(cpus), "threads_asked": threads, "tokens": args.tokens, "rounds": args.rounds,
              "seconds": seconds, "median_seconds": {k: round(v, 3) for k, v in medians.items()},
              "threads_given": seen_threads,
              "ratio_to_alone": {name: round(medians[name] / medians["alone"], 2) for name in cases}}
    table = "\n".join(["| case | processes | threads each | median s | vs alone |", "|---|---|---|---|---|"]
                      + [f"| {name} | {len(cases[name])} | {seen_threads[name][0]} | {medians[name]:.2f} | "
                         f"{result['ratio_to_alone'][name]:.2f}x |" for name in cases])
    write_report("threads", [result], table, args.output)


if __name__ == "__main__":
    main()
