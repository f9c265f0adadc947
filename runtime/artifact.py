"""The artifact format, read side (no torch, no compiler: this runs on the device).

An artifact is a directory ``NAME.lego/``:

    manifest.json                      schema, model, target, segments, variants, checksums
    manifest.sha256                    the manifest's own sha256 (detects a corrupted manifest)
    manifest.sig                       optional: Ed25519 signature of the manifest (legoc.runtime.signing)
    modules/<segment>/<variant>.so     compiled TVM Relax modules (weights are inputs)
    weights/<segment>/<variant>.safetensors   the weights of each module, in parameter order

Every file is listed in the manifest with its sha256, checked before the file is used.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from legoc.errors import UserError

SCHEMA = "legoc.artifact/1"
MANIFEST = "manifest.json"


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(path: str | os.PathLike, public_key: str | os.PathLike | bytes | None = None) -> dict:
    """The artifact's manifest, after checking its digest and, with ``public_key`` (an Ed25519
    public key: PEM file or bytes), its signature: nothing else is read before that."""
    from legoc.runtime.signing import verify

    root = Path(path)
    mf = root / MANIFEST
    if not root.is_dir():
        raise UserError(f"{root}: no such artifact directory; build one with `legoc compile model.py --target T -o {root}`")
    if not mf.is_file():
        raise UserError(f"{root}: not a legoc artifact (no {MANIFEST}); it may be an interrupted compile: compile again")
    try:
        data = mf.read_bytes()
    except OSError as exc:
        raise UserError(f"{mf}: unreadable manifest ({exc}); compile the artifact again") from exc
    verify(root, data, public_key)
    try:
        manifest = json.loads(data)
    except (OSError, ValueError) as exc:
        raise UserError(f"{mf}: unreadable manifest ({exc}); compile the artifact again") from exc
    if manifest.get("schema") != SCHEMA:
        raise UserError(f"{mf}: schema {manifest.get('schema')!r} is not {SCHEMA!r}; compile it again with this legoc")
    return manifest


def verified_path(root: str | os.PathLike, entry: dict, what: str) -> Path:
    """The path of a file listed in the manifest, after checking that it exists and its sha256."""
    path = Path(root) / entry["file"]
    if not path.is_file():
        raise UserError(f"{path}: missing file of {what}; the artifact is incomplete: compile it again")
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        raise UserError(
            f"{path}: checksum mismatch for {what} (sha256 {digest[:12]}…, manifest says "
            f"{entry['sha256'][:12]}…); the file was modified or corrupted: refusing to load it"
        )
    return path


def build_output(spec: dict, env: dict, leaf=lambda value: value):
    """The model's output structure from the manifest's ``output`` tree and tensors by name:
    ``{"tensor": name} | {"tuple": [...]} | {"list": [...]} | {"dict": {key: ...}}`` (``leaf``
    converts each tensor, e.g. to numpy)."""
    if "tensor" in spec:
        return leaf(env[spec["tensor"]])
    if "tuple" in spec:
        return tuple(build_output(s, env, leaf) for s in spec["tuple"])
    if "list" in spec:
        return [build_output(s, env, leaf) for s in spec["list"]]
    if "dict" in spec:
        return {k: build_output(s, env, leaf) for k, s in spec["dict"].items()}
    return None


# bytes per element of the dtypes a manifest's tensors can have (torch's names)
ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2,
            "int8": 1, "uint8": 1, "bool": 1}


def tensor_bytes(meta: dict) -> int:
    """Bytes of a tensor described by ``{"shape": [...], "dtype": "float32"}``."""
    n = 1
    for d in meta["shape"]:
        n *= int(d)
    dtype = meta.get("dtype", "float32")
    if dtype not in ITEMSIZE:
        raise UserError(f"manifest: no byte size known for dtype {dtype!r}")
    return n * ITEMSIZE[dtype]


def output_names(spec: dict) -> list[str]:
    """The tensor names in a manifest ``output`` tree (see :func:`build_output`), in order."""
    if "tensor" in spec:
        return [spec["tensor"]]
    items = spec.get("tuple") or spec.get("list") or list((spec.get("dict") or {}).values())
    return [n for s in items for n in output_names(s)]
