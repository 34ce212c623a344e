"""`edgecds tune` against llama.cpp's defaults, in one run: the tuned setting's gain on each
objective as a ratio to the defaults measured beside it, with every candidate and the accuracy
gate's verdicts; and, from the predictor, how the chosen settings would fare against the defaults
on the other device profiles (where measuring is not possible here). Writes JSON.

    python -m edgecds.hwbench.bench.bench_tune edgecds-out/SmolLM2-135M-Instruct --types Q4_K_M,Q8_0
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgecds.adopt import open_variants
from edgecds.atomic import write_json
from edgecds.devices import load_profiles
from edgecds.engine import RunSettings, settings_for
from edgecds.formats.gguf_file import read_gguf
from edgecds.hwbench.predict import predict
from edgecds.tune import TuneConfig, run_tune
from edgecds.variants import variant_file


def _predicted_elsewhere(path: Path, candidates: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each device profile, the candidate settings (threads, context and GPU layers stay the
    device's) the predictor expects to beat the device's defaults, and by how much."""
    info = read_gguf(path)
    rows = []
    for device in load_profiles().values():
        default = settings_for(device)
        base = predict(info, default, device)
        best: dict[str, Any] = {"device": device.id, "decode": None, "memory": None}
        for c in candidates[1:]:
            moved = {k: v for k, v in c["settings"].items() if k not in ("n_ctx", "threads", "n_gpu_layers")}
            guess = predict(info, RunSettings(**{**asdict(default), **moved}), device)
            decode = guess.speed.decode_tps / base.speed.decode_tps
            memory = base.memory.peak_bytes / guess.memory.peak_bytes
            for name, ratio in (("decode", decode), ("memory", memory)):
                if ratio > 1.001 and (best[name] is None or ratio > best[name]["ratio"]):
                    best[name] = {"ratio": round(ratio, 3), "settings": moved, "gate": c["status"]}
        rows.append(best)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", type=Path)
    parser.add_argument("--types", default="Q4_K_M,Q8_0")
    parser.add_argument("--objectives", default="decode,memory")
    parser.add_argument("--max-kl", type=float, default=0.002)
    parser.add_argument("--max-flips", type=float, default=0.02)
    parser.add_argument("--output", type=Path, default=Path("bench-results/tune.json"))
    args = parser.parse_args(argv)
    types = tuple(t.strip().upper() for t in args.types.split(","))
    report: dict[str, Any] = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "runs": []}
    with tempfile.TemporaryDirectory(prefix="edgecds-bench-tune-") as tmp:
        folder, record = open_variants(args.variants)
        work = Path(tmp)
        shutil.copy(folder / "variants.json", work)
        for v in record.variants:
            if v.type in types or v.type == "F16":
                shutil.copy(variant_file(folder, v), work / v.path)
        for objective in args.objectives.split(","):
            config = TuneConfig(variants=work, types=types, objective=objective, case_limit=40, repeats=3, max_kl=args.max_kl,
                                max_flip_share=args.max_flips)
            for tuning in run_tune(config):
                path = work / tuning.variant.path
                report["runs"].append({"objective": objective, "variant": tuning.variant.type, "ratio": tuning.ratio,
                                       "measured": tuning.measured, "baseline": tuning.baseline, "chosen": tuning.chosen,
                                       "gate": {"max_kl": args.max_kl, "max_flips": args.max_flips}, "candidates": tuning.candidates,
                                       "predicted_elsewhere": _predicted_elsewhere(path, tuning.candidates)})
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.output, report)
    for run in report["runs"]:
        print(f"{run['objective']:<7} {run['variant']:<7} x{run['ratio']} ({run['measured']} measured): {run['chosen']}")
    print(f"-> {args.output}")


if __name__ == "__main__":
    main()
