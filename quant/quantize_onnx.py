"""The ONNX half of `edgecds quantize`: export fp32 with Optimum, derive int8/int4/fp16 from it.

Each variant is a folder (graph, tokenizer, configs) built under a temporary name, checked
(external data inside the folder, loads in onnxruntime, generates), hashed file by file, and
published whole; a quantized variant's drift from the fp32 export on the fixed clinical text is
measured and recorded with it, and a variant past the limits below is flagged.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgecds import __version__
from edgecds.atomic import atomic_path
from edgecds.digest import cache_key, digest_of_files
from edgecds.formats.types import QUANT_TYPE_BY_NAME, QuantType
from edgecds.progress import ESTIMATED_BYTES, Reporter
from edgecds.quant.onnx_build import OnnxOptions
from edgecds.variants import SourceRecord, VariantRecord, VariantsFile, is_reusable, variant_file

# Drift limits for flagging a quantized ONNX variant, on the same text and measure `edgecds eval`
# uses. llama.cpp's recommended 4-bit type (Q4_K_M) drifted KL 0.057 from F16 on the default model;
# a variant drifting about twice that, or changing the top token at more than 1 position in 5,
# no longer behaves like its reference and its clinical accuracy must be measured before use.
DRIFT_LIMITS = {"kl_mean_max": 0.10, "top1_agreement_min": 0.80}
REFERENCE = "ONNX_FP32"


def _key(q: QuantType, parent_sha: str, options: OnnxOptions, tools: dict[str, str]) -> str:
    return cache_key({"type": q.name, "parent": parent_sha, "tools": tools, "options": options.as_key() if q.bits else {}})


def build_onnx(
    types: tuple[QuantType, ...], source_path: Path, source: SourceRecord, state: VariantsFile, out: Path,
    options: OnnxOptions, check_tokens: int, reporter: Reporter | None, on_record: Callable[[VariantRecord, bool], None],
) -> None:
    """Build the requested ONNX types (fp32 always, as the parent and reference of the others)."""
    from edgecds.quant import onnx_build

    tools = dict(onnx_build.tool_versions(), edgecds=__version__)
    recorded = state.by_type()
    fp32 = QUANT_TYPE_BY_NAME[REFERENCE]
    wanted = [fp32] + [q for q in types if q.name != REFERENCE]

    key = _key(fp32, source.sha256, options, tools)
    if is_reusable(recorded.get(fp32.name), key, out):
        base = recorded[fp32.name]
        if fp32 in types:
            on_record(base, True)
    else:
        base = _build(fp32, source_path, source, source.sha256, key, tools, out, options, check_tokens, reporter, None)
        on_record(base, False)
    base_dir = variant_file(out, base)
    reference: list[Any] = []  # fp32's drift log-probabilities, computed once when first needed
    for q in wanted[1:]:
        key = _key(q, base.sha256, options, tools)
        if is_reusable(recorded.get(q.name), key, out):
            on_record(recorded[q.name], True)
            continue
        on_record(_build(q, base_dir, source, base.sha256, key, tools, out, options, check_tokens, reporter, reference), False)


def _build(
    q: QuantType, parent: Path, source: SourceRecord, parent_sha: str, key: str, tools: dict[str, str], out: Path,
    options: OnnxOptions, check_tokens: int, reporter: Reporter | None, reference: list[Any] | None,
) -> VariantRecord:
    from edgecds.formats.onnx_model import read_onnx_folder
    from edgecds.hwbench.load_check import check_in_subprocess
    from edgecds.quant import onnx_build

    final = out / f"{source.name}-{q.name}"
    expected = q.estimated_bytes(source.n_parameters)
    notes: list[str] = []
    with atomic_path(final, directory=True) as temp:
        if reporter:
            reporter.start(f"{q.name:<10} {'export' if q.producer == 'optimum' else 'quantize'}", expected, ESTIMATED_BYTES)
        try:
            if q.producer == "optimum":
                seconds = onnx_build.export_fp32(parent, temp, expected, reporter)
            elif q.producer == "ort-float16":
                seconds, notes = onnx_build.convert_fp16(parent, temp)
            else:
                seconds, notes = onnx_build.quantize_weights(parent, temp, q, options)
            onnx_build.copy_side_files(parent, temp)
        finally:
            if reporter:
                reporter.finish()
        if reporter:
            reporter.note(f"{q.name}: verifying (external data, load in onnxruntime, {check_tokens} tokens, sha256)")
        start = time.perf_counter()
        info = read_onnx_folder(temp)
        check = check_in_subprocess(temp, check_tokens)
        drift = _drift(temp, out / f"{source.name}-{REFERENCE}", reference) if reference is not None else {}
        if drift.get("flagged"):
            notes.append(f"flagged: drift from fp32 past the limits ({drift['why']}); measure its clinical accuracy with `edgecds eval` before use")
        digest = digest_of_files(info.files)  # the folder's digest, from the per-file hashes just taken
        record = VariantRecord.built(
            q, check, seconds, time.perf_counter() - start,
            name=final.name, path=final.name, file_size=info.file_size, sha256=digest,
            bits_per_weight=round(info.weight_bytes * 8 / max(info.n_parameters, 1), 4), n_parameters=info.n_parameters,
            tensor_types=info.tensor_types, source_sha256=source.sha256, parent_sha256=parent_sha, tools=tools,
            options=options.as_key() if q.bits else {}, cache_key=key, warnings=notes, files=info.files, drift=drift,
        )
    if reporter and drift:
        reporter.note(f"{q.name}: against fp32, top-1 agreement {drift['top1_agreement']:.3f}, mean KL {drift['kl_mean']:.4f}"
                      + (" (flagged)" if drift["flagged"] else ""))
    return record


def _drift(variant: Path, fp32: Path, reference: list[Any]) -> dict[str, Any]:
    """Drift of `variant` from the fp32 export on the clinical drift text (the measure `eval` uses)."""
    from edgecds.cases import drift_text
    from edgecds.drift import drift_against, drift_logprobs
    from edgecds.engine import EngineSettings
    from edgecds.engine.factory import open_runtime

    settings = EngineSettings()
    text = drift_text()
    if not reference:
        runtime = open_runtime(fp32, settings)
        reference.extend(drift_logprobs(runtime, text))
        runtime.close()
    runtime = open_runtime(variant, settings)
    logprobs, _ = drift_logprobs(runtime, text)
    runtime.close()
    drift = drift_against(reference[0], logprobs, reference[1])
    why = []
    if drift["kl_mean"] > DRIFT_LIMITS["kl_mean_max"]:
        why.append(f"mean KL {drift['kl_mean']:.4f} > {DRIFT_LIMITS['kl_mean_max']}")
    if drift["top1_agreement"] < DRIFT_LIMITS["top1_agreement_min"]:
        why.append(f"top-1 agreement {drift['top1_agreement']:.3f} < {DRIFT_LIMITS['top1_agreement_min']}")
    return dict(drift, reference=REFERENCE, limits=DRIFT_LIMITS, flagged=bool(why), why="; ".join(why))
