"""An Optimum llama-style decoder graph, rewritten to run on onnxruntime's fused attention.

Optimum's `text-generation-with-past` export spells each layer's attention out in about 100
small ops (shape arithmetic, rotary halves, the KV repeat for grouped heads, the causal mask);
on a CPU each op costs a few microseconds of dispatch whatever its size, and at decode that is
most of a small model's step (profiled: 3,160 nodes, the matmuls under a third of the time).
This rewrite replaces every layer's attention with one `com.microsoft.GroupQueryAttention` (the
op onnxruntime-genai's model builder emits): rotary applied inside from cos/sin tables, KV heads
shared without copies, causal masking built in. Projections, norms and MLP are untouched, so
every weight and quantized block stays byte-for-byte what was exported and quantized.

The rewritten graph is a derived file the runtime compiles once per variant and caches (the
variant on disk stays Optimum's layout, which any runtime reads). It is trusted only after
`verify` compares its logits with the original graph's on clinical text. What it assumes is what
edgecds's runtime does: one unpadded sequence whose positions run 0, 1, 2, ...

    python -m edgecds.engine.onnx_fuse SRC_FOLDER DST_FOLDER   (the child the runtime starts)
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgecds.child import emit_json

FUSION_VERSION = 3  # part of the cache key: a change to the rewrite recompiles every variant
# rotary over whole heads (one table, or one per layer kind: Gemma 3's local and global bases),
# grouped heads, optional q/k/v biases (qwen2), per-head q/k norms before the transpose into heads
# (qwen3, qwen3_moe) or after it (gemma3), sliding windows per layer (GroupQueryAttention's
# local_window_size), a query scale apart from the head size (Gemma's query_pre_attn_scalar) and
# per-head attention sinks (gpt-oss; head_sink)
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "gemma3_text", "gpt_oss")
# Why the rest are run as exported: what GroupQueryAttention, or this matcher, does not express.
NOT_FUSED = {
    "gemma3": "the multimodal wrapper's config (its text model, gemma3_text, is fused)",
    "phi3": "one fused qkv projection split three ways, and rotary over part of each head: not matched yet",
    "qwen3_next": "Optimum does not export it",
}
# ops allowed between a projection and its transpose into heads: the reshape, a bias, an RMS norm
HEAD_CHAIN_OPS = frozenset({"Reshape", "Add", "Mul", "Cast", "Div", "Pow", "ReduceMean", "Sqrt", "Reciprocal",
                            "SimplifiedLayerNormalization", "Constant", "Shape", "Gather", "Unsqueeze", "Concat"})
# where a rotate-half begins: slicing (or splitting) the heads into halves
ROTARY_SPLITS = ("Slice", "Split")
# ops of an RMS norm over each head's last axis, as Optimum spells it
NORM_OPS = frozenset({"Cast", "Pow", "ReduceMean", "Add", "Sqrt", "Div", "Mul", "Reciprocal", "Constant", "SimplifiedLayerNormalization"})
MATMULS = ("MatMul", "MatMulNBits")
DOMAIN = "com.microsoft"
# Compiled vs original logits on 72 positions of the clinical text. A graph whose MatMulNBits
# quantizes its activations (accuracy_level 4) turns the last-bit differences of a fused softmax
# into a different int8 rounding now and then: measured on the default model, int4 top-1 agreement
# 0.986 and mean KL 0.0056, int8 0.986 and 0.0042 (each as far from fp32 as before: on the 1,020-
# token drift text KL 0.2958 fused vs 0.2951 as exported); fp32 agrees to 5e-5 (KL 0).
# The rotary halves laid out wrongly (interleaved) scores top-1 0.43, KL 1.65.
# A float graph (no quantized op) has no such excuse: its fused logits must match to float
# rounding, or a one-token error at a sliding window's edge (max 0.28-0.41 on the Gemma 3 zoo
# model; top-1 and KL barely move) would pass.
VERIFY_LIMITS = {"top1_agreement_min": 0.9, "kl_mean_max": 0.05, "float_max_abs_diff": 1e-3}
QUANTIZED_OPS = frozenset({"MatMulNBits", "MatMulInteger", "DynamicQuantizeLinear", "QLinearMatMul", "DequantizeLinear", "GatherBlockQuantized"})
VERIFY_CHUNKS = (32, 16) + (1,) * 24  # a prompt in two batches (the second after a cache), then decode


WINDOWED_BY_LAYER = ("gemma3_text", "gpt_oss")  # families whose windows are per layer, never on every layer


def verify_chunks(config: dict[str, Any]) -> tuple[int, ...]:
    """VERIFY_CHUNKS, with a batch as long as the widest sliding window in the middle, so that the
    decode steps after it attend across the window's edge (where a wrong window shows)."""
    try:
        window = max(layer_windows(config, int(config.get("num_hidden_layers") or 0)) or [0])
    except CannotFuse:
        window = 0
    return VERIFY_CHUNKS[:2] + ((window,) if window else ()) + VERIFY_CHUNKS[2:]


