"""build: compile every variant of every segment with TVM into the artifact (one shared library
and one weight file each), and write the manifest that lists them.

With ``--devices`` (a Jetson's CPU and GPU) every block variant is also built for the other
device; the frame runs on the default device only. Nested variants (``--nested``) share one weight
file per block, the full-size variant's, of which every variant's weights are leading
sub-tensors (checked here). Latency figures are left to measure-latency.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from legoc.errors import InternalError, LegocError, describe
from legoc.passes.backend.manifest import device_entry, manifest_of, variant_entry
from legoc.passes.backend.stage import BackendStage, BuiltVariant, VariantJob, variant_jobs
from legoc.passes.infra import PassResult, ProgramState, progress_bar
from legoc.runtime.nesting import leading

if TYPE_CHECKING:
    from legoc.pipeline import CompileConfig


class Build(BackendStage):
    """TVM build of every module into the artifact; sets ``built``, ``manifest`` and
    ``compile_seconds``."""

    name = "build"

    def requires(self, state: ProgramState) -> None:
        if state.partition is None or state.variants is None:
            raise InternalError("build needs a partition and variants (run partition and prune first)")
        if state.target is None or state.artifact is None:
            raise InternalError("build needs a target and an artifact to write into")

    def call(self, state: ProgramState, config: CompileConfig) -> PassResult:
        from legoc.targets.table import device_targets

        target = state.target
        devices = device_targets(target, config.devices)   # the target's own device first
        builder = _Builder(state.artifact, config.tune_trials, config.winograd)
        jobs = variant_jobs(state)
        variants_of: dict[str, list[dict]] = {s.name: [] for s in state.partition.segments}
        with progress_bar(config.progress) as bar:
            task = bar.add_task(f"compiling for {target.name}", total=len(jobs))
            for job in jobs:
                bar.update(task, description=f"compiling {job.label} for {target.name}")
                variants_of[job.segment.name].append(builder.variant(state, job, devices))
                bar.advance(task)
        manifest = manifest_of(state, config, variants_of, devices, nested=bool(builder.shared))
        return PassResult(state.replace(built=tuple(builder.built), manifest=manifest,
                                        compile_seconds=state.compile_seconds + tuple(builder.seconds)), True)


class _Builder:
    """Compiles modules into the artifact and writes their weights; remembers what it built."""

    def __init__(self, writer, tune_trials: int, winograd: bool = True):
        self.writer, self.tune_trials, self.winograd = writer, tune_trials, winograd
        self.shared: dict[str, tuple[dict, dict]] = {}   # nested block -> (weights entry, name -> array)
        self.built: list[BuiltVariant] = []
        self.seconds: list[tuple[str, str, float]] = []  # (segment, variant, seconds)

    def options(self, job: VariantJob) -> dict:
        # nested variants slice one shared weight set: their weights must stay untransformed
        return {"tune_trials": self.tune_trials, "prepack": not job.nested, "winograd": self.winograd}

    def variant(self, state: ProgramState, job: VariantJob, devices: dict) -> dict:
        """Build ``job`` for every device in ``devices``; its manifest entry."""
        (_, own), *others = devices.items()
        built, rel = self.build(job, own)
        if built.num_outputs != len(job.segment.outputs):
            raise InternalError(f"{job.label} compiled to {built.num_outputs} outputs, expected "
                                f"{len(job.segment.outputs)}")
        weights = self.weights(job, built)
        entry = variant_entry(state, job, self.writer.file_entry(rel), weights)
        if job.segment.is_block and others:
            entry["devices"] = {name: self.device_variant(job, name, spec, built, weights) for name, spec in others}
        return entry

    def device_variant(self, job: VariantJob, device: str, spec, default, default_weights: dict) -> dict:
        """Build ``job`` for another ``device`` of the board; its ``devices[device]`` entry. It
        shares the default device's weight file when the weights are the same arrays (prepacked
        CPU weights are not)."""
        built, rel = self.build(job, spec, device)
        if built.num_outputs != default.num_outputs:
            raise InternalError(f"{job.label} has {built.num_outputs} outputs on {device}, "
                                f"{default.num_outputs} on the default device")
        same = built.param_names == default.param_names and all(
            a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b)
            for a, b in zip(built.params, default.params))
        weights = default_weights if same and not job.nested else self.weights(job, built, device)
        return device_entry(spec.name, self.writer.file_entry(rel), weights)

    def build(self, job: VariantJob, spec, device: str | None = None):
        """Compile ``job`` for ``spec`` (``device``: a ``--devices`` name, None for the target's own
        device): the legoc.targets.build.BuiltModule and the library's path in the artifact."""
        from legoc.targets.build import build_module, build_signature

        suffix = "" if device is None else f".{device}"
        rel = f"modules/{job.segment.name}/{job.id}{suffix}.so"
        name = job.label if device is None else f"{job.label} ({device})"
        t0 = time.perf_counter()
        try:
            built = build_module(job.module, job.inputs, spec, self.writer.path_for(rel), name=name,
                                 **self.options(job))
        except LegocError:
            raise
        except Exception as exc:
            raise InternalError(f"building {job.label} for {spec.name} failed: {describe(exc)}") from exc
        self.seconds.append((job.segment.name, job.id + ("" if device is None else f"@{device}"),
                             time.perf_counter() - t0))
        self.built.append(BuiltVariant(job, device, spec, build_signature(**self.options(job))))
        return built, rel

    def weights(self, job: VariantJob, built, device: str | None = None) -> dict:
        """The weights entry of a module just built: the block's shared weights (nested), else a
        file of its own."""
        if job.nested:
            return self.shared_weights(job, built)
        suffix = "" if device is None else f".{device}"
        return self.writer.write_weights(f"weights/{job.segment.name}/{job.id}{suffix}.safetensors",
                                         built.param_names, built.params)

    def shared_weights(self, job: VariantJob, built) -> dict:
        """A nested variant's weights: the full-size variant's are written once per block; every
        variant lists its parameters as leading sub-tensors of them (checked here)."""
        block = job.segment.name
        if block not in self.shared:
            if job.ratio != 0:
                raise InternalError(f"nested block {block}: the full-size variant must be built first")
            entry = self.writer.write_weights(f"weights/{block}/shared.safetensors", built.param_names, built.params)
            self.shared[block] = ({k: entry[k] for k in ("file", "sha256", "bytes")},
                                  dict(zip(built.param_names, built.params)))
        file_entry, values = self.shared[block]
        for name, value in zip(built.param_names, built.params):
            if name not in values or not np.array_equal(values[name][leading(value.shape)], value):
                raise InternalError(f"nested block {block}: weight {name} of variant r{job.ratio:.2f} is not a "
                                    f"leading sub-tensor of the shared weights")
        return {"shared": file_entry, "names": list(built.param_names), "shapes": [list(v.shape) for v in built.params]}
