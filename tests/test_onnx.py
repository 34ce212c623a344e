"""The ONNX path on the real default model: Optimum's export, onnxruntime's quantizer and runtime.

Parity: the fp32 export against transformers (next-token logits within 1e-3, greedy continuations
identical for 32 tokens up to a float32 near-tie); every quantized variant's drift from fp32 recorded in variants.json;
sizes that prove the embedding and LM head were quantized. Hostile external-data references are
refused before onnxruntime opens a session.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from edgecds.atomic import TEMP_MARK
from edgecds.cases import drift_text, load_cases
from edgecds.cli import cli
from edgecds.digest import sha256_file, sha256_folder
from edgecds.engine import EngineSettings
from edgecds.engine.factory import open_runtime
from edgecds.errors import InvalidInputError, UsageError
from edgecds.evaluate import EvalConfig, grade, run_eval
from edgecds.quant.quantize import QuantizeConfig, QuantizeResult, run_quantize
from edgecds.quant.quantize_onnx import DRIFT_LIMITS
from edgecds.variants import load_variants
from tests.test_parity import CLINICAL_SENTENCES, GREEDY_PROMPTS

PARITY_TOKENS = 32


def folder_of(result: QuantizeResult, type_name: str) -> Path:
    return Path(result.output_dir) / next(o.record.path for o in result.outcomes if o.record.type == type_name)


def test_default_onnx_variants_are_recorded_file_by_file(onnx_variants: QuantizeResult) -> None:
    records = {o.record.type: o.record for o in onnx_variants.outcomes}
    assert list(records) == ["ONNX_FP32", "ONNX_INT8", "ONNX_INT4"]
    on_disk = load_variants(Path(onnx_variants.output_dir))
    assert on_disk is not None and [v.type for v in on_disk.variants] == list(records)
    for record in records.values():
        folder = Path(onnx_variants.output_dir) / record.path
        assert record.format == "onnx"
        assert {"model.onnx", "tokenizer.json", "tokenizer_config.json", "config.json"} <= set(record.files)
        assert record.files == {p.name: sha256_file(p) for p in sorted(folder.iterdir())}
        assert record.sha256 == sha256_folder(folder)
        assert record.file_size == sum(p.stat().st_size for p in folder.iterdir())
        assert record.load_check["tokens_generated"] > 0
        assert {"optimum-onnx", "onnxruntime", "onnx"} <= set(record.tools)
    assert records["ONNX_INT8"].tensor_types.get("MatMulNBits/8bit") == 211  # 30 layers x 7 matrices + the LM head
    assert records["ONNX_INT4"].tensor_types.get("MatMulNBits/4bit") == 210 and records["ONNX_INT4"].tensor_types.get("MatMulNBits/8bit") == 1
    assert records["ONNX_INT4"].options["block_size"] == 32 and records["ONNX_INT4"].options["accuracy_level"] == 4


def test_quantized_sizes_prove_embedding_and_head_were_quantized(onnx_variants: QuantizeResult) -> None:
    records = {o.record.type: o.record for o in onnx_variants.outcomes}
    fp32 = records["ONNX_FP32"].file_size
    assert records["ONNX_INT8"].file_size <= 0.30 * fp32
    assert records["ONNX_INT4"].file_size <= 0.35 * fp32
    # every variant counts the same weights: the tied table once
    assert records["ONNX_INT8"].n_parameters == records["ONNX_INT4"].n_parameters == records["ONNX_FP32"].n_parameters


def test_drift_from_fp32_is_recorded_and_flagged_by_the_stated_limits(onnx_variants: QuantizeResult) -> None:
    for o in onnx_variants.outcomes:
        drift = o.record.drift
        if o.record.type == "ONNX_FP32":
            assert drift == {}
            continue
        assert drift["reference"] == "ONNX_FP32" and drift["tokens_scored"] >= 1000
        breaks = drift["kl_mean"] > DRIFT_LIMITS["kl_mean_max"] or drift["top1_agreement"] < DRIFT_LIMITS["top1_agreement_min"]
        assert drift["flagged"] is breaks
        assert ("flagged" in " ".join(o.record.warnings)) is breaks
    int8 = next(o.record.drift for o in onnx_variants.outcomes if o.record.type == "ONNX_INT8")
    assert int8["flagged"] is False and int8["kl_mean"] < 0.02 and int8["top1_agreement"] > 0.9


def test_fp32_logits_match_transformers(onnx_variants: QuantizeResult, hf_folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32)
    model.eval()
    runtime = open_runtime(folder_of(onnx_variants, "ONNX_FP32"), EngineSettings(n_ctx=512))
    worst = 0.0
    for prompt in GREEDY_PROMPTS[:6]:
        runtime.reset()
        tokens = runtime.tokenize(runtime.chat_prompt(prompt))
        ours = runtime.eval_logits(tokens)
        with torch.no_grad():
            theirs = model(torch.tensor([tokens])).logits[0].numpy()
        worst = max(worst, float(np.abs(ours - theirs).max()))
    assert worst < 1e-3, worst


def test_fp32_greedy_continuations_match_transformers(onnx_variants: QuantizeResult, hf_folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from edgecds.hwbench.load_check import load_and_generate

    model = AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32)
    model.eval()
    folder = folder_of(onnx_variants, "ONNX_FP32")
    for prompt in GREEDY_PROMPTS[:4]:
        ours = load_and_generate(folder, prompt, PARITY_TOKENS)
        with torch.no_grad():
            out = model.generate(torch.tensor([ours.prompt_tokens]), max_new_tokens=PARITY_TOKENS, do_sample=False, pad_token_id=2,
                                 eos_token_id=2, attention_mask=torch.ones(1, len(ours.prompt_tokens), dtype=torch.long))
        theirs = out[0, len(ours.prompt_tokens):].tolist()
        assert len(ours.tokens) == len(theirs), prompt
        split = next((i for i, (a, b) in enumerate(zip(ours.tokens, theirs, strict=True)) if a != b), None)
        if split is not None:
            # Another CPU's float32 rounding may flip a near-tie; anything else is a real divergence.
            # The margin is the logits tolerance above (1e-3 per logit, so 2e-3 between two).
            with torch.no_grad():
                logits = model(torch.tensor([ours.prompt_tokens + theirs[:split]])).logits[0, -1]
            assert float(logits[theirs[split]] - logits[ours.tokens[split]]) < 2e-3, (prompt, split)


def test_onnx_runtime_tokenizes_like_transformers_and_generates_quantized(onnx_variants: QuantizeResult, hf_folder: Path) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(hf_folder)
    runtime = open_runtime(folder_of(onnx_variants, "ONNX_INT4"), EngineSettings(n_ctx=512))
    for sentence in CLINICAL_SENTENCES:
        assert runtime.tokenize(sentence) == hf(sentence)["input_ids"], sentence
        assert runtime.detokenize(runtime.tokenize(sentence)) == sentence
    prompt = runtime.chat_prompt("What is the first drug to give in anaphylaxis?")
    assert prompt == hf.apply_chat_template([{"role": "user", "content": "What is the first drug to give in anaphylaxis?"}],
                                            tokenize=False, add_generation_prompt=True)
    runtime.eval(runtime.tokenize(prompt))
    first = int(np.argmax(runtime.logits()))
    assert 0 <= first < runtime.n_vocab
    runtime.truncate(3)  # the KV cache keeps its first 3 positions and decoding goes on from there
    runtime.eval([first])
    assert runtime.logits().shape == (runtime.n_vocab,)


def test_a_second_run_rebuilds_nothing(onnx_variants: QuantizeResult, model_store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGECDS_HOME", str(model_store))
    again = run_quantize(QuantizeConfig(output=Path(onnx_variants.output_dir), formats=("onnx",)))
    assert again.all_reused and len(again.outcomes) == 3


def test_onnx_from_a_gguf_source_says_what_to_pass(source_gguf: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="Hugging Face folder"):
        run_quantize(QuantizeConfig(source=source_gguf, output=tmp_path / "o", formats=("onnx",)))


def test_cli_refuses_an_unknown_format_and_a_type_of_another_format() -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["quantize", "--format", "tflite"])
    assert result.exit_code == 2 and "choose from gguf, onnx" in result.output
    result = runner.invoke(cli, ["quantize", "--format", "gguf", "--types", "ONNX_INT4"])
    assert result.exit_code == 2 and "add their format to --format" in result.output


# --- hostile external data (no model needed) -----------------------------------------------------------


def _graph_with_external(folder: Path, location: str, offset: int = 0, length: int = 16) -> None:
    import onnx
    from onnx import TensorProto, helper

    weight = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4])
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    node = helper.make_node("Add", ["x", "w"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], [weight])
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph), str(folder / "model.onnx"))


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "hardlink", "past_end", "missing"])
def test_hostile_external_data_is_refused_before_any_session(kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime

    from edgecds.formats.onnx_model import check_onnx_folder

    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\0" * 64)
    folder = tmp_path / "variant"
    folder.mkdir()
    location = {"dotdot": "../secret.bin", "absolute": str(secret)}.get(kind, "weights.bin")
    if kind == "symlink":
        (folder / "weights.bin").symlink_to(secret)
    elif kind == "hardlink":
        os.link(secret, folder / "weights.bin")
    elif kind == "past_end":
        (folder / "weights.bin").write_bytes(b"\0" * 8)
    _graph_with_external(folder, location)
    (folder / "config.json").write_text('{"num_hidden_layers": 1, "num_attention_heads": 1, "hidden_size": 4}')

    def no_session(*args: object, **kwargs: object) -> None:
        raise AssertionError("an onnxruntime session was created for a hostile model")

    monkeypatch.setattr(onnxruntime, "InferenceSession", no_session)
    with pytest.raises(InvalidInputError, match="external data"):
        check_onnx_folder(folder)
    with pytest.raises(InvalidInputError, match="external data"):
        open_runtime(folder, EngineSettings())


def test_a_sound_external_data_reference_is_accepted(tmp_path: Path) -> None:
    from edgecds.formats.onnx_model import check_onnx_folder

    folder = tmp_path / "variant"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(np.arange(4, dtype=np.float32).tobytes())
    _graph_with_external(folder, "weights.bin")
    check_onnx_folder(folder)


def test_a_cuda_request_without_the_cuda_provider_says_what_to_install() -> None:
    import onnxruntime

    from edgecds.engine.onnx_runtime import execution_provider

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(UsageError, match="install onnxruntime-gpu"):
        execution_provider(EngineSettings(n_gpu_layers=-1))
    assert execution_provider(EngineSettings()) == "CPUExecutionProvider"


def test_a_4_bit_shared_table_unpacks_like_the_8_bit_one(onnx_variants: QuantizeResult, tmp_path: Path) -> None:
    """--head-bits 4: the embedding unpacks two codes per byte from the LM head's table."""
    from edgecds.formats.onnx_model import read_onnx_folder
    from edgecds.formats.types import quant_type
    from edgecds.quant.onnx_build import OnnxOptions, copy_side_files, quantize_weights

    fp32 = folder_of(onnx_variants, "ONNX_FP32")
    out = tmp_path / "int4-head4"
    out.mkdir()
    quantize_weights(fp32, out, quant_type("ONNX_INT4"), OnnxOptions(head_bits=4))
    copy_side_files(fp32, out)
    assert read_onnx_folder(out, hash_files=False).tensor_types.get("MatMulNBits/4bit") == 211
    assert (out / "model.onnx").stat().st_size <= 0.20 * (fp32 / "model.onnx").stat().st_size
    ref, var = (open_runtime(f, EngineSettings(n_ctx=512)) for f in (fp32, out))
    tokens = ref.tokenize(drift_text())[:512]
    a, b = ref.eval_logits(tokens), var.eval_logits(tokens)
    agreement = float((a.argmax(axis=1) == b.argmax(axis=1)).mean())
    # measured 0.56 on the drift text (all-4-bit int4 drifts that far); an unpacking mistake (nibble
    # order, zero point) scrambles every embedding and leaves agreement near chance
    assert agreement >= 0.35, agreement


