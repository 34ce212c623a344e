"""Quantizing with the clinical importance matrix against without, on the default model.

For each type: the variant built from the same F16 with and without `--imatrix clinical`, each
scored by `edgecds eval` (every case, loglik; drift on the drift text against the F16), then paired
against each other case by case (exact McNemar). Optionally (`--tool PATH`) the matrix edgecds
computes is compared with llama.cpp's own `llama-imatrix` built from the vendored sources, on the
same model, text and chunks. Writes JSON.

    python -m edgecds.hwbench.bench.bench_imatrix --types Q4_K_M,IQ4_NL,Q3_K_M,Q2_K,IQ3_XXS,IQ2_XS --tool /tmp/imtool/bin/llama-imatrix
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgecds.atomic import write_json
from edgecds.evaluate import EvalConfig, run_eval
from edgecds.formats.types import parse_type_list
from edgecds.quant.calibration import CALIBRATION_TEXT, ImatrixOptions, calibration_text
from edgecds.quant.quantize import QuantizeConfig, run_quantize
from edgecds.results import load_results
from edgecds.stats import paired_comparison


def _build(folder: Path, types: str, imatrix: bool, chunks: int | None) -> float:
    start = time.perf_counter()
    run_quantize(QuantizeConfig(output=folder, types=parse_type_list("F16," + types),
                                imatrix=ImatrixOptions(chunks=chunks) if imatrix else None))
    return time.perf_counter() - start


def _scores(folder: Path, types: tuple[str, ...]) -> dict[str, Any]:
    run_eval(EvalConfig(variants=folder, types=types))
    results = load_results(folder / "results.json")
    assert results is not None
    return {e.variant.type: e for e in results.evaluations}


def compare_with_tool(tool: Path, model: Path, chunks: int, work: Path) -> dict[str, Any]:
    """edgecds's matrix against llama-imatrix's on the same model, text and chunk count."""
    import numpy as np

    from edgecds.quant import imatrix

    text = work / CALIBRATION_TEXT
    text.write_text(calibration_text(), encoding="utf-8")
    ours = imatrix.compute(model, calibration_text(), CALIBRATION_TEXT, "", work / "ours.gguf", 512, chunks)
    start = time.perf_counter()
    subprocess.run([str(tool), "-m", str(model), "-f", str(text), "-o", str(work / "tool.gguf"), "-c", "512", "-b", "512", "-ub", "512",
                    "--chunks", str(chunks), "-t", "2", "--no-ppl"], check=True, capture_output=True)
    tool_seconds = time.perf_counter() - start
    a, b = imatrix.read(work / "ours.gguf"), imatrix.read(work / "tool.gguf")
    rel = [float(np.max(np.abs(a.values[k] - b.values[k]) / np.maximum(np.abs(b.values[k]), 1e-12))) for k in b.values if k in a.values]
    return {"entries_ours": len(a.values), "entries_tool": len(b.values), "same_names": sorted(a.values) == sorted(b.values),
            "max_relative_difference": max(rel) if rel else None, "chunks": [a.chunks, b.chunks], "seconds_ours": ours.seconds,
            "seconds_tool": round(tool_seconds, 3)}


def _row(t: str, plain: Any, imat: Any) -> dict[str, Any]:
    ref = [c["correct"] for c in plain.per_case]
    var = [c["correct"] for c in imat.per_case]
    paired = paired_comparison(ref, var)
    return {"type": t, "kl_mean": [plain.drift and plain.drift["kl_mean"], imat.drift["kl_mean"] if imat.drift else None],
            "top1": [plain.drift and plain.drift["top1_agreement"], imat.drift["top1_agreement"] if imat.drift else None],
            "accuracy": [plain.metrics["accuracy"], imat.metrics["accuracy"]], "imatrix_vs_plain": asdict(paired)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--types", default="Q4_K_M,IQ4_NL,Q3_K_M,Q2_K")
    parser.add_argument("--needs-imatrix", default="IQ3_XXS,IQ2_XS", help="types built with the matrix only")
    parser.add_argument("--chunks", type=int, default=None)
    parser.add_argument("--tool", type=Path, help="llama-imatrix, to compare the matrices")
    parser.add_argument("--output", type=Path, default=Path("bench-results/imatrix.json"))
    args = parser.parse_args(argv)
    types = tuple(t.strip().upper() for t in args.types.split(","))
    only = tuple(t.strip().upper() for t in args.needs_imatrix.split(",") if t.strip())
    with tempfile.TemporaryDirectory(prefix="edgecds-bench-imatrix-") as tmp:
        work = Path(tmp)
        plain_s = _build(work / "plain", ",".join(types), False, None)
        imat_s = _build(work / "imatrix", ",".join(types + only), True, args.chunks)
        plain, imat = _scores(work / "plain", types), _scores(work / "imatrix", types + only)
        report: dict[str, Any] = {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "model": "SmolLM2-135M-Instruct",
            "calibration": CALIBRATION_TEXT, "chunks": args.chunks, "build_seconds": {"plain": round(plain_s, 1), "imatrix": round(imat_s, 1)},
            "rows": [_row(t, plain[t], imat[t]) for t in types],
            "imatrix_only": [{"type": t, "kl_mean": imat[t].drift["kl_mean"] if imat[t].drift else None,
                              "top1": imat[t].drift["top1_agreement"] if imat[t].drift else None, "accuracy": imat[t].metrics["accuracy"],
                              "vs_f16": imat[t].paired} for t in only],
            "f16_accuracy": plain["F16"].metrics["accuracy"],
        }
        args.output.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.output, report)  # the scores are kept even if the comparison below fails
        if args.tool:
            f16 = next((work / "plain").glob("*-F16.gguf"))
            report["tool_comparison"] = compare_with_tool(args.tool, f16, args.chunks or 4, work)
    write_json(args.output, report)
    for row in report["rows"]:
        print(f"{row['type']:<8} KL {row['kl_mean'][0]:.4f} -> {row['kl_mean'][1]:.4f}  top-1 {row['top1'][0]:.3f} -> {row['top1'][1]:.3f}  "
              f"acc {row['accuracy'][0]:.3f} -> {row['accuracy'][1]:.3f}  McNemar p {row['imatrix_vs_plain']['p_value']:.3g}")
    print(f"-> {args.output}")


if __name__ == "__main__":
    main()
