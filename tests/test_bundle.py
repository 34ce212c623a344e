"""`edgecds bundle`, `verify` and `run` on real profile results of the default model."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import socket
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from edgecds.bundle.layout import BundleEngineConfig, VerifyError
from edgecds.bundle.run import run_prompt
from edgecds.bundle.verify import safe_extract, verify_bundle
from edgecds.cli import cli
from edgecds.digest import sha256_file
from edgecds.formats.gguf_file import read_gguf
from edgecds.quant.quantize import QuantizeResult

ROOT = Path(__file__).resolve().parents[1]


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def profiled(default_variants: QuantizeResult, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """Real profile results (memory, speed and accuracy on 4 cases) for Q4_K_M and Q8_0, each also
    decoding with the Q2_K variant as a speculative draft."""
    folder = tmp_path_factory.mktemp("bundle") / "variants"
    shutil.copytree(default_variants.output_dir, folder)
    cases = folder.parent / "cases.jsonl"
    cases.write_text("\n".join((ROOT / "toolkit" / "clinical" / "cases-v1.jsonl").read_text().splitlines()[:4]) + "\n")
    code, out = invoke("profile", str(folder), "--types", "Q4_K_M,Q8_0", "--ctx", "512", "-p", "32", "-n", "8", "-r", "1",
                       "--cases", str(cases), "--drift-chunks", "1", "--draft", "Q2_K", "--json", "-q")
    assert code == 0, out
    yield folder / "results.json", json.loads(out)["device"]
    shutil.rmtree(folder.parent, ignore_errors=True)  # a 1 GB copy: free it when the module is done


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    private = tmp_path_factory.mktemp("key") / "signing.pem"
    code, out = invoke("keygen", str(private))
    assert code == 0, out
    return private, (private.parent / "signing.pem.pub").read_text().strip()


def build(results: Path, device: str, out: Path, *extra: str) -> dict[str, Any]:
    code, text = invoke("bundle", str(results), "--device", device, "-o", str(out), "--json", *extra)
    assert code == 0, text
    return dict(json.loads(text[text.index("{"):]))


def test_bundle_verifies_and_says_what_it_chose(profiled: tuple[Path, str], key: tuple[Path, str], tmp_path: Path) -> None:
    results, device = profiled
    made = build(results, device, tmp_path / "b", "--sign", str(key[0]))
    choice = made["choice"]
    assert choice["chosen"]["variant"] in ("Q4_K_M", "Q8_0") and len(choice["rejected"]) == 1
    assert choice["rejected"][0]["reasons"]  # why the other lost
    folder = Path(made["folder"])
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["schema_version"] == 1 and manifest["model"]["licence"] == "Apache-2.0"
    files = set(manifest["files"])
    models = [f for f in files if f.startswith("model/") and f.endswith(".gguf")]
    assert len(models) == 1 and files == {"LICENSE", "MODEL_CARD.md", "runtime.json", "ml-bom.cdx.json", *models}
    _check_ml_bom(folder, manifest, models[0])
    assert manifest["measurements"]["host"]["id"] == manifest["measurements"]["record"]["host"]
    assert manifest["accuracy"]["cases"]["n"] == 4 and manifest["accuracy"]["paired"] is not None
    card = (folder / "MODEL_CARD.md").read_text()
    template = read_gguf(folder / models[0]).metadata["tokenizer.chat_template"]
    assert manifest["model"]["chat_template_sha256"] == hashlib.sha256(template.encode()).hexdigest()
    assert f"sha256 {manifest['model']['chat_template_sha256']}: checked when this bundle was made" in card
    assert "not a diagnosis" in card or "does not make a diagnosis" in card
    assert "95% Wilson interval" in card and "Known limits" in card
    # the default model's F16 is rebuilt from its 4-bit GGUF: said where the reference is named
    assert "The reference F16 was rebuilt from SmolLM2-135M-Instruct.Q4_1.gguf, a Q4_1 file, not the original weights" in card
    assert "(unquantized)" not in card
    assert any(w.startswith("no --min-accuracy was set") for w in made["warnings"])
    runtime = json.loads((folder / "runtime.json").read_text())
    assert runtime["n_ctx"] == 512 and runtime["sampling"]["temperature"] == 0.0

    for target in (folder, Path(made["archive"])):
        code, out = invoke("verify", str(target), "--key", key[1])
        assert code == 0 and "the trusted key" in out, out
    code, out = invoke("verify", str(folder), "--key", "00" * 32)
    assert code == 1 and "not by the trusted key" in out


def _check_ml_bom(folder: Path, manifest: dict[str, Any], model: str) -> None:
    """The ML-BOM validates against CycloneDX 1.7's schema (cyclonedx-python-lib's bundled copy,
    no network) and carries the model's hash, the source's, and the measured figures."""
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    text = (folder / "ml-bom.cdx.json").read_text()
    assert JsonStrictValidator(SchemaVersion.V1_7).validate_str(text) is None
    bom = json.loads(text)
    component = next(c for c in bom["components"] if c["type"] == "machine-learning-model")
    assert component["hashes"] == [{"alg": "SHA-256", "content": manifest["files"][model]["sha256"]}]
    assert component["pedigree"]["ancestors"][0]["hashes"][0]["content"] == manifest["model"]["source_sha256"]
    card = component["modelCard"]
    metrics = {m["type"]: m for m in card["quantitativeAnalysis"]["performanceMetrics"]}
    accuracy = manifest["accuracy"]
    assert metrics["accuracy"]["value"] == str(accuracy["metrics"]["accuracy"])
    assert metrics["accuracy"]["confidenceInterval"] == {"lowerBound": str(accuracy["metrics"]["low"]), "upperBound": str(accuracy["metrics"]["high"])}
    assert metrics["exact McNemar p-value"]["value"] == str(accuracy["paired"]["p_value"])
    assert float(metrics["peak memory, bytes"]["value"]) == manifest["measurements"]["record"]["measured"]["peak_rss_bytes"]["high"]
    assert accuracy["cases"]["sha256"] in card["modelParameters"]["datasets"][0]["description"]
    props = {p["name"]: p["value"] for p in component["properties"]}
    assert props["edgecds:quant_type"] == manifest["model"]["type"] and props["edgecds:chat_template_sha256"] == manifest["model"]["chat_template_sha256"]


@pytest.mark.parametrize("victim", ["model", "manifest.json", "runtime.json", "MODEL_CARD.md", "ml-bom.cdx.json", "LICENSE", "signature.json"])
def test_one_flipped_byte_in_each_kind_of_file_is_named(profiled: tuple[Path, str], key: tuple[Path, str], tmp_path: Path, victim: str) -> None:
    results, device = profiled
    folder = Path(build(results, device, tmp_path / "b", "--sign", str(key[0]))["folder"])
    path = next((folder / "model").glob("*.gguf")) if victim == "model" else folder / victim
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    code, out = invoke("verify", str(folder))
    assert code == 1
    assert path.name in out, out


@pytest.mark.parametrize("damage", ["not json", "bad hex", "other valid hex"])
def test_a_damaged_signature_is_refused_and_named(profiled: tuple[Path, str], key: tuple[Path, str], tmp_path: Path, damage: str) -> None:
    results, device = profiled
    folder = Path(build(results, device, tmp_path / "b", "--sign", str(key[0]))["folder"])
    sig_path = folder / "signature.json"
    sig = json.loads(sig_path.read_text())
    if damage == "not json":
        sig_path.write_text("{" + sig_path.read_text())
    else:
        first = sig["signature"][0]
        sig["signature"] = ("z" if damage == "bad hex" else "1" if first != "1" else "2") + sig["signature"][1:]
        sig_path.write_text(json.dumps(sig))
    code, out = invoke("verify", str(folder))
    assert code == 1 and "signature.json" in out, out


def test_missing_extra_and_symlinked_files_are_named(profiled: tuple[Path, str], tmp_path: Path) -> None:
    results, device = profiled
    folder = Path(build(results, device, tmp_path / "b")["folder"])
    (folder / "notes.txt").write_text("hello")
    with pytest.raises(VerifyError, match="notes.txt: not listed in the manifest"):
        verify_bundle(folder)
    (folder / "notes.txt").unlink()
    (folder / "LICENSE").rename(tmp_path / "LICENSE")
    with pytest.raises(VerifyError, match="LICENSE: listed in the manifest but missing"):
        verify_bundle(folder)
    (folder / "LICENSE").symlink_to(tmp_path / "LICENSE")
    with pytest.raises(VerifyError, match="LICENSE: a symlink"):
        verify_bundle(folder)


def _archive(path: Path, members: list[tarfile.TarInfo]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for m in members:
            tar.addfile(m, io.BytesIO(b"x" * m.size) if m.isfile() else None)
    return path


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "hardlink", "device"])
def test_a_malicious_archive_is_refused(tmp_path: Path, kind: str) -> None:
    ok = tarfile.TarInfo("b/manifest.json")
    ok.size = 1
    bad = tarfile.TarInfo({"dotdot": "b/../../evil", "absolute": "/tmp/evil"}.get(kind, "b/evil"))
    if kind in ("dotdot", "absolute"):
        bad.size = 1
    elif kind == "symlink":
        bad.type, bad.linkname = tarfile.SYMTYPE, "/etc/passwd"
    elif kind == "hardlink":
        bad.type, bad.linkname = tarfile.LNKTYPE, "b/manifest.json"
    else:
        bad.type, bad.devmajor, bad.devminor = tarfile.CHRTYPE, 1, 3
    archive = _archive(tmp_path / "evil.tar.gz", [ok, bad])
    into = tmp_path / "into"
    into.mkdir()
    with pytest.raises(VerifyError, match="refused, nothing extracted"):
        safe_extract(archive, into)
    assert list(into.iterdir()) == [] and not (tmp_path / "evil").exists()
    code, out = invoke("verify", str(archive))
    assert code == 1 and "refused" in out


def test_same_inputs_give_byte_identical_archives(profiled: tuple[Path, str], tmp_path: Path) -> None:
    results, device = profiled
    first = build(results, device, tmp_path / "one" / "bundle")
    second = build(results, device, tmp_path / "two" / "bundle")
    assert first["archive_sha256"] == second["archive_sha256"]
    assert hashlib.sha256(Path(first["archive"]).read_bytes()).hexdigest() == first["archive_sha256"]
    with tarfile.open(first["archive"]) as tar:
        names = tar.getnames()
        assert names == sorted(names) and all(m.mtime == 0 and m.uid == 0 and m.gid == 0 for m in tar.getmembers())


def test_constraints_explain_and_only_the_device_counts(profiled: tuple[Path, str], tmp_path: Path) -> None:
    results, device = profiled
    # --allow-disturbed: this holds the speed rule itself, whatever the machine was doing (the disturbed rule: test_profile)
    code, out = invoke("bundle", str(results), "--device", device, "--min-decode", "1000000", "--allow-disturbed", "-o", str(tmp_path / "b"))
    assert code == 2 and "too slow" in out and "closest:" in out and "relax" in out
    other = "jetson-orin-nano-8gb" if device != "jetson-orin-nano-8gb" else "rtx-3060-12gb"
    code, out = invoke("bundle", str(results), "--device", other, "-o", str(tmp_path / "c"))
    assert code == 1 and f"no variant was measured on {other}" in out


def test_run_answers_offline_with_sockets_blocked(profiled: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    results, device = profiled
    folder = Path(build(results, device, tmp_path / "b")["folder"])

    def no_network(self: socket.socket, address: Any) -> None:
        raise AssertionError(f"network access attempted: {address}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket.socket, "connect_ex", no_network)
    prompt = "A 19-year-old has fever, neck stiffness and a purpuric rash. What is the most likely diagnosis?"
    answer = run_prompt(folder, prompt, 24)
    monkeypatch.undo()
    # the same answer by another road: llama-cpp-python's own chat completion (its template handling and
    # its greedy sampler) on the bundled file with the bundle's settings and system prompt
    from llama_cpp import Llama

    config = BundleEngineConfig.read(folder)
    llm = Llama(model_path=str(config.model_path(folder)), n_ctx=config.engine_settings().n_ctx, verbose=False)
    messages = ([{"role": "system", "content": config.system_prompt}] if config.system_prompt else []) + [{"role": "user", "content": prompt}]
    theirs = llm.create_chat_completion(messages=messages, max_tokens=24, temperature=0.0, top_k=1, repeat_penalty=1.0)  # type: ignore[arg-type]
    llm.close()
    assert answer == str(theirs["choices"][0]["message"]["content"]).strip() and len(answer.split()) >= 3  # type: ignore[index]


def _temporaries(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.edgecds-tmp"))


def test_run_takes_the_question_after_the_bundle_streams_it_and_says_its_speed(profiled: tuple[Path, str], tmp_path: Path) -> None:
    from edgecds.bundle.run import answer_prompt

    results, device = profiled
    folder = Path(build(results, device, tmp_path / "b")["folder"])
    question = "A child has a barking cough and stridor. What is the most likely diagnosis?"
    pieces: list[str] = []
    streamed = answer_prompt(folder, question, 12, on_text=pieces.append)
    assert len(pieces) > 1 and "".join(pieces) == streamed.text  # piece by piece, as made, adding up to the answer
    assert 0 < streamed.completion_tokens <= 12 and streamed.prompt_tokens > 10 and 0 < streamed.prompt_seconds <= streamed.seconds
    result = CliRunner().invoke(cli, ["run", str(folder), question, "-n", "12", "--no-verify"])
    assert result.exit_code == 0 and result.stdout.strip() == streamed.text  # the positional question: the same greedy answer
    assert f"{streamed.completion_tokens} tokens in" in result.stderr and "tokens/s" in result.stderr and "first token after" in result.stderr
    result = CliRunner().invoke(cli, ["run", str(folder), question, "-n", "12", "--no-verify", "--json"])
    data = json.loads(result.stdout)
    assert data["text"] == streamed.text and data["completion_tokens"] == streamed.completion_tokens and data["decode_tps"] > 0
    result = CliRunner().invoke(cli, ["run", str(folder), question, "-p", question])
    assert result.exit_code == 2 and "give the question once" in result.output


def test_allow_predicted_bundles_with_the_predictors_figures_labelled_as_such(profiled: tuple[Path, str], tmp_path: Path) -> None:
    """Nothing measured on the Jetson: its figures are `plan`'s, at the asked context, said to be
    predicted in the table and the model card (they were 0.0 tokens/s and a peak of 0)."""
    results, _ = profiled
    jetson = "jetson-orin-nano-8gb"
    code, out = invoke("bundle", str(results), "--device", jetson, "--ctx", "4096", "--allow-predicted", "-o", str(tmp_path / "b"), "--json")
    assert code == 0, out
    chosen = json.loads(out[out.index("{"):])["choice"]["chosen"]
    code, planned = invoke("plan", str(results.parent), "--device", jetson, "--ctx", "4096", "--json")
    entry = next(e for e in json.loads(planned)["entries"] if e["type"] == chosen["variant"])["prediction"]
    assert chosen["predicted_only"] and chosen["peak_at_full_context"]
    assert chosen["peak_bytes"] == entry["memory"]["peak_bytes"] and chosen["decode_tps"] == pytest.approx(entry["speed"]["decode_tps"], abs=0.01)
    card = (tmp_path / "b" / "MODEL_CARD.md").read_text()
    assert "On this device (PREDICTED, not measured)" in card and f"Predicted decode {chosen['decode_tps']:.1f} tokens/s" in card
    assert " 0.0 tokens/s" not in card
    code, out = invoke("bundle", str(results), "--device", jetson, "--ctx", "4096", "--allow-predicted", "-o", str(tmp_path / "c"))
    assert code == 0 and "(short run)" not in out and "predicted" in out and "PREDICTED figures" in out


def test_a_format_the_device_cannot_run_is_never_a_candidate() -> None:
    from edgecds.bundle.choose import Candidate, Constraints, _violations
    from edgecds.devices import load_profiles

    jetson = load_profiles()["jetson-orin-nano-8gb"]
    assert "onnx" not in jetson.formats
    small = Candidate("ONNX_INT4", "onnx", "ab" * 32, 10 << 20, "results.json", None, None, None, True, 0.5, 0.4, 50.0, 100 << 20,
                      full_context=True)
    said = _violations(small, jetson, Constraints(allow_predicted=True))
    assert said == [f"jetson-orin-nano-8gb runs {', '.join(jetson.formats)}, not onnx"]


def test_interrupted_and_concurrent_runs_never_leave_a_mismatched_pair(profiled: tuple[Path, str], tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed runs once left 675 MB of temporaries that later runs never removed, and a kill during
    the archive left a new folder beside an old archive, both verifying."""
    import os
    import resource
    import signal

    from edgecds.atomic import folder_lock
    from edgecds.bundle import pack

    results, device = profiled
    out = tmp_path / "bundles" / "b"
    first = build(results, device, out)
    before = (Path(first["archive"]).read_bytes(), (out / "manifest.json").read_bytes())
    (out.parent / ".b.killed.edgecds-tmp").mkdir()  # what killed runs leave
    (out.parent / ".b.tar.killed.edgecds-tmp").write_bytes(b"x" * 4096)

    def interrupted(folder: Path, target: Path, name: str | None = None, progress: object = None) -> str:
        target.write_bytes(b"half an archive")
        raise KeyboardInterrupt  # as a kill while the archive is written

    with monkeypatch.context() as mp:
        mp.setattr(pack, "write_reproducible_tar", interrupted)
        code, _ = invoke("bundle", str(results), "--device", device, "-o", str(out), "--max-flip-rate", "100")
    assert code != 0
    assert _temporaries(out.parent) == []  # the stale ones removed at start, its own on the way out
    assert (Path(first["archive"]).read_bytes(), (out / "manifest.json").read_bytes()) == before  # the old pair, whole

    with folder_lock(out.parent):  # another run holds the folder
        code, text = invoke("bundle", str(results), "--device", device, "-o", str(out))
    assert code == 1 and "another edgecds run is writing to" in text

    def small_files() -> None:  # a disk that takes 16 MiB a file: the model copy fails (EFBIG), as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))

    run = subprocess.run([sys.executable, "-m", "edgecds", "bundle", str(results), "--device", device, "-o", str(out), "--max-flip-rate",
                          "99"], capture_output=True, text=True, preexec_fn=small_files, env=dict(os.environ), timeout=300)
    assert run.returncode == 1 and "could not write" in run.stderr and "file-size limit" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr and _temporaries(out.parent) == []
    assert (Path(first["archive"]).read_bytes(), (out / "manifest.json").read_bytes()) == before


