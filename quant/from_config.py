"""A GGUF variant described from a model's config.json alone, before 50 GB are fetched.

transformers builds the model on its "meta" device (shapes, no memory), which gives every weight's
name and shape for any size of a family it has a class for. Each weight gets the ggml type
llama.cpp's quantizer would give it (`llama_tensor_get_type` in llama-quant.cpp, ported below for
the types in toolkit/formats/types.py, with its block-size fallbacks); the vocabulary's metadata is sized
from the tokenizer beside the config when there is one. The result is a `GgufInfo` without a file,
which the predictor reads like a real one; every figure made from it is an estimate.

Build side: needs torch and transformers.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgecds.errors import InvalidInputError
from edgecds.formats.gguf_file import GgufInfo, TensorInfo
from edgecds.formats.types import GGML_TYPE_BY_NAME, QuantType
from edgecds.jsonfile import read_json
from edgecds.quant.zoo import FAMILIES

ALIGNMENT = 32
# GGUF bytes of one vocabulary entry without a tokenizer to count: the string (~7 bytes and its
# 8-byte length), a score and a type; a BPE merge costs about as much again.
ENTRY_BYTES_GUESS = 27
HEADER_BYTES = 8 << 10  # the other metadata: names, hyper-parameters, the chat template


@dataclass(frozen=True)
class _Weight:
    hf_name: str
    shape: tuple[int, ...]  # ggml order: ne0 (the row width) first
    category: str
    layer: int | None


def _category(name: str) -> str:
    """llama-quant.cpp's tensor_get_category, from the Hugging Face name of the weight."""
    if "embed_tokens" in name:
        return "token_embd"
    if name.startswith("lm_head"):
        return "output"
    for part, category in (("qkv_proj", "attn_qkv"), ("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v"),
                           ("self_attn.o_proj", "attn_output"), ("gate_up_proj", "ffn_up"), ("up_proj", "ffn_up"),
                           ("down_proj", "ffn_down"), ("gate_proj", "ffn_gate")):
        if part in name and "linear_attn" not in name:
            return category
    if re.search(r"mlp\.(gate|router)\.weight$|shared_expert_gate\.weight$", name):
        return "router"  # ffn_gate_inp: never quantized
    if "conv1d" in name:
        return "ssm_conv"  # never quantized
    return "other"


def _quantizable(w: _Weight) -> bool:
    """llama.cpp quantizes matrices named *weight: not norms, biases, routers or convolutions."""
    return len(w.shape) >= 2 and w.category not in ("router", "ssm_conv") and "norm" not in w.hf_name and not w.hf_name.endswith("bias")


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


@dataclass
class _State:
    n_attention_wv: int
    n_layers: int
    n_expert: int
    n_gqa: int
    tied: bool
    i_attention_wv: int = 0
    i_ffn_down: int = 0


