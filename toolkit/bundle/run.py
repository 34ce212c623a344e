"""`edgecds run`: one prompt answered with a bundle's model and settings, offline."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgecds.bundle.layout import DEFAULT_MAX_TOKENS, SYSTEM_PROMPT, BundleEngineConfig
from edgecds.bundle.verify import verify_bundle
from edgecds.engine import EngineSettings
from edgecds.errors import InvalidInputError


@dataclass
class RunAnswer:
    text: str
    prompt_tokens: int
    completion_tokens: int
    prompt_seconds: float  # until the first answer token: the prompt's evaluation and one decode step
    seconds: float  # the whole answer, prompt included

    @property
    def decode_tps(self) -> float | None:
        """Answer tokens after the first, per second of their own decoding."""
        decode = self.seconds - self.prompt_seconds
        return (self.completion_tokens - 1) / decode if self.completion_tokens > 1 and decode > 0 else None

    def summary(self) -> str:
        speed = f", {self.decode_tps:.1f} tokens/s" if self.decode_tps is not None else ""
        return (f"{self.completion_tokens} tokens in {self.seconds:.2f} s{speed}; first token after {self.prompt_seconds:.2f} s "
                f"({self.prompt_tokens} prompt tokens)")


def answer_prompt(bundle: Path, prompt: str, max_tokens: int | None = None, verify: bool = True, trusted_key: str | None = None,
                  on_text: Callable[[str], None] | None = None) -> RunAnswer:
    """Answer one prompt with the bundle's model and runtime.json (or a GGUF file on its own),
    greedily (temperature 0, as the config says); each new piece of text goes to `on_text` as it
    is made (whole characters only)."""
    from edgecds.engine import generate_greedy
    from edgecds.engine.factory import open_runtime

    model, settings, system, default_tokens = _model_and_settings(bundle, verify, trusted_key)
    runtime = open_runtime(model, settings)
    try:
        prompt_ids = runtime.tokenize(runtime.chat_prompt(prompt, system=system))
        sent, first = [""], [0.0]
        start = time.perf_counter()

        def progress(out: list[int]) -> bool:
            if len(out) == 1:
                first[0] = time.perf_counter() - start
            if on_text is not None:
                text = runtime.detokenize(out).lstrip()
                if len(text) > len(sent[0]) and not text.endswith("\ufffd"):
                    on_text(text[len(sent[0]):])
                    sent[0] = text
            return False

        out = generate_greedy(runtime, prompt_ids, max_tokens or default_tokens, progress, reset=False)
        seconds = time.perf_counter() - start
        text = runtime.detokenize(out).strip()
        if on_text is not None and len(text) > len(sent[0]):
            on_text(text[len(sent[0]):])
        return RunAnswer(text, len(prompt_ids), len(out), first[0] or seconds, seconds)
    finally:
        runtime.close()


def _model_and_settings(target: Path, verify: bool, trusted_key: str | None) -> tuple[Path, EngineSettings, str | None, int]:
    """The model, engine settings, system prompt and answer length: a bundle's, checked against its
    manifest first; or, for a GGUF file given on its own (as llama-cli -m takes one), llama.cpp's
    defaults and edgecds's system prompt, with no manifest to check."""
    if target.is_file():
        from edgecds.adopt import is_gguf_file
        from edgecds.formats.gguf_file import read_gguf

        if not is_gguf_file(target):
            raise InvalidInputError(f"{target}: neither a bundle folder nor a GGUF file; give the folder `edgecds bundle` wrote, or a .gguf")
        read_gguf(target)  # the bounded header check, before the engine sees the file
        return target, EngineSettings(), SYSTEM_PROMPT, DEFAULT_MAX_TOKENS
    if verify:
        verify_bundle(target, trusted_key)
    config = BundleEngineConfig.read(target)
    return config.model_path(target), config.engine_settings(), config.system_prompt or None, config.max_tokens


def run_prompt(bundle: Path, prompt: str, max_tokens: int | None = None, verify: bool = True, trusted_key: str | None = None) -> str:
    """The answer's text alone."""
    return answer_prompt(bundle, prompt, max_tokens, verify, trusted_key).text
