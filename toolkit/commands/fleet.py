"""`edgecds fleet`: many devices, one Ray cluster (library: edgecds.fleet)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from edgecds.commands.common import default_of, print_json, table, whole
from edgecds.fleet.cluster import DEFAULT_PORT
from edgecds.fleet.run import FleetConfig

ADDRESS_HELP = "The cluster: HOST:PORT of its head (`edgecds fleet head`).  [default: $RAY_ADDRESS]"
TOKEN_HELP = ("The cluster's token file: the head makes it, every machine that joins or submits work holds a copy (chmod 600).  "
              "[default: $EDGECDS_FLEET_TOKEN_FILE, else $EDGECDS_HOME/fleet/auth_token]")


_token_option = click.option("--token-file", "token", type=click.Path(path_type=Path), help=TOKEN_HELP)


@click.group()
def fleet() -> None:
    """Profile and evaluate on many devices at once, through a Ray cluster.

    \b
    Example:
    On the build machine:  edgecds fleet head --address 10.0.0.5:6379
    Copy its token file (~/.cache/edgecds/fleet/auth_token) to each device, then there:
                           edgecds fleet join 10.0.0.5:6379
    On the build machine:  edgecds fleet status --address 10.0.0.5:6379
                           edgecds fleet profile out/ --devices jetson-orin-nano-8gb,laptop-x86-16gb --address 10.0.0.5:6379
                           edgecds fleet eval out/ --devices rtx-4090-24gb --address 10.0.0.5:6379
    """


def _start_options(func: Callable[..., Any]) -> Callable[..., Any]:
    func = _token_option(func)
    func = click.option("--num-cpus", type=click.IntRange(min=0), help="CPUs Ray may schedule other work on here.  [default: 0, fleet tasks need none]")(func)
    func = click.option("--block/--no-block", default=True, show_default=True,
                        help="Stay in the foreground (Ctrl-C leaves the cluster); --no-block returns once the node runs.")(func)
    return click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON, and do not start.")(func)


def _start(plan: Any, as_json: bool, what: str) -> None:
    if as_json:
        print_json({"argv": plan.argv, "env": plan.env, "device": plan.device})
        return
    click.echo(f"{what}: {' '.join(plan.argv)}", err=True)
    for note in plan.notes:
        click.echo(f"note: {note}", err=True)
    code = plan.run()
    if code != 0:
        raise click.ClickException(f"`ray start` exited with {code}; its message is above")


@fleet.command("head")
@click.option("--address", default=f"127.0.0.1:{DEFAULT_PORT}", show_default=True,
              help="HOST:PORT the head listens on: this machine's address on the hospital network (loopback: this machine only).")
@click.option("--device", "device_id", help="Also measure here, as this device profile.  [default: the head only schedules]")
@_start_options
def fleet_head(address: str, device_id: str | None, num_cpus: int | None, block: bool, as_json: bool, token: Path | None) -> None:
    """Start the cluster's head on the build machine: no dashboard, no usage statistics, no cloud probing.

    Ray's token authentication is on: the head makes a token file (once; kept for restarts) and
    only machines holding a copy can join or submit work.

    \b
    Example:
      edgecds fleet head --address 10.0.0.5:6379
    """
    from edgecds.fleet.cluster import head_plan

    _start(head_plan(address, device_id, num_cpus, block, token, make=not as_json), as_json, "starting the head")


@fleet.command("join")
@click.argument("address")
@click.option("--device", "device_id", help="The (shipped) device profile this node is.  [default: the one `edgecds devices detect` finds]")
@click.option("--store-gib", type=click.FloatRange(min=0.01, max=2**20, max_open=True), help="The most this node keeps of received variant files; the least recently "
              "used go first.  [default: no limit but the disk's: files are deleted only when a new one does not fit]")
@_start_options
def fleet_join(address: str, device_id: str | None, store_gib: float | None, num_cpus: int | None, block: bool, as_json: bool,
               token: Path | None) -> None:
    """Join this device to the cluster at ADDRESS, labelled with its device profile and nothing else.

    The node offers Ray one unit of `edgecds-device:<id>`, so it runs one fleet task at a time.
    It needs a copy of the head's token file (see --token-file).

    \b
    Example:
      edgecds fleet join 10.0.0.5:6379
      edgecds fleet join 10.0.0.5:6379 --device jetson-orin-nano-8gb --no-block
    """
    from edgecds.fleet.cluster import check_admitted, join_plan
    from edgecds.target import AUTO, resolve_target

    target = resolve_target(device_id or AUTO)
    if not target.here:
        click.echo(f"note: this machine is detected as {target.match.profile.id}, not {target.id}: its measurements for {target.id} "
                   "are recorded as made elsewhere (on_target false)", err=True)
    plan = join_plan(address, target.id, num_cpus, block, token, store_gib)
    if not as_json:
        check_admitted(address, plan.env)  # a refused token said so at once; Ray's own join would wait forever
    _start(plan, as_json, f"joining as {target.id}")


@fleet.command("status")
@click.option("--address", help=ADDRESS_HELP)
@_token_option
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def fleet_status(address: str | None, token: Path | None, as_json: bool) -> None:
    """The cluster's nodes and the device each is.

    \b
    Example:
      edgecds fleet status --address 10.0.0.5:6379 --json
    """
    from dataclasses import asdict

    from edgecds.fleet.cluster import connect, list_nodes

    nodes = list_nodes(connect(address, token))
    if as_json:
        print_json({"nodes": [asdict(n) for n in nodes]})
        return
    table("Fleet", ["node", "address", "alive", "devices", "CPUs", "GPUs", "memory GiB"],
          [[n.node_id[:12], n.address, "yes" if n.alive else "no", ", ".join(n.devices) or "-", f"{n.cpus:g}", f"{n.gpus:g}",
            f"{n.memory_gib:g}"] for n in nodes])


def _job_options(func: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed([
        click.argument("variants", type=click.Path(path_type=Path, exists=True)),
        click.option("--devices", "devices_text", required=True, metavar="ID,ID", help="Device kinds to run on (profile ids)."),
        click.option("--address", help=ADDRESS_HELP),
        _token_option,
        click.option("--types", "types_text", metavar="LIST", help="Only these variants (comma list). Default: all."),
        click.option("--threads", "-t", type=click.IntRange(min=1), help="Threads.  [default: the device's]"),
        click.option("--retries", type=click.IntRange(min=0), default=default_of(FleetConfig, "retries"), show_default=True,
                     help="Further attempts, on another node of the kind, when a node dies mid-task."),
        click.option("--again", is_flag=True, help="Run tasks fleet.json records as done; with --force the nodes measure again too."),
        click.option("--force", is_flag=True, help="Nodes measure again what their own workspace holds."),
        click.option("--output", "-o", type=click.Path(path_type=Path, dir_okay=False), help="Results file.  [default: results.json beside variants.json]"),
        click.option("--task-timeout", type=click.FloatRange(min=1), default=whole(default_of(FleetConfig, "task_timeout")), show_default=True,
                     help="Seconds a device kind may go without finishing a task before its remaining tasks are recorded as failed."),
        click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout."),
        click.option("--quiet", "-q", is_flag=True, help="No progress on stderr."),
    ]):
        func = option(func)
    return func


def _run(job: str, variants: Path, devices_text: str, types_text: str | None, options: Any, common: dict[str, Any],
         cases: Path | None = None) -> None:
    from edgecds.fleet.run import run_fleet
    from edgecds.formats.types import parse_type_names
    from edgecds.progress import make_reporter

    devices = tuple(d.strip() for d in devices_text.split(",") if d.strip())
    config = FleetConfig(job=job, variants=variants, devices=devices, address=common["address"], token=common["token"], types=parse_type_names(types_text),
                         options=options, cases=cases, output=common["output"], retries=common["retries"], again=common["again"],
                         task_timeout=common["task_timeout"])
    result = run_fleet(config, make_reporter(common["quiet"]))
    if common["as_json"]:
        print_json(result.to_dict())
    else:
        table(f"fleet {job}", ["device", "variant", "status", "node", "sent", "seconds", "reason"],
              [[t.device, t.type, t.status, t.node[:12], f"{t.received_bytes / 2**20:.1f} MiB", f"{t.seconds:g}", t.reason]
               for t in result.tasks])
        click.echo(f"Recorded in {result.results_file} (tasks: {result.log_file})")
    if any(t.status in ("failed", "no-node") for t in result.tasks):
        raise SystemExit(1)


@fleet.command("profile")
@_job_options
@click.option("--ctx", "n_ctx", type=click.IntRange(min=16), help="Context length.  [default: the device's]")
@click.option("--prompt-tokens", "-p", type=click.IntRange(min=1), default=default_of(FleetConfig, "options.prompt_tokens"), show_default=True,
              help="Prompt-processing test size.")
@click.option("--decode-tokens", "-n", type=click.IntRange(min=1), default=default_of(FleetConfig, "options.decode_tokens"), show_default=True,
              help="Generation test size.")
@click.option("--repeats", "-r", type=click.IntRange(min=1), default=default_of(FleetConfig, "options.repeats"), show_default=True,
              help="Fresh processes per variant.")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=whole(default_of(FleetConfig, "options.timeout")), show_default=True,
              help="Seconds a variant may take.")
def fleet_profile(variants: Path, devices_text: str, types_text: str | None, threads: int | None, n_ctx: int | None, prompt_tokens: int,
                  decode_tokens: int, repeats: int, timeout: float, **common: Any) -> None:
    """Measure memory and speed of each variant on a node of each device kind, as `edgecds profile` does there.

    The records merge into results.json as they arrive, with each node's host record; a re-run
    measures only what is missing. Exit status 1 when a task failed or a kind has no node.

    \b
    Example:
      edgecds fleet profile out/ --devices jetson-orin-nano-8gb,laptop-x86-16gb --address 10.0.0.5:6379
    """
    from edgecds.fleet.run import JobOptions

    options = JobOptions(n_ctx=n_ctx, threads=threads, prompt_tokens=prompt_tokens, decode_tokens=decode_tokens, repeats=repeats,
                         timeout=timeout, force=common.pop("force"))
    _run("profile", variants, devices_text, types_text, options, common)


@fleet.command("eval")
@_job_options
@click.option("--cases", type=click.Path(path_type=Path, dir_okay=False, exists=True), help="Case file.  [default: the shipped set]")
@click.option("--limit", type=click.IntRange(min=1), help="The first N cases only.")
@click.option("--no-drift", is_flag=True, help="Skip the drift text (KL divergence against the float reference).")
def fleet_eval(variants: Path, devices_text: str, types_text: str | None, threads: int | None, cases: Path | None, limit: int | None,
               no_drift: bool, **common: Any) -> None:
    """Score each variant's clinical accuracy on a node of each device kind, as `edgecds eval` does there.

    Each task scores the variant and its float reference on the same node (the paired statistics
    need both); the node keeps the reference's scores for its next task.

    \b
    Example:
      edgecds fleet eval out/ --devices rtx-4090-24gb --types Q4_K_M,Q8_0 --address 10.0.0.5:6379
    """
    from edgecds.fleet.run import JobOptions

    options = JobOptions(threads=threads, limit=limit, drift=not no_drift, force=common.pop("force"))
    _run("eval", variants, devices_text, types_text, options, common, cases)
