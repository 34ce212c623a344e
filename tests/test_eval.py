"""`edgecds eval` on real variants of the default model, with llama.cpp's own logits."""

from __future__ import annotations

import csv
import json
import math
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from edgecds.cases import Case, load_cases
from edgecds.caveats import reference_caveats
from edgecds.cli import cli
from edgecds.digest import sha256_file
from edgecds.drift import drift_against
from edgecds.engine import EngineSettings
from edgecds.engine.gguf_runtime import GgufRuntime
from edgecds.errors import UsageError
from edgecds.evaluate import EvalConfig, Reply, Sampling, grade_reply, option_logprobs, run_eval
from edgecds.quant.quantize import QuantizeResult
from edgecds.results import RESULTS_FILE, load_results
from edgecds.stats import cohen_kappa, pass_at_k
from edgecds.tables import accuracy_table

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
    result = CliRunner().invoke(cli, ["eval", str(variants), "--types", "Q8_0,Q2_K", "--limit", str(LIMIT), "-t", "2", "--drift-chunks", "2",
                                       "--json"])
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
    assert q8["tokens_scored"] == 2 * 255  # the first 2 chunks of 512, their second halves less the last position
    assert 0 < q8["kl_mean"] < q2["kl_mean"] and q8["top1_agreement"] > q2["top1_agreement"]
    assert q8["reference_perplexity"] == q2["reference_perplexity"]

    # what limits these figures, said with them: the reference's origin, and chance on these cases
    cases = load_cases().cases[:LIMIT]
    for e in by_type.values():
        assert e["reference_origin"] == "rebuilt from SmolLM2-135M-Instruct.Q4_1.gguf, a Q4_1 file, not the original weights"
        assert e["metrics"]["chance"] == pytest.approx(sum(1 / len(c.options) for c in cases) / LIMIT, abs=1e-4)
    records = [r for r in (load_results(variants / RESULTS_FILE) or pytest.fail("no results")).evaluations]
    notes = accuracy_table(records, "cases-v1", "loglik", "F16").notes
    assert notes[0].startswith("The reference F16 was rebuilt from SmolLM2-135M-Instruct.Q4_1.gguf")
    reference = next(r for r in records if r.variant.type == "F16")
    guessing = replace(reference, metrics={**reference.metrics, "accuracy": 0.25, "low": 0.1})  # the interval reaches chance
    beyond = replace(reference, metrics={**reference.metrics, "low": reference.metrics["chance"] + 0.01})
    assert [line for line in reference_caveats([guessing]) if line.startswith("WARNING: the reference F16 (gguf) scores 25.0%")]
    assert not [line for line in reference_caveats([beyond]) if line.startswith("WARNING")]

    stored = load_results(variants / RESULTS_FILE)
    assert stored is not None and len(stored.evaluations) == 3

    # compare: every pair of the three real evaluations, McNemar checked by hand from the per-case answers
    out = CliRunner().invoke(cli, ["compare", str(variants / RESULTS_FILE), "--json"])
    assert out.exit_code == 0, out.output
    compared = {(c["first"].split(" ")[0].rsplit("-", 1)[-1], c["second"].split(" ")[0].rsplit("-", 1)[-1]): c
                for c in json.loads(out.stdout)["comparisons"]}
    assert len(compared) == 3
    for (a, b), c in compared.items():
        pairs = [(x["correct"], y["correct"]) for x, y in zip(by_type[a]["per_case"], by_type[b]["per_case"], strict=True)]
        lost, gained = sum(x and not y for x, y in pairs), sum(y and not x for x, y in pairs)
        p = min(1.0, 2 * sum(math.comb(lost + gained, i) for i in range(min(lost, gained) + 1)) / 2 ** (lost + gained))
        assert (c["n"], c["lost"], c["gained"]) == (LIMIT, lost, gained) and c["p_value"] == pytest.approx(p)
        assert c["p_holm"] >= c["p_value"] and c["verdict"] in ("no difference shown", "worse at 0.01", "better at 0.01")

    # deterministic: scored again from scratch, the same numbers
    again = run_eval(EvalConfig(variants=variants, types=("Q8_0",), limit=LIMIT, threads=2, drift_chunks=2, force=True))
    rescored = {o.record.variant.type: o.record for o in again.outcomes}
    assert rescored["Q8_0"].per_case == by_type["Q8_0"]["per_case"]
    assert rescored["Q8_0"].drift == by_type["Q8_0"]["drift"]
    # and reused, not rescored, without --force
    reused = run_eval(EvalConfig(variants=variants, types=("Q8_0",), limit=LIMIT, threads=2, drift_chunks=2))
    assert all(o.reused for o in reused.outcomes)


