"""`edgecds tune` on the real engine and the default model: candidates measured in fresh
processes, gated on the drift text and the cases against llama.cpp's defaults, the choice recorded,
bundled into runtime.json and run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgecds.bundle.layout import BundleEngineConfig
from edgecds.cli import cli
from edgecds.results import load_results

ROOT = Path(__file__).resolve().parents[1]
# small work: one fresh process per candidate, pp64/tg16, the gate on 8 cases and one chunk of the drift text
QUICK = ["--ctx", "1024", "-r", "1", "-p", "64", "-n", "16", "--case-limit", "8", "--drift-chunks", "1", "-q"]


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


@pytest.fixture
def variants(small_variants: Path) -> Path:
    return small_variants


def test_tune_two_variants_and_the_gate_rejects_a_4_bit_v_cache(variants: Path) -> None:
    code, out = invoke("tune", str(variants), "--types", "Q8_0,Q4_K_M", "--knobs", "cache", "--objective", "memory", *QUICK, "--json")
    assert code == 0, out
    tunings = json.loads(out)["tunings"]
    assert [t["variant"]["type"] for t in tunings] == ["Q8_0", "Q4_K_M"]
    for t in tunings:
        assert t["measured"] == 4 and len(t["candidates"]) == 4  # the defaults and three cache pairs, none pruned
        baseline = t["candidates"][0]
        assert baseline["changed"] == "baseline" and baseline["settings"] == t["baseline"]
        assert (baseline["settings"]["type_k"], baseline["settings"]["type_v"], baseline["settings"]["flash_attn"]) == ("f16", "f16", False)
        four_bit = next(c for c in t["candidates"] if c["settings"]["type_v"] == "q4_0" and c["settings"]["type_k"] == "q4_0")
        assert four_bit["status"] == "rejected" and "accuracy gate" in four_bit["reason"] and four_bit["kl_mean"] > 0.002
        assert four_bit["peak_rss_bytes"] < baseline["peak_rss_bytes"]  # it would have won on memory
        assert t["spec"]["gate"]["drift_tokens"] == 255  # --drift-chunks 1: the second half of one chunk of 512
        assert t["chosen"]["type_v"] != "q4_0"
        assert all(c["decode_tps"] and c["peak_rss_bytes"] for c in t["candidates"])  # each measured, not predicted
    results = load_results(variants / "results.json")
    assert results is not None and {t.variant.type for t in results.tunings} == {"Q8_0", "Q4_K_M"}


def test_the_chosen_settings_reach_the_bundle_and_run_uses_them(variants: Path, tmp_path: Path) -> None:
    cases = tmp_path / "cases.jsonl"
    cases.write_text("\n".join((ROOT / "toolkit" / "clinical" / "cases-v1.jsonl").read_text().splitlines()[:4]) + "\n")
    code, out = invoke("profile", str(variants), "--types", "Q4_K_M", "--ctx", "1024", "-p", "32", "-n", "8", "-r", "1", "--cases", str(cases),
                       "--drift-chunks", "1", "--json", "-q")
    assert code == 0, out
    device = json.loads(out)["device"]
    # the gate opened wide: the least memory wins, which is the 4-bit K and V cache
    code, out = invoke("tune", str(variants), "--types", "Q4_K_M", "--knobs", "cache", "--objective", "memory", "--max-kl", "1",
                       "--max-flips", "1", *QUICK, "--json")
    assert code == 0, out
    chosen = json.loads(out)["tunings"][0]["chosen"]
    assert (chosen["type_k"], chosen["type_v"], chosen["flash_attn"]) == ("q4_0", "q4_0", True)
    code, out = invoke("bundle", str(variants / "results.json"), "--device", device, "-o", str(tmp_path / "bundle"), "--json", "-q")
    assert code == 0, out
    runtime = BundleEngineConfig.read(tmp_path / "bundle")
    engine = runtime.engine_settings()
    for name in ("type_k", "type_v", "flash_attn", "threads", "n_batch", "n_ubatch", "n_gpu_layers"):
        assert getattr(engine, name) == chosen[name], name
    code, out = invoke("run", str(tmp_path / "bundle"), "--prompt", "A child has a barking cough and stridor. What is the most likely diagnosis?",
                       "--max-tokens", "8")
    assert code == 0, out
