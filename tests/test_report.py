"""`edgecds report` on real profile results of the default model, opened in headless Chromium.

The page must draw one point per variant in each chart, make no network request at all (it is
opened with the network untouched: any request would show), show hostile text from results.json
as text, and the terminal tables of profile, plan and bundle must fit 100 columns. A screenshot is
saved to test-artifacts/report.png.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from edgecds.bundle.choose import Constraints, choose
from edgecds.cli import cli
from edgecds.devices import find_profile
from edgecds.quant.quantize import QuantizeResult
from edgecds.report import Point, escape, pareto

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("EDGECDS_ARTIFACTS", ROOT / "test-artifacts"))
TYPES = ("Q8_0", "Q4_K_M", "Q2_K")
# markup a results file could carry: it must reach the page as text, and fetch nothing (TEST-NET address)
HOSTILE = '<img src="http://198.51.100.7/x.png"><script>fetch("http://198.51.100.7/y")</script>'
HOSTILE_TYPE = 'Q2_K<a href="http://198.51.100.7/z">x</a>'  # Plotly reads tags in its text: this must stay text
# Debian's chromium with the flags that keep it off the network (env notes: no background fetches)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync",
                 "--proxy-server=http://127.0.0.1:9"]  # a dead loopback port: even a broken page reaches nothing


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def results(default_variants: QuantizeResult, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Real profile results: three variants, two fresh processes each, accuracy on 6 cases."""
    folder = tmp_path_factory.mktemp("report") / "variants"
    shutil.copytree(default_variants.output_dir, folder)
    cases = folder.parent / "cases.jsonl"
    cases.write_text("\n".join((ROOT / "toolkit" / "clinical" / "cases-v1.jsonl").read_text().splitlines()[:6]) + "\n")
    code, out = invoke("profile", str(folder), "--types", ",".join(TYPES), "--ctx", "512", "-p", "32", "-n", "8", "-r", "2",
                       "--cases", str(cases), "--drift-chunks", "1", "-q")
    assert code == 0, out
    yield folder / "results.json"
    shutil.rmtree(folder.parent, ignore_errors=True)


def chromium() -> str:
    path = os.environ.get("EDGECDS_CHROMIUM") or shutil.which("chromium")
    assert path, "no chromium: `make test` installs Debian's chromium package (or set EDGECDS_CHROMIUM)"
    return path


# every chart has drawn its chosen point (the last trace Plotly adds): drawing is done
CHARTS_DRAWN = """() => { const charts = document.querySelectorAll('.js-plotly-plot');
    return charts.length > 0 && Array.from(charts).every(gd => gd.querySelector('g.trace.tracechosen path.point')); }"""
# records what the page's Content-Security-Policy blocked
CSP_WATCH = """window.__blocked = [];
document.addEventListener('securitypolicyviolation', e => window.__blocked.push(e.blockedURI + ' ' + e.violatedDirective));"""


def open_in_chromium(page_file: Path, screenshot: Path, width: int = 1280) -> dict[str, Any]:
    """Load the page from disk in a window `width` pixels wide; what it requested, what the charts
    drew, its text and its size."""
    from playwright.sync_api import sync_playwright

    requests: list[str] = []
    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": 900})
            page.on("request", lambda r: requests.append(r.url))
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(page_file.as_uri())
            page.wait_for_function(CHARTS_DRAWN, timeout=30_000)
            charts = page.evaluate("""() => Array.from(document.querySelectorAll('.js-plotly-plot')).map(gd => ({
                id: gd.id,
                drawn: Object.fromEntries(Array.from(gd.querySelectorAll('g.trace')).map(t =>
                    [t.getAttribute('class').split(' ').pop(), t.querySelectorAll('path.point').length])),
                labels: Array.from(gd.querySelectorAll('g.trace g.textpoint text')).map(t => t.textContent),
                links: gd.querySelectorAll('a').length,
                hover: gd.data.filter(d => d.uid.startsWith('variants-')).flatMap(d => d.hovertext),
                shapes: (gd.layout.shapes || []).map(s => s.x0),
                annotations: (gd.layout.annotations || []).map(a => a.text),
                xaxis: {type: gd._fullLayout.xaxis.type, range: gd._fullLayout.xaxis.range},
                x: gd.data.filter(d => d.uid.startsWith('variants-')).flatMap(d => d.x),
            }))""")
            size = page.evaluate("""() => ({width: document.documentElement.scrollWidth, height: document.documentElement.scrollHeight,
                toolbars: document.querySelectorAll('.modebar').length,
                folded: Array.from(document.querySelectorAll('#comparisons details')).filter(d => !d.open).length})""")
            text = page.evaluate("() => document.body.innerText")
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return {"requests": requests, "errors": errors, "charts": charts, "text": text, "size": size}


