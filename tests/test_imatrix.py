"""The clinical importance matrix on the real engine and the default model: computed with
llama-imatrix's accumulation through llama.cpp's eval callback, written in llama.cpp's format,
handed to llama.cpp's quantizer, recorded in the variant and in the GGUF as llama-quantize does."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgecds.cli import cli
from edgecds.errors import EngineError
from edgecds.formats.gguf_file import read_gguf
from edgecds.quant import imatrix
from edgecds.quant.calibration import CALIBRATION_TEXT, calibration_text
from edgecds.quant.quantize import QuantizeResult

ROOT = Path(__file__).resolve().parents[1]
CLINICAL = ROOT / "toolkit" / "clinical"


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    # an error the user can act on ends as click's SystemExit with a message; anything else is a bug
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


def _grams(text: str, n: int = 8) -> set[tuple[str, ...]]:
    words = re.sub(r"[^a-z0-9 ]+", " ", text.lower()).split()
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def test_the_calibration_text_shares_no_passage_with_the_drift_text_or_any_case() -> None:
    text = calibration_text()
    assert "CC0" in text.splitlines()[0] and len(text.split()) > 3000
    ours = _grams(text)
    for other in ("drift-text.txt", "cases-v1.jsonl", "open-v1.jsonl"):
        assert not ours & _grams((CLINICAL / other).read_text(encoding="utf-8")), other


def test_i_quants_below_three_bits_are_refused_without_a_matrix(tmp_path: Path) -> None:
    code, out = invoke("quantize", str(tmp_path), "--types", "Q4_K_M,IQ2_XS", "-o", str(tmp_path / "out"))
    assert code == 2 and "IQ2_XS need an importance matrix" in out and "--imatrix clinical" in out
    assert not (tmp_path / "out").exists()  # refused before anything was read or written
    code, out = invoke("quantize", str(tmp_path), "--types", "F16", "--imatrix", "clinical", "-o", str(tmp_path / "out"))
    assert code == 2 and "none is to be built" in out  # a matrix nothing would use is not silently ignored
    code, out = invoke("quantize", str(tmp_path), "--format", "onnx", "--imatrix", "clinical", "-o", str(tmp_path / "out"))
    assert code == 2 and "none is to be built" in out  # the default types of the formats asked for count too
    assert not (tmp_path / "out").exists()


def test_a_mixture_of_experts_model_is_refused_before_calibrating(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    folder = tmp_path / "moe"  # a Hugging Face folder: refused before its conversion
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
                                                    "num_experts": 8, "num_experts_per_tok": 2}))
    save_file({"model.embed_tokens.weight": np.zeros((4, 4), np.float32)}, str(folder / "model.safetensors"))
    code, out = invoke("quantize", str(folder), "--types", "Q4_K_M", "--imatrix", "clinical", "-o", str(tmp_path / "out"))
    assert code == 2 and "routes tokens to 8 experts" in out, out
    assert not (tmp_path / "out").exists()
    brought = tmp_path / "from-llama-imatrix.gguf"  # a matrix computed elsewhere is used as it is: not refused for the experts
    brought.write_bytes(b"GGUF" + bytes(60))
    code, out = invoke("quantize", str(folder), "--types", "Q4_K_M", "--imatrix", str(brought), "-o", str(tmp_path / "out"))
    assert code != 0 and "routes tokens to" not in out and "llama.cpp's converter failed" in out, out  # the folder itself does not convert

    import gguf  # build side: llama.cpp's gguf-py

    path = tmp_path / "moe.gguf"
    writer = gguf.GGUFWriter(str(path), "qwen3moe")
    writer.add_expert_count(8)
    writer.add_tensor("blk.0.ffn_gate_exps.weight", np.zeros((8, 4, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(EngineError, match="routes tokens to 8 experts.*without --imatrix"):
        imatrix.compute(path, calibration_text(), CALIBRATION_TEXT, "x", tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


@pytest.fixture
def f16(default_variants: QuantizeResult, tmp_path: Path) -> Path:
    source = next(Path(default_variants.output_dir).glob("*-F16.gguf"))
    return Path(shutil.copy(source, tmp_path / "model-F16.gguf"))


def test_the_matrix_is_computed_over_every_block_weight_and_read_back(f16: Path, tmp_path: Path) -> None:
    made = imatrix.compute(f16, calibration_text(), CALIBRATION_TEXT, "x", tmp_path / "m.gguf", chunk_size=128, max_chunks=2)
    assert made.chunks == 2 and made.tokens == 256
    matrix = imatrix.read(tmp_path / "m.gguf")
    layers = read_gguf(f16).metadata.get("llama.block_count")
    assert len(matrix.values) == 7 * int(layers)  # q, k, v, output, gate, up, down of every block
    assert matrix.datasets == [CALIBRATION_TEXT] and matrix.chunks == 2 and matrix.chunk_size == 128
    q = matrix.values["blk.0.attn_q.weight"]
    assert q.shape == (576,) and np.all(q > 0) and np.all(np.isfinite(q))
    # the same text over more chunks gives other averages: the values come from the activations
    imatrix.compute(f16, calibration_text(), CALIBRATION_TEXT, "x", tmp_path / "m3.gguf", chunk_size=128, max_chunks=3)
    assert not np.allclose(imatrix.read(tmp_path / "m3.gguf").values["blk.0.attn_q.weight"], q)


# llama.cpp's own llama-imatrix, built from the sources vendored in llama-cpp-python 0.3.36's sdist
# (cmake -DLLAMA_BUILD_TOOLS=ON --target llama-imatrix), run on the default model's F16 as:
#   llama-imatrix -m SmolLM2-135M-Instruct-F16.gguf -f toolkit/clinical/calibration-text.txt -c 128 -b 128 -ub 128 --chunks 2 --no-ppl
# Its values (sum / count) for the first and last block's seven weights are kept here.
TOOL_VALUES = ROOT / "tests" / "fixtures" / "imatrix-llama-imatrix-smollm2.npz"


def test_the_matrix_equals_llama_imatrix_s_own_on_the_same_model_text_and_chunks(f16: Path, tmp_path: Path) -> None:
    imatrix.compute(f16, calibration_text(), CALIBRATION_TEXT, "x", tmp_path / "ours.gguf", chunk_size=128, max_chunks=2)
    ours = imatrix.read(tmp_path / "ours.gguf").values
    tool = np.load(TOOL_VALUES)
    assert len(tool.files) == 14
    for name in tool.files:  # float sums in another order: equal to a few parts per million
        np.testing.assert_allclose(ours[name], tool[name], rtol=1e-4, atol=0, err_msg=name)


def _tensor(path: Path, name: str) -> bytes:
    import gguf

    return bytes(next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == name).data.tobytes())


def test_quantize_with_the_clinical_matrix_records_it_and_changes_the_weights(f16: Path, tmp_path: Path) -> None:
    plain, imat = tmp_path / "plain", tmp_path / "imat"
    assert invoke("quantize", str(f16), "--types", "Q3_K_M", "-o", str(plain), "-q")[0] == 0
    code, out = invoke("quantize", str(f16), "--types", "Q3_K_M,IQ2_XS", "--imatrix", "clinical", "--imatrix-chunks", "2",
                       "-o", str(imat), "--json", "-q")
    assert code == 0, out
    variants = {v["type"]: v for v in json.loads(out)["variants"]}
    provenance = variants["Q3_K_M"]["options"]["imatrix"]
    assert provenance["dataset"] == CALIBRATION_TEXT and provenance["chunks"] == 2 and provenance["tokens"] == 1024
    assert provenance["text_sha256"] == __import__("hashlib").sha256(calibration_text().encode()).hexdigest()
    assert variants["IQ2_XS"]["options"]["imatrix"] == provenance
    built = imat / variants["Q3_K_M"]["path"]
    meta = read_gguf(built).metadata
    assert meta["quantize.imatrix.dataset"] == CALIBRATION_TEXT and meta["quantize.imatrix.chunks_count"] == 2
    assert meta["quantize.imatrix.entries_count"] == provenance["entries"] == 210
    assert meta["quantize.imatrix.file"] == provenance["file"] and (imat / provenance["file"]).is_file()
    without = next(plain.glob("*Q3_K_M.gguf"))
    assert "quantize.imatrix.file" not in read_gguf(without).metadata
    assert _tensor(built, "blk.0.ffn_down.weight") != _tensor(without, "blk.0.ffn_down.weight")
    assert variants["IQ2_XS"]["tensor_types"].get("IQ2_XS", 0) > 0
    again = json.loads(invoke("quantize", str(f16), "--types", "Q3_K_M,IQ2_XS", "--imatrix", "clinical", "--imatrix-chunks", "2",
                              "-o", str(imat), "--json", "-q")[1])
    assert all(v["reused"] for v in again["variants"])  # nothing computed or quantized twice


def test_a_matrix_for_another_model_or_a_damaged_one_is_refused_with_a_message(f16: Path, tmp_path: Path) -> None:
    wrong = tmp_path / "other.gguf"
    imatrix.write(wrong, {"blk.0.attn_q.weight": imatrix.Stats(np.ones((1, 960)), 10)}, ["other.txt"], 1, 512)
    code, out = invoke("quantize", str(f16), "--types", "Q4_K_M", "--imatrix", str(wrong), "-o", str(tmp_path / "o1"))
    assert code == 1 and "computed for another model" in out
    assert not list((tmp_path / "o1").glob("*imatrix*"))  # the rejected matrix was left copied there, and named as the copy
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\xff" * 64)
    code, out = invoke("quantize", str(f16), "--types", "Q4_K_M", "--imatrix", str(broken), "-o", str(tmp_path / "o2"))
    assert code == 1 and "importance-matrix" in out and f"{broken}: not an importance-matrix GGUF" in out
    assert not list((tmp_path / "o2").glob("*imatrix*"))
    binary = tmp_path / "notes.txt"
    binary.write_bytes(b"\xff\xfe clinical")
    code, out = invoke("quantize", str(f16), "--types", "Q4_K_M", "--imatrix", str(binary), "-o", str(tmp_path / "o3"))
    assert code == 1 and "not UTF-8" in out
    code, out = invoke("quantize", str(f16), "--types", "Q4_K_M", "--imatrix", str(tmp_path), "-o", str(tmp_path / "o4"))
    assert code == 1 and "is a folder" in out
    (tmp_path / "empty.txt").write_text("  \n")
    code, out = invoke("quantize", str(f16), "--types", "Q4_K_M", "--imatrix", str(tmp_path / "empty.txt"), "-o", str(tmp_path / "o5"))
    assert code == 1 and "is empty" in out


def test_a_text_of_the_user_s_and_a_matrix_file_brought_back_give_the_same_variant(f16: Path, tmp_path: Path) -> None:
    notes = tmp_path / "ward-notes.txt"
    notes.write_text(calibration_text()[:6000], encoding="utf-8")
    code, out = invoke("quantize", str(f16), "--types", "Q4_K_M", "--imatrix", str(notes), "--imatrix-chunks", "1", "-o", str(tmp_path / "a"),
                       "--json", "-q")
    assert code == 0, out
    first = json.loads(out)["variants"][0]
    assert first["options"]["imatrix"]["dataset"] == "ward-notes.txt" and first["options"]["imatrix"]["chunks"] == 1
    matrix = tmp_path / "a" / first["options"]["imatrix"]["file"]
    code, out = invoke("quantize", str(f16), "--types", "Q4_K_M", "--imatrix", str(matrix), "-o", str(tmp_path / "b"), "--json", "-q")
    assert code == 0, out
    second = json.loads(out)["variants"][0]
    assert second["options"]["imatrix"]["computed_by"].startswith("llama-imatrix") and second["options"]["imatrix"]["dataset"] == "ward-notes.txt"
    assert _tensor(tmp_path / "a" / first["path"], "blk.3.ffn_down.weight") == _tensor(tmp_path / "b" / second["path"], "blk.3.ffn_down.weight")
