"""Benchmark: decode with and without a speculative draft (issue 33.3).

For each target, in one process, each clinical prompt (the first cases of the shipped set, in the
model's chat template) is answered greedily without a draft and then with each draft, in turn,
`--repeats` times: the speeds are paired in time, so a neighbour or the clock slows both alike,
and each ratio is the median of the paired ratios. Decode speed is the answer's tokens after the
first over their own time (the prompt excluded, as `profile` measures it). Also recorded: the
drafted tokens the target kept, and how many answers were token-for-token those without a draft.

First, why an answer can change: the logits of a batch against one-token decoding, per variant
(`batch_vs_one_token`). Then, targets and drafts:
- the default model (SmolLM2-135M): F16 and Q8_0 targets; Q2_K, Q3_K_M and Q4_K_M drafts (each
  at the default --draft-p-min and at 0, drafting always) and n-gram lookup;
- the real Gemma 3 270M: it ships as Q4_K_M only, so its one model draft is a Q2_K requantized
  from that Q4_K_M (llama-quantize --allow-requantize; labelled so), beside n-gram lookup.

    python -m edgecds.hwbench.bench.bench_speculative            # writes bench-results/speculative.json
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from edgecds.hwbench.bench.bench_fit import write_report
from edgecds.hwbench.measure import timed_answer

DEFAULT_DRAFTS = ("Q2_K", "Q3_K_M", "Q4_K_M")


def _prompts(n: int) -> list[str]:
    from edgecds.cases import load_cases

    return [f"{c.vignette}\n{c.question}" for c in load_cases().cases[:n]]


def measure_target(target: Path, drafts: dict[str, Any], prompts: list[str], tokens: int, repeats: int, threads: int) -> dict[str, Any]:
    """`drafts`: label -> DraftSettings. Every draft against the target alone, paired prompt by prompt."""
    from edgecds.engine import EngineSettings
    from edgecds.engine.factory import open_runtime
    from edgecds.engine.speculative import DraftStats, Speculation

    settings = EngineSettings(n_ctx=1024, threads=threads)
    runtime = open_runtime(target, settings)
    rows = []
    try:
        encoded = [runtime.tokenize(runtime.chat_prompt(p)) for p in prompts]
        timed_answer(runtime, encoded[0], 8)  # warm-up
        for label, draft in drafts.items():
            spec = Speculation.open(draft, settings, runtime)
            try:
                timed_answer(runtime, encoded[0], 8, spec)
                spec.stats = DraftStats()
                ratios, alone_tps, with_tps, identical, answers = [], [], [], 0, 0
                for _ in range(repeats):
                    for ids in encoded:
                        plain, t_plain = timed_answer(runtime, ids, tokens)
                        drafted, t_draft = timed_answer(runtime, ids, tokens, spec)
                        if len(plain) < 2:
                            continue
                        alone_tps.append((len(plain) - 1) / t_plain)
                        with_tps.append((len(drafted) - 1) / t_draft)
                        ratios.append(with_tps[-1] / alone_tps[-1])
                        identical += plain == drafted
                        answers += 1
                rate = spec.stats.acceptance_rate
                rows.append({"draft": label, "decode_tps": round(statistics.median(alone_tps), 1),
                             "decode_tps_with_draft": round(statistics.median(with_tps), 1),
                             "speedup": round(statistics.median(ratios), 3), "speedup_range": [round(min(ratios), 3), round(max(ratios), 3)],
                             "acceptance_rate": round(rate, 3) if rate is not None else None,
                             "drafted_per_step": round(spec.stats.drafted / max(spec.stats.steps, 1), 2),
                             "tokens_per_step": round(spec.stats.emitted / max(spec.stats.steps, 1), 2),
                             "identical_answers": identical, "answers": answers, "settings": {"max_tokens": draft.max_tokens, "p_min": draft.p_min}})
                print(f"  {target.name} with {label}: {rows[-1]['speedup']}x, kept {rows[-1]['acceptance_rate']}, "
                      f"identical {identical}/{answers}", flush=True)
            finally:
                spec.close()
    finally:
        runtime.close()
    return {"target": target.name, "rows": rows}


def batch_arithmetic(files: dict[str, Path], threads: int | None) -> dict[str, Any]:
    """Why batched verification can change an answer: the logits llama.cpp gives 6 tokens decoded
    in one batch against the same tokens decoded one at a time, after the same prefix (largest
    absolute difference per row), with its CPU weight repacking on and off; and whether each
    path repeats itself bit for bit."""
    import numpy as np

    from edgecds.engine import EngineSettings
    from edgecds.engine.factory import open_runtime

    out: dict[str, Any] = {}
    for name, path in files.items():
        for repack in (True, False):
            runtime = open_runtime(path, EngineSettings(n_ctx=512, threads=threads, extra_buffers=repack))
            try:
                ids = runtime.tokenize(_prompts(1)[0])
                head, tail = ids[:-6], ids[-6:]
                runs = []
                for _ in range(2):
                    runtime.reset()
                    runtime.eval(head)
                    single = []
                    for token in tail:
                        runtime.eval([token])
                        single.append(np.array(runtime.logits()))
                    runtime.reset()
                    runtime.eval(head)
                    runs.append((np.stack(single), np.array(runtime.eval_logits(tail))))
                (one, batch), (one_again, batch_again) = runs
                out[f"{name}, repacking {'on' if repack else 'off'}"] = {
                    "max_abs_diff_per_row": [round(float(d), 4) for d in np.abs(one - batch).max(axis=1)],
                    "each_path_repeats_exactly": bool(np.array_equal(one, one_again) and np.array_equal(batch, batch_again))}
            finally:
                runtime.close()
    return out


def _drafts_of(files: dict[str, Path], names: tuple[str, ...]) -> dict[str, Any]:
    from edgecds.engine.speculative import NGRAM, DraftSettings

    drafts: dict[str, Any] = {}
    for name in names:
        drafts[name] = DraftSettings(str(files[name]))
        drafts[f"{name}, p-min 0"] = DraftSettings(str(files[name]), p_min=0.0, max_tokens=4)
    drafts[NGRAM] = DraftSettings(NGRAM)
    return drafts


def default_model(work: Path) -> dict[str, Path]:
    from edgecds.formats.types import parse_type_list
    from edgecds.quant.quantize import QuantizeConfig, run_quantize

    result = run_quantize(QuantizeConfig(output=work / "default", types=parse_type_list("F16,Q8_0," + ",".join(DEFAULT_DRAFTS))))
    return {o.record.type: Path(result.output_dir) / o.record.path for o in result.outcomes}


def gemma(work: Path) -> dict[str, Path]:
    """The real Gemma 3 270M (Q4_K_M, as it ships) and a Q2_K requantized from it."""
    import llama_cpp

    from edgecds.models import pull

    source = Path(pull("gemma3-270m").path)
    draft = work / "gemma" / "gemma-3-270m-Q2_K-from-Q4_K_M.gguf"
    if not draft.exists():
        draft.parent.mkdir(parents=True, exist_ok=True)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.allow_requantize, params.nthread = llama_cpp.LLAMA_FTYPE_MOSTLY_Q2_K, True, 0
        if llama_cpp.llama_model_quantize(str(source).encode(), str(draft).encode(), params) != 0:
            raise SystemExit("llama.cpp could not requantize Gemma 3 270M to Q2_K")
    return {"Q4_K_M": source, "Q2_K (requantized)": draft}


def markdown(results: list[dict[str, Any]]) -> str:
    lines = ["| target | draft | decode tok/s alone | with the draft | speedup (range) | drafted kept | tokens a step | same answer |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        for row in r["rows"]:
            rate = f"{row['acceptance_rate']:.0%}" if row["acceptance_rate"] is not None else "none drafted"
            lines.append(f"| {r['target']} | {row['draft']} | {row['decode_tps']} | {row['decode_tps_with_draft']} | "
                         f"{row['speedup']:.2f}x ({row['speedup_range'][0]:.2f}-{row['speedup_range'][1]:.2f}) | {rate} | "
                         f"{row['tokens_per_step']} | {row['identical_answers']}/{row['answers']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=5, help="clinical prompts (the first cases of the shipped set)")
    parser.add_argument("--tokens", type=int, default=96, help="answer tokens at most")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="[default: llama.cpp's]")
    parser.add_argument("--no-gemma", action="store_true")
    parser.add_argument("--work", type=Path, default=Path("bench-results/speculative-work"))
    parser.add_argument("--output", type=Path, default=Path("bench-results/speculative.json"))
    args = parser.parse_args()
    from edgecds.engine.speculative import NGRAM, DraftSettings

    prompts = _prompts(args.prompts)
    files = default_model(args.work)
    arithmetic = batch_arithmetic(files, args.threads)
    for label, row in arithmetic.items():
        print(f"  batch against one token, {label}: {row}", flush=True)
    results: list[dict[str, Any]] = [{"batch_vs_one_token": arithmetic, "rows": []}]
    results += [measure_target(files[t], _drafts_of(files, DEFAULT_DRAFTS), prompts, args.tokens, args.repeats, args.threads)
                for t in ("F16", "Q8_0")]
    if not args.no_gemma:
        pair = gemma(args.work)
        drafts = {"Q2_K (requantized)": DraftSettings(str(pair["Q2_K (requantized)"])),
                  "Q2_K (requantized), p-min 0": DraftSettings(str(pair["Q2_K (requantized)"]), p_min=0.0, max_tokens=4),
                  NGRAM: DraftSettings(NGRAM)}
        results.append(measure_target(pair["Q4_K_M"], drafts, prompts, args.tokens, args.repeats, args.threads))
    write_report("speculative", results, markdown(results), args.output)


if __name__ == "__main__":
    main()