def layer_windows(config: dict[str, Any], n_layers: int) -> list[int]:
    """Each layer's sliding window in tokens (0: attends to the whole context), as transformers
    reads the config: `layer_types` where given, else Gemma's `sliding_window_pattern` (every
    Nth layer global), else one window for every layer when it is on."""
    window = config.get("sliding_window")
    window = window if isinstance(window, int) and not isinstance(window, bool) and window > 0 else 0
    types = config.get("layer_types")
    if types is not None:
        _check(isinstance(types, list) and len(types) == n_layers, f"layer_types does not list {n_layers} layers")
        return [window if t == "sliding_attention" else 0 for t in types]
    pattern = config.get("sliding_window_pattern")
    if isinstance(pattern, int) and pattern > 0:
        return [0 if (i + 1) % pattern == 0 else window for i in range(n_layers)]
    _check(config.get("model_type") not in WINDOWED_BY_LAYER or not window,
           f"{config.get('model_type')} windows some layers but the config says neither layer_types nor sliding_window_pattern")
    on = window and config.get("use_sliding_window", True)
    return [window if on else 0] * n_layers


class CannotFuse(Exception):
    """The graph is not the layout this rewrite knows; the runtime then runs it as exported."""


@dataclass(frozen=True)
class FusionReport:
    layers: int
    nodes_before: int
    nodes_after: int
    max_positions: int
    seconds: float
    verify: dict[str, Any]


def _check(condition: bool, why: str) -> None:
    if not condition:
        raise CannotFuse(why)


class _Graph:
    """Who produces and who consumes each tensor, built once."""

    def __init__(self, graph: Any) -> None:
        self.graph = graph
        self.producer = {out: node for node in graph.node for out in node.output}
        self.consumers: dict[str, list[Any]] = defaultdict(list)
        for node in graph.node:
            for name in node.input:
                self.consumers[name].append(node)
        self.weights = {t.name for t in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}

    def is_projection(self, node: Any) -> bool:
        return node is not None and node.op_type in MATMULS and node.input[1] in self.weights

    def heads_behind(self, tensor: str) -> tuple[Any, str]:
        """The weight matmul that `tensor` (a layer's new keys or values, heads first) comes from, and
        the tensor just before the transpose into heads (batch, tokens, heads, dim): the projection
        after its bias and per-head norm (Qwen2's biases, Qwen3's q/k norms), before any rotary."""
        found, seen, todo = [], set(), [tensor]
        while todo:
            node = self.producer.get(todo.pop())
            if node is None or id(node) in seen or node.op_type in MATMULS:
                continue
            seen.add(id(node))
            if node.op_type == "Transpose":
                projection = self.projection_through(node.input[0])
                if projection is not None:
                    found.append((projection, node.input[0]))
                    continue
            todo.extend(node.input)
        _check(len(found) == 1, f"{tensor}: expected one projection feeding it, found {len(found)}")
        return found[0]

    def projection_through(self, tensor: str) -> Any:
        """The one projection `tensor` is computed from through a reshape into heads and, optionally,
        a bias and an elementwise per-head norm; None when the chain is anything else."""
        projections, reshapes, seen, todo = set(), 0, set(), [tensor]
        found = None
        while todo:
            name = todo.pop()
            node = self.producer.get(name)
            if node is None or name in self.weights or id(node) in seen:
                continue
            seen.add(id(node))
            if self.is_projection(node):
                projections.add(id(node))
                found = node
                continue
            if node.op_type not in HEAD_CHAIN_OPS:
                return None
            if node.op_type == "Reshape":
                reshapes += 1
                todo.append(node.input[0])  # its shape input is arithmetic on the batch and length
                continue
            todo.extend(node.input)
        return found if len(projections) == 1 and reshapes == 1 else None

    def heads_after(self, projection: Any) -> str:
        """Forward from a projection (Q's) to the tensor just before its transpose into heads."""
        seen, todo = set(), [projection.output[0]]
        while todo:
            for node in self.consumers.get(todo.pop(0), []):
                if id(node) in seen:
                    continue
                seen.add(id(node))
                if node.op_type == "Transpose":
                    _check(self.projection_through(node.input[0]) is projection, f"{projection.name}: its heads come from elsewhere too")
                    return str(node.input[0])
                _check(node.op_type in HEAD_CHAIN_OPS, f"{projection.name}: {node.op_type} before the heads' transpose")
                todo.extend(node.output)
        raise CannotFuse(f"no transpose into heads after {projection.name}")

    def first_projection_after(self, tensor: str) -> Any:
        """The first weight matmul downstream of `tensor` (a layer's output projection)."""
        seen, todo = set(), [tensor]
        while todo:
            for node in self.consumers.get(todo.pop(0), []):
                if id(node) in seen:
                    continue
                seen.add(id(node))
                if self.is_projection(node):
                    return node
                todo.extend(node.output)
        raise CannotFuse(f"no output projection after {tensor}")

    def subgraph(self, model: Any, source: str, outputs: list[str]) -> Any:
        """A model of the nodes computing `outputs` from the input `source` and weights alone."""
        from onnx import TensorProto, helper

        inits = {t.name: t for t in self.graph.initializer}
        nodes: dict[int, Any] = {}
        todo = list(outputs)
        while todo:
            name = todo.pop()
            node = self.producer.get(name) if name != source else None
            if node is None:
                _check(name in inits or name in ("", source), f"the rotary table depends on {name!r}, not only on positions")
                continue
            if id(node) not in nodes:
                nodes[id(node)] = node
                todo.extend(node.input)
        order = [n for n in self.graph.node if id(n) in nodes]  # the graph's own order is topological
        used = {i for n in order for i in n.input}
        shape = [1, None] if source == "position_ids" else [None]  # the graph input, or the Range it is made from
        graph = helper.make_graph(order, "rope", [helper.make_tensor_value_info(source, TensorProto.INT64, shape)],
                                  [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
                                  [inits[name] for name in used if name in inits])
        return helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)

    def end_of_chain(self, node: Any) -> str:
        """Follow a single-consumer chain of elementwise scaling and casts (cos -> *scale -> cast)."""
        out = node.output[0]
        while len(self.consumers.get(out, [])) == 1 and self.consumers[out][0].op_type in ("Mul", "Cast"):
            out = self.consumers[out][0].output[0]
        return str(out)


