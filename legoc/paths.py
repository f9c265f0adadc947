"""Where legoc keeps things between runs."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """legoc's cache folder: ``$LEGOC_CACHE`` or ``~/.cache/legoc``."""
    env = os.environ.get("LEGOC_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "legoc"


def read_json_cache(path: Path) -> dict | None:
    """A JSON object from the cache, or None if it is missing or unreadable."""
    import json

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_json_cache(path: Path, data: dict) -> None:
    """Write a JSON object into the cache atomically (temp file, then rename)."""
    import json
    import os
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
