"""KV-cache sizes: hand-computed for known shapes, and equal to what llama.cpp allocates."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from edgecds.errors import UnknownNameError
from edgecds.formats.gguf_file import read_gguf
from edgecds.hwbench.predict import ModelShape, kv_cache_bytes

SMOLLM2 = ModelShape("llama", n_layers=30, n_embd=576, n_head=9, n_head_kv=3, head_dim_k=64, head_dim_v=64, context_train=8192, n_ff=1536, n_vocab=49152,
                     n_tensors=272, n_merges=48900)
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

    from edgecds.engine.llama_log import captured_llama_log

    ggml_type = getattr(llama_cpp, f"GGML_TYPE_{cache.upper()}")
    with captured_llama_log() as log:
        llm = llama_cpp.Llama(str(f16_gguf), n_ctx=n_ctx, type_k=ggml_type, type_v=ggml_type, flash_attn=True, verbose=True)
        llm.close()
    reported = next(float(m.group(1)) for line in log if (m := re.search(r"CPU KV buffer size = +([\d.]+) MiB", line)))
    predicted = kv_cache_bytes(ModelShape.from_gguf(read_gguf(f16_gguf)), n_ctx, cache, cache)
    assert round(predicted / 2**20, 2) == reported


# --- the rest of the predictor: parts against hand computation and llama.cpp's own allocations ---

from dataclasses import replace  # noqa: E402

from edgecds.devices import find_profile  # noqa: E402
from edgecds.engine import RunSettings  # noqa: E402
from edgecds.hwbench.predict import (  # noqa: E402
    GIB,
    compute_reserved_bytes,
    layer_bytes,
    load_calibrations,
    predict,
    repacked_bytes,
)

# One SmolLM2 layer in F16: q and o 576x576, k and v 576x192, gate/up/down 576x1536 (2 B each),
# plus two F32 norms of 576.
F16_LAYER = (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536) * 2 + 2 * 576 * 4


def _llama_log(path: Path, **kwargs: object) -> list[str]:
    import llama_cpp

    from edgecds.engine.llama_log import captured_llama_log

    with captured_llama_log() as log:
        llm = llama_cpp.Llama(str(path), verbose=True, **kwargs)  # type: ignore[arg-type]
        llm.close()
    return list(log)


def _logged_mib(log: list[str], pattern: str) -> float:
    return next(float(m.group(1)) for line in log if (m := re.search(pattern, line)))


def test_layer_bytes_hand_computed(f16_gguf: Path) -> None:
    per_layer = layer_bytes(read_gguf(f16_gguf))
    assert F16_LAYER == 7_082_496
    assert len(per_layer) == 30 and set(per_layer.values()) == {F16_LAYER}


@pytest.mark.parametrize("n_ctx", [512, 2048, 8192])
def test_compute_buffer_matches_llama_cpp_reservation(f16_gguf: Path, n_ctx: int) -> None:
    log = _llama_log(f16_gguf, n_ctx=n_ctx, flash_attn=False)
    reported = _logged_mib(log, r"CPU compute buffer size = +([\d.]+) MiB")
    predicted = compute_reserved_bytes(ModelShape.from_gguf(read_gguf(f16_gguf)), RunSettings(n_ctx=n_ctx)) / 2**20
    assert predicted == pytest.approx(reported, rel=0.02)


LOGITS = 49152 * 4  # one row of float32 logits over SmolLM2's vocabulary


def _runtime(backend: str) -> int:
    """The runtime's bytes from the shipped constants: the interpreter and engine, the vocabulary
    tables (per token entry, and 1.22 entries a BPE merge), and the fixed per-context part."""
    c = load_calibrations()[backend]
    return c.runtime_base_bytes + round(c.vocab_bytes_per_token * (49152 + 1.22 * 48900)) + c.context_fixed_bytes


def _variant(default_variants: object, qtype: str) -> Path:
    result = default_variants
    return Path(result.output_dir) / next(o.record.path for o in result.outcomes if o.record.type == qtype)  # type: ignore[attr-defined]


@pytest.mark.parametrize("qtype", ["IQ4_NL", "Q4_K_M", "Q8_0"])
def test_repacked_bytes_match_llama_cpp_repack_buffer(default_variants: object, qtype: str) -> None:
    from edgecds.host import detect_host

    isa = detect_host().cpu_isa
    if isa is None:
        pytest.skip("this CPU's instruction set was not detected")
    path = _variant(default_variants, qtype)
    predicted = repacked_bytes(read_gguf(path), isa)
    log = _llama_log(path, n_ctx=256)
    logged = [float(m.group(1)) for line in log if (m := re.search(r"CPU_REPACK model buffer size = +([\d.]+) MiB", line))]
    assert round(predicted / 2**20, 2) == (logged[0] if logged else 0.0)
    if qtype == "IQ4_NL" and isa.startswith("x86"):
        assert predicted > 50 * 2**20  # nearly every tensor repacked: the term is not trivially zero


def test_discrete_gpu_too_small_offloads_some_layers_hand_computed(f16_gguf: Path) -> None:
    info = read_gguf(f16_gguf)
    # An RTX 3060 with 0.2 GiB left for the model: the compute buffer goes first, then whole layers.
    device = replace(find_profile("rtx-3060-12gb"), total_gib=0.5, reserve_gib=0.3)
    settings = RunSettings(n_ctx=512, n_gpu_layers=-1)
    p = predict(info, settings, device)
    compute = compute_reserved_bytes(ModelShape.from_gguf(info), settings)
    kv_layer = 512 * 384 * 2  # K and V rows of 3 x 64 f16 values a cell
    budget = int(0.2 * GIB)
    layers = (budget - compute) // (F16_LAYER + kv_layer)
    assert layers == 14  # (214,748,364 - 103,022,592) // 7,475,712
    assert p.memory.gpu_layers == layers and p.memory.total_layers == 31
    assert p.memory.gpu_bytes == compute + layers * (F16_LAYER + kv_layer)
    assert p.memory.host_bytes == (info.file_size - layers * F16_LAYER) + (30 - layers) * kv_layer + LOGITS + _runtime("cuda")
    assert p.fits  # 16 GB of host RAM holds the rest

    whole = predict(info, settings, find_profile("rtx-3060-12gb"))
    assert whole.memory.gpu_layers == 31 and whole.fits

    starved = predict(info, settings, replace(device, host_ram_gib=0.5))
    assert not starved.fits and "host RAM" in starved.why_not

    tiny = predict(info, settings, replace(device, total_gib=0.5, reserve_gib=0.45))
    assert tiny.memory.gpu_layers == 0 and not tiny.fits and "not even one layer" in tiny.why_not


def test_over_budget_and_over_context_say_why(f16_gguf: Path) -> None:
    info = read_gguf(f16_gguf)
    laptop = find_profile("laptop-x86-8gb")
    small = replace(laptop, total_gib=0.5, reserve_gib=0.3)
    p = predict(info, RunSettings(n_ctx=512), small)
    assert not p.fits and "over the 0.2 GiB budget by" in p.why_not and p.headroom_bytes < 0
    long = predict(info, RunSettings(n_ctx=16384), laptop)
    assert "over what the model was trained for (8192)" in long.why_not


def test_unified_memory_holds_everything_in_one_pool(f16_gguf: Path) -> None:
    info = read_gguf(f16_gguf)
    p = predict(info, RunSettings(n_ctx=2048, n_gpu_layers=-1), find_profile("jetson-orin-nano-8gb"))
    m = p.memory
    assert m.backend == "cuda" and m.gpu_layers == 31 and m.repacked == 0
    compute = compute_reserved_bytes(ModelShape.from_gguf(info), RunSettings(n_ctx=2048))  # held against llama.cpp's log above
    assert m.peak_bytes == info.tensor_bytes + 47_185_920 + compute + LOGITS + _runtime("cuda")  # KV: 45 MiB, hand-computed above
    assert not p.speed.calibrated  # CUDA efficiencies are stated assumptions, not measurements


def test_prediction_within_five_percent_of_a_fresh_process(default_variants: object) -> None:
    """The benchmark's claim, on one variant at one context: predicted peak vs the child's VmHWM.
    The constants are calibrated on this machine in this run (shipped calibration.json was measured
    on another host), on another variant and other contexts than the one judged."""
    from edgecds.hwbench.bench.bench_predict import host_device
    from edgecds.hwbench.bench.calibrate import calibrate
    from edgecds.hwbench.measure import ONE_PASS, measure_in_subprocess
    from edgecds.hwbench.predict import Calibration

    here = {"cpu": Calibration(backend="cpu", **calibrate(_variant(default_variants, "Q8_0")))}
    path = _variant(default_variants, "Q4_K_M")
    settings = RunSettings(n_ctx=512, decode_tokens=16)
    predicted = predict(read_gguf(path), settings, host_device(), here)
    measured = measure_in_subprocess(path, settings, ONE_PASS)
    assert measured.prompt_tokens == 512 - 16 and measured.decode_tokens == 16
    assert measured.peak_rss_bytes >= measured.stages["load"]["VmHWM"] > 0
    assert predicted.memory.peak_bytes == pytest.approx(measured.peak_rss_bytes, rel=0.05)


def test_a_crashing_child_is_an_engine_error(tmp_path: Path) -> None:
    from edgecds.errors import EngineError
    from edgecds.hwbench.measure import measure_in_subprocess

    bad = tmp_path / "not-a-model.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(EngineError) as err:
        measure_in_subprocess(bad, RunSettings(n_ctx=256))
    assert "not-a-model.gguf" in str(err.value)