def _window_attribute(window: int) -> int:
    """`local_window_size` for a window of `window` tokens counting the current one (transformers'
    sliding window). onnxruntime releases differ: older CPU kernels attend one token more than the
    attribute says (fixed in 2025), so this one is asked, with one tiny session."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    global _WINDOW_EXTRA
    if _WINDOW_EXTRA is None:
        n, size = 6, 8  # value rows one-hot by position, equal scores: the last row's output counts the keys it saw
        node = helper.make_node("GroupQueryAttention", ["q", "k", "v", "", "", "seqlens_k", "total"], ["out", "pk", "pv"], domain=DOMAIN,
                                num_heads=1, kv_num_heads=1, local_window_size=2)
        floats = [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, n, size]) for x in "qkv"]
        ints = [helper.make_tensor_value_info(x, TensorProto.INT32, [1]) for x in ("seqlens_k", "total")]
        outs = [helper.make_tensor_value_info(x, TensorProto.FLOAT, None) for x in ("out", "pk", "pv")]
        model = helper.make_model(helper.make_graph([node], "probe", floats + ints, outs),
                                  opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])
        v = np.zeros((1, n, size), np.float32)
        v[0, np.arange(n), np.arange(n)] = 1
        zeros = np.zeros((1, n, size), np.float32)
        try:
            session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
            out = session.run(["out"], {"q": zeros, "k": zeros, "v": v, "seqlens_k": np.array([n - 1], np.int32),
                                        "total": np.array([n], np.int32)})[0]
        except Exception as exc:  # onnxruntime's own error classes
            raise CannotFuse(f"this onnxruntime's GroupQueryAttention does not run a sliding window ({type(exc).__name__})") from None
        seen = int((out[0, -1] > 1e-6).sum())
        _check(seen in (2, 3), f"this onnxruntime's sliding window attends {seen} keys for a window of 2: not understood")
        _WINDOW_EXTRA = seen - 2
    return window - _WINDOW_EXTRA


_WINDOW_EXTRA: int | None = None


def _rotary_ops(g: _Graph, rotated: str) -> tuple[Any, Any]:
    """The Cos and Sin ops whose tables rotate `rotated` (a layer's new keys), found upstream of it."""
    found: dict[str, list[Any]] = {"Cos": [], "Sin": []}
    seen, todo = set(), [rotated]
    while todo:
        node = g.producer.get(todo.pop())
        if node is None or id(node) in seen or g.is_projection(node):
            continue
        seen.add(id(node))
        if node.op_type in found:
            found[node.op_type].append(node)
            continue
        todo.extend(node.input)
    _check(len(found["Cos"]) == 1 and len(found["Sin"]) == 1, f"{rotated}: expected one rotary table (one Cos and one Sin) upstream")
    return found["Cos"][0], found["Sin"][0]


def _positions_source(g: _Graph, cos: Any) -> str:
    """Where the rotary table's positions come from: the `position_ids` input, or (Gemma 3's export,
    which has none) the Range over the cache positions that the graph builds itself."""
    seen, todo, ranges = set(), list(cos.input), []
    while todo:
        name = todo.pop()
        if name == "position_ids":
            return name
        node = g.producer.get(name)
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type == "Range":
            ranges.append(node)
            continue
        todo.extend(node.input)
    _check(len(ranges) == 1, f"{cos.name}: its positions come from neither position_ids nor one Range")
    return str(ranges[0].output[0])


def _rope_tables(model: Any, g: _Graph, ops: tuple[Any, Any], head_dim: int, positions: int, half_tables: bool = False) -> tuple[Any, Any]:
    """cos and sin per position, computed by the graph's own rotary subgraph (so any scaling baked
    into its inverse frequencies carries over), halved as GroupQueryAttention's tables are."""
    import numpy as np
    import onnxruntime as ort

    names = [g.end_of_chain(ops[0]), g.end_of_chain(ops[1])]
    source = _positions_source(g, ops[0])
    feed = np.arange(positions, dtype=np.int64)
    try:
        session = ort.InferenceSession(g.subgraph(model, source, names).SerializeToString(), providers=["CPUExecutionProvider"])
        c, s = session.run(names, {source: feed[None, :] if source == "position_ids" else feed})
    except Exception as exc:  # onnxruntime's own error classes: the subgraph is not a float rotary table
        raise CannotFuse(f"the rotary subgraph does not run on its own ({type(exc).__name__}: {exc})") from None
    c, s = np.asarray(c, np.float32).reshape(positions, -1), np.asarray(s, np.float32).reshape(positions, -1)
    half = head_dim // 2
    if c.shape[1] == half and half_tables:  # one angle per pair already (gpt-oss rotates the two halves with it)
        return np.ascontiguousarray(c), np.ascontiguousarray(s)
    _check(c.shape[1] == head_dim, f"rotary covers {c.shape[1]} of {head_dim} dimensions (partial rotary is not supported)")
    _check(np.allclose(c[:, :half], c[:, half:]), "the rotary table is not rotate-half layout")
    return np.ascontiguousarray(c[:, :half]), np.ascontiguousarray(s[:, :half])


def _attention_sinks(g: _Graph, key_cat: Any, n_heads: int) -> Any:
    """The layer's per-head sink logits (gpt-oss), or None: a learned logit per head that the graph
    concatenates to the attention scores before the softmax and drops after it, which is
    GroupQueryAttention's `head_sink` (one more term in the softmax's denominator)."""
    import numpy as np
    from onnx import numpy_helper

    softmax, seen, todo = None, set(), [str(key_cat.output[0])]
    while todo and softmax is None:  # forward from the keys to the scores' softmax
        for node in g.consumers.get(todo.pop(0), []):
            if id(node) in seen or g.is_projection(node):
                continue
            seen.add(id(node))
            if node.op_type == "Softmax":
                softmax = node
                break
            todo.extend(node.output)
    if softmax is None:
        return None
    inits = {t.name: t for t in g.graph.initializer}
    sinks, seen, back = [], set(), [softmax.input[0]]
    while back:  # back from the softmax to a per-head initializer concatenated to the scores
        node = g.producer.get(back.pop())
        if node is None or id(node) in seen or node is key_cat:
            continue
        seen.add(id(node))
        if node.op_type == "Expand" and node.input[0] in inits:
            values = numpy_helper.to_array(inits[node.input[0]])
            if values.size == n_heads:
                sinks.append(values)
            continue
        if node.op_type in ("Concat", "Sub", "ReduceMax", "Cast", "Where", "Add"):
            back.extend(node.input)
    _check(len(sinks) <= 1, f"{softmax.name}: more than one per-head term before the softmax")
    return np.ascontiguousarray(sinks[0].reshape(n_heads).astype(np.float32)) if sinks else None


def _concat_of_past(g: _Graph, layer: int, kv: str) -> Any:
    cat = g.producer.get(f"present.{layer}.{kv}")
    if cat is None or cat.op_type != "Concat" or list(cat.input) != [f"past_key_values.{layer}.{kv}", cat.input[-1]]:
        raise CannotFuse(f"present.{layer}.{kv} is not Concat(past, new)")
    return cat


def fuse_attention(model: Any, config: dict[str, Any]) -> tuple[int, int]:
    """Rewrite `model` (an onnx ModelProto, weights loaded) in place; (layers fused, max positions)."""
    from onnx import TensorProto, helper, numpy_helper

    model_type = config.get("model_type")
    _check(model_type in MODEL_TYPES, f"model_type {model_type!r}: " + NOT_FUSED.get(str(model_type), f"not one of {', '.join(MODEL_TYPES)}"))
    _check(not config.get("attn_logit_softcapping"), "attention logit soft-capping (Gemma 2) is not expressed")
    n_layers, n_heads = int(config["num_hidden_layers"]), int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_heads)
    head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // n_heads)
    positions = int(config.get("max_position_embeddings") or 4096)
    windows = layer_windows(config, n_layers)
    # Gemma scales queries by query_pre_attn_scalar^-0.5, which need not be the head size
    scale = float(config.get("query_pre_attn_scalar") or head_dim) ** -0.5
    graph = model.graph
    inputs = {i.name: i for i in graph.input}
    for name in ("input_ids", "attention_mask", "past_key_values.0.key"):
        _check(name in inputs, f"no graph input {name!r}")
    _check(inputs["past_key_values.0.key"].type.tensor_type.elem_type == TensorProto.FLOAT, "the KV cache is not float32")
    _check(not any(n.domain == DOMAIN and n.op_type == "GroupQueryAttention" for n in graph.node), "already fused")
    g = _Graph(graph)

    p = "/edgecds/gqa"
    shared = _sequence_lengths(graph, p)
    tables: dict[tuple[int, int], tuple[str, str]] = {}  # (Cos op, Sin op) -> its cache initializers
    replaced: set[int] = set()
    fused = []
    for i in range(n_layers):
        key_cat, value_cat = (_concat_of_past(g, i, kv) for kv in ("key", "value"))
        cos_name, sin_name = _layer_tables(model, g, key_cat, tables, head_dim, positions, p, model_type == "gpt_oss")
        packed = _packed_heads(g, i, key_cat, value_cat, p, shared)
        sinks = _attention_sinks(g, key_cat, n_heads)
        _check((sinks is not None) == (model_type == "gpt_oss"),
               f"layer {i}: " + ("no attention sinks found where gpt-oss has them" if sinks is None else "a per-head term before the softmax this family should not have"))
        if sinks is not None:
            graph.initializer.append(numpy_helper.from_array(sinks, f"{p}/{i}/head_sink"))
        o_proj = g.first_projection_after(f"present.{i}.value")
        out = f"{p}/{i}/attention"
        window: dict[str, Any] = {"local_window_size": _window_attribute(windows[i])} if windows[i] else {}
        fused.append(helper.make_node(
            "GroupQueryAttention",
            [*packed, f"past_key_values.{i}.key", f"past_key_values.{i}.value",
             f"{p}/seqlens_k", f"{p}/total", cos_name, sin_name,
             *(["", "", f"{p}/{i}/head_sink"] if sinks is not None else [])],  # position_ids and attention_bias unused
            [out, f"present.{i}.key", f"present.{i}.value"], name=f"{p}/{i}", domain=DOMAIN,
            num_heads=n_heads, kv_num_heads=n_kv, do_rotary=1, rotary_interleaved=0, scale=scale, **window))
        o_proj.input[0] = out
        replaced |= {id(key_cat), id(value_cat)}
    nodes = [n for n in graph.node if id(n) not in replaced] + shared + fused
    _replace_nodes(graph, nodes)
    # The fused op takes positions from the sequence lengths: position_ids is no longer read.
    if "position_ids" in inputs:
        graph.input.remove(inputs["position_ids"])
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return n_layers, positions


