"""The commands about and on the target device: `devices` (list, detect, show), `plan`, `profile`
and `eval`. None of them imports the build side (torch, transformers)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from edgecds.commands.common import (
    default_of,
    device_option,
    draft_options,
    drift_chunks_option,
    print_json,
    profiles_dir_option,
    table,
    whole,
)
from edgecds.compare import DEFAULT_ALPHA
from edgecds.engine import DEFAULT_CTX
from edgecds.errors import EdgecdsError
from edgecds.evaluate import MODES, EvalConfig
from edgecds.matcher import THINK_TOKENS
from edgecds.profile import ProfileConfig
from edgecds.target import AUTO, DEVICE_HELP, resolve_target
from edgecds.tune import OBJECTIVES, TuneConfig


@click.group()
@profiles_dir_option(help="A folder of your own device profiles (*.toml), added to the shipped ones; repeatable. Also: EDGECDS_PROFILES.")
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
        print_json([p.to_dict() for p in profiles.values()])
        return
    rows = [[p.id, p.device_class, p.memory_kind, f"{p.total_gib:g}", f"{p.budget_gib:g}", f"{p.bandwidth_gbs:g}", ",".join(p.backends), ",".join(p.formats)]
            for p in profiles.values()]
    table("Device profiles", ["id", "class", "memory", "GiB", "budget GiB", "GB/s", "backends", "formats"], rows)


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
        print_json({"host": match.host.to_dict(), "profile": match.profile.id, "reason": match.reason, "differences": list(match.differences)})
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
    from edgecds.devices import PROFILE_FIELDS

    profile = resolve_target(device_id, profiles_dirs).device
    data = profile.to_dict()
    if as_json:
        print_json(data)
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


@click.command()
@click.argument("variants", type=click.Path(path_type=Path, exists=True), required=False)
@device_option(DEVICE_HELP)
@click.option("--ctx", "n_ctx", type=click.IntRange(min=16), help="Context length.  [default: the device's]")
@click.option("--cache-type", "kv_type", default=default_of(ProfileConfig, "cache_type"), show_default=True,
              help="KV-cache type for K and V, as llama.cpp's -ctk/-ctv (f16, q8_0, q4_0, ...).")
@click.option("--model-config", "model_config", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="Estimate from a model's config.json alone, before downloading it (instead of VARIANTS; needs the build extra).")
@click.option("--types", "types_text", help="With --model-config: the GGUF types to estimate.  [default: the default GGUF types]")
@click.option("--draft", metavar="TYPE", help="Plan each variant with this GGUF variant beside it as a speculative draft (its "
              "memory added: weights, KV cache at the context, buffers); 'ngram' adds none.")
@profiles_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def plan(variants: Path | None, device_id: str, n_ctx: int | None, kv_type: str, model_config: Path | None, types_text: str | None,
         draft: str | None, profiles_dirs: tuple[Path, ...], as_json: bool) -> None:
    """Predict which variants fit a device, and how fast they run there, before anything is loaded.

    VARIANTS is a variants.json written by `edgecds quantize` (or its folder), or a GGUF file you
    downloaded (or a folder of them): it is recorded as it is, by its hash and the quantization its
    header names, in variants.json beside it, never requantized. Every figure is a
    prediction from the files' headers and the device profile, not a measurement; `edgecds
    profile` measures on the device itself. With --model-config, the files do not exist yet: sizes
    come from the config's shapes and llama.cpp's choice of type per tensor, and are estimates.

    \b
    Examples:
      edgecds plan --device jetson-orin-nano-8gb edgecds-out/SmolLM2-135M-Instruct
      edgecds plan --device jetson-orin-nano-8gb ~/Downloads/Qwen3-4B-Q4_K_M.gguf
      edgecds plan --device rtx-3060-12gb variants.json --ctx 8192 --cache-type q8_0 --json
      edgecds plan --device jetson variants.json      # every Jetson profile
      edgecds plan --model-config Qwen3-30B-A3B/config.json --types Q4_K_M,Q8_0 --device jetson-orin-nx-16gb --ctx 8192
    """
    from edgecds.devices import DEVICE_CLASSES
    from edgecds.target import plan_devices

    if (variants is None) == (model_config is None):
        raise click.UsageError("give either VARIANTS (a GGUF file, a variants.json or its folder) or --model-config config.json")
    if types_text and model_config is None:
        raise click.UsageError("--types goes with --model-config; with VARIANTS every recorded variant is planned")
    if draft and model_config is not None:
        raise click.UsageError("--draft goes with VARIANTS: it names one of their GGUF variants")
    targets = plan_devices(device_id, profiles_dirs)
    if model_config is not None:
        from edgecds.formats.types import DEFAULT_TYPES, parse_type_list
        from edgecds.quant.from_config import config_plan

        types = parse_type_list(types_text or ",".join(DEFAULT_TYPES))
        plans = [config_plan(model_config, types, device, n_ctx, kv_type) for device in targets]
    else:
        from edgecds.hwbench.predict import plan as make_plan

        assert variants is not None
        plans = [make_plan(variants, device, n_ctx, kv_type, draft=draft) for device in targets]
    if as_json:  # one device: its plan; a class: a list, one plan a device
        print_json(plans[0].to_dict() if device_id not in DEVICE_CLASSES else [p.to_dict() for p in plans])
    else:
        from edgecds.tables import plan_table, print_table

        for result, device in zip(plans, targets, strict=True):
            print_table(plan_table(result, device))
    if not any(p.fits_any for p in plans):  # a script (or a person) must not read "planned" as "fits"
        names = ", ".join(p.device for p in plans)
        raise EdgecdsError(f"no variant is predicted to fit {names}" + ("" if as_json else "; the notes under the table say what would"))


@click.command()
@click.argument("variants", type=click.Path(path_type=Path, exists=True))
@device_option("Device profile to measure for; 'auto' takes the one detected here. Another device is refused unless --measure-anyway.",
               default=AUTO)
@click.option("--types", "types_text", metavar="LIST", help="Only these variants (comma list of quant types). Default: all.")
@click.option("--ctx", "n_ctx", type=click.IntRange(min=16), help="Context length.  [default: the device's]")
@click.option("--threads", "-t", type=click.IntRange(min=1), help="Threads.  [default: the device's cores]")
@click.option("--n-gpu-layers", "-ngl", "n_gpu_layers", type=click.IntRange(min=-1), help="Layers on the GPU, -1 all.  [default: all on a GPU device]")
@click.option("--cache-type", "kv_type", default=default_of(ProfileConfig, "cache_type"), show_default=True,
              help="KV-cache type for K and V (llama.cpp's -ctk/-ctv).")
@click.option("--flash-attn/--no-flash-attn", "-fa", default=default_of(ProfileConfig, "flash_attn"), show_default=True, help="llama.cpp's flash attention.")
@click.option("--prompt-tokens", "-p", "prompt_tokens", type=click.IntRange(min=1), default=default_of(ProfileConfig, "prompt_tokens"), show_default=True,
              help="Prompt-processing test size (llama-bench -p).")
@click.option("--decode-tokens", "-n", "decode_tokens", type=click.IntRange(min=1), default=default_of(ProfileConfig, "decode_tokens"), show_default=True,
              help="Generation test size (llama-bench -n).")
@click.option("--repeats", "-r", type=click.IntRange(min=1), default=default_of(ProfileConfig, "repeats"), show_default=True,
              help="Repeats after a warm-up; median and range are reported.")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=whole(default_of(ProfileConfig, "timeout")), show_default=True,
              help="Seconds one variant may take; then it is killed and recorded as failed.")
@click.option("--no-accuracy", is_flag=True, help="Measure memory and speed only; skip the clinical accuracy (edgecds eval).")
@click.option("--cases", type=click.Path(path_type=Path, dir_okay=False, exists=True), help="Cases for the accuracy.  [default: the shipped set]")
@drift_chunks_option("The accuracy's drift on the first N chunks of 512 tokens of the clinical text (llama-perplexity --chunks).")
@click.option("--measure-anyway", is_flag=True, help="Measure on a machine that is not the --device; results are marked as measured on this machine.")
@click.option("--force", is_flag=True, help="Measure again variants already measured with the same settings on this machine.")
@draft_options("Also decode each variant's answer with this draft, in the same processes: another GGUF variant's type "
               "(e.g. Q2_K) or 'ngram' (prompt lookup); records the speed with and without it and the tokens it got right.")
@click.option("--output", "-o", type=click.Path(path_type=Path, dir_okay=False), help="Results file.  [default: results.json beside variants.json]")
@profiles_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress on stderr.")
def profile(variants: Path, device_id: str, types_text: str | None, n_ctx: int | None, threads: int | None, n_gpu_layers: int | None,
            kv_type: str, flash_attn: bool, prompt_tokens: int, decode_tokens: int, repeats: int, timeout: float,
            no_accuracy: bool, cases: Path | None, drift_chunks: int | None, measure_anyway: bool, force: bool, draft: str | None,
            draft_max: int, draft_p_min: float, output: Path | None, profiles_dirs: tuple[Path, ...], as_json: bool, quiet: bool) -> None:
    """Measure every variant on this device: load time, peak memory, prompt and decode speed,
    then clinical accuracy (as `edgecds eval`; --no-accuracy skips it).

    Run it on the target device itself. Each variant runs in a fresh process; a variant predicted
    not to fit the device's memory is skipped, one that crashes or times out is recorded as
    failed, and the run goes on. Results go to results.json after every variant; a re-run skips
    what is already measured with the same settings on this machine. VARIANTS may be a GGUF file
    you downloaded (as for `plan`).

    \b
    Examples:
      edgecds profile edgecds-out/SmolLM2-135M-Instruct
      edgecds profile ~/Downloads/Qwen3-4B-Q4_K_M.gguf --no-accuracy
      edgecds profile variants.json --device jetson-orin-nano-8gb --types Q4_K_M,Q8_0 -r 5 --json
    """
    from edgecds.formats.types import parse_type_names
    from edgecds.profile import run_profile
    from edgecds.progress import make_reporter

    config = ProfileConfig(
        variants=variants, device=device_id, profiles_dirs=profiles_dirs, types=parse_type_names(types_text),
        n_ctx=n_ctx, threads=threads, n_gpu_layers=n_gpu_layers, cache_type=kv_type, flash_attn=flash_attn,
        prompt_tokens=prompt_tokens, decode_tokens=decode_tokens, repeats=repeats, timeout=timeout,
        measure_anyway=measure_anyway, force=force, output=output, accuracy=not no_accuracy, cases=cases, drift_chunks=drift_chunks,
        draft=draft, draft_max=draft_max, draft_p_min=draft_p_min,
    )
    result = run_profile(config, make_reporter(quiet))
    if as_json:
        print_json(result.to_dict())
        return
    for note in result.notes:
        click.echo(f"note: {note}", err=True)

    from edgecds.tables import measurements_table, print_table

    where = "" if result.on_target else f" (measured on {result.host.detected_profile}, not the device)"
    print_table(measurements_table([o.record for o in result.outcomes], f"Measured on {result.device}{where}",
                                   [o.reused for o in result.outcomes]))
    for o in result.outcomes:
        spec = o.record.measured.speculative if o.record.measured is not None else None
        if spec is not None:
            rate = f"{spec.acceptance_rate:.0%}" if spec.acceptance_rate is not None else "none"
            same = "the same answer as" if spec.identical else "an answer that differs from the one (batched arithmetic)"
            click.echo(f"{o.record.variant.type} with the {spec.draft} draft: decode {spec.plain_tps.median:.1f} -> "
                       f"{spec.draft_tps.median:.1f} tokens/s ({spec.speedup:.2f}x, {spec.verdict}), drafted tokens kept {rate}, "
                       f"{same} without it")
    if result.evaluation is not None:
        _print_eval_table(result.evaluation)
    click.echo(f"Recorded in {result.results_file}")


@click.command("eval")
@click.argument("variants", type=click.Path(path_type=Path, exists=True))
@click.option("--cases", type=click.Path(path_type=Path, dir_okay=False),
              help="Your own cases (edgecds JSONL, open-ended or MCQ, or MedQA-/MedMCQA-style JSONL), or `open` for the shipped "
                   "64 open-ended cases.  [default: the shipped 155 MCQ cases]")
@click.option("--mode", type=click.Choice(MODES), default=default_of(EvalConfig, "mode"), show_default=True,
              help="loglik: each option's log-probability (works for tiny models); generate: the model's own answer; topk: k differentials.")
@click.option("-k", "k", type=click.IntRange(min=1, max=10), default=default_of(EvalConfig, "k"), show_default=True, help="Differentials listed in topk mode.")
@click.option("--think-tokens", type=click.IntRange(min=0), default=THINK_TOKENS, show_default=True,
              help="generate/topk: tokens a reasoning model may think (<think>, harmony analysis) before its answer; set aside before matching.")
@click.option("--samples", type=click.IntRange(min=0, max=100), default=default_of(EvalConfig, "sampling.samples"), show_default=True,
              help="generate/topk: seeded samples per case for pass@k (k = 1, 3, 5 up to this), next to greedy accuracy.")
@click.option("--temperature", type=click.FloatRange(min=0.0, min_open=True), default=default_of(EvalConfig, "sampling.temperature"), show_default=True,
              help="Sampling temperature (pass@k).")
@click.option("--top-p", type=click.FloatRange(0.0, 1.0, min_open=True), default=default_of(EvalConfig, "sampling.top_p"), show_default=True,
              help="Nucleus sampling mass (pass@k).")
@click.option("--seed", type=int, default=default_of(EvalConfig, "sampling.seed"), show_default=True,
              help="Seed of the pass@k samples (the same seed gives the same answers).")
@click.option("--judge", type=click.Path(path_type=Path, exists=True),
              help="generate/topk: a variant (GGUF file or ONNX folder) that grades each answer against the reference; "
                   "its agreement with the matcher is reported as Cohen's kappa.")
@click.option("--types", "types_text", metavar="LIST", help="Only these variants (each format's float reference is always scored). Default: all.")
@click.option("--limit", type=click.IntRange(min=1), help="Only the first N cases.")
@click.option("--ctx", "n_ctx", type=click.IntRange(min=512), default=DEFAULT_CTX, show_default=True, help="Context length.")
@click.option("--threads", "-t", type=click.IntRange(min=1), help="Threads.  [default: llama.cpp's]")
@click.option("--no-drift", is_flag=True, help="Skip the KL divergence and perplexity on the clinical text.")
@drift_chunks_option("Only the first N chunks of 512 tokens of the clinical text (llama-perplexity --chunks): quicker, less precise.")
@click.option("--force", is_flag=True, help="Score again variants already scored on these cases on this machine.")
@click.option("--output", "-o", type=click.Path(path_type=Path, dir_okay=False), help="Results file.  [default: results.json beside variants.json]")
@profiles_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress on stderr.")
def eval_command(variants: Path, cases: Path | None, mode: str, k: int, think_tokens: int, samples: int, temperature: float, top_p: float,
                 seed: int, judge: Path | None, types_text: str | None, limit: int | None, n_ctx: int, threads: int | None, no_drift: bool, drift_chunks: int | None, force: bool,
                 output: Path | None, profiles_dirs: tuple[Path, ...], as_json: bool, quiet: bool) -> None:
    """Clinical accuracy of every variant, and its drift from the float reference.

    Scores each case by the engine's own logits, reports accuracy with a 95% Wilson interval,
    flips against the reference with an exact McNemar test, and the KL divergence, top-1
    agreement and perplexity on a fixed clinical text. Results go to results.json.

    \b
    Examples:
      edgecds eval edgecds-out/SmolLM2-135M-Instruct
      edgecds eval variants.json --cases my-hospital-cases.jsonl --types Q4_K_M --json
      edgecds eval variants.json --cases open --mode topk -k 5 --samples 5
    """
    from edgecds.evaluate import Sampling, run_eval
    from edgecds.formats.types import parse_type_names
    from edgecds.progress import make_reporter

    config = EvalConfig(variants=variants, cases=cases, mode=mode, k=k, think_tokens=think_tokens,
                        sampling=Sampling(samples, temperature, top_p, seed), judge=judge, types=parse_type_names(types_text),
                        limit=limit, n_ctx=n_ctx, threads=threads, drift=not no_drift, drift_chunks=drift_chunks, force=force, output=output,
                        profiles_dirs=profiles_dirs)
    result = run_eval(config, make_reporter(quiet))
    if as_json:
        print_json(result.to_dict())
        return
    _print_eval_table(result)
    click.echo(f"Recorded in {result.results_file}")
    if result.review_file:
        click.echo(f"Answers that matched nothing, for a clinician to review: {result.review_file}")


def _print_eval_table(result: Any) -> None:
    from edgecds.tables import accuracy_table, answers_table, print_table

    records = [o.record for o in result.outcomes]
    print_table(accuracy_table(records, result.cases, result.mode, result.reference))
    if result.mode != "loglik":
        print_table(answers_table(records))


@click.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
def doctor(as_json: bool) -> None:
    """What this install can do here: the device profile this machine maps to, llama.cpp's build
    (CPU or GPU offload), onnxruntime's providers, NVML, signing, the build side, disk and memory,
    telemetry off; each with its fix. Exits 1 when something this machine needs is wrong.

    \b
    Example:
      edgecds doctor --json
    """
    from edgecds.doctor import as_dicts, run_doctor

    checks = run_doctor()
    problems = [c.name for c in checks if c.problem]
    if as_json:
        print_json(as_dicts(checks))
    else:
        table("edgecds doctor", ["check", "ok", "what is here", "fix"], [[c.name, c.shown, c.detail, c.fix] for c in checks])
        click.echo(f"{len(problems)} problem(s): {', '.join(problems)}; each row says its fix" if problems else "no problem found", err=True)
    if problems:  # a provisioning script must see it
        raise SystemExit(1)


@click.command("compare")
@click.argument("results", nargs=-1, required=True, type=click.Path(path_type=Path, dir_okay=False))
@click.option("--alpha", type=click.FloatRange(0.0, 0.5, min_open=True), default=DEFAULT_ALPHA, show_default=True,
              help="Significance level, applied to Holm-adjusted p-values.")
@click.option("--subgroups", is_flag=True, help="Also show the comparisons by specialty and by incidence.")
@click.option("--json", "as_json", is_flag=True, help="Print the comparisons as JSON.")
def compare_command(results: tuple[Path, ...], alpha: float, subgroups: bool, as_json: bool) -> None:
    """Evaluated variants, of one model or several, tested against each other on the cases they share.

    Every pair of evaluations in the results files: exact McNemar, the accuracy difference with
    Newcombe's 95% interval, Holm's correction across all comparisons. "No difference shown" is
    not "equivalent".

    \b
    Examples:
      edgecds compare distill/results.json base/results.json --alpha 0.01
      edgecds compare results.json --subgroups --json
    """
    from edgecds.compare import compare

    result = compare(list(results), alpha)
    if as_json:
        print_json(result.to_dict())
        return
    from edgecds.tables import comparison_table, print_table

    print_table(comparison_table(result.comparisons + (result.subgroups if subgroups else []), result.evaluations, alpha))


@click.command("tune")
@click.argument("variants", type=click.Path(path_type=Path, exists=True))
@device_option("Device profile to tune for; 'auto' takes the one detected here. Another device is refused unless --measure-anyway.",
               default=AUTO)
@click.option("--types", "types_text", metavar="LIST", help="Only these GGUF variants (comma list). Default: all GGUF variants.")
@click.option("--objective", type=click.Choice(OBJECTIVES), default=default_of(TuneConfig, "objective"), show_default=True,
              help="Fastest decode, lowest time to first token, or least peak memory (keeping --min-decode).")
@click.option("--min-decode", type=click.FloatRange(min=0), default=default_of(TuneConfig, "min_decode"), show_default=True,
              help="--objective memory: tokens/s to keep.")
@click.option("--knobs", default=",".join(default_of(TuneConfig, "knobs")), show_default=True,
              help="Settings to search, in order: threads, batch, flash, cache, gpu_layers.")
@click.option("--max-kl", type=click.FloatRange(min=0), default=default_of(TuneConfig, "max_kl"), show_default=True,
              help="Accuracy gate: mean KL divergence from the default settings' next-token distributions on the drift text.")
@click.option("--max-flips", "max_flip_share", type=click.FloatRange(0, 1), default=default_of(TuneConfig, "max_flip_share"), show_default=True,
              help="Accuracy gate: share of case answers allowed to change.")
@click.option("--cases", type=click.Path(path_type=Path, dir_okay=False, exists=True), help="Cases for the gate.  [default: the shipped set]")
@click.option("--case-limit", type=click.IntRange(min=1), default=default_of(TuneConfig, "case_limit"), show_default=True, help="The gate's first N cases.")
@drift_chunks_option("The gate's first N chunks of 512 tokens of the drift text (llama-perplexity --chunks).")
@click.option("--max-candidates", type=click.IntRange(min=1), default=default_of(TuneConfig, "max_candidates"), show_default=True,
              help="Stop after this many measured settings.")
@click.option("--repeats", "-r", type=click.IntRange(min=1), default=default_of(TuneConfig, "repeats"), show_default=True, help="Fresh processes per candidate.")
@click.option("--prompt-tokens", "-p", type=click.IntRange(min=1), default=default_of(TuneConfig, "prompt_tokens"), show_default=True,
              help="Prompt-processing test size.")
@click.option("--decode-tokens", "-n", type=click.IntRange(min=1), default=default_of(TuneConfig, "decode_tokens"), show_default=True,
              help="Generation test size.")
@click.option("--ctx", "n_ctx", type=click.IntRange(min=16), help="Context length (kept fixed).  [default: the device's]")
@click.option("--measure-anyway", is_flag=True, help="Tune on a machine that is not the --device; marked so.")
@click.option("--output", "-o", type=click.Path(path_type=Path, dir_okay=False), help="Results file.  [default: results.json beside variants.json]")
@click.option("--json", "as_json", is_flag=True, help="Print the searches as JSON on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress on stderr.")
def tune_command(variants: Path, device_id: str, types_text: str | None, knobs: str, as_json: bool, quiet: bool, **options: Any) -> None:
    """Search llama.cpp's runtime settings on this device; keep one only if the clinical answers stay.

    Threads, batch and micro-batch, flash attention, the K and V cache types and, on a GPU, the
    layers offloaded, one at a time from llama.cpp's defaults: each candidate the predictor says
    fits is measured in fresh processes (as `profile`), then gated against the defaults' next-token
    distributions (--max-kl) and case answers (--max-flips). The chosen settings become the
    variant's newest measurement here, so `bundle` writes them into runtime.json.

    \b
    Examples:
      edgecds tune edgecds-out/SmolLM2-135M-Instruct --types Q4_K_M,Q8_0
      edgecds tune out/ --objective memory --min-decode 20 --knobs cache,batch --json
    """
    from edgecds.formats.types import parse_type_names
    from edgecds.progress import make_reporter
    from edgecds.tune import run_tune, settings_text

    config = TuneConfig(variants=variants, device=device_id, types=parse_type_names(types_text),
                        knobs=tuple(k.strip() for k in knobs.split(",") if k.strip()), **options)
    records = run_tune(config, make_reporter(quiet))
    if as_json:
        print_json({"tunings": [asdict(r) for r in records]})
        return
    for r in records:
        rows = [[c["changed"], settings_text(c["settings"]), c["status"], _fmt(c["decode_tps"], ".1f"), _fmt(c["ttft_seconds"], ".3f"),
                 _fmt((c["peak_rss_bytes"] or 0) / 2**20 if c["peak_rss_bytes"] else None, ".0f"), _fmt(c["kl_mean"], ".4f"),
                 _fmt(c["flip_share"], ".0%"), c["reason"]] for c in r.candidates]
        table(f"{r.variant.type} on {r.device}: {r.spec['objective']} x{r.ratio} against the defaults, {r.measured} measured",
              ["knob", "settings", "status", "decode t/s", "ttft s", "peak MiB", "KL", "flips", "why"], rows)
    click.echo("Recorded in the results file; `edgecds bundle` runs the bundle with the chosen settings.")


def _fmt(value: Any, spec: str) -> str:
    return "" if value is None else format(value, spec)
