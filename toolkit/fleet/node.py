"""What a fleet task does on the node it lands on: receive the variant's files by content, then
measure or score them with the very code `edgecds profile` and `edgecds eval` run on a device, in a
workspace kept per (job, model, device kind), so a reference scored once is reused by the next task.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgecds.atomic import write_json
from edgecds.errors import InvalidInputError
from edgecds.fleet.transfer import FileSpec, check_sha256, fetch, in_use, place
from edgecds.home import edgecds_home
from edgecds.variants import SCHEMA_VERSION, VARIANTS_FILE

JOBS = ("profile", "eval")
DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # a profile id: it names a folder


@dataclass(frozen=True)
class TaskSpec:
    """One (job, device kind, variant): everything the node needs, sent as plain data."""

    job: str
    device: str
    type: str  # the variant's type in variants.json
    source: dict[str, Any]  # variants.json's source record
    variants: list[dict[str, Any]]  # the variant's record, and for eval its float reference's
    files: list[FileSpec]
    options: dict[str, Any]  # the job's settings (fleet.run.JobOptions as a dict)
    cases: FileSpec | None = None  # eval: a case file of the user's; None is the shipped set


@dataclass
class TaskReport:
    node_id: str
    host: dict[str, Any]  # the node's HostFingerprint
    records: list[dict[str, Any]] = field(default_factory=list)  # MeasurementRecords (profile)
    evaluations: list[dict[str, Any]] = field(default_factory=list)  # EvalRecords (eval)
    received_bytes: int = 0
    reused_files: int = 0
    evicted_bytes: int = 0  # kept files deleted to make room for this task's
    seconds: float = 0.0


def workspace_for(spec: TaskSpec) -> Path:
    source = check_sha256(spec.source.get("sha256"), "the model's sha256")[:16]
    if spec.job not in JOBS or not DEVICE_ID.fullmatch(spec.device):
        raise InvalidInputError(f"a fleet task for job {spec.job!r} on device {spec.device[:40]!r}: refused")
    return edgecds_home() / "fleet" / "work" / f"{spec.job}-{source}-{spec.device}"


def _write_variants(workspace: Path, spec: TaskSpec) -> None:
    """variants.json of the workspace: exactly the records this task brought (the reference the
    build machine chose, not one an earlier task left); the scores kept in results.json stay."""
    write_json(workspace / VARIANTS_FILE, {"schema_version": SCHEMA_VERSION, "source": spec.source, "variants": spec.variants})


def run_task(spec: TaskSpec, server: Any) -> TaskReport:
    """The Ray task's body (see run.py for how it is scheduled)."""
    import ray

    start = time.perf_counter()
    workspace = workspace_for(spec)
    workspace.mkdir(parents=True, exist_ok=True)
    report = TaskReport(ray.get_runtime_context().get_node_id(), {})
    files = [*spec.files, *([spec.cases] if spec.cases else [])]
    with in_use(f.sha256 for f in files):  # none of them deleted to make room, until the task ends
        for file in files:
            blob, arrival = fetch(ray, server, file)
            place(blob, workspace, file.relpath)
            report.received_bytes += arrival.received_bytes
            report.reused_files += arrival.reused
            report.evicted_bytes += arrival.evicted.bytes
        _write_variants(workspace, spec)
        if spec.job == "profile":
            _profile(workspace, spec, report)
        else:
            _evaluate(workspace, spec, report)
    report.seconds = round(time.perf_counter() - start, 3)
    return report


def _profile(workspace: Path, spec: TaskSpec, report: TaskReport) -> None:
    from edgecds.profile import ProfileConfig, run_profile

    options = spec.options
    config = ProfileConfig(variants=workspace, device=spec.device, types=(spec.type,), n_ctx=options.get("n_ctx"),
                           threads=options.get("threads"), prompt_tokens=options["prompt_tokens"], decode_tokens=options["decode_tokens"],
                           repeats=options["repeats"], timeout=options["timeout"], measure_anyway=True, force=options["force"],
                           accuracy=False)
    result = run_profile(config)
    report.host = asdict(result.host)
    report.records = [asdict(o.record) for o in result.outcomes]


def _evaluate(workspace: Path, spec: TaskSpec, report: TaskReport) -> None:
    from edgecds.evaluate import EvalConfig, run_eval
    from edgecds.target import AUTO, resolve_target

    options = spec.options
    target = resolve_target(AUTO)  # the scores carry this node as it detects itself
    cases = workspace / spec.cases.relpath if spec.cases else None
    config = EvalConfig(variants=workspace, cases=cases, mode=options["mode"], types=(spec.type,), limit=options.get("limit"),
                        threads=options.get("threads"), drift=options["drift"], force=options["force"])
    result = run_eval(config, None, target)
    report.host = asdict(target.fingerprint)
    report.evaluations = [asdict(o.record) for o in result.outcomes]
