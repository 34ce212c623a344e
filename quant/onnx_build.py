"""Hugging Face folder -> ONNX variants: Optimum's exporter, then onnxruntime's own quantizers.

fp32 is Optimum's `text-generation-with-past` export (one graph with a KV cache), run as its own
process like llama.cpp's converter: torch stays out of edgecds and a crash cannot take it down.
Quantized variants are weight-only: onnxruntime's `MatMulNBitsQuantizer` (int8 or int4 blocks,
`MatMulNBits` ops). Measured on the default model (shared/ENGINE-NOTES.md): weight-only int8 kept
perplexity (9.01 vs 9.11), dynamic int8 raised it to 19-25 and per-channel dynamic int8 broke the
model, so activations are never quantized.

Optimum ties the LM head to the embedding through a Transpose, which the quantizer skips, leaving
the fp32 table (28M weights, most of a small model) in every variant. So the head is untied into
its own matrix, quantized like every other, and the embedding is rewritten to read that same
quantized table (Gather of the packed rows, then the dequantization MatMulNBits itself applies):
one table on disk, quantized once, as in the original tied model.

fp16 (for GPU device profiles) is onnxruntime's float16 converter with fp32 inputs and outputs.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgecds.child import run_offline_tool
from edgecds.errors import EngineError, InvalidInputError
from edgecds.formats.onnx_model import MODEL_FILE, SIDE_FILES
from edgecds.formats.types import QuantType
from edgecds.progress import Reporter

EXPORT_TASK = "text-generation-with-past"


@dataclass(frozen=True)
class OnnxOptions:
    """onnxruntime's weight-only quantizer settings edgecds exposes. Defaults from measurements on
    the default model (ENGINE-NOTES): block 32 symmetric kept int4 perplexity at 11.9 against 9.1
    for fp32; accuracy_level 4 (int8 activations inside MatMulNBits) about doubled int4 decode."""

    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int = 4
    quantize_embeddings: bool = True  # embedding and LM head too (one shared table)
    head_bits: int = 8  # the shared embedding/LM-head table: 8 bits even in int4 variants (as llama.cpp keeps output.weight wider)
    # how each block's codes are chosen (ONNX_ALGORITHMS); "rtn" is onnxruntime's default round-to-nearest
    algorithm: str = "rtn"
    # int4 variants: int8 for attention V and FFN down in the layers llama.cpp's Q4_K_M widens
    # (llama-quant.cpp's use_more_bits), as onnxruntime-genai's k_quant_mixed does
    mixed: bool = False

    def as_key(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"algorithm": self.algorithm} if self.algorithm != "rtn" else {}  # the keys of variants built before stay valid
        extra.update({"mixed": True} if self.mixed else {})
        return {"block_size": self.block_size, "symmetric": self.symmetric, "accuracy_level": self.accuracy_level,
                "quantize_embeddings": self.quantize_embeddings, "head_bits": self.head_bits, **extra}


# onnxruntime's weight-only algorithms, none needing calibration data: rtn (DefaultWeightOnlyQuantConfig,
# round-to-nearest per block), k_quant (KQuantWeightOnlyQuantConfig: each block's scale searched to
# minimise its weighted error, as llama.cpp's k-quants do), hqq (Half-Quadratic Quantization: scale
# and zero point optimised per block; always asymmetric)
ONNX_ALGORITHMS = ("rtn", "k_quant", "hqq")


def use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's rule for the layers whose attention V and FFN down Q4_K_M keeps at Q6_K."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def widened_nodes(model: Any) -> list[str]:
    """The MatMuls of attention V and FFN down in the layers use_more_bits names (Optimum's node names)."""
    import re

    found: dict[int, list[str]] = {}
    for node in model.graph.node:
        match = re.search(r"layers\.(\d+)/.*(v_proj|down_proj)/MatMul$", node.name) if node.op_type == "MatMul" else None
        if match:
            found.setdefault(int(match.group(1)), []).append(node.name)
    n_layers = max(found) + 1 if found else 0
    return [name for layer, names in sorted(found.items()) if use_more_bits(layer, n_layers) for name in names]


def tool_versions() -> dict[str, str]:
    """What builds ONNX variants; an error naming the extra when one is missing."""
    versions = {}
    for dist in ("optimum-onnx", "optimum", "onnx", "onnxruntime", "transformers"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            raise EngineError(f"{dist} is not installed; the ONNX path needs the build extra: pip install 'edgecds[build]'") from None
    return versions


def export_command(model_dir: Path, out_dir: Path) -> list[str]:
    """Exactly what a user would type (`optimum-cli export onnx ...`); the benchmark runs it too."""
    return [sys.executable, "-m", "optimum.commands.optimum_cli", "export", "onnx", "--model", str(model_dir), "--task", EXPORT_TASK,
            "--framework", "pt", str(out_dir)]


def export_fp32(model_dir: Path, out_dir: Path, expected_bytes: int, reporter: Reporter | None = None) -> float:
    """Run Optimum's exporter into `out_dir` (a temporary folder the caller publishes); seconds taken."""
    tool_versions()
    code, tail, seconds = run_offline_tool(export_command(model_dir, out_dir), out_dir / MODEL_FILE, expected_bytes, reporter)
    if code != 0:
        raise EngineError(f"Optimum's ONNX export of {model_dir.name} failed (exit {code}); nothing was published. Its last words:\n{tail}")
    if not (out_dir / MODEL_FILE).is_file():
        raise EngineError(f"Optimum's export of {model_dir.name} wrote no {MODEL_FILE}")
    return seconds


def copy_side_files(src: Path, dst: Path) -> None:
    """The tokenizer and configs the runtime needs, next to the graph."""
    for name in SIDE_FILES:
        if (src / name).is_file():
            (dst / name).write_bytes((src / name).read_bytes())


# --- quantization ---------------------------------------------------------------------------------


def _initializers(graph: Any) -> dict[str, Any]:
    return {t.name: t for t in graph.initializer}


def _untie_lm_head(model: Any) -> tuple[str, str] | None:
    """Replace Transpose(embedding) feeding the LM head with a matrix of its own; the embedding's
    name and the head's node name, or None when the head is not tied this way."""
    import numpy as np
    from onnx import numpy_helper

    graph = model.graph
    inits = _initializers(graph)
    gathers = [n for n in graph.node if n.op_type == "Gather" and n.input[0] in inits and len(inits[n.input[0]].dims) == 2]
    for gather in gathers:
        name = gather.input[0]
        transposes = [n for n in graph.node if n.op_type == "Transpose" and n.input[0] == name]
        if len(transposes) == 1:
            head = [n for n in graph.node if n.op_type == "MatMul" and n.input[1] == transposes[0].output[0]]
            if len(head) != 1:
                continue
            table = numpy_helper.to_array(inits[name])
            graph.node.remove(transposes[0])
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(table.T), transposes[0].output[0]))
            return str(name), str(head[0].name)
    return None


