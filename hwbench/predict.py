"""Predicting memory and speed from files, before anything is loaded.

The model's shape and tensors come from GGUF metadata (the bounded reader); the device from its
profile; the workload from the same `RunSettings` that `measure` runs. Every term is computed as
llama.cpp (the version llama-cpp-python pins) lays its memory out:

- weights: the GGUF is memory-mapped and every tensor is read while decoding, so the whole file
  ends up resident; on a CPU backend llama.cpp additionally copies the tensors it repacks for
  faster kernels (`REPACK_RULES`) into anonymous memory, and the mapped originals stay resident;
- KV cache: one K and one V row per layer and cell, the context padded to 256 cells, and cleared
  at start-up, so all of it is resident;
- compute buffers: on a GPU the whole reservation (worst case: a full micro-batch with every
  output), on a CPU only the pages the run touches: the attention scores of the largest
  micro-batch against the cells in use, the activations, and the CPU backend's work buffer (the
  softmax converted to the V cache's dot type);
- runtime: the process before loading (interpreter and engine libraries), the vocabulary, and a
  fixed per-context part; measured by `python -m edgecds.hwbench.bench.calibrate` and stored in
  calibration.json with where and how they were measured.

Speed is a roofline: decode reads every weight byte and the KV cells in use once per token, so
tokens/s = efficiency x bandwidth / bytes; prompt processing is compute-bound, so tokens/s =
efficiency x FLOPS / FLOPs per token. The efficiencies are calibrated measurements too.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from edgecds.devices import CPU_ISAS, DeviceProfile
from edgecds.engine import RunSettings, device_backend, settings_for
from edgecds.errors import InvalidInputError, UnknownNameError, UsageError
from edgecds.formats.gguf_file import GgufInfo, TensorInfo
from edgecds.formats.types import GGML_TYPE_BY_NAME, GgmlType

MIB = 1024**2
GIB = 1024**3
KV_CACHE_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "IQ4_NL")  # llama.cpp --cache-type-k/v
KV_PAD = 256  # llama.cpp pads the context, and the cells a graph attends to, to 256
# ggml's vec_dot type of each KV type: the softmax is converted to it before multiplying by V.
_DOT_TYPE = {"F32": "F32", "F16": "F16", "BF16": "BF16"}

# Tensor types llama.cpp's CPU backend repacks into interleaved layouts, per instruction set, and
# the row multiple each needs (ggml-cpu/repack.cpp, ggml_repack_get_optimal_repack_type).
REPACK_RULES: dict[str, dict[str, int]] = {
    "x86-avx2": {"Q4_0": 8, "Q4_K": 8, "IQ4_NL": 8, "MXFP4": 8},
    "x86-avx512": {"Q4_0": 8, "Q4_K": 8, "Q2_K": 8, "IQ4_NL": 8, "MXFP4": 8},
    "arm-dotprod": {"Q4_0": 4, "Q4_K": 8, "Q5_K": 8, "Q6_K": 8, "IQ4_NL": 4, "MXFP4": 4, "Q8_0": 4},
    "arm-i8mm": {"Q4_0": 4, "Q4_K": 8, "Q5_K": 8, "Q6_K": 8, "IQ4_NL": 4, "MXFP4": 4, "Q8_0": 4},
}
assert set(REPACK_RULES) == set(CPU_ISAS), "every ISA a profile may name needs its repack rule"


# llama.cpp's graph metadata is sized for a maximum node count (llama_context::graph_max_nodes):
# max(1024, 8 x tensors) for most models, max(40 x micro-batch tokens, 32 x tensors) for the hybrid
# recurrent ones. Each node costs its tensor header plus graph and scheduler hash-table entries:
# 472 bytes, measured here as the load-time RSS of the zoo's qwen3next at micro-batch 512 against 128.
GRAPH_NODE_BYTES = 472
HYBRID_GRAPH_ARCHS = frozenset({"qwen3next", "qwen35", "qwen35moe"})
# Live float32 values a gated-delta-net layer holds per micro-batch token, as a multiple of its
# convolution channels (values, keys and queries): chunked decay masks, attention within the chunk
# and state updates. Measured on the zoo's qwen3next (ubatch 128 and 512, context 512 and 4096).
DELTA_NET_LIVE_PER_CHANNEL = 8
# llama.cpp keeps a BPE vocabulary's merges in a map beside its tokens; a merge costs 1.22 times a
# token entry (vocabulary-only loads here: Gemma 3's 262,144 tokens without merges grew the process by
# 177 B a token, SmolLM2's 49,152 tokens with 48,900 merges by 393 B a token). The calibrated
# `vocab_bytes_per_token` is per token entry, merges counted apart with this weight.
MERGE_COST_IN_TOKENS = 1.22


@dataclass(frozen=True)
class ModelShape:
    architecture: str
    n_layers: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    context_train: int
    n_ff: int = 0
    n_vocab: int = 0
    n_expert: int = 0  # mixture of experts: experts a layer has, and how many a token uses
    n_expert_used: int = 0
    n_ff_exp: int = 0
    n_ff_shexp: int = 0  # an always-on shared expert's width
    n_swa: int = 0  # sliding window of the sliding layers (0: none); llama.cpp's default keeps their cache full size
    n_recurrent_layers: int = 0  # hybrid models: layers with a recurrent state instead of a KV cache
    recurrent_floats: int = 0  # float32 values of one recurrent layer's state (conv + ssm), one sequence
    conv_channels: int = 0  # a recurrent layer's convolution channels (d_inner + 2 x groups x state)
    n_tensors: int = 0
    n_merges: int = 0  # a BPE vocabulary's merges

    @property
    def vocab_units(self) -> float:
        """The vocabulary's size in token entries, each merge weighed as MERGE_COST_IN_TOKENS."""
        return self.n_vocab + MERGE_COST_IN_TOKENS * self.n_merges

    @property
    def n_kv_layers(self) -> int:
        return self.n_layers - self.n_recurrent_layers

    @property
    def n_ff_active(self) -> int:
        """Feed-forward width a token goes through: the dense one, or its experts' and the shared one."""
        if self.n_expert:
            return self.n_expert_used * self.n_ff_exp + self.n_ff_shexp
        return self.n_ff

    @classmethod
    def from_gguf(cls, info: GgufInfo) -> ModelShape:
        arch = info.architecture
        meta = info.metadata

        def number(key: str, default: int | None = None) -> int:
            value = meta.get(f"{arch}.{key}", default)
            if not isinstance(value, int) or value < 0 or (value == 0 and default != 0):
                raise InvalidInputError(f"{info.path}: metadata {arch}.{key} is {value!r}, expected a positive integer")
            return value

        n_embd, n_head = number("embedding_length"), number("attention.head_count")
        head_dim = n_embd // n_head
        tokens = meta.get("tokenizer.ggml.tokens")
        n_vocab = len(tokens) if isinstance(tokens, list) else number("vocab_size", 0)
        merges = meta.get("tokenizer.ggml.merges")
        n_layers = number("block_count")
        recurrent, state, channels = 0, 0, 0
        if number("ssm.inner_size", 0):
            if arch not in HYBRID_GRAPH_ARCHS:  # Mamba, Falcon-H1, ...: other layouts of recurrent and attention layers
                raise InvalidInputError(f"{info.path}: {arch} has recurrent (state-space) layers laid out in a way the predictor does not "
                                        f"model yet (it knows {', '.join(sorted(HYBRID_GRAPH_ARCHS))}); `edgecds profile` measures it")
            d_conv, d_inner, d_state, groups = number("ssm.conv_kernel"), number("ssm.inner_size"), number("ssm.state_size"), number("ssm.group_count", 0)
            interval = number("full_attention_interval", 4)
            recurrent = sum(1 for i in range(n_layers) if (i + 1) % interval)  # llama.cpp: every interval-th layer attends
            channels = d_inner + 2 * groups * d_state
            state = (d_conv - 1) * channels + d_state * d_inner  # llama_hparams::n_embd_r() + n_embd_s()
        return cls(
            architecture=str(arch),
            n_layers=n_layers,
            n_embd=n_embd,
            n_head=n_head,
            n_head_kv=number("attention.head_count_kv", n_head),
            head_dim_k=number("attention.key_length", head_dim),
            head_dim_v=number("attention.value_length", head_dim),
            context_train=number("context_length"),
            n_ff=number("feed_forward_length", 0),
            n_vocab=n_vocab,
            n_expert=number("expert_count", 0),
            n_expert_used=number("expert_used_count", 0),
            n_ff_exp=number("expert_feed_forward_length", 0),
            n_ff_shexp=number("expert_shared_feed_forward_length", 0),
            n_swa=number("attention.sliding_window", 0),
            n_recurrent_layers=recurrent,
            recurrent_floats=state,
            conv_channels=channels,
            n_tensors=len(info.tensors),
            n_merges=len(merges) if isinstance(merges, list) else 0,
        )


