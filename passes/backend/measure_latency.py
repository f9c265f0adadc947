"""measure-latency: every module's latency figure, with its source.

Where the target runs here, measured: TVM's time evaluator in a torch-free worker process
(legoc.runtime.bench), all modules new to the measurement cache (legoc.targets.measure) timed
together in interleaved rounds; the others come from the cache. Elsewhere, estimated from the
board's peak and the module's MACs (legoc.targets.calibration) until ``legoc profile --rpc`` or
measure-rpc measures them on the board.
"""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING

from legoc.passes.backend.stage import BackendStage, manifest_entry
from legoc.passes.infra import PassResult, ProgramState

if TYPE_CHECKING:
    from legoc.pipeline import CompileConfig


class MeasureLatency(BackendStage):
    """Sets ``profile.latency_ms`` of every built module; counts the cached ones in
    ``latency_reused``."""

    name = "measure-latency"

    def call(self, state: ProgramState, config: CompileConfig) -> PassResult:
        from legoc.targets import measure
        from legoc.targets.calibration import estimate_latency_ms

        manifest = copy.deepcopy(state.manifest)
        pending = []   # (built module, cache key) of the modules to time now
        reused = 0
        for b in state.built:
            profile = manifest_entry(manifest, b)["profile"]
            if not b.target.runs_here:
                profile["latency_ms"] = estimate_latency_ms(b.target.name, b.target.device, b.job.macs)
                continue
            key = measure.fingerprint(b.job.module, b.job.inputs, b.target.to_json(), b.build)
            data = measure.cached(key)
            profile["latency_ms"] = {"value": None if data is None else data["latency_ms"],
                                     "source": "measured-local", "how": _how(),
                                     **({} if data is None else {"range_ms": data["range_ms"]})}
            if data is not None:
                reused += 1
            elif b.device is None:   # the worker times the target's own device's modules only
                pending.append((b, key))
        if pending:
            _time(state.artifact, manifest, pending)
        return PassResult(state.replace(manifest=manifest, latency_reused=state.latency_reused + reused), True)


def _how() -> str:
    from legoc.targets import measure

    return (f"TVM time_evaluator in torch-free worker processes (legoc.runtime.bench), median of "
            f"{measure.REPEAT} x {measure.NUMBER} runs in {measure.ROUNDS} rounds interleaved with the other new "
            f"modules, on {measure.threads()} threads, random inputs; the median over {measure.PROCESSES} such "
            f"workers (one more when two differ by more than 10%); range_ms: the workers' lowest and highest")


def _time(writer, manifest: dict, pending: list) -> None:
    """Time the ``pending`` modules in clean worker processes (see legoc.runtime.bench for why
    not here) and cache the results."""
    from legoc.runtime.bench import measure_in_processes
    from legoc.targets import measure

    modules = [(b.job.segment.name, b.job.index) for b, _ in pending]
    result = measure_in_processes(writer.draft(manifest), modules, processes=measure.PROCESSES, number=measure.NUMBER,
                                  repeat=measure.REPEAT, rounds=measure.ROUNDS)
    for (b, key), ms, (lo, hi) in zip(pending, result["modules"], result["spread"]["modules"]):
        measure.store(key, {"latency_ms": ms, "range_ms": [lo, hi]})
        entry = manifest_entry(manifest, b)["profile"]["latency_ms"]
        entry["value"], entry["range_ms"] = ms, [lo, hi]