def _mixture_type(st: _State, w: _Weight, base: str, ftype: str) -> str:
    """llama_tensor_get_type_impl for the file types edgecds builds."""
    new = base
    if w.category == "output" or (st.tied and w.category == "token_embd"):
        if w.shape[0] % GGML_TYPE_BY_NAME[base].block_size:
            return "Q8_0"
        return base if base == "Q8_0" else "Q6_K"
    if w.category == "token_embd":
        return base
    if w.category in ("attn_v", "attn_qkv"):
        if ftype == "Q2_K":
            new = "Q4_K" if st.n_gqa >= 4 else "Q3_K"
        elif ftype == "Q3_K_M":
            new = "Q5_K" if st.i_attention_wv < 2 else "Q4_K"
        elif ftype == "Q3_K_L":
            new = "Q5_K"
        elif ftype in ("IQ4_NL", "IQ4_XS") and st.n_gqa >= 4:
            new = "Q5_K"
        elif ftype in ("Q4_K_M", "Q5_K_M") and _use_more_bits(st.i_attention_wv, st.n_attention_wv):
            new = "Q6_K"
        elif ftype == "Q4_K_S" and st.i_attention_wv < 4:
            new = "Q5_K"
        if st.n_expert == 8:  # llama.cpp's Mixtral rule, applied to any 8-expert model
            new = "Q8_0"
        st.i_attention_wv += 1
    elif w.category == "attn_k":
        if st.n_expert == 8:
            new = "Q8_0"
    elif w.category == "ffn_down":
        i = w.layer if st.n_expert > 1 and w.layer is not None else st.i_ffn_down
        n = st.n_layers
        if ftype == "Q2_K":
            new = "Q3_K"
        elif ftype == "Q3_K_M":
            new = "Q5_K" if i < n // 16 else "Q4_K"
        elif ftype == "Q3_K_L":
            new = "Q5_K"
        elif ftype == "Q4_K_M":
            new = "Q6_K" if _use_more_bits(i, n) else new
        elif ftype in ("IQ4_NL", "IQ4_XS") and i < n // 8:
            new = "Q5_K"
        elif ftype == "Q5_K_M" and _use_more_bits(i, n):
            new = "Q6_K"
        elif ftype == "Q4_K_S" and i < n // 8:
            new = "Q5_K"
        st.i_ffn_down += 1
    elif w.category == "attn_output":
        if st.n_expert == 8:
            if ftype in ("Q2_K", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M", "IQ4_XS"):
                new = "Q5_K"
        elif ftype == "Q2_K":
            new = "Q3_K"
        elif ftype == "Q3_K_M":
            new = "Q4_K"
        elif ftype == "Q3_K_L":
            new = "Q5_K"
    return new


# tensor_type_fallback: a row width that is not a multiple of the type's block
_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "IQ4_XS": "IQ4_NL"}


def _with_fallback(kind: str, ne0: int) -> str:
    if ne0 % GGML_TYPE_BY_NAME[kind].block_size == 0:
        return kind
    kind = _FALLBACK.get(kind, kind)
    return kind if ne0 % GGML_TYPE_BY_NAME[kind].block_size == 0 else "F16"


def tensor_types(weights: list[_Weight], qtype: QuantType, n_layers: int, n_expert: int, n_gqa: int) -> list[str]:
    """The ggml type of every weight in a `qtype` file, as llama.cpp's converter and quantizer choose."""
    if qtype.format != "gguf":
        raise InvalidInputError(f"{qtype.name} is not a GGUF type; a config-only estimate is for GGUF variants")
    tied = not any(w.category == "output" for w in weights)
    st = _State(sum(1 for w in weights if w.category in ("attn_v", "attn_qkv")), n_layers, n_expert, n_gqa, tied)
    float_type = qtype.base if qtype.producer == "converter" else "F16"
    types = []
    for w in weights:
        if len(w.shape) < 2 or "norm" in w.hf_name:
            types.append("F32")  # the converter keeps vectors (norms, biases, sinks) in float32
        elif qtype.producer == "converter" or not _quantizable(w):
            # the converter writes routers and convolutions in float32, and the quantizer leaves them so
            types.append("F32" if w.category in ("router", "ssm_conv") else float_type)
        else:
            types.append(_with_fallback(_mixture_type(st, w, qtype.base, qtype.name), w.shape[0]))
    return types


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    """A multimodal checkpoint's text model is what the GGUF holds (the vision tower goes to an mmproj)."""
    text = config.get("text_config")
    if isinstance(text, dict) and text.get("model_type"):
        return text
    return config


def expert_count(config: dict[str, Any]) -> int:
    """How many experts a Hugging Face config's text model routes tokens to (0: a dense model)."""
    text = _text_config(config)
    try:
        return max(int(text.get("num_experts") or text.get("num_local_experts") or 0), 0)
    except (TypeError, ValueError, OverflowError):
        return 0


def _family_of(config: dict[str, Any]) -> Any:
    architectures = config.get("architectures") or []
    names = {a for a in architectures if isinstance(a, str)} if isinstance(architectures, list) else set()
    text = _text_config(config)
    for family in FAMILIES:
        if family.architecture in names or family.config["model_type"] == text.get("model_type"):
            return family
    known = sorted({f.architecture for f in FAMILIES})
    raise InvalidInputError(f"config.json names {', '.join(sorted(names)) or 'no architecture'} (model_type "
                            f"{text.get('model_type')!r}); a config-only estimate knows the families in the zoo: {', '.join(known)}")


