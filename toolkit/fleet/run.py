"""`edgecds fleet profile` and `edgecds fleet eval`, on the build machine (a node of the cluster).

One Ray task per (device kind, variant), scheduled only on nodes holding that kind's resource; Ray
retries a task whose node dies on another node of the kind, and a kind left with no live node has
its tasks recorded as failed rather than waited on. Each node's records are validated and merged
into results.json as they arrive; fleet.json beside it records every task's outcome, so a re-run
measures only what is missing.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgecds.adopt import open_variants
from edgecds.atomic import folder_lock, write_json
from edgecds.devices import load_profiles
from edgecds.digest import cache_key, sha256_stream
from edgecds.errors import InvalidInputError, UnknownNameError, UsageError
from edgecds.evaluate import EvalConfig, reference_of
from edgecds.fleet.cluster import connect, device_resource, live_kinds
from edgecds.fleet.node import JOBS, TaskReport, TaskSpec, run_task
from edgecds.fleet.transfer import FileSpec, check_sha256, safe_relpath, start_server
from edgecds.jsonfile import read_json_object
from edgecds.profile import ProfileConfig
from edgecds.progress import Reporter
from edgecds.results import RESULTS_FILE, ResultsFile, load_results, parse_evaluation, parse_host, parse_measurement
from edgecds.variants import VariantRecord, VariantsFile, check_unchanged, variant_file

FLEET_LOG = "fleet.json"
LOG_SCHEMA = 1


@dataclass(frozen=True)
class JobOptions:
    """What the node's `profile` or `eval` runs with; part of each task's identity. The defaults
    are those of `edgecds profile` and `edgecds eval` on the device."""

    n_ctx: int | None = None
    threads: int | None = None
    prompt_tokens: int = ProfileConfig.prompt_tokens
    decode_tokens: int = ProfileConfig.decode_tokens
    repeats: int = ProfileConfig.repeats
    timeout: float = ProfileConfig.timeout
    mode: str = EvalConfig.mode
    limit: int | None = None
    drift: bool = True
    force: bool = False  # the node measures again what its own workspace already holds


@dataclass(frozen=True)
class FleetConfig:
    job: str  # profile or eval
    variants: Path
    devices: tuple[str, ...]
    address: str | None = None  # None: RAY_ADDRESS
    types: tuple[str, ...] = ()
    options: JobOptions = JobOptions()
    cases: Path | None = None  # eval: None is the shipped set
    output: Path | None = None  # default: results.json beside variants.json
    retries: int = 2  # further attempts on another node of the kind when a node dies
    again: bool = False  # run tasks fleet.json already records as done
    poll_seconds: float = 2.0
    task_timeout: float = 3600.0  # a kind that finishes no task for this long has its remaining tasks failed
    token: Path | None = None  # the cluster's token file; None: cluster.token_file's default


@dataclass
class TaskOutcome:
    id: str
    job: str
    device: str
    type: str
    sha256: str
    status: str  # done, reused (done by an earlier run), failed, no-node
    reason: str = ""
    node: str = ""
    host: str = ""
    keys: list[str] = field(default_factory=list)  # the records it merged
    received_bytes: int = 0
    reused_files: int = 0
    evicted_bytes: int = 0  # files the node deleted from its store to make room
    seconds: float = 0.0  # submitted to merged, as the build machine saw it
    node_seconds: float = 0.0  # on the node: receiving the files and measuring
    finished: str = ""


@dataclass(frozen=True)
class FleetResult:
    results_file: str
    log_file: str
    job: str
    nodes: dict[str, int]  # live nodes per requested device kind
    tasks: list[TaskOutcome]

    def to_dict(self) -> dict[str, Any]:
        return {"results_file": self.results_file, "log_file": self.log_file, "job": self.job, "nodes": self.nodes,
                "tasks": [asdict(t) for t in self.tasks]}


def _files_of(folder: Path, variant: VariantRecord) -> tuple[list[FileSpec], dict[str, str]]:
    """A variant's files as the node receives them (an ONNX variant is a folder of several)."""
    path = variant_file(folder, variant)
    safe_relpath(variant.path)
    if variant.format != "onnx":
        return [FileSpec(variant.path, check_sha256(variant.sha256, str(path)), variant.file_size)], {variant.sha256: str(path)}
    specs, offered = [], {}
    for rel, sha in sorted(variant.files.items()):
        safe_relpath(rel)
        file = path / rel
        if file.is_symlink() or not file.is_file():
            raise InvalidInputError(f"{file} is not a regular file in the variant's folder; quantize again")
        specs.append(FileSpec(f"{variant.path}/{rel}", check_sha256(sha, str(file)), file.stat().st_size))
        offered[sha] = str(file)
    return specs, offered


