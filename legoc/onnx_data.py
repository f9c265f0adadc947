"""The data sidecar of an ONNX model: ``--data DIR`` with ``train.npz``, ``val.npz`` and
``test.npz`` (any of them), the three splits a model.py's train_data/val_data/test_data give.

Each file holds ``x`` (one input model) or one array per input named as the ONNX input, with
samples on axis 0 and each sample shaped as the input without its batch axis; and ``y``, class
indices (N,), optional in train.npz (retraining distills and needs none; ``--importance taylor``
does), required in val.npz and test.npz (accuracy). No pickles are read.

Batches: 32 samples (the last one smaller) when the converted model runs any batch size;
otherwise (a Reshape to a constant batch size) the model's own batch size, which must then divide
the number of samples.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from legoc.errors import UserError

SPLITS = ("train", "val", "test")
BATCH = 32


def _any_batch(gm, inputs: tuple) -> bool:
    """Whether ``gm`` gives the same per-sample outputs on a batch of two as on each sample."""
    import contextlib
    import io

    import torch

    try:   # a GraphModule that fails prints its generated code to stderr before raising: not for users
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            one = torch.utils._pytree.tree_leaves(gm(*inputs))
            two = torch.utils._pytree.tree_leaves(gm(*[torch.cat([x, x]) for x in inputs]))
    except Exception:
        return False
    return len(one) == len(two) and all(
        b.shape[0] == 2 * a.shape[0] and torch.allclose(b[: a.shape[0]], a, atol=1e-5, rtol=1e-4)
        and torch.allclose(b[a.shape[0]:], a, atol=1e-5, rtol=1e-4) for a, b in zip(one, two))


def _arrays(file: Path, names: list[str], shapes: list[tuple]) -> tuple[list[np.ndarray], np.ndarray | None]:
    try:
        with np.load(file, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as exc:
        raise UserError(f"{file}: cannot read it as a .npz of arrays ({exc}); save it with numpy.savez") from exc
    keys = ["x"] if len(names) == 1 and "x" in arrays else names
    xs = []
    for key, name, shape in zip(keys, names, shapes):
        if key not in arrays:
            raise UserError(f"{file}: no array '{key}'; it needs {' and '.join(repr(k) for k in keys)} (inputs, samples "
                            "on axis 0) and 'y' (class indices)")
        x = arrays[key]
        if x.ndim != len(shape) or tuple(x.shape[1:]) != tuple(shape[1:]):
            raise UserError(f"{file}: array '{key}' has shape {x.shape}; input '{name}' takes samples of shape "
                            f"{tuple(shape[1:])}, so it must be (N, {', '.join(map(str, shape[1:]))})")
        xs.append(np.ascontiguousarray(x, dtype=np.float32))
    y = arrays.get("y")
    if y is not None and (y.ndim != 1 or len(y) != len(xs[0])):
        raise UserError(f"{file}: 'y' has shape {y.shape}; it must hold one class index per sample ({len(xs[0])},)")
    if len({len(x) for x in xs}) > 1:
        raise UserError(f"{file}: the input arrays hold different numbers of samples")
    return xs, y


def data_hooks(data: str | Path, gm, inputs: tuple, renamed: dict[str, str]) -> dict:
    """train_data/val_data/test_data functions over ``data``'s files (ModelSpec fields)."""
    import torch

    folder = Path(data)
    if not folder.is_dir():
        raise UserError(f"--data {folder}: no such folder; give a folder with train.npz, val.npz and/or test.npz")
    files = {s: folder / f"{s}.npz" for s in SPLITS if (folder / f"{s}.npz").is_file()}
    if not files:
        raise UserError(f"--data {folder}: no train.npz, val.npz or test.npz in it (arrays 'x' and 'y', see README)")
    names = list(renamed)
    shapes = [tuple(x.shape) for x in inputs]
    flexible = _any_batch(gm, inputs)
    size = BATCH if flexible else shapes[0][0]

    def hook(split: str):
        def batches():
            xs, y = _arrays(files[split], names, shapes)
            if y is None and split != "train":
                raise UserError(f"{files[split]}: no 'y' (class indices); {split} accuracy needs labels")
            n = len(xs[0])
            if not flexible and n % size:
                raise UserError(f"{files[split]}: {n} samples do not split into batches of {size}, the only batch "
                                "size the model takes; give a multiple of it")
            out = []
            for i in range(0, n, size):
                x = tuple(torch.from_numpy(a[i:i + size]) for a in xs)
                x = x[0] if len(x) == 1 else x
                out.append((x, torch.from_numpy(y[i:i + size].astype(np.int64))) if y is not None else (x,))
            return out
        return batches

    return {f"{s}_data": hook(s) for s in files}
