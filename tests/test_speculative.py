"""Speculative decoding (engine/speculative.py) on real variants of the default model, in llama.cpp."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgecds.cli import cli
from edgecds.engine import EngineSettings, Runtime, generate_greedy, sampler
from edgecds.engine.factory import open_runtime
from edgecds.engine.speculative import NGRAM, DraftSettings, NgramDraft, Speculation, open_draft
from edgecds.errors import UsageError
from edgecds.quant.quantize import QuantizeResult

PROMPTS = (
    "A 58-year-old man has had sudden severe headache for one hour, the worst of his life, with vomiting and neck stiffness. "
    "What is the most likely diagnosis?",
    "List the causes of acute kidney injury, grouped as prerenal, renal and postrenal.",
    "A 4-year-old has a barking cough and stridor at night. What is the diagnosis and the treatment?",
)
# One token a ubatch: llama.cpp then verifies each drafted token through the same kernels as
# one-token decoding. Its batched kernels round differently (bench_speculative's batch_vs_one_token:
# logits up to 1.04 apart on k-quants, 0.02 on F16), so with batched verification a near tie can
# go the other way; this isolates what speculative decoding itself must guarantee.
ONE_TOKEN_KERNELS = EngineSettings(n_ctx=1024, threads=2, n_ubatch=1)


def _file(variants: QuantizeResult, quant_type: str) -> Path:
    return Path(variants.output_dir) / next(o.record.path for o in variants.outcomes if o.record.type == quant_type)


@pytest.fixture(scope="module")
def target(default_variants: QuantizeResult) -> Iterator[Runtime]:
    runtime = open_runtime(_file(default_variants, "Q8_0"), ONE_TOKEN_KERNELS)
    yield runtime
    runtime.close()


def test_ngram_lookup_proposes_what_followed_the_last_occurrence() -> None:
    draft = NgramDraft()
    assert draft.propose([1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3], 3) == [7, 8, 1]  # the most recent earlier occurrence
    assert draft.propose([5, 6, 5, 6, 5, 6], 8) == [5, 6]  # never past the text's end
    assert draft.propose([1, 2, 3, 4], 4) == []  # nothing repeats: no guess, decoding goes on alone


@pytest.mark.parametrize("drafter", ["Q2_K", NGRAM])
def test_greedy_and_sampled_answers_are_the_targets_own_with_either_draft(drafter: str, target: Runtime,
                                                                         default_variants: QuantizeResult) -> None:
    """Three clinical prompts, greedy and sampled (seeded): the tokens with the draft are the tokens
    without it, while the draft's guesses were really used (fewer target steps than tokens)."""
    settings = DraftSettings(NGRAM if drafter == NGRAM else str(_file(default_variants, drafter)))
    # the draft's own arithmetic cannot change what the target picks: it runs batched, as it would anyway
    spec = Speculation.open(settings, replace(ONE_TOKEN_KERNELS, n_ubatch=512), target)
    try:
        for prompt in PROMPTS:
            ids = target.tokenize(target.chat_prompt(prompt))
            assert generate_greedy(target, ids, 32, draft=spec) == generate_greedy(target, ids, 32)
            sampled = [generate_greedy(target, ids, 32, pick=sampler(7, 0.8, 0.95), draft=d) for d in (None, spec)]
            assert sampled[0] == sampled[1]
    finally:
        spec.close()
    stats = spec.stats
    assert stats.accepted > 0 and stats.steps < stats.emitted, stats
    assert 0 < stats.accepted <= stats.drafted


def test_a_draft_of_another_model_is_refused_with_what_to_do(target: Runtime, gemma_gguf: Path) -> None:
    with pytest.raises(UsageError, match="not a draft for this model.*--draft ngram"):
        open_draft(DraftSettings(str(gemma_gguf)), replace(ONE_TOKEN_KERNELS, n_ubatch=512), target)