def test_eval_scores_onnx_variants_against_the_fp32_export(onnx_variants: QuantizeResult) -> None:
    """Clinical accuracy and drift for ONNX variants, from onnxruntime's own logits, paired with fp32."""
    folder = Path(onnx_variants.output_dir)
    config = EvalConfig(variants=folder, types=("ONNX_INT8",), limit=6, threads=2)
    result = run_eval(config)
    by_type = {o.record.variant.type: o.record for o in result.outcomes}
    assert set(by_type) == {"ONNX_FP32", "ONNX_INT8"} and result.reference == "ONNX_FP32"
    ref, q = by_type["ONNX_FP32"], by_type["ONNX_INT8"]
    assert ref.paired is None and q.reference == "ONNX_FP32" and q.paired is not None and q.paired["n"] == 6
    cases = load_cases().cases[:6]
    for record in (ref, q):
        assert [c["id"] for c in record.per_case] == [c.id for c in cases]
        for scored, case in zip(record.per_case, cases, strict=True):
            assert len(scored["scores"]) == len(case.options) and all(s < 0 for s in scored["scores"])
            assert scored["chosen"] == int(np.argmax(scored["scores"])) and scored["correct"] == (scored["chosen"] == case.answer_index)
    # eval's drift is quantize's drift measure on the same text (eval reads fp32 back as float16: near, not equal)
    recorded = next(v.drift for v in load_variants(folder).variants if v.type == "ONNX_INT8")
    assert q.drift is not None and q.drift["kl_mean"] == pytest.approx(recorded["kl_mean"], rel=0.1, abs=5e-4)
    assert q.drift["tokens_scored"] == recorded["tokens_scored"] >= 1000  # every chunk by default: 4 of 512, second halves
    assert q.drift["top1_agreement"] == pytest.approx(recorded["top1_agreement"], abs=0.01)
    again = run_eval(replace(config, force=True))  # deterministic: scored again, the same numbers
    assert [o.record.per_case for o in again.outcomes] == [o.record.per_case for o in result.outcomes]


