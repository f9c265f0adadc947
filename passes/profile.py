"""profile-accuracy: what each variant costs in accuracy, measured on validation data.

A variant's accuracy drop is measured with that one variant substituted into the model, in a few
*contexts* (the variants of every other block): all other blocks full, and all other blocks at
the middle ratio. ``drop = metric(context) - metric(context with the variant)``, in the metric's
own unit (top-1 accuracy in [0, 1] for classifiers; the metric itself: legoc.passes.accuracy).
The mean over contexts is what the combination estimators use; every context's figure is kept in
the manifest.

Top-1 on a thousand samples moves in steps of 0.1 points, and a pruned block often changes fewer
answers than that: raw drops inside that noise (zero, or below zero) would make every pruned variant
look as good as full size. So every evaluation also keeps a *per-sample* record:

* correctness (classifiers: labels are class indices), which gives the drop a 95% interval (normal
  approximation of the paired per-sample differences, context vs context with the variant);
* a continuous *signal* that does not saturate: how far the outputs move from the original model's,
  the KL divergence of the class distributions (classifiers; never negative, so it cannot say that
  pruning helps), else the squared relative output error.

One factor ``alpha`` maps signal to metric (least squares through the origin over every measured
variant and the uniform configurations). A variant's estimated drop is ``alpha x signal``, never
below zero unless the signal's interval lies below zero; where the metric's own interval excludes
that estimate (a drop clearly larger, or clearly negative), the measured drop stands. Without a
usable fit the measured drop is used, clipped at zero unless its interval lies below zero.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from legoc.errors import InternalError
from legoc.passes.accuracy import AccuracyProfiler
from legoc.passes.infra import Pass, PassResult, ProgramState

if TYPE_CHECKING:
    from legoc.pipeline import CompileConfig

__all__ = ["AccuracyProfiler", "Drop", "ProfileAccuracy", "calibrate", "contexts_of", "paired"]

Z95 = 1.959964   # two-sided 95% normal quantile


def contexts_of(variants: dict) -> dict[str, dict[str, int]]:
    """The contexts a variant is measured in: every other block full, and every other block at
    its middle variant (index len // 2)."""
    return {"others-full": {b: 0 for b in variants},
            "others-middle": {b: len(vs) // 2 for b, vs in variants.items()}}


def paired(ref, var, floor: float = 0.0) -> tuple[float, float, float]:
    """Mean of ``ref - var`` per sample and its 95% interval (normal approximation), at least
    ``floor`` wide on each side."""
    import numpy as np

    d = np.asarray(ref, float) - np.asarray(var, float)
    mean = float(d.mean())
    half = Z95 * float(d.std(ddof=1)) / len(d) ** 0.5 if len(d) > 1 else float("inf")
    half = max(half, floor)
    return mean, mean - half, mean + half


@dataclass(frozen=True)
class Drop:
    """One variant in one context: the metric's drop and the signal's increase, with intervals."""

    metric: float
    metric_ci: tuple[float, float] | None    # None: the metric is not a per-sample mean we can see
    signal: float
    signal_ci: tuple[float, float]

    def estimate(self, alpha: float | None) -> float:
        """The drop the estimators use (see the module docstring)."""
        measured = self.metric if self.metric_ci is not None and self.metric_ci[1] < 0 else max(self.metric, 0.0)
        if alpha is None:
            return measured
        est = alpha * (self.signal if self.signal_ci[1] < 0 else max(self.signal, 0.0))
        if self.metric_ci is not None and not self.metric_ci[0] <= est <= self.metric_ci[1]:
            return measured              # the measured drop clearly disagrees: it stands
        return est


def calibrate(points: list[tuple[float, float]]) -> float | None:
    """``alpha`` of ``metric drop = alpha x signal increase`` by least squares through the origin over
    (signal, metric) points; None when the signal does not move or the fit is not positive."""
    den = sum(s * s for s, _ in points)
    if den <= 1e-18:
        return None
    alpha = sum(s * m for s, m in points) / den
    return alpha if alpha > 0 else None


class ProfileAccuracy(Pass):
    """Measure every variant's accuracy drop (or fidelity drop) on validation data."""

    name = "profile-accuracy"

    def requires(self, state: ProgramState) -> None:
        if state.partition is None or state.variants is None:
            raise InternalError("profile-accuracy needs a partition and variants (run partition and prune first)")

    def call(self, state: ProgramState, config: CompileConfig) -> PassResult:
        if not config.profile_accuracy:
            return PassResult(state, False)
        prof = AccuracyProfiler(state, state.val_batches, state.evaluate)
        contexts = contexts_of(state.variants)
        full = {b: 0 for b in prof.blocks}
        base = prof.metric(full)
        context_metric = {name: prof.metric(ctx) for name, ctx in contexts.items()}
        drops: dict[tuple[str, str], dict[str, Drop]] = {}
        for b in prof.blocks:
            for i, v in enumerate(state.variants[b]):
                drops[(b, v.id)] = {}
                for name, ctx in contexts.items():
                    c = {k: j for k, j in ctx.items() if k != b}
                    c[b] = 0
                    drops[(b, v.id)][name] = self._drop(prof.measure(c), prof.measure(c, b, i))
        # calibration points: every pruned variant in every context, and the uniform configurations
        uniform = [self._drop(prof.measure(full), prof.measure({b: i for b in prof.blocks}))
                   for i in range(1, min(len(vs) for vs in state.variants.values()))]
        points = [(d.signal, d.metric) for (b, vid), ds in drops.items() if vid != state.variants[b][0].id
                  for d in ds.values()] + [(d.signal, d.metric) for d in uniform]
        alpha = calibrate(points)
        per_variant = {}
        for key, ds in drops.items():
            est = {name: d.estimate(alpha) for name, d in ds.items()}
            per_variant[key] = {
                "value": sum(est.values()) / len(est), "contexts": est,
                "measured": {name: d.metric for name, d in ds.items()},
                "measured_ci95": _mean_ci([d.metric_ci for d in ds.values()]),
                "signal": sum(d.signal for d in ds.values()) / len(ds),
                "signal_ci95": _mean_ci([d.signal_ci for d in ds.values()]),
            }
        how = ("alpha x signal increase, alpha fitted by least squares through the origin on "
               f"{len(points)} points (every pruned variant in every context, the uniform configurations); "
               "never below zero unless the signal's 95% interval is; the measured drop where its own 95% "
               "interval excludes that" if alpha is not None else
               "measured drop (the signal gave no positive fit), never below zero unless its 95% interval is")
        report = {
            "metric": prof.kind.kind, "source": "measured-local", "how": prof.kind.source,
            "samples": prof.kind.samples, "baseline": base, "contexts": context_metric,
            "signal": prof.signal_kind(),
            "calibration": {"alpha": alpha, "points": len(points), "how": how},
            "variants": per_variant, "evaluations": prof.computed, "reused": prof.reused,
            "profiler": prof,   # kept for measuring whole combinations later (not written to the manifest)
        }
        return PassResult(state.replace(accuracy=report), True)

    @staticmethod
    def _drop(ref: tuple[float, dict], var: tuple[float, dict]) -> Drop:
        """The drop from ``ref`` to ``var``; the metric's interval only where it is the per-sample
        correctness mean (top-1, or an evaluate() equal to it)."""
        (rm, rs), (vm, vs) = ref, var
        metric_ci = None
        if "correct" in rs and abs(rs["correct"].mean() - rm) < 1e-9 and abs(vs["correct"].mean() - vm) < 1e-9:
            # no answer changed in the sample does not mean none would: at least the rule of three (3/n)
            _, lo, hi = paired(rs["correct"], vs["correct"], floor=3 / len(rs["correct"]))
            metric_ci = (lo, hi)
        # the signal rises when things get worse (cross-entropy, error): increase = var - ref
        s, lo, hi = paired(vs["signal"], rs["signal"])
        return Drop(rm - vm, metric_ci, s, (lo, hi))


def _mean_ci(cis: list) -> list[float] | None:
    """The interval of a mean over contexts, conservatively the mean of the bounds."""
    if any(c is None for c in cis):
        return None
    return [sum(c[0] for c in cis) / len(cis), sum(c[1] for c in cis) / len(cis)]
