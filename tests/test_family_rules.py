"""Fast checks of the family support that need no engine: llama.cpp's type rules as ported, the
converter's MTP switch, and what a child's own error shows."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from edgecds.child import stderr_tail
from edgecds.formats.types import quant_type
from edgecds.quant.from_config import _Weight, tensor_types
from edgecds.quant.gguf_convert import converter_command


def _dense(n_layers: int, tied: bool) -> list[_Weight]:
    weights = [_Weight("model.embed_tokens.weight", (256, 1000), "token_embd", None)]
    for i in range(n_layers):
        for role, shape in (("attn_q", (256, 256)), ("attn_k", (256, 64)), ("attn_v", (256, 64)), ("attn_output", (256, 256)),
                            ("ffn_gate", (256, 512)), ("ffn_up", (256, 512)), ("ffn_down", (512, 256))):
            weights.append(_Weight(f"model.layers.{i}.{role}.weight", shape, role, i))
        weights.append(_Weight(f"model.layers.{i}.input_layernorm.weight", (256,), "other", i))
    if not tied:
        weights.append(_Weight("lm_head.weight", (256, 1000), "output", None))
    return weights


def test_q4_k_m_gives_more_bits_to_the_first_last_and_every_third_v_and_down() -> None:
    weights = _dense(16, tied=False)
    types = dict(zip([w.hf_name for w in weights], tensor_types(weights, quant_type("Q4_K_M"), 16, 0, 4), strict=True))
    # llama.cpp's use_more_bits(i, 16): i < 2, i >= 14, or (i - 2) % 3 == 2
    more = [i for i in range(16) if types[f"model.layers.{i}.attn_v.weight"] == "Q6_K"]
    assert more == [0, 1, 4, 7, 10, 13, 14, 15]
    assert [i for i in range(16) if types[f"model.layers.{i}.ffn_down.weight"] == "Q6_K"] == more
    assert types["model.layers.3.attn_q.weight"] == "Q4_K" and types["model.layers.3.input_layernorm.weight"] == "F32"
    assert types["lm_head.weight"] == "Q6_K" and types["model.embed_tokens.weight"] == "Q4_K"


def test_a_tied_embedding_is_quantized_as_the_output_and_odd_widths_fall_back() -> None:
    weights = _dense(2, tied=True)
    types = tensor_types(weights, quant_type("Q2_K"), 2, 0, 4)
    assert types[0] == "Q6_K"  # the table doubles as the output
    by_role = {w.category: t for w, t in zip(weights, types, strict=True) if w.layer == 0}
    assert by_role["attn_v"] == "Q4_K" and by_role["ffn_down"] == "Q3_K" and by_role["attn_output"] == "Q3_K"
    # rows of 320 are not whole 256-blocks: Q4_K falls back to Q5_0, a favoured layer's Q6_K to Q8_0
    odd = [_Weight("model.layers.0.self_attn.q_proj.weight", (320, 256), "attn_q", 0),
           _Weight("model.layers.0.mlp.down_proj.weight", (320, 256), "ffn_down", 0)]
    assert tensor_types(odd, quant_type("Q4_K_M"), 16, 0, 1) == ["Q5_0", "Q8_0"]


def _folder(tmp_path: Path, name: str, arch: str, tensors: list[str]) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": [arch]}))
    header = json.dumps({name: {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]} for i, name in enumerate(tensors)}).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4 * len(tensors))
    return folder


def test_qwen3_next_without_mtp_layers_converts_with_no_mtp(tmp_path: Path) -> None:
    f16 = quant_type("F16")
    fine_tuned = _folder(tmp_path, "fine-tuned", "Qwen3NextForCausalLM", ["model.layers.0.mlp.gate.weight"])
    published = _folder(tmp_path, "published", "Qwen3NextForCausalLM", ["model.layers.0.mlp.gate.weight", "mtp.fc.weight"])
    llama = _folder(tmp_path, "llama", "LlamaForCausalLM", ["model.layers.0.mlp.gate_proj.weight"])
    assert "--no-mtp" in converter_command(fine_tuned, tmp_path / "a.gguf", f16)
    assert "--no-mtp" not in converter_command(published, tmp_path / "b.gguf", f16)
    assert "--no-mtp" not in converter_command(llama, tmp_path / "c.gguf", f16)  # the converter refuses the flag there


def test_a_childs_own_error_is_shown_without_its_traceback() -> None:
    stderr = ('Traceback (most recent call last):\n  File "x.py", line 1, in <module>\n    raise EngineError(...)\n'
              "edgecds.errors.EngineError: m.gguf: llama.cpp could not load it\n")
    assert stderr_tail(stderr) == "m.gguf: llama.cpp could not load it"
    assert stderr_tail("a\nb\nc\nSegmentation fault", lines=2) == "c\nSegmentation fault"


def test_a_gemma3_whose_layer_pattern_llama_cpp_would_not_follow_is_refused(tmp_path: Path) -> None:
    from edgecds.errors import InvalidInputError
    from edgecds.quant.hf_folder import inspect_hf_folder

    folder = _folder(tmp_path, "gemma", "Gemma3ForCausalLM", ["model.layers.0.self_attn.q_proj.weight"])
    config = {"architectures": ["Gemma3ForCausalLM"], "sliding_window": 512, "layer_types": ["sliding_attention", "full_attention"]}
    (folder / "config.json").write_text(json.dumps(config))
    try:
        inspect_hf_folder(folder)
        raise AssertionError("a two-layer sliding/global Gemma 3 was accepted")
    except InvalidInputError as exc:
        assert "5 sliding-window layers to one global" in str(exc)
    config["layer_types"] = ["sliding_attention"] * 5 + ["full_attention"]  # Gemma 3 as published
    (folder / "config.json").write_text(json.dumps(config))
    assert inspect_hf_folder(folder).architecture == "Gemma3ForCausalLM"


def test_plan_from_a_config_takes_transformers_defaults_and_refuses_bad_configs_clearly(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from edgecds.cli import cli

    def plan(config: object, name: str = "config.json") -> tuple[int, str]:
        path = tmp_path / name
        path.write_text(config if isinstance(config, str) else json.dumps(config))
        out = CliRunner().invoke(cli, ["plan", "--model-config", str(path), "--types", "Q4_K_M", "--device", "laptop-x86-16gb", "--ctx", "2048", "--json"])
        return out.exit_code, out.output

    # only the class named: transformers' LlamaConfig defaults are Llama 2 7B's (32 x 4096, 32k vocabulary)
    code, out = plan({"architectures": ["LlamaForCausalLM"], "model_type": "llama"})
    assert code == 0, out
    entry = json.loads(out)["entries"][0]
    assert 3.5e9 < entry["file_bytes"] < 4.3e9  # Llama 2 7B Q4_K_M is 4.08 GB
    for bad, says in (({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 10**7}, "num_hidden_layers"),
                      ({"architectures": 5, "model_type": "bert"}, "no architecture"),
                      ("[" * 100_000, "not valid JSON"),
                      ({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_attention_heads": 0}, "num_attention_heads"),
                      ({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 0}, "vocab_size is 0")):  # was torch's AssertionError
        code, out = plan(bad)
        assert code != 0 and says in out and "Traceback" not in out, out


def test_qwen35_27b_is_estimated_from_its_published_config() -> None:
    """The question the config-only estimate answers: Qwen3.5-27B (no transformers class here) at Q4_K_M,
    before 54 GB are fetched. The fixture is the published config's text model fields."""
    from edgecds.quant.from_config import estimate_gguf

    config = Path(__file__).parent / "fixtures" / "qwen3.5-27b-config.json"
    info = estimate_gguf(config, quant_type("Q4_K_M"))
    assert info.architecture == "qwen35"
    assert 26.5e9 < info.n_parameters < 27.5e9  # the language model of "27B"
    assert 4.6 < info.bits_per_weight < 5.1  # Q4_K_M's mixture on a large model
    types = info.tensor_type_counts()
    assert types["Q6_K"] > 0 and types["Q4_K"] > types["Q6_K"]


