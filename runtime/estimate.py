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

Devices (artifacts compiled with ``--devices cpu,gpu`` for a Jetson): a configuration is a variant
*and a device* per block; the frame runs on the default device (the GPU). Each block variant has
a latency per device, and latency adds the copies between devices: a tensor crossing a segment
boundary (model inputs and outputs included; they live in host memory, i.e. on the CPU) is copied
once to the other device when at least one of its consumers runs on a device other than its
producer. Its cost is the manifest's ``devices.transfer.tensors[name].ms`` (estimated). Without
a ``devices`` section there is one device and no copy is counted.

Energy (legoc.runtime.energy states the rule): with the target's power model, a variant's energy
at a DVFS level is the board's active power at that level times its latency there, the latency
scaled by the clock (compute-bound); a configuration adds its segments, the dispatch overhead and
the copies. Measured figures (``profile.energy_mj``, RAPL or INA3221) replace the estimate at the
clock they were measured at. ``levels`` (device -> MHz) picks the clocks; None is the reference
clocks the latency figures assume, and every figure is then exactly as without DVFS.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from typing import Sequence

from legoc.errors import UserError
from legoc.runtime.energy import PowerModel, energy_figure, power_model_of

# Resident memory the runtime adds per loaded module beyond its .so file, weights and
# activations (VM object, allocator bookkeeping, relocations), with a margin: an upper bound
# (`python -m legoc.runtime.memory` measures it; benchmarks/estimators.py checks the estimate stays above).
MODULE_OVERHEAD_BYTES = 384 * 1024
# Read rate of module and weight files where switch-in times were not measured (boards).
ASSUMED_LOAD_BYTES_PER_S = 200e6
# Per-segment call overhead (Python dispatch, VM invoke) when nothing was measured.
DEFAULT_CALL_OVERHEAD_MS = 0.02


@dataclass(frozen=True)
class Estimate:
    accuracy: float | None       # metric units (top-1 in [0, 1]); None without an accuracy profile
    latency_ms: float | None     # None if some chosen variant has no latency figure
    memory_bytes: int
    sources: dict = field(default_factory=dict, compare=False)   # figure -> sources it combined
    transfer_ms: float | None = 0.0   # the CPU<->GPU copies included in latency_ms (0: one device)
    energy_mj: float | None = None    # per inference; None without a power model or measured figures
    levels: dict = field(default_factory=dict)   # device -> MHz the figures are at (empty: reference clocks)


@dataclass(frozen=True)
class Transfer:
    """A tensor crossing a segment boundary: who makes it, who reads it, what a copy costs."""

    name: str
    producer: int | None           # segment index; None: a model input (host memory: cpu)
    consumers: tuple[int | None, ...]   # segment indices; None: the model's output (host memory)
    bytes: int
    ms: float | None               # one copy between CPU and GPU; None if not estimated


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
    macs: int | None = None        # multiply-accumulates of one call (the solver's capacity tie-break)
    energy_measured: float | None = None   # mJ per call measured by a power meter (at the reference clock)
    energy_source: str | None = None       # its source: measured-local or measured-rpc

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


def device_entry(v: dict, device: str | None) -> dict:
    """A variant entry as seen on ``device``: its ``devices[device]`` module, weights and latency
    in place of the default device's (the entry itself for the default device or None)."""
    other = (v.get("devices") or {}).get(device) if device is not None else None
    if other is None:
        return v
    # load_ms and measured energy belong to the default device's module only
    profile = {k: f for k, f in (v.get("profile") or {}).items() if k not in ("load_ms", "energy_mj")}
    return {**v, "module": other["module"], "weights": other["weights"],
            "profile": {**profile, **(other.get("profile") or {})}}


def variant_cost(v: dict, device: str | None = None) -> VariantCost:
    v = device_entry(v, device)
    prof = v.get("profile", {})
    lat = prof.get("latency_ms") or {}
    acc = prof.get("accuracy_drop") or {}
    wb, shared, sb = _weight_bytes(v)
    energy = energy_figure(v)
    return VariantCost(
        id=v["id"], ratio=float(v["ratio"]),
        drop=acc.get("value"), latency_ms=lat.get("value"), latency_source=lat.get("source", "unmeasured"),
        weight_bytes=wb, module_bytes=int(v["module"]["bytes"]),
        activation_bytes=int((prof.get("peak_activation_bytes") or {}).get("value") or 0),
        shared_file=shared, shared_bytes=sb, load_ms=(prof.get("load_ms") or {}).get("value"),
        macs=None if v.get("macs") is None else int(v["macs"]),
        energy_measured=None if energy is None else float(energy["value"]),
        energy_source=None if energy is None else energy["source"],
    )