def graph_nodes(shape: ModelShape, n_tokens: int) -> int:
    """llama.cpp's maximum graph size for a micro-batch of `n_tokens` (llama_context::graph_max_nodes)."""
    if shape.architecture in HYBRID_GRAPH_ARCHS:
        return max(n_tokens * 40, 32 * shape.n_tensors)
    return max(1024, 8 * shape.n_tensors)


def graph_extra_bytes(shape: ModelShape, settings: RunSettings) -> int:
    """Graph metadata beyond a plain model's (which the calibrated fixed part already holds)."""
    n_tokens = min(settings.n_ubatch, settings.n_batch, padded_ctx(settings.n_ctx))
    return (graph_nodes(shape, n_tokens) - max(1024, 8 * shape.n_tensors)) * GRAPH_NODE_BYTES


def recurrent_state_bytes(shape: ModelShape, n_seq: int = 1) -> int:
    """llama.cpp's recurrent memory: one float32 conv and ssm state per recurrent layer and sequence."""
    return shape.n_recurrent_layers * shape.recurrent_floats * 4 * n_seq


def cache_type(name: str) -> GgmlType:
    if name.upper() not in KV_CACHE_TYPES:
        raise UnknownNameError("KV-cache type", name, [t.lower() for t in KV_CACHE_TYPES])
    return GGML_TYPE_BY_NAME[name.upper()]


