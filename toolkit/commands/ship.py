"""What goes to the clinic and runs there: `report`, `bundle`, `keygen`, `verify`, `run` and `serve`."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from edgecds.commands.common import constraint_options, default_of, device_option, draft_options, print_json, profiles_dir_option, whole
from edgecds.errors import UsageError
from edgecds.serve import ServeConfig
from edgecds.target import AUTO, resolve_target


@click.command("report")
@click.argument("results", nargs=-1, required=True, type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option("--output", "-o", type=click.Path(path_type=Path, dir_okay=False), help="The HTML file.  [default: report.html beside the results]")
@constraint_options
@profiles_dir_option(help="Your own device profiles.")
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
        print_json(asdict(made))
        return
    drawn = ", ".join(f"{d}: {n} variants drawn" for d, n in made.points.items()) or "no device measured"
    click.echo(f"Report: {made.output} ({made.bytes / 2**20:.1f} MiB, self-contained); {drawn}")


@click.command("bundle")
@click.argument("results", nargs=-1, required=True, type=click.Path(path_type=Path, dir_okay=False, exists=True))
@device_option("The device the bundle is for (its measurements must come from it); 'auto': the one detected here.", default=AUTO)
@click.option("--output", "-o", type=click.Path(path_type=Path, file_okay=False), help="Bundle folder; the archive is written beside it.  [default: ./bundles/<type>-<device>]")
@constraint_options
@click.option("--sign", "sign_key", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help="Sign with this key (`edgecds keygen`): an EC key writes an OpenSSF model signature (model.sig) over every file; "
                   "an ed25519 key, edgecds's own signature of the manifest.")
@click.option("--variants", "variants_dir", type=click.Path(path_type=Path, file_okay=False, exists=True),
              help="The variants folder the results were measured from (checked by hash).  [default: the results file's folder]")
@click.option("--draft", metavar="TYPE|ngram", help="Ship this speculative draft with the chosen variant (`profile --draft` must have "
              "measured the pair on the device): only when it was faster in every run, fitted the budget and left the answer unchanged; "
              "otherwise the bundle says why it is not there.")
@profiles_dir_option(help="Your own device profiles.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress on stderr.")
def bundle_command(results: tuple[Path, ...], device_id: str, output: Path | None, constraints: Any, sign_key: Path | None,
                   variants_dir: Path | None, draft: str | None, profiles_dirs: tuple[Path, ...], as_json: bool, quiet: bool) -> None:
    """Choose the best variant measured on a device and pack it for the clinic.

    A variant qualifies when it fits, meets every constraint and is not significantly worse than
    its reference; among qualifiers the most faithful to the reference wins (drift within 0.01
    counting as equal), then the faster, then the smaller (--prefer changes the order). Every
    other variant is listed with the rule that decided. The bundle (folder and a
    reproducible, uncompressed .tar) holds the model, manifest.json, runtime.json, MODEL_CARD.md and the
    model's licence.

    \b
    Examples:
      edgecds bundle edgecds-out/SmolLM2-135M-Instruct/results.json --device laptop-x86-16gb
      edgecds bundle a/results.json b/results.json --device jetson-orin-nano-8gb --min-accuracy 60 --max-drop 2 --sign key.pem
    """
    from edgecds.bundle.choose import choose
    from edgecds.bundle.pack import write_bundle

    target = resolve_target(device_id, profiles_dirs)
    device = target.device
    choice = choose(list(results), device, constraints, variants_dir)
    if choice.chosen is None:
        for r in choice.rejected:
            click.echo(f"{r.variant}: {'; '.join(r.reasons)}", err=True)
        raise UsageError(choice.advice)
    folder = output or Path("bundles") / f"{choice.chosen.variant}-{device.id}"
    from edgecds.progress import make_reporter

    result = write_bundle(choice, device, folder, sign_key, variants_dir, make_reporter(quiet), draft)
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    if as_json:
        print_json(asdict(result))
        return
    from edgecds.tables import choice_table, print_table

    print_table(choice_table(choice, device.budget_gib))
    if choice.chosen.predicted_only:
        click.echo(f"{choice.chosen.variant}: PREDICTED figures, not measured on {device.id}")
    click.echo(f"Bundle: {result.folder}\nArchive: {result.archive} (sha256 {result.archive_sha256})" + ("\nSigned." if result.signed else ""))
    click.echo("The bundle's MODEL_CARD.md and manifest.json say the rest.")


@click.command("keygen")
@click.argument("private_key", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--type", "kind", type=click.Choice(["ed25519", "ec"]), default="ed25519", show_default=True,
              help="ed25519: edgecds's own signature of the manifest. ec (P-256): an OpenSSF model signature (model.sig) over every "
                   "file, which the model_signing tool verifies too.")
def keygen_command(private_key: Path, kind: str) -> None:
    """Make an ed25519 key pair for signing bundles: PRIVATE_KEY (mode 0600) and PRIVATE_KEY.pub.

    \b
    Example:
      edgecds keygen ~/.edgecds/signing-key.pem
    """
    from edgecds.bundle.sign import generate_key

    public = generate_key(private_key, kind)
    shown = public.read_text().strip() if kind == "ed25519" else "a PEM public key (for --key, and for model_signing verify key --public_key)"
    click.echo(f"Private key: {private_key} (keep it on the build machine)\nPublic key: {public}: {shown}")


@click.command("verify")
@click.argument("bundle", type=click.Path(path_type=Path, exists=True))
@click.option("--key", "trusted_key", metavar="KEY|FILE",
              help="The signer's public key: its 64 hex characters or the file holding them (KEY.pem.pub); the bundle must be "
                   "signed by it.  [default: $EDGECDS_TRUSTED_KEY]")
@click.option("--require-signature", is_flag=True, help="Fail when the bundle is not signed (by any key; --key names which).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="Nothing on stderr: no progress, no warning (the result line still says NOT SIGNED).")
@click.option("--into", type=click.Path(path_type=Path, file_okay=False),
              help="Unpack a verified archive into this folder (headers and free disk checked before a byte is written; "
                   "the unpacked bundle verified before it gets its name).")
def verify_command(bundle: Path, trusted_key: str | None, require_signature: bool, as_json: bool, quiet: bool, into: Path | None) -> None:
    """Check a bundle (folder or .tar archive) byte for byte against its manifest; exit 0 only if all holds.
    An archive is checked as it is read, without unpacking it; --into DIR also unpacks it, safely.

    \b
    Examples:
      edgecds verify bundles/Q4_K_M-laptop-x86-16gb.tar
      edgecds verify bundles/Q4_K_M-laptop-x86-16gb.tar --into /opt/edgecds/bundles
      edgecds verify bundles/Q4_K_M-laptop-x86-16gb --key signing.pem.pub
    """
    from edgecds.bundle.verify import unpack_bundle, verify_bundle
    from edgecds.progress import make_reporter

    if into is not None and not bundle.is_file():
        raise UsageError("--into unpacks an archive (a .tar); a bundle folder is already unpacked")
    reporter = make_reporter(quiet)
    result = verify_bundle(bundle, trusted_key, reporter, require_signature) if into is None else \
        unpack_bundle(bundle, into, trusted_key, reporter, require_signature)[0]
    if as_json:
        print_json(asdict(result))
        return
    signer = f"signed by {result.signer}" + (" (the trusted key)" if result.trusted_signer else " (not checked against a trusted key: pass --key)") \
        if result.signed else "NOT SIGNED"
    how = " (OpenSSF model signing, model.sig)" if result.signature_format == "openssf-model-signing" else ""
    click.echo(f"OK: {result.files} files match the manifest; {signer}{how}" + (f"\nUnpacked: {result.bundle}" if into is not None else ""))
    for note in result.notes if not quiet else ():
        click.echo(f"note: {note}", err=True)
    if not result.signed and not quiet:  # the result line still says NOT SIGNED
        click.echo("WARNING: nothing shows who made this bundle: its files are whole, but anyone could have packed them. Ask its maker "
                   "for a signed bundle and check it with --key KEY.pem.pub (--require-signature refuses unsigned ones).", err=True)


DRAFT_HELP = ("Speculative decoding: a GGUF of the same model to draft with (e.g. its Q2_K), 'ngram' (prompt lookup, no second "
              "model) or 'none'; the answer is the model's own.  [default: the bundle's draft, if it ships one]")


@click.command("run")
@click.argument("bundle", metavar="BUNDLE|MODEL.gguf", type=click.Path(path_type=Path, exists=True))
@click.argument("question", required=False)
@click.option("--prompt", "-p", help="The question (or give it after BUNDLE); without either, read from standard input.")
@click.option("--max-tokens", "-n", type=click.IntRange(min=1), help="Tokens to generate.  [default: the bundle's]")
@click.option("--no-verify", is_flag=True, help="Skip checking the bundle against its manifest first.")
@click.option("--key", "trusted_key", metavar="KEY|FILE",
              help="The signer's public key (64 hex characters) or the file holding it; the bundle must be signed by it.  "
                   "[default: $EDGECDS_TRUSTED_KEY]")
@draft_options(DRAFT_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the answer and its token counts and timings as JSON (not streamed).")
@click.option("--quiet", "-q", is_flag=True, help="No token count and speed line on stderr.")
def run_command(bundle: Path, question: str | None, prompt: str | None, max_tokens: int | None, no_verify: bool, trusted_key: str | None,
                draft: str | None, draft_max: int, draft_p_min: float, as_json: bool, quiet: bool) -> None:
    """Answer a prompt with a bundle's model and runtime config, offline, streaming the answer as
    it is made and then its speed on stderr; on a terminal without a prompt, a question a line
    until an empty line. A GGUF file on its own runs with llama.cpp's default settings (no
    manifest to verify: a bundle is what a clinic should run).

    \b
    Examples:
      edgecds run bundles/Q4_K_M-laptop-x86-16gb "Fever, neck stiffness and a purpuric rash: differential?"
      edgecds run ~/Downloads/Qwen3-4B-Q4_K_M.gguf "Barking cough and stridor in a child: diagnosis?"
      echo "Barking cough and stridor in a child: diagnosis?" | edgecds run bundles/Q4_K_M-laptop-x86-16gb
    """
    import sys

    if question is not None and prompt is not None:
        raise UsageError("give the question once: after the bundle or with --prompt, not both")
    prompt = question if question is not None else prompt
    if prompt is None and sys.stdin.isatty() and not as_json:  # a chat on a terminal: one question a line, empty line or Ctrl-D ends
        verified = no_verify
        while True:
            try:
                line = input("> ")
            except EOFError:
                break
            if not line.strip():
                break
            _answer(bundle, line, max_tokens, not verified, trusted_key, False, quiet, (draft, draft_max, draft_p_min))
            verified = True
        return
    text = prompt if prompt is not None else sys.stdin.read()
    if not text.strip():
        raise UsageError("no prompt: give it after the bundle, with --prompt, or on standard input")
    _answer(bundle, text, max_tokens, not no_verify, trusted_key, as_json, quiet, (draft, draft_max, draft_p_min))


def _answer(bundle: Path, text: str, max_tokens: int | None, verify: bool, trusted_key: str | None, as_json: bool, quiet: bool,
            draft: tuple[str | None, int, float]) -> None:
    from edgecds.bundle.run import answer_prompt

    stream = None if as_json else (lambda piece: click.echo(piece, nl=False))
    answer = answer_prompt(bundle, text, max_tokens, verify=verify, trusted_key=trusted_key, on_text=stream, draft=draft[0],
                           draft_max=draft[1], draft_p_min=draft[2])
    if as_json:
        print_json({**asdict(answer), "decode_tps": answer.decode_tps})
        return
    click.echo()
    if not quiet:
        click.echo(answer.summary(), err=True)


@click.command("serve")
@click.argument("bundle", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--host", default=default_of(ServeConfig, "host"), show_default=True,
              help="Address to bind; anything but loopback exposes the model to the network.")
@click.option("--port", type=click.IntRange(0, 65535), default=default_of(ServeConfig, "port"), show_default=True,
              help="0: any free port (the start-up line names it).")
@click.option("--token", help="Bearer token every request must carry (visible to other users in the process list: prefer "
              "--token-file or $EDGECDS_SERVE_TOKEN).  [default: $EDGECDS_SERVE_TOKEN, else a new random one, printed once]")
@click.option("--token-file", type=click.Path(path_type=Path, dir_okay=False, exists=True), help="Read the bearer token from this file.")
@click.option("--slots", type=click.IntRange(min=1), default=default_of(ServeConfig, "slots"), show_default=True, help="Requests answered at once.")
@click.option("--queue", type=click.IntRange(min=0), default=default_of(ServeConfig, "queue"), show_default=True,
              help="Requests allowed to wait; more are answered 503.")
@click.option("--max-tokens", type=click.IntRange(min=1), help="Cap on each answer's tokens.  [default: the bundle's]")
@click.option("--timeout", "request_seconds", type=click.FloatRange(min=0.1), default=whole(default_of(ServeConfig, "request_seconds")), show_default=True,
              help="Seconds a request may take, waiting included; then its generation is stopped (504).")
@click.option("--body-timeout", "body_seconds", type=click.FloatRange(min=0.1), default=whole(default_of(ServeConfig, "body_seconds")), show_default=True,
              help="Seconds a client has to send its request headers (the connection is closed after) and then its body (408 after).")
@click.option("--no-verify", is_flag=True, help="Skip checking the bundle against its manifest at start.")
@click.option("--key", "trusted_key", metavar="KEY|FILE",
              help="The signer's public key (64 hex characters) or the file holding it; the bundle must be signed by it.  "
                   "[default: $EDGECDS_TRUSTED_KEY]")
@draft_options(DRAFT_HELP)
def serve_command(bundle: Path, host: str, port: int, token: str | None, token_file: Path | None, slots: int, queue: int,
                  max_tokens: int | None, request_seconds: float, body_seconds: float, no_verify: bool, trusted_key: str | None,
                  draft: str | None, draft_max: int, draft_p_min: float) -> None:
    """Serve a bundle's model as an OpenAI-compatible chat endpoint (POST /v1/chat/completions).

    GGUF and ONNX bundles alike, with streaming. Loopback only by default; every request needs the
    bearer token; prompts and answers are never logged or written to disk.

    \b
    Example:
      EDGECDS_SERVE_TOKEN=s3cret edgecds serve edgecds-out/bundle --port 8080
    """
    import os

    from edgecds.serve import TOKEN_ENV, serve

    if host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(f"warning: binding to {host}: other machines can reach the model (the token is still required)", err=True)
    if token_file is not None:
        from edgecds.secret_file import read_secret
        from edgecds.serve import MIN_TOKEN_CHARS

        token = read_secret(token_file, "the serve token", "write one line of 8 or more characters there (chmod 600)",
                            lambda text: len(text) >= MIN_TOKEN_CHARS, f"one line of {MIN_TOKEN_CHARS} or more characters")
    elif token is not None:
        click.echo("warning: --token is visible to other users in the process list; prefer --token-file or $EDGECDS_SERVE_TOKEN", err=True)
    if token is None and not os.environ.get(TOKEN_ENV):
        import secrets

        token = secrets.token_urlsafe(24)
        click.echo(f"token (shown once, not stored): {token}", err=True)
    config = ServeConfig(bundle=bundle, host=host, port=port, token=token, slots=slots, queue=queue, max_tokens=max_tokens,
                         body_seconds=body_seconds, request_seconds=request_seconds, verify=not no_verify, trusted_key=trusted_key,
                         draft=draft, draft_max=draft_max, draft_p_min=draft_p_min)

    def listening(url: str) -> None:
        click.echo(f"edgecds serve: {bundle.name} listening on {url} (POST /v1/chat/completions, GET /v1/models; "
                   f"GET /health needs no token); stop with Ctrl-C or SIGTERM", err=True)

    stopped_by = serve(config, listening)
    click.echo(f"edgecds serve: stopped ({stopped_by or 'shut down'})", err=True)