def test_onnx_variants_answer_open_cases_and_an_onnx_judge_grades_them(onnx_variants: QuantizeResult, tmp_path: Path) -> None:
    """Generate mode on open-ended cases through onnxruntime, graded by the matcher and by an ONNX judge."""
    judge = folder_of(onnx_variants, "ONNX_INT8")
    result = run_eval(EvalConfig(variants=Path(onnx_variants.output_dir), cases=Path("open"), mode="generate", types=("ONNX_INT8",),
                                 limit=3, threads=2, drift=False, judge=judge, output=tmp_path / "results.json"))
    cases = {c.id: c for c in load_cases(Path("open")).cases}
    for outcome in result.outcomes:
        verdict = outcome.record.metrics["judge"]
        assert verdict["variant"] == judge.name and verdict["sha256"] == sha256_folder(judge)
        for c in outcome.record.per_case:
            assert (c["correct"], c["chosen"], c["error"]) == grade(c["answer"], cases[c["id"]])
            assert (c["judge_correct"] is None) == (not c["answer"].strip())
        assert verdict["n"] == sum(1 for c in outcome.record.per_case if c["answer"].strip())


# --- fused attention: the runtime's compiled graph ----------------------------------------------------


def _compiled_model(home: Path) -> tuple[Path, dict[str, object]]:
    import json

    (entry,) = [d for d in (home / "compiled").iterdir() if not d.name.startswith(".")]
    return entry / "model.onnx", json.loads((entry / "fusion.json").read_text())


