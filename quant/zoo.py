"""The test zoo: one small model per family clinics deploy, with random weights, built from a config.

Conversion, parity, memory and speed do not depend on what the weights learned, so a family's
layout is exercised by a model with its real config.json fields (the published model's, shrunk
to a few layers and a narrow width) and seeded random weights. Each is built with transformers'
own class, saved as bf16 safetensors (as the published checkpoints are) with the default
model's tokenizer (a byte-level BPE every family's converter accepts), and cached per machine
under EDGECDS_HOME/models/zoo/ keyed by everything that made it.

Build side: needs torch and transformers.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edgecds.atomic import atomic_path, remove_stale_temporaries, waiting_lock
from edgecds.digest import cache_key, sha256_file
from edgecds.errors import UnknownNameError
from edgecds.home import models_dir

BUILDER_VERSION = 2  # bump when what a build writes changes, so caches rebuild
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt", "chat_template.jinja")
STAMP = "edgecds-zoo.json"
# Width of every zoo model: a multiple of 256 so the k-quants (256-weight blocks) apply to every
# matrix as they do in the real models, instead of falling back to wider types.
WIDTH = 256


@dataclass(frozen=True)
class Family:
    name: str
    architecture: str  # the HF class, config.json's `architectures[0]`
    represents: str  # the published models whose layout this is
    layout: tuple[str, ...]  # what it exercises beyond a plain Llama block
    config: dict[str, Any]  # config.json as published, shrunk
    gguf_arch: str  # llama.cpp's architecture name after conversion
    notes: str = ""
    # families transformers has no class for: built with the class `built_with` names (Qwen3.5 with
    # Qwen3-Next's, `qwen35_build_config`), then the tensors split to the names the converter expects
    built_with: dict[str, Any] = field(default_factory=dict)
    # the dtype the random weights are drawn in before the bf16 save: float32 for the small families
    # (their cached weights depend on it), bfloat16 for the sized shapes, which need half the memory
    init_dtype: str = "float32"


def _common(**values: Any) -> dict[str, Any]:
    base = {"vocab_size": 49152, "hidden_size": WIDTH, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 64, "max_position_embeddings": 8192, "rms_norm_eps": 1e-6,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
            # wider than the usual 0.02 so that random logits have a clear top token to compare
            "initializer_range": 0.1}
    merged = {**base, **values}
    return {k: v for k, v in merged.items() if v is not None or k != "head_dim"}  # head_dim None: the class derives it


FAMILIES: tuple[Family, ...] = (
    Family("llama3", "LlamaForCausalLM", "Llama 3.1 8B / 3.2 1B-3B, DeepSeek-R1-Distill-Llama-8B", ("gqa", "rope-llama3", "tied-output"),
           _common(model_type="llama", intermediate_size=512, rope_theta=500000.0, max_position_embeddings=131072, tie_word_embeddings=True, hidden_act="silu",
                   attention_bias=False, mlp_bias=False, rms_norm_eps=1e-5,
                   rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                 "original_max_position_embeddings": 8192, "rope_type": "llama3"}),
           "llama"),
    Family("mistral", "MistralForCausalLM", "Mistral 7B v0.3, Ministral", ("gqa",),
           _common(model_type="mistral", intermediate_size=512, rope_theta=1000000.0, tie_word_embeddings=False,
                   hidden_act="silu", sliding_window=None, rms_norm_eps=1e-5),
           "llama"),
    Family("qwen2", "Qwen2ForCausalLM", "Qwen2.5 0.5B-32B, DeepSeek-R1-Distill-Qwen-1.5B/7B/14B/32B", ("gqa", "qkv-bias"),
           _common(model_type="qwen2", intermediate_size=512, rope_theta=10000.0, tie_word_embeddings=False, hidden_act="silu",
                   use_sliding_window=False, sliding_window=4096, max_window_layers=2),
           "qwen2"),
    Family("qwen3", "Qwen3ForCausalLM", "Qwen3 0.6B-32B", ("gqa", "qk-norm", "head-dim-apart-from-width"),
           _common(model_type="qwen3", intermediate_size=512, head_dim=128, rope_theta=1000000.0, tie_word_embeddings=True,
                   hidden_act="silu", attention_bias=False, use_sliding_window=False, max_window_layers=2),
           "qwen3"),
    Family("qwen3moe", "Qwen3MoeForCausalLM", "Qwen3-30B-A3B, Qwen3-235B-A22B", ("gqa", "qk-norm", "moe"),
           _common(model_type="qwen3_moe", intermediate_size=512, moe_intermediate_size=128, num_experts=8, num_experts_per_tok=2,
                   decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True, head_dim=64, rope_theta=1000000.0,
                   tie_word_embeddings=False, hidden_act="silu", attention_bias=False, router_aux_loss_coef=0.001),
           "qwen3moe"),
    Family("qwen3next", "Qwen3NextForCausalLM", "Qwen3-Next-80B-A3B", ("hybrid-recurrent", "gated-delta-net", "moe", "shared-expert", "partial-rope"),
           _common(model_type="qwen3_next", num_hidden_layers=4, full_attention_interval=4, intermediate_size=512,
                   layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
                   linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=64, linear_value_head_dim=64,
                   linear_conv_kernel_dim=4, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128,
                   shared_expert_intermediate_size=128, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
                   partial_rotary_factor=0.25, rope_theta=10000000.0, tie_word_embeddings=False, hidden_act="silu"),
           "qwen3next"),
    # Qwen3.5, dense and MoE: transformers 4.57 has no class, so the Qwen3-Next class builds them (with dense MLPs,
    # or its experts) and the linear-attention projections are split into Qwen3.5's in_proj_qkv/z and in_proj_b/a.
    Family("qwen35", "Qwen3_5ForCausalLM", "Qwen3.5 27B, a clinical fine-tune of it",
           ("hybrid-recurrent", "gated-delta-net", "gated-attention", "interleaved-mrope", "no-transformers-class"),
           _common(model_type="qwen3_5_text", num_hidden_layers=4, full_attention_interval=4, intermediate_size=512,
                   layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
                   linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=64, linear_value_head_dim=64,
                   linear_conv_kernel_dim=4, tie_word_embeddings=False, hidden_act="silu", attn_output_gate=True,
                   rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
                                    "mrope_section": [3, 3, 2], "mrope_interleaved": True}),
           "qwen35", notes="no logit parity: transformers 4.57 has no Qwen3.5 class to compare against",
           built_with={"architecture": "Qwen3NextForCausalLM"}),
    Family("qwen35moe", "Qwen3_5MoeForCausalLM", "Qwen3.5-35B-A3B, the fine-tuned Qwen3.5-35B of the studies",
           ("hybrid-recurrent", "gated-delta-net", "gated-attention", "interleaved-mrope", "moe", "shared-expert", "no-transformers-class"),
           _common(model_type="qwen3_5_moe_text", num_hidden_layers=4, full_attention_interval=4, intermediate_size=512,
                   layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
                   linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=64, linear_value_head_dim=64,
                   linear_conv_kernel_dim=4, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128,
                   shared_expert_intermediate_size=128, tie_word_embeddings=False, hidden_act="silu", attn_output_gate=True,
                   rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
                                    "mrope_section": [3, 3, 2], "mrope_interleaved": True}),
           "qwen35moe", notes="no logit parity: transformers 4.57 has no Qwen3.5 class to compare against",
           built_with={"architecture": "Qwen3NextForCausalLM"}),
    Family("gemma3", "Gemma3ForCausalLM", "Gemma 3 270M-27B (text), MedGemma 27B text", ("sliding-window", "qk-norm", "gqa", "tied-output", "sandwich-norm"),
           # six layers: llama.cpp assumes Gemma 3's five sliding layers to one global (the converter writes no pattern)
           _common(model_type="gemma3_text", intermediate_size=512, num_key_value_heads=1, head_dim=64, query_pre_attn_scalar=64,
                   num_hidden_layers=6, sliding_window=512, layer_types=["sliding_attention"] * 5 + ["full_attention"], rope_theta=1000000.0,
                   rope_local_base_freq=10000.0, rope_scaling=None, hidden_activation="gelu_pytorch_tanh",
                   final_logit_softcapping=None, attn_logit_softcapping=None, tie_word_embeddings=True, max_position_embeddings=32768),
           "gemma3"),
    Family("gpt-oss", "GptOssForCausalLM", "gpt-oss-20b, gpt-oss-120b", ("moe", "attention-sinks", "sliding-window", "biases", "yarn-rope"),
           _common(model_type="gpt_oss", intermediate_size=WIDTH, num_local_experts=4, num_experts_per_tok=2, experts_per_token=2,
                   sliding_window=128, layer_types=["sliding_attention", "full_attention"], rope_theta=150000.0,
                   rope_scaling={"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                                 "rope_type": "yarn", "truncate": False},
                   swiglu_limit=7.0, attention_bias=True, tie_word_embeddings=False, hidden_act="silu", rms_norm_eps=1e-5,
                   max_position_embeddings=131072, router_aux_loss_coef=0.9, output_router_logits=False),
           "gpt-oss", notes="bf16 experts, not MXFP4 as published: the converter stores them as given (it warns)"),
    # Phi-4-mini: the Phi3 layout with a byte-level BPE (GPT2Tokenizer) as here. Not named "phi3": llama.cpp gives
    # models whose name contains "phi3" or "phi-3" Phi-3's sentencepiece special tokens, which this vocabulary lacks.
    Family("phi4-mini", "Phi3ForCausalLM", "Phi-4-mini (and the Phi-3/3.5 layout)", ("fused-qkv", "fused-gate-up", "partial-rope", "tied-output"),
           _common(model_type="phi3", intermediate_size=512, num_key_value_heads=2, head_dim=None, partial_rotary_factor=0.75,
                   rope_theta=10000.0, rope_scaling=None, tie_word_embeddings=True, hidden_act="silu", rms_norm_eps=1e-5,
                   original_max_position_embeddings=4096, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0),
           "phi3"),
)
# Families the issue names that are not in the zoo, so nothing here claims they convert or run.
NOT_COVERED = {
    "gemma4": "transformers 4.57 has no Gemma4 class to build from or compare against, and the converter reads its "
              "tokenizer as a sentencepiece-style vocabulary (LlamaHfVocab) that the default model's byte-level BPE is not",
}




@dataclass(frozen=True)
class SizedShape:
    """One size of Qwen2.5's layout (the qwen2 family) at its published width and depth, for the
    scale benchmark. The vocabulary stays the zoo's 49,152 tokens (its tokenizer is the default
    model's), not Qwen's 151,936, so `parameters` is below the published count."""

    name: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    parameters: int  # as transformers counts them, tied embedding once (checked by tests/test_scale_shapes.py)
    shape_of: str  # the published model with these shapes, or why the shape was chosen


SCALE_LAYOUT = "qwen2"
# What every Qwen2.5 size from 0.5B to 3B publishes alike. No head_dim: the class derives it (64 at
# 0.5B, 128 from 1.5B); the sliding-window fields have no effect with use_sliding_window false.
QWEN25_COMMON: dict[str, Any] = {"rope_theta": 1000000.0, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
                                 "tie_word_embeddings": True, "use_sliding_window": False, "sliding_window": 32768}
SCALE_SHAPES: tuple[SizedShape, ...] = (
    SizedShape("qwen2.5-tiny", 256, 2, 512, 4, 2, 13_764_864, "the zoo's qwen2 width and depth, tied: for tests"),
    # Not published: a size below 0.5B whose widths are multiples of 256 (every matrix k-quantizable),
    # 64-wide heads and Qwen2.5's ratio of MLP to width (about 5.4)
    SizedShape("qwen2.5-0.2b", 768, 16, 4096, 12, 2, 210_805_504, "no published model: Qwen2.5's layout below 0.5B"),
    SizedShape("qwen2.5-0.5b", 896, 24, 4864, 14, 2, 401_938_304, "Qwen2.5-0.5B (494M with its own vocabulary)"),
    SizedShape("qwen2.5-1.5b", 1536, 28, 8960, 12, 2, 1_385_838_080, "Qwen2.5-1.5B, DeepSeek-R1-Distill-Qwen-1.5B (1.54B)"),
    SizedShape("qwen2.5-3b", 2048, 36, 11008, 16, 2, 2_875_437_056, "Qwen2.5-3B (3.09B)"),
)


def find_scale_shape(name: str) -> SizedShape:
    for shape in SCALE_SHAPES:
        if shape.name == name:
            return shape
    raise UnknownNameError("scale shape", name, [s.name for s in SCALE_SHAPES])


def scale_family(shape: SizedShape) -> Family:
    """The qwen2 family at one of SCALE_SHAPES' sizes, initialised in bf16 (3B in fp32 would take
    12 GB of RAM); `build` builds and caches it as any family."""
    base = find_family(SCALE_LAYOUT)
    sized = {"hidden_size": shape.hidden_size, "num_hidden_layers": shape.num_hidden_layers, "intermediate_size": shape.intermediate_size,
             "num_attention_heads": shape.num_attention_heads, "num_key_value_heads": shape.num_key_value_heads,
             "max_window_layers": shape.num_hidden_layers}
    config = {k: v for k, v in {**base.config, **QWEN25_COMMON, **sized}.items() if k != "head_dim"}
    return replace(base, name=shape.name, represents=shape.shape_of, layout=(*base.layout, "tied-output"), config=config,
                   init_dtype="bfloat16")


def find_family(name: str) -> Family:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise UnknownNameError("model family", name, [f.name for f in FAMILIES])


def zoo_dir() -> Path:
    return models_dir() / "zoo"


def build(family: Family, tokenizer_from: Path, seed: int = 0, into: Path | None = None) -> Path:
    """The family's random-weight HF folder (cached): config.json, bf16 safetensors, tokenizer."""
    tokenizer = {name: sha256_file(tokenizer_from / name) for name in TOKENIZER_FILES if (tokenizer_from / name).is_file()}
    stamp = build_stamp(family, tokenizer, seed)
    target = into or zoo_dir() / f"{family.name}-{cache_key(stamp, 12)}"
    if _stamped(target) == stamp:
        return target
    with waiting_lock(target.parent):  # two builds at once: the second waits and finds the first one's folder
        if _stamped(target) != stamp:
            remove_stale_temporaries(target.parent)
            with atomic_path(target, directory=True) as temp:
                _write_model(family, temp, seed)
                for name in tokenizer:
                    shutil.copyfile(tokenizer_from / name, temp / name)
                (temp / STAMP).write_text(json.dumps(stamp, indent=2) + "\n")
    return target


