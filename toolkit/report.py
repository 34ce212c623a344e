"""`edgecds report`: one self-contained HTML page of the accuracy/memory/speed trade-off per device.

The page reads results.json files only (what `profile` and `eval` recorded), asks `bundle.choose`
what it would pick for each device with its default constraints, and draws with Plotly (its
JavaScript inlined once, so the page fetches nothing and works offline). Tables come from
edgecds.tables, the same the terminal shows. Everything taken from a results file is escaped:
results.json is untrusted input (variant names and reasons end up in the page).
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass, field
from html import escape as _escape
from pathlib import Path
from typing import Any

from edgecds import __version__
from edgecds.atomic import atomic_path
from edgecds.bundle.choose import Candidate, Choice, Constraints, choose
from edgecds.devices import DeviceProfile
from edgecds.errors import InvalidInputError
from edgecds.formats.types import is_fitted
from edgecds.results import EvalRecord, HostFingerprint, MeasurementRecord, ResultsFile, load_results
from edgecds.tables import Table, accuracy_table, answers_table, choice_table, comparison_table, measurements_table, specialty_table
from edgecds.target import AUTO, resolve_target

MIB = 2**20
# one colour per format, fixed so a format looks the same in every chart of every report
FORMAT_COLOURS = {"gguf": "#1f77b4", "onnx": "#d62728"}
OTHER_COLOUR = "#7f7f7f"


def escape(text: str) -> str:
    """For Plotly's text, which reads tags (<a href>, <b>) but not quotes."""
    return _escape(text, quote=False)


@dataclass(frozen=True)
class Point:
    """One variant on one device: where it sits in the charts, and why it was or was not chosen."""

    variant: str
    format: str
    accuracy: float  # fraction
    low: float
    high: float
    peak_mib: float
    decode_tps: float
    decode_spread: float
    predicted: bool  # figures from the predictor, not measured on the device
    chosen: bool
    reasons: tuple[str, ...]  # why it was chosen, or why not
    fitted: bool = False  # per-tensor types fitted to a budget (quantize --fit), not a standard type


@dataclass(frozen=True)
class DeviceSection:
    device: DeviceProfile
    points: list[Point]
    off_chart: list[str]  # variants measured but not drawn, with why (no accuracy, failed)
    tables: list[Table]
    charts: list[str] = field(default_factory=list)  # HTML divs, filled by render


@dataclass(frozen=True)
class ReportResult:
    output: str
    devices: list[str]
    points: dict[str, int]  # device -> variants drawn
    bytes: int


def _latest_evaluations(results: ResultsFile) -> list[EvalRecord]:
    """The newest log-likelihood evaluation of each variant file, as `bundle` counts them."""
    latest: dict[str, EvalRecord] = {}
    for e in results.evaluations:
        if e.mode == "loglik" and (e.variant.sha256 not in latest or e.created >= latest[e.variant.sha256].created):
            latest[e.variant.sha256] = e
    return sorted(latest.values(), key=lambda e: -e.variant.file_size)


def _latest_records(results: ResultsFile, device: str) -> list[MeasurementRecord]:
    latest: dict[str, MeasurementRecord] = {}
    for r in results.records:
        if r.device == device and (r.variant.sha256 not in latest or r.created >= latest[r.variant.sha256].created):
            latest[r.variant.sha256] = r
    return sorted(latest.values(), key=lambda r: -r.variant.file_size)


def _point(c: Candidate, choice: Choice) -> Point | None:
    if c.accuracy is None or c.accuracy_low is None or c.evaluation is None:
        return None
    spread = c.measurement.measured.decode_tps.spread if c.measurement and c.measurement.measured else 0.0
    chosen = choice.chosen is not None and c.sha256 == choice.chosen.sha256
    return Point(c.variant, c.format, c.accuracy, c.accuracy_low, float(c.evaluation.metrics.get("high", c.accuracy)),
                 c.peak_bytes / MIB, c.decode_tps, spread, c.predicted_only, chosen, (choice.why,) if chosen else c.reasons,
                 is_fitted(c.variant))


def pareto(points: list[Point], x: str, higher_x_better: bool) -> list[Point]:
    """The points no other point beats on both accuracy and `x` (ties kept), sorted by `x`."""
    def better_or_equal(a: Point, b: Point) -> bool:
        ax, bx = getattr(a, x), getattr(b, x)
        return a.accuracy >= b.accuracy and (ax >= bx if higher_x_better else ax <= bx)

    front = [p for p in points if not any(better_or_equal(q, p) and (q.accuracy, getattr(q, x)) != (p.accuracy, getattr(p, x))
                                          for q in points)]
    return sorted(front, key=lambda p: getattr(p, x))


def _label_positions(points: list[Point], x: str) -> list[str]:
    """Labels above and below their points in turn, in the order of x: neighbours do not overlap."""
    order = sorted(range(len(points)), key=lambda i: getattr(points[i], x))
    positions = [""] * len(points)
    for rank, i in enumerate(order):
        positions[i] = "top right" if rank % 2 == 0 else "bottom right"
    return positions


