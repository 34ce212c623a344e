"""Load a variant in its engine and make it generate: proof that a variant actually runs.

A GGUF with inconsistent metadata can abort the whole process inside llama.cpp (a C++ exception,
not a Python one), so the check runs in a child process; the parent reads one JSON line back, or
turns a crash into an error that names the file. ONNX variants go through the same check.

Run directly: python -m edgecds.hwbench.load_check MODEL.gguf|ONNX_FOLDER --tokens 8
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from edgecds.child import emit_json, run_json_child
from edgecds.errors import EngineError

CHECK_PROMPT = "A 58-year-old man has crushing chest pain radiating to the left arm. The most likely diagnosis is"
DEFAULT_TOKENS = 8
TIMEOUT_SECONDS = 300


@dataclass(frozen=True)
class LoadCheck:
    prompt_tokens: list[int]
    tokens: list[int]
    text: str
    load_seconds: float
    generate_seconds: float


def load_and_generate(model_path: Path, prompt: str, n_tokens: int, n_ctx: int = 512, threads: int | None = None) -> LoadCheck:
    """In this process: load, tokenize as the engine does, and decode `n_tokens` greedily."""
    from edgecds.engine import EngineSettings, generate_greedy
    from edgecds.engine.factory import open_runtime

    start = time.perf_counter()
    runtime = open_runtime(model_path, EngineSettings(n_ctx=n_ctx, threads=threads))
    loaded = time.perf_counter()
    # add_bos=True adds BOS only where the vocabulary asks for it
    prompt_tokens = runtime.tokenize(prompt, add_bos=True)
    out = generate_greedy(runtime, prompt_tokens, n_tokens)
    done = time.perf_counter()
    text = runtime.detokenize(out)
    runtime.close()
    return LoadCheck(list(prompt_tokens), out, text, loaded - start, done - loaded)


def check_in_subprocess(model_path: Path, n_tokens: int = DEFAULT_TOKENS, prompt: str = CHECK_PROMPT) -> LoadCheck:
    """Run `load_and_generate` in a child process; a crash or hang becomes an EngineError."""
    cmd = [sys.executable, "-m", "edgecds.hwbench.load_check", str(model_path), "--tokens", str(n_tokens), "--prompt", prompt]
    from edgecds.engine.cpu_paths import advice_for_exit

    advice = None if model_path.is_dir() else advice_for_exit  # a folder is ONNX: not llama.cpp
    data = run_json_child(cmd, f"{model_path.name}: the load check (load the variant in its engine and generate; unusable if this fails)",
                          TIMEOUT_SECONDS, advice=advice)
    result = LoadCheck(**data)
    if not result.tokens:
        raise EngineError(f"{model_path.name}: loaded but generated no token")
    return result


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Load a variant (GGUF file or ONNX folder) and generate a few tokens greedily.")
    parser.add_argument("model", type=Path)
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS)
    parser.add_argument("--prompt", default=CHECK_PROMPT)
    args = parser.parse_args(argv)
    emit_json(asdict(load_and_generate(args.model, args.prompt, args.tokens)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
