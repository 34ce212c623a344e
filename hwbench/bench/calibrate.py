"""Measure the predictor's constants for the CPU backend on this machine, and store them with their source.

    python -m edgecds.hwbench.bench.calibrate MODEL.gguf [--write [hwbench/calibration.json]]

`--write` alone updates the calibration.json beside the predictor (hwbench/, one folder up from
this script), the file `edgecds.hwbench.predict.load_calibrations` reads.

Each constant comes from its own small measurement, separate from the workloads the predictor is
later judged on (bench_predict runs full contexts of 512 to 8,192 cells):

- runtime base: the high-water mark of a fresh process that has imported the engine, nothing loaded;
- vocabulary: the growth of a fresh process that loads only the model's vocabulary, per token entry
  (its BPE merges, if any, weighed by MERGE_COST_IN_TOKENS);
- fixed per-context part: a tiny run (256 cells, 16 prompt tokens, 4 decoded) less every other
  predicted part;
- speed efficiencies: one mid-size run (1,024 cells, 256 prompt tokens, 64 decoded) against the
  rooflines, with this machine's memory bandwidth measured in the same run and its peak FLOPS
  from the detected cores, clock and instruction set.
"""

from __future__ import annotations

import datetime
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from edgecds.child import emit_json, run_json_child

TINY = {"n_ctx": 256, "prompt_tokens": 16, "decode_tokens": 4}
SPEED = {"n_ctx": 1024, "prompt_tokens": 256, "decode_tokens": 64}


def _child(kind: str, model: str) -> None:
    import llama_cpp  # noqa: F401  (the import is what is measured)

    from edgecds.hwbench.measure import proc_status

    after_import = proc_status()
    result: dict[str, Any] = {"import": after_import}
    if kind == "vocab":
        from llama_cpp import Llama

        from edgecds.engine.llama_log import captured_llama_log

        with captured_llama_log():
            llm = Llama(model_path=model, vocab_only=True, verbose=False)
        result["vocab"] = proc_status()
        result["n_vocab"] = llm.n_vocab()
    emit_json(result)


def _run_child(kind: str, model: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "edgecds.hwbench.bench.calibrate", "--child", kind, str(model)]
    return run_json_child(cmd, f"calibration probe {kind!r}", 300)


def memory_bandwidth_gbs(megabytes: int = 512, repeats: int = 5) -> float:
    """Read bandwidth of one thread summing a large array (best of `repeats`), GB/s."""
    import numpy as np

    data = np.ones(megabytes * 1024 * 1024 // 4, dtype=np.float32)
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        best = max(best, data.nbytes / (time.perf_counter() - start))
    return best / 1e9


def calibrate(model: Path) -> dict[str, Any]:
    from edgecds.engine import RunSettings
    from edgecds.formats.gguf_file import read_gguf
    from edgecds.hwbench import predict
    from edgecds.hwbench.measure import ONE_PASS, measure_in_subprocess
    from edgecds.quant.gguf_quantize import llama_cpp_version
    from edgecds.target import resolve_target

    info = read_gguf(model)
    shape = predict.ModelShape.from_gguf(info)
    base = _run_child("import", model)["import"]["VmHWM"]
    vocab_probe = _run_child("vocab", model)
    vocab_per_token = (vocab_probe["vocab"]["VmHWM"] - vocab_probe["import"]["VmHWM"]) / shape.vocab_units

    target = resolve_target("host")  # this machine, as detected
    host = target.host
    bandwidth = memory_bandwidth_gbs()
    device = replace(target.device, bandwidth_gbs=bandwidth)
    provisional = predict.Calibration("cpu", base, vocab_per_token, 0, 1.0, 1.0)

    tiny_settings = RunSettings(**TINY)
    tiny = measure_in_subprocess(model, tiny_settings, ONE_PASS)
    others = predict.predict_memory(info, tiny_settings, device, provisional).peak_bytes
    context_fixed = tiny.peak_rss_bytes - others

    speed_settings = RunSettings(**SPEED)
    run = measure_in_subprocess(model, speed_settings, ONE_PASS)
    roofline = predict.predict_speed(info, speed_settings, device, provisional)
    decode_eff = run.decode_tps / roofline.decode_tps
    prompt_eff = run.prompt_tps / roofline.prompt_tps if roofline.prompt_tps else 0.0
    return {
        "runtime_base_bytes": base,
        "vocab_bytes_per_token": round(vocab_per_token, 1),
        "context_fixed_bytes": context_fixed,
        "decode_efficiency": round(decode_eff, 4),
        "prompt_efficiency": round(prompt_eff, 4),
        "source": {
            "measured": True,
            "how": "python -m edgecds.hwbench.bench.calibrate " + model.name,
            "date": datetime.date.today().isoformat(),
            "host": f"{host.cpu_model}, {host.cpu_cores} cores, {host.ram_gib:g} GiB, {platform.system()} {platform.machine()}",
            "host_bandwidth_gbs": round(bandwidth, 2),
            "host_bandwidth_how": "one thread summing 512 MiB with numpy, best of 5",
            "host_cpu_gflops_fp32": device.cpu_gflops_fp32,
            "cpu_features": list(host.cpu_features),
            "llama_cpp_python": llama_cpp_version(),
            "python": platform.python_version(),
            "model": f"{model.name} ({shape.n_vocab} vocabulary entries)",
            "runs": {"tiny": TINY, "speed": SPEED},
            "measured_decode_tps": round(run.decode_tps, 2),
            "measured_prompt_tps": round(run.prompt_tps, 2),
        },
    }


def calibration_path() -> Path:
    """The product's calibration file: hwbench/calibration.json, one folder up from this script
    (bench/); imported lazily, so that the import probe measures the engine alone."""
    from edgecds.hwbench.predict import CALIBRATION_FILE

    return Path(__file__).resolve().parent.parent / CALIBRATION_FILE


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Measure the memory/speed predictor's CPU constants on this machine.")
    parser.add_argument("model", type=Path)
    parser.add_argument("--child", choices=("import", "vocab"), help=argparse.SUPPRESS)
    parser.add_argument("--write", type=Path, nargs="?", const=True,
                        help="add this CPU's entry to this calibration file (alone: hwbench/calibration.json, which the predictor reads)")
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child, str(args.model))
        return 0
    values = calibrate(args.model)
    print(json.dumps(values, indent=2))
    if args.write:
        from edgecds.atomic import atomic_path

        path: Path = calibration_path() if args.write is True else args.write
        data: dict[str, Any] = (
            json.loads(path.read_text(encoding="utf-8")) if path.exists() else {"schema_version": 1, "backends": {}}
        )
        from edgecds.hwbench.predict import cpu_entry

        # kept per CPU feature set; the first one measured is also the fallback for CPUs never calibrated
        data["backends"][cpu_entry(tuple(values["source"]["cpu_features"]))] = values
        data["backends"].setdefault("cpu", values)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
