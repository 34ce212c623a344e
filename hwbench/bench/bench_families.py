"""Benchmark: every family of the zoo (and the real Gemma 3 270M) through edgecds, in one run.

Per family, on this machine:

- conversion: the converter's seconds for the F16 GGUF, and the quantizer's for Q8_0, Q4_K_M, Q2_K;
- parity: next-token logits of the F16 GGUF, and of the ONNX fp32/int8/int4 variants where
  Optimum exports the family, against transformers fp32 on 300 positions of clinical text;
- memory: the predicted peak against a fresh process's measured peak (VmHWM) at contexts 512 and
  4096, the constants calibrated in the same run on the default model (not on the zoo);
- speed: GGUF Q4_K_M decode tokens/s, and ONNX int4 decode with the fused attention against the
  graph as exported, each in fresh processes in the same run (a ratio, so machine noise cancels);
- the config-only estimate of each file's size against the file.

    python -m edgecds.hwbench.bench.bench_families [--families llama3,gemma3] [--no-onnx]

Writes JSON (default bench-results/families.json). Needs the build side and the pulled default
model (its tokenizer is the zoo's, its Q8_0 the calibration's); uses gemma3-270m when pulled.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgecds import __version__
from edgecds.atomic import write_json
from edgecds.engine import RunSettings

GGUF_TYPES = "F16,Q8_0,Q4_K_M,Q2_K"
ONNX_TYPES = "ONNX_FP32,ONNX_INT8,ONNX_INT4"
CONTEXTS = (512, 4096)
ROUNDS = 4  # fused and exported ONNX decode, alternated


def _record(result: Any, qtype: str) -> Any:
    return next((o.record for o in result.outcomes if o.record.type == qtype), None)


def _peaks(path: Path, calibration: Any) -> dict[str, Any]:
    from edgecds.formats.gguf_file import read_gguf
    from edgecds.hwbench.bench.bench_predict import host_device
    from edgecds.hwbench.measure import ONE_PASS, measure_in_subprocess
    from edgecds.hwbench.predict import percent_error, predict

    out = {}
    for n_ctx in CONTEXTS:
        settings = RunSettings(n_ctx=n_ctx, decode_tokens=16)
        predicted = predict(read_gguf(path), settings, host_device(), calibration).memory.peak_bytes
        measured = measure_in_subprocess(path, settings, ONE_PASS).peak_rss_bytes
        out[str(n_ctx)] = {"predicted_mib": round(predicted / 2**20, 1), "measured_mib": round(measured / 2**20, 1),
                           "error_pct": round(percent_error(predicted, measured), 2)}
    return out


def _decode_tps(path: Path, threads: int, **settings: Any) -> float:
    from edgecds.hwbench.measure import Workload, measure_in_subprocess

    run = RunSettings(n_ctx=1024, threads=threads, prompt_tokens=256, decode_tokens=64, **settings)
    return round(measure_in_subprocess(path, run, Workload(repeats=3, ttft=False)).decode_tps, 1)


def _family(family: Any, tokenizer: Path, out: Path, calibration: Any, threads: int, onnx: bool) -> dict[str, Any]:
    from edgecds.formats.types import parse_type_list, quant_type
    from edgecds.quant.from_config import estimate_gguf
    from edgecds.quant.parity import logit_parity
    from edgecds.quant.quantize import QuantizeConfig, run_quantize
    from edgecds.quant.zoo import build
    from edgecds.variants import variant_file

    start = time.perf_counter()
    folder = build(family, tokenizer)
    row: dict[str, Any] = {"family": family.name, "architecture": family.architecture, "gguf_arch": family.gguf_arch,
                           "represents": family.represents, "layout": list(family.layout), "build_s": round(time.perf_counter() - start, 1)}
    result = run_quantize(QuantizeConfig(source=folder, output=out / family.name, types=parse_type_list(GGUF_TYPES)))
    base = Path(result.output_dir)
    has_class = not family.built_with  # transformers has its class: the parity reference
    row["gguf"] = {t: {"mib": round(r.file_size / 2**20, 2), "bits_per_weight": round(r.bits_per_weight, 2),
                       "build_s": r.seconds.get("build"), "estimate_error_pct": round(
                           (estimate_gguf(folder / "config.json", quant_type(t)).file_size - r.file_size) / r.file_size * 100, 2)}
                   for t in GGUF_TYPES.split(",") if (r := _record(result, t))}
    row["conversion_s"] = row["gguf"]["F16"]["build_s"]
    row["parity_f16"] = asdict(logit_parity(folder, variant_file(base, _record(result, "F16")))) if has_class else None
    q4 = variant_file(base, _record(result, "Q4_K_M"))
    row["peak"] = _peaks(q4, calibration)
    row["gguf_q4_k_m_decode_tps"] = _decode_tps(q4, threads)
    if onnx:
        row["onnx"] = _onnx(folder, out / f"{family.name}-onnx", threads)
    return row


def _onnx(folder: Path, out: Path, threads: int) -> dict[str, Any]:
    from edgecds.engine.onnx_runtime import compiled_graph
    from edgecds.errors import EdgecdsError
    from edgecds.formats.types import parse_type_list
    from edgecds.quant.parity import logit_parity
    from edgecds.quant.quantize import QuantizeConfig, run_quantize
    from edgecds.variants import variant_file

    try:
        result = run_quantize(QuantizeConfig(source=folder, output=out, types=parse_type_list(ONNX_TYPES), formats=("onnx",)))
    except EdgecdsError as exc:
        return {"exported": False, "why": str(exc).splitlines()[0][:300]}
    base = Path(result.output_dir)
    data: dict[str, Any] = {"exported": True, "parity": {}}
    for t in ONNX_TYPES.split(","):
        record = _record(result, t)
        data["parity"][t] = asdict(logit_parity(folder, variant_file(base, record)))
    int4 = variant_file(base, _record(result, "ONNX_INT4"))
    _graph, note = compiled_graph(int4, 1024)
    data["fusion"] = note
    # alternated, each going first in turn, so that noise on this shared machine hits both alike
    runs: dict[bool, list[float]] = {False: [], True: []}
    for round_ in range(ROUNDS):
        for fuse in ((False, True) if round_ % 2 == 0 else (True, False)):
            runs[fuse].append(_decode_tps(int4, threads, fuse_attention=fuse))
    exported, fused = round(statistics.median(runs[False]), 1), round(statistics.median(runs[True]), 1)
    data["int4_decode_tps"] = {"exported": exported, "fused": fused, "rounds": ROUNDS, "samples": {"exported": runs[False], "fused": runs[True]},
                               "fused_over_exported": round(fused / exported, 3) if exported else None}
    return data


def _real_gemma(calibration: Any, threads: int) -> dict[str, Any] | None:
    from edgecds.models import cached_gguf, find_model, is_pulled

    model = find_model("gemma3-270m")
    if not is_pulled(model):
        return None
    path = cached_gguf(model)
    return {"model": model.id, "file": path.name, "peak": _peaks(path, calibration), "q4_k_m_decode_tps": _decode_tps(path, threads)}


def main(argv: list[str] | None = None) -> int:
    from edgecds.formats.types import parse_type_list
    from edgecds.hwbench.bench.calibrate import calibrate
    from edgecds.hwbench.predict import Calibration
    from edgecds.models import DEFAULT_MODEL, find_model, model_folder
    from edgecds.quant.quantize import QuantizeConfig, run_quantize
    from edgecds.quant.zoo import FAMILIES, NOT_COVERED, find_family

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--families", help="Comma list (default: every family of the zoo).")
    parser.add_argument("--no-onnx", action="store_true", help="Skip the ONNX export, parity and fused-attention speed.")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--output", type=Path, default=Path("bench-results/families.json"))
    args = parser.parse_args(argv)
    families = [find_family(n.strip()) for n in args.families.split(",")] if args.families else list(FAMILIES)
    tokenizer = model_folder(find_model(DEFAULT_MODEL)) / "hf"
    with tempfile.TemporaryDirectory(prefix="edgecds-bench-families-") as tmp:
        out = Path(tmp)
        default = run_quantize(QuantizeConfig(types=parse_type_list("Q8_0"), output=out / "default"))
        q8 = Path(default.output_dir) / default.outcomes[-1].record.path
        calibration = {"cpu": Calibration(backend="cpu", **calibrate(q8))}
        rows = []
        for family in families:
            print(f"bench_families: {family.name}", file=sys.stderr, flush=True)
            rows.append(_family(family, tokenizer, out, calibration, args.threads, not args.no_onnx))
        gemma = _real_gemma(calibration, args.threads)
    report = {
        "benchmark": "families", "edgecds": __version__, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", "threads": args.threads,
        "calibration": asdict(calibration["cpu"]), "families": rows, "real_gemma3_270m": gemma, "not_covered": NOT_COVERED,
    }
    write_json(args.output, report)
    _print_table(rows, gemma)
    print(f"wrote {args.output}")
    return 0


def _print_table(rows: list[dict[str, Any]], gemma: dict[str, Any] | None) -> None:
    print(f"{'family':10s} {'conv s':>6s} {'f16 p99':>8s} {'top1':>5s} {'err512':>7s} {'err4096':>7s} {'gguf t/s':>8s} "
          f"{'onnx int4 exp/fused t/s':>24s}  onnx parity top1 fp32/int8/int4")
    for r in rows:
        onnx = r.get("onnx") or {}
        speed = onnx.get("int4_decode_tps") or {}
        parity = "/".join(f"{p['top1_agreement']:.2f}" for p in (onnx.get("parity") or {}).values()) or onnx.get("why", "")[:40]
        parity_f16 = r["parity_f16"] or {"p99_abs_diff": float("nan"), "top1_agreement": float("nan")}
        print(f"{r['family']:10s} {r['conversion_s'] or 0:6.1f} {parity_f16['p99_abs_diff']:8.4f} {parity_f16['top1_agreement']:5.2f} "
              f"{r['peak']['512']['error_pct']:+6.1f}% {r['peak']['4096']['error_pct']:+6.1f}% {r['gguf_q4_k_m_decode_tps']:8.1f} "
              f"{speed.get('exported', ''):>11} / {speed.get('fused', ''):>10}  {parity}")
    if gemma:
        print(f"gemma3-270m (real): peak error {gemma['peak']['512']['error_pct']:+.1f}% at 512, {gemma['peak']['4096']['error_pct']:+.1f}% at 4096; "
              f"decode {gemma['q4_k_m_decode_tps']} tok/s")


if __name__ == "__main__":
    sys.exit(main())
