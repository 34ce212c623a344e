"""`edgecds eval` on real variants of the default model, with llama.cpp's own logits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgecds.cases import load_cases
from edgecds.cli import cli
from edgecds.drift import drift_against
from edgecds.engine import EngineSettings
from edgecds.engine.gguf_runtime import GgufRuntime
from edgecds.evaluate import EvalConfig, option_logprobs, run_eval
from edgecds.quantize import QuantizeResult
from edgecds.results import RESULTS_FILE, load_results

LIMIT = 12


@pytest.fixture
def variants(default_variants: QuantizeResult, tmp_path: Path) -> Path:
    folder = tmp_path / "variants"
    shutil.copytree(default_variants.output_dir, folder)
    return folder


def _path(folder: Path, qtype: str) -> Path:
    record = json.loads((folder / "variants.json").read_text())
    return folder / next(v["path"] for v in record["variants"] if v["type"] == qtype)


def test_cache_reuse_scores_equal_scoring_from_scratch(variants: Path) -> None:
    runtime = GgufRuntime(_path(variants, "Q8_0"), EngineSettings(n_ctx=1024, threads=2))
    try:
        for case in load_cases().cases[:3]:
            reused, lengths = option_logprobs(runtime, case, reuse_prefix=True)
            scratch, _ = option_logprobs(runtime, case, reuse_prefix=False)
            assert reused == pytest.approx(scratch, abs=1e-3)
            assert all(s < 0 for s in reused) and lengths == [len((" " + o.text).encode()) for o in case.options]
    finally:
        runtime.close()


def test_eval_scores_real_variants_with_statistics_and_drift(variants: Path) -> None:
    result = CliRunner().invoke(cli, ["eval", str(variants), "--types", "Q8_0,Q2_K", "--limit", str(LIMIT), "-t", "2", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)  # progress went to stderr
    assert data["reference"] == "F16" and data["mode"] == "loglik"
    by_type = {e["variant"]["type"]: e for e in data["evaluations"]}
    assert list(by_type) == ["F16", "Q8_0", "Q2_K"]  # the reference first, always scored
    for qtype, e in by_type.items():
        m = e["metrics"]
        assert m["n"] == LIMIT and 0 <= m["low"] <= m["accuracy"] <= m["high"] <= 1
        assert m["correct"] == sum(c["correct"] for c in e["per_case"])
        assert sum(m["errors"].values()) == LIMIT - m["correct"]
        assert sum(s["n"] for s in m["by_specialty"].values()) == LIMIT == sum(s["n"] for s in m["by_incidence"].values())
        answers = {c.id: c.answer_index for c in load_cases().cases}
        for c in e["per_case"]:  # every case keeps what was chosen and why, and is right only when it chose the answer
            assert len(c["scores"]) == len(c["normalized_scores"]) in (4, 5) and c["chosen"] == int(np.argmax(c["scores"]))
            assert c["correct"] == (c["chosen"] == answers[c["id"]]) and (c["error"] is None) == c["correct"]
        if qtype == "F16":
            assert e["paired"] is None
        else:
            p = e["paired"]
            flips = [(a["correct"], b["correct"]) for a, b in zip(by_type["F16"]["per_case"], e["per_case"], strict=True)]
            assert [c["flipped"] for c in e["per_case"]] == [r != v for r, v in flips]
            assert p["lost"] == sum(r and not v for r, v in flips) and p["gained"] == sum(v and not r for r, v in flips)
            assert p["low"] <= p["difference"] <= p["high"] and p["verdict"] != "equivalent"
    # drift: the finer quantization stays closer to the reference
    q8, q2 = by_type["Q8_0"]["drift"], by_type["Q2_K"]["drift"]
    assert q8["tokens_scored"] >= 1000  # 4 chunks of 512, second halves
    assert 0 < q8["kl_mean"] < q2["kl_mean"] and q8["top1_agreement"] > q2["top1_agreement"]
    assert q8["reference_perplexity"] == q2["reference_perplexity"]

    stored = load_results(variants / RESULTS_FILE)
    assert stored is not None and len(stored.evaluations) == 3

    # deterministic: scored again from scratch, the same numbers
    again = run_eval(EvalConfig(variants=variants, types=("Q8_0",), limit=LIMIT, threads=2, force=True))
    rescored = {o.record.variant.type: o.record for o in again.outcomes}
    assert rescored["Q8_0"].per_case == by_type["Q8_0"]["per_case"]
    assert rescored["Q8_0"].drift == by_type["Q8_0"]["drift"]
    # and reused, not rescored, without --force
    reused = run_eval(EvalConfig(variants=variants, types=("Q8_0",), limit=LIMIT, threads=2))
    assert all(o.reused for o in reused.outcomes)


def test_generation_and_top_k_modes_count_unmatched_answers(variants: Path, tmp_path: Path) -> None:
    for mode in ("generate", "topk"):
        result = run_eval(EvalConfig(variants=variants, types=("Q8_0",), mode=mode, k=3, limit=4, threads=2, drift=False,
                                     output=tmp_path / f"{mode}.json"))
        for outcome in result.outcomes:
            m = outcome.record.metrics
            assert m["n"] == 4  # unmatched answers stay in the denominator
            assert all(c["answer"] for c in outcome.record.per_case)  # what the model said is kept
            assert sum(m["errors"].values()) == 4 - m["correct"]


def test_drift_statistics_hand_computed() -> None:
    # two positions, three tokens: reference p = (0.5, 0.25, 0.25) and (1/3, 1/3, 1/3)
    ref = np.log(np.array([[0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3]]))
    var = np.log(np.array([[0.25, 0.5, 0.25], [1 / 3, 1 / 3, 1 / 3]]))
    d = drift_against(ref, var, np.array([0, 2]))
    # KL at 1: 0.5 ln 2 + 0.25 ln 0.5 = 0.25 ln 2 = 0.17329; at 2: 0 -> mean 0.086643
    assert d["kl_mean"] == pytest.approx(0.25 * np.log(2) / 2, abs=1e-6)
    assert d["top1_agreement"] == 0.5  # argmax 0 vs 1, then a tie broken alike
    assert d["perplexity"] == pytest.approx(np.exp(-(np.log(0.25) + np.log(1 / 3)) / 2), abs=1e-4)
    assert d["reference_perplexity"] == pytest.approx(np.exp(-(np.log(0.5) + np.log(1 / 3)) / 2), abs=1e-4)


def test_profile_scores_accuracy_into_the_same_results(variants: Path, tmp_path: Path) -> None:
    cases = tmp_path / "three.jsonl"
    cases.write_text("\n".join(json.dumps(json.loads(line)) for line in (Path(__file__).resolve().parents[1] / "toolkit" / "clinical"
                                                                           / "cases-v1.jsonl").read_text().splitlines()[:3]))
    result = CliRunner().invoke(cli, ["profile", str(variants), "--types", "Q4_K_M", "--ctx", "512", "-p", "32", "-n", "8", "-r", "1",
                                      "--cases", str(cases), "-q"])
    assert result.exit_code == 0, result.output
    assert "Accuracy on" in result.output and "paired with F16" in result.output
    stored = load_results(variants / RESULTS_FILE)
    assert stored is not None
    assert [r.variant.type for r in stored.records] == ["Q4_K_M"]
    assert sorted(e.variant.type for e in stored.evaluations) == ["F16", "Q4_K_M"] and all(e.cases["n"] == 3 for e in stored.evaluations)