def _regraded(per_case: list[dict[str, Any]], mode: str, k: int, cases: dict[str, Case]) -> list[tuple[Any, ...]]:
    """Each recorded answer graded again by the matcher (whose rules test_matcher holds to hand cases)."""
    return [grade_reply(Reply(c["answer"], c["reasoning"]), cases[c["id"]], mode, k) for c in per_case]


# A case a 135M model answers: the diagnosis is in the vignette, so a grader that marks right answers
# wrong fails below (the shipped cases alone are nearly all missed by this model).
GIVEN = {"id": "given-asthma", "specialty": "respiratory", "incidence": "common", "question": "What is the diagnosis?",
         "vignette": "A 9-year-old boy has asthma. His doctor confirmed asthma last year. He uses an inhaler for his asthma.",
         "reference": "Asthma", "accepted_answers": ["bronchial asthma"]}


@pytest.mark.parametrize("case_set", ["mcq", "open"])
def test_generate_and_topk_grade_what_the_model_said(variants: Path, tmp_path: Path, case_set: str) -> None:
    source = Path(__file__).resolve().parents[1] / "toolkit" / "clinical" / ("open-v1.jsonl" if case_set == "open" else "cases-v1.jsonl")
    file = tmp_path / "cases.jsonl"
    file.write_text("\n".join(source.read_text().splitlines()[:3] + [json.dumps(GIVEN)]) + "\n")
    cases = {c.id: c for c in load_cases(file).cases}
    unmatched = right = 0
    for mode in ("generate", "topk"):
        result = run_eval(EvalConfig(variants=variants, cases=file, types=("Q8_0",), mode=mode, k=3, limit=4, threads=2,
                                     drift=False, output=tmp_path / f"{mode}.json"))
        for outcome in result.outcomes:
            m, per_case = outcome.record.metrics, outcome.record.per_case
            assert m["n"] == 4 and m["correct"] == sum(c["correct"] for c in per_case)  # unmatched answers stay in the denominator
            assert [(c["correct"], c["chosen"], c["error"]) for c in per_case] == _regraded(per_case, mode, 3, cases)
            assert sum(m["errors"].values()) == 4 - m["correct"] and set(m["error_rates"]) == set(m["errors"])
            assert all(c["reasoning_chars"] == 0 for c in per_case)  # SmolLM2 does not think
            if case_set == "open":
                assert all(c["chosen"] is None and c["error"] in (None, "unmatched", "no_answer") for c in per_case)
            right += m["correct"]
        missed = [c for o in result.outcomes for c in o.record.per_case if c["error"] in ("unmatched", "no_answer")]
        unmatched += len(missed)
        if missed:  # every answer that matched nothing is there for a clinician, with its reference
            assert result.review_file is not None
            with open(result.review_file, newline="", encoding="utf-8") as fh:
                rows = list(csv.DictReader(fh))
            assert [(r["case"], r["reference"]) for r in rows] == [(c["id"], cases[c["id"]].diagnosis) for c in missed]
    assert unmatched > 0 or case_set == "mcq"  # a 135M model names few open diagnoses exactly: the CSV path is exercised
    assert right > 0  # the given case at least: a right answer was graded right