def _log_path(output: Path) -> Path:
    return output.parent / FLEET_LOG


def _read_log(output: Path) -> dict[str, dict[str, Any]]:
    path = _log_path(output)
    if not path.exists():
        return {}
    data = read_json_object(path)
    tasks = data.get("tasks")
    if data.get("schema_version") != LOG_SCHEMA or not isinstance(tasks, dict):
        raise InvalidInputError(f"{path} is not a fleet log this edgecds writes; move it away to start a new one")
    # an entry that is not what this edgecds writes is ignored: its task simply runs again
    return {k: v for k, v in tasks.items() if isinstance(v, dict) and isinstance(v.get("status"), str)
            and isinstance(v.get("keys"), list) and all(isinstance(x, str) for x in v["keys"]) and v["keys"]}


def _present_keys(results: ResultsFile) -> set[str]:
    return {r.key for r in results.records} | {e.key for e in results.evaluations}


@dataclass
class _Plan:
    specs: dict[str, TaskSpec] = field(default_factory=dict)  # task id -> spec, to run
    outcomes: list[TaskOutcome] = field(default_factory=list)  # decided without running
    files: dict[str, str] = field(default_factory=dict)  # sha256 -> path the server offers


def _plan(config: FleetConfig, folder: Path, variants: VariantsFile, results: ResultsFile, log: dict[str, dict[str, Any]],
          kinds: dict[str, int]) -> _Plan:
    plan = _Plan()
    chosen = variants.select(config.types, folder)
    cases = _cases_spec(config.cases, plan) if config.job == "eval" else None
    present = _present_keys(results)
    for device in config.devices:
        for variant in chosen:
            options = {k: v for k, v in asdict(config.options).items() if k != "force"}  # --force re-measures, it is not another task
            task_id = cache_key({"job": config.job, "device": device, "variant": variant.sha256, "options": options,
                                 "cases": asdict(cases) if cases else None})
            outcome = TaskOutcome(task_id, config.job, device, variant.type, variant.sha256, "")
            earlier = log.get(task_id, {})
            if earlier.get("status") in ("done", "reused") and set(earlier["keys"]) <= present and not config.again:
                plan.outcomes.append(replace(outcome, status="reused", keys=list(earlier["keys"]), node=str(earlier.get("node", "")),
                                             host=str(earlier.get("host", ""))))
            elif not kinds.get(device):
                plan.outcomes.append(replace(outcome, status="no-node", reason=f"no live node of the cluster is a {device}; run "
                                             f"`edgecds fleet join ADDRESS --device {device}` on one"))
            else:
                try:
                    plan.specs[task_id] = _spec(config, folder, variants, variant, device, cases, plan)
                except InvalidInputError as exc:  # changed or missing on the build machine: nothing is sent
                    plan.outcomes.append(replace(outcome, status="failed", reason=str(exc)))
    return plan


def _spec(config: FleetConfig, folder: Path, variants: VariantsFile, variant: VariantRecord, device: str, cases: FileSpec | None,
          plan: _Plan) -> TaskSpec:
    records = [variant]
    if config.job == "eval":  # flips are counted against the format's float reference, scored on the same node
        reference = reference_of([v for v in variants.variants if v.format == variant.format])
        records = [reference] + ([variant] if variant is not reference else [])
    specs: list[FileSpec] = []
    for record in records:
        check_unchanged(folder, record)  # only the bytes quantize recorded leave this machine
        files, offered = _files_of(folder, record)
        specs += files
        plan.files.update(offered)
    return TaskSpec(config.job, device, variant.type, asdict(variants.source), [asdict(r) for r in records], specs,
                    asdict(config.options), cases)


