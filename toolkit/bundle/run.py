"""`edgecds run`: one prompt answered with a bundle's model and settings, offline."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgecds.bundle.layout import DEFAULT_MAX_TOKENS, SYSTEM_PROMPT, BundleEngineConfig
from edgecds.bundle.verify import verify_bundle
from edgecds.engine import EngineSettings
from edgecds.engine.speculative import DEFAULT_DRAFT_MAX, DEFAULT_P_MIN, NGRAM, NO_DRAFT, DraftSettings
from edgecds.errors import InvalidInputError


@dataclass
class RunAnswer:
    text: str
    prompt_tokens: int
    completion_tokens: int
    prompt_seconds: float  # until the first answer token: the prompt's evaluation and one decode step
    seconds: float  # the whole answer, prompt included
    speculative: dict[str, Any] | None = None  # the draft's name and tally (DraftStats), when one drafted

    @property
    def decode_tps(self) -> float | None:
        """Answer tokens after the first, per second of their own decoding."""
        decode = self.seconds - self.prompt_seconds
        return (self.completion_tokens - 1) / decode if self.completion_tokens > 1 and decode > 0 else None

    def summary(self) -> str:
        speed = f", {self.decode_tps:.1f} tokens/s" if self.decode_tps is not None else ""
        spec = self.speculative
        drafted = (f"; {spec['draft']} draft: {spec['accepted']} of {spec['drafted']} drafted tokens kept"
                   if spec is not None else "")
        return (f"{self.completion_tokens} tokens in {self.seconds:.2f} s{speed}; first token after {self.prompt_seconds:.2f} s "
                f"({self.prompt_tokens} prompt tokens){drafted}")


def choose_draft(given: str | None, bundled: DraftSettings | None, max_tokens: int = DEFAULT_DRAFT_MAX,
                 p_min: float = DEFAULT_P_MIN) -> DraftSettings | None:
    """The draft `run` and `serve` decode with: `--draft` ("ngram", "none", or a GGUF file of the
    same model) when given, else the bundle's own (runtime.json's `draft`)."""
    if given is None:
        return bundled
    if given.lower() == NO_DRAFT:
        return None
    if given.lower() == NGRAM:
        return DraftSettings(NGRAM, max_tokens, p_min)
    from edgecds.adopt import is_gguf_file
    from edgecds.formats.gguf_file import read_gguf

    path = Path(given)
    if not path.is_file() or not is_gguf_file(path):
        raise InvalidInputError(f"--draft {given}: not a GGUF file; give another variant of the same model (.gguf), 'ngram' or 'none'")
    read_gguf(path)  # the bounded header check, before the engine sees the file
    return DraftSettings(str(path), max_tokens, p_min)


def answer_prompt(bundle: Path, prompt: str, max_tokens: int | None = None, verify: bool = True, trusted_key: str | None = None,
                  on_text: Callable[[str], None] | None = None, draft: str | None = None, draft_max: int = DEFAULT_DRAFT_MAX,
                  draft_p_min: float = DEFAULT_P_MIN) -> RunAnswer:
    """Answer one prompt with the bundle's model and runtime.json (or a GGUF file on its own),
    greedily (temperature 0, as the config says); each new piece of text goes to `on_text` as it
    is made (whole characters only). `draft` (see `choose_draft`) decodes speculatively: the same
    tokens as without it, the engine's batch arithmetic aside (engine/speculative.py)."""
    from edgecds.engine import generate_greedy
    from edgecds.engine.factory import open_runtime
    from edgecds.engine.speculative import Speculation

    model, settings, system, default_tokens, bundled = _model_and_settings(bundle, verify, trusted_key)
    chosen = choose_draft(draft, bundled, draft_max, draft_p_min)
    runtime = open_runtime(model, settings)
    spec = None
    try:
        spec = Speculation.open(chosen, settings, runtime) if chosen is not None else None
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

        out = generate_greedy(runtime, prompt_ids, max_tokens or default_tokens, progress, reset=False, draft=spec)
        seconds = time.perf_counter() - start
        text = runtime.detokenize(out).strip()
        if on_text is not None and len(text) > len(sent[0]):
            on_text(text[len(sent[0]):])
        drafted = {"draft": draft_name(chosen), **spec.stats.to_dict()} if spec is not None and chosen is not None else None
        return RunAnswer(text, len(prompt_ids), len(out), first[0] or seconds, seconds, drafted)
    finally:
        if spec is not None:
            spec.close()
        runtime.close()


def draft_name(draft: DraftSettings) -> str:
    return NGRAM if draft.is_ngram else Path(draft.source).name


def _model_and_settings(target: Path, verify: bool, trusted_key: str | None) -> tuple[Path, EngineSettings, str | None, int,
                                                                                     DraftSettings | None]:
    """The model, engine settings, system prompt and answer length: a bundle's, checked against its
    manifest first; or, for a GGUF file given on its own (as llama-cli -m takes one), llama.cpp's
    defaults and edgecds's system prompt, with no manifest to check."""
    if target.is_file():
        from edgecds.adopt import is_gguf_file
        from edgecds.formats.gguf_file import read_gguf

        if not is_gguf_file(target):
            raise InvalidInputError(f"{target}: neither a bundle folder nor a GGUF file; give the folder `edgecds bundle` wrote, or a .gguf")
        read_gguf(target)  # the bounded header check, before the engine sees the file
        return target, EngineSettings(), SYSTEM_PROMPT, DEFAULT_MAX_TOKENS, None
    if verify:
        verify_bundle(target, trusted_key)
    config = BundleEngineConfig.read(target)
    return (config.model_path(target), config.engine_settings(), config.system_prompt or None, config.max_tokens,
            config.draft_settings(target))


def run_prompt(bundle: Path, prompt: str, max_tokens: int | None = None, verify: bool = True, trusted_key: str | None = None) -> str:
    """The answer's text alone."""
    return answer_prompt(bundle, prompt, max_tokens, verify, trusted_key).text