def test_the_runtime_compiles_a_fused_graph_once_and_reuses_it(onnx_variants: QuantizeResult, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    import onnx

    monkeypatch.setenv("EDGECDS_HOME", str(tmp_path / "home"))
    folder = folder_of(onnx_variants, "ONNX_INT4")
    runtime = open_runtime(folder, EngineSettings(n_ctx=512))
    assert "graph compiled with fused attention (compiled now): 30 layers" in " ".join(runtime.engine_log())
    path, record = _compiled_model(tmp_path / "home")
    fused = onnx.load(str(path), load_external_data=False)
    ops = [n.op_type for n in fused.graph.node]
    original = [n.op_type for n in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node]
    assert ops.count("GroupQueryAttention") == 30 and "Expand" not in ops and len(ops) < len(original) / 3, (len(ops), len(original))
    assert "position_ids" not in {i.name for i in fused.graph.input}
    assert ops.count("MatMulNBits") == original.count("MatMulNBits")  # every quantized matrix carried over
    verify = record["fused"]["verify"]  # type: ignore[index]
    assert verify["passed"] and verify["top1_agreement"] >= 0.9 and verify["positions"] == 72

    def no_child(*args: object, **kwargs: object) -> None:
        raise AssertionError("compiled again although the cache holds it")

    monkeypatch.setattr(subprocess, "run", no_child)
    again = open_runtime(folder, EngineSettings(n_ctx=512))
    assert "(from the cache)" in " ".join(again.engine_log())
    # a damaged cache entry is compiled again, not loaded
    monkeypatch.undo()
    monkeypatch.setenv("EDGECDS_HOME", str(tmp_path / "home"))
    path.write_bytes(b"not a graph")
    third = open_runtime(folder, EngineSettings(n_ctx=512))
    assert "(compiled now)" in " ".join(third.engine_log())


def test_a_compiled_graph_altered_in_the_cache_is_never_loaded(onnx_variants: QuantizeResult, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import onnx
    from onnx import numpy_helper

    from edgecds.digest import sha256_file

    monkeypatch.setenv("EDGECDS_HOME", str(tmp_path / "home"))
    folder = folder_of(onnx_variants, "ONNX_INT8")
    open_runtime(folder, EngineSettings(n_ctx=256)).close()
    path, record = _compiled_model(tmp_path / "home")
    assert record["files"] == {"model.onnx": sha256_file(path)}  # type: ignore[comparison-overlap]
    # a well-formed graph with weights inverted (the probe's attack): it passes every structural check
    model = onnx.load(str(path))
    changed = 0
    for init in model.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT and changed < 12:
            init.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(init), init.name))
            changed += 1
    onnx.save(model, str(path))
    assert changed == 12 and sha256_file(path) != record["files"]["model.onnx"]  # type: ignore[index]
    again = open_runtime(folder, EngineSettings(n_ctx=256))
    assert "(compiled now)" in " ".join(again.engine_log())
    assert sha256_file(path) == record["files"]["model.onnx"]  # type: ignore[index]  # the same bytes as the first compile
    again.close()
    # the cache follows the variant's content, not its files' dates or place
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    assert "(from the cache)" in " ".join(open_runtime(copy, EngineSettings(n_ctx=256)).engine_log())