def build_stamp(family: Family, tokenizer: dict[str, str], seed: int) -> dict[str, Any]:
    """Everything that made a build (its cache key). The init dtype only where it is not float32, so
    the families that predate it keep their stamps and caches."""
    stamp = {"family": family.name, "config": family.config, "seed": seed, "tokenizer": tokenizer, "builder_version": BUILDER_VERSION}
    if family.init_dtype != "float32":
        stamp["init_dtype"] = family.init_dtype
    return stamp


def _stamped(folder: Path) -> Any:
    try:
        return json.loads((folder / STAMP).read_text())
    except (OSError, ValueError):
        return None


def _write_model(family: Family, folder: Path, seed: int) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    source = qwen35_build_config(family.config, moe="moe" in family.layout) if family.built_with else family.config
    values = {k: v for k, v in source.items() if k != "model_type"}
    architecture = family.built_with.get("architecture", family.architecture)
    config = AutoConfig.for_model(source["model_type"], architectures=[architecture], dtype="bfloat16", **values)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, family.init_dtype))
    with torch.no_grad():  # norms start at one (or zero for Gemma's 1+w); perturb them so they are tested too
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(torch.randn_like(param) * 0.1)
    model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    if family.built_with:
        _as_qwen35(family, folder)


def qwen35_splits(config: dict[str, Any]) -> dict[str, list[tuple[str, int]]]:
    """Qwen3-Next's fused linear-attention input projections as Qwen3.5 splits them: each old name
    part -> (new name part, rows), in order. The zoo slices tensors by it; the config-only estimate, shapes."""
    k_dim = int(config["linear_num_key_heads"]) * int(config["linear_key_head_dim"])
    v_dim = int(config["linear_num_value_heads"]) * int(config["linear_value_head_dim"])
    heads = int(config["linear_num_value_heads"])
    return {"in_proj_qkvz": [("in_proj_qkv", 2 * k_dim + v_dim), ("in_proj_z", v_dim)],
            "in_proj_ba": [("in_proj_b", heads), ("in_proj_a", heads)]}