def _embedding_from_head(model: Any, embedding: str, bits: int) -> bool:
    """Point the embedding's Gather at the LM head's packed table: Gather the packed rows and the
    block scales, unpack, subtract the zero point and scale, exactly as MatMulNBits dequantizes.
    False when the head was not quantized or its layout does not allow it."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    gather = next((n for n in graph.node if n.op_type == "Gather" and n.input[0] == embedding), None)
    head = next((n for n in graph.node if n.op_type == "MatMulNBits" and n.input[1].startswith(f"{embedding}_transposed")), None)
    if gather is None or head is None or len(head.input) > 3 and head.input[3]:
        return False  # asymmetric heads carry zero points; their embedding stays a separate table
    attrs = {a.name: a.i for a in head.attribute}
    k, block = attrs["K"], attrs["block_size"]
    ids, out = gather.input[1], gather.output[0]
    p = "/edgecds/embed"
    nodes = [helper.make_node("Gather", [head.input[1], ids], [f"{p}/packed"], name=f"{p}/gather_packed", axis=0)]
    if bits == 4:  # two weights per byte, the low nibble first
        nodes += [
            helper.make_node("BitwiseAnd", [f"{p}/packed", f"{p}/low_mask"], [f"{p}/low"], name=f"{p}/low"),
            helper.make_node("BitShift", [f"{p}/packed", f"{p}/four"], [f"{p}/high"], name=f"{p}/high", direction="RIGHT"),
            helper.make_node("Unsqueeze", [f"{p}/low", f"{p}/last"], [f"{p}/low_u"], name=f"{p}/low_u"),
            helper.make_node("Unsqueeze", [f"{p}/high", f"{p}/last"], [f"{p}/high_u"], name=f"{p}/high_u"),
            helper.make_node("Concat", [f"{p}/low_u", f"{p}/high_u"], [f"{p}/pairs"], name=f"{p}/pairs", axis=-1),
            helper.make_node("Reshape", [f"{p}/pairs", f"{p}/block_shape"], [f"{p}/codes"], name=f"{p}/codes"),
        ]
        graph.initializer.extend([numpy_helper.from_array(np.array(15, np.uint8), f"{p}/low_mask"),
                                  numpy_helper.from_array(np.array(4, np.uint8), f"{p}/four"),
                                  numpy_helper.from_array(np.array([0, 0, -(-k // block), block], np.int64), f"{p}/block_shape")])
    else:
        nodes.append(helper.make_node("Identity", [f"{p}/packed"], [f"{p}/codes"], name=f"{p}/codes"))
    nodes += [
        helper.make_node("Cast", [f"{p}/codes"], [f"{p}/codes_f"], name=f"{p}/cast", to=1),
        helper.make_node("Sub", [f"{p}/codes_f", f"{p}/zero_point"], [f"{p}/centred"], name=f"{p}/centre"),
        helper.make_node("Reshape", [head.input[2], f"{p}/scale_shape"], [f"{p}/scales3"], name=f"{p}/scales3"),
        helper.make_node("Gather", [f"{p}/scales3", ids], [f"{p}/scales"], name=f"{p}/gather_scales", axis=0),
        helper.make_node("Unsqueeze", [f"{p}/scales", f"{p}/last"], [f"{p}/scales_u"], name=f"{p}/scales_u"),
        helper.make_node("Mul", [f"{p}/centred", f"{p}/scales_u"], [f"{p}/blocks"], name=f"{p}/scale"),
        helper.make_node("Reshape", [f"{p}/blocks", f"{p}/row_shape"], [f"{p}/rows"], name=f"{p}/rows"),
        helper.make_node("Slice", [f"{p}/rows", f"{p}/zero", f"{p}/k", f"{p}/last"], [out], name=f"{p}/trim"),  # drop K's padding
    ]
    n_blocks = -(-k // block)
    graph.initializer.extend([
        numpy_helper.from_array(np.array([-1], np.int64), f"{p}/last"),
        numpy_helper.from_array(np.array(2 ** (bits - 1), np.float32), f"{p}/zero_point"),
        numpy_helper.from_array(np.array([-1, n_blocks], np.int64), f"{p}/scale_shape"),
        numpy_helper.from_array(np.array([0, 0, n_blocks * block], np.int64), f"{p}/row_shape"),
        numpy_helper.from_array(np.array([0], np.int64), f"{p}/zero"),
        numpy_helper.from_array(np.array([k], np.int64), f"{p}/k"),
    ])
    position = list(graph.node).index(gather)
    graph.node.remove(gather)
    for offset, node in enumerate(nodes):
        graph.node.insert(position + offset, node)
    graph.initializer.remove(_initializers(graph)[embedding])
    return True


def quantize_weights(src: Path, dst: Path, qtype: QuantType, options: OnnxOptions) -> tuple[float, list[str]]:
    """Write the weight-only quantized graph of `src`'s fp32 model into `dst`; seconds and notes."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    if qtype.bits not in (4, 8):
        raise InvalidInputError(f"{qtype.name}: onnxruntime's weight-only quantizer writes 4 or 8 bits, not {qtype.bits}")
    start = time.perf_counter()
    notes: list[str] = []
    model = onnx.load(str(src / MODEL_FILE))
    tied = _untie_lm_head(model) if options.quantize_embeddings else None
    if options.quantize_embeddings and tied is None:
        notes.append("no tied LM head found: the embedding stays float32")
    _quiet_quantizer_log()

    def run(model: Any, bits: int, **nodes: Any) -> Any:
        quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=options.block_size, is_symmetric=options.symmetric,
                                         accuracy_level=options.accuracy_level or None, algo_config=_algo_config(options, bits), **nodes)
        with contextlib.redirect_stdout(io.StringIO()):  # k_quant prints a progress bar on stdout, where --json writes
            quantizer.process()
        return quantizer.model.model

    head_bits = min(max(options.head_bits, qtype.bits), 8)
    wider = {tied[1]: head_bits} if tied is not None and head_bits != qtype.bits else {}
    if options.mixed and qtype.bits < 8:
        wider.update({name: 8 for name in widened_nodes(model)})
        notes.append(f"{sum(1 for b in wider.values() if b == 8)} MatMuls at 8 bits (attention V, FFN down in the layers llama.cpp widens)")
    for bits in sorted(set(wider.values())):  # nodes_to_include only adds: each width excludes every other node
        model = run(model, bits, nodes_to_exclude=[n.name for n in model.graph.node if n.op_type == "MatMul" and wider.get(n.name) != bits])
    model = run(model, qtype.bits, nodes_to_exclude=list(wider))
    if tied is not None and not _embedding_from_head(model, tied[0], head_bits):
        notes.append("the LM head's quantized table cannot serve the embedding (asymmetric blocks): the embedding stays float32")
    onnx.save(model, str(dst / MODEL_FILE))
    return time.perf_counter() - start, notes


