"""Accuracy profiling: what each variant costs in accuracy, measured on validation data.

A variant's accuracy drop is measured with that one variant substituted into the model, in a few
*contexts* (the variants of every other block): all other blocks full, and all other blocks at
the middle ratio. ``drop = metric(context) - metric(context with the variant)``, in the metric's
own unit (top-1 accuracy in [0, 1] for classifiers). The mean over contexts is what the
combination estimators use; every context's figure is kept in the manifest.

The metric is, in order of preference:

* ``evaluate(model, val_data())`` from model.py, on the validation batches (never test data);
* top-1 accuracy on ``val_data()`` batches of (x, class index) when there is no ``evaluate()``;
* without ``val_data()``: *output fidelity*, 1 - relative L2 error of the outputs against the
  original model's on the inputs at hand (train inputs, else the example inputs); recorded as
  such, because it is not an accuracy.

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
from legoc.passes.infra import Pass, PassResult, ProgramState

CACHE_VERSION = "accuracy/1"
MAX_FIDELITY_BATCHES = 8


@dataclass(frozen=True)
class Metric:
    kind: str        # "evaluate" | "top1" | "fidelity"
    source: str      # one line for the manifest: where the figure comes from
    samples: int


def _module_digest(gm: torch.nn.Module) -> str:
    from legoc.passes.retrain import _digest_module

    h = hashlib.sha256()
    _digest_module(h, gm)
    return h.hexdigest()


def _cache_file(key: str):
    from legoc.paths import cache_dir

    return cache_dir() / "profile" / "accuracy" / f"{key}.json"


def _cached(key: str) -> float | None:
    from legoc.paths import read_json_cache

    value = (read_json_cache(_cache_file(key)) or {}).get("value")
    return float(value) if isinstance(value, (int, float)) else None


def _store(key: str, value: float) -> None:
    from legoc.paths import write_json_cache

    write_json_cache(_cache_file(key), {"value": value})


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

    ``metric(choice)`` for a full assignment {block: variant index}; ``with_variant(context, block,
    index)`` reuses the context's block inputs. Results are cached in memory and on disk."""

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
        with torch.no_grad():
            self.reference = [self.part.run(*x) for x in self.inputs] if self.kind.kind == "fidelity" else None
        self.digests = {b: [_module_digest(v.gm) for v in self.variants[b]] for b in self.blocks}
        frame = hashlib.sha256(CACHE_VERSION.encode())
        for s in self.part.segments:
            if not s.is_block:
                frame.update(_module_digest(s.gm).encode())
        frame.update(self._data_digest().encode())
        frame.update(self.kind.kind.encode())
        if evaluate is not None:
            try:
                frame.update(inspect.getsource(evaluate).encode())
            except (OSError, TypeError):
                frame.update(repr(evaluate).encode())
        self.base_key = frame.hexdigest()
        self._env: dict[tuple, list[dict]] = {}
        self._memo: dict[tuple, float] = {}
        self.computed = self.reused = 0

    def _count(self) -> int:
        return sum(int(x[0].shape[0]) for x in self.inputs)

    def _classes(self) -> bool:
        return all(t is not None and isinstance(t, torch.Tensor) and not t.is_floating_point() and t.dim() == 1
                   for t in self.targets)

    def _data_digest(self) -> str:
        from legoc.passes.retrain import data_digest

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
            for got, ref in zip(outs, self.reference):
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

    def metric(self, context: dict[str, int], block: str | None = None, index: int = 0) -> float:
        choice = dict(context)
        if block is not None:
            choice[block] = index
        mkey = tuple(choice.get(b, 0) for b in self.blocks)
        if mkey in self._memo:
            return self._memo[mkey]
        key = self._key(choice)
        value = _cached(key)
        if value is None:
            value = self._score(self._outputs(context, block, index))
            _store(key, value)
            self.computed += 1
        else:
            self.reused += 1
        self._memo[mkey] = value
        return value


def _leaves(out):
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, (tuple, list)):
        for o in out:
            yield from _leaves(o)
    elif isinstance(out, dict):
        for o in out.values():
            yield from _leaves(o)


def contexts_of(variants: dict) -> dict[str, dict[str, int]]:
    """The contexts a variant is measured in: every other block full, and every other block at
    its middle variant (index len // 2)."""
    return {"others-full": {b: 0 for b in variants},
            "others-middle": {b: len(vs) // 2 for b, vs in variants.items()}}


class ProfileAccuracy(Pass):
    """Measure every variant's accuracy drop (or fidelity drop) on validation data."""

    name = "profile-accuracy"

    def requires(self, state: ProgramState) -> None:
        if state.partition is None or state.variants is None:
            raise InternalError("profile-accuracy needs a partition and variants (run partition and prune first)")

    def call(self, state: ProgramState, config) -> PassResult:
        if not config.profile_accuracy:
            return PassResult(state, False)
        prof = AccuracyProfiler(state, state.val_batches, state.evaluate)
        contexts = contexts_of(state.variants)
        base = prof.metric({b: 0 for b in prof.blocks})
        per_variant: dict[tuple[str, str], dict] = {}
        context_metric = {name: prof.metric(ctx) for name, ctx in contexts.items()}
        for b in prof.blocks:
            for i, v in enumerate(state.variants[b]):
                drops = {}
                for name, ctx in contexts.items():
                    c = {k: j for k, j in ctx.items() if k != b}
                    c[b] = 0
                    ref = prof.metric(c)
                    drops[name] = ref - prof.metric(c, b, i)
                per_variant[(b, v.id)] = {"value": sum(drops.values()) / len(drops), "contexts": drops}
        report = {
            "metric": prof.kind.kind, "source": "measured-local", "how": prof.kind.source,
            "samples": prof.kind.samples, "baseline": base, "contexts": context_metric,
            "variants": per_variant, "evaluations": prof.computed, "reused": prof.reused,
            "profiler": prof,   # kept for measuring whole combinations later (not written to the manifest)
        }
        return PassResult(state.replace(accuracy=report), True)