def test_on_real_variants_noise_does_not_choose(profiled: tuple[Path, str], tmp_path: Path) -> None:
    """Q4_K_M and Q8_0 measured and scored for real (4 cases: their accuracies cannot differ
    significantly). The chosen one lies within the fidelity band of the most faithful qualifier, and
    `--prefer speed` takes the fastest within the measured spread."""
    from edgecds.bundle.choose import FIDELITY_BAND, Constraints, choose
    from edgecds.target import resolve_target

    results, device = profiled
    target = resolve_target(device)
    choice = choose([results], target.device, Constraints())
    considered = [c for c in [choice.chosen, *choice.rejected] if c is not None]
    assert {c.variant for c in considered} >= {"Q4_K_M", "Q8_0"}
    assert all(c.p_value is None or c.p_value >= 0.05 for c in considered)  # 4 cases: nothing differs
    assert choice.chosen is not None and choice.chosen.drift_kl is not None
    # no constraint was given, so every measured variant qualifies
    best = min(c.drift_kl for c in considered if c.drift_kl is not None)
    assert choice.chosen.drift_kl <= best + FIDELITY_BAND
    assert choice.chosen.variant == "Q8_0"  # Q4_K_M drifts ~0.06 from F16 on the clinical text, Q8_0 ~0.004
    fast = choose([results], target.device, Constraints(prefer="speed"))
    assert fast.chosen is not None
    fastest = max(considered, key=lambda c: c.decode_tps)
    assert fast.chosen.decode_tps >= fastest.decode_tps - max(fastest.decode_spread, fast.chosen.decode_spread)