def _sequence_lengths(graph: Any, p: str) -> list[Any]:
    """Sequence lengths from the mask, as genai's builder derives them: seqlens_k = tokens - 1,
    and the total; with the constants the rewrite shares."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    graph.initializer.extend([
        numpy_helper.from_array(np.array([1], np.int64), f"{p}/axis1"), numpy_helper.from_array(np.array(1, np.int64), f"{p}/one"),
        numpy_helper.from_array(np.array([0, 0, -1], np.int64), f"{p}/packed_shape"),
    ])
    return [
        helper.make_node("ReduceSum", ["attention_mask", f"{p}/axis1"], [f"{p}/tokens"], name=f"{p}/tokens", keepdims=0),
        helper.make_node("Sub", [f"{p}/tokens", f"{p}/one"], [f"{p}/last"], name=f"{p}/last"),
        helper.make_node("Cast", [f"{p}/last"], [f"{p}/seqlens_k"], name=f"{p}/seqlens_k", to=TensorProto.INT32),
        helper.make_node("Shape", ["attention_mask"], [f"{p}/mask_shape"], name=f"{p}/mask_shape"),
        helper.make_node("Gather", [f"{p}/mask_shape", f"{p}/one"], [f"{p}/total64"], name=f"{p}/total64", axis=0),
        helper.make_node("Cast", [f"{p}/total64"], [f"{p}/total"], name=f"{p}/total", to=TensorProto.INT32),
    ]


def _layer_tables(model: Any, g: _Graph, key_cat: Any, tables: dict[tuple[int, int], tuple[str, str]], head_dim: int,
                  positions: int, p: str, half_tables: bool) -> tuple[str, str]:
    """The cos/sin cache initializers for the rotary table this layer uses, made the first time a
    table is met (Gemma 3 has two: local and global)."""
    from onnx import numpy_helper

    ops = _rotary_ops(g, key_cat.input[1])
    key = (id(ops[0]), id(ops[1]))  # by the ops themselves: exported names can be empty
    if key not in tables:
        cos, sin = _rope_tables(model, g, ops, head_dim, positions, half_tables)
        names = (f"{p}/cos_cache_{len(tables)}", f"{p}/sin_cache_{len(tables)}")
        g.graph.initializer.extend([numpy_helper.from_array(cos, names[0]), numpy_helper.from_array(sin, names[1])])
        tables[key] = names
    return tables[key]


def _packed_heads(g: _Graph, i: int, key_cat: Any, value_cat: Any, p: str, shared: list[Any]) -> list[str]:
    """Layer i's Q, K and V as GroupQueryAttention reads them, (batch, tokens, heads x dim): each
    projection's heads as computed (after its bias and norm, before rotary), flattened; new
    nodes go to `shared`."""
    from onnx import helper

    (k_proj, k_heads), (v_proj, v_heads) = g.heads_behind(key_cat.input[1]), g.heads_behind(value_cat.input[1])
    _check(k_proj.input[0] == v_proj.input[0], f"layer {i}: K and V read different inputs")
    q_proj = [n for n in g.consumers[k_proj.input[0]] if g.is_projection(n) and n is not k_proj and n is not v_proj]
    _check(len(q_proj) == 1, f"layer {i}: expected one Q projection beside K and V, found {len(q_proj)}")
    packed = []
    for role, heads in (("q", g.heads_after(q_proj[0])), ("k", k_heads), ("v", v_heads)):
        heads = _norm_after_transpose(g, heads, f"{p}/{i}/{role}_norm", shared)
        before = g.producer.get(heads)
        if before is not None and before.op_type == "Reshape":  # no norm: the projection's own output (with its bias)
            packed.append(str(before.input[0]))
            continue
        flat = f"{p}/{i}/{role}_packed"
        shared.append(helper.make_node("Reshape", [heads, f"{p}/packed_shape"], [flat], name=flat))
        packed.append(flat)
    return packed


def _norm_after_transpose(g: _Graph, heads: str, prefix: str, shared: list[Any]) -> str:
    """`heads` (batch, tokens, heads, dim) with the per-head norm that the graph applies after
    the transpose into (batch, heads, tokens, dim) (Gemma 3's q/k norms) applied here instead;
    `heads` itself when there is none. A norm over the last axis with a weight over the last axis
    gives the same numbers in either layout, so the norm's ops are copied onto the untransposed
    tensor. The norm ends where the rotary begins: the tensor its rotate-half slices read."""
    from onnx import helper

    transposes = [n for n in g.consumers.get(heads, []) if n.op_type == "Transpose"]
    if len(transposes) != 1:
        return heads
    start = str(transposes[0].output[0])
    # forward from the transpose through norm ops to the tensor the rotary slices (none: no norm)
    end, seen, todo = None, set(), [start]
    while todo and end is None:
        name = todo.pop(0)
        consumers = g.consumers.get(name, [])
        if name != start and any(c.op_type in ROTARY_SPLITS for c in consumers):
            end = name
            break
        for node in consumers:
            if node.op_type in NORM_OPS and id(node) not in seen:
                seen.add(id(node))
                todo.extend(node.output)
    if any(c.op_type in ROTARY_SPLITS for c in g.consumers.get(start, [])):
        return heads  # the rotary reads the transposed heads directly: no norm
    if end is None:
        _check(not any(n.op_type in ("ReduceMean", "SimplifiedLayerNormalization") for n in g.graph.node if id(n) in seen),
               f"{start}: a norm after the transpose into heads whose end this matcher cannot find")
        return heads
    # the norm's nodes: back from its end to the transpose
    nodes: dict[int, Any] = {}
    back = [end]
    while back:
        node = g.producer.get(back.pop())
        if node is None or id(node) in nodes or node is transposes[0]:
            continue
        _check(node.op_type in NORM_OPS, f"{end}: {node.op_type} inside a per-head norm")
        if node.op_type == "ReduceMean":
            _check(_reduces_last_axis(g, node), f"{node.name}: a norm that does not reduce each head's last axis")
        nodes[id(node)] = node
        back.extend(node.input)
    renamed = {start: heads}
    copies = []
    for count, node in enumerate(n for n in g.graph.node if id(n) in nodes):  # the graph's order is topological
        if node.op_type == "Constant":
            continue
        outputs = [f"{prefix}/{count}/{k}" for k in range(len(node.output))]  # unique, whatever the exporter named them
        renamed.update(zip(node.output, outputs, strict=True))
        copy = helper.make_node(node.op_type, [renamed.get(x, x) for x in node.input], outputs, name=f"{prefix}/{count}",
                                domain=node.domain or None)
        copy.attribute.extend(node.attribute)
        copies.append(copy)
    _check(end in renamed, f"{end}: the norm does not start at the transpose into heads")
    shared.extend(copies)
    return renamed[end]


def _reduces_last_axis(g: _Graph, node: Any) -> bool:
    """A ReduceMean over axis -1 (or 3, the same axis in both 4-D layouts), keeping dims."""
    from onnx import numpy_helper

    axes = next((list(a.ints) for a in node.attribute if a.name == "axes"), None)
    if axes is None and len(node.input) > 1:
        source = g.producer.get(node.input[1])
        if source is not None and source.op_type == "Constant":
            axes = [int(x) for x in numpy_helper.to_array(source.attribute[0].t).ravel()]
        else:
            init = next((t for t in g.graph.initializer if t.name == node.input[1]), None)
            axes = [int(x) for x in numpy_helper.to_array(init).ravel()] if init is not None else None
    keepdims = next((a.i for a in node.attribute if a.name == "keepdims"), 1)
    return axes in ([-1], [3]) and keepdims == 1


def _replace_nodes(graph: Any, nodes: list[Any]) -> None:
    """Keep the nodes the outputs need, in an order where each follows its inputs; drop unused weights."""
    producer = {out: n for n in nodes for out in n.output}
    live: dict[int, Any] = {}
    todo = [o.name for o in graph.output]
    while todo:
        node = producer.get(todo.pop())
        if node is not None and id(node) not in live:
            live[id(node)] = node
            todo.extend(node.input)
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    ordered, pending = [], [n for n in nodes if id(n) in live]
    while pending:
        waiting = []
        for node in pending:
            if all(name in ready for name in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                waiting.append(node)
        _check(len(waiting) < len(pending), "the rewritten graph has a cycle")
        pending = waiting
    used = {name for n in ordered for name in n.input}
    weights = [t for t in graph.initializer if t.name in used]
    del graph.node[:]
    graph.node.extend(ordered)
    del graph.initializer[:]
    graph.initializer.extend(weights)


# --- verification -----------------------------------------------------------------------------------


def _run_chunks(path: Path, tokens: list[int], chunks: tuple[int, ...]) -> Any:
    """Every position's logits, feeding `tokens` in `chunks` with the KV cache carried between them."""
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    past_inputs = sorted(n for n in names if n.startswith("past_key_values."))
    past_shape = next(i.shape for i in session.get_inputs() if i.name == past_inputs[0])
    empty = np.zeros((1, past_shape[1], 0, past_shape[3]), np.float32)
    past = {n: empty for n in past_inputs}
    rows, n_past, start = [], 0, 0
    for size in chunks:
        ids = tokens[start : start + size]
        feed = {"input_ids": np.asarray([ids], np.int64), "attention_mask": np.ones((1, n_past + size), np.int64), **past}
        if "position_ids" in names:
            feed["position_ids"] = np.arange(n_past, n_past + size, dtype=np.int64)[None, :]
        outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed), strict=True))
        past = {n: outputs[n.replace("past_key_values.", "present.")] for n in past_inputs}
        rows.append(outputs["logits"][0])
        n_past, start = n_past + size, start + size
    return np.concatenate(rows).astype(np.float64)


