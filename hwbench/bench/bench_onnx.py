"""Benchmark: ONNX variants against GGUF at similar bits, and edgecds's ONNX runtime against the
runtimes a user would otherwise reach for, on the same model files.

In one run on this machine:

1. every ONNX variant and the GGUF variants at similar bits (Q8_0 ~ int8, Q4_K_M and IQ4_NL ~ int4,
   F16 ~ fp32): prompt tokens/s (512), decode tokens/s (128) and peak RSS, each in a fresh process
   through the harness `edgecds profile` uses;
2. decode speed of edgecds's ONNX runtime, Optimum's `ORTModelForCausalLM.generate` and
   onnxruntime-genai's own runtime (its `Generator`, given a genai_config.json describing the same
   files), on each ONNX variant: each in a fresh process, the same chat prompt, 128 greedy tokens
   after the first, `--rounds` alternating rounds. Target: edgecds's median at least the best
   baseline's. edgecds runs its compiled graph (fused attention, onnx_fuse.py; compiled before the
   timing starts); for information, genai is also timed on that compiled graph
   (`genai_on_compiled`), which shows how much of the difference is the graph and how much the loop.

    python -m edgecds.hwbench.bench.bench_onnx edgecds-out/SmolLM2-135M-Instruct

Needs the build extra (Optimum) and onnxruntime-genai (`pip install 'edgecds[bench]'`); a baseline
that is not installed or cannot run the files is recorded as such. Writes JSON (default
bench-results/onnx.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgecds import __version__
from edgecds.atomic import write_json
from edgecds.child import die_with_parent, emit_json, exit_cause, result_line, stderr_tail
from edgecds.engine import RunSettings
from edgecds.hwbench.measure import Workload, measure_in_subprocess
from edgecds.variants import VariantRecord, open_variants, variant_file

SIMILAR_GGUF = ("F16", "Q8_0", "Q4_K_M", "IQ4_NL")
PROMPT = "A 58-year-old man has crushing chest pain radiating to the left arm for 40 minutes. What is the most likely diagnosis?"
DECODE = 128
RUNTIMES = ("edgecds", "optimum", "genai", "genai_on_compiled")
BASELINES = ("optimum", "genai")  # on the same files as edgecds; genai_on_compiled is for information


# --- children: one runtime, one fresh process, one JSON line ----------------------------------------


def _child_edgecds(folder: Path, threads: int) -> dict[str, Any]:
    import numpy as np

    from edgecds.engine import EngineSettings
    from edgecds.engine.factory import open_runtime

    rt = open_runtime(folder, EngineSettings(n_ctx=1024, threads=threads))
    tokens = rt.tokenize(rt.chat_prompt(PROMPT))
    rt.eval(tokens)  # warm-up pass, as the others get
    rt.reset()
    rt.eval(tokens)
    token = int(np.argmax(rt.logits()))
    start = time.perf_counter()
    for _ in range(DECODE):
        rt.eval([token])
        token = int(np.argmax(rt.logits()))
    return {"decode_tps": DECODE / (time.perf_counter() - start)}


def _child_optimum(folder: Path, threads: int) -> dict[str, Any]:
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    model = ORTModelForCausalLM.from_pretrained(folder, session_options=options, use_cache=True, use_io_binding=False)
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, return_tensors="pt")
    mask = torch.ones_like(ids)

    def generate(n: int) -> float:
        start = time.perf_counter()
        model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=2)
        return time.perf_counter() - start

    generate(2)  # warm-up
    first = min(generate(1) for _ in range(2))  # prompt and first token, subtracted below
    return {"decode_tps": DECODE / (generate(DECODE + 1) - first)}


def genai_config(folder: Path, threads: int, positions: bool = True) -> dict[str, Any]:
    """A genai_config.json describing Optimum's graph layout, so onnxruntime-genai runs the very same files."""
    config = json.loads((folder / "config.json").read_text())
    heads = config["num_attention_heads"]
    return {
        "model": {
            "bos_token_id": config.get("bos_token_id", 1), "eos_token_id": config.get("eos_token_id", 2),
            "pad_token_id": config.get("pad_token_id") or config.get("eos_token_id", 2), "context_length": 1024,
            "vocab_size": config["vocab_size"], "type": "llama",
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": [], "intra_op_num_threads": threads},
                "filename": "model.onnx", "head_size": config["hidden_size"] // heads, "hidden_size": config["hidden_size"],
                "num_attention_heads": heads, "num_hidden_layers": config["num_hidden_layers"],
                "num_key_value_heads": config.get("num_key_value_heads", heads),
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           **({"position_ids": "position_ids"} if positions else {}),
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"},
            },
        },
        "search": {"do_sample": False, "max_length": 1024, "min_length": 0, "num_beams": 1, "num_return_sequences": 1,
                   "past_present_share_buffer": False, "top_k": 1, "top_p": 1.0, "temperature": 1.0, "repetition_penalty": 1.0},
    }