# A config is untrusted: sizes past any published model are refused before transformers builds
# millions of modules from them, even on the meta device.
LIMITS = {"num_hidden_layers": 1024, "num_experts": 4096, "num_local_experts": 4096, "num_attention_heads": 1024,
          "num_key_value_heads": 1024, "vocab_size": 1 << 24, "hidden_size": 1 << 18, "intermediate_size": 1 << 20, "head_dim": 1 << 14}


def hf_weights(config: dict[str, Any], family: Any) -> tuple[list[_Weight], dict[str, Any]]:
    """Every weight of the model `config` describes, from transformers' class on the meta device,
    and the configuration as transformers completed it (its defaults filled in)."""
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError:
        raise InvalidInputError("a config-only estimate needs the build side (torch, transformers): pip install 'edgecds[build]'") from None
    text = dict(_text_config(config))
    model_type = str(text.pop("model_type", None) or family.config["model_type"])
    if family.built_with:  # Qwen3.5: no class here; Qwen3-Next's builds the same shapes, then split as the converter expects
        from edgecds.quant.zoo import qwen35_build_config

        text = qwen35_build_config({**text, "model_type": model_type}, moe="moe" in family.layout)
        model_type = text.pop("model_type")
    for key, limit in LIMITS.items():
        value = text.get(key)
        if value is not None and not (isinstance(value, int) and 0 < value <= limit):
            raise InvalidInputError(f"config.json: {key} is {value!r}; expected a whole number from 1 to {limit}")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # its notes on optional fast kernels are not the user's concern here
    try:
        hf_config = AutoConfig.for_model(model_type, **text)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config)
    except (ValueError, KeyError, TypeError, AttributeError, ZeroDivisionError, OverflowError, RuntimeError, AssertionError) as exc:
        raise InvalidInputError(f"transformers cannot build a {model_type!r} model from this config.json ({type(exc).__name__}: {exc})") from None
    weights = []
    for name, param in model.named_parameters():  # tied weights appear once, as the embedding
        shape = tuple(int(d) for d in param.shape)
        ggml: tuple[int, ...]
        if len(shape) == 3:  # stacked experts, stored (experts, in, out): the converter transposes them
            ggml = (shape[1], shape[2], shape[0])
        else:
            ggml = tuple(reversed(shape))
        match = re.search(r"layers\.(\d+)\.", name)
        weights.append(_Weight(name, ggml, _category(name), int(match.group(1)) if match else None))
    completed = hf_config.to_dict()
    completed["model_type"] = model_type
    if family.built_with:
        weights = _split_qwen35(weights, completed)
    return _stack_experts(weights), completed


def _split_qwen35(weights: list[_Weight], config: dict[str, Any]) -> list[_Weight]:
    from edgecds.quant.zoo import qwen35_splits

    splits = qwen35_splits(config)
    out = []
    for w in weights:
        fused = next((old for old in splits if f"linear_attn.{old}." in w.hf_name), None)
        if fused is None:
            out.append(w)
            continue
        out.extend(_Weight(w.hf_name.replace(fused, part), (w.shape[0], rows), w.category, w.layer) for part, rows in splits[fused])
    return out


def _stack_experts(weights: list[_Weight]) -> list[_Weight]:
    """Per-expert weights (`experts.3.gate_proj`) become one 3-D tensor per layer and role, as the converter writes them."""
    stacked: dict[str, _Weight] = {}
    out: list[_Weight] = []
    for w in weights:
        key = re.sub(r"experts\.\d+\.", "experts.", w.hf_name)
        if key == w.hf_name:
            out.append(w)
            continue
        if key in stacked:
            prev = stacked[key]
            stacked[key] = _Weight(key, (*prev.shape[:2], prev.shape[2] + 1), prev.category, prev.layer)
        else:
            stacked[key] = _Weight(key, (*w.shape, 1), w.category, w.layer)
            out.append(stacked[key])
    return [stacked.get(w.hf_name, w) for w in out]