class Profiles:
    """Per-block variant costs of one artifact, and the combination estimators."""

    def __init__(self, manifest: dict, slowdown: float = 1.0):
        """``slowdown``: a factor on every latency figure, the runtime's observed latency over the
        estimate (legoc.runtime.model.Model.slowdown: 1.2 = this machine now runs 20% slower than
        when it was profiled, e.g. throttled or shared); 1: as profiled."""
        self.manifest = manifest
        self.slowdown = float(slowdown)
        segs = manifest["segments"]
        self.block_names = [s["name"] for s in segs if s["kind"] == "block"]
        self.blocks: list[list[VariantCost]] = [[variant_cost(v) for v in s["variants"]] for s in segs if s["kind"] == "block"]
        self.frame: list[VariantCost] = [variant_cost(s["variants"][0]) for s in segs if s["kind"] != "block"]
        acc = manifest.get("accuracy") or {}
        self.baseline: float | None = acc.get("baseline")
        self.metric: str | None = acc.get("metric")
        # estimates closer than half a validation sample's worth are ties; the solver breaks them
        # toward configurations that keep more MACs (solver.capacity_terms)
        samples = acc.get("samples")
        self.capacity_reward: float = 0.5 / samples if isinstance(samples, int) and samples > 0 else 1e-4
        comb = manifest.get("combination") or {}
        overhead = comb.get("call_overhead_ms") or {}
        value = overhead.get("value")
        self.call_overhead_ms = float(DEFAULT_CALL_OVERHEAD_MS if value is None else value)
        # modules timed alone vs run in sequence by the runtime (fitted at compile time; 1 if not)
        self.latency_scale = float((comb.get("latency_scale") or {}).get("value") or 1.0)
        if self.latency_scale != 1.0:
            self.blocks = [[self._scaled(v) for v in vs] for vs in self.blocks]
            self.frame = [self._scaled(v) for v in self.frame]
        if self.slowdown != 1.0:
            self.call_overhead_ms *= self.slowdown
            self.blocks = [[self._slowed(v) for v in vs] for vs in self.blocks]
            self.frame = [self._slowed(v) for v in self.frame]
        self.module_overhead_bytes = int(comb.get("module_overhead_bytes") or MODULE_OVERHEAD_BYTES)
        self.num_segments = len(segs)
        # devices: the default one first; per block, variant and device its cost
        dev = manifest.get("devices") or {}
        own = "gpu" if (manifest.get("target") or {}).get("device") == "cuda" else "cpu"
        self.default_device: str = dev.get("default", own)
        self.devices: tuple[str, ...] = tuple(dev.get("choices") or [self.default_device])
        self.device_costs: list[list[dict[str, VariantCost]]] = [
            [{self.default_device: cost,
              **{d: self._slowed(variant_cost(v, d)) for d in (v.get("devices") or {}) if d in self.devices}}
             for v, cost in zip(s["variants"], costs)]
            for s, costs in zip((s for s in segs if s["kind"] == "block"), self.blocks)]
        for name, vs in zip(self.block_names, self.device_costs):
            for v in vs:
                if set(v) != set(self.devices):
                    raise UserError(f"manifest: {name} variant {v[self.default_device].id} has modules for "
                                    f"{', '.join(sorted(v))}, not for every device ({', '.join(self.devices)}); "
                                    "compile it again")
        self.frame_device: str = dev.get("frame", self.default_device)
        self.segment_block: list[int | None] = []   # segment index -> block index (None: frame)
        for s in segs:
            self.segment_block.append(sum(b is not None for b in self.segment_block) if s["kind"] == "block" else None)
        self.transfers: list[Transfer] = _transfers(segs, manifest) if len(self.devices) > 1 else []
        if self.slowdown != 1.0:
            self.transfers = [t if t.ms is None else dataclasses.replace(t, ms=t.ms * self.slowdown) for t in self.transfers]
        self.transfer_sources: list[str] = sorted({(dev.get("transfer") or {}).get("source", "unmeasured")}) \
            if self.transfers else []
        # energy: the board's power model, and without one the mean power of measured modules
        self.power: PowerModel | None = power_model_of(manifest)
        self.mean_measured_w: float | None = _mean_measured_w(self.blocks + [self.frame])

    def _scaled(self, v: VariantCost) -> VariantCost:
        if v.latency_ms is None or v.latency_source != "measured-local":
            return v
        return dataclasses.replace(v, latency_ms=v.latency_ms * self.latency_scale)

    def _slowed(self, v: VariantCost) -> VariantCost:
        if v.latency_ms is None or self.slowdown == 1.0:
            return v
        energy = None if v.energy_measured is None else v.energy_measured * self.slowdown
        return dataclasses.replace(v, latency_ms=v.latency_ms * self.slowdown, energy_measured=energy)

    def slowed(self, slowdown: float) -> "Profiles":
        """These profiles with every latency multiplied by ``slowdown`` (this machine now vs when profiled)."""
        return self if slowdown == self.slowdown else Profiles(self.manifest, slowdown)

    # -- the estimators --------------------------------------------------------------------------
    def chosen(self, choice: Sequence[int], devices: Sequence[str] | str | None = None) -> list[VariantCost]:
        if len(choice) != len(self.blocks):
            raise ValueError(f"need one variant index per block ({len(self.blocks)}), got {len(choice)}")
        if devices is None:
            return [vs[i] for vs, i in zip(self.blocks, choice)]
        return [vs[i][d] for vs, i, d in zip(self.device_costs, choice, self.device_list(devices))]

    def device_list(self, devices: Sequence[str] | str | None) -> tuple[str, ...]:
        """One device per block: ``None`` is the default device everywhere, a string that device
        everywhere. Raises UserError for a device the artifact was not compiled for."""
        n = len(self.blocks)
        if devices is None:
            return (self.default_device,) * n
        out = (devices,) * n if isinstance(devices, str) else tuple(devices)
        if len(out) != n:
            raise UserError(f"need one device per block ({n} blocks), got {len(out)}")
        for d in out:
            if d not in self.devices:
                how = ("it was compiled for " + ", ".join(self.devices) if len(self.devices) > 1 else
                       f"it was compiled for its {self.default_device} alone (compile with --devices cpu,gpu "
                       "to choose)")
                raise UserError(f"this artifact has no modules for device '{d}': {how}")
        return out

    def segment_devices(self, devices: Sequence[str] | str | None) -> list[str]:
        """The device of every segment (the frame's is fixed) under a per-block device choice."""
        per_block = self.device_list(devices)
        return [self.frame_device if b is None else per_block[b] for b in self.segment_block]

    def transfer_ms(self, devices: Sequence[str] | str | None = None) -> float | None:
        """Milliseconds of CPU<->GPU copies under a per-block device choice (0 with one device;
        None if a copy that is needed has no estimate)."""
        if not self.transfers:
            return 0.0
        where = self.segment_devices(devices)
        total = 0.0
        for t in self.transfers:
            src = "cpu" if t.producer is None else where[t.producer]
            if any(("cpu" if c is None else where[c]) != src for c in t.consumers):
                if t.ms is None:
                    return None
                total += t.ms
        return total

    def accuracy(self, choice: Sequence[int]) -> float | None:
        vs = self.chosen(choice)
        if self.baseline is None or any(v.drop is None for v in vs):
            return None
        return self.baseline - sum(v.drop for v in vs)

    def full_block_macs(self) -> int | None:
        """MACs of every block at its largest variant (None if some variant's MACs are unknown)."""
        if any(v.macs is None for vs in self.blocks for v in vs):
            return None
        return sum(max(v.macs for v in vs) for vs in self.blocks) or None

    def capacity(self, choice: Sequence[int]) -> float | None:
        """The share of the full-size blocks' MACs that ``choice`` keeps (None if MACs are unknown)."""
        full = self.full_block_macs()
        return None if full is None else sum(v.macs for v in self.chosen(choice)) / full

    def latency_ms(self, choice: Sequence[int], devices: Sequence[str] | str | None = None,
                   levels: dict | None = None) -> float | None:
        """Estimated latency; ``levels`` (device -> MHz): at those DVFS clocks (None: as profiled)."""
        if levels is not None:
            return self._latency_at(choice, devices, self.check_levels(levels))
        vs = self.chosen(choice, devices) + self.frame
        if any(v.latency_ms is None for v in vs):
            return None
        transfer = self.transfer_ms(devices)
        if transfer is None:
            return None
        return sum(v.latency_ms for v in vs) + self.call_overhead_ms * self.num_segments + transfer

    # -- DVFS and energy ---------------------------------------------------------------------
    def check_levels(self, levels: dict | None) -> dict[str, float]:
        """``levels`` completed with the reference clock of every device of the power model;
        UserError without a power model or for a clock it does not have."""
        if self.power is None:
            raise UserError(f"target {self.target_name} has no DVFS levels (no power model); "
                            "select without levels, or add a \"power\" object to the target's JSON")
        return self.power.check_levels(levels)

    @property
    def target_name(self) -> str | None:
        return (self.manifest.get("target") or {}).get("name")

    def level_ratio(self, device: str, mhz: float | None) -> float:
        """Latency at ``mhz`` over latency as profiled, on ``device`` (compute-bound: f_ref / f)."""
        if mhz is None or self.power is None:
            return 1.0
        return self.power.devices[device].ratio(mhz)

    def overhead_ms(self) -> float:
        """The per-segment dispatch overhead of a whole configuration, as profiled."""
        return self.call_overhead_ms * self.num_segments

    def _latency_at(self, choice, devices, levels: dict[str, float]) -> float | None:
        per_block = self.device_list(devices)
        vs = self.chosen(choice, devices)
        if any(v.latency_ms is None for v in vs + self.frame):
            return None
        transfer = self.transfer_ms(devices)
        if transfer is None:
            return None
        if self.frame_device not in levels or "cpu" not in levels or any(d not in levels for d in per_block):
            raise UserError(f"target {self.target_name}'s power model has no DVFS levels for every device the "
                            f"configuration uses ({', '.join(sorted(set(per_block) | {self.frame_device}))})")
        return (sum(v.latency_ms * self.level_ratio(d, levels[d]) for v, d in zip(vs, per_block))
                + sum(v.latency_ms for v in self.frame) * self.level_ratio(self.frame_device, levels[self.frame_device])
                + self.overhead_ms() * self.level_ratio("cpu", levels["cpu"]) + transfer)

    def energy_unavailable(self) -> str | None:
        """Why this artifact has no energy figures (None: it has)."""
        if self.power is not None:
            used = set(self.devices) | {self.frame_device}
            missing = sorted(used - set(self.power.devices))
            if missing:
                return (f"target {self.target_name}'s power model has no figures for its {', '.join(missing)}; add them "
                        "to the \"power\" object of the target's JSON")
            return None
        if self.mean_measured_w is not None and all(
                v.energy_measured is not None for vs in self.blocks + [self.frame] for v in vs):
            return None
        from legoc.targets.power import POWER

        meter = (self.manifest.get("energy_meter") or {}).get("why")
        if meter and (self.manifest.get("target") or {}).get("runs_here"):
            how = f"this machine's energy can only be measured, and at compile time {meter}"
        elif self.target_name in POWER:
            how = f"it was compiled before legoc had a power model for {self.target_name}: compile it again"
        else:
            how = ("add a \"power\" object to the target's JSON (DVFS levels and watts; legoc.targets.power shows the "
                   "format) or measure every module on the board with `python -m legoc.runtime.energy ART`")
        return f"target {self.target_name} has no power model and the artifact has no measured energy figures: {how}"

    def option_energy_mj(self, cost: VariantCost, device: str, mhz: float | None = None) -> float | None:
        """mJ of one call of ``cost``'s module on ``device`` at ``mhz`` (None: the reference clock):
        measured if the manifest has a figure (scaled by the power model to other clocks), else
        estimated from the power model and the latency (legoc.runtime.energy)."""
        if self.power is None:
            return cost.energy_measured if mhz is None else None
        dev = self.power.devices.get(device)
        if dev is None:
            return None
        ratio, watts = dev.ratio(mhz), dev.level(mhz).active_w
        if cost.energy_measured is not None:
            return cost.energy_measured * watts * ratio / dev.level(None).active_w
        if cost.latency_ms is None:
            return None
        return watts * cost.latency_ms * ratio

    def overhead_energy_mj(self, cpu_mhz: float | None = None) -> float | None:
        """mJ of the dispatch overhead of a whole configuration (on the CPU, compute-bound)."""
        if self.power is None:
            return None if self.mean_measured_w is None else self.mean_measured_w * self.overhead_ms()
        dev = self.power.devices["cpu"]
        return dev.level(cpu_mhz).active_w * self.overhead_ms() * dev.ratio(cpu_mhz)

    def copy_power_w(self) -> float | None:
        """Watts a CPU<->GPU copy is charged at: the CPU's highest active power (an upper bound)."""
        return self.mean_measured_w if self.power is None else self.power.devices["cpu"].max_active_w

    def frame_energy_mj(self, mhz: float | None = None) -> float | None:
        """mJ of the frame segments (on the frame's device at ``mhz``)."""
        total = 0.0
        for v in self.frame:
            e = self.option_energy_mj(v, self.frame_device, mhz)
            if e is None:
                return None
            total += e
        return total

    def energy_mj(self, choice: Sequence[int], devices: Sequence[str] | str | None = None,
                  levels: dict | None = None) -> float | None:
        """Estimated (or measured) energy of one inference of a configuration at ``levels``
        (None: the reference clocks); None if a figure is missing."""
        if self.energy_unavailable() is not None:
            return None
        lv = {} if levels is None else self.check_levels(levels)
        total = 0.0
        for cost, d in zip(self.chosen(choice, devices), self.device_list(devices)):
            e = self.option_energy_mj(cost, d, lv.get(d))
            if e is None:
                return None
            total += e
        frame, overhead = self.frame_energy_mj(lv.get(self.frame_device)), self.overhead_energy_mj(lv.get("cpu"))
        transfer = self.transfer_ms(devices)
        if frame is None or overhead is None or transfer is None:
            return None
        return total + frame + overhead + transfer * (self.copy_power_w() if transfer else 0.0)

    def energy_sources(self, choice: Sequence[int], devices: Sequence[str] | str | None = None,
                       levels: dict | None = None) -> list[str]:
        """Where a configuration's energy figure comes from: measured-* for measured modules at
        the clock they were measured at, estimated for everything else."""
        lv = {} if levels is None else self.check_levels(levels)
        out = set()
        for cost, d in list(zip(self.chosen(choice, devices), self.device_list(devices))) + \
                [(f, self.frame_device) for f in self.frame]:
            at_reference = lv.get(d) is None or math.isclose(lv[d], self.power.devices[d].reference_mhz) \
                if self.power is not None and d in self.power.devices else True
            out.add(cost.energy_source if cost.energy_source and at_reference else "estimated")
        if self.power is not None or self.overhead_ms() or self.transfers:
            out.add("estimated")    # dispatch overhead and copies
        return sorted(out)

    def switch_energy_mj(self, cost: VariantCost) -> float | None:
        """mJ to load ``cost``'s module and weights: bytes x the board's switching cost per byte
        (without a power model: the measured load time at the measured modules' mean power)."""
        if self.power is not None:
            return cost.load_bytes * self.power.switch_nj_per_byte / 1e6
        if self.mean_measured_w is None:
            return None
        ms = cost.load_ms if cost.load_ms is not None else cost.load_bytes / ASSUMED_LOAD_BYTES_PER_S * 1e3
        return self.mean_measured_w * ms

    def memory_bytes(self, choice: Sequence[int], devices: Sequence[str] | str | None = None) -> int:
        return self.memory_of(list(self.chosen(choice, devices)) + self.frame)

    def min_latency_ms(self, limit: int = 4096) -> float | None:
        """The smallest latency any configuration reaches (exact: with devices, every device
        assignment up to ``limit`` of them, each block on its fastest variant there; beyond that,
        the default device's). None if a figure is missing."""
        if any(c.latency_ms is None for vs in self.device_costs for v in vs for c in v.values()):
            return None
        assignments = [None]
        if len(self.devices) > 1 and len(self.devices) ** len(self.blocks) <= limit:
            assignments = list(itertools.product(self.devices, repeat=len(self.blocks)))
        best = None
        for devs in assignments:
            per_block = self.device_list(devs)
            choice = [min(range(len(vs)), key=lambda i, d=d, vs=vs: vs[i][d].latency_ms)
                      for vs, d in zip(self.device_costs, per_block)]
            lat = self.latency_ms(choice, devs)
            if lat is not None and (best is None or lat < best):
                best = lat
        return best

    def min_energy_mj(self, dvfs: bool = False, limit: int = 4096) -> float | None:
        """The least energy any configuration reaches (at the reference clocks, or with ``dvfs``
        at any levels), exact like :meth:`min_latency_ms`; None without energy figures."""
        if self.energy_unavailable() is not None:
            return None
        level_sets = self.power.level_choices() if dvfs and self.power is not None else [None]
        assignments = [None]
        if len(self.devices) > 1 and len(self.devices) ** len(self.blocks) <= limit:
            assignments = list(itertools.product(self.devices, repeat=len(self.blocks)))
        best = None
        for levels in level_sets:
            for devs in assignments:
                per_block = self.device_list(devs)
                choice = []
                for vs, d in zip(self.device_costs, per_block):
                    figures = [self.option_energy_mj(v[d], d, None if levels is None else levels[d]) for v in vs]
                    if any(f is None for f in figures):
                        return None
                    choice.append(min(range(len(vs)), key=figures.__getitem__))
                e = self.energy_mj(choice, devs, levels)
                if e is not None and (best is None or e < best):
                    best = e
        return best

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

    def estimate(self, choice: Sequence[int], devices: Sequence[str] | str | None = None,
                 levels: dict | None = None) -> Estimate:
        """Every estimate of a configuration; ``levels`` (device -> MHz): at those DVFS clocks
        (None: as profiled, at the reference clocks)."""
        vs = self.chosen(choice, devices)
        sources = {"latency": sorted({v.latency_source for v in vs + self.frame}),
                   "accuracy": self.metric, "memory": "static (file sizes, weights, activations) + module overhead"}
        if self.transfers:
            sources["transfer"] = self.transfer_sources
        energy = self.energy_mj(choice, devices, levels)
        if energy is not None:
            sources["energy"] = self.energy_sources(choice, devices, levels)
        return Estimate(
            accuracy=self.accuracy(choice), latency_ms=self.latency_ms(choice, devices, levels),
            memory_bytes=self.memory_bytes(choice, devices), sources=sources, transfer_ms=self.transfer_ms(devices),
            energy_mj=energy, levels={} if levels is None else self.check_levels(levels),
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

    def all_device_choices(self):
        """Every per-block device assignment (one tuple with the default device if there is one)."""
        return itertools.product(self.devices, repeat=len(self.blocks))


def _mean_measured_w(groups: list[list[VariantCost]]) -> float | None:
    """Mean power (W) of the modules with both a measured energy and a latency figure (None if
    there are none): what the runtime charges its own overhead at without a power model."""
    mj = ms = 0.0
    for vs in groups:
        for v in vs:
            if v.energy_measured is not None and v.latency_ms:
                mj, ms = mj + v.energy_measured, ms + v.latency_ms
    return mj / ms if ms > 0 else None


def _transfers(segs: list[dict], manifest: dict) -> list[Transfer]:
    """The boundary tensors of a ``--devices`` manifest with producers and consumers as segment
    indices (None: host memory) and the copy cost recorded at compile time."""
    table = ((manifest.get("devices") or {}).get("transfer") or {}).get("tensors") or {}
    index = {s["name"]: k for k, s in enumerate(segs)}
    index.update({"input": None, "output": None})
    out = []
    for name, t in table.items():
        try:
            producer, consumers = index[t["from"]], tuple(index[c] for c in t["to"])
        except KeyError as exc:
            raise UserError(f"manifest: boundary tensor {name} names an unknown segment {exc}; compile it again") from exc
        ms = t.get("ms")
        out.append(Transfer(name, producer, consumers, int(t["bytes"]), None if ms is None else float(ms)))
    return out


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
