"""A loaded artifact: blocks with variants, the frame, and the chosen configuration.

``m = load("model.lego"); m.configure(variants=[0, 2, 4, 1]); y = m(x)``. Only the modules a
configuration needs are loaded (each checked against its sha256 first) and they stay cached, so
switching a configuration loads only the blocks that change.

An artifact compiled with ``--devices cpu,gpu`` (Jetson) also takes a device per block:
``m.configure(variants=[0, 2, 4, 1], devices=["gpu", "cpu", "cpu", "gpu"])``. A configuration
becomes a :meth:`Model.plan`: the segments in order, each with its module and device, and a
:class:`Copy` wherever a tensor must move between CPU and GPU (model inputs start in host memory,
outputs end there). GPU modules run on ``tvm.cuda()``, CPU modules on ``tvm.cpu()``.

:class:`Model` is the facade over the parts that do the work: the manifest view
(legoc.runtime.manifest), the module cache (legoc.runtime.cache), the plan and its executor
(legoc.runtime.plan, legoc.runtime.executor) and selection (legoc.runtime.selection).
"""
from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from legoc.errors import UserError
from legoc.runtime import selection
from legoc.runtime.artifact import read_manifest
from legoc.runtime.cache import ModuleCache
from legoc.runtime.devices import Devices
from legoc.runtime.estimate import Profiles
from legoc.runtime.executor import Executor
from legoc.runtime.manifest import ManifestView, Segment, Variant
from legoc.runtime.modules import WeightFiles
from legoc.runtime.plan import Copy, Run, plan
from legoc.runtime.threads import set_num_threads

__all__ = ["Copy", "Model", "Run", "Segment", "Variant", "load", "median_latency_ms", "set_num_threads"]