def _vocabulary(config_path: Path, n_vocab: int) -> tuple[int, int, int]:
    """(tokens, merges, metadata bytes) from tokenizer.json beside the config, or an estimate."""
    tokenizer = config_path.parent / "tokenizer.json"
    try:
        spec = read_json(tokenizer, MAX_TOKENIZER_BYTES)
        vocab = spec["model"]["vocab"]
        merges = spec["model"].get("merges") or []
        added = [t["content"] for t in spec.get("added_tokens") or [] if t.get("content") not in vocab]
        strings = list(vocab) if isinstance(vocab, dict) else [str(entry[0]) for entry in vocab]
        tokens = max(n_vocab, len(strings) + len(added))
        text = sum(len(s.encode()) for s in strings + added) + (tokens - len(strings) - len(added)) * 12
        merge_bytes = sum(len((m if isinstance(m, str) else " ".join(m)).encode()) + 8 for m in merges)
        # each token: its string's 8-byte length and a 4-byte type; a merge-free (sentencepiece) vocabulary adds a score
        per_token = 8 + 4 + (0 if merges else 4)
        return tokens, len(merges), text + tokens * per_token + merge_bytes
    except (InvalidInputError, ValueError, KeyError, TypeError, AttributeError):  # no usable tokenizer: estimate the vocabulary
        return n_vocab, 0, n_vocab * ENTRY_BYTES_GUESS


MAX_CONFIG_BYTES = 4 << 20  # a config.json is kilobytes
MAX_TOKENIZER_BYTES = 64 << 20  # a 262k-entry tokenizer.json is ~30 MB


@functools.lru_cache(maxsize=4)
def _model(config_text: str) -> tuple[Any, dict[str, Any], tuple[_Weight, ...]]:
    """The family, text config (as transformers completed it) and weights of a config.json's text,
    built once per config: a large mixture of experts takes transformers seconds even on the meta device."""
    config = json.loads(config_text)
    if not isinstance(config, dict):
        raise InvalidInputError("config.json is not a JSON object")
    family = _family_of(config)
    weights, completed = hf_weights(config, family)
    return family, completed, tuple(weights)