def verify(original: Path, fused: Path, tokens: list[int], chunks: tuple[int, ...] = VERIFY_CHUNKS, exact: bool = False) -> dict[str, Any]:
    """The fused graph's drift from the original, measured as `eval` and quantize measure
    drift (mean KL, top-1 agreement), plus the largest logit difference (held to float rounding
    when `exact`: a float graph)."""
    import numpy as np

    from edgecds.drift import drift_of_logits

    n = sum(chunks)
    a, b = _run_chunks(original, tokens, chunks), _run_chunks(fused, tokens, chunks)
    drift = drift_of_logits(a, b, tokens[1 : n + 1])
    result = {"positions": n, "top1_agreement": drift["top1_agreement"], "kl_mean": drift["kl_mean"],
              "max_abs_diff": round(float(np.abs(a - b).max()), 6)}
    result["passed"] = (result["top1_agreement"] >= VERIFY_LIMITS["top1_agreement_min"] and result["kl_mean"] <= VERIFY_LIMITS["kl_mean_max"]
                        and (not exact or result["max_abs_diff"] <= VERIFY_LIMITS["float_max_abs_diff"]))
    return result


def verification_tokens(folder: Path, chunks: tuple[int, ...] = VERIFY_CHUNKS) -> list[int]:
    """The opening of the clinical drift text in the variant's own tokenizer."""
    from tokenizers import Tokenizer

    from edgecds.cases import drift_text

    ids = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(drift_text(), add_special_tokens=False).ids
    n = sum(chunks) + 1  # the positions fed, and the token after the last
    _check(len(ids) >= n, "the verification text is too short for this tokenizer")
    return list(ids[:n])