def _symbol(p: Point) -> str:
    return "diamond" if p.predicted else "star" if p.fitted else "circle"


def _figure(points: list[Point], x: str, title: str, x_title: str, higher_x_better: bool, budget_mib: float | None) -> Any:
    import plotly.graph_objects as go

    fig = go.Figure()
    for fmt in sorted({p.format for p in points}):
        mine = [p for p in points if p.format == fmt]
        hover = []
        for p in mine:  # Plotly reads tags (<a href>, <b>) in text: names and reasons from results.json are escaped
            verdict = f"CHOSEN by bundle: {'; '.join(p.reasons)}" if p.chosen else ("not chosen: " + "; ".join(p.reasons) if p.reasons else "")
            hover.append(f"{escape(p.variant)} ({escape(p.format)}{', PREDICTED' if p.predicted else ''}"
                         f"{', per-tensor types fitted to a budget' if p.fitted else ''})<br>accuracy {p.accuracy:.1%} "
                         f"[{p.low:.1%}, {p.high:.1%}]<br>peak {p.peak_mib:.0f} MiB, decode {p.decode_tps:.1f} tok/s<br>{escape(verdict)}")
        fig.add_trace(go.Scatter(
            x=[getattr(p, x) for p in mine], y=[p.accuracy * 100 for p in mine], mode="markers+text", name=escape(fmt.upper()),
            uid=f"variants-{fmt}", text=[escape(p.variant) for p in mine],
            textposition=_label_positions(mine, x), hovertext=hover, hoverinfo="text",
            marker={"size": 11, "color": FORMAT_COLOURS.get(fmt, OTHER_COLOUR), "symbol": [_symbol(p) for p in mine]},
            error_y={"type": "data", "symmetric": False, "array": [(p.high - p.accuracy) * 100 for p in mine],
                     "arrayminus": [(p.accuracy - p.low) * 100 for p in mine], "thickness": 1.2},
        ))
    front = pareto(points, x, higher_x_better)
    if len(front) > 1:
        fig.add_trace(go.Scatter(x=[getattr(p, x) for p in front], y=[p.accuracy * 100 for p in front], mode="lines", uid="pareto",
                                 name="Pareto front", line={"dash": "dot", "color": "#555"}, hoverinfo="skip"))
    chosen = [p for p in points if p.chosen]
    if chosen:
        fig.add_trace(go.Scatter(x=[getattr(p, x) for p in chosen], y=[p.accuracy * 100 for p in chosen], mode="markers", uid="chosen",
                                 name="chosen by bundle", hoverinfo="skip",
                                 marker={"size": 24, "symbol": "circle-open", "color": "#2ca02c", "line": {"width": 3}}))
    # the axis spans the points (a budget far to their right once squashed them into a tenth of the
    # width): a budget inside is a line, one beyond is said at the right edge
    right = max(getattr(p, x) for p in points) * 1.3 if points else 1.0
    fig.update_xaxes(range=[0, right])
    if budget_mib is not None:
        beyond = budget_mib > right
        if not beyond:
            fig.add_vline(x=budget_mib, line_dash="dash", line_color="#d62728")
        fig.add_annotation(x=right if beyond else budget_mib, y=1, yref="paper", xanchor="right", yanchor="top", showarrow=False,
                           text=f"budget {budget_mib / 1024:.1f} GiB" + (" (beyond the chart) →" if beyond else ""), font={"color": "#d62728"})
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title="accuracy, % (95% Wilson interval)", template="plotly_white",
                      height=430, margin={"l": 60, "r": 20, "t": 50, "b": 50}, legend={"orientation": "h", "y": -0.18})
    return fig


def _device_section(files: list[Path], loaded: list[ResultsFile], device: DeviceProfile, constraints: Constraints) -> DeviceSection:
    records = [r for res in loaded for r in _latest_records(res, device.id)]
    tables = [measurements_table(records, f"Measured on {device.id}")]
    choice: Choice | None
    try:
        choice = choose(files, device, constraints)
    except InvalidInputError:  # nothing measured on the device itself: the table says what there is
        choice = None
    points: list[Point] = []
    off_chart = [f"{r.variant.type}: {r.status}: {r.reason}" for r in records if r.status != "measured"]
    if choice is not None:
        tables.append(choice_table(choice, device.budget_gib))
        for c in ([choice.chosen] if choice.chosen else []) + list(choice.rejected):
            point = _point(c, choice)
            if point is None:
                off_chart.append(f"{c.variant}: no clinical accuracy measured (run `edgecds eval`), so not on the charts")
            else:
                points.append(point)
    else:
        off_chart.append(f"nothing was measured on {device.id} itself; `edgecds profile --device {device.id}` on the device")
    fitted = [p.variant for p in points if p.fitted]
    if fitted:
        off_chart.append(f"{', '.join(fitted)}: per-tensor types fitted to a budget by `edgecds quantize --fit` (a star on the charts), "
                         "not a standard llama.cpp type; the number is its bits per weight")
    return DeviceSection(device, points, off_chart, tables)


