"""The result tables, defined once: the terminal (rich) and the HTML report render the same rows.

Each function takes records (results.json's dataclasses, a plan or a bundle choice) and returns a
`Table` of strings; `print_table` draws it on a terminal at 100 columns or wider, and the report
turns the same object into an HTML table, so a figure reads the same in both places.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from edgecds.caveats import reference_caveats
from edgecds.results import EvalRecord, MeasurementRecord, Stat

MIB = 2**20


@dataclass(frozen=True)
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)  # lines shown under the table: legends and reasons

    def numeric(self, i: int) -> bool:
        """A column of numbers (or blanks) is right-aligned."""
        return bool(self.rows) and all(_is_number(row[i]) for row in self.rows)


def _is_number(text: str) -> bool:
    # "12.5", "0.13±0.01", "0.0040/0.213", "3/1", "20.6 [15-27]": figures, alone or side by side
    parts = [part for part in re.split(r"[/±]", text.split(" ")[0]) if part]
    try:
        for part in parts:
            float(part.lstrip("+-"))
    except ValueError:
        return text in ("", "reused")
    return bool(parts) or text == ""


def print_table(table: Table) -> None:
    from rich.console import Console
    from rich.table import Table as RichTable

    out = RichTable(title=table.title, title_justify="left")
    for i, col in enumerate(table.columns):
        out.add_column(col, justify="right" if table.numeric(i) else "left")
    for row in table.rows:
        out.add_row(*row)
    console = Console(width=max(100, Console().width))
    console.print(out)
    for note in table.notes:
        console.print(note, markup=False, highlight=False)


def stat_cell(s: Stat | None, scale: float = 1.0, digits: int = 1) -> str:
    """Median ± half the range of the repeats: the spread a reader must allow for."""
    if not s:
        return ""
    # one word, so a narrow column never splits the figure from its spread across lines
    spread = f"±{s.spread * scale / 2:.{digits}f}" if len(s.samples) > 1 else ""
    return f"{s.median * scale:.{digits}f}{spread}"


def measurements_table(records: Sequence[MeasurementRecord], title: str, reused: Iterable[bool] | None = None) -> Table:
    """Memory and speed of each variant measured on one device (`edgecds profile`)."""
    reused_flags = list(reused) if reused is not None else [False] * len(records)
    show_gpu = any(r.measured and r.measured.gpu_peak_bytes is not None for r in records)
    rows, notes = [], []
    for r, was_reused in zip(records, reused_flags, strict=True):
        m = r.measured
        if m is None:
            rows.append([r.variant.type, r.variant.format, r.status, *[""] * (6 + show_gpu)])
            notes.append(f"{r.variant.type}: {r.status}: {r.reason}")
            continue
        gpu = [f"{m.gpu_peak_bytes / MIB:.0f}" if m.gpu_peak_bytes is not None else ""] if show_gpu else []
        full = f"{m.full_context_peak_bytes / MIB:.0f}" if m.full_context_peak_bytes is not None else ""
        disturbed = bool(m.disturbance.get("disturbed"))
        mark = " DISTURBED" if disturbed else ""
        status = ("reused" if was_reused else r.status) + mark
        rows.append([r.variant.type, r.variant.format, status, stat_cell(m.load_seconds, 1, 2),
                     f"{m.peak_rss_bytes.high / MIB:.0f}", full, *gpu, stat_cell(m.prompt_tps), stat_cell(m.decode_tps),
                     stat_cell(m.ttft_seconds, 1000, 0)])
        notes += [f"{r.variant.type}: {note}" for note in m.notes if note.startswith(("disturbed", "decode"))]
    s = records[0].settings if records else {}
    columns = ["variant", "format", "status", "load s", f"peak MiB at pp{s.get('prompt_tokens')}", f"peak MiB at ctx {s.get('n_ctx')}",
               *(["GPU MiB"] if show_gpu else []), f"pp{s.get('prompt_tokens')} tok/s", f"tg{s.get('decode_tokens')} tok/s", "TTFT ms"]
    full_title = (f"{title}: ctx {s.get('n_ctx')}, {s.get('threads')} threads, {s.get('n_gpu_layers')} GPU layers; "
                  f"median ±half-range of {s.get('repeats')} fresh processes; peak is the highest")
    return Table(full_title, columns, rows, notes)


def accuracy_table(records: Sequence[EvalRecord], cases: str, mode: str, reference: str) -> Table:
    """Accuracy with its interval, flips against the reference and drift (`edgecds eval`)."""
    rows, notes = [], []
    for r in records:
        m, p, d = r.metrics, r.paired, r.drift
        rows.append([r.variant.type, f"{m['accuracy'] * 100:.1f} [{m['low'] * 100:.0f}-{m['high'] * 100:.0f}]",
                     f"{m['normalized']['accuracy'] * 100:.1f}" if "normalized" in m else "",
                     f"{m['errors'].get('plausible', 0)}/{m['errors'].get('off_topic', 0)}",
                     f"{p['lost']}/{p['gained']}" if p else "ref", f"{p['difference'] * 100:+.1f}" if p else "",
                     f"{p['p_value']:.3f}" if p else "", _kl_cell(d) if d and p else "", f"{d['top1_agreement']:.3f}" if d and p else "",
                     f"{d['perplexity']:.2f}" if d else ""])
        if p:
            notes.append(f"{r.variant.type}: {p['verdict']} from {reference}: {p['difference'] * 100:+.1f} points "
                         f"[{p['low'] * 100:+.1f}, {p['high'] * 100:+.1f}], p = {p['p_value']:.3f}, flip rate {p['flip_rate']:.1%}")
    n = records[0].cases["n"] if records else 0
    legend = ("norm: length-normalised; P/O: wrong answers that were plausible differentials/off-topic; lost/gain: flips against "
              f"{reference}; diff in points; p: exact McNemar; KL (mean/p99.9), top-1, PPL: drift on the clinical text")
    return Table(f"Accuracy on {cases} ({n} cases, {mode}), % with 95% Wilson interval; paired with {reference}",
                 ["variant", "acc [CI]", "norm", "P/O", "lost/gain", "diff", "p", "KL mean/p99.9", "top-1", "PPL"], rows,
                 [*reference_caveats(records), legend, *notes])


def _kl_cell(drift: dict[str, Any]) -> str:
    """Mean KL and its 99.9th percentile (the tail llama-perplexity reports; older records have none)."""
    tail = drift.get("kl_p999")
    return f"{drift['kl_mean']:.4f}" + (f"/{tail:.3f}" if tail is not None else "")


def specialty_table(records: Sequence[EvalRecord], key: str = "by_specialty") -> Table:
    """Accuracy by specialty (or by incidence): one row a group, one column a variant."""
    groups = sorted({g for r in records for g in r.metrics.get(key, {})})
    rows = []
    for g in groups:
        cells = []
        for r in records:
            m = r.metrics.get(key, {}).get(g)
            cells.append(f"{m['accuracy'] * 100:.0f} [{m['low'] * 100:.0f}-{m['high'] * 100:.0f}]" if m else "")
        n = next((r.metrics[key][g]["n"] for r in records if g in r.metrics.get(key, {})), 0)
        rows.append([g.replace("_", " "), str(n), *cells])
    what = "specialty" if key == "by_specialty" else "incidence"
    return Table(f"Accuracy by {what}, % with 95% Wilson interval", [what, "cases", *(r.variant.type for r in records)], rows)


def answers_table(records: Sequence[EvalRecord]) -> Table:
    """Free-text answers (generate/topk): errors as the studies class them, each with its 95%
    interval, pass@k next to greedy accuracy, the judge's agreement with the matcher, reasoning length."""
    def rate(m: dict[str, Any], kind: str) -> str:
        if "error_rates" not in m:  # recorded before error rates were: the counts only
            return str(m.get("errors", {}).get(kind, ""))
        r = m["error_rates"].get(kind)
        return f"{r['rate'] * 100:.0f} [{r['low'] * 100:.0f}-{r['high'] * 100:.0f}]" if r else "0"

    rows = []
    for r in records:
        m = r.metrics
        passes = " ".join(f"@{k} {v * 100:.0f}" for k, v in m.get("pass_at", {}).items())
        j = m.get("judge")
        rows.append([r.variant.type, f"{m['accuracy'] * 100:.1f}", rate(m, "plausible"), rate(m, "off_topic"), rate(m, "unmatched"),
                     rate(m, "no_answer"), passes, f"{j['kappa']:+.2f} [{j['low']:+.2f}, {j['high']:+.2f}]" if j else "",
                     str(m.get("reasoning_chars_median", ""))])
    judges = sorted({f"{r.metrics['judge']['variant']} (sha256 {r.metrics['judge']['sha256'][:12]})" for r in records if "judge" in r.metrics})
    notes = ["errors in % of cases: plausible differential, off-topic option, a diagnosis matching nothing (written to the review CSV), "
             "no answer; pass@k: unbiased estimator over seeded samples; kappa: the judge against the matcher"]
    notes += [f"judge: {j}" for j in judges]
    return Table("Free-text answers: errors with 95% intervals, pass@k, judge agreement",
                 ["variant", "acc", "plausible", "off-topic", "unmatched", "none", "pass@k %", "judge kappa", "reasoning"], rows, notes)


