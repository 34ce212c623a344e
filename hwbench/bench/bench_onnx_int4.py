"""Benchmark: ONNX int4 by onnxruntime's weight-only algorithms against GGUF Q4_K_M (issue 32.5).

For each model, in one run: the ONNX fp32 export and GGUF's F16 and Q4_K_M; then ONNX int4 by
round-to-nearest (onnxruntime's default), k_quant and HQQ, each alone and with `--mixed` (int8 for
attention V and FFN down in the layers llama.cpp's Q4_K_M widens). Drift of each ONNX variant
against the ONNX fp32 export, and of Q4_K_M against F16, on the whole drift text; file sizes.

Models: the default model, and the qwen3 zoo model (random weights from the real layout). The
default model's weights are rebuilt from a Q4_1 GGUF: they already lie on an asymmetric 4-bit grid
of 32-weight blocks, which an asymmetric block-32 quantizer (HQQ's, llama.cpp's Q4_1) can land on
almost exactly, so its figures flatter those; the zoo model has no such grid.

    python -m edgecds.hwbench.bench.bench_onnx_int4 --models default,qwen3
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from edgecds.formats.types import parse_type_list

CONFIGS = (("rtn", False), ("k_quant", False), ("hqq", False), ("rtn", True), ("k_quant", True), ("hqq", True))
MIB = 1 << 20


def _drift(reference: tuple[Any, Any], path: Path) -> dict[str, Any]:
    from edgecds.cases import drift_text
    from edgecds.drift import drift_against, drift_logprobs
    from edgecds.engine import EngineSettings
    from edgecds.engine.factory import open_runtime

    runtime = open_runtime(path, EngineSettings())
    try:
        logprobs, _ = drift_logprobs(runtime, drift_text())
    finally:
        runtime.close()
    return drift_against(reference[0], logprobs, reference[1])


def _reference(path: Path) -> tuple[Any, Any]:
    from edgecds.cases import drift_text
    from edgecds.drift import drift_logprobs
    from edgecds.engine import EngineSettings
    from edgecds.engine.factory import open_runtime

    runtime = open_runtime(path, EngineSettings())
    try:
        return drift_logprobs(runtime, drift_text())
    finally:
        runtime.close()


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir()) if path.is_dir() else path.stat().st_size


def run_model(name: str, work: Path) -> dict[str, Any]:
    from edgecds.formats.types import quant_type
    from edgecds.hwbench.bench.bench_fit import source_folder
    from edgecds.quant.onnx_build import OnnxOptions, copy_side_files, quantize_weights
    from edgecds.quant.quantize import QuantizeConfig, run_quantize

    folder = source_folder(name)
    built = run_quantize(QuantizeConfig(source=folder, output=work, types=parse_type_list("F16,Q4_K_M,ONNX_FP32"), formats=("gguf", "onnx")))
    paths = {o.record.type: work / o.record.path for o in built.outcomes}
    gguf_reference = _reference(paths["F16"])
    rows = [{"variant": "GGUF Q4_K_M", "MiB": round(_size(paths["Q4_K_M"]) / MIB, 1), **_pick(_drift(gguf_reference, paths["Q4_K_M"]))}]
    onnx_reference = _reference(paths["ONNX_FP32"])
    for algorithm, mixed in CONFIGS:
        out = work / f"int4-{algorithm}{'-mixed' if mixed else ''}"
        out.mkdir(exist_ok=True)
        start = time.perf_counter()
        _, notes = quantize_weights(paths["ONNX_FP32"], out, quant_type("ONNX_INT4"), OnnxOptions(algorithm=algorithm, mixed=mixed))
        copy_side_files(paths["ONNX_FP32"], out)
        seconds = round(time.perf_counter() - start, 1)
        rows.append({"variant": f"ONNX_INT4 {algorithm}{' --mixed' if mixed else ''}", "MiB": round(_size(out) / MIB, 1),
                     **_pick(_drift(onnx_reference, out)), "seconds": seconds, "notes": notes})
    return {"model": name, "rows": rows}


def _pick(drift: dict[str, Any]) -> dict[str, Any]:
    return {k: drift[k] for k in ("kl_mean", "kl_p99", "kl_p999", "top1_agreement", "tokens_scored")}


def markdown(results: list[dict[str, Any]]) -> str:
    lines = ["| model | variant | MiB | mean KL | KL p99.9 | same top-1 | quantize s |", "|---|---|---|---|---|---|---|"]
    for r in results:
        for row in r["rows"]:
            lines.append(f"| {r['model']} | {row['variant']} | {row['MiB']:.1f} | {row['kl_mean']:.4f} | {row['kl_p999']:.3f} "
                         f"| {row['top1_agreement']:.3f} | {row.get('seconds', '')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="default,qwen3")
    parser.add_argument("--work", type=Path, default=Path("bench-results/onnx-int4-work"))
    parser.add_argument("--output", type=Path, default=Path("bench-results/onnx-int4.json"))
    args = parser.parse_args()
    from edgecds.hwbench.bench.bench_fit import write_report

    results = [run_model(name, args.work / name) for name in args.models.split(",")]
    write_report("onnx-int4", results, markdown(results), args.output)


if __name__ == "__main__":
    main()