def test_a_model_changed_since_it_was_measured_is_not_bundled(profiled: tuple[Path, str], tmp_path: Path) -> None:
    """The hash is taken as the model is copied into the bundle: a file changed after profile (same
    size, one byte) is refused, and nothing is left under the bundle's names."""
    results, device = profiled
    copy = tmp_path / "variants"
    copy.mkdir()
    for path in results.parent.iterdir():
        if path.suffix == ".json" or path.name.endswith(("Q4_K_M.gguf", "Q8_0.gguf")):
            shutil.copyfile(path, copy / path.name)
    for gguf in copy.glob("*.gguf"):
        with open(gguf, "r+b") as fh:
            fh.seek(-1, 2)
            last = fh.read(1)
            fh.seek(-1, 2)
            fh.write(bytes([last[0] ^ 1]))
    out = tmp_path / "bundles" / "b"
    code, text = invoke("bundle", str(copy / "results.json"), "--device", device, "-o", str(out), "--variants", str(copy))
    assert code == 1 and "changed since `edgecds quantize` recorded it" in text, text
    assert sorted(p.name for p in out.parent.iterdir()) == [".edgecds.lock"]  # no folder, no archive, no temporary


def test_a_chat_template_the_device_would_refuse_is_refused_at_bundle_time(profiled: tuple[Path, str], tmp_path: Path) -> None:
    """The variants' template swapped (same length, records updated to the new hashes) for one that
    reaches for Python internals: bundle says why and writes nothing."""
    results, device = profiled
    copy = tmp_path / "variants"
    copy.mkdir()
    texts = {p.name: p.read_text() for p in results.parent.glob("*.json")}
    for path in results.parent.glob("*.gguf"):
        if not path.name.endswith(("Q4_K_M.gguf", "Q8_0.gguf")):
            continue
        data = path.read_bytes()
        template = read_gguf(path).metadata["tokenizer.chat_template"].encode()
        hostile = b"{{ ''.__class__.__mro__ }}".ljust(len(template))
        (copy / path.name).write_bytes(data.replace(template, hostile, 1))
        old, new = hashlib.sha256(data).hexdigest(), sha256_file(copy / path.name)
        texts = {name: text.replace(old, new) for name, text in texts.items()}
    for name, text in texts.items():
        (copy / name).write_text(text)
    out = tmp_path / "bundles" / "b"
    code, text = invoke("bundle", str(copy / "results.json"), "--device", device, "-o", str(out), "--variants", str(copy))
    assert code == 1 and "its chat template would be refused on the device" in text and "`.__class__`, a Python internal" in text, text
    assert not out.parent.exists()  # refused before anything was written