def test_report_draws_every_variant_offline_in_chromium(results: Path, tmp_path: Path) -> None:
    data = json.loads(results.read_text())
    for host in data["hosts"].values():
        host["cpu"] = HOSTILE
    for item in data["records"] + data["evaluations"]:
        if item["variant"]["type"] == "Q2_K":
            item["variant"]["type"] = HOSTILE_TYPE
    shown = [HOSTILE_TYPE if t == "Q2_K" else t for t in TYPES]
    hostile = tmp_path / "results.json"
    hostile.write_text(json.dumps(data))
    page_file = tmp_path / "report.html"
    code, out = invoke("report", str(hostile), "-o", str(page_file), "--json")
    assert code == 0, out
    made = json.loads(out)
    device = data["records"][0]["device"]
    assert made["devices"] == [device] and made["points"] == {device: len(TYPES)}
    html = page_file.read_text()
    assert html.count("<script") == 1 + 2 * len(made["devices"])  # plotly.js inline, then one per chart; no script comes from data

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    seen = open_in_chromium(page_file, ARTIFACTS / "report.png")
    assert seen["requests"] == [page_file.as_uri()], f"the page made network requests: {seen['requests']}"
    assert seen["errors"] == []
    assert (ARTIFACTS / "report.png").stat().st_size > 20_000

    choice = choose([hostile], find_profile(device), Constraints())
    assert choice.chosen is not None
    budget_mib = find_profile(device).budget_gib * 1024
    memory_chart, speed_chart = seen["charts"]
    for chart in (memory_chart, speed_chart):
        assert chart["drawn"]["tracevariants-gguf"] == len(TYPES), chart  # one point per variant
        assert chart["drawn"]["tracechosen"] == 1 and sorted(chart["labels"]) == sorted(shown) and chart["links"] == 0
        for reject in choice.rejected:  # each rejected variant says why on hover
            assert any(escape(reject.variant) in h and escape(reject.reasons[0]) in h for h in chart["hover"]), (reject, chart["hover"])
    # the memory axis spans the points, not the far budget (which once squashed them into a tenth of
    # the width on a log axis): the budget is said at the right edge
    assert memory_chart["xaxis"]["type"] == "linear" and max(memory_chart["x"]) >= 0.7 * memory_chart["xaxis"]["range"][1]
    assert budget_mib > memory_chart["xaxis"]["range"][1] and memory_chart["shapes"] == [] and speed_chart["shapes"] == []
    assert memory_chart["annotations"] == [f"budget {budget_mib / 1024:.1f} GiB (beyond the chart) →"]
    assert seen["size"]["toolbars"] == 0 and seen["size"]["folded"] == 1  # no tool bar over the titles; comparisons folded
    assert "alpha 0.05" in seen["text"] and "alpha 0.01" not in seen["text"]  # the alpha bundle chooses with, only
    text = seen["text"]
    assert HOSTILE in text and HOSTILE_TYPE in text  # shown as text, not run
    assert f"{choice.chosen.variant}\tgguf" in text and "CHOSEN" in text
    for reject in choice.rejected:
        assert reject.reasons[0] in text
    for heading in ("Accuracy by specialty", "Accuracy by incidence", "KL", "top-1", "Measured on", "median ±half-range"):
        assert heading in text

    phone = open_in_chromium(page_file, ARTIFACTS / "report-390.png", width=390)  # a phone's width
    assert phone["errors"] == [] and phone["size"]["width"] <= 390, phone["size"]  # nothing wider than the screen: tables scroll in their box
    # measured 3,828 px against 2,131 at 1,280 px wide: the comparisons folded, the charts stacked
    assert phone["size"]["height"] < 2 * seen["size"]["height"], (phone["size"], seen["size"])