def _cases_spec(cases: Path | None, plan: _Plan) -> FileSpec | None:
    if cases is None:
        return None
    with open(cases, "rb") as handle:
        sha = sha256_stream(handle, cases.stat().st_size)
    plan.files[sha] = str(cases)
    return FileSpec(f"cases/{sha[:16]}.jsonl", sha, cases.stat().st_size)


def _check_devices(config: FleetConfig) -> None:
    if config.job not in JOBS:
        raise UsageError(f"unknown fleet job {config.job!r}; known: {', '.join(JOBS)}")
    if not config.devices:
        raise UsageError("name the device kinds: --devices ID,ID (see `edgecds devices list`)")
    known = load_profiles()  # the shipped profiles: a node knows exactly these
    for device in config.devices:
        if device not in known:
            raise UnknownNameError("device", device, sorted(known))


def run_fleet(config: FleetConfig, reporter: Reporter | None = None) -> FleetResult:
    _check_devices(config)
    folder, variants = open_variants(config.variants)
    output = config.output or folder / RESULTS_FILE
    output.parent.mkdir(parents=True, exist_ok=True)
    ray = connect(config.address, config.token)
    with folder_lock(output.parent):
        results = load_results(output) or ResultsFile()
        log = _read_log(output)
        kinds = live_kinds(ray)
        plan = _plan(config, folder, variants, results, log, kinds)
        for outcome in plan.outcomes:
            _note(reporter, outcome)
            log[outcome.id] = asdict(outcome)
        _save_log(output, log)
        ran = _schedule(ray, config, plan, results, output, log, reporter) if plan.specs else []
    nodes = {d: kinds.get(d, 0) for d in config.devices}
    return FleetResult(str(output), str(_log_path(output)), config.job, nodes, plan.outcomes + ran)


def _save_log(output: Path, log: dict[str, dict[str, Any]]) -> None:
    write_json(_log_path(output), {"schema_version": LOG_SCHEMA, "tasks": log})


def _note(reporter: Reporter | None, outcome: TaskOutcome) -> None:
    if reporter is None:
        return
    what = {"done": f"done on node {outcome.node[:12]} ({outcome.received_bytes} bytes sent, {outcome.reused_files} files already there)",
            "reused": "already done by an earlier run", "failed": f"failed: {outcome.reason}", "no-node": outcome.reason}[outcome.status]
    reporter.note(f"{outcome.job} {outcome.device} {outcome.type}: {what}")


@dataclass
class _Pending:
    task_id: str
    spec: TaskSpec
    submitted: float


def _schedule(ray: Any, config: FleetConfig, plan: _Plan, results: ResultsFile, output: Path, log: dict[str, dict[str, Any]],
              reporter: Reporter | None) -> list[TaskOutcome]:
    server = start_server(ray, plan.files)
    remote = ray.remote(run_task)
    pending: dict[Any, _Pending] = {}
    for task_id, spec in plan.specs.items():
        ref = remote.options(resources={device_resource(spec.device): 1}, num_cpus=0, max_retries=config.retries,
                             retry_exceptions=False).remote(spec, server)
        pending[ref] = _Pending(task_id, spec, time.perf_counter())
    progress = {spec.device: time.perf_counter() for spec in plan.specs.values()}  # when each kind last finished a task
    done: list[TaskOutcome] = []
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=config.poll_seconds)
            finished = [(ref, _collect(ray, ref, pending[ref])) for ref in ready] or _stalled(ray, pending, progress, config.task_timeout)
            for ref, outcome in finished:
                del pending[ref]
                progress[outcome.device] = time.perf_counter()
                if outcome.status == "done":
                    outcome = _merged(ray.get(ref), outcome, plan.specs[outcome.id], results, output)
                log[outcome.id] = asdict(outcome)
                _save_log(output, log)
                _note(reporter, outcome)
                done.append(outcome)
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
        ray.kill(server)
    return done