def row_bytes(kind: GgmlType, n_elements: int) -> int:
    """ggml_row_size: whole blocks of the type."""
    if n_elements % kind.block_size:
        raise InvalidInputError(f"a row of {n_elements} elements cannot be stored as {kind.name} (blocks of {kind.block_size})")
    return n_elements // kind.block_size * kind.type_size


def padded_ctx(n_ctx: int) -> int:
    return -(-n_ctx // KV_PAD) * KV_PAD


def kv_cell_bytes(shape: ModelShape, type_k: str = "f16", type_v: str = "f16") -> int:
    """Bytes of K and V for one cell across all layers."""
    k_row = row_bytes(cache_type(type_k), shape.n_head_kv * shape.head_dim_k)
    v_row = row_bytes(cache_type(type_v), shape.n_head_kv * shape.head_dim_v)
    return shape.n_kv_layers * (k_row + v_row)  # recurrent layers of a hybrid model keep no KV


def kv_cache_bytes(shape: ModelShape, n_ctx: int, type_k: str = "f16", type_v: str = "f16") -> int:
    """Bytes of llama.cpp's KV cache for one sequence of `n_ctx` cells."""
    return kv_cell_bytes(shape, type_k, type_v) * n_ctx


# --- compute buffers -------------------------------------------------------------------------


def _masks(shape: ModelShape) -> int:
    """A sliding-window model builds a second mask for its sliding layers."""
    return 2 if shape.n_swa else 1


def _activation_bytes(shape: ModelShape, n_tokens: int) -> int:
    """The micro-batch's activations (residual, normed input, Q/K/V and the FFN a token uses); in a
    hybrid model's recurrent layers, the gated delta net's chunked intermediates when larger."""
    dense = n_tokens * 4 * (3 * shape.n_embd + shape.n_ff_active)
    delta = n_tokens * 4 * DELTA_NET_LIVE_PER_CHANNEL * shape.conv_channels if shape.n_recurrent_layers else 0
    return max(dense, delta) if delta else dense


def _attention_stage_bytes(shape: ModelShape, n_kv: int, n_tokens: int) -> int:
    """Live tensors while attending without flash attention: scores for every head plus the f32
    mask(s), and the activations of the micro-batch."""
    scores = n_kv * n_tokens * 4 * (shape.n_head + _masks(shape))
    return scores + _activation_bytes(shape, n_tokens)


def _flash_stage_bytes(shape: ModelShape, n_kv: int, n_tokens: int) -> int:
    """With flash attention the scores are never materialised: f16 mask(s) and the activations."""
    return n_kv * n_tokens * 2 * _masks(shape) + _activation_bytes(shape, n_tokens)


def _work_bytes(shape: ModelShape, n_kv: int, n_tokens: int, type_v: str, flash_attn: bool) -> int:
    """The CPU backend's work buffer: softmax(KQ) converted to V's dot type before KQ x V."""
    if flash_attn:
        return 0
    dot = GGML_TYPE_BY_NAME[_DOT_TYPE.get(type_v.upper(), "F16")]
    if dot.name == "F32":
        return 0
    return row_bytes(dot, n_kv) * n_tokens * shape.n_head


def compute_reserved_bytes(shape: ModelShape, settings: RunSettings) -> int:
    """What llama.cpp reserves (and a GPU backend allocates in full): the worst-case graph of a full
    micro-batch against the whole context, with logits for every token of it."""
    n_ctx = padded_ctx(settings.n_ctx)
    n_tokens = min(settings.n_ubatch, settings.n_batch, n_ctx)
    stage = _flash_stage_bytes if settings.flash_attn else _attention_stage_bytes
    logits = n_tokens * 4 * (shape.n_vocab + 2 * shape.n_embd)
    return max(logits, stage(shape, n_ctx, n_tokens))


def micro_batches(settings: RunSettings) -> list[tuple[int, int]]:
    """(cells attended, tokens) of each graph the workload runs: prompt micro-batches, then one token at a time."""
    step = min(settings.n_ubatch, settings.n_batch)
    n_ctx = padded_ctx(settings.n_ctx)
    batches = []
    done = 0
    total = settings.effective_prompt_tokens
    while done < total:
        n = min(step, total - done)
        done += n
        batches.append((min(n_ctx, max(KV_PAD, -(-done // KV_PAD) * KV_PAD)), n))
    if settings.decode_tokens:
        end = done + settings.decode_tokens
        batches.append((min(n_ctx, max(KV_PAD, -(-end // KV_PAD) * KV_PAD)), 1))
    return batches


def compute_touched_bytes(shape: ModelShape, settings: RunSettings) -> int:
    """The compute memory a CPU run actually touches (only the last token's logits are computed)."""
    stage = _flash_stage_bytes if settings.flash_attn else _attention_stage_bytes
    return max(
        stage(shape, n_kv, n) + _work_bytes(shape, n_kv, n, settings.type_v, settings.flash_attn)
        for n_kv, n in micro_batches(settings)
    )


# --- weights ------------------------------------------------------------------------------------


def _is_embedding(t: TensorInfo) -> bool:
    return t.name == "token_embd.weight"


def _layer_of(t: TensorInfo) -> int | None:
    if t.name.startswith("blk."):
        number = t.name.split(".")[1]
        return int(number) if number.isdigit() else None
    return None


def repacked_bytes(info: GgufInfo, cpu_isa: str) -> int:
    """Bytes llama.cpp's CPU backend copies into repacked layouts on this instruction set."""
    rules = REPACK_RULES.get(cpu_isa)
    if rules is None:
        raise UnknownNameError("CPU instruction set", cpu_isa, list(REPACK_RULES))
    total = 0
    for t in info.tensors:
        multiple = rules.get(t.type_name)
        # token_embd is read by row lookup (get_rows), which the repacked layouts do not serve
        if multiple and len(t.shape) >= 2 and t.shape[1] % multiple == 0 and not _is_embedding(t):
            total += t.n_bytes
    return total


def layer_bytes(info: GgufInfo) -> dict[int, int]:
    sizes: dict[int, int] = {}
    for t in info.tensors:
        layer = _layer_of(t)
        if layer is not None:
            sizes[layer] = sizes.get(layer, 0) + t.n_bytes
    return sizes


def is_output_tied(info: GgufInfo) -> bool:
    return not any(t.name == "output.weight" for t in info.tensors)


def _active_share(info: GgufInfo, t: TensorInfo) -> float:
    """The share of a tensor one token uses: its experts' share in a mixture of experts, else all of it."""
    if "_exps" not in t.name and ".experts." not in t.name:
        return 1.0
    arch = info.architecture
    used, total = info.metadata.get(f"{arch}.expert_used_count"), info.metadata.get(f"{arch}.expert_count")
    return used / total if isinstance(used, int) and isinstance(total, int) and total > 0 else 1.0


def bytes_read_per_token(info: GgufInfo) -> int:
    """Weight bytes a decode step reads: everything but the embedding table, of which it reads one
    row, unless the output projection shares that table (then all of it); of a mixture of experts,
    only the experts a token is routed to."""
    tied = is_output_tied(info)
    return int(sum(t.n_bytes * _active_share(info, t) for t in info.tensors if tied or not _is_embedding(t)))


def matmul_parameters(info: GgufInfo) -> int:
    """Weights multiplied per token (FLOPs are twice this), the embedding only when it is the output."""
    tied = is_output_tied(info)
    return int(sum(t.n_elements * _active_share(info, t) for t in info.tensors if len(t.shape) >= 2 and (tied or not _is_embedding(t))))


# --- calibration --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Calibration:
    """Constants of one runtime on one backend, measured by edgecds (see calibrate.py)."""

    backend: str
    runtime_base_bytes: int  # the process before any model: interpreter and engine libraries
    vocab_bytes_per_token: float  # the engine's tokenizer tables, per token entry (a merge counts MERGE_COST_IN_TOKENS)
    context_fixed_bytes: int  # graph metadata, threads, output buffer and code touched while running
    decode_efficiency: float  # measured decode tokens/s over the bandwidth roofline
    prompt_efficiency: float  # measured prompt tokens/s over the compute roofline
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def measured(self) -> bool:
        return bool(self.source.get("measured"))


CALIBRATION_FILE = "calibration.json"


def cpu_entry(features: tuple[str, ...]) -> str:
    """The calibration file's name for CPU constants measured on a CPU with these engine-relevant
    features (host.ENGINE_CPU_FEATURES): llama.cpp takes other kernels on another feature set."""
    return "cpu[" + "+".join(features) + "]"


def calibrated_for_cpu(calibration: Calibration, features: tuple[str, ...]) -> bool:
    """Whether these constants were measured on a CPU with exactly these features."""
    recorded = calibration.source.get("cpu_features")
    return recorded is not None and tuple(recorded) == tuple(features)


def load_calibrations(path: Path | None = None) -> dict[str, Calibration]:
    if path is None:
        text = resources.files("edgecds.hwbench").joinpath(CALIBRATION_FILE).read_text(encoding="utf-8")
        where = CALIBRATION_FILE
    else:
        text, where = path.read_text(encoding="utf-8"), str(path)
    try:
        data = json.loads(text)
        return {name: Calibration(backend=name.split("[")[0], **values) for name, values in data["backends"].items()}
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise InvalidInputError(f"{where}: not a calibration file ({exc})") from None


def calibration_for(backend: str, calibrations: dict[str, Calibration] | None = None,
                    cpu_features: tuple[str, ...] | None = None) -> Calibration:
    """The backend's constants; on a CPU whose features were calibrated (`cpu[...]` entries), those."""
    known = calibrations if calibrations is not None else load_calibrations()
    if backend == "cpu" and cpu_features is not None and cpu_entry(cpu_features) in known:
        return known[cpu_entry(cpu_features)]
    if backend not in known:
        raise UnknownNameError("calibrated backend", backend, list(known))
    return known[backend]


# --- the prediction -----------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryPrediction:
    """Bytes, by part; `peak_bytes` is what must fit the device's budget."""

    backend: str
    weights: int
    repacked: int
    kv_cache: int
    compute: int
    output: int
    runtime: int
    gpu_layers: int = 0  # layers (plus the output layer, counted as one more) on the GPU
    total_layers: int = 0  # the model's layers plus the output layer: gpu_layers of a full offload
    gpu_bytes: int = 0
    host_bytes: int = 0
    # a speculative draft model beside it (`plan --draft`): its weights, KV cache at the same
    # context and compute buffers; the process and its libraries are shared
    draft: int = 0

    @property
    def peak_bytes(self) -> int:
        return self.weights + self.repacked + self.kv_cache + self.compute + self.output + self.runtime + self.draft


@dataclass(frozen=True)
class SpeedPrediction:
    decode_tps: float
    prompt_tps: float | None  # None when the device profile gives no compute figure for its backend
    bytes_per_token: int
    flops_per_token: int
    calibrated: bool  # False: the backend's efficiencies are assumptions, not edgecds measurements


@dataclass(frozen=True)
class Prediction:
    variant: str
    device: str
    settings: RunSettings
    memory: MemoryPrediction
    speed: SpeedPrediction
    budget_bytes: int
    fits: bool
    why_not: str = ""
    label: str = "predicted"

    @property
    def headroom_bytes(self) -> int:
        return self.budget_bytes - self.memory.peak_bytes

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["memory"]["peak_bytes"] = self.memory.peak_bytes
        data["headroom_bytes"] = self.headroom_bytes
        return data


def predict_memory(info: GgufInfo, settings: RunSettings, device: DeviceProfile, calibration: Calibration) -> MemoryPrediction:
    shape = ModelShape.from_gguf(info)
    backend = device_backend(device)
    # the KV cache, and a hybrid model's recurrent state beside it (llama.cpp's memory of the context)
    kv = kv_cache_bytes(shape, padded_ctx(settings.n_ctx), settings.type_k, settings.type_v) + recurrent_state_bytes(shape)
    output = shape.n_vocab * 4  # logits of one sequence's last token
    runtime = (calibration.runtime_base_bytes + round(calibration.vocab_bytes_per_token * shape.vocab_units) + calibration.context_fixed_bytes
               + graph_extra_bytes(shape, settings))
    if backend == "cpu":
        return MemoryPrediction(
            # repacked copies only where llama.cpp makes them: not with its extra buffers off (engine/cpu_paths.py)
            backend, weights=info.file_size, repacked=0 if settings.extra_buffers is False else repacked_bytes(info, device.cpu_isa), kv_cache=kv,
            compute=compute_touched_bytes(shape, settings), output=output, runtime=runtime, total_layers=shape.n_layers + 1,
        )
    # GPU backends allocate their compute buffer in full; the weights live in GPU buffers.
    compute = compute_reserved_bytes(shape, settings)
    weights = info.tensor_bytes
    if device.memory_kind != "discrete":  # unified (Jetson, Apple): one pool holds everything
        return MemoryPrediction(backend, weights=weights, repacked=0, kv_cache=kv, compute=compute, output=output,
                                runtime=runtime, gpu_layers=shape.n_layers + 1, total_layers=shape.n_layers + 1, gpu_bytes=weights + kv + compute)
    return _split_for_discrete_gpu(info, shape, kv, compute, output, runtime, backend, device)


def _split_for_discrete_gpu(
    info: GgufInfo, shape: ModelShape, kv: int, compute: int, output: int, runtime: int, backend: str, device: DeviceProfile
) -> MemoryPrediction:
    """Offload as many layers as fit the GPU budget, as llama.cpp's -ngl does from the last layer
    up; the output layer goes last and counts as one more. The rest stays in host RAM."""
    budget = int(device.budget_gib * GIB)
    per_layer = layer_bytes(info)
    kv_per_layer = kv // shape.n_layers
    head = sum(t.n_bytes for t in info.tensors if _layer_of(t) is None and not _is_embedding(t))
    if is_output_tied(info):  # the output shares the embedding table: a copy goes to the GPU
        head += sum(t.n_bytes for t in info.tensors if _is_embedding(t))
    used = compute
    n = 0
    for layer in sorted(per_layer, reverse=True):
        if used + per_layer[layer] + kv_per_layer > budget:
            break
        used += per_layer[layer] + kv_per_layer
        n += 1
    if n == shape.n_layers and used + head <= budget:
        used += head
        n += 1
    gpu = used if n else 0
    host_weights = info.file_size - sum(per_layer[layer] for layer in sorted(per_layer, reverse=True)[: min(n, shape.n_layers)])
    host_kv = kv - kv_per_layer * min(n, shape.n_layers)
    host = host_weights + host_kv + output + runtime + (0 if n else compute)
    return MemoryPrediction(backend, weights=info.tensor_bytes, repacked=0, kv_cache=kv, compute=compute, output=output,
                            runtime=runtime, gpu_layers=n, total_layers=shape.n_layers + 1, gpu_bytes=gpu, host_bytes=host)


def predict_speed(info: GgufInfo, settings: RunSettings, device: DeviceProfile, calibration: Calibration) -> SpeedPrediction:
    shape = ModelShape.from_gguf(info)
    # decode at the end of the workload: the weights plus the KV cells attended to
    n_kv = micro_batches(RunSettings(**{**asdict(settings), "decode_tokens": max(1, settings.decode_tokens)}))[-1][0]
    kv_read = kv_cell_bytes(shape, settings.type_k, settings.type_v) * n_kv
    weights_read = bytes_read_per_token(info)
    bytes_per_token = weights_read + kv_read
    decode = calibration.decode_efficiency * device.bandwidth_gbs * 1e9 / bytes_per_token
    # prompt: 2 FLOPs a weight, plus QK and KV products over the cells attended (on average half the prompt)
    avg_kv = settings.effective_prompt_tokens / 2
    attention = 2 * 2 * shape.n_layers * shape.n_head * (shape.head_dim_k + shape.head_dim_v) // 2 * avg_kv
    flops_per_token = int(2 * matmul_parameters(info) + attention)
    gflops = device.gpu_tflops_fp32 * 1000 if device_backend(device) != "cpu" and device.gpu_tflops_fp32 else device.cpu_gflops_fp32
    prompt = calibration.prompt_efficiency * gflops * 1e9 / flops_per_token if gflops else None
    return SpeedPrediction(decode_tps=decode, prompt_tps=prompt, bytes_per_token=bytes_per_token,
                           flops_per_token=flops_per_token, calibrated=calibration.measured)


def host_cpu_features(device: DeviceProfile) -> tuple[str, ...] | None:
    """This machine's CPU features when `device` is this machine as detected; None for a shipped profile."""
    from edgecds.host import detect_cpu_features

    return detect_cpu_features() if device.path == "detected" else None


def predict(info: GgufInfo, settings: RunSettings, device: DeviceProfile, calibrations: dict[str, Calibration] | None = None,
            draft: GgufInfo | None = None) -> Prediction:
    """`info` on `device` at `settings`; with a `draft`, the memory of both, each with its own KV
    cache at the context (the draft runs where the target runs)."""
    calibration = calibration_for(device_backend(device), calibrations, host_cpu_features(device))
    memory = predict_memory(info, settings, device, calibration)
    if draft is not None:
        beside = predict_memory(draft, settings, device, calibration)
        memory = replace(memory, draft=beside.peak_bytes - beside.runtime, gpu_bytes=memory.gpu_bytes + beside.gpu_bytes,
                         host_bytes=memory.host_bytes + beside.host_bytes)
    speed = predict_speed(info, settings, device, calibration)
    budget = int(device.budget_gib * GIB)
    reasons = []
    if memory.backend != "cpu" and device.memory_kind == "discrete":
        host_budget = int((device.host_ram_gib or 0) * GIB * 0.75)  # leave a quarter of RAM to the OS and other programs
        if memory.gpu_layers == 0:
            reasons.append(f"not even one layer fits the GPU's {device.budget_gib:g} GiB budget")
        elif memory.host_bytes > host_budget:
            reasons.append(f"needs {memory.host_bytes / GIB:.2f} GiB of host RAM for the layers left on the CPU, has {host_budget / GIB:.2f}")
        peak_in_budget = memory.gpu_bytes <= budget
    else:
        peak_in_budget = memory.peak_bytes <= budget
        if not peak_in_budget:
            reasons.append(f"needs {memory.peak_bytes / GIB:.2f} GiB, over the {device.budget_gib:g} GiB budget by {(memory.peak_bytes - budget) / MIB:.0f} MiB")
    if settings.n_ctx > device.max_ctx:
        reasons.append(f"context {settings.n_ctx} is over the device's maximum {device.max_ctx}")
    if settings.n_ctx > padded_ctx(ModelShape.from_gguf(info).context_train):
        reasons.append(f"context {settings.n_ctx} is over what the model was trained for ({ModelShape.from_gguf(info).context_train})")
    fits = peak_in_budget and not reasons
    return Prediction(info.path.name, device.id, settings, memory, speed, budget, fits, "; ".join(reasons))


def percent_error(predicted: float, measured: float) -> float:
    return (predicted - measured) / measured * 100 if measured else math.inf


# --- a plan: every variant of a variants.json against one device --------------------------------


@dataclass(frozen=True)
class PlanEntry:
    """One variant's row: a prediction, or why none could be made (format or type not run there)."""

    name: str
    type: str
    format: str
    prediction: Prediction | None
    why_not: str = ""
    unknown: bool = False  # no predictor for this format: whether it fits is for `profile` to measure
    file_bytes: int | None = None  # the file's size; estimated when the plan was made from a config

    @property
    def fits(self) -> bool:
        return self.prediction is not None and self.prediction.fits

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type, "format": self.format, "fits": None if self.unknown else self.fits,
                "file_bytes": self.file_bytes,
                "why_not": self.prediction.why_not if self.prediction else self.why_not,
                "prediction": self.prediction.to_dict() if self.prediction else None}


FIRST_TOKEN_PROMPT = 512  # the prompt a time to first token is given for: a vignette with its question and a system prompt


def first_token_seconds(prediction: Prediction, prompt_tokens: int = FIRST_TOKEN_PROMPT) -> float | None:
    """Predicted seconds from a `prompt_tokens` prompt to the first answer token, or None where the
    profile gives no compute figure for its backend."""
    speed = prediction.speed
    if not speed.prompt_tps or not speed.decode_tps:
        return None
    return min(prompt_tokens, prediction.settings.n_ctx) / speed.prompt_tps + 1 / speed.decode_tps


@dataclass(frozen=True)
class Plan:
    device: str
    settings: RunSettings
    entries: list[PlanEntry]
    label: str = "predicted"
    advice: tuple[str, ...] = ()  # when nothing fits: what would, each line a change the user can make
    draft: str | None = None  # each variant planned with this speculative draft beside it (`plan --draft`)

    @property
    def fits_any(self) -> bool:
        return any(e.fits or e.unknown for e in self.entries)

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "device": self.device, "settings": asdict(self.settings), "fits_any": self.fits_any,
                "first_token_prompt_tokens": FIRST_TOKEN_PROMPT, "advice": list(self.advice), "draft": self.draft,
                "entries": [{**e.to_dict(), "first_token_seconds": first_token_seconds(e.prediction) if e.prediction else None}
                            for e in self.entries]}


def fit_advice(infos: dict[str, GgufInfo], entries: list[PlanEntry], settings: RunSettings, device: DeviceProfile,
               calibrations: dict[str, Calibration] | None = None) -> tuple[str, ...]:
    """When no variant fits: the closest one, and what would make it (or a smaller type) fit, each
    figure the predictor's: a shorter context, an 8-bit KV cache, or a type of fewer bits a weight."""
    from edgecds.formats.types import QUANT_TYPES

    predicted = [e for e in entries if e.prediction is not None and e.type in infos]
    if not predicted or any(e.fits for e in entries):
        return ()
    closest = min(predicted, key=lambda e: e.prediction.memory.peak_bytes if e.prediction else 0)
    info, p = infos[closest.type], closest.prediction
    assert p is not None
    lines = [f"closest: {closest.type}: {p.why_not}"]
    for n_ctx in _contexts_below(settings.n_ctx):
        shorter = predict(info, replace(settings, n_ctx=n_ctx), device, calibrations)
        if shorter.fits:
            lines.append(f"{closest.type} fits with --ctx {n_ctx} ({shorter.headroom_bytes / MIB:.0f} MiB to spare)")
            break
    if settings.type_k == "f16" and settings.n_ctx <= device.max_ctx:
        cache8 = predict(info, replace(settings, type_k="q8_0", type_v="q8_0"), device, calibrations)
        if cache8.fits:
            lines.append(f"{closest.type} fits at context {settings.n_ctx} with --cache-type q8_0 ({cache8.headroom_bytes / MIB:.0f} MiB "
                         "to spare; `edgecds tune` checks what an 8-bit KV cache costs in accuracy)")
    over = p.memory.peak_bytes - p.budget_bytes
    bits = _bits_of(closest.type)
    if over > 0 and bits:
        for q in sorted((q for q in QUANT_TYPES if q.format == "gguf" and q.nominal_bits_per_weight < bits), key=lambda q: -q.nominal_bits_per_weight):
            saved = int(p.memory.weights * (1 - q.nominal_bits_per_weight / bits))
            if saved > over:
                lines.append(f"a type of fewer bits a weight, e.g. {q.name} ({q.nominal_bits_per_weight:.1f} bits), would need about "
                             f"{(p.memory.peak_bytes - saved) / MIB:.0f} MiB (an estimate from the weights' share): "
                             f"`edgecds quantize --types {q.name}`, then plan again")
                break
    if len(lines) == 1:
        lines.append(f"even the weights of {closest.type} take {p.memory.weights / MIB:.0f} MiB of the {p.budget_bytes / MIB:.0f} MiB budget: "
                     "choose a smaller model for this device")
    return tuple(lines)


def _contexts_below(n_ctx: int) -> list[int]:
    """Shorter contexts to try, longest first: multiples of 512 below n_ctx, down to 512."""
    return [c for c in range((n_ctx - 1) // 512 * 512, 511, -512) if c < n_ctx]


def _bits_of(type_name: str) -> float | None:
    from edgecds.formats.types import QUANT_TYPE_BY_NAME

    q = QUANT_TYPE_BY_NAME.get(type_name)
    return q.nominal_bits_per_weight if q is not None else None


def plan(variants_json: Path, device: DeviceProfile, n_ctx: int | None = None, kv_type: str = "f16",
         calibrations: dict[str, Calibration] | None = None, draft: str | None = None) -> Plan:
    """Predict every variant recorded in `variants_json` on `device`, from the files alone; with
    `draft` (a GGUF variant's type there), each with that draft model beside it ("ngram" adds nothing)."""
    from edgecds.adopt import open_variants
    from edgecds.engine.speculative import NGRAM
    from edgecds.formats.gguf_file import read_gguf
    from edgecds.variants import variant_file

    folder, record = open_variants(variants_json)
    cache_type(kv_type)  # an unknown cache type fails here, listing the known ones
    settings = settings_for(device, n_ctx, type_k=kv_type.lower(), type_v=kv_type.lower())
    draft_info = None
    if draft is not None and draft.lower() != NGRAM:
        (draft_record,) = record.select((draft,), folder)
        if draft_record.format != "gguf":
            raise UsageError(f"--draft {draft_record.type}: a draft model must be a GGUF variant (or --draft ngram)")
        draft_info = read_gguf(variant_file(folder, draft_record))
    entries: list[PlanEntry] = []
    infos: dict[str, GgufInfo] = {}
    for variant in sorted(record.variants, key=lambda v: -v.file_size):
        if variant.format not in device.formats:
            entries.append(PlanEntry(variant.name, variant.type, variant.format, None,
                                     f"{device.id} runs {', '.join(device.formats)}, not {variant.format}"))
        elif device.quant_types and not device.runs_type(variant.type, variant.tensor_types):
            entries.append(PlanEntry(variant.name, variant.type, variant.format, None, f"{variant.type} is not among the types {device.id} runs"))
        elif variant.format != "gguf":
            entries.append(PlanEntry(variant.name, variant.type, variant.format, None, f"no predictor for {variant.format} yet: `edgecds profile` measures it", unknown=True))
        else:
            info = infos[variant.type] = read_gguf(variant_file(folder, variant))
            beside = draft_info if draft_info is not None and draft_info.path != info.path else None
            entries.append(PlanEntry(variant.name, variant.type, variant.format, predict(info, settings, device, calibrations, beside),
                                     file_bytes=info.file_size))
    return Plan(device.id, settings, entries, advice=fit_advice(infos, entries, settings, device, calibrations), draft=draft)