def _host_line(h: HostFingerprint) -> str:
    gpus = ", ".join(h.gpus) if h.gpus else "no GPU"
    versions = ", ".join(f"{k} {v}" for k, v in sorted(h.versions.items()))
    return f"{h.cpu} ({h.cpu_cores} cores, {h.ram_gib:g} GiB), {gpus}, {h.os}; detected as {h.detected_profile}; {versions}"


def build_report(results_files: list[Path], output: Path, profiles_dirs: tuple[Path, ...] = (),
                 constraints: Constraints | None = None) -> ReportResult:
    import plotly.io as pio
    from jinja2 import Environment, PackageLoader, select_autoescape
    from plotly.offline import get_plotlyjs

    constraints = constraints or Constraints()
    loaded: list[ResultsFile] = []
    for path in results_files:
        results = load_results(path)
        if results is None:
            raise InvalidInputError(f"{path} does not exist; run `edgecds profile` first")
        loaded.append(results)
    device_ids = sorted({r.device for res in loaded for r in res.records})
    if not device_ids and not any(res.evaluations for res in loaded):
        raise InvalidInputError(f"{', '.join(map(str, results_files))}: nothing measured yet; run `edgecds profile` first")
    target = resolve_target(AUTO, profiles_dirs) if device_ids else None
    sections = [_device_section(results_files, loaded, target.profile_of(d), constraints) for d in device_ids if target]
    for i, section in enumerate(sections):
        if not section.points:
            continue
        budget = section.device.budget_gib * 1024
        figures = [
            _figure(section.points, "peak_mib", f"{section.device.id}: accuracy against peak memory", "peak memory, MiB (highest of the repeats)",
                    False, budget),
            _figure(section.points, "decode_tps", f"{section.device.id}: accuracy against decode speed", "decode, tokens/s (median)", True, None),
        ]
        section.charts.extend(pio.to_html(fig, full_html=False, include_plotlyjs=False, div_id=f"chart-{i}-{j}",
                                          # no tool bar: on a phone it covered the chart's title
                                          config={"displaylogo": False, "responsive": True, "displayModeBar": False})
                              for j, fig in enumerate(figures))

    evaluation_groups: list[list[Table]] = []
    for res in loaded:
        evals = _latest_evaluations(res)
        for key in sorted({(e.cases["name"], e.mode, e.reference) for e in evals}):
            group = [e for e in evals if (e.cases["name"], e.mode, e.reference) == key]
            evaluation_groups.append([accuracy_table(group, key[0], key[1], key[2]), specialty_table(group),
                                      specialty_table(group, "by_incidence")] + ([answers_table(group)] if key[1] != "loglik" else []))
    comparisons = _comparison_tables(results_files, constraints.alpha) if sum(len(res.evaluations) for res in loaded) >= 2 else []
    hosts = {h.id: h for res in loaded for h in res.hosts.values()}
    created = sorted(r.created for res in loaded for r in res.records) + sorted(e.created for res in loaded for e in res.evaluations)
    predicted = any(p.predicted for s in sections for p in s.points)
    env = Environment(loader=PackageLoader("edgecds", "."), autoescape=select_autoescape(["html", "j2"]))
    html = env.get_template("report.html.j2").render(
        sections=sections, evaluation_groups=evaluation_groups, comparisons=comparisons, alpha=constraints.alpha,
        differing=sum(row[-1] != "no difference shown" for t in comparisons for row in t.rows), hosts=[_host_line(h) for h in hosts.values()],
        files=[str(p) for p in results_files], generated=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        measured_from=min(created)[:10] if created else "", measured_to=max(created)[:10] if created else "", version=__version__,
        predicted=predicted, plotly_js=get_plotlyjs(),
        format_colours={f: c for f, c in FORMAT_COLOURS.items() if any(p.format == f for s in sections for p in s.points)},  # the drawn ones
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    data = html.encode("utf-8")
    with atomic_path(output) as temp:  # an interrupted run leaves the previous report whole
        temp.write_bytes(data)
    return ReportResult(str(output), device_ids, {s.device.id: len(s.points) for s in sections}, len(data))


def _comparison_tables(results_files: list[Path], alpha: float) -> list[Table]:
    """`edgecds compare` over the same files, at the alpha `bundle` chooses with (one alpha on the
    page): every pair, then the subgroups."""
    from edgecds.compare import compare
    from edgecds.errors import UsageError

    try:
        result = compare(results_files, alpha)
    except UsageError:  # the evaluations share no case: nothing to pair
        return []
    return [comparison_table(result.comparisons, result.evaluations, result.alpha),
            comparison_table(result.subgroups, result.evaluations, result.alpha,
                             f"The same by specialty and by incidence (Holm across these {len(result.subgroups)} comparisons)")]


def default_output(results_files: list[Path]) -> Path:
    return Path(os.path.commonpath([str(p.resolve().parent) for p in results_files])) / "report.html"