def test_bundle_on_a_disk_too_small_is_refused_before_writing(profiled: tuple[Path, str], tmp_path: Path) -> None:
    """A disk that really is 64 MiB (a tmpfs of that size), for a model of ~100-140 MiB written twice."""
    from tests.test_scale import on_small_disk, small_disk

    if small_disk.args[0]:  # the skipif condition
        pytest.skip(small_disk.kwargs["reason"])
    results, device = profiled
    code, out, left = on_small_disk(tmp_path / "disk", 64, "bundle", str(results), "--device", device, "-o", str(tmp_path / "disk" / "b"))
    assert code == 1 and "the bundle (its folder and its archive" in out and "MiB needed" in out and "MiB free" in out, out
    assert "Traceback" not in out and left == [".edgecds.lock"], left  # nothing but the folder's lock


def test_bundle_shows_its_steps_with_the_time_left_on_a_terminal(profiled: tuple[Path, str], tmp_path: Path) -> None:
    from tests.test_scale import on_terminal

    results, device = profiled
    code, out = on_terminal(["bundle", str(results), "--device", device, "-o", str(tmp_path / "b")])
    assert code == 0, out
    assert "bundle: copy and hash" in out and "bundle: archive" in out and "0:00:00 left" in out
    assert "Bundle: " in out and "Archive: " in out and f"{tmp_path / 'b'}.tar" in out  # the result lines survive the bars


