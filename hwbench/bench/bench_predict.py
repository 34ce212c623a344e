"""Benchmark: predicted against measured peak memory and speed, every variant, several contexts.

For each variant of a variants.json and each context length (default 512, 2,048 and 8,192), in
one run: the predictor's figure from the files and this machine's profile, then a fresh process
that loads the variant, fills the context with a prompt (all but the decoded tokens) and decodes
32 tokens, reporting its kernel high-water mark (VmHWM). The decode prediction uses this
machine's memory bandwidth measured in the same run; the calibration constants come from
hwbench/calibration.json (measured separately by bench/calibrate.py, on other workloads).

    python -m edgecds.hwbench.bench.bench_predict edgecds-out/SmolLM2-135M-Instruct/variants.json

Writes JSON (default bench-results/predict.json) with every pair, the errors and the worst.
"""

from __future__ import annotations

import argparse
import platform
import sys
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgecds import __version__
from edgecds.adopt import open_variants
from edgecds.atomic import write_json
from edgecds.engine import RunSettings
from edgecds.formats.gguf_file import GgufInfo, read_gguf
from edgecds.hwbench.bench.calibrate import memory_bandwidth_gbs
from edgecds.hwbench.measure import ONE_PASS, measure_in_subprocess
from edgecds.hwbench.predict import MIB, Calibration, load_calibrations, percent_error, predict
from edgecds.quant.gguf_quantize import llama_cpp_version
from edgecds.variants import variant_file

TOLERANCE_PERCENT = 5.0


def host_device() -> Any:
    from edgecds.target import resolve_target

    device = resolve_target("host").device  # this machine, as detected
    # plan for a CPU run here whatever the nearest profile's backend
    return replace(device, backends=("cpu",), memory_kind="system", host_ram_gib=None)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", type=Path, help="a variants.json written by edgecds quantize")
    parser.add_argument("--ctx", default="512,2048,8192", help="context lengths, comma-separated")
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--output", type=Path, default=Path("bench-results/predict.json"))
    return parser.parse_args(argv)


def _pair(variant_type: str, path: Path, info: GgufInfo, settings: RunSettings, device: Any,
          calibrations: dict[str, Calibration]) -> dict[str, Any]:
    """One variant at one context: the prediction and a fresh process's measurement, side by side."""
    predicted = predict(info, settings, device, calibrations)
    measured = measure_in_subprocess(path, settings, ONE_PASS)
    return {
        "variant": variant_type,
        "n_ctx": settings.n_ctx,
        "predicted_peak_bytes": predicted.memory.peak_bytes,
        "measured_peak_bytes": measured.peak_rss_bytes,
        "memory_error_percent": round(percent_error(predicted.memory.peak_bytes, measured.peak_rss_bytes), 2),
        "predicted_parts_bytes": {k: v for k, v in asdict(predicted.memory).items() if isinstance(v, int) and v},
        "llama_buffers_mib": measured.llama_buffers_mib,
        "predicted_decode_tps": round(predicted.speed.decode_tps, 2),
        "measured_decode_tps": round(measured.decode_tps, 2),
        "decode_error_percent": round(percent_error(predicted.speed.decode_tps, measured.decode_tps), 1),
        "predicted_prompt_tps": round(predicted.speed.prompt_tps or 0.0, 2),
        "measured_prompt_tps": round(measured.prompt_tps, 2),
        "prompt_error_percent": round(percent_error(predicted.speed.prompt_tps or 0.0, measured.prompt_tps), 1),
    }


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    worst = max(rows, key=lambda r: abs(r["memory_error_percent"]))
    decode_errors = sorted(abs(r["decode_error_percent"]) for r in rows)
    return {
        "pairs": len(rows),
        "memory_within_tolerance": sum(abs(r["memory_error_percent"]) <= TOLERANCE_PERCENT for r in rows),
        "worst_memory_error_percent": worst["memory_error_percent"],
        "worst_memory_pair": f"{worst['variant']} at {worst['n_ctx']}",
        "median_abs_decode_error_percent": decode_errors[len(decode_errors) // 2],
        "max_abs_decode_error_percent": decode_errors[-1],
    }


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    folder, record = open_variants(args.variants)
    contexts = [int(c) for c in args.ctx.split(",")]
    calibrations = load_calibrations()
    bandwidth = memory_bandwidth_gbs()
    device = replace(host_device(), bandwidth_gbs=bandwidth)
    rows: list[dict[str, Any]] = []
    for n, variant in enumerate(record.variants, 1):
        path = variant_file(folder, variant)
        info = read_gguf(path)
        for n_ctx in contexts:
            row = _pair(variant.type, path, info, RunSettings(n_ctx=n_ctx, decode_tokens=args.decode), device, calibrations)
            rows.append(row)
            print(f"[{n}/{len(record.variants)}] {variant.type:7} ctx {n_ctx:5}: peak predicted {row['predicted_peak_bytes'] / MIB:7.1f} MiB, "
                  f"measured {row['measured_peak_bytes'] / MIB:7.1f} MiB ({row['memory_error_percent']:+.2f}%); decode predicted "
                  f"{row['predicted_decode_tps']:6.1f}, measured {row['measured_decode_tps']:6.1f} tok/s ({row['decode_error_percent']:+.0f}%)",
                  file=sys.stderr)

    s = _summary(rows)
    report = {
        "schema_version": 1,
        "benchmark": "predicted vs measured peak memory and speed",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": {"machine": platform.machine(), "cpu": device.name, "cores": device.cpu_cores, "bandwidth_gbs_measured": round(bandwidth, 2)},
        "versions": {"edgecds": __version__, "llama_cpp_python": llama_cpp_version(), "python": platform.python_version()},
        "calibration": calibrations["cpu"].source,
        "workload": "fresh process per variant and context; prompt fills the context less the decoded tokens; peak = VmHWM",
        "tolerance_percent": TOLERANCE_PERCENT,
        "rows": rows,
        "summary": s,
    }
    write_json(args.output, report)
    print(f"memory: {s['memory_within_tolerance']}/{s['pairs']} within {TOLERANCE_PERCENT}% (worst {s['worst_memory_error_percent']:+.2f}%, "
          f"{s['worst_memory_pair']}); decode: median |error| {s['median_abs_decode_error_percent']}%, max {s['max_abs_decode_error_percent']}%")
    print(f"written to {args.output}")
    return 0 if s["memory_within_tolerance"] == s["pairs"] else 1


if __name__ == "__main__":
    sys.exit(main())
