"""The artifact format, write side: build everything in a temporary directory next to the
destination, write the manifest last, then rename into place. An interrupted compile leaves at
most a ``.NAME.lego.tmp-*`` directory, never something that looks like a valid artifact."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from legoc import __version__
from legoc.runtime.artifact import MANIFEST, SCHEMA, sha256_file


class ArtifactWriter:
    """``with ArtifactWriter(dest) as w: path = w.path_for("modules/b0/r0.so"); ...; w.commit(manifest)``"""

    def __init__(self, dest: str | os.PathLike):
        self.dest = Path(dest)
        self.tmp: Path | None = None
        self._committed = False

    def __enter__(self) -> "ArtifactWriter":
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.dest.name}.tmp-", dir=self.dest.parent))
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.tmp is not None and self.tmp.exists() and not self._committed:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def path_for(self, rel: str) -> Path:
        p = self.tmp / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def file_entry(self, rel: str) -> dict:
        return {"file": rel, "sha256": sha256_file(self.tmp / rel), "bytes": (self.tmp / rel).stat().st_size}

    def write_weights(self, rel: str, names: list[str], values: list[np.ndarray]) -> dict:
        from safetensors.numpy import save_file

        save_file({n: np.ascontiguousarray(v) for n, v in zip(names, values)}, str(self.path_for(rel)))
        entry = self.file_entry(rel)
        entry["names"] = list(names)
        return entry

    def draft(self, manifest: dict) -> Path:
        """Write the manifest into the unfinished artifact, so it can be loaded (e.g. to measure
        combinations) before it is committed; returns the temporary directory."""
        manifest = {"schema": SCHEMA, "legoc_version": __version__,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **manifest}
        (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=False))
        return self.tmp

    def commit(self, manifest: dict) -> Path:
        self.draft(manifest)
        old = None
        if self.dest.exists():
            old = self.dest.with_name(f".{self.dest.name}.old-{os.getpid()}")
            os.rename(self.dest, old)
        os.rename(self.tmp, self.dest)
        self._committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.dest