def estimate_gguf(config_path: Path, qtype: QuantType) -> GgufInfo:
    """A `GgufInfo` with the tensors and metadata a `qtype` GGUF of this model would have; no file."""
    config_text = json.dumps(read_json(config_path, MAX_CONFIG_BYTES), sort_keys=True)
    try:
        family, text, frozen = _model(config_text)
    except InvalidInputError as exc:
        raise InvalidInputError(f"{config_path}: {exc}") from None
    weights = list(frozen)
    n_layers = int(text["num_hidden_layers"])
    n_head = int(text["num_attention_heads"])
    n_head_kv = int(text.get("num_key_value_heads") or n_head)
    n_expert = expert_count(text)
    types = tensor_types(weights, qtype, n_layers, n_expert, n_head // n_head_kv)
    tensors = []
    offset = 0
    for w, kind in zip(weights, types, strict=True):
        n_elements = 1
        for d in w.shape:
            n_elements *= d
        gtype = GGML_TYPE_BY_NAME[kind]
        n_bytes = n_elements // gtype.block_size * gtype.type_size
        tensors.append(TensorInfo(_gguf_name(w), w.shape, gtype.id, offset, n_elements, n_bytes))
        offset += -(-n_bytes // ALIGNMENT) * ALIGNMENT
    n_vocab, n_merges, vocab_bytes = _vocabulary(config_path, int(text["vocab_size"]))
    metadata = _metadata(family.gguf_arch, text, n_vocab, n_merges)
    header = HEADER_BYTES + vocab_bytes + sum(len(t.name) + 8 + 4 + 8 * len(t.shape) + 4 for t in tensors)
    data_offset = -(-header // ALIGNMENT) * ALIGNMENT
    return GgufInfo(config_path, 3, data_offset + offset, ALIGNMENT, data_offset, metadata, tuple(tensors))


def _gguf_name(w: _Weight) -> str:
    """Names the predictor reads: the embedding, the output and each layer's number."""
    if w.category == "token_embd":
        return "token_embd.weight"
    if w.category == "output":
        return "output.weight"
    if w.layer is not None:
        return f"blk.{w.layer}.{w.category}.{w.hf_name}"
    return w.hf_name


def _metadata(arch: str, text: dict[str, Any], n_vocab: int, n_merges: int) -> dict[str, Any]:
    """The hyper-parameters llama.cpp's converter writes, under the names the predictor reads."""
    n_embd = int(text["hidden_size"])
    n_head = int(text["num_attention_heads"])
    head_dim = int(text.get("head_dim") or n_embd // n_head)
    values: dict[str, Any] = {
        "block_count": int(text["num_hidden_layers"]),
        "embedding_length": n_embd,
        "attention.head_count": n_head,
        "attention.head_count_kv": int(text.get("num_key_value_heads") or n_head),
        "attention.key_length": head_dim,
        "attention.value_length": head_dim,
        "context_length": int(text.get("max_position_embeddings") or 0),
        "feed_forward_length": int(text.get("intermediate_size") or 0),
    }
    experts = expert_count(text)
    if experts:
        values["expert_count"] = experts
        values["expert_used_count"] = int(text.get("num_experts_per_tok") or text.get("experts_per_token") or 0)
        values["expert_feed_forward_length"] = int(text.get("moe_intermediate_size") or text.get("intermediate_size") or 0)
        values["expert_shared_feed_forward_length"] = int(text.get("shared_expert_intermediate_size") or 0)
    layer_types = text.get("layer_types") or []
    if text.get("sliding_window") and ("sliding_attention" in layer_types or arch in ("gemma3", "gpt-oss")):
        values["attention.sliding_window"] = int(text["sliding_window"])
    if text.get("linear_num_value_heads"):  # Qwen3-Next's gated delta net, as llama.cpp names it
        values["ssm.conv_kernel"] = int(text["linear_conv_kernel_dim"])
        values["ssm.inner_size"] = int(text["linear_num_value_heads"]) * int(text["linear_value_head_dim"])
        values["ssm.state_size"] = int(text["linear_key_head_dim"])
        values["ssm.group_count"] = int(text["linear_num_key_heads"])
        values["full_attention_interval"] = int(text.get("full_attention_interval") or 4)
    meta: dict[str, Any] = {f"{arch}.{k}": v for k, v in values.items()}
    meta["general.architecture"] = arch
    meta["tokenizer.ggml.tokens"] = [""] * n_vocab
    if n_merges:
        meta["tokenizer.ggml.merges"] = [""] * n_merges
    return meta


def config_plan(config_path: Path, types: tuple[QuantType, ...], device: Any, n_ctx: int | None = None, kv_type: str = "f16") -> Any:
    """`edgecds plan --model-config`: every type's size and fit on `device`, from config.json alone."""
    from edgecds.engine import settings_for
    from edgecds.hwbench.predict import Plan, PlanEntry, cache_type, fit_advice, predict

    cache_type(kv_type)
    settings = settings_for(device, n_ctx, type_k=kv_type.lower(), type_v=kv_type.lower())
    entries = []
    infos = {}
    for qtype in types:
        if qtype.format != "gguf":
            entries.append(PlanEntry(f"{config_path.parent.name}-{qtype.name}", qtype.name, qtype.format, None,
                                     "a config-only estimate is for GGUF; build the variant and run `edgecds plan` on it", unknown=True))
            continue
        info = infos[qtype.name] = estimate_gguf(config_path, qtype)
        prediction = predict(info, settings, device)
        entries.append(PlanEntry(f"{config_path.parent.name}-{qtype.name}", qtype.name, "gguf", prediction, file_bytes=info.file_size))
    return Plan(device.id, settings, entries, label="estimated from config.json (no file)", advice=fit_advice(infos, entries, settings, device))
