"""`variants.json`: the record of every variant `quantize` built, read back by later steps.

One dataclass per record is the single definition of its fields; the file carries a
`schema_version` and is validated when read, because a later run trusts it to skip work.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgecds.atomic import write_json
from edgecds.digest import sha256_file, sha256_folder
from edgecds.errors import InvalidInputError, UsageError
from edgecds.formats.types import QuantType

SCHEMA_VERSION = 1
VARIANTS_FILE = "variants.json"


@dataclass(frozen=True)
class SourceRecord:
    path: str
    kind: str  # "hf" or "gguf"
    sha256: str
    architecture: str
    n_parameters: int
    name: str
    # set when the weights are not the original ones (the default model is rebuilt from a 4-bit
    # GGUF): what they came from, said wherever the float reference is named
    origin: str = ""


@dataclass(frozen=True)
class VariantRecord:
    name: str
    path: str  # relative to the folder holding variants.json
    format: str
    type: str
    file_size: int
    sha256: str
    bits_per_weight: float  # measured from the file's tensors
    nominal_bits_per_weight: float  # of the type's base block, from the quant-type table
    n_parameters: int
    tensor_types: dict[str, int]
    source_sha256: str  # the model edgecds was given
    parent_sha256: str  # the file this variant was made from (the source, or the float GGUF)
    tools: dict[str, str]
    options: dict[str, Any]
    cache_key: str
    seconds: dict[str, float]  # "build": the engine's own step; "verify": hashing, reading, load check
    load_check: dict[str, Any]
    created: str
    warnings: list[str] = field(default_factory=list)
    # ONNX variants are folders: each file's sha256 (the graph, external data, tokenizer, configs);
    # `sha256` is then the folder's digest over all of them.
    files: dict[str, str] = field(default_factory=dict)
    # Quantized ONNX variants: drift from the fp32 export on the clinical text, and whether it is flagged.
    drift: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def built(cls, q: QuantType, check: Any, build_seconds: float, verify_seconds: float, **fields: Any) -> VariantRecord:
        """A record for a variant `quantize` just built and verified: `q` fills its type fields,
        `check` (a load_check.LoadCheck) its load check; `fields` are the rest."""
        return cls(
            format=q.format, type=q.name, nominal_bits_per_weight=q.nominal_bits_per_weight,
            seconds={"build": round(build_seconds, 3), "verify": round(verify_seconds, 3)},
            load_check={"tokens_generated": len(check.tokens), "load_seconds": round(check.load_seconds, 3),
                        "generate_seconds": round(check.generate_seconds, 3)},
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"), **fields,
        )


@dataclass
class VariantsFile:
    source: SourceRecord
    variants: list[VariantRecord]
    schema_version: int = SCHEMA_VERSION

    def by_type(self) -> dict[str, VariantRecord]:
        return {v.type: v for v in self.variants}

    def select(self, types: tuple[str, ...], where: Path) -> list[VariantRecord]:
        """The variants of these types (every one when `types` is empty), in recorded order; a type
        with no variant is an error naming those there are."""
        wanted = {t.upper() for t in types}
        unknown = sorted(wanted - {v.type for v in self.variants})
        if unknown:
            raise UsageError(f"{where / VARIANTS_FILE} has no variant(s) {', '.join(unknown)}; it has {', '.join(v.type for v in self.variants)}")
        return [v for v in self.variants if not wanted or v.type in wanted]

    def upsert(self, record: VariantRecord) -> None:
        self.variants = [v for v in self.variants if v.type != record.type] + [record]

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": self.schema_version, "source": asdict(self.source), "variants": [asdict(v) for v in self.variants]}

    def save(self, folder: Path) -> None:
        write_json(folder / VARIANTS_FILE, self.to_dict())


# JSON types of the annotations records use; other names (nested records) are checked by their own builder.
_JSON_TYPES: dict[str, tuple[type, ...]] = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,), "dict": (dict,), "list": (list,)}


def _type_ok(annotation: str, value: Any) -> bool:
    for part in (p.strip() for p in annotation.split("|")):
        if part == "None" and value is None:
            return True
        base = part.split("[", 1)[0]
        if base not in _JSON_TYPES:
            return True
        if isinstance(value, _JSON_TYPES[base]) and not (base in ("int", "float") and isinstance(value, bool)):
            return True
    return False


def dataclass_from_dict(cls: type, data: Any, where: str) -> Any:
    """`cls` built from an untrusted object: every required field present and of its JSON type,
    unknown ones dropped."""
    if not isinstance(data, dict):
        raise InvalidInputError(f"{where}: expected an object")
    known = {f.name: f for f in fields(cls)}
    required = {name for name, f in known.items() if f.default is MISSING and f.default_factory is MISSING}
    missing = sorted(required - data.keys())
    if missing:
        raise InvalidInputError(f"{where}: missing field(s) {', '.join(missing)}")
    for name, value in data.items():
        if name in known and not _type_ok(str(known[name].type), value):
            raise InvalidInputError(f"{where}: field {name!r} must be {known[name].type}, not {type(value).__name__}")
    return cls(**{k: v for k, v in data.items() if k in known})


def read_record_file(path: Path, schema_version: int, fix: str, use: str, max_bytes: int | None = None) -> dict[str, Any]:
    """A JSON record file edgecds wrote (variants.json, results.json), as an object of the expected
    schema; anything else is an error naming the file, with `fix` (not valid JSON) or `use` (another
    schema) saying what to do."""
    if max_bytes is not None and path.stat().st_size > max_bytes:
        raise InvalidInputError(f"{path}: larger than {max_bytes >> 20} MiB; not a {path.name} edgecds wrote")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InvalidInputError(f"{path}: not valid JSON ({type(exc).__name__}: {exc}"[:300] + f"); {fix}") from None
    if not isinstance(data, dict) or data.get("schema_version") != schema_version:
        version = data.get("schema_version") if isinstance(data, dict) else None
        raise InvalidInputError(f"{path}: schema_version {version!r} is not {schema_version}; {use}")
    return data


def load_variants(folder: Path) -> VariantsFile | None:
    """The folder's variants.json, or None when there is none yet."""
    path = folder / VARIANTS_FILE
    if not path.exists():
        return None
    data = read_record_file(path, SCHEMA_VERSION, "delete it to rebuild the record from scratch", "delete it or use a matching edgecds")
    source = dataclass_from_dict(SourceRecord, data.get("source"), f"{path}: source")
    raw = data.get("variants")
    if not isinstance(raw, list):
        raise InvalidInputError(f"{path}: 'variants' must be a list")
    # `parity` is what `drift` was called before it had one name everywhere
    raw = [{("drift" if k == "parity" else k): v for k, v in item.items()} if isinstance(item, dict) and "drift" not in item else item
           for item in raw]
    variants = [dataclass_from_dict(VariantRecord, item, f"{path}: variants[{i}]") for i, item in enumerate(raw)]
    return VariantsFile(source, variants)


