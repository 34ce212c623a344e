"""The quant-type table: every bit-width edgecds can produce, and every tensor type it can read.

This file is the one place a quant type is defined. The CLI's choices, size estimates,
validation, docs and `variants.json` all derive from these two tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from edgecds.errors import UnknownNameError


@dataclass(frozen=True)
class GgmlType:
    """A storage type of one tensor in a GGUF file (ggml's `ggml_type`)."""

    id: int
    name: str
    block_size: int  # weights per block
    type_size: int  # bytes per block

    @property
    def bits_per_weight(self) -> float:
        return self.type_size * 8 / self.block_size


# ggml's type ids, block sizes and block bytes (ggml.h / gguf-py constants GGML_QUANT_SIZES).
# A test checks this table against the converter's own copy of gguf-py.
GGML_TYPES: dict[int, GgmlType] = {
    t.id: t
    for t in (
        GgmlType(0, "F32", 1, 4),
        GgmlType(1, "F16", 1, 2),
        GgmlType(2, "Q4_0", 32, 18),
        GgmlType(3, "Q4_1", 32, 20),
        GgmlType(6, "Q5_0", 32, 22),
        GgmlType(7, "Q5_1", 32, 24),
        GgmlType(8, "Q8_0", 32, 34),
        GgmlType(9, "Q8_1", 32, 40),
        GgmlType(10, "Q2_K", 256, 84),
        GgmlType(11, "Q3_K", 256, 110),
        GgmlType(12, "Q4_K", 256, 144),
        GgmlType(13, "Q5_K", 256, 176),
        GgmlType(14, "Q6_K", 256, 210),
        GgmlType(15, "Q8_K", 256, 292),
        GgmlType(16, "IQ2_XXS", 256, 66),
        GgmlType(17, "IQ2_XS", 256, 74),
        GgmlType(18, "IQ3_XXS", 256, 98),
        GgmlType(19, "IQ1_S", 256, 50),
        GgmlType(20, "IQ4_NL", 32, 18),
        GgmlType(21, "IQ3_S", 256, 110),
        GgmlType(22, "IQ2_S", 256, 82),
        GgmlType(23, "IQ4_XS", 256, 136),
        GgmlType(24, "I8", 1, 1),
        GgmlType(25, "I16", 1, 2),
        GgmlType(26, "I32", 1, 4),
        GgmlType(27, "I64", 1, 8),
        GgmlType(28, "F64", 1, 8),
        GgmlType(29, "IQ1_M", 256, 56),
        GgmlType(30, "BF16", 1, 2),
        GgmlType(34, "TQ1_0", 256, 54),
        GgmlType(35, "TQ2_0", 256, 66),
        GgmlType(39, "MXFP4", 32, 17),
        GgmlType(40, "NVFP4", 64, 36),
        GgmlType(41, "Q1_0", 128, 18),
        GgmlType(42, "Q2_0", 64, 18),
    )
}
GGML_TYPE_BY_NAME: dict[str, GgmlType] = {t.name: t for t in GGML_TYPES.values()}

Format = Literal["gguf", "onnx"]
# gguf: llama.cpp's converter or quantizer. onnx: Optimum's exporter, onnxruntime's weight-only
# quantizer (MatMulNBits) or its float16 converter.
Producer = Literal["converter", "quantizer", "optimum", "ort-matmulnbits", "ort-float16"]
ONNX_BLOCK = 32  # default MatMulNBits block; each block stores one float32 scale
METADATA_ALLOWANCE = 16 << 20  # bytes of header and vocabulary on top of the tensors
FALLBACK_FACTOR = 1.4  # llama.cpp keeps tensors it cannot block-quantize wider (6.2 vs 4.5 bits seen)


@dataclass(frozen=True)
class QuantType:
    """A variant edgecds can build.

    `producer` says which llama.cpp tool writes it: the HF->GGUF converter (float types, its
    `--outtype`) or llama.cpp's quantizer (`llama_model_quantize`, file type `LLAMA_FTYPE_<ftype>`).
    `base` is the ggml tensor type most weights get; llama.cpp keeps some tensors wider (and falls
    back when a row width is not a multiple of the block), so the measured bits per weight of a
    file is recorded separately.
    """

    name: str
    format: Format
    producer: Producer
    base: str
    engine_name: str  # converter --outtype, or the suffix of llama.cpp's LLAMA_FTYPE_* constant
    default: bool
    summary: str
    bits: int = 0  # onnx integer types: bits per weight code
    # llama.cpp refuses these without an importance matrix (tensor_requires_imatrix in
    # llama-quant.cpp: "the result will be garbage"): `quantize --imatrix` builds them
    needs_imatrix: bool = False

    @property
    def nominal_bits_per_weight(self) -> float:
        if self.bits:  # the codes plus a float32 scale per default block
            return self.bits + 32 / ONNX_BLOCK
        return GGML_TYPE_BY_NAME[self.base].bits_per_weight

    @property
    def is_float(self) -> bool:
        return self.producer in ("converter", "optimum", "ort-float16")

    def estimated_bytes(self, n_parameters: int) -> int:
        """A variant's file size before it is built, for the disk check and progress bars:
        llama.cpp keeps tensors it cannot block-quantize wider, hence the GGUF allowance."""
        factor = 1.0 if self.is_float or self.format != "gguf" else FALLBACK_FACTOR
        return int(n_parameters * self.nominal_bits_per_weight / 8 * factor) + METADATA_ALLOWANCE


QUANT_TYPES: tuple[QuantType, ...] = (
    QuantType("F32", "gguf", "converter", "F32", "f32", False, "full precision, reference only"),
    QuantType("BF16", "gguf", "converter", "BF16", "bf16", False, "bfloat16 conversion"),
    QuantType("F16", "gguf", "converter", "F16", "f16", True, "float16 conversion, input of every quant"),
    QuantType("Q8_0", "gguf", "quantizer", "Q8_0", "MOSTLY_Q8_0", True, "8-bit, near lossless"),
    QuantType("Q6_K", "gguf", "quantizer", "Q6_K", "MOSTLY_Q6_K", True, "6-bit k-quant"),
    QuantType("Q5_K_M", "gguf", "quantizer", "Q5_K", "MOSTLY_Q5_K_M", True, "5-bit k-quant, medium"),
    QuantType("Q5_K_S", "gguf", "quantizer", "Q5_K", "MOSTLY_Q5_K_S", False, "5-bit k-quant, small"),
    QuantType("Q5_0", "gguf", "quantizer", "Q5_0", "MOSTLY_Q5_0", False, "5-bit legacy"),
    QuantType("Q4_K_M", "gguf", "quantizer", "Q4_K", "MOSTLY_Q4_K_M", True, "4-bit k-quant, medium"),
    QuantType("Q4_K_S", "gguf", "quantizer", "Q4_K", "MOSTLY_Q4_K_S", False, "4-bit k-quant, small"),
    QuantType("Q4_0", "gguf", "quantizer", "Q4_0", "MOSTLY_Q4_0", False, "4-bit legacy"),
    QuantType("Q4_1", "gguf", "quantizer", "Q4_1", "MOSTLY_Q4_1", False, "4-bit legacy with offset"),
    QuantType("IQ4_NL", "gguf", "quantizer", "IQ4_NL", "MOSTLY_IQ4_NL", True, "4-bit non-linear, 32-blocks"),
    QuantType("IQ4_XS", "gguf", "quantizer", "IQ4_XS", "MOSTLY_IQ4_XS", False, "4.25-bit non-linear"),
    QuantType("Q3_K_L", "gguf", "quantizer", "Q3_K", "MOSTLY_Q3_K_L", False, "3-bit k-quant, large"),
    QuantType("Q3_K_M", "gguf", "quantizer", "Q3_K", "MOSTLY_Q3_K_M", True, "3-bit k-quant, medium"),
    QuantType("Q3_K_S", "gguf", "quantizer", "Q3_K", "MOSTLY_Q3_K_S", False, "3-bit k-quant, small"),
    QuantType("Q2_K", "gguf", "quantizer", "Q2_K", "MOSTLY_Q2_K", True, "2-bit k-quant, large loss"),
    # i-quants: a lattice codebook per block, best with an importance matrix; below 3.1 bits llama.cpp requires one
    QuantType("IQ3_S", "gguf", "quantizer", "IQ3_S", "MOSTLY_IQ3_S", False, "3.44-bit i-quant"),
    QuantType("IQ3_XXS", "gguf", "quantizer", "IQ3_XXS", "MOSTLY_IQ3_XXS", False, "3.06-bit i-quant, needs --imatrix", needs_imatrix=True),
    QuantType("IQ2_M", "gguf", "quantizer", "IQ2_S", "MOSTLY_IQ2_M", False, "2.7-bit i-quant, needs --imatrix", needs_imatrix=True),
    QuantType("IQ2_XS", "gguf", "quantizer", "IQ2_XS", "MOSTLY_IQ2_XS", False, "2.31-bit i-quant, needs --imatrix", needs_imatrix=True),
    QuantType("IQ2_XXS", "gguf", "quantizer", "IQ2_XXS", "MOSTLY_IQ2_XXS", False, "2.06-bit i-quant, needs --imatrix", needs_imatrix=True),
    QuantType("IQ1_S", "gguf", "quantizer", "IQ1_S", "MOSTLY_IQ1_S", False, "1.56-bit i-quant, needs --imatrix", needs_imatrix=True),
    # ONNX: weight-only, because activation quantization measured far worse here (ENGINE-NOTES).
    QuantType("ONNX_FP32", "onnx", "optimum", "F32", "text-generation-with-past", True, "Optimum export, reference of the ONNX variants"),
    QuantType("ONNX_FP16", "onnx", "ort-float16", "F16", "float16", False, "fp16 weights and compute, for GPU execution providers"),
    QuantType("ONNX_INT8", "onnx", "ort-matmulnbits", "F32", "MatMulNBits", True, "8-bit weight-only blocks, near lossless", bits=8),
    QuantType("ONNX_INT4", "onnx", "ort-matmulnbits", "F32", "MatMulNBits", True, "4-bit weight-only blocks", bits=4),
)
QUANT_TYPE_BY_NAME: dict[str, QuantType] = {q.name: q for q in QUANT_TYPES}
DEFAULT_FORMAT = "gguf"
DEFAULT_TYPES: tuple[str, ...] = tuple(q.name for q in QUANT_TYPES if q.default and q.format == DEFAULT_FORMAT)
FORMATS: tuple[str, ...] = tuple(dict.fromkeys(q.format for q in QUANT_TYPES))

# `quantize --fit`: the tensor types a fitted GGUF mixes, fewest bits first. Each level lists the
# type to use and the one that stands in where a tensor's rows are not a multiple of the first's
# block (k-quants need rows of 256; SmolLM2's 576-wide rows take the 32-blocks). The last level is
# where every group starts. A fitted variant's type is FIT_PREFIX and its bits per weight.
FIT_LADDER: tuple[tuple[str, ...], ...] = (("Q2_K",), ("Q3_K",), ("Q4_K", "IQ4_NL"), ("Q5_K", "Q5_0"), ("Q6_K",), ("Q8_0",))
FIT_PREFIX = "FIT-"


def is_fitted(type_name: str) -> bool:
    return type_name.startswith(FIT_PREFIX)


def default_types(formats: tuple[str, ...]) -> tuple[QuantType, ...]:
    return tuple(q for q in QUANT_TYPES if q.default and q.format in formats)


def quant_type(name: str) -> QuantType:
    """Look a type up by name (case-insensitive); an unknown name lists the known ones."""
    found = QUANT_TYPE_BY_NAME.get(name.strip().upper())
    if found is None:
        raise UnknownNameError("quant type", name, list(QUANT_TYPE_BY_NAME))
    return found


def parse_type_list(text: str) -> tuple[QuantType, ...]:
    """Parse `--types Q8_0,Q4_K_M` into table rows, keeping order and dropping repeats."""
    names = [part for part in (p.strip() for p in text.split(",")) if part]
    if not names:
        raise UnknownNameError("quant type", text, list(QUANT_TYPE_BY_NAME))
    seen: dict[str, QuantType] = {}
    for name in names:
        q = quant_type(name)
        seen.setdefault(q.name, q)
    return tuple(seen.values())


def parse_type_names(text: str | None) -> tuple[str, ...]:
    """`--types` of commands that pick recorded variants (profile, eval): the table's names, in
    order; an empty tuple (all) when not given. A fitted variant's name (FIT-4.52) is taken as it
    is, for the variants file to find; other unknown names fail here, listing the known ones."""
    if text is None:
        return ()
    names = [p.strip().upper() for p in text.split(",") if p.strip()]
    if not names:
        raise UnknownNameError("quant type", text, list(QUANT_TYPE_BY_NAME))
    return tuple(dict.fromkeys(n if is_fitted(n) else quant_type(n).name for n in names))
