"""Benchmark: scoring speed with the vignette's KV cache reused, and the drift ordering.

In one run on this machine:
1. seconds per case scoring the shipped cases by log-likelihood on one variant, with the
   vignette evaluated once and its cache cut back for every option, against evaluating the
   vignette again before each option; the arms alternate case by case, so noise hits both, and
   the scores must agree. Target: reuse at least 2x faster.
2. drift from the F16 reference on the clinical text for Q8_0, Q6_K, Q4_K_M and Q2_K: mean KL
   divergence must order Q8_0 < Q6_K < Q4_K_M < Q2_K.

    python -m edgecds.hwbench.bench.bench_eval edgecds-out/SmolLM2-135M-Instruct

Writes JSON (default bench-results/eval.json).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgecds import __version__
from edgecds.adopt import open_variants
from edgecds.atomic import write_json
from edgecds.cases import Case, drift_text, load_cases
from edgecds.drift import DRIFT_CTX, drift_against, drift_logprobs
from edgecds.engine import EngineSettings
from edgecds.engine.gguf_runtime import GgufRuntime
from edgecds.evaluate import option_logprobs
from edgecds.variants import VariantRecord, variant_file

SPEEDUP_TARGET = 2.0
DRIFT_ORDER = ("Q8_0", "Q6_K", "Q4_K_M", "Q2_K")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", type=Path, help="a variants.json written by edgecds quantize, or its folder")
    parser.add_argument("--type", default="Q4_K_M", help="the variant whose scoring is timed")
    parser.add_argument("--cases", type=int, default=40, help="how many of the shipped cases to time")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--output", type=Path, default=Path("bench-results/eval.json"))
    return parser.parse_args(argv)


def _time_scoring(model: Path, cases: list[Case], threads: int) -> tuple[float, float, float]:
    """Seconds scoring `cases` with the vignette's cache reused and from scratch, arms alternating
    case by case, and the largest difference between the two arms' scores."""
    runtime = GgufRuntime(model, EngineSettings(n_ctx=2048, threads=threads))
    reuse_s, scratch_s, worst_gap = 0.0, 0.0, 0.0
    try:
        option_logprobs(runtime, cases[0])  # warm-up
        for n, case in enumerate(cases):
            arms = (True, False) if n % 2 == 0 else (False, True)
            got = {}
            for reuse in arms:
                start = time.perf_counter()
                got[reuse] = option_logprobs(runtime, case, reuse_prefix=reuse)[0]
                elapsed = time.perf_counter() - start
                if reuse:
                    reuse_s += elapsed
                else:
                    scratch_s += elapsed
            worst_gap = max(worst_gap, max(abs(a - b) for a, b in zip(got[True], got[False], strict=True)))
    finally:
        runtime.close()
    return reuse_s, scratch_s, worst_gap


def _drift_by_type(folder: Path, by_type: dict[str, VariantRecord], threads: int) -> dict[str, Any]:
    """Each of DRIFT_ORDER's drift from F16 on the clinical text."""
    text = drift_text()
    drift: dict[str, Any] = {}
    base = None
    for qtype in ("F16", *DRIFT_ORDER):
        runtime = GgufRuntime(variant_file(folder, by_type[qtype]), EngineSettings(n_ctx=DRIFT_CTX, threads=threads))
        try:
            logprobs, targets = drift_logprobs(runtime, text)
        finally:
            runtime.close()
        if base is None:
            base = (logprobs, targets)
            continue
        drift[qtype] = drift_against(base[0], logprobs, base[1])
        print(f"drift {qtype}: KL {drift[qtype]['kl_mean']:.4f}, top-1 {drift[qtype]['top1_agreement']:.3f}, "
              f"perplexity {drift[qtype]['perplexity']:.2f}", file=sys.stderr)
    return drift


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    folder, record = open_variants(args.variants)
    by_type = record.by_type()
    missing = [t for t in ("F16", args.type, *DRIFT_ORDER) if t not in by_type]
    if missing:
        print(f"{folder} lacks variant(s) {', '.join(missing)}; run edgecds quantize with the default types", file=sys.stderr)
        return 2
    cases = list(load_cases().cases[: args.cases])

    reuse_s, scratch_s, worst_gap = _time_scoring(variant_file(folder, by_type[args.type]), cases, args.threads)
    speedup = scratch_s / reuse_s
    print(f"scoring {len(cases)} cases: reuse {reuse_s / len(cases):.3f} s/case, scratch {scratch_s / len(cases):.3f} s/case, "
          f"{speedup:.2f}x (largest score difference {worst_gap:.2e})", file=sys.stderr)

    drift = _drift_by_type(folder, by_type, args.threads)
    kls = [drift[t]["kl_mean"] for t in DRIFT_ORDER]
    ordered = all(a < b for a, b in zip(kls, kls[1:], strict=False))

    report = {
        "schema_version": 1,
        "benchmark": "log-likelihood scoring with the vignette's cache reused vs from scratch; drift ordering",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "threads": args.threads},
        "versions": {"edgecds": __version__, "python": platform.python_version()},
        "scoring": {"variant": args.type, "cases": len(cases), "reuse_seconds_per_case": round(reuse_s / len(cases), 4),
                    "scratch_seconds_per_case": round(scratch_s / len(cases), 4), "speedup": round(speedup, 3),
                    "target": SPEEDUP_TARGET, "holds": speedup >= SPEEDUP_TARGET, "largest_score_difference": worst_gap},
        "drift": {"reference": "F16", "text_tokens_scored": drift[DRIFT_ORDER[0]]["tokens_scored"], "by_type": drift,
                  "expected_order": list(DRIFT_ORDER), "ordered": ordered},
    }
    write_json(args.output, report)
    print(f"speedup {speedup:.2f}x (target >= {SPEEDUP_TARGET}); KL {' < '.join(f'{t} {k:.4f}' for t, k in zip(DRIFT_ORDER, kls, strict=True))}: "
          f"{'ordered' if ordered else 'NOT ordered'}")
    print(f"written to {args.output}")
    return 0 if speedup >= SPEEDUP_TARGET and ordered else 1


if __name__ == "__main__":
    sys.exit(main())
