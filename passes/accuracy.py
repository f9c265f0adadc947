"""The accuracy metric of the model with some blocks replaced by variants, measured on
validation data (:class:`AccuracyProfiler`, used by the profile-accuracy pass and by the back
end's validation).

The metric is, in order of preference:

* ``evaluate(model, val_data())`` from model.py, on the validation batches (never test data);
* top-1 accuracy on ``val_data()`` batches of (x, class index) when there is no ``evaluate()``;
* without ``val_data()``: *output fidelity*, 1 - relative L2 error of the outputs against the
  original model's on the inputs at hand (train inputs, else the example inputs); recorded as
  such, because it is not an accuracy.

Every evaluation also keeps per-sample records: correctness (classifiers) and a continuous
*signal*, how far the outputs move from the original model's (see legoc.passes.profile for why).

Fast and resumable: block inputs of each context are computed once per batch and reused for
every variant of a block (segments before the block are not re-run). Each figure is cached in
``<cache>/profile/accuracy`` under a fingerprint of every module involved, the data and the
metric, so a re-compile re-profiles only what changed.
"""
from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass

import torch

from legoc.errors import InternalError, UserError
from legoc.passes.fingerprint import data_digest, module_digest
from legoc.passes.infra import ProgramState

CACHE_VERSION = "accuracy/2"
MAX_FIDELITY_BATCHES = 8


@dataclass(frozen=True)
class Metric:
    kind: str        # "evaluate" | "top1" | "fidelity"
    source: str      # one line for the manifest: where the figure comes from
    samples: int


def _cache_file(key: str):
    from legoc.paths import cache_dir

    return cache_dir() / "profile" / "accuracy" / f"{key}.json"


def _cached(key: str) -> tuple[float, dict] | None:
    """(metric, per-sample arrays) from the disk cache; None if missing or malformed."""
    from legoc.paths import read_json_cache

    data = read_json_cache(_cache_file(key)) or {}
    value, samples = data.get("value"), data.get("samples")
    if not isinstance(value, (int, float)) or not isinstance(samples, dict):
        return None
    try:
        return float(value), {k: _unpack(v) for k, v in samples.items()}
    except (ValueError, TypeError):
        return None


def _store(key: str, value: float, samples: dict) -> None:
    from legoc.paths import write_json_cache

    write_json_cache(_cache_file(key), {"value": value, "samples": {k: _pack(v) for k, v in samples.items()}})


def _pack(a) -> str:
    import base64

    import numpy as np

    return base64.b64encode(np.asarray(a, dtype="<f8").tobytes()).decode()


def _unpack(text: str):
    import base64

    import numpy as np

    return np.frombuffer(base64.b64decode(text.encode(), validate=True), dtype="<f8")


class _Replay(torch.nn.Module):
    """Stands in for the model inside the user's evaluate(): returns precomputed outputs for the
    validation batches it was given (looked up by tensor identity), runs the real thing otherwise."""

    def __init__(self, outputs: dict[int, object], fallback):
        super().__init__()
        self.outputs, self.fallback, self.misses = outputs, fallback, 0

    def forward(self, *inputs):
        hit = self.outputs.get(id(inputs[0])) if inputs else None
        if hit is None:
            self.misses += 1
            return self.fallback(*inputs)
        return hit


