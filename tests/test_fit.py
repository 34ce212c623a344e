"""`quantize --fit DEVICE` / `--target-size` / `--target-bpw`: one GGUF whose per-tensor types are
chosen by measured drift to fill a budget (quant/fit.py), on the real quantizer and llama.cpp.

CI builds only the smallest case: the llama3 zoo model (random weights from the real layout, rows
of 256, so every k-quant applies) with a bounded number of probes. The comparison with the
standard types at equal size is a benchmark (hwbench/bench/bench_fit.py), not a test.
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from edgecds.atomic import TEMP_MARK
from edgecds.cli import cli
from edgecds.formats.gguf_file import read_gguf
from edgecds.formats.types import GGML_TYPE_BY_NAME, is_fitted
from edgecds.variants import load_variants

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
BUILDS = "9"  # the all-Q8_0 probe and one other type for each of the model's eight groups


@pytest.fixture(scope="module")
def zoo_llama(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edgecds.quant.zoo import build, find_family

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGECDS_HOME", str(model_store))
        return build(find_family("llama3"), model_store / "models" / "smollm2-135m-instruct" / "hf")


def quantize(*args: str) -> Any:
    return CliRunner().invoke(cli, ["quantize", *args, "--quiet"])


@pytest.fixture(scope="module")
def fitted(zoo_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float, dict[str, Any]]:
    """The standard types, then a fit to the bits per weight halfway between Q4_K_M and Q5_K_M."""
    out = tmp_path_factory.mktemp("fit")
    standard = quantize(str(zoo_llama), "-o", str(out), "--types", "F16,Q8_0,Q4_K_M,Q5_K_M", "--json")
    assert standard.exit_code == 0, standard.output
    bits = {v["type"]: v["bits_per_weight"] for v in json.loads(standard.stdout)["variants"]}
    target = round((bits["Q4_K_M"] + bits["Q5_K_M"]) / 2, 2)
    result = quantize(str(zoo_llama), "-o", str(out), "--target-bpw", str(target), "--fit-builds", BUILDS, "--fit-chunks", "1", "--json")
    assert result.exit_code == 0, result.output
    return out, target, json.loads(result.stdout)


def test_the_fit_mixes_types_within_the_target_and_records_each_tensor(fitted: tuple[Path, float, dict[str, Any]]) -> None:
    out, target, result = fitted
    [fit] = [v for v in result["variants"] if is_fitted(v["type"])]
    info = read_gguf(out / fit["path"])
    record = fit["options"]["fit"]
    # recorded per tensor, exactly as the file holds them
    assert record["tensors"] == {t.name: t.type_name for t in info.tensors}
    assert fit["tensor_types"] == info.tensor_type_counts()
    assert info.bits_per_weight <= target < info.bits_per_weight + 1.0
    assert fit["type"] == f"FIT-{info.bits_per_weight:.2f}"
    chosen = set(record["groups"].values())
    assert len(chosen) >= 2, f"one type for every group is not a mix: {record['groups']}"
    # the patterns address every layer's tensor of a group, and only it
    assert record["patterns"]["^blk\\.\\d+\\.attn_q\\.weight$"] == record["groups"]["attn_q.weight"]
    assert 1 <= record["probe_builds"] <= int(BUILDS) and record["max_builds"] == int(BUILDS)
    # every group's cost was measured for the top type and at least one other
    assert all(len(costs) >= 2 and costs["Q8_0"]["kl"] == 0 for costs in record["costs"].values())
    # what the search weighed, per group: the chosen type's bytes are what the file holds for it
    embd = next(t for t in info.tensors if t.name == "token_embd.weight")
    assert record["costs"]["token_embd.weight"][record["groups"]["token_embd.weight"]]["bytes"] == embd.n_bytes
    assert 0 < record["measured"]["kl_mean"] < 1 and record["predicted_kl"] > 0
    assert record["measured"]["tokens_scored"] == 255  # one chunk: its second half, as llama-perplexity scores


def test_the_same_fit_is_reused(fitted: tuple[Path, float, dict[str, Any]], zoo_llama: Path) -> None:
    out, target, result = fitted
    [fit] = [v for v in result["variants"] if is_fitted(v["type"])]
    again = quantize(str(zoo_llama), "-o", str(out), "--target-bpw", str(target), "--fit-builds", BUILDS, "--fit-chunks", "1", "--json")
    assert again.exit_code == 0, again.output
    [reused] = [v for v in json.loads(again.stdout)["variants"] if is_fitted(v["type"])]
    assert reused["reused"] and reused["sha256"] == fit["sha256"]


def test_another_target_reuses_the_probes(fitted: tuple[Path, float, dict[str, Any]], zoo_llama: Path) -> None:
    """The probes of a folder are kept (fit-probes.json): a target that probes the same mixes builds only the all-Q8_0 one."""
    out, target, _ = fitted
    again = quantize(str(zoo_llama), "-o", str(out), "--target-bpw", str(target - 0.01), "--fit-builds", BUILDS, "--fit-chunks", "1", "--json")
    assert again.exit_code == 0, again.output
    [fit] = [v for v in json.loads(again.stdout)["variants"] if is_fitted(v["type"])]
    assert fit["options"]["fit"]["target"] == {"bpw": target - 0.01}
    assert (fit["options"]["fit"]["probe_builds"], fit["options"]["fit"]["probes_reused"]) == (1, 8)


def _profile(folder: Path, budget_mib: float) -> str:
    """A device whose budget is `budget_mib`: 0.5 GiB less a reserve."""
    folder.mkdir(exist_ok=True)
    reserve = round(0.5 - budget_mib / 1024, 4)
    (folder / "tiny-test-device.toml").write_text(f"""id = "tiny-test-device"
