"""KV-cache sizes: hand-computed for known shapes, and equal to what llama.cpp allocates."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from edgecds.errors import UnknownNameError
from edgecds.hwbench.predict import ModelShape, kv_cache_bytes
from edgecds.quant.gguf_file import read_gguf

SMOLLM2 = ModelShape("llama", n_layers=30, n_embd=576, n_head=9, n_head_kv=3, head_dim_k=64, head_dim_v=64, context_train=8192, n_ff=1536, n_vocab=49152)
LLAMA3_8B = ModelShape("llama", n_layers=32, n_embd=4096, n_head=32, n_head_kv=8, head_dim_k=128, head_dim_v=128, context_train=8192)


def test_hand_computed_sizes() -> None:
    # SmolLM2: 3 KV heads of 64 = 192 values per row; K and V; 30 layers.
    # f16: 192 x 2 B = 384 B a row -> 30 x 2 x 384 = 23,040 B a cell.
    assert kv_cache_bytes(SMOLLM2, 1) == 23_040
    assert kv_cache_bytes(SMOLLM2, 2048) == 47_185_920  # 45.00 MiB
    # q8_0: 192 / 32 = 6 blocks x 34 B = 204 B a row -> 30 x 2 x 204 = 12,240 B a cell.
    assert kv_cache_bytes(SMOLLM2, 2048, "q8_0", "q8_0") == 25_067_520
    # Llama 3 8B, GQA 8 x 128, 32 layers, f16 at 8192: the well-known 1 GiB.
    assert kv_cache_bytes(LLAMA3_8B, 8192) == 1 << 30
    # mixed: K q8_0, V f16
    assert kv_cache_bytes(SMOLLM2, 512, "q8_0", "f16") == 30 * 512 * (204 + 384)


def test_unknown_cache_type_lists_known() -> None:
    with pytest.raises(UnknownNameError) as err:
        kv_cache_bytes(SMOLLM2, 512, "q3_k")
    assert "q8_0" in str(err.value)


def test_shape_from_the_real_gguf(source_gguf: Path) -> None:
    assert ModelShape.from_gguf(read_gguf(source_gguf)) == SMOLLM2


@pytest.mark.parametrize("cache, n_ctx", [("f16", 512), ("f16", 2048), ("q8_0", 2048)])
def test_equals_what_llama_cpp_allocates(f16_gguf: Path, cache: str, n_ctx: int) -> None:
    import llama_cpp

    from edgecds.quant.gguf_quantize import captured_llama_log

    ggml_type = getattr(llama_cpp, f"GGML_TYPE_{cache.upper()}")
    with captured_llama_log() as log:
        llm = llama_cpp.Llama(str(f16_gguf), n_ctx=n_ctx, type_k=ggml_type, type_v=ggml_type, flash_attn=True, verbose=True)
        llm.close()
    reported = next(float(m.group(1)) for line in log if (m := re.search(r"CPU KV buffer size = +([\d.]+) MiB", line)))
    predicted = kv_cache_bytes(ModelShape.from_gguf(read_gguf(f16_gguf)), n_ctx, cache, cache)
    assert round(predicted / 2**20, 2) == reported
