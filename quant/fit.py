"""`quantize --fit`: one GGUF whose tensor types are chosen, group by group, to fill a budget.

A device's budget rarely lands on a standard type. The fit mixes precision the way llama-quantize's
`--tensor-type` does, and chooses the mix by measurement:

1. Every quantizable weight joins a group by its role (`attn_q.weight`, `ffn_down.weight`,
   `token_embd.weight`, ...: its name without the layer number, which is how `--tensor-type`
   patterns address tensors).
2. A probe build puts one group at one type of the ladder (FIT_LADDER) and every other group at the
   ladder's top; its KL on the drift text against the float GGUF, less the all-top build's, is
   that group's cost at that type: the added mean, plus a share (tail_weight) of the added 99.9th
   percentile, so a type that moves a few tokens far is not taken for its good average.
3. Costs are taken to add up (the first-order assumption of per-layer mixed precision), and the
   assignment of least summed cost whose size fits is found exactly, by dynamic programming over
   the groups. For `--fit DEVICE` the size is what the predictor says the device can hold at its
   context (hwbench/predict.py on the planned tensors, before anything is built).
4. The chosen mix is built, its tensor types checked against the plan, load-checked, and its
   drift measured: the record keeps the predicted and the measured KL side by side.

The search is bounded by `max_builds` probes; when the ladder would need more, the types nearest
the target's bits per weight are probed, the rest left out.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from edgecds.errors import EngineError, UsageError
from edgecds.formats.gguf_file import GgufInfo, TensorInfo, read_gguf
from edgecds.formats.types import FIT_LADDER, FIT_PREFIX, GGML_TYPE_BY_NAME, GgmlType
from edgecds.progress import Reporter

MIB = 1 << 20
TOP = FIT_LADDER[-1][0]  # every group not being probed sits here
DP_UNITS = 20_000  # the size grid of the exact search: finer than any type step of any group
PROBES_FILE = "fit-probes.json"  # beside variants.json: each probe's drift, so another target reuses it


@dataclass(frozen=True)
class FitTarget:
    """What the fitted file must fit: one of a device's budget at a context, a file size, or bits per weight."""

    device_id: str | None = None
    n_ctx: int | None = None  # with device_id; None: the device's default context
    size_bytes: int | None = None
    bpw: float | None = None

    def __post_init__(self) -> None:
        given = [v for v in (self.device_id, self.size_bytes, self.bpw) if v is not None]
        if len(given) != 1:
            raise UsageError("give one fit target: --fit DEVICE, --target-size SIZE or --target-bpw BITS")
        if self.n_ctx is not None and self.device_id is None:
            raise UsageError("--ctx goes with --fit DEVICE (the context whose KV cache shares the device's memory)")

    def describe(self) -> str:
        if self.device_id:
            return f"{self.device_id}'s budget" + (f" at context {self.n_ctx}" if self.n_ctx else "")
        if self.size_bytes:
            return f"{self.size_bytes / MIB:.1f} MiB"
        return f"{self.bpw:g} bits per weight"


@dataclass(frozen=True)
class FitOptions:
    target: FitTarget
    max_builds: int = 40  # probe builds, the all-top one included
    drift_chunks: int = 2  # chunks of the drift text each probe reads (llama-perplexity --chunks)
    # a group's cost is its added mean KL plus this share of its added 99.9th-percentile KL: with
    # the mean alone the search took types that are cheap on average and move a few tokens far
    # (IQ4_NL on SmolLM2's FFN: a lower mean than Q3_K_M at equal size, a higher p99.9)
    tail_weight: float = 0.1
    depth: int = 1  # bands of consecutive layers a role is split into, each its own group (--fit-depth)
    profiles_dirs: tuple[Path, ...] = ()

    def as_key(self) -> dict[str, Any]:
        return {"target": asdict(self.target), "max_builds": self.max_builds, "drift_chunks": self.drift_chunks,
                "tail_weight": self.tail_weight, "ladder": [list(level) for level in FIT_LADDER],
                **({"depth": self.depth} if self.depth > 1 else {})}