name = "a device with {budget_mib:.0f} MiB for the model"
class = "cpu"
power_mode = "n/a"
[memory]
kind = "system"
total_gib = 0.5
reserve_gib = {reserve}
bandwidth_gbs = 10.0
[compute]
cpu_cores = 2
cpu_isa = "x86-avx2"
cpu_gflops_fp32 = 100.0
[runtime]
backends = ["cpu"]
formats = ["gguf"]
default_ctx = 512
max_ctx = 2048
[sources]
"memory.total_gib" = "a test's device"
"memory.reserve_gib" = "a test's device"
"memory.bandwidth_gbs" = "a test's device"
"compute.cpu_cores" = "a test's device"
"compute.cpu_gflops_fp32" = "a test's device"
"compute.cpu_isa" = "a test's device"
""")
    return "tiny-test-device"


def _plan(out: Path, profiles: Path) -> dict[str, Any]:
    result = CliRunner().invoke(cli, ["plan", "--device", "tiny-test-device", str(out), "--profiles-dir", str(profiles), "--json"])
    assert result.exit_code in (0, 1), result.output
    return {e["type"]: e for e in json.loads(result.stdout)["entries"]}


def test_a_device_fit_fills_the_budget_the_predictor_gives(fitted: tuple[Path, float, dict[str, Any]], zoo_llama: Path, tmp_path: Path) -> None:
    out, _, _ = fitted
    profiles = tmp_path / "profiles"
    _profile(profiles, 300)
    peaks = {t: e["prediction"]["memory"]["peak_bytes"] for t, e in _plan(out, profiles).items() if e["prediction"]}
    # between the 4-5-bit types and Q8_0 (on this model the embedding is most of the file, so
    # Q4_K_M and Q5_K_M, which both keep it at Q6_K, are within a MiB of each other)
    budget = (max(peaks["Q4_K_M"], peaks["Q5_K_M"]) + peaks["Q8_0"]) / 2 / 2**20
    device = _profile(profiles, budget)
    result = quantize(str(zoo_llama), "-o", str(out), "--fit", device, "--ctx", "512", "--profiles-dir", str(profiles),
                      "--fit-builds", BUILDS, "--fit-chunks", "1", "--json")
    assert result.exit_code == 0, result.output
    [fit] = [v for v in json.loads(result.stdout)["variants"] if is_fitted(v["type"]) and v["options"]["fit"]["target"].get("device_id")]
    entries = _plan(out, profiles)
    # plan predicts the fitted file from its header like any other: it fits, and puts more bytes into
    # weights than the standard types that fit (its peak may not be higher: llama.cpp repacks Q4_K
    # on this CPU profile, which Q4_K_M pays for and a mix without Q4_K does not)
    entry = entries[fit["type"]]
    assert entry["prediction"]["fits"], entry
    assert entry["prediction"]["memory"]["peak_bytes"] <= budget * 2**20
    assert entry["file_bytes"] > max(entries["Q4_K_M"]["file_bytes"], entries["Q5_K_M"]["file_bytes"])
    assert fit["options"]["fit"]["predicted_peak_bytes"] == entry["prediction"]["memory"]["peak_bytes"]
    assert not entries["Q8_0"]["prediction"]["fits"]


def test_targets_that_cannot_be_met_say_what_to_do(fitted: tuple[Path, float, dict[str, Any]], zoo_llama: Path, tmp_path: Path) -> None:
    out, _, _ = fitted
    before = load_variants(out).to_dict()
    small = quantize(str(zoo_llama), "-o", str(out), "--target-size", "1MiB", "--fit-builds", BUILDS, "--fit-chunks", "1")
    assert small.exit_code == 2 and "does not fit 1.0 MiB" in small.output and "Traceback" not in small.output
    large = quantize(str(zoo_llama), "-o", str(out), "--target-size", "10GiB", "--fit-builds", BUILDS, "--fit-chunks", "1")
    assert large.exit_code == 2 and "nothing to fit" in large.output and "--types Q8_0" in large.output
    few = quantize(str(zoo_llama), "-o", str(out), "--target-bpw", "4", "--fit-builds", "3")
    assert few.exit_code == 2 and "give at least 9" in few.output
    assert "--ctx goes with --fit" in quantize(str(zoo_llama), "-o", str(out), "--ctx", "512").output
    both = quantize(str(zoo_llama), "-o", str(out), "--target-bpw", "4", "--target-size", "9MiB")
    assert both.exit_code == 2 and "give one fit target" in both.output
    assert "not a size" in quantize(str(zoo_llama), "-o", str(out), "--target-size", "lots").output
    quantized = next(out.glob("*-Q4_K_M.gguf"))
    refused = quantize(str(quantized), "-o", str(tmp_path), "--target-bpw", "4")
    assert refused.exit_code == 2 and "already quantized" in refused.output
    # nothing half-built was left or recorded
    assert not [p for p in out.iterdir() if TEMP_MARK in p.name] and load_variants(out).to_dict() == before


def test_the_search_is_exact() -> None:
    """The dynamic programme against every assignment, on random small instances."""
    from edgecds.quant.fit import Choice, cheapest

    kinds = [GGML_TYPE_BY_NAME[n] for n in ("Q2_K", "Q4_K", "Q8_0")]
    rng = random.Random(7)
    for _ in range(50):
        options = {f"g{i}": [Choice(k, rng.randint(1, 1000) * (j + 1), rng.random() * (2 - j)) for j, k in enumerate(kinds)] for i in range(4)}
        allowed = rng.randint(500, 6000)
        feasible = [combo for combo in itertools.product(*options.values()) if sum(c.n_bytes for c in combo) <= allowed]
        found = cheapest(options, allowed)
        if not feasible:
            assert found is None
            continue
        assert found is not None and sum(c.n_bytes for c in found.values()) <= allowed
        assert sum(c.cost for c in found.values()) == pytest.approx(min(sum(c.cost for c in combo) for combo in feasible))


def test_bundle_and_report_take_a_fitted_variant_like_any_other(fitted: tuple[Path, float, dict[str, Any]], tmp_path: Path) -> None:
    """Profiled here with a few cases, a fitted variant is a candidate like Q4_K_M; the smallest
    that qualifies is chosen, its card says how it was fitted, and the report marks it."""
    out, _, result = fitted
    [fit] = [v for v in result["variants"] if is_fitted(v["type"])]
    cases = tmp_path / "cases.jsonl"
    cases.write_text("\n".join((ROOT / "toolkit" / "clinical" / "cases-v1.jsonl").read_text().splitlines()[:4]) + "\n")
    profiled = CliRunner().invoke(cli, ["profile", str(out), "--types", f"{fit['type']},Q4_K_M", "--ctx", "512", "-p", "32", "-n", "8",
                                        "-r", "1", "--cases", str(cases), "--drift-chunks", "1", "--json", "-q"])
    assert profiled.exit_code == 0, profiled.output
    device = json.loads(profiled.stdout)["device"]
    made = CliRunner().invoke(cli, ["bundle", str(out / "results.json"), "--device", device, "--prefer", "size", "-o", str(tmp_path / "b"),
                                    "--json"])
    assert made.exit_code == 0, made.output
    assert json.loads(made.stdout[made.stdout.index("{"):])["choice"]["chosen"]["variant"] == fit["type"]
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["model"]["fit"]["groups"] == fit["options"]["fit"]["groups"]
    card = (tmp_path / "b" / "MODEL_CARD.md").read_text()
    assert "## Quantization" in card and "Per-tensor types fitted to a budget (bpw " in card
    page = CliRunner().invoke(cli, ["report", str(out / "results.json"), "-o", str(tmp_path / "r.html")])
    assert page.exit_code == 0, page.output
    html = (tmp_path / "r.html").read_text()
    assert f"{fit['type']}: per-tensor types fitted to a budget by `edgecds quantize --fit` (a star on the charts)" in html
    assert '"star"' in html


def test_each_group_s_pattern_matches_its_tensors_and_no_other(fitted: tuple[Path, float, dict[str, Any]]) -> None:
    """The patterns llama.cpp matches (std::regex_search, as re.search): by role, and with --fit-depth
    by bands of consecutive layers."""
    import re

    from edgecds.quant.fit import weight_groups

    out, _, _ = fitted
    info = read_gguf(next(out.glob("*-F16.gguf")))
    for depth in (1, 2):
        groups = weight_groups(info, depth)
        assert len(groups) == 1 + 7 * depth  # the embedding (tied output), and seven roles in each band
        for g in groups:
            assert {t.name for t in info.tensors if re.search(g.pattern, t.name)} == {t.name for t in g.tensors}, g.pattern
    banded = {g.name: g for g in weight_groups(info, 2)}
    assert [t.name for t in banded["attn_q.weight@2/2"].tensors] == ["blk.1.attn_q.weight"]
