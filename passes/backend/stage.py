"""What the back-end stages share: their base class, the record of one module to build
(:class:`VariantJob`) and of one module built (:class:`BuiltVariant`), and where a built module's
entry sits in the manifest."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

from legoc.errors import InternalError
from legoc.passes.infra import Pass, PassResult, ProgramState


@contextlib.contextmanager
def single_threaded_torch():
    """PyTorch on one thread: after a parallel region torch's OpenMP workers keep spinning on the
    cores that TVM's thread pool builds and times modules on, which slows every timing."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class BackendStage(Pass):
    """A pass of the back end: it runs with PyTorch on one thread (:func:`single_threaded_torch`)
    and, unless it says otherwise, completes the manifest the build stage wrote."""

    def requires(self, state: ProgramState) -> None:
        if state.manifest is None or state.artifact is None:
            raise InternalError(f"{self.name} needs the built modules and their artifact (run build first)")

    def __call__(self, state: ProgramState, config: Any) -> PassResult:
        with single_threaded_torch():
            return super().__call__(state, config)


@dataclass(frozen=True)
class VariantJob:
    """One module of the artifact: a variant of a block, or a frame segment (id ``frame``)."""

    segment: Any          # legoc.passes.segment.Segment
    index: int            # position among the segment's variants (the manifest's order)
    id: str               # "r0.20", or "frame"
    ratio: float
    module: Any           # the torch module to compile (eval mode)
    inputs: tuple         # the segment's inputs on the model's example inputs (tensors)
    macs: int
    param_bytes: int
    channels: dict        # channel group -> (original, computed, kept)
    nested: bool          # weights are leading sub-tensors of the block's full-size variant
    importance: dict = field(default_factory=dict)   # channel group -> criterion that ranked it

    @property
    def label(self) -> str:
        return f"{self.segment.name}/{self.id}"


def variant_jobs(state: ProgramState) -> list[VariantJob]:
    """Every module of the artifact, segment by segment in execution order."""
    from legoc.passes.analysis import param_bytes

    part = state.partition
    env = part.trace_env(*state.example_inputs)
    jobs = []
    for seg in part.segments:
        inputs = tuple(env[n] for n in seg.inputs)
        if seg.is_block:
            jobs += [VariantJob(seg, i, v.id, v.ratio, v.gm, inputs, v.macs, v.param_bytes, v.channels, v.nested,
                                v.importance)
                     for i, v in enumerate(state.variants[seg.name])]
        else:
            jobs.append(VariantJob(seg, 0, "frame", 0.0, seg.gm, inputs, seg.macs, param_bytes(seg.gm), {}, False))
    return jobs


@dataclass(frozen=True)
class BuiltVariant:
    """A module compiled into the artifact, for the target's own device (``device`` None) or, with
    ``--devices``, for another device of the board."""

    job: VariantJob
    device: str | None
    target: Any           # legoc.targets.table.TargetSpec it was compiled for
    build: dict           # legoc.targets.build.build_signature: how it was compiled


def manifest_entry(manifest: dict, built: BuiltVariant) -> dict:
    """The manifest entry of ``built``: its variant's, or the variant's ``devices[device]``."""
    segment = next(s for s in manifest["segments"] if s["name"] == built.job.segment.name)
    entry = segment["variants"][built.job.index]
    return entry if built.device is None else entry["devices"][built.device]
