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
from legoc.errors import UserError
from legoc.runtime.artifact import MANIFEST, SCHEMA, sha256_file


def check_destination(dest: str | os.PathLike) -> None:
    """Fail before any work if an artifact cannot be written at ``dest``: the nearest existing
    folder above it must be a writable directory (nothing is created here)."""
    dest = Path(dest).absolute()
    if dest.exists() and not dest.is_dir():
        raise UserError(f"cannot write the artifact at {dest}: a file of that name exists; choose another -o")
    parent = dest.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"cannot write the artifact at {dest}: {parent} is a file, not a folder; choose another -o")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write the artifact at {dest}: no permission to write in {parent}; choose another -o")


class ArtifactWriter:
    """``with ArtifactWriter(dest) as w: path = w.path_for("modules/b0/r0.so"); ...; w.commit(manifest)``

    The temporary directory is made on the first write, so a writer can be opened before the
    work that fills it (``legoc compile`` opens it around the whole pass pipeline); leaving the
    ``with`` block without a commit removes it."""

    def __init__(self, dest: str | os.PathLike):
        self.dest = Path(dest)
        self._tmp: Path | None = None
        self._committed = False

    def __enter__(self) -> "ArtifactWriter":
        check_destination(self.dest)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._tmp is not None and self._tmp.exists() and not self._committed:
            shutil.rmtree(self._tmp, ignore_errors=True)

    @property
    def tmp(self) -> Path:
        """The temporary directory next to the destination that everything is written into."""
        if self._tmp is None:
            try:
                self.dest.parent.mkdir(parents=True, exist_ok=True)
                self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.dest.name}.tmp-", dir=self.dest.parent))
            except OSError as exc:
                raise UserError(f"cannot write the artifact at {self.dest}: {exc.strerror or exc}; "
                                "choose another -o") from exc
        return self._tmp

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

    def commit(self, manifest: dict, sign_key: str | os.PathLike | None = None) -> Path:
        """Finish: the manifest, its digest and (with ``sign_key``, an Ed25519 private key PEM) its
        signature, then rename into place."""
        from legoc.runtime.signing import DIGEST, digest_text, sign

        self.draft(manifest)
        (self.tmp / DIGEST).write_text(digest_text((self.tmp / MANIFEST).read_bytes()))
        if sign_key is not None:
            sign(self.tmp, sign_key)
        old = None
        if self.dest.exists():
            old = self.dest.with_name(f".{self.dest.name}.old-{os.getpid()}")
            os.rename(self.dest, old)
        os.rename(self.tmp, self.dest)
        self._committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.dest