def test_run_drafts_and_says_how_much_it_kept(default_variants: QuantizeResult, tmp_path: Path) -> None:
    """`run MODEL.gguf --draft Q2_K.gguf`: the answer, with the draft's tally in --json and on stderr;
    a file that is not a GGUF is a message."""
    model, draft = _file(default_variants, "F16"), _file(default_variants, "Q2_K")
    runner = CliRunner()
    out = runner.invoke(cli, ["run", str(model), PROMPTS[0], "-n", "24", "--draft", str(draft), "--json"])
    assert out.exit_code == 0, out.output
    answer = json.loads(out.output)
    spec = answer["speculative"]
    assert spec["draft"] == draft.name and spec["emitted"] == answer["completion_tokens"] and 0 <= spec["accepted"] <= spec["drafted"]
    out = runner.invoke(cli, ["run", str(model), PROMPTS[0], "-n", "8", "--draft", NGRAM])
    assert out.exit_code == 0 and "ngram draft:" in out.output, out.output
    bad = tmp_path / "draft.gguf"
    bad.write_text("not a model")
    out = runner.invoke(cli, ["run", str(model), PROMPTS[0], "--draft", str(bad)])
    assert out.exit_code != 0 and "not a GGUF file" in out.output and "Traceback" not in out.output, out.output


def test_profile_measures_decode_with_and_without_each_draft_and_plan_counts_its_memory(default_variants: QuantizeResult,
                                                                                        tmp_path: Path) -> None:
    """`profile --draft`: the same answer decoded both ways in each process, the tally and the peak
    with both loaded recorded; a model draft's memory predicted as `plan --draft` predicts it, and
    measured above the variant's own peak; n-gram adds no memory to the plan."""
    folder = tmp_path / "variants"
    folder.mkdir()
    source = Path(default_variants.output_dir)
    (folder / "variants.json").write_text((source / "variants.json").read_text())
    for outcome in default_variants.outcomes:  # links: plan reads every recorded variant
        (folder / outcome.record.path).symlink_to(source / outcome.record.path)
    runner = CliRunner()
    for draft, repeats in (("Q2_K", 2), (NGRAM, 1)):
        out = runner.invoke(cli, ["profile", str(folder), "--types", "Q8_0", "--draft", draft, "--ctx", "512", "-p", "32", "-n", "24",
                                  "-r", str(repeats), "--no-accuracy", "-q", "--json", "-o", str(tmp_path / f"{draft}.json")])
        assert out.exit_code == 0, out.output
        (record,) = json.loads(out.output)["records"]
        spec, measured = record["measured"]["speculative"], record["measured"]
        assert record["settings"]["draft"]["source"] == draft and spec["draft"] == draft
        assert 1 < spec["tokens"] <= 24 and len(spec["plain_tps"]["samples"]) == len(spec["draft_tps"]["samples"]) == repeats
        assert spec["plain_tps"]["median"] > 0 and spec["draft_tps"]["median"] > 0
        assert spec["acceptance_rate"] is None or 0 <= spec["acceptance_rate"] <= 1
        assert spec["peak_rss_bytes"] >= measured["full_context_peak_bytes"]
        if draft == "Q2_K":
            assert record["predicted"]["peak_bytes_with_draft"] > record["predicted"]["peak_bytes"]
            assert spec["draft_sha256"] == next(o.record.sha256 for o in default_variants.outcomes if o.record.type == "Q2_K")
            assert spec["peak_rss_bytes"] > measured["full_context_peak_bytes"] + 0.5 * _file(default_variants, "Q2_K").stat().st_size
    plans = {}
    for draft in (None, "Q2_K", NGRAM):
        out = runner.invoke(cli, ["plan", str(folder), "--device", "laptop-x86-16gb", "--ctx", "512", "--json",
                                  *(["--draft", draft] if draft else [])])
        assert out.exit_code == 0, out.output
        plans[draft] = {e["type"]: e["prediction"]["memory"] for e in json.loads(out.output)["entries"]}
    alone, with_q2k = plans[None]["Q8_0"], plans["Q2_K"]["Q8_0"]
    q2k = plans[None]["Q2_K"]
    assert with_q2k["draft"] == q2k["peak_bytes"] - q2k["runtime"] and with_q2k["peak_bytes"] == alone["peak_bytes"] + with_q2k["draft"]
    assert plans["Q2_K"]["Q2_K"]["draft"] == 0  # no variant is planned as its own draft
    assert plans[NGRAM]["Q8_0"] == alone