def test_fused_attention_declines_a_layout_it_does_not_know_with_the_reason() -> None:
    """What the runtime logs when it runs a family's graph as exported (the matcher never reaches the graph)."""
    import pytest

    from edgecds.engine.onnx_fuse import NOT_FUSED, CannotFuse, fuse_attention

    for model_type, reason in NOT_FUSED.items():
        with pytest.raises(CannotFuse, match="model_type") as caught:
            fuse_attention(None, {"model_type": model_type})
        assert reason in str(caught.value)
    with pytest.raises(CannotFuse, match="soft-capping"):
        fuse_attention(None, {"model_type": "gemma3_text", "attn_logit_softcapping": 50.0})


def test_sliding_windows_per_layer_as_transformers_reads_the_config() -> None:
    from edgecds.engine.onnx_fuse import VERIFY_CHUNKS, layer_windows, verify_chunks

    gemma = {"sliding_window": 512, "layer_types": ["sliding_attention"] * 5 + ["full_attention"], "num_hidden_layers": 6}
    assert layer_windows(gemma, 6) == [512] * 5 + [0]
    assert verify_chunks(gemma) == (32, 16, 512) + (1,) * 24  # decoding crosses the window's edge
    assert layer_windows({"sliding_window": 4096, "use_sliding_window": False}, 2) == [0, 0]  # qwen2: off
    assert layer_windows({"sliding_window": 4096}, 2) == [4096, 4096]  # mistral: on for every layer
    assert verify_chunks({"num_hidden_layers": 2}) == VERIFY_CHUNKS
    # configs saved before layer_types: Gemma's pattern (every sixth layer global)
    assert layer_windows({"sliding_window": 512, "sliding_window_pattern": 6}, 12) == ([512] * 5 + [0]) * 2
    assert layer_windows({"sliding_window": -1}, 2) == [0, 0]  # no window, not a negative one


def test_a_window_config_the_matcher_cannot_read_is_declined() -> None:
    import pytest

    from edgecds.engine.onnx_fuse import CannotFuse, layer_windows

    with pytest.raises(CannotFuse, match="does not list 6 layers"):
        layer_windows({"sliding_window": 512, "layer_types": ["sliding_attention"] * 5}, 6)
    with pytest.raises(CannotFuse, match="neither layer_types nor sliding_window_pattern"):
        layer_windows({"model_type": "gemma3_text", "sliding_window": 512}, 6)  # not a window on every layer
