"""`edgecds run`: one prompt answered with a bundle's model and settings, offline."""

from __future__ import annotations

from pathlib import Path

from edgecds.bundle.layout import BundleEngineConfig
from edgecds.bundle.verify import verify_bundle


def run_prompt(bundle: Path, prompt: str, max_tokens: int | None = None, verify: bool = True, trusted_key: str | None = None) -> str:
    """Answer one prompt with the bundle's model and runtime.json, greedily (temperature 0, as the
    config says)."""
    from edgecds.engine import generate_greedy
    from edgecds.engine.factory import open_runtime

    if verify:
        verify_bundle(bundle, trusted_key)
    config = BundleEngineConfig.read(bundle)
    runtime = open_runtime(config.model_path(bundle), config.engine_settings())
    try:
        text = runtime.chat_prompt(prompt, system=config.system_prompt or None)
        out = generate_greedy(runtime, runtime.tokenize(text), max_tokens or config.max_tokens, reset=False)
        return runtime.detokenize(out).strip()
    finally:
        runtime.close()
