"""`bundle`'s choice on made-up results files: every rule, fast, without an engine.

The results are built from the same dataclasses `profile` and `eval` write, with answers chosen so
that each rule is the one that decides: accuracies that do not differ (the issue's 32/31/33/34 of
155), a variant significantly worse or better than the reference, disturbed speeds, a peak that
fits only at the short run's tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from edgecds.bundle.choose import FIDELITY_BAND, Constraints, choose
from edgecds.devices import find_profile
from edgecds.results import EvalRecord, HostFingerprint, Measured, MeasurementRecord, ResultsFile, Stat, VariantRef
from edgecds.stats import paired_comparison, wilson_interval

DEVICE = "laptop-x86-16gb"
N = 155
MIB = 2**20


@dataclass(frozen=True)
class Spec:
    type: str
    lost: int = 0  # cases right with the reference, wrong here
    gained: int = 0  # wrong with the reference, right here
    kl: float = 0.0
    decode: float = 100.0
    size_mib: int = 100
    peak_mib: int = 300
    full_peak_mib: int | None = 320
    disturbed: bool = False
    decode_spread: float = 0.0  # the range of the repeats' decode speeds
    drift: bool = True  # eval --no-drift leaves none


REFERENCE_RIGHT = 32  # F16: 32 of 155, as in the issue


def answers(spec: Spec) -> list[bool]:
    ref = [i < REFERENCE_RIGHT for i in range(N)]
    out = list(ref)
    for i in range(spec.lost):
        out[i] = False
    for i in range(spec.gained):
        out[REFERENCE_RIGHT + i] = True
    return out


def write_results(path: Path, specs: list[Spec]) -> Path:
    host = HostFingerprint(id="h1", detected_profile=DEVICE, cpu="test cpu", cpu_cores=10, cpu_isa="x86-avx2", ram_gib=16.0,
                           machine="x86_64", gpus=[], gpu_driver=None, jetson=None, l4t_release=None, os="Linux",
                           versions={"edgecds": "test"})
    results = ResultsFile(hosts={"h1": host})
    reference = answers(Spec("F16"))
    for n, spec in enumerate(specs):
        ref = VariantRef(f"m-{spec.type}", spec.type, "gguf", f"m-{spec.type}.gguf", f"{n:064x}", spec.size_mib * MIB)
        disturbance = {"others_cpu_cores": [0.9 if spec.disturbed else 0.01], "threshold_cores": 0.25, "reruns": 2 if spec.disturbed else 0,
                       "disturbed": spec.disturbed}
        measured = Measured(Stat.of([1.0]), Stat.of([spec.peak_mib * MIB]), Stat.of([400.0]),
                            Stat.of([spec.decode - spec.decode_spread / 2, spec.decode, spec.decode + spec.decode_spread / 2]), None, 0, None, None, {},
                            full_context_peak_bytes=spec.full_peak_mib * MIB if spec.full_peak_mib else None, full_context_tokens=4095,
                            disturbance=disturbance)
        results.records.append(MeasurementRecord(ref, DEVICE, True, "h1", {"n_ctx": 4096, "prompt_tokens": 512}, "measured", "",
                                                 {"fits": True}, measured, f"k{n}", "2026-12-01T00:00:00+00:00", 1.0))
        mine = answers(spec)
        right = sum(mine)
        low, high = wilson_interval(right, N)
        c = paired_comparison(reference, mine)
        paired = None if spec.type == "F16" else {"n": N, "lost": c.lost, "gained": c.gained, "flip_rate": c.flip_rate,
                                                  "difference": c.difference, "low": c.low, "high": c.high, "p_value": c.p_value,
                                                  "verdict": c.verdict}
        results.evaluations.append(EvalRecord(
            ref, "h1", {"name": "test", "sha256": "0" * 64, "n": N, "style": "edgecds"}, "loglik", {}, {
                "accuracy": right / N, "low": low, "high": high, "n": N, "correct": right, "errors": {}, "by_specialty": {}},
            "F16", paired, None if not spec.drift else {"tokens_scored": 1020, "kl_mean": spec.kl, "kl_p99": spec.kl * 5, "top1_agreement": 1.0 - spec.kl,
                           "perplexity": 9.1 + spec.kl, "reference_perplexity": 9.1}, [{"id": f"c{i}", "correct": a} for i, a in enumerate(mine)],
            f"e{n}", "2026-12-01T00:00:00+00:00", 1.0))
    results.save(path)
    return path


# The demo: accuracies within each other's intervals; drift as measured on the default model.
NOISE = [
    Spec("F16", kl=0.0, decode=78.5, size_mib=258),
    Spec("Q8_0", lost=3, gained=2, kl=0.0044, decode=102.5, size_mib=138),
    Spec("Q5_K_M", lost=3, gained=4, kl=0.0230, decode=104.0, size_mib=110),
    Spec("Q3_K_M", lost=4, gained=6, kl=0.1414, decode=120.0, size_mib=90),
]


def test_accuracy_that_does_not_differ_does_not_decide(tmp_path: Path) -> None:
    choice = choose([write_results(tmp_path / "r.json", NOISE)], find_profile(DEVICE), Constraints())
    assert choice.chosen is not None and choice.chosen.variant == "Q8_0"  # inside the fidelity band of F16, and faster
    best = min(c.drift_kl for c in [choice.chosen, *choice.rejected] if c.drift_kl is not None)
    assert choice.chosen.drift_kl is not None and choice.chosen.drift_kl <= best + FIDELITY_BAND
    reasons = {c.variant: c.reasons[0] for c in choice.rejected}
    assert reasons["Q3_K_M"].startswith("accuracy not different from Q8_0 (p=") and "drift 0.1414 vs 0.0044" in reasons["Q3_K_M"]
    assert "as faithful" in reasons["F16"] and "slower: 78.5 vs 102.5" in reasons["F16"]
    assert "no qualifier differs significantly" in choice.why


@pytest.mark.parametrize("prefer, expected", [("speed", "Q3_K_M"), ("size", "Q3_K_M"), ("fidelity", "Q8_0")])
def test_prefer_changes_the_order(tmp_path: Path, prefer: str, expected: str) -> None:
    choice = choose([write_results(tmp_path / "r.json", NOISE)], find_profile(DEVICE), Constraints(prefer=prefer))
    assert choice.chosen is not None and choice.chosen.variant == expected


def test_prefer_size_takes_the_smallest_not_the_fastest(tmp_path: Path) -> None:
    specs = [*NOISE[:3], replace(NOISE[3], decode=90.0, size_mib=95), Spec("Q2_K", lost=4, gained=4, kl=0.46, decode=110.0, size_mib=80)]
    path = write_results(tmp_path / "r.json", specs)
    assert choose([path], find_profile(DEVICE), Constraints(prefer="size")).chosen.variant == "Q2_K"  # type: ignore[union-attr]
    assert choose([path], find_profile(DEVICE), Constraints(prefer="speed")).chosen.variant == "Q2_K"  # type: ignore[union-attr]
    assert choose([path], find_profile(DEVICE), Constraints(prefer="fidelity")).chosen.variant == "Q8_0"  # type: ignore[union-attr]


def test_significantly_worse_is_refused_unless_allowed(tmp_path: Path) -> None:
    specs = [NOISE[0], Spec("Q2_K", lost=20, gained=0, kl=0.46, decode=150.0, size_mib=60)]
    path = write_results(tmp_path / "r.json", specs)
    choice = choose([path], find_profile(DEVICE), Constraints(prefer="speed"))
    assert choice.chosen is not None and choice.chosen.variant == "F16"
    q2 = next(c for c in choice.rejected if c.variant == "Q2_K")
    assert q2.reasons[0].startswith("significantly worse than F16 (McNemar p = ")
    allowed = choose([path], find_profile(DEVICE), Constraints(prefer="speed", allow_significantly_worse=True))
    assert allowed.chosen is not None and allowed.chosen.variant == "Q2_K"
    # a stricter alpha, as the paired distill study used: 8 lost of 8 flips is p=0.0078 < 0.01, 6 of 6 is p=0.031
    six = write_results(tmp_path / "six.json", [NOISE[0], Spec("Q2_K", lost=6, kl=0.46, decode=150.0)])
    assert choose([six], find_profile(DEVICE), Constraints(prefer="speed")).chosen.variant == "F16"  # type: ignore[union-attr]
    assert choose([six], find_profile(DEVICE), Constraints(prefer="speed", alpha=0.01)).chosen.variant == "Q2_K"  # type: ignore[union-attr]


def test_significantly_better_wins_and_says_so(tmp_path: Path) -> None:
    specs = [*NOISE, Spec("Q6_K", lost=0, gained=12, kl=0.0098, decode=95.0, size_mib=120)]
    choice = choose([write_results(tmp_path / "r.json", specs)], find_profile(DEVICE), Constraints(prefer="speed"))
    assert choice.chosen is not None and choice.chosen.variant == "Q6_K"
    assert choice.why.startswith("significantly better than its reference (p=")
    assert all("is significantly better than its reference" in c.reasons[0] for c in choice.rejected)


def test_max_drop_is_held_against_the_lower_bound_of_the_difference(tmp_path: Path) -> None:
    path = write_results(tmp_path / "r.json", NOISE)
    # Q8_0's point difference is -0.6 points, but its interval reaches several points down
    choice = choose([path], find_profile(DEVICE), Constraints(max_drop=0.02))
    q8 = next(c for c in [choice.chosen, *choice.rejected] if c is not None and c.variant == "Q8_0")
    assert q8.reasons and q8.reasons[0].startswith("may drop up to ") and "95% lower bound" in q8.reasons[0]
    assert choice.chosen is not None and choice.chosen.variant == "F16"  # the reference cannot drop against itself


def test_disturbed_speeds_are_not_held_to_min_decode(tmp_path: Path) -> None:
    specs = [NOISE[0], replace(NOISE[1], decode=3.4, disturbed=True)]
    path = write_results(tmp_path / "r.json", specs)
    choice = choose([path], find_profile(DEVICE), Constraints(min_decode_tps=50))
    q8 = next(c for c in choice.rejected if c.variant == "Q8_0")
    assert "measured while other processes used the CPU" in q8.reasons[0] and q8.disturbed
    assert choice.chosen is not None and choice.chosen.variant == "F16"
    told = choose([path], find_profile(DEVICE), Constraints(min_decode_tps=50, allow_disturbed=True))
    assert any(r.startswith("too slow: 3.4") for c in told.rejected for r in c.reasons)


def test_the_budget_is_held_against_the_full_context_peak(tmp_path: Path) -> None:
    device = find_profile(DEVICE)
    budget_mib = device.budget_gib * 1024
    specs = [replace(NOISE[0], peak_mib=int(budget_mib) - 100, full_peak_mib=int(budget_mib) + 100), NOISE[1]]
    choice = choose([write_results(tmp_path / "r.json", specs)], device, Constraints())
    f16 = next(c for c in [choice.chosen, *choice.rejected] if c is not None and c.variant == "F16")
    assert f16.full_context and f16.reasons and f16.reasons[0].startswith("too big by 100 MB")
    # without a full-context figure (older results) the short run's peak is what there is, and the table says so
    older = [replace(NOISE[0], peak_mib=int(budget_mib) - 100, full_peak_mib=None), NOISE[1]]
    choice = choose([write_results(tmp_path / "old.json", older)], device, Constraints())
    f16 = next(c for c in [choice.chosen, *choice.rejected] if c is not None and c.variant == "F16")
    assert not f16.full_context and not any("too big" in r for r in f16.reasons)


def test_allow_predicted_never_stands_in_for_a_failed_measurement(tmp_path: Path) -> None:
    path = write_results(tmp_path / "r.json", NOISE[:2])
    from edgecds.results import load_results

    results = load_results(path)
    assert results is not None
    q8 = next(r for r in results.records if r.variant.type == "Q8_0")
    failed = replace(q8, status="failed", reason="killed by SIGKILL (out of memory?)", measured=None, predicted={"fits": True,
                     "peak_bytes": 100 * MIB, "decode_tps": 500.0}, key="failed")
    results.records = [r for r in results.records if r is not q8] + [failed]
    results.save(path)
    choice = choose([path], find_profile(DEVICE), Constraints(allow_predicted=True, prefer="speed"))
    assert choice.chosen is not None and choice.chosen.variant == "F16"
    rejected = next(c for c in choice.rejected if c.variant == "Q8_0")
    assert rejected.reasons[0].startswith(f"its measurement on {DEVICE} failed (killed by SIGKILL")


@pytest.mark.parametrize("field, value", [("accuracy", "high"), ("low", None), ("kl_mean", "0.1"), ("p_value", [1])])
def test_results_with_figures_of_the_wrong_type_are_refused_by_name(tmp_path: Path, field: str, value: object) -> None:
    import json

    from click.testing import CliRunner

    from edgecds.cli import cli

    path = write_results(tmp_path / "r.json", NOISE[:2])
    data = json.loads(path.read_text())
    where = "drift" if field == "kl_mean" else "paired" if field == "p_value" else "metrics"
    data["evaluations"][1][where][field] = value
    path.write_text(json.dumps(data))
    for command in (["bundle", str(path), "--device", DEVICE, "-o", str(tmp_path / "b")], ["report", str(path), "-o", str(tmp_path / "r.html")]):
        result = CliRunner().invoke(cli, command)
        assert result.exit_code == 1 and f"evaluations[1].{where}.{field} must be a number" in result.output, result.output
        assert "Traceback" not in result.output


def test_an_output_that_cannot_be_written_is_a_message_not_a_traceback(tmp_path: Path) -> None:
    """A file standing where the output folder should be (as a read-only or full disk would, for
    root too): report and keygen say what to do."""
    from click.testing import CliRunner

    from edgecds.cli import cli

    path = write_results(tmp_path / "r.json", NOISE)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file")
    for command in (["report", str(path), "-o", str(blocker / "report.html")], ["keygen", str(blocker / "key.pem")]):
        result = CliRunner().invoke(cli, command)
        assert result.exit_code == 1 and f"could not write {blocker}" in result.output, result.output
        assert "Traceback" not in result.output and "choose another name" in result.output


def test_speeds_within_the_runs_spread_are_equal_and_the_smaller_wins(tmp_path: Path) -> None:
    """The demo once had Q8_0 at 172.9 and Q6_K at 172.8 tokens/s, each with a spread of about 12:
    0.1 tokens/s of noise must not decide between them."""
    specs = [Spec("F16", decode=120.8, size_mib=258), Spec("Q8_0", lost=1, kl=0.0044, decode=172.9, decode_spread=13.2, size_mib=138),
             Spec("Q6_K", lost=1, kl=0.0100, decode=172.8, decode_spread=10.8, size_mib=132)]
    choice = choose([write_results(tmp_path / "r.json", specs)], find_profile(DEVICE), Constraints())
    assert choice.chosen is not None and choice.chosen.variant == "Q6_K"
    q8 = next(c for c in choice.rejected if c.variant == "Q8_0")
    assert "as fast within the runs' spread, larger file: 138 vs 132 MiB" in q8.reasons[0]
    tight = [specs[0], replace(specs[1], decode_spread=0.0), replace(specs[2], decode_spread=0.0)]
    assert choose([write_results(tmp_path / "t.json", tight)], find_profile(DEVICE), Constraints()).chosen.variant == "Q8_0"  # type: ignore[union-attr]


def test_without_drift_the_fewest_flipped_answers_are_the_most_faithful(tmp_path: Path) -> None:
    specs = [Spec("F16", decode=78.5, drift=False), Spec("Q8_0", lost=3, gained=2, decode=102.5, drift=False),
             Spec("Q4_K_M", lost=1, gained=1, decode=101.0, drift=False)]
    choice = choose([write_results(tmp_path / "r.json", specs)], find_profile(DEVICE), Constraints())
    assert choice.chosen is not None and choice.chosen.variant == "F16"  # 0 flips: the reference itself
    reasons = {c.variant: c.reasons[0] for c in choice.rejected}
    assert "less faithful: drift not measured vs 0.0000, 2 vs 0 flipped answers" in reasons["Q4_K_M"]


def test_min_accuracy_holds_the_lower_bound_unless_on_point(tmp_path: Path) -> None:
    path = write_results(tmp_path / "r.json", NOISE)  # 32, 31, 33 and 34 right of 155
    bound = choose([path], find_profile(DEVICE), Constraints(min_accuracy=0.205))
    assert bound.chosen is None  # every lower 95% bound is near 15%
    assert all(any("accuracy's lower 95% bound" in r for r in c.reasons) for c in bound.rejected)
    point = choose([path], find_profile(DEVICE), Constraints(min_accuracy=0.205, on_point=True))
    reasons = {c.variant: c.reasons for c in point.rejected}
    assert reasons["Q8_0"] == ("accuracy 20.0% below the minimum 20.5%",)  # 31/155
    assert point.chosen is not None and point.chosen.variant == "F16"  # 20.6%; Q5_K_M and Q3_K_M drift more


def test_max_flip_rate_rejects_variants_that_flip_more(tmp_path: Path) -> None:
    path = write_results(tmp_path / "r.json", NOISE)  # flips: Q8_0 5, Q5_K_M 7, Q3_K_M 10 of 155
    assert choose([path], find_profile(DEVICE), Constraints(prefer="speed")).chosen.variant == "Q3_K_M"  # type: ignore[union-attr]
    choice = choose([path], find_profile(DEVICE), Constraints(prefer="speed", max_flip_rate=0.04))
    reasons = {c.variant: c.reasons for c in choice.rejected}
    assert reasons["Q3_K_M"] == ("flip rate 6.5% above 4.0%",) and reasons["Q5_K_M"] == ("flip rate 4.5% above 4.0%",)
    assert choice.chosen is not None and choice.chosen.variant == "Q8_0"  # 3.2%, and faster than F16


def test_formats_limits_the_choice_to_the_engines_asked_for(tmp_path: Path) -> None:
    path = write_results(tmp_path / "r.json", NOISE)
    data = json.loads(path.read_text())
    for item in data["records"] + data["evaluations"]:
        if item["variant"]["type"] == "Q8_0":
            item["variant"].update(type="ONNX_INT8", format="onnx")
    path.write_text(json.dumps(data))
    both = choose([path], find_profile(DEVICE), Constraints())
    assert both.chosen is not None and (both.chosen.variant, both.chosen.format) == ("ONNX_INT8", "onnx")
    gguf = choose([path], find_profile(DEVICE), Constraints(formats=("gguf",)))
    assert gguf.chosen is not None and gguf.chosen.format == "gguf"
    assert any(c.variant == "ONNX_INT8" and any("onnx" in r for r in c.reasons) for c in gguf.rejected)