def _algo_config(options: OnnxOptions, bits: int) -> Any:
    """onnxruntime's configuration object for options.algorithm (None: its default, round-to-nearest).
    The 8-bit passes (the head, the widened layers) stay round-to-nearest, near lossless at 8 bits:
    onnxruntime's k_quant path writes 4 bits whatever it is asked."""
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    if options.algorithm == "rtn" or bits != 4:
        return None
    if options.algorithm == "k_quant":
        return mnq.KQuantWeightOnlyQuantConfig()
    if options.algorithm == "hqq":
        return mnq.HQQWeightOnlyQuantConfig(block_size=options.block_size, bits=bits)
    raise InvalidInputError(f"unknown ONNX algorithm {options.algorithm!r}: choose from {', '.join(ONNX_ALGORITHMS)}")


def _quiet_quantizer_log() -> None:
    import logging

    # The quantizer logs a line per node at INFO (hundreds); edgecds shows a progress bar instead.
    for name in ("onnxruntime.quantization.matmul_nbits_quantizer", "neural_compressor"):  # the latter: k_quant's
        logging.getLogger(name).setLevel(logging.WARNING)


def convert_fp16(src: Path, dst: Path) -> tuple[float, list[str]]:
    """fp16 weights and compute for GPUs, with float32 inputs and outputs kept for the runtime."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    start = time.perf_counter()
    model = convert_float_to_float16(onnx.load(str(src / MODEL_FILE)), keep_io_types=True)
    onnx.save(model, str(dst / MODEL_FILE))
    return time.perf_counter() - start, ["fp16 is for GPU execution providers; on a CPU onnxruntime runs it slower than fp32"]
