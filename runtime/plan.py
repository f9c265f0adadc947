"""A configuration as the steps that run it: each segment's module on its device, and a copy
wherever a tensor must move between CPU and GPU."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from legoc.runtime.manifest import ManifestView
from legoc.runtime.modules import module_entry


@dataclass(frozen=True)
class Run:
    """A plan step: run one segment's module on a device."""

    segment: str
    variant: int
    device: str                 # "cpu" or "gpu"
    module: str                 # the module file in the artifact
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class Copy:
    """A plan step: copy a tensor between CPU and GPU (the runtime's ``Tensor.copyto``)."""

    tensor: str
    src: str
    dst: str
    bytes: int


def plan(view: ManifestView, variants: Sequence[int] | None = None,
         devices: Sequence[str] | str | None = None) -> tuple[Run | Copy, ...]:
    """The steps of a configuration (see :meth:`legoc.runtime.model.Model.plan`)."""
    profiles = view.profiles
    variants = view.check_variants([0] * len(view.blocks) if variants is None else variants)
    per_block = dict(zip((b.name for b in view.blocks), profiles.device_list(devices)))
    choice = dict(zip((b.name for b in view.blocks), variants))
    frame = profiles.frame_device
    home = {name: "cpu" for name in view.input_names}   # the device a tensor is made on
    where = {name: {"cpu"} for name in view.input_names}   # ... and every device it is on
    steps: list[Run | Copy] = []

    def need(name: str, device: str) -> None:
        if device not in where[name]:
            steps.append(Copy(name, home[name], device, view.tensor_bytes(name)))
            where[name].add(device)

    for seg in view.segments:
        device = per_block.get(seg.name, frame)
        for name in seg.inputs:
            need(name, device)
        index = choice.get(seg.name, 0)
        module = module_entry(seg.variants[index], device)["module"]["file"]
        steps.append(Run(seg.name, index, device, module, seg.inputs, seg.outputs))
        for name in seg.outputs:
            home[name], where[name] = device, {device}
    for name in view.outputs:
        need(name, "cpu")
    return tuple(steps)