def compile_folder(src: Path, dst: Path) -> FusionReport:
    """Fuse `src`'s graph into `dst/model.onnx` and verify it; CannotFuse when either step declines."""
    import onnx

    from edgecds.formats.onnx_model import MODEL_FILE, check_onnx_folder

    start = time.perf_counter()
    check_onnx_folder(src)  # external data locations, before onnx follows them
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    _check(isinstance(config, dict), "config.json is not an object")
    model = onnx.load(str(src / MODEL_FILE))
    before = len(model.graph.node)
    exact = not any(n.op_type in QUANTIZED_OPS for n in model.graph.node)
    try:
        layers, positions = fuse_attention(model, config)
    except (KeyError, TypeError, ValueError) as exc:
        raise CannotFuse(f"unexpected graph or config ({type(exc).__name__}: {exc})") from None
    large = model.ByteSize() > (1 << 31) - (64 << 20)  # protobuf's 2 GiB: weights go beside the graph
    onnx.save(model, str(dst / MODEL_FILE), save_as_external_data=large, location=f"{MODEL_FILE}.data" if large else None)
    after = len(model.graph.node)
    del model
    chunks = verify_chunks(config)
    check = verify(src / MODEL_FILE, dst / MODEL_FILE, verification_tokens(src, chunks), chunks, exact)
    if not check["passed"]:
        raise CannotFuse(f"the fused graph disagrees with the original (top-1 {check['top1_agreement']}, KL {check['kl_mean']}, "
                         f"max logit difference {check['max_abs_diff']})")
    return FusionReport(layers, before, after, positions, round(time.perf_counter() - start, 2), check)


def main(argv: list[str] | None = None) -> int:
    """Child entry point: one JSON line, {"fused": {...}} or {"declined": reason}; exit 0 either way."""
    args = sys.argv[1:] if argv is None else argv
    src, dst = Path(args[0]), Path(args[1])
    try:
        report = compile_folder(src, dst)
    except CannotFuse as exc:
        emit_json({"declined": str(exc)})
        return 0
    emit_json({"fused": asdict(report)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
