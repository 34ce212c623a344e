"""The fleet's cost per task: the same N variants profiled locally one by one (the library call a
person at the device makes) and through a local Ray cluster (a head and one device node on this
machine, loopback only), in the same run.

The difference per task is the fleet's overhead: scheduling, the file transfer (a first run, the
node holding nothing) and the merge into results.json; a second fleet run, the node now holding
every file, separates the transfer. Writes JSON.

    python -m edgecds.hwbench.bench.bench_fleet edgecds-out/SmolLM2-135M-Instruct --types Q8_0,Q6_K,Q4_K_M,Q2_K
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgecds.atomic import write_json
from edgecds.fleet.cluster import TOKEN_ENV, device_resource, head_environment, make_token, token_file
from edgecds.fleet.run import FleetConfig, FleetResult, JobOptions, run_fleet
from edgecds.profile import ProfileConfig, run_profile
from edgecds.target import resolve_target
from edgecds.variants import open_variants, variant_file


def _copy(variants: Path, types: tuple[str, ...], into: Path) -> Path:
    folder, record = open_variants(variants)
    into.mkdir(parents=True)
    shutil.copy(folder / "variants.json", into)
    for variant in record.select(types, folder):
        shutil.copy(variant_file(folder, variant), into / variant.path)
    return into


def _local(folder: Path, device: str, types: tuple[str, ...], options: JobOptions) -> list[float]:
    seconds = []
    for t in types:
        start = time.perf_counter()
        run_profile(ProfileConfig(variants=folder, device=device, types=(t,), n_ctx=options.n_ctx, prompt_tokens=options.prompt_tokens,
                                  decode_tokens=options.decode_tokens, repeats=options.repeats, accuracy=False, force=True))
        seconds.append(time.perf_counter() - start)
    return seconds


def _fleet(config: FleetConfig) -> tuple[float, FleetResult]:
    start = time.perf_counter()
    result = run_fleet(config)
    elapsed = time.perf_counter() - start
    if any(t.status != "done" for t in result.tasks):
        raise SystemExit(f"a fleet task did not finish: {[(t.type, t.status, t.reason) for t in result.tasks]}")
    return elapsed, result


def _tasks(result: FleetResult) -> list[dict[str, Any]]:
    return [{k: v for k, v in asdict(t).items() if k in ("type", "seconds", "node_seconds", "received_bytes", "reused_files")}
            for t in result.tasks]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", type=Path)
    parser.add_argument("--types", default="Q8_0,Q6_K,Q4_K_M,Q2_K")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--output", type=Path, default=Path("bench-results/fleet.json"))
    args = parser.parse_args(argv)
    types = tuple(t.strip().upper() for t in args.types.split(","))
    options = JobOptions(n_ctx=512, prompt_tokens=64, decode_tokens=32, repeats=args.repeats)
    work = Path(tempfile.mkdtemp(prefix="edgecds-bench-fleet-"))
    try:
        device = resolve_target("auto").id
        local_folder, fleet_folder = _copy(args.variants, types, work / "local"), _copy(args.variants, types, work / "fleet")
        local = _local(local_folder, device, types, options)
        cluster, start_seconds = _cluster(work, device)
        try:
            config = FleetConfig("profile", fleet_folder, (device,), cluster.address, types, options, poll_seconds=0.2)
            cold, cold_result = _fleet(config)
            warm, warm_result = _fleet(replace(config, options=replace(options, force=True), again=True))
        finally:
            import ray

            ray.shutdown()
            cluster.shutdown()
        n = len(types)
        report = {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": device, "variants": list(types),
            "options": asdict(options), "local_seconds": [round(s, 3) for s in local], "local_total": round(sum(local), 3),
            "cluster_start_seconds": round(start_seconds, 3), "fleet_cold_total": round(cold, 3), "fleet_warm_total": round(warm, 3),
            "overhead_per_task_cold": round((cold - sum(local)) / n, 3), "overhead_per_task_warm": round((warm - sum(local)) / n, 3),
            "transfer_per_task": round((cold - warm) / n, 3), "ratio_cold": round(cold / sum(local), 3), "ratio_warm": round(warm / sum(local), 3),
            "tasks_cold": _tasks(cold_result), "tasks_warm": _tasks(warm_result),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.output, report)
    print(f"local {report['local_total']} s, fleet {report['fleet_cold_total']} s (node holding the files: {report['fleet_warm_total']} s); "
          f"per task {report['overhead_per_task_cold']} s ({report['overhead_per_task_warm']} s warm) -> {args.output}")


def _cluster(work: Path, device: str) -> tuple[Any, float]:
    """A head (schedules only) and one device node of this machine's kind, with its own home."""
    token = make_token(token_file())
    os.environ.update(head_environment("127.0.0.1:6379", token))
    os.environ[TOKEN_ENV] = str(token)  # the driver's token stays the head's when EDGECDS_HOME becomes the node's below
    from ray.cluster_utils import Cluster

    start = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False, "node_ip_address": "127.0.0.1"})
    os.environ["EDGECDS_HOME"] = str(work / "node")
    cluster.add_node(num_cpus=1, resources={device_resource(device): 1}, node_ip_address="127.0.0.1")
    cluster.wait_for_nodes()
    return cluster, time.perf_counter() - start


if __name__ == "__main__":
    main()