def test_fused_fp32_runs_like_the_exported_graph_through_batches_truncation_and_decode(onnx_variants: QuantizeResult) -> None:
    folder = folder_of(onnx_variants, "ONNX_FP32")
    fused, exported = (open_runtime(folder, EngineSettings(n_ctx=512, n_batch=24, fuse_attention=f)) for f in (True, False))
    assert "fused attention" in fused.engine_log()[1] and "fused attention off" in exported.engine_log()[1]
    tokens = fused.tokenize(drift_text())[:100]
    rows = []
    for rt in (fused, exported):
        a = rt.eval_logits(tokens[:60])  # three batches, the later ones after a cache
        rt.truncate(40)  # drop the last 20 positions and go on from position 40
        b = rt.eval_logits(tokens[60:70])
        steps = []
        for t in tokens[70:78]:
            rt.eval([t])
            steps.append(rt.logits())
        rows.append(np.concatenate([a, b, np.stack(steps)]))
    assert float(np.abs(rows[0] - rows[1]).max()) < 1e-3


def test_verification_refuses_a_wrongly_fused_graph(onnx_variants: QuantizeResult, tmp_path: Path) -> None:
    import onnx

    from edgecds.engine.onnx_fuse import compile_folder, verification_tokens, verify

    folder = folder_of(onnx_variants, "ONNX_INT8")
    report = compile_folder(folder, tmp_path)
    assert report.verify["passed"] and report.nodes_after < report.nodes_before / 3
    model = onnx.load(str(tmp_path / "model.onnx"))
    for node in model.graph.node:
        for attr in node.attribute:
            if node.op_type == "GroupQueryAttention" and attr.name == "rotary_interleaved":
                attr.i = 1  # the rotary halves in the wrong layout (measured on int4: top-1 0.43, KL 1.65)
    onnx.save(model, str(tmp_path / "model.onnx"))
    wrong = verify(folder / "model.onnx", tmp_path / "model.onnx", verification_tokens(folder))
    assert not wrong["passed"] and wrong["top1_agreement"] < 0.8, wrong


