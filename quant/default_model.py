"""The embedded default input of `quantize`: a Hugging Face folder rebuilt from the pulled GGUF.

Built once per machine into the cache (build side: it needs torch and transformers), stamped
with the hash of the GGUF it came from, and rebuilt only when that or the builder changes.
"""

from __future__ import annotations

import json
from pathlib import Path

from edgecds.atomic import atomic_path, remove_stale_temporaries
from edgecds.models import DEFAULT_MODEL, find_model, model_folder, require_pulled
from edgecds.progress import Reporter

BUILDER_VERSION = 1  # bump when the folder's contents change, so caches rebuild
STAMP = "edgecds-origin.json"


def default_hf_folder(reporter: Reporter | None = None) -> Path:
    model = find_model(DEFAULT_MODEL)
    gguf_path = require_pulled(model)
    folder = model_folder(model)
    target = folder / "hf"
    stamp = {"built_from": model.filename, "gguf_sha256": model.sha256, "builder_version": BUILDER_VERSION}
    try:
        if json.loads((target / STAMP).read_text()) == stamp:
            return target
    except (OSError, ValueError):
        pass

    from edgecds.formats.gguf_file import read_gguf
    from edgecds.quant.gguf_to_hf import build_hf_folder

    remove_stale_temporaries(folder)
    if reporter:
        reporter.note(f"building the Hugging Face folder of {model.id} from its GGUF (once; about a minute)")
    with atomic_path(target, directory=True) as temp:
        build_hf_folder(gguf_path, read_gguf(gguf_path), temp, folder / "LICENSE", quiet=not (reporter and reporter.shows_bars))
        (temp / STAMP).write_text(json.dumps(stamp, indent=2) + "\n")
    return target


def rebuilt_origin(folder: Path) -> str:
    """SourceRecord.origin of a folder this module built (its stamp says from which GGUF), else ''."""
    try:
        stamp = json.loads((folder / STAMP).read_text())
    except (OSError, ValueError):
        return ""
    built_from = stamp.get("built_from") if isinstance(stamp, dict) else None
    if not isinstance(built_from, str):
        return ""
    kind = built_from.removesuffix(".gguf").rsplit(".", 1)[-1]  # SmolLM2-135M-Instruct.Q4_1.gguf: Q4_1
    return f"rebuilt from {built_from}, a {kind} file, not the original weights"
