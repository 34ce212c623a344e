"""Bring your own GGUF: a published file taken where a variants folder is, recorded by its hash and
its header's quantization without requantizing, then planned, profiled and bundled."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from click.testing import CliRunner

from edgecds.cli import cli
from edgecds.digest import sha256_file, sha256_folder
from edgecds.quant.quantize import QuantizeResult
from edgecds.variants import load_variants


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


def _published(default_variants: QuantizeResult, folder: Path, kind: str, name: str) -> Path:
    """A variant copied under a publisher's name, alone in a downloads folder (no variants.json)."""
    record = next(o.record for o in default_variants.outcomes if o.record.type == kind)
    folder.mkdir(exist_ok=True)
    return Path(shutil.copyfile(Path(default_variants.output_dir) / record.path, folder / name))


def test_a_downloaded_gguf_is_planned_profiled_and_bundled_as_it_is(default_variants: QuantizeResult, tmp_path: Path) -> None:
    downloads = tmp_path / "downloads"
    model = _published(default_variants, downloads, "Q4_K_M", "SmolLM2-135M-Instruct.i1-Q4_K_M.gguf")
    code, out = invoke("plan", str(model), "--device", "jetson-orin-nano-8gb", "--ctx", "4096", "--json")
    assert code == 0, out
    assert [e["type"] for e in json.loads(out)["entries"]] == ["Q4_K_M"]  # the header's quantization, that file alone
    recorded = load_variants(downloads)
    assert recorded is not None and len(recorded.variants) == 1
    variant = recorded.variants[0]
    assert variant.sha256 == sha256_file(model) and variant.path == model.name and variant.options["adopted"]
    assert variant.load_check["tokens_generated"] > 0 and variant.tensor_types.get("Q4_K", 0) > 0
    before = model.stat().st_mtime_ns
    code, out = invoke("profile", str(model), "--ctx", "512", "-p", "16", "-n", "4", "-r", "1", "--no-accuracy", "-q", "--json")
    assert code == 0, out
    device = json.loads(out)["device"]
    assert [r["status"] for r in json.loads(out)["records"]] == ["measured"]
    assert model.stat().st_mtime_ns == before and (downloads / "results.json").is_file()  # not requantized, not touched
    code, out = invoke("bundle", str(downloads / "results.json"), "--device", device, "-o", str(tmp_path / "bundle"), "--json", "-q")
    assert code == 0, out
    assert json.loads(out[out.index("{"):])["choice"]["chosen"]["variant"] == "Q4_K_M"
    code, out = invoke("verify", str(tmp_path / "bundle"))
    assert code == 0, out

    # eval needs the unquantized model to pair with: said, not a quantize instruction that cannot apply
    code, out = invoke("eval", str(model), "--limit", "2", "-q")
    assert code == 2 and "the model's F16 GGUF beside this one" in out, out
    f16 = _published(default_variants, downloads, "F16", "SmolLM2-135M-Instruct-F16.gguf")
    code, out = invoke("plan", str(downloads), "--device", device, "--json")
    assert code == 0 and {e["type"] for e in json.loads(out)["entries"]} == {"Q4_K_M"}  # the folder's record: only what was given
    code, out = invoke("plan", str(f16), "--device", device, "--json")
    assert code == 0 and [e["type"] for e in json.loads(out)["entries"]] == ["F16"]
    code, out = invoke("plan", str(downloads), "--device", device, "--json")
    assert code == 0 and {e["type"] for e in json.loads(out)["entries"]} == {"Q4_K_M", "F16"}


