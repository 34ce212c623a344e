"""Predicting memory from files, before anything is loaded (the start of the predictor).

Now: the model's attention shape from GGUF metadata, and the KV cache that shape needs for a
context length and cache type, computed as llama.cpp lays it out (one K and one V row of
n_head_kv x head_dim elements per layer and cell, sized by ggml's row size for the cache type).
"""

from __future__ import annotations

from dataclasses import dataclass

from edgecds.errors import InvalidInputError, UnknownNameError
from edgecds.quant.gguf_file import GgufInfo
from edgecds.quant.types import GGML_TYPE_BY_NAME, GgmlType

KV_CACHE_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "IQ4_NL")  # llama.cpp --cache-type-k/v


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

    @classmethod
    def from_gguf(cls, info: GgufInfo) -> ModelShape:
        arch = info.architecture
        meta = info.metadata

        def number(key: str, default: int | None = None) -> int:
            value = meta.get(f"{arch}.{key}", default)
            if not isinstance(value, int) or value <= 0:
                raise InvalidInputError(f"{info.path}: metadata {arch}.{key} is {value!r}, expected a positive integer")
            return value

        n_embd, n_head = number("embedding_length"), number("attention.head_count")
        head_dim = n_embd // n_head
        return cls(
            architecture=str(arch),
            n_layers=number("block_count"),
            n_embd=n_embd,
            n_head=n_head,
            n_head_kv=number("attention.head_count_kv", n_head),
            head_dim_k=number("attention.key_length", head_dim),
            head_dim_v=number("attention.value_length", head_dim),
            context_train=number("context_length"),
        )


def cache_type(name: str) -> GgmlType:
    if name.upper() not in KV_CACHE_TYPES:
        raise UnknownNameError("KV-cache type", name, [t.lower() for t in KV_CACHE_TYPES])
    return GGML_TYPE_BY_NAME[name.upper()]


def row_bytes(kind: GgmlType, n_elements: int) -> int:
    """ggml_row_size: whole blocks of the type."""
    if n_elements % kind.block_size:
        raise InvalidInputError(f"a row of {n_elements} elements cannot be stored as {kind.name} (blocks of {kind.block_size})")
    return n_elements // kind.block_size * kind.type_size


def kv_cache_bytes(shape: ModelShape, n_ctx: int, type_k: str = "f16", type_v: str = "f16") -> int:
    """Bytes of llama.cpp's KV cache for one sequence of `n_ctx` cells."""
    k_row = row_bytes(cache_type(type_k), shape.n_head_kv * shape.head_dim_k)
    v_row = row_bytes(cache_type(type_v), shape.n_head_kv * shape.head_dim_v)
    return shape.n_layers * n_ctx * (k_row + v_row)