def test_the_content_security_policy_blocks_markup_that_escaped_escaping(results: Path, tmp_path: Path) -> None:
    """The CSP is the second line: markup that got past escaping (here put in the page by hand) still
    fetches nothing. Without the policy Chromium would request both TEST-NET addresses."""
    from playwright.sync_api import sync_playwright

    page_file = tmp_path / "report.html"
    code, out = invoke("report", str(results), "-o", str(page_file))
    assert code == 0, out
    html = page_file.read_text()
    assert 'http-equiv="Content-Security-Policy"' in html
    page_file.write_text(html.replace("<body>", "<body>" + HOSTILE.replace("<script>", "<script>window.__ran = true;"), 1))
    failed: dict[str, str] = {}
    finished: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.add_init_script(CSP_WATCH)
            page.on("requestfinished", lambda r: finished.append(r.url))
            page.on("requestfailed", lambda r: failed.update({r.url: r.failure or ""}))
            page.goto(page_file.as_uri())
            page.wait_for_function(CHARTS_DRAWN, timeout=30_000)
            page.wait_for_function("window.__blocked.length >= 2", timeout=10_000)
            ran, blocked = page.evaluate("() => [window.__ran === true, window.__blocked]")
        finally:
            browser.close()
    assert ran  # the injected script did run: only the policy stood between it and the network
    assert finished == [page_file.as_uri()], (finished, failed)
    assert all(url.startswith("http://198.51.100.7/") and why in ("csp", "net::ERR_BLOCKED_BY_CSP") for url, why in failed.items()), failed
    assert any(b.startswith("http://198.51.100.7/x.png img-src") for b in blocked), blocked
    assert any(b.startswith("http://198.51.100.7/y connect-src") for b in blocked), blocked


def test_terminal_tables_of_profile_plan_and_bundle_fit_100_columns(results: Path, tmp_path: Path) -> None:
    folder = results.parent
    device = json.loads(results.read_text())["records"][0]["device"]
    outputs = [
        invoke("profile", str(folder), "--types", ",".join(TYPES), "--ctx", "512", "-p", "32", "-n", "8", "-r", "2",
               "--cases", str(folder.parent / "cases.jsonl"), "--drift-chunks", "1", "-q"),
        invoke("plan", str(folder), "--device", device),
        invoke("bundle", str(results), "--device", device, "-o", str(tmp_path / "bundle")),
    ]
    for code, out in outputs:
        assert code == 0, out
        table_lines = [line for line in out.splitlines() if any(c in line for c in "┃│┏┗┡└")]
        assert len(table_lines) >= 5 and max(len(line) for line in table_lines) <= 100, out
    profile_out, _, bundle_out = (o for _, o in outputs)
    assert "reused" in profile_out and "Accuracy on" in profile_out  # measured once, by the fixture
    assert "CHOSEN" in bundle_out and all(t in bundle_out for t in TYPES)
    assert bundle_out.count("passed over:") == len(TYPES) - 1  # each reason under the table, not wrapped in a cell


def test_report_errors_say_what_to_do(tmp_path: Path) -> None:
    code, out = invoke("report", str(tmp_path / "nope.json"))
    assert code != 0 and "does not exist" in out
    empty = tmp_path / "results.json"
    empty.write_text(json.dumps({"schema_version": 1, "hosts": {}, "records": [], "evaluations": []}))
    code, out = invoke("report", str(empty))
    assert code == 1 and "run `edgecds profile` first" in out and not (tmp_path / "report.html").exists()
    empty.write_text("{ not json")
    code, out = invoke("report", str(empty))
    assert code == 1 and str(empty) in out


def _pt(name: str, accuracy: float, peak: float, decode: float) -> Point:
    return Point(name, "gguf", accuracy, accuracy - 0.1, accuracy + 0.1, peak, decode, 0.0, False, False, ())


def test_pareto_front_hand_computed() -> None:
    points = [_pt("A", 0.60, 900, 20), _pt("B", 0.55, 500, 40), _pt("C", 0.50, 600, 30), _pt("D", 0.40, 300, 60), _pt("E", 0.55, 500, 35)]
    # memory (lower is better): C is beaten by B (more accurate, smaller); B and E tie and both stay
    assert [p.variant for p in pareto(points, "peak_mib", higher_x_better=False)] == ["D", "B", "E", "A"]
    # speed (higher is better): C (30 tok/s, 0.50) is beaten by B (40, 0.55); E by B
    assert [p.variant for p in pareto(points, "decode_tps", higher_x_better=True)] == ["A", "B", "D"]


def test_the_demo_reports_and_bundles_only_after_every_variant_is_built_and_profiled() -> None:
    """`make demo`'s report and bundles see every variant it makes (the ONNX one was once measured
    after them, and the last bundle disagreed with the report)."""
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("\ndemo: install\n", 1)[1].split("\n\n", 1)[0]
    steps = [line.split("$(BIN)/edgecds ", 1)[1].split()[0] for line in recipe.splitlines() if "$(BIN)/edgecds " in line]
    assert {"quantize", "profile", "report", "bundle"} <= set(steps), steps
    last_measured = max(i for i, step in enumerate(steps) if step in ("quantize", "profile"))
    assert all(i > last_measured for i, step in enumerate(steps) if step in ("report", "bundle")), steps