class Model:
    """A runtime-scalable model loaded from an artifact."""

    def __init__(self, path: str | Path, public_key: str | Path | bytes | None = None):
        self.path = Path(path)
        self.manifest = read_manifest(self.path, public_key)
        self._view = ManifestView(self.manifest)
        self.segments, self.blocks, self.frame = self._view.segments, self._view.blocks, self._view.frame
        self.input_names, self.input_shapes = self._view.input_names, self._view.input_shapes
        self.target = self._view.target
        self._tvm_devices = Devices(self.path, self._view)
        self._modules = ModuleCache(self.path, self._view, self._tvm_devices)
        self._executor = Executor(self._view, self._tvm_devices)
        self._config_lock = threading.RLock()   # one reconfiguration at a time
        self.last_switch_loaded = 0
        self.last_selection = None
        self.adapt_to_speed = False   # budget selection scales the latency profile by slowdown()
        self.sysfs_root = "/"         # where set_clocks writes (tests: a fake tree)

    @property
    def profiles(self) -> Profiles:
        """Per-variant costs and the combination estimators (legoc.runtime.estimate.Profiles)."""
        return self._view.profiles

    # -- the configuration in use ------------------------------------------------------------
    @property
    def choice(self) -> tuple[int, ...]:
        """The variant of every block in the configuration (empty before the first)."""
        return self._executor.choice

    @property
    def devices(self) -> tuple[str, ...]:
        """The device of every block in the configuration."""
        return self._executor.block_devices

    @property
    def steps(self) -> tuple[Run | Copy, ...]:
        """The configuration's plan."""
        return self._executor.steps

    # -- the module cache --------------------------------------------------------------------
    @property
    def cache_limit_bytes(self) -> int | None:
        """The module cache's memory limit (set by ``configure(memory_mb=…)``; None: no limit)."""
        return self._modules.limit_bytes

    @cache_limit_bytes.setter
    def cache_limit_bytes(self, value: int | None) -> None:
        self._modules.limit_bytes = value

    @property
    def modules_loaded(self) -> int:
        """Modules loaded so far (a module evicted and loaded again counts twice)."""
        return self._modules.loaded

    @property
    def modules_evicted(self) -> int:
        """Modules dropped from the cache so far to stay within its memory limit."""
        return self._modules.evicted

    @property
    def held_bytes(self) -> int:
        """Estimated resident bytes of every module the cache holds (configuration included)."""
        return self._modules.held_bytes()

    @property
    def loaded(self) -> list[tuple[str, str]]:
        """(segment, variant id) of every cached module; ``id@device`` for a non-default device."""
        default = self.profiles.default_device
        return [(name, self._view.segment(name).variants[i].id + ("" if d == default else f"@{d}"))
                for name, i, d in self._modules.held()]

    @property
    def _cache(self):
        """The cached executables by key, least recently used first (for tests)."""
        return self._modules.entries

    @property
    def _weights(self) -> WeightFiles:
        """The weight files read so far (for tests)."""
        return self._modules.weights

    @property
    def _call_ms(self):
        """The wall times (ms) of the latest calls in the configuration (for tests)."""
        return self._executor.call_ms

    def segment(self, name: str) -> Segment:
        """The segment called ``name``."""
        return self._view.segment(name)

    # -- speed and selection -----------------------------------------------------------------
    def slowdown(self) -> float | None:
        """How much slower this machine runs the model now than its profile says: the median wall
        time of the latest calls in the current configuration (at least SLOWDOWN_MIN_CALLS of
        them, up to SLOWDOWN_WINDOW; see legoc.runtime.executor) over its latency estimate; None
        before enough calls or without a latency profile. A board that throttles, or another app
        on the cores, shows here as a slowdown above 1; with ``adapt_to_speed`` budget selection
        accounts for it."""
        return self._executor.slowdown()

    def problem(self, budget=None, name: str | None = None, weight: float = 1.0):
        """This model as one item of a selection (see legoc.runtime.solver); with
        ``adapt_to_speed``, its latencies scaled by the observed :meth:`slowdown`."""
        return selection.problem(
            self.profiles, budget, name=name or self.path.name, weight=weight,
            block_names=[b.name for b in self.blocks], held=self._modules.held(), choice=self.choice,
            devices=self.devices, slowdown=self.slowdown() if self.adapt_to_speed else None)

    def select(self, latency_ms: float | None = None, memory_mb: float | None = None,
               min_accuracy: float | None = None, *, block_latency_ms: dict | None = None,
               allowed: dict | None = None, switch_penalty: float | None = None,
               time_limit_s: float | None = None, best_effort: bool = False, energy_mj: float | None = None,
               objective: str = "accuracy", dvfs: bool = False):
        """The optimal configuration for a budget (CP-SAT), without switching to it.
        ``best_effort``: if no configuration meets ``latency_ms``, the one that exceeds it least
        (``within_budget`` False on the selection) instead of an error. ``energy_mj``: energy per
        inference (legoc.runtime.energy); ``objective``: "accuracy" (the most accurate within the
        budgets) or "energy" (the least energy within latency, memory and ``min_accuracy``);
        ``dvfs``: choose the board's clock per device too (``Selection.levels``)."""
        return selection.select(self.problem, latency_ms, memory_mb, min_accuracy, block_latency_ms=block_latency_ms,
                                allowed=allowed, switch_penalty=switch_penalty, time_limit_s=time_limit_s,
                                best_effort=best_effort, energy_mj=energy_mj, objective=objective, dvfs=dvfs)

    def set_clocks(self, levels: dict | None = None, *, dry_run: bool = False):
        """Set the board's DVFS levels (device -> MHz; default: those of the last configure() by
        budget) through cpufreq and devfreq under ``sysfs_root`` (legoc.runtime.dvfs); returns
        what took effect.
        ``dry_run``: write nothing (legoc.runtime.dvfs.commands prints what would be written)."""
        from legoc.runtime import dvfs

        levels = levels if levels is not None else (self.last_selection.levels if self.last_selection else {})
        power = self.profiles.power
        if power is None:
            raise UserError(f"{self.path}: target {self.target.get('name')} has no DVFS levels (no power model)")
        return dvfs.apply(power, levels, self.sysfs_root, dry_run=dry_run)

    # -- configuration -----------------------------------------------------------------------
    def plan(self, variants: Sequence[int] | None = None,
             devices: Sequence[str] | str | None = None) -> tuple[Run | Copy, ...]:
        """The steps of a configuration, without loading anything: every segment's module and
        device in order, and a Copy before the first step that needs a tensor on the other device
        (model inputs start on the CPU, in host memory; outputs are copied back to it). A tensor
        is copied at most once per device, so the copies are exactly those the latency estimate
        counts (legoc.runtime.estimate)."""
        return plan(self._view, variants, devices)

    def configure(self, variants: Sequence[int] | None = None, *, devices: Sequence[str] | str | None = None,
                  latency_ms: float | None = None, memory_mb: float | None = None,
                  min_accuracy: float | None = None, **options) -> "Model":
        """Switch to a configuration: explicit ``variants`` (one index per block; default all full
        size) and ``devices`` (one per block, or one for all; default the target's own device;
        artifacts compiled with ``--devices``), or the most accurate one within a budget
        (``latency_ms``, ``memory_mb`` in MiB, ``min_accuracy``; see ``select`` for the other
        options), whose devices the solver chooses too; with ``dvfs=True`` it chooses the board's
        clocks as well and sets them (:meth:`set_clocks`) before switching. Loads only modules not already loaded;
        with a memory budget, least recently used modules beyond it are dropped. The switch is
        atomic for concurrent callers: every inference runs wholly on the old or the new one."""
        with self._config_lock:
            if selection.by_budget(variants, devices, latency_ms, memory_mb, min_accuracy, options):
                self.last_selection = self.select(latency_ms, memory_mb, min_accuracy, **options)
                variants, devices = self.last_selection.choice, self.last_selection.devices
                if self.last_selection.levels:
                    self.set_clocks(self.last_selection.levels)
            if memory_mb is not None:
                self._modules.limit_bytes = int(memory_mb * (1 << 20))
            steps = self.plan(variants, devices)
            before = self._modules.loaded
            self._executor.switch(steps, self._executor.compile(steps, self._modules))
            self.last_switch_loaded = self._modules.loaded - before
            self._modules.evict(self._keys(steps))
        return self

    def preload(self, variants: Sequence[int], devices: Sequence[str] | str | None = None) -> "Model":
        """Load the modules of a configuration into the cache without switching to it."""
        with self._config_lock:
            steps = self.plan(variants, devices)
            for s in steps:
                if isinstance(s, Run):
                    self._modules.get(s.segment, s.variant, s.device)
            self._modules.evict(self._keys(self.steps) | self._keys(steps))
        return self

    def _keys(self, steps: Sequence[Run | Copy]) -> set:
        """The cache keys of the modules ``steps`` run."""
        return {self._modules.key(s.segment, s.variant, s.device) for s in steps if isinstance(s, Run)}

    # -- inference -----------------------------------------------------------------------------
    def __call__(self, *inputs: np.ndarray) -> Any:
        if self._executor.compiled is None:
            self.configure()
        return self._executor(inputs)