@dataclass(frozen=True)
class Group:
    """The weights of one role across the layers, and the pattern llama.cpp matches them with."""

    name: str
    pattern: str
    tensors: tuple[TensorInfo, ...]

    def type_at(self, level: tuple[str, ...]) -> GgmlType | None:
        """The level's first type whose block divides every row of the group (k-quants need rows of 256)."""
        for name in level:
            kind = GGML_TYPE_BY_NAME[name]
            if all(t.shape[0] % kind.block_size == 0 for t in self.tensors):
                return kind
        return None

    def bytes_at(self, kind: GgmlType) -> int:
        return sum(t.n_elements // kind.block_size * kind.type_size for t in self.tensors)

    @property
    def n_parameters(self) -> int:
        return sum(t.n_elements for t in self.tensors)


def group_name(tensor_name: str) -> str:
    return re.sub(r"^blk\.\d+\.", "", tensor_name)


def group_pattern(name: str, layers: list[int] | None) -> str:
    """Anchored, so `attn_q.weight` never also matches another role's name; `layers`: the band's
    layer numbers ([]: every layer; None: not a per-layer tensor, as token_embd)."""
    if layers is None:
        return "^" + re.escape(name) + "$"
    if not layers:  # every layer
        return r"^blk\.\d+\." + re.escape(name) + "$"
    return r"^blk\.(?:" + "|".join(str(i) for i in layers) + r")\." + re.escape(name) + "$"


def weight_groups(info: GgufInfo, depth: int = 1) -> list[Group]:
    """The 2-D weights by role, in file order, each role's layers split into `depth` bands of
    consecutive layers (the first and last layers are often the most sensitive); 1-D tensors
    (norms, biases) stay as llama.cpp keeps them."""
    found: dict[str, list[TensorInfo]] = {}
    layers: dict[str, list[int] | None] = {}
    n_layers = 1 + max((int(m.group(1)) for t in info.tensors if (m := re.match(r"^blk\.(\d+)\.", t.name))), default=0)
    for t in info.tensors:
        if len(t.shape) < 2 or not t.name.endswith(".weight"):
            continue
        role = group_name(t.name)
        match = re.match(r"^blk\.(\d+)\.", t.name)
        layer = int(match.group(1)) if match else None
        band = layer * depth // n_layers if layer is not None and depth > 1 else None
        name = role if band is None else f"{role}@{band + 1}/{depth}"
        found.setdefault(name, []).append(t)
        if layer is None:
            layers[name] = None
        else:
            known = layers.get(name) or []
            layers[name] = sorted({*known, layer})
    every = depth <= 1  # one band: the pattern names no layer
    return [Group(name, group_pattern(group_name(ts[0].name), [] if every and layers[name] is not None else layers[name]), tuple(ts))
            for name, ts in found.items()]


def overrides_for(assignment: dict[str, GgmlType], groups: list[Group]) -> list[tuple[str, str]]:
    """(pattern, type) pairs for llama_model_quantize's tt_overrides, as llama-quantize --tensor-type writes them."""
    return [(g.pattern, assignment[g.name].name) for g in groups]


def _aligned(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def planned_info(base: GgufInfo, groups: list[Group], assignment: dict[str, GgmlType]) -> GgufInfo:
    """The header the fitted file will have: `base`'s tensors with the assigned types. The
    predictor reads it as it reads a built file."""
    types = {t.name: assignment[g.name] for g in groups for t in g.tensors}
    tensors, offset = [], 0
    for t in base.tensors:
        kind = types.get(t.name)
        n_bytes = t.n_bytes if kind is None else t.n_elements // kind.block_size * kind.type_size
        tensors.append(replace(t, type_id=t.type_id if kind is None else kind.id, n_bytes=n_bytes, offset=offset))
        offset += _aligned(n_bytes, base.alignment)
    return replace(base, tensors=tuple(tensors), file_size=base.data_offset + offset)


# --- the budget ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """Turns an assignment into 'fits or not', and says by how much."""

    target: FitTarget
    base: GgufInfo  # the all-top probe: the header, and the types llama.cpp keeps for what is not in a group
    groups: list[Group]
    device: Any = None  # a DeviceProfile for --fit
    settings: Any = None  # its RunSettings

    def tensor_bytes_allowed(self) -> int:
        """The first guess at how many bytes the groups may take together."""
        fixed = self.base.tensor_bytes - sum(g.bytes_at(GGML_TYPE_BY_NAME[TOP]) for g in self.groups)
        if self.target.bpw is not None:
            return int(self.target.bpw * self.base.n_parameters / 8) - fixed
        if self.target.size_bytes is not None:
            # the header and the alignment padding come out of the file size too
            padding = self.base.alignment * len(self.base.tensors)
            return self.target.size_bytes - self.base.data_offset - padding - fixed
        top = planned_info(self.base, self.groups, {g.name: GGML_TYPE_BY_NAME[TOP] for g in self.groups})
        over = self.held(top) - int(self.device.budget_gib * 1024**3)
        return sum(g.bytes_at(GGML_TYPE_BY_NAME[TOP]) for g in self.groups) - max(over, 0) - (MIB if over > 0 else 0)

    def held(self, info: GgufInfo) -> int:
        """The memory the device must hold for `info` at the context: the predictor's peak (a
        discrete GPU: what sits on the GPU, every layer there)."""
        from edgecds.hwbench.predict import predict

        p = predict(info, self.settings, self.device)
        if p.memory.backend != "cpu" and self.device.memory_kind == "discrete":
            if p.memory.gpu_layers < p.memory.total_layers:
                return p.memory.peak_bytes + int(self.device.budget_gib * 1024**3)  # not all on the GPU: over by design
            return p.memory.gpu_bytes
        return p.memory.peak_bytes

    def overshoot(self, info: GgufInfo) -> int:
        """Bytes over the target (<= 0: fits)."""
        if self.target.bpw is not None:
            return math.ceil((info.bits_per_weight - self.target.bpw) * info.n_parameters / 8)
        if self.target.size_bytes is not None:
            return info.file_size - self.target.size_bytes
        return self.held(info) - int(self.device.budget_gib * 1024**3)


def device_budget(target: FitTarget, profiles_dirs: tuple[Path, ...]) -> tuple[Any, Any]:
    from edgecds.devices import find_profile
    from edgecds.engine import settings_for

    device = find_profile(target.device_id or "", profiles_dirs)
    if "gguf" not in device.formats:
        raise UsageError(f"{device.id} runs {', '.join(device.formats)}, not GGUF: the fit builds a GGUF")
    return device, settings_for(device, target.n_ctx)


# --- the search ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Choice:
    kind: GgmlType
    n_bytes: int
    kl: float  # added mean KL, measured
    tail: float = 0.0  # added 99.9th-percentile KL, measured
    weight: float = 0.0  # FitOptions.tail_weight

    @property
    def cost(self) -> float:
        return self.kl + self.weight * self.tail


def cheapest(options: dict[str, list[Choice]], allowed: int) -> dict[str, Choice] | None:
    """The choice per group of least summed cost whose bytes sum to at most `allowed`, exactly
    (multiple-choice knapsack by dynamic programming on a grid of DP_UNITS; sizes round up, so the
    grid never lets an over-size mix through). None when even the smallest mix is over."""
    import numpy as np

    if allowed <= 0:
        return None
    unit = max(1, math.ceil(allowed / DP_UNITS))
    cap = allowed // unit
    best = np.zeros(cap + 1)  # least cost using at most c units, over the groups so far
    picks: list[np.ndarray] = []
    for name in options:
        new = np.full(cap + 1, np.inf)
        pick = np.full(cap + 1, -1)
        for i, choice in enumerate(options[name]):
            w = math.ceil(choice.n_bytes / unit)
            if w > cap:
                continue
            candidate = np.full(cap + 1, np.inf)
            candidate[w:] = best[: cap + 1 - w] + choice.cost
            better = candidate < new
            new[better], pick[better] = candidate[better], i
        best = new
        picks.append(pick)
    if not np.isfinite(best[cap]):
        return None
    chosen: dict[str, Choice] = {}
    c = cap
    for name, pick in zip(reversed(list(options)), reversed(picks), strict=True):
        choice = options[name][int(pick[c])]
        chosen[name] = choice
        c -= math.ceil(choice.n_bytes / unit)
    return {name: chosen[name] for name in options}


def levels_to_probe(groups: list[Group], target_bits: float, max_builds: int) -> list[tuple[str, ...]]:
    """The ladder's levels below the top that the probes cover: all of them when the bound allows,
    else those nearest the target's bits per weight."""
    below = [level for level in FIT_LADDER[:-1] if any(g.type_at(level) for g in groups)]
    per_group = (max_builds - 1) // len(groups)
    if per_group < 1:
        raise UsageError(f"--fit-builds {max_builds} cannot probe this model's {len(groups)} tensor groups even once: "
                         f"give at least {len(groups) + 1}")
    if per_group >= len(below):
        return below
    bits = {level: GGML_TYPE_BY_NAME[level[0]].bits_per_weight for level in below}
    # the widest level at or under the target comes first: without one no mix of the probed types fits
    under = [level for level in below if bits[level] <= target_bits]
    first = under[-1] if under else below[0]
    rest = sorted((level for level in below if level != first), key=lambda level: abs(bits[level] - target_bits))
    nearest = [first, *rest[: per_group - 1]]
    return [level for level in below if level in nearest]


# --- the builds ---------------------------------------------------------------------------------


@dataclass
class Probe:
    """Builds one mix into a temporary beside the output and measures its drift."""

    float_path: Path
    out: Path
    reference: tuple[Any, Any]  # the float GGUF's log-probabilities and targets on the drift text
    quantizer: Any  # QuantizerOptions
    imatrix: Any = None
    imatrix_file: str = ""
    drift_chunks: int = 2
    builds: int = 0
    text: str = field(default="", repr=False)
    # what makes a probe's result the same: the parent's sha256, the quantizer options, the tools
    identity: dict[str, Any] = field(default_factory=dict)
    reused: int = 0  # probes answered from PROBES_FILE

    def _cached(self) -> dict[str, Any]:
        """Earlier probes of this folder (another target probes the same mixes). The file is
        untrusted like every input: an entry that is not a finite mean KL is ignored."""
        from edgecds.errors import EdgecdsError
        from edgecds.jsonfile import read_json_object

        try:
            data = read_json_object(self.out / PROBES_FILE) if (self.out / PROBES_FILE).exists() else {}
        except EdgecdsError:
            return {}
        return {key: v for key, v in data.items()
                if isinstance(v, dict) and all(isinstance(v.get(k), float) and math.isfinite(v[k]) for k in ("kl_mean", "kl_p999"))}

    def cached_drift(self, overrides: list[tuple[str, str]], expected: int) -> tuple[dict[str, Any], GgufInfo | None]:
        """drift_of, answered from PROBES_FILE when this mix was measured before (its header then None)."""
        from edgecds.atomic import write_json
        from edgecds.digest import cache_key

        key = cache_key({"mix": overrides, "chunks": self.drift_chunks, **self.identity})
        known = self._cached()
        if key in known:
            self.reused += 1
            return known[key], None
        drift, info = self.drift_of(overrides, expected)
        write_json(self.out / PROBES_FILE, {**known, key: {k: drift[k] for k in ("kl_mean", "kl_p999", "top1_agreement")}})
        return drift, info

    def build(self, overrides: list[tuple[str, str]], into: Path, expected: int, reporter: Reporter | None = None) -> Any:
        from edgecds.formats.types import QUANT_TYPE_BY_NAME
        from edgecds.quant import gguf_quantize

        pure = replace(self.quantizer, pure=True)  # every weight outside an override in the top type, no k-quant mixture
        run = gguf_quantize.quantize(self.float_path, into, QUANT_TYPE_BY_NAME[TOP], pure, expected, reporter, self.imatrix,
                                     self.imatrix_file, tensor_types=overrides)
        self.builds += 1
        return run

    def measure(self, path: Path) -> dict[str, Any]:
        from edgecds.drift import drift_against

        logprobs, _ = logprobs_of(path, self.text, self.drift_chunks, self.quantizer.threads)
        return drift_against(self.reference[0], logprobs, self.reference[1])

    def drift_of(self, overrides: list[tuple[str, str]], expected: int) -> tuple[dict[str, Any], GgufInfo]:
        from edgecds.atomic import temp_name_for

        temp = temp_name_for(self.out / "fit-probe.gguf")
        try:
            self.build(overrides, temp, expected)
            return self.measure(temp), read_gguf(temp)
        finally:
            temp.unlink(missing_ok=True)


def logprobs_of(path: Path, text: str, chunks: int, threads: int) -> tuple[Any, Any]:
    """A GGUF's log-probabilities on the first `chunks` chunks of `text`, and the tokens that came."""
    from edgecds.drift import DRIFT_CTX, drift_logprobs
    from edgecds.engine import EngineSettings
    from edgecds.engine.factory import open_runtime

    runtime = open_runtime(path, EngineSettings(n_ctx=DRIFT_CTX, threads=threads or None))
    try:
        return drift_logprobs(runtime, text, max_chunks=chunks)
    finally:
        runtime.close()


def reference_drift(float_path: Path, chunks: int, threads: int) -> tuple[str, tuple[Any, Any]]:
    """The drift text, and the float GGUF's log-probabilities on it: what every probe is measured against."""
    from edgecds.cases import drift_text

    text = drift_text()
    return text, logprobs_of(float_path, text, chunks, threads)


def check_types(info: GgufInfo, planned: GgufInfo, what: str) -> None:
    """The built file must hold exactly the planned types: otherwise the sizes and costs the search
    used describe another file."""
    built = {t.name: t.type_name for t in info.tensors}
    wrong = [f"{t.name}: planned {t.type_name}, built {built.get(t.name)}" for t in planned.tensors if built.get(t.name) != t.type_name]
    if wrong:
        raise EngineError(f"{what}: llama.cpp did not write the planned tensor types ({len(wrong)} differ), e.g. " + "; ".join(wrong[:3]))


@dataclass(frozen=True)
class FitPlan:
    """What the search decided, before the final build."""

    assignment: dict[str, GgmlType]
    planned: GgufInfo
    predicted_kl: float
    costs: dict[str, dict[str, dict[str, float]]]  # group -> type -> its added mean KL, added p99.9 KL, and bytes
    kl_top: float
    held_bytes: int | None  # --fit DEVICE: the predicted memory at the context


def _refuse_early(groups: list[Group], options_of: dict[str, list[GgmlType]], allowed: int, budget: Budget, target: FitTarget) -> None:
    """Targets no probe can help with, said before any is built: one even the smallest mix misses,
    and one that holds the whole model at the top type."""
    smallest = sum(min((g.bytes_at(k) for k in options_of[g.name]), default=g.bytes_at(GGML_TYPE_BY_NAME[TOP])) for g in groups)
    if smallest > allowed:
        lowest = sorted({min(ks, key=lambda k: k.bits_per_weight).name for ks in options_of.values() if ks})
        raise UsageError(f"even the smallest mix ({smallest / MIB:.1f} MiB of weights, groups at {', '.join(lowest) or TOP}) does not fit "
                         f"{target.describe()}: choose a smaller model, a larger target" + (", or a shorter --ctx" if target.device_id else ""))
    whole = planned_info(budget.base, groups, {g.name: GGML_TYPE_BY_NAME[TOP] for g in groups})
    if budget.overshoot(whole) <= 0:
        raise UsageError(f"{target.describe()} holds the whole model at {TOP} ({whole.file_size / MIB:.1f} MiB): nothing to "
                         f"fit; `edgecds quantize --types {TOP}` (or F16) is the better variant")


def _within(choices: dict[str, list[Choice]], allowed: int, budget: Budget, groups: list[Group]) -> tuple[dict[str, Choice], GgufInfo]:
    """The cheapest mix within `allowed` bytes, shrunk until the budget agrees (for --fit DEVICE the
    predictor has the last word on what the rest of the memory takes): the mix and its header."""
    target = budget.target
    for _ in range(8):
        chosen = cheapest(choices, allowed)
        if chosen is None:
            raise UsageError(f"no mix of the probed types fits {target.describe()} once the predictor counts the rest "
                             "of the memory: choose a smaller model, a larger target" + (", or a shorter --ctx" if target.device_id else ""))
        planned = planned_info(budget.base, groups, {name: c.kind for name, c in chosen.items()})
        over = budget.overshoot(planned)
        if over <= 0:
            return chosen, planned
        allowed -= over + 64 * 1024
    raise UsageError(f"the fit to {target.describe()} did not converge; give --target-size instead")


def search(probe: Probe, options: FitOptions, reporter: Reporter | None) -> tuple[FitPlan, list[Group]]:
    """The probes and the exact search: the plan for the fitted file."""
    source = read_gguf(probe.float_path)
    groups = weight_groups(source, options.depth)
    if not groups:
        raise UsageError(f"{probe.float_path.name} has no 2-D weights to quantize")
    top = {g.name: GGML_TYPE_BY_NAME[TOP] for g in groups}
    if reporter:
        reporter.note(f"fit: {len(groups)} tensor groups; probing with {TOP} everywhere first")
    top_drift, base = probe.drift_of(overrides_for(top, groups), planned_info(source, groups, top).file_size)
    kept = {t.name for t in base.tensors if t.type_name == TOP}
    groups = [g for g in groups if all(t.name in kept for t in g.tensors)]  # what llama.cpp keeps as it is stays out
    device, settings = device_budget(options.target, options.profiles_dirs) if options.target.device_id else (None, None)
    budget = Budget(options.target, base, groups, device, settings)
    allowed = budget.tensor_bytes_allowed()
    quantizable = sum(g.n_parameters for g in groups)
    target_bits = allowed * 8 / quantizable if quantizable else 0.0
    levels = levels_to_probe(groups, target_bits, options.max_builds)
    options_of = {g.name: [kind for level in levels if (kind := g.type_at(level)) is not None] for g in groups}
    _refuse_early(groups, options_of, allowed, budget, options.target)
    choices: dict[str, list[Choice]] = {g.name: [Choice(GGML_TYPE_BY_NAME[TOP], g.bytes_at(GGML_TYPE_BY_NAME[TOP]), 0.0)] for g in groups}
    todo = [(g, kind) for g in groups for kind in options_of[g.name] if kind.name != TOP]
    if reporter:
        reporter.start("fit: probe builds", len(todo), "builds")
    for i, (g, kind) in enumerate(todo):
        mix = dict(top, **{g.name: kind})
        planned = planned_info(base, groups, mix)
        drift, built = probe.cached_drift(overrides_for(mix, groups), planned.file_size)
        if built is not None:
            check_types(built, planned, f"the probe of {g.name} at {kind.name}")
        choices[g.name].append(Choice(kind, g.bytes_at(kind), max(drift["kl_mean"] - top_drift["kl_mean"], 0.0),
                                      max(drift["kl_p999"] - top_drift["kl_p999"], 0.0), options.tail_weight))
        if reporter:
            reporter.advance_to(i + 1)
    if reporter:
        reporter.finish()
    costs = {name: {c.kind.name: {"kl": round(c.kl, 6), "kl_p999": round(c.tail, 6), "bytes": c.n_bytes} for c in cs}
             for name, cs in choices.items()}
    chosen, planned = _within(choices, allowed, budget, groups)
    predicted = top_drift["kl_mean"] + sum(c.kl for c in chosen.values())
    held = budget.held(planned) if device is not None else None
    return FitPlan({name: c.kind for name, c in chosen.items()}, planned, round(predicted, 6), costs, top_drift["kl_mean"], held), groups


def fitted_name(bits_per_weight: float) -> str:
    return f"{FIT_PREFIX}{bits_per_weight:.2f}"


def fit_record(plan: FitPlan, groups: list[Group], options: FitOptions, probes: int, reused: int, measured: dict[str, Any]) -> dict[str, Any]:
    """What variants.json keeps of a fit (options.fit): enough to rebuild it and to judge it."""
    return {
        "target": {k: v for k, v in asdict(options.target).items() if v is not None},
        "groups": {g.name: plan.assignment[g.name].name for g in groups},
        "patterns": dict(overrides_for(plan.assignment, groups)),
        "tensors": {t.name: t.type_name for t in plan.planned.tensors},
        "costs": plan.costs,
        "probe_builds": probes,
        "probes_reused": reused,
        "max_builds": options.max_builds,
        "drift_chunks": options.drift_chunks,
        "kl_top": round(plan.kl_top, 6),
        "predicted_kl": plan.predicted_kl,
        "measured": {k: measured[k] for k in ("kl_mean", "kl_p99", "kl_p999", "top1_agreement", "tokens_scored")},
        **({"predicted_peak_bytes": plan.held_bytes} if plan.held_bytes is not None else {}),
    }


def build_plan(probe: Probe, plan: FitPlan, groups: list[Group], into: Path, reporter: Reporter | None) -> tuple[GgufInfo, dict[str, Any]]:
    """Build the chosen mix into `into` (a temporary the caller publishes), check its types, and
    measure its drift as the probes were measured: (its header, the drift)."""
    if reporter:
        reporter.note(f"fit: {probe.builds} probe builds; building the mix ({plan.planned.file_size / MIB:.1f} MiB, "
                      f"{plan.planned.bits_per_weight:.2f} bits/weight, predicted mean KL {plan.predicted_kl:.4f})")
    probe.build(overrides_for(plan.assignment, groups), into, plan.planned.file_size, reporter)
    if reporter:
        reporter.finish()
    info = read_gguf(into)
    check_types(info, plan.planned, "the fitted build")
    return info, probe.measure(into)