class AccuracyProfiler:
    """Measures the metric of the model with some blocks replaced by variants.

    ``metric(context, block, index)`` (and ``measure``, with the per-sample records): the metric
    with every block at its variant in ``context`` {block: variant index} and ``block`` at variant
    ``index``, reusing the context's block inputs. Results are cached in memory and on disk."""

    def __init__(self, state: ProgramState, val_batches: list | None, evaluate=None):
        self.part, self.variants = state.partition, state.variants
        self.model = state.model
        self.evaluate = evaluate
        self.blocks = [s.name for s in self.part.blocks]
        self.index = {s.name: i for i, s in enumerate(self.part.segments)}
        if val_batches:
            self.inputs = [tuple(b[0]) if isinstance(b[0], (tuple, list)) else (b[0],) for b in val_batches]
            self.targets = [b[1] if len(b) > 1 else None for b in val_batches]
            self.raw = val_batches
            if evaluate is not None:
                self.kind = Metric("evaluate", f"evaluate() on val_data ({self._count()} samples)", self._count())
            elif self._classes():
                self.kind = Metric("top1", f"top-1 accuracy on val_data ({self._count()} samples; model.py has no evaluate())",
                                   self._count())
            else:
                raise UserError(f"{state.source}: val_data() batches are not (x, class index) pairs, so legoc cannot "
                                "score them; define evaluate(model, data) -> float in model.py")
        else:
            batches = [tuple(b) for b in (state.train_inputs or [])[:MAX_FIDELITY_BATCHES]] or [tuple(state.example_inputs)]
            self.inputs, self.targets, self.raw = batches, [None] * len(batches), None
            n = sum(int(b[0].shape[0]) for b in batches)
            where = "train_data inputs" if state.train_inputs else "example_inputs"
            self.kind = Metric("fidelity", f"output fidelity, 1 - relative L2 error vs the original model on {n} "
                                           f"{where} (no val_data() in model.py: not an accuracy)", n)
        self.reference = None   # the original model's outputs, when a figure needs them
        self.digests = {b: [module_digest(v.gm) for v in self.variants[b]] for b in self.blocks}
        frame = hashlib.sha256(CACHE_VERSION.encode())
        for s in self.part.segments:
            if not s.is_block:
                frame.update(module_digest(s.gm).encode())
        frame.update(self._data_digest().encode())
        frame.update(self.kind.kind.encode())
        if evaluate is not None:
            try:
                frame.update(inspect.getsource(evaluate).encode())
            except (OSError, TypeError):
                frame.update(repr(evaluate).encode())
        self.base_key = frame.hexdigest()
        self._env: dict[tuple, list[dict]] = {}
        self._memo: dict[tuple, tuple[float, dict]] = {}
        self.computed = self.reused = 0

    def _count(self) -> int:
        return sum(int(x[0].shape[0]) for x in self.inputs)

    def _classes(self) -> bool:
        return all(t is not None and isinstance(t, torch.Tensor) and not t.is_floating_point() and t.dim() == 1
                   for t in self.targets)

    def _data_digest(self) -> str:
        return data_digest([(*x, *([t] if isinstance(t, torch.Tensor) else [])) for x, t in zip(self.inputs, self.targets)])

    def _replace(self, choice: dict[str, int]) -> dict:
        # every block by its variant, the full one included (nested mode retrains the full variant)
        return {b: self.variants[b][i].gm for b, i in choice.items()}

    def _key(self, choice: dict[str, int]) -> str:
        h = hashlib.sha256(self.base_key.encode())
        for b in self.blocks:
            h.update(self.digests[b][choice.get(b, 0)].encode())
        return h.hexdigest()[:32]

    @torch.no_grad()
    def _envs(self, context: dict[str, int]) -> list[dict]:
        key = tuple(context.get(b, 0) for b in self.blocks)
        if key not in self._env:
            replace = self._replace(context)
            self._env[key] = [self.part.trace_env(*x, replace=replace) for x in self.inputs]
        return self._env[key]

    @torch.no_grad()
    def _outputs(self, context: dict[str, int], block: str | None, index: int) -> list:
        """Model outputs per batch for ``context`` with ``block`` set to variant ``index``; segments
        before the block are not re-run (their tensors come from the context's cached envs)."""
        from legoc.runtime.artifact import build_output

        choice = dict(context)
        if block is not None:
            choice[block] = index
        replace = self._replace(choice)
        start = self.index[block] if block is not None else len(self.part.segments)
        outs = []
        for env0 in self._envs(context):
            env = dict(env0)
            for seg in self.part.segments[start:]:
                out = replace.get(seg.name, seg.gm)(*[env[n] for n in seg.inputs])
                if len(seg.outputs) == 1 and not isinstance(out, (tuple, list)):
                    out = (out,)
                env.update(zip(seg.outputs, out))
            outs.append(build_output(self.part.output_spec, env))
        return outs

    def _score(self, outs: list) -> float:
        if self.kind.kind == "fidelity":
            num = den = 0.0
            for got, ref in zip(outs, self._reference()):
                for g, r in zip(_leaves(got), _leaves(ref)):
                    num += float(torch.linalg.vector_norm((g - r).double())) ** 2
                    den += float(torch.linalg.vector_norm(r.double())) ** 2
            return 1.0 - (num ** 0.5) / max(den ** 0.5, 1e-12)
        if self.kind.kind == "top1":
            correct = total = 0
            for out, y in zip(outs, self.targets):
                logits = next(iter(_leaves(out)))
                correct += int((logits.argmax(dim=1) == y).sum())
                total += int(y.numel())
            return correct / max(total, 1)
        table = {id(x[0]): out for x, out in zip(self.inputs, outs)}
        replay = _Replay(table, self.model)
        value = self.evaluate(replay, self.raw)
        if replay.misses:
            raise InternalError(f"evaluate() ran the model on {replay.misses} inputs that are not val_data batches")
        return float(value)

    def _is_classifier(self, outs: list) -> bool:
        """Labels are class indices of the first output's (N, classes) logits."""
        if not self._classes():
            return False
        for out, y in zip(outs, self.targets):
            logits = next(iter(_leaves(out)), None)
            if logits is None or logits.dim() != 2 or logits.shape[0] != y.shape[0] or int(y.max()) >= logits.shape[1]:
                return False
        return True

    def _reference(self) -> list:
        """The original model's outputs on the profiling inputs (computed once)."""
        if self.reference is None:
            with torch.no_grad():
                self.reference = [self.part.run(*x) for x in self.inputs]
        return self.reference

    @torch.no_grad()
    def _per_sample(self, outs: list) -> dict:
        """Per-sample records of one evaluation: ``correct`` (classifiers) and ``signal``, how far the
        outputs are from the original model's: KL divergence of the class distributions (classifiers),
        else the squared relative error."""
        import numpy as np

        if self._is_classifier(outs):
            correct, kl = [], []
            for out, y, ref in zip(outs, self.targets, self._reference()):
                logp = torch.log_softmax(next(iter(_leaves(out))).double(), dim=1)
                logq = torch.log_softmax(next(iter(_leaves(ref))).double(), dim=1)
                correct.append((logp.argmax(dim=1) == y).double())
                kl.append((logq.exp() * (logq - logp)).sum(1))
            return {"correct": torch.cat(correct).numpy(), "signal": torch.cat(kl).clamp_min(0).numpy()}
        err = []
        for got, ref in zip(outs, self._reference()):
            num = den = None
            for g, r in zip(_leaves(got), _leaves(ref)):
                n = int(r.shape[0]) if r.dim() > 0 else 1
                gd, rd = g.double().reshape(n, -1), r.double().reshape(n, -1)
                a, b = ((gd - rd) ** 2).sum(1), (rd ** 2).sum(1)
                num, den = (a, b) if num is None or num.shape != a.shape else (num + a, den + b)
            err.append((num / den.clamp_min(1e-24)).numpy() if num is not None else np.zeros(1))
        return {"signal": np.concatenate(err)}

    def signal_kind(self) -> str:
        """What the per-sample signal is, for the manifest."""
        if self.kind.kind != "fidelity" and self._classes():
            return "KL divergence from the original model's class distribution (nats per sample)"
        return "squared relative output error against the original model (per sample)"

    def metric(self, context: dict[str, int], block: str | None = None, index: int = 0) -> float:
        return self.measure(context, block, index)[0]

    def measure(self, context: dict[str, int], block: str | None = None, index: int = 0) -> tuple[float, dict]:
        """(metric, per-sample records) of ``context`` with ``block`` at variant ``index``; cached."""
        choice = dict(context)
        if block is not None:
            choice[block] = index
        mkey = tuple(choice.get(b, 0) for b in self.blocks)
        if mkey in self._memo:
            return self._memo[mkey]
        key = self._key(choice)
        hit = _cached(key)
        if hit is None:
            outs = self._outputs(context, block, index)
            hit = (self._score(outs), self._per_sample(outs))
            _store(key, *hit)
            self.computed += 1
        else:
            self.reused += 1
        self._memo[mkey] = hit
        return hit


def _leaves(out):
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, (tuple, list)):
        for o in out:
            yield from _leaves(o)
    elif isinstance(out, dict):
        for o in out.values():
            yield from _leaves(o)