def variant_file(folder: Path, record: VariantRecord) -> Path:
    """A variant's file; the record is untrusted, so its path must stay inside the folder."""
    relative = Path(record.path)
    if relative.is_absolute() or ".." in relative.parts:
        raise InvalidInputError(f"{folder / VARIANTS_FILE}: variant {record.name!r} has path {record.path!r} outside its folder")
    return folder / relative


def variant_digest(path: Path) -> str:
    """What a record's sha256 is taken over: the file, or every file of an ONNX variant's folder."""
    return sha256_folder(path) if path.is_dir() else sha256_file(path)


def check_unchanged(folder: Path, record: VariantRecord) -> Path:
    """The variant's path, after checking it is still what `quantize` recorded (by hash): later
    records name a variant by its hash, so a changed file must not be measured under it."""
    path = variant_file(folder, record)
    if not (path.is_dir() if record.format == "onnx" else path.is_file()):
        raise InvalidInputError(f"{path} is missing; run `edgecds quantize` again to rebuild it")
    if variant_digest(path) != record.sha256:
        raise InvalidInputError(f"{path} changed since `edgecds quantize` recorded it (sha256 differs); run quantize again")
    return path


def is_reusable(existing: VariantRecord | None, key: str, folder: Path) -> bool:
    """A recorded variant is reused only if its key matches and its file (or ONNX folder) still hashes the same."""
    if existing is None or existing.cache_key != key:
        return False
    path = variant_file(folder, existing)
    return path.exists() and (path.is_dir() or path.stat().st_size == existing.file_size) and variant_digest(path) == existing.sha256
