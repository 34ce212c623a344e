"""What a bundle holds: its file names, the manifest's schema, and `runtime.json`.

`runtime.json` says how the clinic device runs the model (engine settings, sampling, the system
prompt). `BundleEngineConfig` is its one definition: `pack` writes it, `run` and `serve` read it
here, checked, so a missing or mistyped key is an error naming the file, not a default guessed
in each reader.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgecds.engine import DEFAULT_BATCH, EngineSettings
from edgecds.errors import EdgecdsError
from edgecds.variants import dataclass_from_dict

if TYPE_CHECKING:
    from edgecds.engine.speculative import DraftSettings

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SIGNATURE = "signature.json"  # edgecds's own ed25519 signature of the manifest (an ed25519 key)
OMS_SIGNATURE = "model.sig"  # an OpenSSF model signature over every file (an elliptic-curve key; bundle/sign.py)
ENGINE_CONFIG = "runtime.json"  # the name bundles already shipped use
MODEL_CARD = "MODEL_CARD.md"
ML_BOM = "ml-bom.cdx.json"  # CycloneDX 1.7 ML bill of materials (bundle/mlbom.py)
MODEL_DIR = "model"
ARCHIVE_SUFFIX = ".tar"  # uncompressed: quantized weights do not compress (earlier versions wrote .tar.gz; verify reads both)
MAX_CONFIG_BYTES = 1 << 20
DEFAULT_MAX_TOKENS = 512  # an answer's length unless runtime.json (or --max-tokens) says otherwise
SYSTEM_PROMPT = (
    "You are a clinical decision-support assistant for a qualified clinician. Suggest differential diagnoses and next steps "
    "with their reasoning. You do not diagnose; the clinician decides."
)
CHAT_TEMPLATE_NOTE = "the model's own, from the GGUF's tokenizer.chat_template, rendered in edgecds's bounded Jinja sandbox"


class VerifyError(EdgecdsError):
    """A bundle that does not match its manifest, or an archive that must not be extracted."""


def _inside(bundle: Path, relative_text: str, what: str) -> Path:
    """A path runtime.json names, inside `bundle`: one that would leave it is refused."""
    relative = Path(relative_text)
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise VerifyError(f"{bundle / ENGINE_CONFIG}: {what} {relative_text!r} is not a path inside the bundle")
    return bundle / relative


@dataclass(frozen=True)
class BundleEngineConfig:
    """`runtime.json`: how the device runs the bundle's model."""

    format: str
    model: str  # relative to the bundle folder
    n_ctx: int
    threads: int | None
    n_gpu_layers: int = 0
    type_k: str = "f16"
    type_v: str = "f16"
    flash_attn: bool = False
    n_batch: int = DEFAULT_BATCH
    n_ubatch: int | None = None  # None: n_batch (bundles made before `tune` chose it separately)
    sampling: dict[str, Any] = field(default_factory=lambda: {"temperature": 0.0, "top_p": 1.0, "max_tokens": DEFAULT_MAX_TOKENS, "seed": 0})
    chat_template: str = CHAT_TEMPLATE_NOTE
    system_prompt: str = SYSTEM_PROMPT
    # speculative decoding (engine/speculative.py): {"model": a GGUF inside the bundle or "ngram",
    # "max_tokens": drafted a step at most, "p_min": a draft model's confidence to go on}; None: none
    draft: dict[str, Any] | None = None

    @property
    def max_tokens(self) -> int:
        return int(self.sampling.get("max_tokens", DEFAULT_MAX_TOKENS))

    @property
    def seed(self) -> int:
        return int(self.sampling.get("seed", 0))

    def engine_settings(self) -> EngineSettings:
        return EngineSettings(n_ctx=self.n_ctx, n_batch=self.n_batch, n_ubatch=self.n_ubatch or self.n_batch, threads=self.threads,
                              n_gpu_layers=self.n_gpu_layers, type_k=self.type_k, type_v=self.type_v, flash_attn=self.flash_attn)

    def model_path(self, bundle: Path) -> Path:
        """The model inside `bundle`: a path that would leave it is refused."""
        return _inside(bundle, self.model, "model")

    def draft_settings(self, bundle: Path) -> DraftSettings | None:
        """The bundle's draft, its model's path inside `bundle`; None when it ships none."""
        from edgecds.engine.speculative import NGRAM, DraftSettings

        if self.draft is None:
            return None
        model, n, p_min = self.draft.get("model"), self.draft.get("max_tokens"), self.draft.get("p_min")
        if not isinstance(model, str) or type(n) is not int or not isinstance(p_min, (int, float)) or isinstance(p_min, bool):
            raise VerifyError(f"{bundle / ENGINE_CONFIG}: 'draft' must hold a string 'model', an integer 'max_tokens' and a number 'p_min'")
        try:
            return DraftSettings(model if model == NGRAM else str(_inside(bundle, model, "draft model")), n, float(p_min))
        except EdgecdsError as exc:
            raise VerifyError(f"{bundle / ENGINE_CONFIG}: draft: {exc}") from None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def read(cls, bundle: Path) -> BundleEngineConfig:
        path = bundle / ENGINE_CONFIG
        try:
            if path.is_symlink() or not path.is_file() or path.stat().st_size > MAX_CONFIG_BYTES:
                raise VerifyError(f"{path}: missing, not a plain file, or too large; this is not an edgecds bundle")
            raw = path.read_bytes()
        except OSError as exc:
            raise VerifyError(f"{path}: not readable ({exc})") from None
        return cls.parse(raw, path)

    @classmethod
    def parse(cls, raw: bytes, path: Path) -> BundleEngineConfig:
        """`runtime.json`'s bytes, checked; `path` names it in messages (a file, or a member of an archive)."""
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise VerifyError(f"{path}: not readable as JSON ({type(exc).__name__})") from None
        try:
            config: BundleEngineConfig = dataclass_from_dict(cls, data, str(path))
        except EdgecdsError as exc:
            raise VerifyError(str(exc)) from None
        if not isinstance(config.sampling, dict):
            raise VerifyError(f"{path}: 'sampling' must be an object")
        return config