def qwen35_build_config(config: dict[str, Any], moe: bool) -> dict[str, Any]:
    """A Qwen3.5 text config as the Qwen3-Next config whose class builds the same shapes (dense MLPs
    on every layer, or its experts), before `qwen35_splits` renames the linear-attention inputs."""
    values = {k: v for k, v in config.items() if k not in ("model_type", "rope_parameters", "attn_output_gate", "architectures")}
    rope = config.get("rope_parameters") or {}
    values["partial_rotary_factor"] = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 0.25))
    values["rope_theta"] = rope.get("rope_theta", config.get("rope_theta", 10000000.0))
    values["mlp_only_layers"] = [] if moe else list(range(int(config["num_hidden_layers"])))
    return {**values, "model_type": "qwen3_next"}


def _as_qwen35(family: Family, folder: Path) -> None:
    """Rename a Qwen3-Next checkpoint's tensors to Qwen3.5's: the fused linear-attention input
    projections split in two (the order within each is immaterial for random weights), then the
    config.json Qwen3.5's converter reads."""
    from safetensors.torch import load_file, save_file

    config = family.config
    splits = qwen35_splits(config)
    tensors = load_file(folder / "model.safetensors")
    renamed = {}
    for name, tensor in tensors.items():
        fused = next((old for old in splits if f"linear_attn.{old}." in name), None)
        if fused is None:
            renamed[name] = tensor
            continue
        start = 0
        for new_part, rows in splits[fused]:
            renamed[name.replace(fused, new_part)] = tensor[start:start + rows].clone()
            start += rows
    save_file(renamed, folder / "model.safetensors", metadata={"format": "pt"})
    written = json.loads((folder / "config.json").read_text())
    keep = {k: written[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id", "dtype") if k in written}
    (folder / "config.json").write_text(json.dumps({**config, **keep, "architectures": [family.architecture]}, indent=2) + "\n")
