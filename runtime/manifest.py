"""The segments of an artifact as its manifest describes them: blocks with their variants, the
frame, the model's inputs and outputs."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Sequence

from legoc.errors import UserError
from legoc.runtime.artifact import output_names, tensor_bytes
from legoc.runtime.estimate import Profiles


@dataclass(frozen=True)
class Variant:
    index: int
    id: str
    ratio: float
    macs: int
    param_bytes: int
    entry: dict = field(repr=False)   # the variant's manifest entry


@dataclass(frozen=True)
class Segment:
    name: str
    kind: str                   # "block" or "frame"
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    variants: tuple[Variant, ...]


class ManifestView:
    """Typed, read-only view of a manifest's segments, inputs and outputs, and its profiles."""

    def __init__(self, manifest: dict):
        self.manifest = manifest
        self.segments = tuple(
            Segment(
                name=s["name"], kind=s["kind"], inputs=tuple(s["inputs"]), outputs=tuple(s["outputs"]),
                variants=tuple(
                    Variant(i, v["id"], float(v["ratio"]), int(v["macs"]), int(v["param_bytes"]), v)
                    for i, v in enumerate(s["variants"])
                ),
            )
            for s in manifest["segments"]
        )
        self.blocks = tuple(s for s in self.segments if s.kind == "block")
        self.frame = tuple(s for s in self.segments if s.kind == "frame")
        self.block_names = frozenset(b.name for b in self.blocks)
        self.input_names = [i["name"] for i in manifest["inputs"]]
        self.input_shapes = [tuple(i["shape"]) for i in manifest["inputs"]]
        self.outputs = output_names(manifest["output"])
        self.target = manifest["target"]
        self._by_name = {s.name: s for s in self.segments}

    @functools.cached_property
    def profiles(self) -> Profiles:
        """Per-variant costs and the combination estimators, made on first use."""
        return Profiles(self.manifest)

    def segment(self, name: str) -> Segment:
        return self._by_name[name]

    def tensor_bytes(self, name: str) -> int:
        """Bytes of a tensor crossing a segment boundary, or of a model input."""
        for s in self.manifest["segments"]:
            if name in (s.get("tensors") or {}):
                return tensor_bytes(s["tensors"][name])
        return tensor_bytes(next(i for i in self.manifest["inputs"] if i["name"] == name))

    def check_variants(self, variants: Sequence[int]) -> list[int]:
        """``variants`` as one valid variant index per block; UserError otherwise."""
        variants = [int(v) for v in variants]
        if len(variants) != len(self.blocks):
            raise UserError(f"configure(variants=…) needs one index per block: {len(self.blocks)} blocks, "
                            f"got {len(variants)}")
        for b, v in zip(self.blocks, variants):
            if not 0 <= v < len(b.variants):
                raise UserError(f"{b.name} has variants 0..{len(b.variants) - 1}, got {v}")
        return variants