def _with_draft_figures(results: Path, out: Path, pays: bool) -> Path:
    """A copy of the results whose draft figures are set to one side of `bundle --draft`'s rule: on
    this 2-core machine a 135M model's draft does not pay, so the shipping branch needs its input
    set. Speeds 10 and 20 tokens/s; the answer identical; the peak the variant's own."""
    data = json.loads(results.read_text())
    for record in data["records"]:
        spec = (record.get("measured") or {}).get("speculative")
        if spec:
            slow, fast = {"median": 10.0, "low": 10.0, "high": 10.0, "samples": [10.0], "resolution": 0.0}, \
                {"median": 20.0, "low": 20.0, "high": 20.0, "samples": [20.0], "resolution": 0.0}
            spec.update(plain_tps=slow if pays else fast, draft_tps=fast if pays else slow, identical=True)
    out.mkdir(parents=True, exist_ok=True)
    copy = out / "results.json"
    copy.write_text(json.dumps(data))
    return copy


def test_bundle_ships_the_draft_only_where_it_paid_and_verify_covers_it(profiled: tuple[Path, str], tmp_path: Path) -> None:
    """`bundle --draft Q2_K`: as measured here, it ships the draft exactly when the rule holds
    (faster in every run, within the budget, the same answer); with figures on each side of the
    rule, the draft is left out with the reason on the card, or shipped: in runtime.json, the
    manifest and the ML-BOM's hashes, checked by verify, and used by run unless --draft none."""
    from edgecds.results import parse_measurement

    results, device = profiled
    made = build(results, device, tmp_path / "as-measured", "--draft", "Q2_K")
    folder = Path(made["folder"])
    manifest = json.loads((folder / "manifest.json").read_text())
    spec = parse_measurement(manifest["measurements"]["record"], "record").measured.speculative  # type: ignore[union-attr]
    assert spec is not None and spec.draft == "Q2_K" and spec.tokens >= 1 and 0 <= (spec.acceptance_rate or 0) <= 1
    rule = spec.pays and spec.identical and spec.peak_rss_bytes <= manifest["device"]["budget_gib"] * 2**30
    assert ("draft" in manifest) == rule and ("draft_not_shipped" in manifest) != rule

    variants = results.parent
    left_out = Path(build(_with_draft_figures(results, tmp_path / "slow", False), device, tmp_path / "slow" / "b", "--draft", "Q2_K",
                          "--variants", str(variants))["folder"])
    card = (left_out / "MODEL_CARD.md").read_text()
    assert "## Speculative decoding" in card and "not faster" in card
    assert BundleEngineConfig.read(left_out).draft is None and len(list((left_out / "model").glob("*.gguf"))) == 1

    shipped = Path(build(_with_draft_figures(results, tmp_path / "fast", True), device, tmp_path / "fast" / "b", "--draft", "Q2_K",
                         "--variants", str(variants))["folder"])
    config = BundleEngineConfig.read(shipped)
    draft_file = shipped / config.draft["model"]  # type: ignore[index]
    manifest = json.loads((shipped / "manifest.json").read_text())
    q2k = json.loads((variants / "variants.json").read_text())
    q2k_sha = next(v["sha256"] for v in q2k["variants"] if v["type"] == "Q2_K")
    assert draft_file.is_file() and manifest["files"][config.draft["model"]]["sha256"] == q2k_sha == manifest["draft"]["sha256"]  # type: ignore[index]
    assert "2.00x" in (shipped / "MODEL_CARD.md").read_text()
    _check_ml_bom(shipped, manifest, next(f for f in manifest["files"] if f.startswith("model/") and f != config.draft["model"]))  # type: ignore[index]
    bom = json.loads((shipped / "ml-bom.cdx.json").read_text())
    (drafting,) = [c for c in bom["components"] if c["bom-ref"] == "draft"]
    assert drafting["hashes"] == [{"alg": "SHA-256", "content": q2k_sha}] and "draft" in bom["dependencies"][0]["dependsOn"]
    assert invoke("verify", str(shipped))[0] == 0
    question = "A child has a barking cough and stridor. What is the most likely diagnosis?"
    code, out = invoke("run", str(shipped), question, "-n", "12", "--json")
    assert code == 0 and json.loads(out)["speculative"]["draft"] == draft_file.name, out
    code, out = invoke("run", str(shipped), question, "-n", "12", "--json", "--draft", "none")
    assert code == 0 and json.loads(out)["speculative"] is None, out
    data = bytearray(draft_file.read_bytes())
    data[len(data) // 2] ^= 0x01
    draft_file.write_bytes(bytes(data))
    code, out = invoke("verify", str(shipped))
    assert code == 1 and draft_file.name in out, out


def _model_signing_verifies(folder: Path, public: Path) -> bool:
    """The OpenSSF model_signing tool's own verdict (its CLI, key-based: nothing is fetched)."""
    run = subprocess.run([sys.executable, "-m", "model_signing", "verify", "key", str(folder), "--signature", str(folder / "model.sig"),
                          "--public_key", str(public)], capture_output=True, text=True, timeout=300)
    return run.returncode == 0


def test_an_ec_key_signs_the_openssf_way_and_edgecds_and_model_signing_agree(profiled: tuple[Path, str], key: tuple[Path, str],
                                                                             tmp_path: Path) -> None:
    """`bundle --sign` with an EC key (`keygen --type ec`) writes model.sig over every file: edgecds
    verifies the folder and the archive (as it streams) against the public key, and so does the
    model_signing tool; with a flipped byte, or another key, both refuse. A bundle signed the old
    way (ed25519) still verifies, with a note."""
    results, device = profiled
    private = tmp_path / "ec.pem"
    code, out = invoke("keygen", "--type", "ec", str(private))
    assert code == 0 and "PEM public key" in out, out
    public = tmp_path / "ec.pem.pub"
    made = build(results, device, tmp_path / "b", "--sign", str(private))
    folder, archive = Path(made["folder"]), Path(made["archive"])
    assert (folder / "model.sig").is_file() and not (folder / "signature.json").exists()
    for target in (folder, archive):
        code, out = invoke("verify", str(target), "--key", str(public), "--json", "-q")
        assert code == 0, out
        result = json.loads(out)
        assert result["signature_format"] == "openssf-model-signing" and result["trusted_signer"] and result["signed"]
    assert _model_signing_verifies(folder, public)
    code, out = invoke("verify", str(archive), "--key", str(public), "--into", str(tmp_path / "device"), "--json", "-q")
    assert code == 0 and json.loads(out)["signature_format"] == "openssf-model-signing", out
    assert _model_signing_verifies(Path(json.loads(out)["bundle"]), public)  # what the clinic unpacked, checked by the OpenSSF tool
    code, out = invoke("verify", str(archive), "--require-signature")
    assert code == 1 and "--key" in out  # an OpenSSF signature is only checked with its signer's key

    other = tmp_path / "other.pem"
    assert invoke("keygen", "--type", "ec", str(other))[0] == 0
    code, out = invoke("verify", str(folder), "--key", str(tmp_path / "other.pem.pub"))
    assert code == 1 and "not signed by the trusted key" in out, out
    assert not _model_signing_verifies(folder, tmp_path / "other.pem.pub")
    code, out = invoke("verify", str(folder), "--key", key[1])
    assert code == 1 and "not by the trusted ed25519 key" in out, out

    model = next((folder / "model").glob("*.gguf"))
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    code, out = invoke("verify", str(folder), "--key", str(public))
    assert code == 1 and model.name in out, out
    assert not _model_signing_verifies(folder, public)

    old = Path(build(results, device, tmp_path / "old", "--sign", str(key[0]))["folder"])
    result = CliRunner().invoke(cli, ["verify", str(old), "--key", key[1]])
    assert result.exit_code == 0 and "signed by " + key[1] in result.stdout and "model.sig" in result.stderr, result.output