def comparison_table(comparisons: Sequence[Any], labels: Sequence[str], alpha: float, title: str = "") -> Table:
    """`edgecds compare`'s pairs (edgecds.compare.Comparison), numbered as in `labels`."""
    number = {label: i for i, label in enumerate(labels, 1)}
    rows = [[f"#{number[c.first]} vs #{number[c.second]}", c.group, str(c.n), f"{c.first_correct}/{c.second_correct}", f"{c.lost}/{c.gained}",
             f"{c.difference * 100:+.1f} [{c.low * 100:+.1f}, {c.high * 100:+.1f}]", f"{c.p_value:.4f} ({c.p_holm:.4f})", c.verdict]
            for c in comparisons]  # in percentage points, as every other table shows accuracy
    return Table(title or f"Paired on shared cases: exact McNemar, Holm-adjusted, alpha {alpha:g} (difference = second - first)",
                 ["pair", "group", "n", "right", "lost/gained", "diff, points [95% CI]", "p (Holm)", "verdict"], rows,
                 [f"#{i}: {label}" for label, i in number.items()])


def plan_table(result: Any, device: Any) -> Table:
    """Predicted memory and speed of every variant on a device (`edgecds plan`); labelled predicted."""
    from edgecds.hwbench.predict import FIRST_TOKEN_PROMPT, first_token_seconds

    rows, notes = [], []
    for entry in result.entries:
        p = entry.prediction
        if entry.unknown:
            notes.append(f"not predicted: {entry.type}: {entry.why_not}")
        elif not entry.fits:
            notes.append(f"does not fit: {entry.type}: {p.why_not if p else entry.why_not}")
        if p is None:
            rows.append([entry.type, entry.format, "", "", "", "", "", "", "", "unknown" if entry.unknown else "no"])
            continue
        gpu = f"{p.memory.gpu_layers}/{p.memory.total_layers}" if p.memory.backend != "cpu" else "cpu"
        prompt = f"{p.speed.prompt_tps:.0f}" if p.speed.prompt_tps else ""
        size = f"{entry.file_bytes / MIB:.0f}" if entry.file_bytes else ""
        first = first_token_seconds(p)
        rows.append([entry.type, entry.format, size, f"{p.memory.peak_bytes / MIB:.0f}", f"{p.headroom_bytes / MIB:.0f}", gpu,
                     f"{p.speed.decode_tps:.0f}", prompt, f"{first:.2f}" if first is not None else "", "yes" if p.fits else "no"])
    settings = result.settings
    kind = "Estimated from config.json, no file yet" if result.label.startswith("estimated") else "Predicted, not measured"
    title = (f"{kind}: {device.id} ({device.budget_gib:g} GiB budget), context {settings.n_ctx}, "
             f"KV cache {settings.type_k}, {settings.threads} threads")
    notes.insert(0, f"power mode: {device.power_mode}; first token s: from a {FIRST_TOKEN_PROMPT}-token prompt to the first answer token")
    drafted = [e for e in result.entries if e.prediction is not None and e.prediction.memory.draft]
    if result.draft:
        notes.insert(1, f"with the {result.draft} draft: peak MiB includes its weights, KV cache and buffers "
                        f"({drafted[0].prediction.memory.draft / MIB:.0f} MiB)" if drafted else f"with the {result.draft} draft (no model: no memory)")
    if result.advice:
        notes += ["NOTHING FITS this device as planned; what would:", *(f"  - {line}" for line in result.advice)]
    if any(e.prediction and not e.prediction.speed.calibrated for e in result.entries):
        notes.append("note: speeds on this backend use assumed efficiencies, not edgecds measurements (hwbench/calibration.json)")
    return Table(title, ["variant", "format", "file MiB", "peak MiB", "headroom MiB", "GPU layers", "decode tok/s", "prompt tok/s",
                                  "first token s", "fits"], rows, notes)


