"""Accuracy of an artifact's configurations on the model file's test split (``legoc evaluate``).

``legoc compile`` measures accuracy drops on ``val_data()`` and never calls ``test_data()``; the
figures reported to users come from here: the compiled artifact run by the torch-free runtime
(legoc.runtime), one configuration at a time, over the model file's ``test_data()`` batches.

Scoring: top-1 accuracy of the runtime's (first) output against the batch labels, in NumPy, when
the model file has no ``evaluate()``; else the model file's own ``evaluate(model, data)``, given
a torch module that runs the runtime (:class:`RuntimeModule`), so a custom metric scores the
compiled artifact exactly as it would score the PyTorch model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from legoc.errors import UserError

SPLITS = ("test", "val")


@dataclass
class ConfigResult:
    label: str                   # "full", "uniform 2", "budget 0.30 ms", "variants 0,1,2,3"
    choice: tuple[int, ...]      # one variant index per block
    ratios: tuple[float, ...]    # the chosen variants' pruning ratios
    macs: int                    # blocks and frame
    est_accuracy: float | None   # the artifact's estimate (from val-split profiling)
    est_latency_ms: float | None
    accuracy: float              # measured on the requested split


def split_batches(spec, split: str = "test") -> list:
    """The model file's ``test_data()`` (or ``val_data()``) batches; a UserError if it has none."""
    from legoc.modelfile import call_hook

    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    fn = spec.test_data if split == "test" else spec.val_data
    if fn is None:
        raise UserError(f"{spec.path}: defines no {split}_data(); add {split}_data() returning (x, y) batches "
                        f"held out from training (see README, 'Data splits')")
    batches = [tuple(b) if isinstance(b, (tuple, list)) else (b,) for b in call_hook(spec.path, f"{split}_data", fn)]
    if not batches:
        raise UserError(f"{spec.path}: {split}_data() returned no batches")
    return batches


def _first_leaf(out) -> np.ndarray:
    while isinstance(out, (list, tuple, dict)):
        out = next(iter(out.values())) if isinstance(out, dict) else out[0]
    return np.asarray(out)


def _runtime_batch(model) -> int:
    return int(model.input_shapes[0][0]) if model.input_shapes and model.input_shapes[0] else 1


def _chunks(model, xs: Sequence[np.ndarray]):
    """Split a data batch into the artifact's (fixed) batch size."""
    b = _runtime_batch(model)
    n = int(xs[0].shape[0])
    if n % b:
        raise UserError(f"a data batch of {n} samples does not split into the artifact's batch size {b}")
    for i in range(0, n, b):
        yield [np.ascontiguousarray(x[i:i + b], dtype=np.float32) for x in xs]


def top1(model, batches) -> float:
    """Top-1 accuracy in [0, 1] of the runtime ``model`` (current configuration) over (x, y) batches.

    NumPy only (tensors are converted with np.asarray), so it runs on a device without torch."""
    correct = total = 0
    for batch in batches:
        if len(batch) < 2:
            raise UserError("data batches must be (x, class index) pairs to score top-1 accuracy; "
                            "or define evaluate(model, data) in model.py")
        x, y = batch[0], np.asarray(batch[1]).reshape(-1)
        xs = [np.asarray(t) for t in (x if isinstance(x, (tuple, list)) else (x,))]
        preds = [_first_leaf(model(*chunk)).reshape(len(chunk[0]), -1).argmax(axis=1) for chunk in _chunks(model, xs)]
        correct += int((np.concatenate(preds) == y).sum())
        total += int(y.size)
    return correct / max(total, 1)


def runtime_module(model):
    """A torch.nn.Module whose forward runs the runtime ``model`` (so a model file's evaluate()
    can score the compiled artifact). The compiler side only: it imports torch."""
    import torch

    class RuntimeModule(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.runtime = model

        def forward(self, *xs):
            arrays = [t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t) for t in xs]
            outs = [model(*chunk) for chunk in _chunks(model, arrays)]
            return _stack(outs, torch)

    return RuntimeModule()


def _stack(outs: list, torch) -> Any:
    """Concatenate per-chunk runtime outputs (arrays, or tuples/dicts of them) along dim 0."""
    first = outs[0]
    if isinstance(first, dict):
        return {k: _stack([o[k] for o in outs], torch) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(_stack([o[i] for o in outs], torch) for i in range(len(first)))
    return torch.from_numpy(np.concatenate([np.asarray(o) for o in outs], axis=0))


def score(model, batches, evaluate=None, source: str = "model.py") -> float:
    """The runtime ``model``'s accuracy over ``batches``: ``evaluate`` from model.py (``source``,
    named in its errors), else top-1."""
    if evaluate is None:
        return top1(model, batches)
    from legoc.modelfile import call_hook

    return float(call_hook(source, "evaluate", evaluate, runtime_module(model), batches))


def configurations(model, variants: Sequence[Sequence[int]] = (), latency_ms: Sequence[float] = (),
                   uniform: bool = False) -> list[tuple[str, tuple[int, ...]]]:
    """(label, choice) for every requested configuration; the uniform ones when none is requested."""
    picks: list[tuple[str, tuple[int, ...]]] = []
    nb = len(model.blocks)
    for v in variants:
        if len(v) != nb:
            raise UserError(f"--variants needs one index per block ({nb} blocks), got {len(v)}")
        for b, i in zip(model.blocks, v):
            if not 0 <= i < len(b.variants):
                raise UserError(f"--variants: block {b.name} has variants 0..{len(b.variants) - 1}, got {i}")
        picks.append((f"variants {','.join(map(str, v))}", tuple(int(i) for i in v)))
    for ms in latency_ms:
        sel = model.select(latency_ms=ms)
        picks.append((f"budget {ms:g} ms", tuple(sel.choice)))
    if uniform or not picks:
        n = min(len(b.variants) for b in model.blocks)
        picks += [("full" if i == 0 else f"uniform {i}", tuple([i] * nb)) for i in range(n)]
    return picks


def evaluate_artifact(model, batches, picks: Sequence[tuple[str, Sequence[int]]], evaluate=None,
                      source: str = "model.py") -> list[ConfigResult]:
    """Configure the runtime ``model`` to each pick and score it on ``batches``."""
    prof = model.profiles
    results = []
    for label, choice in picks:
        choice = tuple(int(i) for i in choice)
        model.configure(variants=list(choice))
        chosen = [b.variants[i] for b, i in zip(model.blocks, choice)]
        fixed = [s.variants[0] for s in model.frame if s.variants]
        results.append(ConfigResult(
            label=label, choice=choice, ratios=tuple(float(v.ratio) for v in chosen),
            macs=sum(int(v.macs) for v in chosen + fixed), est_accuracy=prof.accuracy(choice),
            est_latency_ms=prof.latency_ms(choice), accuracy=score(model, batches, evaluate, source)))
    return results


def record(results: Sequence[ConfigResult], split: str, metric: str, samples: int, model_file: str) -> dict:
    """The manifest's ``evaluation`` entry (``legoc evaluate --record``), shown by ``legoc inspect``."""
    import time

    return {
        "split": split, "metric": metric, "samples": samples, "model_file": model_file,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "how": f"legoc evaluate: the artifact run by legoc.runtime on {split}_data() of {model_file}",
        "results": [{"label": r.label, "choice": list(r.choice), "accuracy": r.accuracy,
                     "est_accuracy": r.est_accuracy, "est_latency_ms": r.est_latency_ms} for r in results],
    }