def test_a_layout_the_rewrite_does_not_know_runs_as_exported(onnx_variants: QuantizeResult, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    monkeypatch.setenv("EDGECDS_HOME", str(tmp_path / "own-home"))  # its own cache: the record read below is this variant's

    folder = tmp_path / "variant"
    shutil.copytree(folder_of(onnx_variants, "ONNX_INT4"), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "phi3"}))
    runtime = open_runtime(folder, EngineSettings(n_ctx=256))
    note = runtime.engine_log()[1]
    assert note.startswith("graph as exported (model_type 'phi3': one fused qkv projection") and "to retry" in note
    runtime.eval(runtime.tokenize("Chest pain radiating to the left arm"))
    assert runtime.logits().shape == (runtime.n_vocab,)
    _, record = _compiled_model(Path(os.environ["EDGECDS_HOME"]))
    assert "declined" in record  # remembered: the next load does not try again


def _record(result: QuantizeResult, type_name: str) -> Any:
    return next(o.record for o in result.outcomes if o.record.type == type_name)


def _graph(folder: Path) -> Any:
    import onnx

    return onnx.load(str(folder / "model.onnx"), load_external_data=False)


def _onnx_records_intact(out: Path) -> dict[str, str]:
    """Every recorded ONNX folder holds exactly its recorded files, hashed as recorded."""
    state = load_variants(out)
    assert state is not None
    for v in state.variants:
        folder = out / v.path
        assert {p.name: sha256_file(p) for p in sorted(folder.iterdir())} == v.files, v.type
    return {v.type: v.sha256 for v in state.variants}


