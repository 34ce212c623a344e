"""The bundle's CycloneDX 1.7 ML bill of materials (layout.ML_BOM in the bundle), written from the
manifest: the model and its source, the quantization, the engine, the device profile, and the
measured figures with the case set's hash, in the standard's own fields so any CycloneDX tool
reads them. It is one of the bundle's files, so the manifest's hashes and the signature cover it.

The model card follows the schema's `modelCard`: `modelParameters` (task, architecture, the case
set as a dataset), `quantitativeAnalysis.performanceMetrics` (each figure with its interval where
it has one), `considerations` (intended use and limits). What the schema has no field for
(quantization type, per-tensor overrides, importance matrix, drift) is a property named
`edgecds:...`, as CycloneDX asks of extensions. A test validates the file against the schema.
"""

from __future__ import annotations

import uuid
from typing import Any

SPEC_VERSION = "1.7"


def _prop(name: str, value: Any) -> dict[str, str]:
    return {"name": f"edgecds:{name}", "value": str(value)}


def _metric(kind: str, value: Any, low: Any = None, high: Any = None, slice_: str | None = None) -> dict[str, Any]:
    metric: dict[str, Any] = {"type": kind, "value": str(value)}
    if slice_:
        metric["slice"] = slice_
    if low is not None and high is not None:
        metric["confidenceInterval"] = {"lowerBound": str(low), "upperBound": str(high)}
    return metric