def choice_table(choice: Any, budget_gib: float) -> Table:
    """What `bundle` chose for a device and why every other variant was not chosen."""
    rows = []
    for c in ([choice.chosen] if choice.chosen else []) + list(choice.rejected):
        acc = f"{c.accuracy * 100:.1f}" if c.accuracy is not None else ""
        low = f"{c.accuracy_low * 100:.1f}" if c.accuracy_low is not None else ""
        # the reasons go under the table: in a 100-column log a long verdict wrapped to ~16 lines a row
        verdict = "CHOSEN" if c is choice.chosen else "passed over"
        drift = f"{c.drift_kl:.4f}" if c.drift_kl is not None else ""
        figures = "predicted" if c.predicted_only else "measured" + (", disturbed" if c.disturbed else "")
        peak = f"{c.peak_bytes / MIB:.0f}" + ("" if c.full_context else " (short run)")
        rows.append([c.variant, c.format, acc, low, drift, f"{c.decode_tps:.1f}", peak, figures, verdict])
    explained = choice.explanation()
    notes = [f"rule: {explained['rule']}"]
    notes += [f"{c.variant} ({c.format}) passed over: {'; '.join(c.reasons)}" for c in choice.rejected]
    if choice.chosen is not None:
        notes.append(f"{choice.chosen.variant} chosen: {explained['why']}")
    if choice.advice:
        notes.append(choice.advice)
    return Table(f"Choice for {choice.device} ({budget_gib:g} GiB budget)",
                 ["variant", "format", "acc %", "low %", "drift KL", "decode tok/s", "peak MiB at ctx", "figures", "verdict"], rows, notes)
