"""Benchmark: a GGUF fitted by `quantize --fit` against the standard types at equal size (issue 32.2).

For each model, in one run:

1. the standard types (F16 reference, Q2_K .. Q8_0) with llama.cpp's own mixtures;
2. two target sizes between standard types (halfway between Q3_K_M and Q4_K_M, and between
   Q4_K_M and Q5_K_M file sizes), each fitted with `--target-size`;
3. `edgecds eval` over every variant: drift against F16 on the whole drift text (mean KL, p99,
   p99.9, same top-1) and the case set's answers, paired with F16's (McNemar).

Each fitted variant is set against the best standard type a clinic could put in the same budget
(the largest standard file at or under the target) and the next larger one, as ratios of mean KL
and p99.9 KL. Models: the default model, and two random-weight zoo models from real layouts (a
dense one and a mixture of experts). Writes JSON (default bench-results/fit.json) and prints the
table the README shows.

    python -m edgecds.hwbench.bench.bench_fit --models default,qwen3,qwen3moe
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgecds import __version__
from edgecds.formats.gguf_file import GgufInfo, read_gguf
from edgecds.formats.types import GGML_TYPE_BY_NAME, is_fitted, parse_type_list

STANDARD = "F16,Q2_K,Q3_K_M,Q4_K_M,Q5_K_M,Q6_K,Q8_0"
BETWEEN = (("Q3_K_M", "Q4_K_M"), ("Q4_K_M", "Q5_K_M"))
MIB = 1 << 20


def source_folder(name: str) -> Path | None:
    """None: the default model, as `quantize` with no SOURCE takes it (and names it)."""
    from edgecds.quant.default_model import default_hf_folder

    if name == "default":
        return None
    from edgecds.quant.zoo import build, find_family

    return build(find_family(name), default_hf_folder(None))


def run_model(name: str, out: Path, builds: int, chunks: int) -> dict[str, Any]:
    from edgecds.evaluate import EvalConfig, run_eval
    from edgecds.quant.fit import FitOptions, FitTarget
    from edgecds.quant.quantize import QuantizeConfig, run_quantize

    folder = source_folder(name)
    start = time.perf_counter()
    standard = run_quantize(QuantizeConfig(source=folder, output=out, types=parse_type_list(STANDARD)))
    sizes = {o.record.type: o.record.file_size for o in standard.outcomes}
    standard_paths = {o.record.type: o.record.path for o in standard.outcomes}
    seconds = {"standard": round(time.perf_counter() - start, 1)}
    targets = [(sizes[low] + sizes[high]) // 2 for low, high in BETWEEN]
    fits = []
    for target in targets:
        start = time.perf_counter()
        result = run_quantize(QuantizeConfig(source=folder, output=out, fit=FitOptions(FitTarget(size_bytes=target), max_builds=builds, drift_chunks=chunks)))
        [fit] = [o.record for o in result.outcomes if is_fitted(o.record.type)]
        fits.append((target, fit, round(time.perf_counter() - start, 1)))
    start = time.perf_counter()
    evaluation = run_eval(EvalConfig(variants=out))
    seconds["eval"] = round(time.perf_counter() - start, 1)
    scored = {o.record.variant.type: o.record for o in evaluation.outcomes}
    rows = {t: _row(scored[t], scored[t].variant.file_size) for t in scored}
    comparisons = []
    for target, fit, fit_seconds in fits:
        under = max((t for t in sizes if t != "F16" and sizes[t] <= target), key=lambda t: sizes[t], default=None)
        over = min((t for t in sizes if t != "F16" and sizes[t] > target), key=lambda t: sizes[t], default=None)
        mine = rows[fit.type]
        comparisons.append({
            "target_mib": round(target / MIB, 2), "fitted": fit.type, "fitted_mib": round(fit.file_size / MIB, 2),
            "groups": fit.options["fit"]["groups"], "probe_builds": fit.options["fit"]["probe_builds"],
            "probes_reused": fit.options["fit"]["probes_reused"], "seconds": fit_seconds,
            "standard_at_or_under": under, "standard_over": over,
            "kl_mean_ratio_vs_under": _ratio(mine["kl_mean"], rows[under]["kl_mean"]) if under else None,
            "kl_p999_ratio_vs_under": _ratio(mine["kl_p999"], rows[under]["kl_p999"]) if under else None,
            "kl_mean_ratio_vs_over": _ratio(mine["kl_mean"], rows[over]["kl_mean"]) if over else None,
            "kl_p999_ratio_vs_over": _ratio(mine["kl_p999"], rows[over]["kl_p999"]) if over else None,
            "beats_under": bool(under) and mine["kl_mean"] < rows[under]["kl_mean"] and mine["kl_p999"] < rows[under]["kl_p999"],
            "beats_over": bool(over) and mine["kl_mean"] < rows[over]["kl_mean"] and mine["kl_p999"] < rows[over]["kl_p999"],
            **(reach(fit.options["fit"], target, fit.file_size, read_gguf(out / standard_paths[over])) if over else {}),
        })
    return {"model": name, "rows": rows, "comparisons": comparisons, "seconds": seconds}


def reach(fit: dict[str, Any], target: int, fitted_size: int, standard: GgufInfo) -> dict[str, Any]:
    """What the fit's own measured costs (added mean KL per group and type, taken to add up, as
    the search takes them) say of a target: the least mean KL any mix of the probed types predicts
    within it, and the mean KL they predict for a standard file's tensors, each tensor charged its
    share of its group's cost at its type (None where it has a type the probes did not measure).
    Where the fitted variant loses to a larger standard type, this says whether any mix could win."""
    from edgecds.quant.fit import Choice, cheapest

    costs, pattern_of = fit["costs"], dict(zip(fit["groups"], fit["patterns"], strict=True))
    fixed = fitted_size - sum(costs[g][kind]["bytes"] for g, kind in fit["groups"].items())  # header, norms, padding
    options = {g: [Choice(GGML_TYPE_BY_NAME[kind], c["bytes"], c["kl"]) for kind, c in by_kind.items()] for g, by_kind in costs.items()}
    best = cheapest(options, target - fixed)
    members: dict[str, list[Any]] = {g: [t for t in standard.tensors if re.match(pattern_of[g], t.name)] for g in costs}
    shares = [(costs[g].get(t.type_name), t.n_elements / sum(m.n_elements for m in ts)) for g, ts in members.items() for t in ts]
    return {"probes_best_kl_mean_in_target": round(fit["kl_top"] + sum(c.kl for c in best.values()), 6) if best else None,
            "probes_kl_mean_of_over": None if any(c is None for c, _ in shares)
            else round(fit["kl_top"] + sum(c["kl"] * share for c, share in shares if c is not None), 6)}


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def _row(e: Any, size: int) -> dict[str, Any]:
    d, p = e.drift or {}, e.paired or {}
    return {"file_mib": round(size / MIB, 2), "kl_mean": d.get("kl_mean"),
            "kl_p99": d.get("kl_p99"), "kl_p999": d.get("kl_p999"), "top1_agreement": d.get("top1_agreement"),
            "accuracy": e.metrics.get("accuracy"), "vs_f16_lost": p.get("lost"), "vs_f16_gained": p.get("gained"),
            "mcnemar_p": p.get("p_value")}


def markdown(results: list[dict[str, Any]]) -> str:
    lines = ["| model | variant | MiB | mean KL | KL p99 | KL p99.9 | same top-1 | accuracy | vs F16 lost/gained (McNemar p) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for t, row in sorted(r["rows"].items(), key=lambda kv: kv[1]["file_mib"]):
            if t == "F16":
                continue
            name = f"**{t}**" if is_fitted(t) else t
            lost = f"{row['vs_f16_lost']}/{row['vs_f16_gained']} ({row['mcnemar_p']:.2f})" if row["mcnemar_p"] is not None else ""
            lines.append(f"| {r['model']} | {name} | {row['file_mib']:.1f} | {row['kl_mean']:.4f} | {row['kl_p99']:.3f} | {row['kl_p999']:.3f} "
                         f"| {row['top1_agreement']:.3f} | {row['accuracy']:.3f} | {lost} |")
    lines += ["", "| model | target MiB | fitted | vs the standard type in the same budget (mean KL, p99.9 ratio) | vs the next larger type |",
              "|---|---|---|---|---|"]
    for r in results:
        for c in r["comparisons"]:
            lines.append(f"| {r['model']} | {c['target_mib']:.1f} | {c['fitted']} ({c['fitted_mib']:.1f} MiB, {c['probe_builds']} builds) "
                         f"| {c['standard_at_or_under']}: {c['kl_mean_ratio_vs_under']}, {c['kl_p999_ratio_vs_under']} "
                         f"| {c['standard_over']}: {c['kl_mean_ratio_vs_over']}, {c['kl_p999_ratio_vs_over']} |")
    for r in results:
        for c in r["comparisons"]:
            best, theirs = c.get("probes_best_kl_mean_in_target"), c.get("probes_kl_mean_of_over")
            if c["standard_over"] and not c["beats_over"] and best is not None and theirs is not None:
                lines.append(f"\n{r['model']} at {c['target_mib']:.1f} MiB: by the fit's measured costs, the best mix of the probed types within "
                             f"the target predicts mean KL {best:.4f}; {c['standard_over']}'s tensors predict {theirs:.4f} "
                             f"({'no mix within the target can match it' if best > theirs else 'a mix within the target could match it'}).")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="default,qwen3,qwen3moe", help="default (SmolLM2-135M) and zoo family names")
    parser.add_argument("--work", type=Path, default=Path("bench-results/fit-work"))
    parser.add_argument("--builds", type=int, default=40, help="--fit-builds")
    parser.add_argument("--chunks", type=int, default=2, help="--fit-chunks")
    parser.add_argument("--output", type=Path, default=Path("bench-results/fit.json"))
    args = parser.parse_args()
    results = [run_model(name, args.work / name, args.builds, args.chunks) for name in args.models.split(",")]
    write_report("fit", results, markdown(results), args.output)


def write_report(benchmark: str, results: list[dict[str, Any]], table: str, output: Path) -> None:
    """The JSON every benchmark here writes (results, the machine, the markdown table), and the table."""
    report = {"benchmark": benchmark, "edgecds": __version__, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": platform.processor() or platform.machine(), "results": results, "markdown": table}
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(table)
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