def _metrics(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The measured figures: accuracy (Wilson 95%), McNemar against the reference, drift, and on
    the device, peak memory and decode speed."""
    out: list[dict[str, Any]] = []
    accuracy = manifest.get("accuracy") or {}
    cases = accuracy.get("cases") or {}
    where = f"{cases.get('name')} ({cases.get('n')} cases, {accuracy.get('mode')})" if cases else None
    metrics = accuracy.get("metrics") or {}
    if "accuracy" in metrics:
        out.append(_metric("accuracy", metrics["accuracy"], metrics.get("low"), metrics.get("high"), where))
    paired = accuracy.get("paired") or {}
    if paired:
        vs = f"against {accuracy.get('reference')} on the same cases"
        out.append(_metric("accuracy difference", paired.get("difference"), paired.get("low"), paired.get("high"), vs))
        out.append(_metric("exact McNemar p-value", paired.get("p_value"), slice_=f"{vs}: {paired.get('lost')} lost, {paired.get('gained')} gained"))
    drift = accuracy.get("drift") or {}
    for key in ("kl_mean", "kl_p999", "top1_agreement"):
        if key in drift:
            out.append(_metric(f"drift {key} against {accuracy.get('reference')}", drift[key], slice_="the drift text"))
    measured = ((manifest.get("measurements") or {}).get("record") or {}).get("measured") or {}
    if measured:
        device = manifest["device"]["id"]
        peak, decode = measured.get("peak_rss_bytes") or {}, measured.get("decode_tps") or {}
        if "high" in peak:
            out.append(_metric("peak memory, bytes", peak["high"], slice_=f"measured on {device}"))
        if "median" in decode:  # its low-high is the runs' range, not a confidence interval: said in the slice
            out.append(_metric("decode tokens/s (median)", decode["median"],
                               slice_=f"measured on {device}, {len(decode.get('samples', []))} runs from {decode.get('low')} to {decode.get('high')}"))
    return out


def _quantization(model: dict[str, Any], options: dict[str, Any]) -> list[dict[str, str]]:
    props = [_prop("quant_type", model["type"]), _prop("format", model["format"]), _prop("bits_per_weight", model["bits_per_weight"])]
    fit = model.get("fit")
    if fit:
        props += [_prop(f"tensor_type_override:{group}", kind) for group, kind in fit["groups"].items()]
        props.append(_prop("fit_target", ", ".join(f"{k}={v}" for k, v in fit["target"].items())))
    matrix = options.get("imatrix")
    if isinstance(matrix, dict):
        props += [_prop(f"imatrix:{k}", v) for k, v in sorted(matrix.items()) if isinstance(v, (str, int, float))]
    return props


def ml_bom(manifest: dict[str, Any], model_sha256: str, record_options: dict[str, Any]) -> dict[str, Any]:
    """The BOM for a bundle whose manifest is `manifest` (files not yet listed), whose model hashes to
    `model_sha256`, quantized with `record_options` (variants.json's options)."""
    model, device = manifest["model"], manifest["device"]
    cases = ((manifest.get("accuracy") or {}).get("cases")) or {}
    engine = ", ".join(f"{k} {v}" for k, v in sorted(manifest.get("tools", {}).items()))
    datasets = ([{"type": "dataset", "name": cases["name"], "description": f"{cases.get('n')} clinical vignettes, sha256 {cases.get('sha256')}"}]
                if cases.get("name") else [])
    component = {
        "type": "machine-learning-model", "bom-ref": "model", "name": model["name"], "version": model["type"],
        "hashes": [{"alg": "SHA-256", "content": model_sha256}],
        "pedigree": {"ancestors": [{"type": "machine-learning-model", "bom-ref": "source", "name": model["name"],
                                    "hashes": [{"alg": "SHA-256", "content": model["source_sha256"]}],
                                    "description": "the model edgecds was given, before quantization"}]},
        "properties": _quantization(model, record_options)
        + ([_prop("chat_template_sha256", model["chat_template_sha256"])] if model.get("chat_template_sha256") else []),
        "modelCard": {
            "modelParameters": {"task": "text-generation", "architectureFamily": model.get("architecture") or "unknown",
                                "modelArchitecture": model.get("architecture") or "unknown", "datasets": datasets},
            "quantitativeAnalysis": {"performanceMetrics": _metrics(manifest)},
            "considerations": {
                "useCases": ["decision support for a qualified clinician, offline on the device named in this bundle"],
                "technicalLimitations": ["a small case set gives a wide interval", "the model can be confidently wrong",
                                         "not validated on the clinic's own population"],
            },
        },
    }
    if model.get("licence"):
        component["licenses"] = [{"license": {"id": model["licence"]}}]
    profile = {"type": "data", "bom-ref": "device-profile", "name": device["id"],
               "data": [{"type": "configuration", "name": device["id"], "description": f"budget {device['budget_gib']} GiB"}],
               "properties": [_prop(k, v) for k, v in sorted(device.get("fields", {}).items()) if v is not None]}
    engine_component = {"type": "application", "bom-ref": "engine", "name": "edgecds runtime", "version": manifest["created_by"].split()[-1],
                        "description": f"runs the model with {engine}"}
    serial = uuid.uuid5(uuid.NAMESPACE_URL, f"edgecds:{manifest['bundle']}:{model_sha256}")  # the same bundle, the same serial
    components = [component, engine_component, profile]
    draft = manifest.get("draft")
    if draft is not None and draft.get("sha256"):  # bundle --draft: a second model file, drafting for the first
        m = draft["measured"]
        components.append({"type": "machine-learning-model", "bom-ref": "draft", "name": model["name"], "version": draft["type"],
                           "hashes": [{"alg": "SHA-256", "content": draft["sha256"]}],
                           "description": "speculative decoding draft: the answer stays the model's own",
                           "properties": [_prop("draft_speedup", m["speedup"]), _prop("draft_acceptance_rate", m["acceptance_rate"]),
                                          _prop("draft_max_tokens", draft["settings"]["max_tokens"]),
                                          _prop("draft_p_min", draft["settings"]["p_min"])]})
    return {
        "bomFormat": "CycloneDX", "specVersion": SPEC_VERSION, "serialNumber": f"urn:uuid:{serial}", "version": 1,
        "metadata": {"tools": {"components": [{"type": "application", "name": "edgecds", "version": manifest["created_by"].split()[-1]}]},
                     "component": {"type": "application", "bom-ref": "bundle", "name": manifest["bundle"]}},
        "components": components,
        "dependencies": [{"ref": "bundle", "dependsOn": [c["bom-ref"] for c in components]}],
    }
