"""Where edgecds keeps pulled models and derived folders on this machine."""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "EDGECDS_HOME"


def edgecds_home() -> Path:
    """`$EDGECDS_HOME`, else `$XDG_CACHE_HOME/edgecds`, else `~/.cache/edgecds`."""
    explicit = os.environ.get(HOME_ENV)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "edgecds"


def models_dir() -> Path:
    return edgecds_home() / "models"