def test_greedy_and_seeded_answers_repeat_and_pass_at_k_is_reported(variants: Path, tmp_path: Path) -> None:
    def run(seed: int, name: str) -> Any:
        config = EvalConfig(variants=variants, types=("F16",), mode="generate", limit=3, threads=2, drift=False, force=True,
                            sampling=Sampling(samples=3, temperature=1.0, top_p=0.95, seed=seed), output=tmp_path / name)
        return run_eval(config).outcomes[0].record

    first, again, other = run(7, "a.json"), run(7, "b.json"), run(8, "c.json")
    assert first.per_case == again.per_case  # greedy answers and seeded samples alike
    assert all(len(c["sampled"]) == 3 for c in first.per_case)
    assert [c["answer"] for c in other.per_case] == [c["answer"] for c in first.per_case]  # greedy does not depend on the seed
    assert [c["sampled"] for c in other.per_case] != [c["sampled"] for c in first.per_case]  # at temperature 1, another seed draws others
    m = first.metrics
    assert m["samples"] == 3 and set(m["pass_at"]) == {"1", "3"}
    expected = {k: sum(pass_at_k(3, c["samples_correct"], k) for c in first.per_case) / 3 for k in (1, 3)}
    assert m["pass_at"] == {str(k): pytest.approx(v, abs=1e-4) for k, v in expected.items()}
    assert first.spec["sampling"]["seed"] == 7 and first.spec["think_tokens"] == 2048
    with pytest.raises(UsageError, match="--mode generate"):
        run_eval(EvalConfig(variants=variants, cases=Path("open"), types=("F16",), limit=2, drift=False, output=tmp_path / "x.json"))


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
    # the tail and Δp, as llama-perplexity --kl-divergence reports them: KL 0.17329 and 0 at the two positions
    assert d["kl_max"] == pytest.approx(0.25 * np.log(2), abs=1e-6) and d["kl_median"] == pytest.approx(0.25 * np.log(2) / 2, abs=1e-6)
    assert d["kl_p99"] == pytest.approx(0.99 * 0.25 * np.log(2), abs=1e-6) and d["kl_p999"] == pytest.approx(0.999 * 0.25 * np.log(2), abs=1e-6)
    # the token that came: p 0.5 -> 0.25 at the first, 1/3 -> 1/3 at the second
    assert d["delta_p_mean"] == pytest.approx(-0.125, abs=1e-6) and d["delta_p_rms"] == pytest.approx(np.sqrt(0.25**2 / 2), abs=1e-6)


def test_profile_scores_accuracy_into_the_same_results(variants: Path, tmp_path: Path) -> None:
    cases = tmp_path / "three.jsonl"
    cases.write_text("\n".join(json.dumps(json.loads(line)) for line in (Path(__file__).resolve().parents[1] / "toolkit" / "clinical"
                                                                           / "cases-v1.jsonl").read_text().splitlines()[:3]))
    result = CliRunner().invoke(cli, ["profile", str(variants), "--types", "Q4_K_M", "--ctx", "512", "-p", "32", "-n", "8", "-r", "1",
                                      "--cases", str(cases), "--drift-chunks", "1", "-q"])
    assert result.exit_code == 0, result.output
    assert "Accuracy on" in result.output and "paired with F16" in result.output
    stored = load_results(variants / RESULTS_FILE)
    assert stored is not None
    assert [r.variant.type for r in stored.records] == ["Q4_K_M"]
    assert sorted(e.variant.type for e in stored.evaluations) == ["F16", "Q4_K_M"] and all(e.cases["n"] == 3 for e in stored.evaluations)


def test_a_local_judge_grades_the_answers_and_its_agreement_is_kappa(variants: Path, tmp_path: Path) -> None:
    judge = _path(variants, "Q8_0")
    result = CliRunner().invoke(cli, ["eval", str(variants), "--cases", "open", "--mode", "generate", "--types", "F16", "--limit", "4",
                                      "-t", "2", "--no-drift", "--judge", str(judge), "-o", str(tmp_path / "judged.json"), "--json"])
    assert result.exit_code == 0, result.output
    [record] = json.loads(result.stdout)["evaluations"]
    verdict = record["metrics"]["judge"]
    assert verdict["variant"] == judge.name and verdict["sha256"] == sha256_file(judge) and len(verdict["rubric_sha256"]) == 64
    assert record["spec"]["judge"] == {"variant": judge.name, "sha256": verdict["sha256"]}  # a new judge is a new evaluation
    graded = [c for c in record["per_case"] if c["answer"].strip()]
    assert all(isinstance(c["judge_correct"], bool) for c in graded) and verdict["n"] == len(graded)
    kappa, low, high = cohen_kappa([c["correct"] for c in graded], [c["judge_correct"] for c in graded])
    assert (verdict["kappa"], verdict["low"], verdict["high"]) == (pytest.approx(kappa, abs=1e-4), pytest.approx(low, abs=1e-4),
                                                                   pytest.approx(high, abs=1e-4))
    loglik = CliRunner().invoke(cli, ["eval", str(variants), "--judge", str(judge), "--limit", "2"])
    assert loglik.exit_code != 0 and "--mode generate" in loglik.output