def _outcome(task: _Pending, status: str, reason: str = "") -> TaskOutcome:
    spec = task.spec
    return TaskOutcome(task.task_id, spec.job, spec.device, spec.type, spec.variants[-1]["sha256"], status, reason,
                       seconds=round(time.perf_counter() - task.submitted, 3), finished=datetime.now(timezone.utc).isoformat(timespec="seconds"))


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def _collect(ray: Any, ref: Any, task: _Pending) -> TaskOutcome:
    """A finished task's outcome: done, or failed with the node's own message."""
    from ray.exceptions import RayError, RayTaskError

    try:
        ray.get(ref)
    except RayTaskError as exc:  # the task raised: an edgecds error says what to do
        return _outcome(task, "failed", _first_line(exc.cause if getattr(exc, "cause", None) is not None else exc))
    except RayError as exc:  # the node or worker died and the retries are spent
        return _outcome(task, "failed", f"{type(exc).__name__}: the node ran the task and died or left (retries spent)")
    return _outcome(task, "done")


def _stalled(ray: Any, pending: dict[Any, _Pending], progress: dict[str, float], limit: float) -> list[tuple[Any, TaskOutcome]]:
    """Tasks of a kind with no live node left, or that finished nothing for `limit` seconds:
    cancelled and failed, not waited on (a task that finished meanwhile is collected)."""
    kinds = live_kinds(ray)
    lost = []
    now = time.perf_counter()
    for ref, task in pending.items():
        device = task.spec.device
        if kinds.get(device) and now - progress[device] < limit:
            continue
        if ray.wait([ref], timeout=0)[0]:
            lost.append((ref, _collect(ray, ref, task)))
            continue
        ray.cancel(ref, force=True)
        why = (f"every node of kind {device} left or died before the task finished" if not kinds.get(device)
               else f"no task of kind {device} finished in {limit:g} s (--task-timeout): the node is stuck or unreachable")
        lost.append((ref, _outcome(task, "failed", why)))
    return lost


def _merged(report: Any, outcome: TaskOutcome, spec: TaskSpec, results: ResultsFile, output: Path) -> TaskOutcome:
    """_merge, with a report that cannot be merged made a failed task, never a stop to the run."""
    try:
        return _merge(report, outcome, spec, results, output)
    except (InvalidInputError, TypeError, AttributeError, KeyError, ValueError) as exc:
        return replace(outcome, status="failed", reason=f"the node's report was refused: {exc}")


def _merge(report: TaskReport, outcome: TaskOutcome, spec: TaskSpec, results: ResultsFile, output: Path) -> TaskOutcome:
    """The node's records, validated as a results file's are and checked against the task, merged
    into results.json (atomically)."""
    if not isinstance(report, TaskReport):
        raise InvalidInputError(f"a {type(report).__name__}, not a task report (is the node's edgecds the same version?)")
    where = f"the report of node {str(report.node_id)[:12]}"
    host = parse_host(report.host, f"{where}: host")
    records = [parse_measurement(r, f"{where}: records[{i}]") for i, r in enumerate(report.records)]
    evaluations = [parse_evaluation(e, f"{where}: evaluations[{i}]") for i, e in enumerate(report.evaluations)]
    shas = {v["sha256"] for v in spec.variants}
    for item in [*records, *evaluations]:
        if item.host != host.id or item.variant.sha256 not in shas:
            raise InvalidInputError(f"{where} holds a record of another host or variant")
    if any(r.device != spec.device for r in records) or (spec.job == "profile" and not records) or (spec.job == "eval" and not evaluations):
        raise InvalidInputError(f"{where} does not answer the task ({spec.job} of {spec.type} on {spec.device})")
    results.hosts[host.id] = host
    for record in records:
        results.upsert(record)
    keys = {e.key for e in evaluations}
    results.evaluations = [e for e in results.evaluations if e.key not in keys] + evaluations
    results.save(output)
    failed = [r for r in records if r.status == "failed"]
    merged = replace(outcome, node=str(report.node_id), host=host.id, keys=[r.key for r in records] + sorted(keys),
                     received_bytes=report.received_bytes, reused_files=report.reused_files, evicted_bytes=report.evicted_bytes,
                     node_seconds=report.seconds)
    return replace(merged, status="failed", reason=failed[0].reason) if failed else merged
