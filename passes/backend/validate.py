"""validate: the manifest's combination figures, which turn per-module figures into a
configuration's estimate (legoc.runtime.estimate), checked against configurations run end to end.

Where the target runs here (and ``config.validate``): the uniform configurations (the same
variant in every block) are measured end to end and fitted by least squares as ``measured =
scale * (sum of the modules' latencies) + segments * overhead`` (legoc.targets.calibration);
about ``VALIDATE_POINTS`` held-out configurations along the estimated Pareto front are measured
with them, so the manifest records estimate against measurement. All are timed in one torch-free
worker, in interleaved rounds. The Pareto front is known before the fit: a positive scale and a
constant overhead do not change it. For a board: its estimated per-call overhead.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING

from legoc.passes.backend.stage import BackendStage
from legoc.passes.infra import PassResult, ProgramState, progress_bar

if TYPE_CHECKING:
    from legoc.pipeline import CompileConfig

VALIDATE_POINTS = 6   # held-out configurations along the estimated Pareto front
VALIDATE_WARMUP, VALIDATE_CALLS, VALIDATE_ROUNDS = 3, 30, 3   # end-to-end timing of each configuration


class Validate(BackendStage):
    """Sets the manifest's ``combination``: per-call overhead, latency scale, validation points."""

    name = "validate"

    def call(self, state: ProgramState, config: CompileConfig) -> PassResult:
        from legoc.runtime.estimate import DEFAULT_CALL_OVERHEAD_MS, MODULE_OVERHEAD_BYTES
        from legoc.targets.calibration import call_overhead_ms

        manifest = copy.deepcopy(state.manifest)
        out = {"call_overhead_ms": {"value": DEFAULT_CALL_OVERHEAD_MS, "source": "estimated",
                                    "how": "default (not measured: no validation)"},
               "module_overhead_bytes": MODULE_OVERHEAD_BYTES, "validation": []}
        if not state.target.runs_here:
            out["call_overhead_ms"] = call_overhead_ms()   # a board's, estimated
        elif config.validate:
            with progress_bar(config.progress) as bar:
                _measure(state, manifest, out, bar)
        manifest["combination"] = out
        return PassResult(state.replace(manifest=manifest), True)


def _measure(state: ProgramState, manifest: dict, out: dict, bar) -> None:
    """Fit the latency model on the uniform configurations and record every validation point."""
    from legoc.runtime.estimate import Profiles
    from legoc.targets.calibration import fit_latency

    profiles = Profiles(manifest)
    n = min(len(vs) for vs in profiles.blocks)
    picks = validation_choices(profiles)   # the n uniform configurations first
    task = bar.add_task(f"validating {len(picks)} combinations", total=len(picks) + 1)
    latencies = _runtime_latency(state.artifact.draft(manifest), picks, [t.numpy() for t in state.example_inputs])
    bar.advance(task)
    sums = [sum(v.latency_ms for v in profiles.chosen(c) + profiles.frame) for c in picks[:n]]
    scale, overhead = fit_latency(sums, latencies[:n], profiles.num_segments)
    out["call_overhead_ms"] = {"value": overhead, "source": "measured-local",
                               "how": f"least-squares fit of the {n} uniform configurations measured end to end: "
                                      "runtime latency = scale x sum of module latencies + segments x overhead"}
    out["latency_scale"] = {"value": scale, "source": "measured-local",
                            "how": "the same fit: isolated module timings (time evaluator) vs modules run in sequence "
                                   "by the runtime"}
    manifest["combination"] = out
    profiles = Profiles(manifest)
    prof = state.accuracy["profiler"] if state.accuracy else None   # reuses its cached block inputs
    for k, (choice, latency_ms) in enumerate(zip(picks, latencies)):
        est = profiles.estimate(choice)
        measured = {"latency_ms": latency_ms}
        if prof is not None:
            measured["accuracy"] = prof.metric(dict(zip(profiles.block_names, choice)))
        out["validation"].append({"choice": list(choice),
                                  "fitted": k < n,   # the estimators were calibrated on it: in-sample
                                  "estimated": {"accuracy": est.accuracy, "latency_ms": est.latency_ms,
                                                "memory_bytes": est.memory_bytes},
                                  "measured": measured})
        bar.advance(task)
    out["validation_how"] = (f"latency: legoc.runtime end to end in a torch-free worker process, median of "
                             f"{VALIDATE_CALLS} calls in {VALIDATE_ROUNDS} interleaved rounds after {VALIDATE_WARMUP} "
                             "warm-up; fitted: true marks the uniform configurations, the calibration points of the latency fit "
                             "and of the accuracy-drop calibration (in-sample), fitted: false the held-out Pareto points; "
                             "accuracy: the same metric as the profiles, whole model in PyTorch")


def validation_choices(profiles) -> list[tuple[int, ...]]:
    """The uniform configurations (the same variant index in every block), then about
    ``VALIDATE_POINTS`` configurations spread evenly along the estimated Pareto front."""
    n = min(len(vs) for vs in profiles.blocks)
    picks = [tuple([i] * len(profiles.blocks)) for i in range(n)]
    front = [c for c, _ in profiles.pareto_front()]
    if front:
        step = max(1, len(front) // VALIDATE_POINTS)
        picks += [c for c in front[::step] if c not in picks]
    return picks


def _runtime_latency(draft: Path, choices: list, x: list) -> list[float]:
    """End-to-end runtime latency (ms) of each configuration in ``choices``, in a worker process."""
    from legoc.runtime.bench import measure_in_subprocess

    return measure_in_subprocess(draft, [], choices, x, warmup=VALIDATE_WARMUP, calls=VALIDATE_CALLS,
                                 rounds=VALIDATE_ROUNDS)["combinations"]