def test_a_folder_of_ggufs_is_adopted_whole_and_bad_files_are_refused_unrecorded(default_variants: QuantizeResult, tmp_path: Path) -> None:
    downloads = tmp_path / "downloads"
    _published(default_variants, downloads, "Q8_0", "a-Q8_0.gguf")
    _published(default_variants, downloads, "Q4_K_M", "b-Q4_K_M.gguf")
    code, out = invoke("plan", str(downloads), "--device", "laptop-x86-16gb", "--json")
    assert code == 0 and {e["type"] for e in json.loads(out)["entries"]} == {"Q8_0", "Q4_K_M"}, out

    other = tmp_path / "other"
    twin = _published(default_variants, other, "Q4_K_M", "twin.gguf")
    code, _ = invoke("plan", str(twin), "--device", "laptop-x86-16gb")
    assert code == 0
    altered = other / "altered.gguf"  # the same type again, other bytes: a second Q4_K_M cannot share the folder's names
    altered.write_bytes(twin.read_bytes() + b"\0" * 32)
    code, out = invoke("plan", str(altered), "--device", "laptop-x86-16gb")
    assert code == 2 and "already records a Q4_K_M variant (twin.gguf)" in out, out

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.gguf").write_bytes(b"<html>not found</html>")
    code, out = invoke("plan", str(bad / "model.gguf"), "--device", "laptop-x86-16gb")
    assert code == 1 and "neither a GGUF file nor a variants.json" in out and "Traceback" not in out
    (bad / "cut.gguf").write_bytes(twin.read_bytes()[:4096])  # a download cut short: its header is refused, nothing recorded
    code, out = invoke("plan", str(bad / "cut.gguf"), "--device", "laptop-x86-16gb")
    assert code == 1 and "not a usable GGUF file" in out and not (bad / "variants.json").exists(), out


def test_run_answers_with_a_gguf_file_on_its_own_and_refuses_what_is_not_one(default_variants: QuantizeResult, tmp_path: Path) -> None:
    model = _published(default_variants, tmp_path / "downloads", "Q8_0", "SmolLM2-135M-Instruct-Q8_0.gguf")
    result = CliRunner().invoke(cli, ["run", str(model), "A child has a barking cough and stridor. Diagnosis?", "-n", "6", "--json"])
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert 0 < answer["completion_tokens"] <= 6 and answer["text"].strip() and answer["prompt_tokens"] > 10
    assert not (tmp_path / "downloads" / "variants.json").exists()  # run records nothing beside the file
    notes = tmp_path / "notes.txt"
    notes.write_text("not a model\n")
    code, out = invoke("run", str(notes), "hello")
    assert code != 0 and "neither a bundle folder nor a GGUF file" in out and "Traceback" not in out


def test_an_onnx_model_folder_is_adopted_beside_itself_and_a_broken_one_is_refused(onnx_variants: QuantizeResult, tmp_path: Path) -> None:
    published = next(o.record for o in onnx_variants.outcomes if o.record.type == "ONNX_INT8")
    downloads = tmp_path / "downloads"
    model = Path(shutil.copytree(Path(onnx_variants.output_dir) / published.path, downloads / "smollm2-int8-onnx"))
    code, out = invoke("plan", str(model), "--device", "laptop-x86-16gb", "--json")
    assert code == 0, out
    assert [(e["type"], e["format"]) for e in json.loads(out)["entries"]] == [("ONNX_INT8", "onnx")]  # by its MatMulNBits blocks
    recorded = load_variants(downloads)  # in the folder above the model's, as quantize records its ONNX variants
    assert recorded is not None and [v.path for v in recorded.variants] == [model.name]
    variant = recorded.variants[0]
    assert variant.sha256 == sha256_folder(model) == published.sha256 and variant.options["adopted"]
    assert variant.load_check["tokens_generated"] > 0 and variant.tensor_types.get("MatMulNBits/8bit", 0) > 0

    broken = tmp_path / "broken" / "model"
    broken.mkdir(parents=True)
    (broken / "model.onnx").write_bytes(b"<html>not found</html>")
    code, out = invoke("plan", str(broken), "--device", "laptop-x86-16gb")
    assert code == 1 and "not an ONNX model" in out and "Traceback" not in out, out
    assert not (broken.parent / "variants.json").exists()