def median_latency_ms(model, inputs: Sequence[np.ndarray], warmup: int = 3, calls: int = 20, *,
                      all_times: bool = False) -> float | list[float]:
    """Median wall time in ms of ``model(*inputs)`` in its current configuration, after ``warmup``
    untimed calls (``all_times``: the list of every call's time instead)."""
    for _ in range(warmup):
        model(*inputs)
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        model(*inputs)
        times.append((time.perf_counter() - t0) * 1e3)
    return times if all_times else statistics.median(times)


def load(path: str | Path, *, num_threads: int | None = None, adapt_to_speed: bool = False,
         public_key: str | Path | bytes | None = None) -> Model:
    """Open an artifact (the manifest is read and validated; modules load on configure/first call).

    ``num_threads``: threads of TVM's CPU thread pool (see :func:`set_num_threads`); default:
    ``TVM_NUM_THREADS``, else one per core. ``adapt_to_speed``: budget selection scales the
    latency profile by the slowdown observed in the latest calls (:meth:`Model.slowdown`).
    ``public_key``: an Ed25519 public key (PEM file or bytes); the artifact must carry a signature
    of its manifest by the matching private key (legoc.runtime.signing), checked before anything
    else is read."""
    if num_threads is not None:
        set_num_threads(num_threads)
    model = Model(path, public_key)
    model.adapt_to_speed = bool(adapt_to_speed)
    return model