def _child_genai(folder: Path, threads: int, graph: Path | None = None) -> dict[str, Any]:
    import onnxruntime_genai as og

    with tempfile.TemporaryDirectory(prefix="edgecds-genai-") as tmp:
        view = Path(tmp)
        for item in folder.iterdir():  # the same files, beside genai's config
            (view / item.name).symlink_to((graph if graph and item.name == "model.onnx" else item).resolve())
        (view / "genai_config.json").write_text(json.dumps(genai_config(folder, threads, positions=graph is None)))
        model = og.Model(str(view))
        tokenizer = og.Tokenizer(model)
        template = (folder / "chat_template.jinja").read_text() if (folder / "chat_template.jinja").exists() else None
        prompt = tokenizer.apply_chat_template(json.dumps([{"role": "user", "content": PROMPT}]), template_str=template or "",
                                               add_generation_prompt=True)
        ids = tokenizer.encode(prompt)

        def run(n: int) -> float:
            params = og.GeneratorParams(model)
            params.set_search_options(max_length=len(ids) + n + 1, do_sample=False)
            generator = og.Generator(model, params)
            generator.append_tokens(ids)  # the prompt, and with it the first token's logits
            start = time.perf_counter()
            for _ in range(n):
                generator.generate_next_token()
            return time.perf_counter() - start

        run(2)  # warm-up
        return {"decode_tps": DECODE / run(DECODE)}


def _child_genai_fused(folder: Path, threads: int) -> dict[str, Any]:
    """Not a baseline: genai's runtime on edgecds's compiled graph, to show how much of edgecds's
    speed is the fused graph and how much its own loop."""
    from edgecds.engine.onnx_runtime import compiled_graph

    graph, note = compiled_graph(folder, 1024)
    if graph.parent == folder:
        raise SystemExit(f"no compiled graph: {note}")
    return _child_genai(folder, threads, graph)


CHILDREN = {"edgecds": _child_edgecds, "optimum": _child_optimum, "genai": _child_genai, "genai_on_compiled": _child_genai_fused}


