"""Measure one GGUF variant in a fresh process: peak memory, load time, prompt and decode speed.

A fresh process per variant, so one variant's memory cannot hide another's: the peak is the
kernel's own high-water mark of the child's resident set (VmHWM), which counts the Python
interpreter, the engine's libraries, the memory-mapped weights it touched, the KV cache and the
compute buffers alike. The parent reads one JSON line back; a crash, a kill or a timeout becomes
an EngineError that says which.

Run directly: python -m edgecds.hwbench.measure MODEL.gguf --ctx 2048
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgecds.child import die_with_parent
from edgecds.errors import EngineError

# A clinical text repeated to the prompt length: token ids do not change memory, and the speed of
# real prose is what a clinic sees.
FILL_TEXT = (
    "A 67-year-old woman presents with two hours of crushing central chest pain radiating to the jaw, "
    "with sweating and nausea. She has hypertension, type 2 diabetes and smokes. Blood pressure 150/92, "
    "pulse 104, oxygen saturation 95% on air. The ECG shows ST elevation in leads II, III and aVF. "
    "Troponin is raised. "
)
DEFAULT_DECODE = 32
TIMEOUT_SECONDS = 600

_BUFFER_LINE = re.compile(r"(\S+)\s+(model|KV|compute|output) buffer size =\s+([\d.]+) MiB")


@dataclass(frozen=True)
class RunSettings:
    """How llama.cpp is asked to run a variant; every field is recorded with the measurement."""

    n_ctx: int = 2048
    n_batch: int = 512
    n_ubatch: int = 512
    threads: int | None = None  # None: llama.cpp's default
    n_gpu_layers: int = 0
    type_k: str = "f16"
    type_v: str = "f16"
    flash_attn: bool = False
    prompt_tokens: int | None = None  # None: fill the context, leaving room for the decode
    decode_tokens: int = DEFAULT_DECODE

    @property
    def effective_prompt_tokens(self) -> int:
        if self.prompt_tokens is not None:
            return self.prompt_tokens
        return max(1, self.n_ctx - self.decode_tokens)


@dataclass(frozen=True)
class Measurement:
    model: str
    settings: RunSettings
    peak_rss_bytes: int  # VmHWM at the end: the whole process's peak
    stages: dict[str, dict[str, int]]  # VmHWM, RssAnon, RssFile after import, load, prompt, decode
    llama_buffers_mib: dict[str, float] = field(default_factory=dict)  # as llama.cpp logged them
    load_seconds: float = 0.0
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def decode_tps(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0


def _proc_status() -> dict[str, int]:
    wanted = ("VmHWM", "VmRSS", "RssAnon", "RssFile")
    found: dict[str, int] = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in wanted:
                found[key] = int(value.split()[0]) * 1024
    return found


def _fill_tokens(llm: Any, n: int) -> list[int]:
    unit = llm.tokenize(FILL_TEXT.encode(), add_bos=False, special=False)
    tokens = list(unit) * (n // len(unit) + 1)
    return tokens[:n]


def measure_here(model_path: Path, settings: RunSettings) -> Measurement:
    """In this process: load, process the prompt, decode; the caller must be a fresh process."""
    stages = {"start": _proc_status()}
    import llama_cpp
    from llama_cpp import Llama

    from edgecds.quant.gguf_quantize import captured_llama_log

    stages["import"] = _proc_status()
    with captured_llama_log() as log:
        start = time.perf_counter()
        llm = Llama(
            model_path=str(model_path), n_ctx=settings.n_ctx, n_batch=settings.n_batch, n_ubatch=settings.n_ubatch,
            n_threads=settings.threads, n_threads_batch=settings.threads, n_gpu_layers=settings.n_gpu_layers,
            type_k=_ggml_type_id(llama_cpp, settings.type_k), type_v=_ggml_type_id(llama_cpp, settings.type_v),
            flash_attn=settings.flash_attn, verbose=False, seed=0,
        )
        load_seconds = time.perf_counter() - start
    stages["load"] = _proc_status()
    n_prompt = settings.effective_prompt_tokens
    if n_prompt + settings.decode_tokens > settings.n_ctx:
        raise EngineError(f"{n_prompt} prompt + {settings.decode_tokens} decode tokens do not fit a context of {settings.n_ctx}")
    prompt = _fill_tokens(llm, n_prompt + settings.decode_tokens)
    start = time.perf_counter()
    llm.eval(prompt[:n_prompt])
    prompt_seconds = time.perf_counter() - start
    stages["prompt"] = _proc_status()
    # Decode as llama-bench's text-generation test does: one token per step, no sampling cost.
    start = time.perf_counter()
    for token in prompt[n_prompt:]:
        llm.eval([token])
    decode_seconds = time.perf_counter() - start
    stages["decode"] = _proc_status()
    llm.close()
    buffers: dict[str, float] = {}
    for line in log:
        match = _BUFFER_LINE.search(line)
        if match and "expectation" not in line:
            key = f"{match.group(1)} {match.group(2)}".replace("_Mapped", "").replace("_REPACK", " repack")
            buffers[key] = buffers.get(key, 0.0) + float(match.group(3))
    return Measurement(
        model=model_path.name, settings=settings, peak_rss_bytes=stages["decode"]["VmHWM"], stages=stages,
        llama_buffers_mib=buffers, load_seconds=load_seconds, prompt_tokens=n_prompt, prompt_seconds=prompt_seconds,
        decode_tokens=settings.decode_tokens, decode_seconds=decode_seconds,
    )


def _ggml_type_id(llama_cpp: Any, name: str) -> int:
    value = getattr(llama_cpp, f"GGML_TYPE_{name.upper()}", None)
    if not isinstance(value, int):
        raise EngineError(f"llama-cpp-python does not know the KV-cache type {name!r}")
    return value


def measure_in_subprocess(model_path: Path, settings: RunSettings, timeout: float = TIMEOUT_SECONDS) -> Measurement:
    """`measure_here` in a fresh child; a crash, kill or timeout becomes an EngineError naming it."""
    cmd = [sys.executable, "-m", "edgecds.hwbench.measure", str(model_path), "--settings", json.dumps(asdict(settings))]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, preexec_fn=die_with_parent())
    except subprocess.TimeoutExpired:
        raise EngineError(f"{model_path.name}: not measured within {timeout:.0f} s (timed out)") from None
    if proc.returncode != 0:
        if proc.returncode < 0:
            name = signal.Signals(-proc.returncode).name
            cause = f"killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
        else:
            cause = f"exit {proc.returncode}"
        tail = "\n".join(proc.stderr.strip().splitlines()[-6:])
        raise EngineError(f"{model_path.name}: measuring failed: {cause}\n{tail}")
    try:
        data = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise EngineError(f"{model_path.name}: the measuring process printed no result") from None
    data["settings"] = RunSettings(**data["settings"])
    return Measurement(**data)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Measure one GGUF in this (fresh) process and print one JSON line.")
    parser.add_argument("model", type=Path)
    parser.add_argument("--settings", default="{}", help="RunSettings as JSON")
    parser.add_argument("--ctx", type=int, help="shorthand for the context length")
    args = parser.parse_args(argv)
    values = json.loads(args.settings)
    if args.ctx:
        values["n_ctx"] = args.ctx
    result = measure_here(args.model, RunSettings(**values))
    print(json.dumps(asdict(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
