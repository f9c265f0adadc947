"""Where legoc keeps things between runs."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """legoc's cache folder: ``$LEGOC_CACHE`` or ``~/.cache/legoc``."""
    env = os.environ.get("LEGOC_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "legoc"