def _in_child(runtime: str, folder: Path, threads: int) -> dict[str, Any]:
    """One runtime's result from a fresh child; {"error": ...} when it fails, so that a baseline
    that cannot run is recorded as such rather than stopping the benchmark."""
    cmd = [sys.executable, "-m", "edgecds.hwbench.bench.bench_onnx", "--child", runtime, str(folder), "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False, preexec_fn=die_with_parent())
    if proc.returncode != 0:
        return {"error": stderr_tail(proc.stderr, 3) or exit_cause(proc.returncode)}
    data = result_line(proc.stdout)
    if data is None:
        return {"error": "the child process printed no result"}
    return data


# --- the parent -------------------------------------------------------------------------------------


def _measure_variant(folder: Path, record: VariantRecord, threads: int) -> dict[str, Any]:
    settings = RunSettings(n_ctx=1024, threads=threads, prompt_tokens=512, decode_tokens=DECODE)
    m = measure_in_subprocess(variant_file(folder, record), settings, Workload(repeats=3, ttft=False))
    return {"type": record.type, "format": record.format, "mib": round(record.file_size / 2**20, 1),
            "bits_per_weight": record.bits_per_weight, "prompt_tps": round(m.prompt_tps, 1), "decode_tps": round(m.decode_tps, 1),
            "peak_rss_mib": round(m.peak_rss_bytes / 2**20, 1), "drift_vs_fp32": record.drift or None}


def _parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("variants", type=Path, nargs="?")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--output", type=Path, default=Path("bench-results/onnx.json"))
    parser.add_argument("--types", help="Only these ONNX types (comma list); the GGUF table is then skipped.")
    parser.add_argument("--child", choices=RUNTIMES)
    return parser, parser.parse_args(argv)


def _compare_runtimes(record: VariantRecord, path: Path, rounds: int, threads: int) -> dict[str, Any]:
    """Every runtime's decode speed on one ONNX variant, `rounds` alternating rounds, each in a fresh process."""
    speeds: dict[str, list[float]] = {name: [] for name in RUNTIMES}
    errors: dict[str, str] = {}
    for r in range(rounds):
        order = RUNTIMES[r % len(RUNTIMES):] + RUNTIMES[: r % len(RUNTIMES)]  # each goes first in turn
        for name in order:
            if name in errors:
                continue
            print(f"{record.type}: round {r + 1}, {name}", file=sys.stderr, flush=True)
            got = _in_child(name, path, threads)
            if "error" in got:
                errors[name] = got["error"]
            else:
                speeds[name].append(got["decode_tps"])
    medians = {name: round(statistics.median(v), 1) for name, v in speeds.items() if v}
    baselines = [medians[n] for n in BASELINES if n in medians]
    return {
        "decode_tps_per_round": {n: [round(x, 1) for x in v] for n, v in speeds.items()}, "decode_tps_median": medians,
        "errors": errors,
        "edgecds_vs_best_baseline": round(medians["edgecds"] / max(baselines), 3) if baselines and "edgecds" in medians else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser, args = _parse_args(argv)
    if args.child:
        emit_json(CHILDREN[args.child](args.variants, args.threads))
        return 0
    if args.variants is None:
        parser.error("give the variants folder")
    folder, variants = open_variants(args.variants)
    onnx = [v for v in variants.variants if v.format == "onnx"]
    if not onnx:
        parser.error(f"{folder} has no ONNX variants; run `edgecds quantize --format gguf,onnx -o {folder}` first")
    similar = [v for v in variants.variants if v.format == "gguf" and v.type in SIMILAR_GGUF]
    if args.types:
        wanted = {t.strip().upper() for t in args.types.split(",")}
        onnx, similar = [v for v in onnx if v.type in wanted], []
    table = []
    for record in onnx + similar:
        print(f"measuring {record.type} ...", file=sys.stderr, flush=True)
        table.append(_measure_variant(folder, record, args.threads))

    runtimes = {record.type: _compare_runtimes(record, variant_file(folder, record), args.rounds, args.threads) for record in onnx}
    ratios = [r["edgecds_vs_best_baseline"] for r in runtimes.values() if r["edgecds_vs_best_baseline"] is not None]
    result = {
        "benchmark": "onnx", "edgecds": __version__, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "threads": args.threads},
        "settings": {"prompt_tokens": 512, "decode_tokens": DECODE, "rounds": args.rounds, "prompt": PROMPT},
        "variants": table, "runtimes": runtimes,
        "target": "edgecds's decode median >= the best of Optimum's and onnxruntime-genai's on the same files",
        "met": bool(ratios) and min(ratios) >= 1.0,
    }
    write_json(args.output, result)
    print(json.dumps({"variants": table, "runtimes": {k: v["decode_tps_median"] for k, v in runtimes.items()}, "met": result["met"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
