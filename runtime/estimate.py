"""What a combination of variants will do: estimated accuracy, latency and memory.

Torch-free (runs on the device, feeds the solver). Everything is read from the manifest, where
each per-variant figure carries its source (``measured-local``, ``measured-rpc``, ``estimated``,
``static``, or ``unmeasured``). The estimators:

* accuracy = baseline - sum of the chosen variants' drops (each drop: the mean over the contexts
  it was measured in). Additive; its error is measured by ``benchmarks/estimators.py``.
* latency = sum of the chosen variants' latencies + the frame's + a per-segment call overhead
  (measured at compile time when the target runs here, else the target's estimate).
* memory = weights + module code + activations of every module the configuration holds, plus a
  per-module overhead: an upper bound of the resident memory the runtime adds (nested blocks
  hold their shared weight file once). The estimate is meant never to be below the measured peak.
* switching = bytes of modules and weights that must be loaded to go from one configuration to
  another, and the sum of their measured switch-in times (blocks whose variant is unchanged cost
  nothing).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Sequence

# Resident memory the runtime adds per loaded module beyond its .so file, weights and
# activations (VM object, allocator bookkeeping, relocations). Measured with
# `python -m legoc.runtime.memory` on the 4-block MNIST host artifact (x86-64): about 280 KiB per
# module; 384 KiB leaves a margin (benchmarks/estimators.py checks the estimate stays above).
MODULE_OVERHEAD_BYTES = 384 * 1024
# Per-segment call overhead (Python dispatch, VM invoke) when nothing was measured.
DEFAULT_CALL_OVERHEAD_MS = 0.02


@dataclass(frozen=True)
class Estimate:
    accuracy: float | None       # metric units (top-1 in [0, 1]); None without an accuracy profile
    latency_ms: float | None     # None if some chosen variant has no latency figure
    memory_bytes: int
    sources: dict = field(default_factory=dict, compare=False)   # figure -> sources it combined


@dataclass(frozen=True)
class VariantCost:
    id: str
    ratio: float
    drop: float | None
    latency_ms: float | None
    latency_source: str
    weight_bytes: int
    module_bytes: int
    activation_bytes: int
    shared_file: str | None      # nested: the block's shared weight file, held once
    shared_bytes: int
    load_ms: float | None = None   # measured time to load module + weights, if measured

    @property
    def load_bytes(self) -> int:
        """Bytes read to load this variant (module + its own weights; shared files are read once)."""
        return self.module_bytes + (0 if self.shared_file else self.weight_bytes)


def _weight_bytes(v: dict) -> tuple[int, str | None, int]:
    w = v["weights"]
    if "shared" in w:
        n = sum(4 * _prod(s) for s in w["shapes"])
        return n, w["shared"]["file"], int(w["shared"]["bytes"])
    return int(w["bytes"]), None, 0


def _prod(shape) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


def variant_cost(v: dict) -> VariantCost:
    prof = v.get("profile", {})
    lat = prof.get("latency_ms") or {}
    acc = prof.get("accuracy_drop") or {}
    wb, shared, sb = _weight_bytes(v)
    return VariantCost(
        id=v["id"], ratio=float(v["ratio"]),
        drop=acc.get("value"), latency_ms=lat.get("value"), latency_source=lat.get("source", "unmeasured"),
        weight_bytes=wb, module_bytes=int(v["module"]["bytes"]),
        activation_bytes=int((prof.get("peak_activation_bytes") or {}).get("value") or 0),
        shared_file=shared, shared_bytes=sb, load_ms=(prof.get("load_ms") or {}).get("value"),
    )


class Profiles:
    """Per-block variant costs of one artifact, and the combination estimators."""

    def __init__(self, manifest: dict):
        self.manifest = manifest
        segs = manifest["segments"]
        self.block_names = [s["name"] for s in segs if s["kind"] == "block"]
        self.blocks: list[list[VariantCost]] = [[variant_cost(v) for v in s["variants"]] for s in segs if s["kind"] == "block"]
        self.frame: list[VariantCost] = [variant_cost(s["variants"][0]) for s in segs if s["kind"] != "block"]
        acc = manifest.get("accuracy") or {}
        self.baseline: float | None = acc.get("baseline")
        self.metric: str | None = acc.get("metric")
        comb = manifest.get("combination") or {}
        overhead = comb.get("call_overhead_ms") or {}
        value = overhead.get("value")
        self.call_overhead_ms = float(DEFAULT_CALL_OVERHEAD_MS if value is None else value)
        self.module_overhead_bytes = int(comb.get("module_overhead_bytes") or MODULE_OVERHEAD_BYTES)
        self.num_segments = len(segs)

    # -- the estimators --------------------------------------------------------------------------
    def chosen(self, choice: Sequence[int]) -> list[VariantCost]:
        if len(choice) != len(self.blocks):
            raise ValueError(f"need one variant index per block ({len(self.blocks)}), got {len(choice)}")
        return [vs[i] for vs, i in zip(self.blocks, choice)]

    def accuracy(self, choice: Sequence[int]) -> float | None:
        vs = self.chosen(choice)
        if self.baseline is None or any(v.drop is None for v in vs):
            return None
        return self.baseline - sum(v.drop for v in vs)

    def latency_ms(self, choice: Sequence[int]) -> float | None:
        vs = self.chosen(choice) + self.frame
        if any(v.latency_ms is None for v in vs):
            return None
        return sum(v.latency_ms for v in vs) + self.call_overhead_ms * self.num_segments

    def memory_bytes(self, choice: Sequence[int]) -> int:
        return self.memory_of(list(self.chosen(choice)) + self.frame)

    def memory_of(self, held: Sequence[VariantCost]) -> int:
        """Resident bytes of holding these loaded variants (e.g. a configuration plus a cache)."""
        total, shared = 0, {}
        for v in held:
            total += v.module_bytes + v.weight_bytes + v.activation_bytes + self.module_overhead_bytes
            if v.shared_file:
                shared[v.shared_file] = v.shared_bytes
        return total + sum(shared.values())

    def switch_bytes(self, old: Sequence[int] | None, new: Sequence[int]) -> int:
        """Bytes to load when going from configuration ``old`` to ``new`` (None: nothing loaded)."""
        total = 0
        for b, vs in enumerate(self.blocks):
            if old is None or old[b] != new[b]:
                total += vs[new[b]].load_bytes
        return total

    def switch_ms(self, old: Sequence[int] | None, new: Sequence[int]) -> float | None:
        """Time to switch from ``old`` to ``new`` when the changed modules are not cached: the sum
        of their measured switch-in times (None if some was not measured)."""
        total = 0.0
        for b, vs in enumerate(self.blocks):
            if old is None or old[b] != new[b]:
                if vs[new[b]].load_ms is None:
                    return None
                total += vs[new[b]].load_ms
        return total

    def estimate(self, choice: Sequence[int]) -> Estimate:
        vs = self.chosen(choice)
        return Estimate(
            accuracy=self.accuracy(choice), latency_ms=self.latency_ms(choice), memory_bytes=self.memory_bytes(choice),
            sources={"latency": sorted({v.latency_source for v in vs + self.frame}),
                     "accuracy": self.metric, "memory": "static (file sizes, weights, activations) + module overhead"},
        )

    # -- all combinations ------------------------------------------------------------------------
    def combinations(self) -> int:
        n = 1
        for vs in self.blocks:
            n *= len(vs)
        return n

    def pareto_front(self, limit: int = 200_000) -> list[tuple[tuple[int, ...], Estimate]]:
        """Configurations not beaten in both estimated accuracy and latency (ascending latency).

        Exhaustive up to ``limit`` combinations; beyond that a DP over blocks keeps, per block
        prefix, only the Pareto-optimal (latency, accuracy) partial sums, which is exact for
        additive estimators."""
        if self.baseline is None or any(v.latency_ms is None or v.drop is None for vs in self.blocks for v in vs):
            return []
        if any(v.latency_ms is None for v in self.frame):
            return []
        partial: list[tuple[float, float, tuple[int, ...]]] = [(0.0, 0.0, ())]
        for vs in self.blocks:
            grown = [(lat + v.latency_ms, drop + v.drop, prefix + (i,))
                     for lat, drop, prefix in partial for i, v in enumerate(vs)]
            partial = _front(grown, keep_ties=True) if self.combinations() > limit else grown
        front = _front(partial)
        return [(c, self.estimate(c)) for _, _, c in front]

    def all_choices(self):
        return itertools.product(*[range(len(vs)) for vs in self.blocks])


def _front(points: list[tuple[float, float, tuple[int, ...]]],
           keep_ties: bool = False) -> list[tuple[float, float, tuple[int, ...]]]:
    """Points (latency, drop, choice) not dominated: sorted by latency, strictly decreasing drop;
    of tied points the first choice in (latency, drop, choice) order. ``keep_ties`` also keeps
    points tied with a kept one (same latency, drop within 1e-12): the DP over block prefixes
    must, or it could keep another representative of a tie than the exhaustive search."""
    out, best, best_lat = [], float("inf"), None
    for p in sorted(points):
        if p[1] < best - 1e-12:
            out.append(p)
            best, best_lat = p[1], p[0]
        elif keep_ties and p[0] == best_lat and p[1] <= best + 1e-12:
            out.append(p)
    return out