def test_onnx_options_rebuild_only_what_they_affect_and_a_killed_build_publishes_nothing(
        onnx_variants: QuantizeResult, use_store: Path, tmp_path: Path) -> None:
    """--asymmetric and --keep-embeddings change the int8/int4 graphs as stated and rebuild only
    those; fp32 and fp16 do not depend on them. A build killed after its graph is written leaves
    the published folder as it was; the next run removes the temporary and builds it whole."""
    import onnx

    out = tmp_path / "out"
    shutil.copytree(onnx_variants.output_dir, out)
    before = _onnx_records_intact(out)
    cmd = ["quantize", "--format", "onnx", "-o", str(out), "--quiet"]
    int8 = out / folder_of(onnx_variants, "ONNX_INT8").name
    proc = subprocess.Popen([sys.executable, "-m", "edgecds", *cmd, "--types", "ONNX_FP16,ONNX_INT8", "--asymmetric"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    temps: list[Path] = []
    while time.monotonic() < deadline and proc.poll() is None:  # the new int8 graph is written, not yet checked
        temps = [t for t in out.glob(f".{int8.name}.*{TEMP_MARK}") if (t / "model.onnx").is_file() and (t / "config.json").is_file()]
        if temps:
            break
        time.sleep(0.05)
    assert temps, "the int8 build never wrote its graph"
    proc.kill()
    proc.wait()
    assert _onnx_records_intact(out)["ONNX_INT8"] == before["ONNX_INT8"]  # the old folder, whole
    assert temps[0].exists()

    result = CliRunner().invoke(cli, [*cmd, "--types", "ONNX_FP16,ONNX_INT8", "--asymmetric", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["removed_temporaries"] >= 1 and not list(out.glob(f".*{TEMP_MARK}"))
    assert {v["type"]: v["reused"] for v in data["variants"]} == {"ONNX_FP16": True, "ONNX_INT8": False}  # fp16 finished before the kill
    asym = _onnx_records_intact(out)
    assert asym["ONNX_FP32"] == before["ONNX_FP32"] and asym["ONNX_INT4"] == before["ONNX_INT4"]  # not asked for: untouched
    records = {v.type: v for v in (load_variants(out) or pytest.fail("no variants.json")).variants}
    assert records["ONNX_INT8"].options["symmetric"] is False and records["ONNX_INT8"].load_check["tokens_generated"] > 0
    graph = _graph(int8).graph
    blocks = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert len(blocks) == 211 and all(len(n.input) > 3 and n.input[3] for n in blocks)  # every block has zero points
    assert any("embedding stays float32" in w for w in records["ONNX_INT8"].warnings)

    fp16 = records["ONNX_FP16"]
    weights = [t for t in _graph(out / fp16.path).graph.initializer if len(t.dims) == 2]
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)
    assert 0.45 < fp16.file_size / records["ONNX_FP32"].file_size < 0.55 and fp16.load_check["tokens_generated"] > 0
    assert fp16.drift["kl_mean"] < 0.01 and not fp16.drift["flagged"]

    result = CliRunner().invoke(cli, [*cmd, "--types", "ONNX_FP16,ONNX_INT8", "--keep-embeddings", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert {v["type"]: v["reused"] for v in json.loads(result.stdout)["variants"]} == {"ONNX_FP16": True, "ONNX_INT8": False}
    kept = (load_variants(out) or pytest.fail("no variants.json")).by_type()["ONNX_INT8"]
    graph = _graph(out / kept.path).graph
    floats = {t.name: tuple(t.dims) for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    gathers = [n for n in graph.node if n.op_type == "Gather" and n.input[0] in floats]
    assert any(floats[n.input[0]] == (49152, 576) for n in gathers)  # the embedding reads a float32 table
    # the shared table costs 4 bytes a weight instead of 1 + 4/32 (int8 with a float scale per 32)
    assert kept.options["quantize_embeddings"] is False
    assert kept.file_size - _record(onnx_variants, "ONNX_INT8").file_size == pytest.approx(49152 * 576 * (4 - 1.125), rel=0.02)


def test_mixed_int4_keeps_the_layers_llama_cpp_widens_at_8_bits_and_drifts_less(onnx_variants: QuantizeResult, tmp_path: Path) -> None:
    """--mixed: attention V and FFN down at 8 bits in the layers llama.cpp's Q4_K_M widens, the rest
    at 4; it drifts less from fp32 than the all-4-bit variant (0.181 against 0.294 on the whole
    drift text, for 6.6 MiB more)."""
    from edgecds.drift import drift_against, drift_logprobs
    from edgecds.formats.onnx_model import read_onnx_folder
    from edgecds.formats.types import quant_type
    from edgecds.quant.onnx_build import OnnxOptions, copy_side_files, quantize_weights, use_more_bits

    widened = [i for i in range(30) if use_more_bits(i, 30)]
    assert widened == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]  # llama-quant.cpp's rule on SmolLM2's 30 layers
    fp32 = folder_of(onnx_variants, "ONNX_FP32")
    out = tmp_path / "int4-mixed"
    out.mkdir()
    _, notes = quantize_weights(fp32, out, quant_type("ONNX_INT4"), OnnxOptions(mixed=True))
    copy_side_files(fp32, out)
    types = read_onnx_folder(out, hash_files=False).tensor_types
    assert types["MatMulNBits/8bit"] == 1 + 2 * len(widened) and types["MatMulNBits/4bit"] == 210 - 2 * len(widened)
    assert notes == ["29 MatMuls at 8 bits (attention V, FFN down in the layers llama.cpp widens)"]
    runs = {}  # the first chunk of the drift text: enough to tell 0.18 from 0.29
    for name, folder in (("fp32", fp32), ("plain", folder_of(onnx_variants, "ONNX_INT4")), ("mixed", out)):
        runtime = open_runtime(folder, EngineSettings())
        runs[name] = drift_logprobs(runtime, drift_text(), max_chunks=1)
        runtime.close()
    mixed, plain = (drift_against(runs["fp32"][0], runs[name][0], runs["fp32"][1]) for name in ("mixed", "plain"))
    assert mixed["kl_mean"] < 0.8 * plain["kl_mean"], (mixed, plain)
