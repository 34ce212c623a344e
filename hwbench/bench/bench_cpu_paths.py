"""Benchmark: what llama.cpp's repacked CPU weights buy and cost, against loading them plain.

The fix for the AMX crash (engine/cpu_paths.py) turns llama.cpp's extra weight buffers off where
its probe sees them crash, which also gives up the CPU_REPACK layouts on that host. This measures
that cost on this machine: for each GGUF given, fresh processes alternate between the extra
buffers on and off (the same settings otherwise, in one run, so the machine's noise hits both), and
report decode and prompt speed (medians) and peak memory (VmHWM), with off/on ratios, and the
predictor's peak for each path.

    python -m edgecds.hwbench.bench.bench_cpu_paths VARIANTS/*-Q4_K_M.gguf VARIANTS/*-Q8_0.gguf --repeats 3

Writes JSON (default bench-results/cpu-paths.json).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgecds import __version__
from edgecds.atomic import write_json
from edgecds.engine import RunSettings
from edgecds.engine.cpu_paths import resolve
from edgecds.formats.gguf_file import read_gguf
from edgecds.host import detect_host
from edgecds.hwbench.bench.bench_predict import host_device
from edgecds.hwbench.measure import ONE_PASS, measure_in_subprocess
from edgecds.hwbench.predict import MIB, predict
from edgecds.quant.gguf_quantize import llama_cpp_version


def _one(path: Path, settings: RunSettings, repeats: int) -> dict[str, dict[str, Any]]:
    runs: dict[bool, list[Any]] = {True: [], False: []}
    for _ in range(repeats):
        for extra in (True, False):  # alternating: a noisy minute lands on both
            runs[extra].append(measure_in_subprocess(path, replace(settings, extra_buffers=extra), ONE_PASS))
    device = host_device()
    info = read_gguf(path)
    out = {}
    for extra, measured in runs.items():
        predicted = predict(info, replace(settings, extra_buffers=extra), device)
        out["on" if extra else "off"] = {
            "decode_tps": round(statistics.median(m.decode_tps for m in measured), 2),
            "prompt_tps": round(statistics.median(m.prompt_tps for m in measured), 2),
            "peak_rss_mib": round(max(m.peak_rss_bytes for m in measured) / MIB, 1),
            "predicted_peak_mib": round(predicted.memory.peak_bytes / MIB, 1),
            "buffers_mib": measured[0].llama_buffers_mib,
            "others_cpu_cores": max(max(m.others_cpu_cores or [0.0]) for m in measured),
        }
    on, off = out["on"], out["off"]
    return {**out, "off_over_on": {"decode": round(off["decode_tps"] / on["decode_tps"], 3),
                                   "prompt": round(off["prompt_tps"] / on["prompt_tps"], 3),
                                   "peak_memory": round(off["peak_rss_mib"] / on["peak_rss_mib"], 3)}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", type=Path, nargs="+", help="GGUF files")
    parser.add_argument("--ctx", type=int, default=1024)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", type=Path, default=Path("bench-results/cpu-paths.json"))
    args = parser.parse_args(argv)
    host = detect_host()
    settings = RunSettings(n_ctx=args.ctx, prompt_tokens=args.prompt, decode_tokens=args.decode, threads=args.threads or host.cpu_cores)
    results = {}
    for model in args.models:
        print(f"{model.name}: extra buffers on and off, {args.repeats} fresh processes each", file=sys.stderr)
        results[model.name] = _one(model, settings, args.repeats)
        print(f"  {results[model.name]['off_over_on']}", file=sys.stderr)
    report = {
        "what": "llama.cpp's extra (repacked) CPU weight buffers on against off: decode, prompt, peak memory",
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": {"cpu": host.cpu_model, "cores": host.cpu_cores, "cpu_features": list(host.cpu_features),
                 "verdict_here": resolve().describe()},
        "versions": {"edgecds": __version__, "llama_cpp_python": llama_cpp_version(), "python": platform.python_version()},
        "settings": {"n_ctx": args.ctx, "prompt_tokens": args.prompt, "decode_tokens": args.decode, "threads": settings.threads,
                     "repeats": args.repeats},
        "models": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.output, report)
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
