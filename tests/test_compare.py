"""`edgecds compare` on made-up results with hand-checked exact McNemar and Holm figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgecds.cli import cli
from edgecds.compare import compare
from edgecds.errors import UsageError
from tests.test_choice import Spec, write_results

# F16 right on cases 0-31; Q8_0 loses 0-9 and gains 32 (right on 10-32); Q4_0 loses 0-11 (right on 12-31)
SPECS = [Spec("F16"), Spec("Q8_0", lost=10, gained=1), Spec("Q4_0", lost=12)]


def _by_pair(result: object) -> dict[tuple[str, str], object]:
    return {(c.first.split(" ")[0], c.second.split(" ")[0]): c for c in result.comparisons}  # type: ignore[attr-defined]


def test_every_pair_is_tested_exactly_and_holm_adjusted(tmp_path: Path) -> None:
    result = compare([write_results(tmp_path / "results.json", SPECS)], alpha=0.01)
    pairs = _by_pair(result)
    assert set(pairs) == {("m-F16", "m-Q8_0"), ("m-F16", "m-Q4_0"), ("m-Q8_0", "m-Q4_0")}
    f16_q8, f16_q4, q8_q4 = pairs["m-F16", "m-Q8_0"], pairs["m-F16", "m-Q4_0"], pairs["m-Q8_0", "m-Q4_0"]
    assert (f16_q8.lost, f16_q8.gained, f16_q4.lost, f16_q4.gained, q8_q4.lost, q8_q4.gained) == (10, 1, 12, 0, 3, 0)
    # exact McNemar: 2 P(X <= 1), X ~ Bin(11, 1/2) = 2 x 12 / 2048; 2 / 2^12; 2 / 2^3
    assert f16_q8.p_value == pytest.approx(24 / 2048) and f16_q4.p_value == pytest.approx(2 / 4096) and q8_q4.p_value == pytest.approx(0.25)
    # Holm over the three: 3 x 0.000488, 2 x 0.01172, 1 x 0.25
    assert (f16_q4.p_holm, f16_q8.p_holm, q8_q4.p_holm) == (pytest.approx(6 / 4096, abs=1e-6), pytest.approx(48 / 2048, abs=1e-6), 0.25)
    assert f16_q4.verdict == "worse at 0.01" and f16_q8.verdict == "no difference shown" and q8_q4.verdict == "no difference shown"
    assert f16_q4.difference == pytest.approx(-12 / 155, abs=1e-4) and f16_q4.low < f16_q4.difference < f16_q4.high < 0
    looser = _by_pair(compare([tmp_path / "results.json"], alpha=0.05))
    assert looser["m-F16", "m-Q8_0"].verdict == "worse at 0.05"  # adjusted 0.0234 < 0.05
    assert all(c.group.startswith(("specialty: ", "incidence: ")) for c in result.subgroups) and len(result.subgroups) == 6


def test_two_models_from_two_files_are_paired_on_the_cases_they_share(tmp_path: Path) -> None:
    base = write_results(tmp_path / "base.json", [Spec("F16")])
    distill = write_results(tmp_path / "distill.json", [Spec("F16", lost=8)])
    data = json.loads(distill.read_text())
    data["evaluations"][0]["variant"].update(name="distill-F16", sha256="d" * 64)
    data["evaluations"][0]["per_case"] = data["evaluations"][0]["per_case"][:100]  # the distill saw only 100 of the cases
    distill.write_text(json.dumps(data))
    out = CliRunner().invoke(cli, ["compare", str(base), str(distill), "--json"])
    assert out.exit_code == 0, out.output
    [c] = json.loads(out.stdout)["comparisons"]
    assert c["n"] == 100 and (c["lost"], c["gained"]) == (8, 0) and c["p_value"] == pytest.approx(2 / 256)
    assert c["verdict"] == "worse at 0.01" and json.loads(out.stdout)["correction"] == "Holm"
    table = CliRunner().invoke(cli, ["compare", str(base), str(distill)])
    assert table.exit_code == 0 and "worse at 0.01" in table.output and "distill-F16" in table.output


def test_evaluations_that_share_no_case_or_too_few_are_refused(tmp_path: Path) -> None:
    one = write_results(tmp_path / "one.json", [Spec("F16")])
    with pytest.raises(UsageError, match="compare needs two or more"):
        compare([one])
    other = write_results(tmp_path / "other.json", [Spec("F16")])
    data = json.loads(other.read_text())
    data["evaluations"][0]["variant"]["sha256"] = "e" * 64
    for c in data["evaluations"][0]["per_case"]:
        c["id"] = "other-" + c["id"]
    other.write_text(json.dumps(data))
    result = CliRunner().invoke(cli, ["compare", str(one), str(other)])
    assert result.exit_code != 0 and "share no case" in result.output and "Traceback" not in result.output
    missing = CliRunner().invoke(cli, ["compare", str(tmp_path / "nope.json"), str(one)])
    assert missing.exit_code != 0 and "run `edgecds eval` first" in missing.output


def test_the_report_shows_every_comparison_and_the_subgroups(tmp_path: Path) -> None:
    results = write_results(tmp_path / "results.json", SPECS)
    page = tmp_path / "report.html"
    out = CliRunner().invoke(cli, ["report", str(results), "-o", str(page)])
    assert out.exit_code == 0, out.output
    html = page.read_text()
    section = html[html.index('<section id="comparisons">'):]
    # at the alpha bundle chooses with (0.05 unless --alpha), the one alpha on the page
    assert section.count("<tr>") >= 1 + 3 and "#1 vs #3" in section and "worse at 0.05" in section  # header + three pairs
    assert "worse at 0.01" not in html and "alpha 0.05" in section
    assert "The same by specialty and by incidence" in section and "Holm" in section


def test_two_evaluations_of_one_name_are_told_apart(tmp_path: Path) -> None:
    first = write_results(tmp_path / "a.json", [Spec("F16")])
    second = write_results(tmp_path / "b.json", [Spec("F16", lost=8)])
    data = json.loads(second.read_text())
    data["evaluations"][0]["variant"]["sha256"] = "f" * 64  # another build, the same file name
    second.write_text(json.dumps(data))
    result = compare([first, second])
    assert len(set(result.evaluations)) == 2 and all("(variant " in label for label in result.evaluations)
    out = CliRunner().invoke(cli, ["compare", str(first), str(second)])
    assert out.exit_code == 0 and "#1 vs #2" in out.output


def test_a_results_file_nested_too_deeply_is_a_clear_error(tmp_path: Path) -> None:
    one = write_results(tmp_path / "one.json", [Spec("F16")])
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    result = CliRunner().invoke(cli, ["compare", str(one), str(deep)])
    assert result.exit_code == 1 and "not valid JSON (RecursionError" in result.output and "Traceback" not in result.output
