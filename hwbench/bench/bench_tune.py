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

from edgecds.atomic import write_json
from edgecds.devices import load_profiles
from edgecds.engine import RunSettings, settings_for
from edgecds.hwbench.predict import predict
from edgecds.quant.gguf_file import read_gguf
from edgecds.tune import TuneConfig, run_tune
from edgecds.variants import open_variants, variant_file


def _predicted_elsewhere(path: Path, chosen: dict[str, Any]) -> list[dict[str, Any]]:
    """Decode speed and memory the predictor expects on each profile, defaults against chosen."""
    info = read_gguf(path)
    rows = []
    for device in load_profiles().values():
        default = settings_for(device)
        tuned = RunSettings(**{**asdict(default), **{k: v for k, v in chosen.items() if k not in ("n_ctx", "threads", "n_gpu_layers")}})
        a, b = predict(info, default, device), predict(info, tuned, device)
        rows.append({"device": device.id, "decode_ratio": round(b.speed.decode_tps / a.speed.decode_tps, 3),
                     "memory_ratio": round(b.memory.peak_bytes / a.memory.peak_bytes, 3)})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", type=Path)
    parser.add_argument("--types", default="Q4_K_M,Q8_0")
    parser.add_argument("--objectives", default="decode,memory")
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
            for tuning in run_tune(TuneConfig(variants=work, types=types, objective=objective, case_limit=40, repeats=3)):
                path = work / tuning.variant.path
                report["runs"].append({"objective": objective, "variant": tuning.variant.type, "ratio": tuning.ratio,
                                       "measured": tuning.measured, "baseline": tuning.baseline, "chosen": tuning.chosen,
                                       "candidates": tuning.candidates, "predicted_elsewhere": _predicted_elsewhere(path, tuning.chosen)})
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.output, report)
    for run in report["runs"]:
        print(f"{run['objective']:<7} {run['variant']:<7} x{run['ratio']} ({run['measured']} measured): {run['chosen']}")
    print(f"-> {args.output}")


if __name__ == "__main__":
    main()
