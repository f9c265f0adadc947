"""A loaded artifact: blocks with variants, the frame, and the chosen configuration.

``m = load("model.lego"); m.configure(variants=[0, 2, 4, 1]); y = m(x)``. Only the modules a
configuration needs are loaded (each checked against its sha256 first) and they stay cached, so
switching a configuration loads only the blocks that change.

An artifact compiled with ``--devices cpu,gpu`` (Jetson) also takes a device per block:
``m.configure(variants=[0, 2, 4, 1], devices=["gpu", "cpu", "cpu", "gpu"])``. A configuration
becomes a :meth:`Model.plan`: the segments in order, each with its module and device, and a
:class:`Copy` wherever a tensor must move between CPU and GPU (model inputs start in host memory,
outputs end there). GPU modules run on ``tvm.cuda()``, CPU modules on ``tvm.cpu()``.
"""
from __future__ import annotations

import platform
import statistics
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from legoc.errors import UserError
from legoc.runtime.artifact import build_output, output_names, read_manifest, tensor_bytes, verified_path
from legoc.runtime.estimate import device_entry, variant_cost

_MACHINE_ARCH = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}


@dataclass(frozen=True)
class Variant:
    index: int
    id: str
    ratio: float
    macs: int
    param_bytes: int
    entry: dict = field(repr=False)


@dataclass(frozen=True)
class Segment:
    name: str
    kind: str                   # "block" or "frame"
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    variants: tuple[Variant, ...]


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


def _module_entry(var: Variant, device: str | None) -> dict:
    """The variant's entry on ``device`` (its ``devices[device]`` module and weights; the entry
    itself for the default device)."""
    return device_entry(var.entry, device)


class _Executable:
    """One compiled module with its weights, ready to run."""

    def __init__(self, root: Path, seg: Segment, var: Variant, device, weight_files: "_WeightFiles",
                 device_name: str | None = None):
        import tvm  # the TVM runtime; with TVM_USE_RUNTIME_LIB=1 only the runtime library loads
        import tvm.runtime.vm  # not imported by `import tvm` in runtime-only mode (a board)

        entry = _module_entry(var, device_name)
        what = f"{seg.name} variant {var.id}" + (f" ({device_name})" if entry is not var.entry else "")
        so = verified_path(root, entry["module"], what)
        w = entry["weights"]
        if "shared" in w:  # nested: leading sub-tensors of the block's shared weights
            values = weight_files.get(w["shared"], f"{seg.name} shared weights", keep=True)
            arrays = [values[n][tuple(slice(0, s) for s in shape)] for n, shape in zip(w["names"], w["shapes"])]
        else:
            values = weight_files.get(w, what + " weights")
            arrays = [values[n] for n in w["names"]]
        self.params = [tvm.runtime.tensor(np.ascontiguousarray(a), device) for a in arrays]
        self.lib = tvm.runtime.load_module(str(so))
        self.vm = tvm.runtime.vm.VirtualMachine(self.lib, device)
        self.main = self.vm["main"]  # looked up once: a lookup per call costs ~3.5 us per block

    def __call__(self, *inputs):
        out = self.main(*inputs, *self.params)
        if hasattr(out, "numpy"):
            return (out,)
        return tuple(out)


class _Copier:
    """A Copy step, called like an executable: one tensor in, the copy on ``device`` out."""

    def __init__(self, device):
        self.device = device

    def __call__(self, tensor):
        return (tensor.copyto(self.device),)


class _WeightFiles:
    """Weight files, each checked against its sha256 before it is read. A nested block's shared
    file is kept after the first read (every variant of the block slices it, so switching between
    them reads nothing from disk); a variant's own file is read, copied into TVM tensors and
    dropped, so its weights are not held twice."""

    def __init__(self, root: Path):
        self.root, self.values, self.reads = root, {}, 0

    def get(self, entry: dict, what: str, keep: bool = False) -> dict:
        if entry["file"] in self.values:
            return self.values[entry["file"]]
        from safetensors.numpy import load_file

        values = load_file(str(verified_path(self.root, entry, what)))
        self.reads += 1
        if keep:
            self.values[entry["file"]] = values
        return values


class Model:
    """A runtime-scalable model loaded from an artifact."""

    def __init__(self, path: str | Path, public_key: str | Path | bytes | None = None):
        self.path = Path(path)
        self.manifest = read_manifest(self.path, public_key)
        self.segments = tuple(
            Segment(
                name=s["name"], kind=s["kind"], inputs=tuple(s["inputs"]), outputs=tuple(s["outputs"]),
                variants=tuple(
                    Variant(i, v["id"], float(v["ratio"]), int(v["macs"]), int(v["param_bytes"]), v)
                    for i, v in enumerate(s["variants"])
                ),
            )
            for s in self.manifest["segments"]
        )
        self.blocks = tuple(s for s in self.segments if s.kind == "block")
        self.frame = tuple(s for s in self.segments if s.kind == "frame")
        self.input_names = [i["name"] for i in self.manifest["inputs"]]
        self.input_shapes = [tuple(i["shape"]) for i in self.manifest["inputs"]]
        self.target = self.manifest["target"]
        # LRU, most recent last: (segment, variant) on the default device, (segment, variant, device) else
        self._cache: OrderedDict[tuple, _Executable] = OrderedDict()
        self._weights = _WeightFiles(self.path)
        self._lock = threading.Lock()          # the plan swap and inference (TVM VMs are not thread-safe)
        self._config_lock = threading.RLock()  # one reconfiguration at a time
        self._profiles = None
        self._segment_entries = {s["name"]: s for s in self.manifest["segments"]}
        self._block_names = {b.name for b in self.blocks}
        self._outputs = output_names(self.manifest["output"])
        self.cache_limit_bytes: int | None = None   # set by configure(memory_mb=…)
        self.modules_loaded = self.modules_evicted = self.last_switch_loaded = 0
        self.last_selection = None
        self._devices: dict[str, Any] = {}   # "cpu"/"gpu" -> tvm device, made on first use
        self._tensor = None
        self._steps: tuple[tuple[Any, tuple, tuple], ...] | None = None   # (callable, input keys, output keys)
        self.choice: tuple[int, ...] = ()
        self.devices: tuple[str, ...] = ()   # the device of every block in the configuration
        self.steps: tuple[Run | Copy, ...] = ()   # the configuration's plan
        # observed speed: the wall times of the latest calls in the current configuration
        self._call_ms: deque[float] = deque(maxlen=SLOWDOWN_WINDOW)
        self.adapt_to_speed = False   # budget selection scales the latency profile by slowdown()

    # -- configuration -------------------------------------------------------------------------
    def _tvm_device(self, device: str):
        """The TVM device for "cpu" or "gpu", after checking this machine can run it."""
        dev = self._devices.get(device)
        if dev is not None:
            return dev
        import tvm

        arch = _MACHINE_ARCH.get(platform.machine().lower(), platform.machine())
        triple = self.target.get("triple", "")
        if not triple.startswith(arch):
            raise UserError(
                f"{self.path}: compiled for target '{self.target.get('name')}' ({triple}, "
                f"{self.target.get('device')}), which this {arch} machine cannot run; copy it to the "
                f"board, or compile with --target host to run it here"
            )
        if device == "gpu":
            dev = tvm.cuda(0)
            if not dev.exist:
                other = " (configure(devices='cpu') runs its CPU modules)" if "cpu" in self.profiles.devices else ""
                raise UserError(f"{self.path}: the configuration runs modules of target "
                                f"'{self.target.get('name')}' on the GPU, but TVM finds no CUDA GPU here{other}")
        else:
            dev = tvm.cpu()
        self._devices[device], self._tensor = dev, tvm.runtime.tensor
        return dev

    def _executable(self, seg: Segment, index: int, device: str | None = None) -> _Executable:
        device = device or self.profiles.default_device
        key = self._key(seg.name, index, device)
        exe = self._cache.get(key)
        if exe is None:
            dev = self._tvm_device(device)
            self._tvm_device("cpu")   # model inputs are made in host memory
            exe = _Executable(self.path, seg, seg.variants[index], dev, self._weights, device_name=device)
            self._cache[key] = exe
            self.modules_loaded += 1
        self._cache.move_to_end(key)   # most recently used last
        return exe

    @property
    def profiles(self):
        """Per-variant costs and the combination estimators (legoc.runtime.estimate.Profiles)."""
        if self._profiles is None:
            from legoc.runtime.estimate import Profiles

            self._profiles = Profiles(self.manifest)
        return self._profiles

    def _indices(self, variants: Sequence[int]) -> list[int]:
        variants = [int(v) for v in variants]
        if len(variants) != len(self.blocks):
            raise UserError(f"configure(variants=…) needs one index per block: {len(self.blocks)} blocks, got {len(variants)}")
        for b, v in zip(self.blocks, variants):
            if not 0 <= v < len(b.variants):
                raise UserError(f"{b.name} has variants 0..{len(b.variants) - 1}, got {v}")
        return variants

    def slowdown(self) -> float | None:
        """How much slower this machine runs the model now than its profile says: the median wall
        time of the latest calls in the current configuration (at least SLOWDOWN_MIN_CALLS of
        them, up to SLOWDOWN_WINDOW) over its latency estimate; None before enough calls or
        without a latency profile. A board that throttles, or another app on the cores, shows
        here as a slowdown above 1; with ``adapt_to_speed`` budget selection accounts for it."""
        with self._lock:
            times, choice, devices = list(self._call_ms), self.choice, self.devices
        if len(times) < SLOWDOWN_MIN_CALLS or not choice:
            return None
        estimate = self.profiles.latency_ms(choice, devices)
        if not estimate:
            return None
        return min(SLOWDOWN_RANGE[1], max(SLOWDOWN_RANGE[0], statistics.median(times) / estimate))

    def problem(self, budget=None, name: str | None = None, weight: float = 1.0):
        """This model as one item of a selection (see legoc.runtime.solver); with
        ``adapt_to_speed``, its latencies scaled by the observed :meth:`slowdown`."""
        from legoc.runtime.solver import Budget, Problem

        index = {s.name: b for b, s in enumerate(self.blocks)}
        loaded = {(index[n], i, d) for n, i, d in map(self._unkey, self._cache) if n in index}
        profiles = self.profiles
        slowdown = self.slowdown() if self.adapt_to_speed else None
        if slowdown is not None:
            profiles = profiles.slowed(slowdown)
        return Problem(profiles, budget or Budget(), weight, list(self.choice) if self.choice else None,
                       loaded, name or self.path.name, list(self.devices) if self.choice else None)

    def plan(self, variants: Sequence[int] | None = None,
             devices: Sequence[str] | str | None = None) -> tuple[Run | Copy, ...]:
        """The steps of a configuration, without loading anything: every segment's module and
        device in order, and a Copy before the first step that needs a tensor on the other device
        (model inputs start on the CPU, in host memory; outputs are copied back to it). A tensor
        is copied at most once per device, so the copies are exactly those the latency estimate
        counts (legoc.runtime.estimate)."""
        variants = self._indices([0] * len(self.blocks) if variants is None else variants)
        per_block = dict(zip((b.name for b in self.blocks), self.profiles.device_list(devices)))
        choice = dict(zip((b.name for b in self.blocks), variants))
        frame = self.profiles.frame_device
        home = {name: "cpu" for name in self.input_names}   # the device a tensor is made on
        where = {name: {"cpu"} for name in self.input_names}   # ... and every device it is on
        steps: list[Run | Copy] = []

        def need(name: str, device: str) -> None:
            if device not in where[name]:
                steps.append(Copy(name, home[name], device, self._tensor_bytes(name)))
                where[name].add(device)

        for seg in self.segments:
            device = per_block.get(seg.name, frame)
            for name in seg.inputs:
                need(name, device)
            index = choice.get(seg.name, 0)
            module = _module_entry(seg.variants[index], device)["module"]["file"]
            steps.append(Run(seg.name, index, device, module, seg.inputs, seg.outputs))
            for name in seg.outputs:
                home[name], where[name] = device, {device}
        for name in self._outputs:
            need(name, "cpu")
        return tuple(steps)

    def _tensor_bytes(self, name: str) -> int:
        for s in self.manifest["segments"]:
            if name in (s.get("tensors") or {}):
                return tensor_bytes(s["tensors"][name])
        return tensor_bytes(next(i for i in self.manifest["inputs"] if i["name"] == name))

    def select(self, latency_ms: float | None = None, memory_mb: float | None = None,
               min_accuracy: float | None = None, *, block_latency_ms: dict | None = None,
               allowed: dict | None = None, switch_penalty: float | None = None,
               time_limit_s: float | None = None, best_effort: bool = False):
        """The optimal configuration for a budget (CP-SAT), without switching to it.
        ``best_effort``: if no configuration meets ``latency_ms``, the one that exceeds it least
        (``within_budget`` False on the selection) instead of an error."""
        from legoc.runtime import solver

        budget = solver.Budget(latency_ms, memory_mb, min_accuracy, dict(block_latency_ms or {}), dict(allowed or {}))
        return solver.solve([self.problem(budget)],
                            switch_penalty=solver.DEFAULT_SWITCH_PENALTY if switch_penalty is None else switch_penalty,
                            time_limit_s=time_limit_s or solver.DEFAULT_TIME_LIMIT_S, best_effort=best_effort)

    def configure(self, variants: Sequence[int] | None = None, *, devices: Sequence[str] | str | None = None,
                  latency_ms: float | None = None, memory_mb: float | None = None,
                  min_accuracy: float | None = None, **options) -> "Model":
        """Switch to a configuration: explicit ``variants`` (one index per block; default all full
        size) and ``devices`` (one per block, or one for all; default the target's own device;
        artifacts compiled with ``--devices``), or the most accurate one within a budget
        (``latency_ms``, ``memory_mb`` in MiB, ``min_accuracy``; see ``select`` for the other
        options), whose devices the solver chooses too. Loads only modules not already loaded;
        with a memory budget, least recently used modules beyond it are dropped. The switch is
        atomic for concurrent callers: every inference runs wholly on the old or the new one."""
        with self._config_lock:
            if variants is None and (latency_ms is not None or memory_mb is not None or min_accuracy is not None
                                     or options):
                if devices is not None:
                    raise UserError("configure(devices=…) goes with variants=…; with a budget the solver "
                                    "chooses the devices")
                self.last_selection = self.select(latency_ms, memory_mb, min_accuracy, **options)
                variants, devices = self.last_selection.choice, self.last_selection.devices
            if memory_mb is not None:
                self.cache_limit_bytes = int(memory_mb * (1 << 20))
            steps = self.plan(variants, devices)
            before = self.modules_loaded
            compiled = []
            for step in steps:
                if isinstance(step, Run):
                    seg = self._segment(step.segment)
                    exe = self._executable(seg, step.variant, step.device)
                    compiled.append((exe, tuple((n, step.device) for n in step.inputs),
                                     tuple((n, step.device) for n in step.outputs)))
                else:
                    compiled.append((_Copier(self._tvm_device(step.dst)), ((step.tensor, step.src),),
                                     ((step.tensor, step.dst),)))
            runs = [s for s in steps if isinstance(s, Run)]
            block_runs = [s for s in runs if s.segment in self._block_names]
            with self._lock:
                if steps != self.steps:
                    self._call_ms.clear()   # the observed times were of the old configuration
                self._steps, self.steps = tuple(compiled), steps
                self.choice = tuple(s.variant for s in block_runs)
                self.devices = tuple(s.device for s in block_runs)
            self.last_switch_loaded = self.modules_loaded - before
            self._evict({self._key(s.segment, s.variant, s.device) for s in runs})
        return self

    def preload(self, variants: Sequence[int], devices: Sequence[str] | str | None = None) -> "Model":
        """Load the modules of a configuration into the cache without switching to it."""
        with self._config_lock:
            runs = [s for s in self.plan(variants, devices) if isinstance(s, Run)]
            for s in runs:
                self._executable(self._segment(s.segment), s.variant, s.device)
            self._evict({self._key(s.segment, s.variant, s.device) for s in (*self.steps, *runs) if isinstance(s, Run)})
        return self

    def _key(self, segment: str, variant: int, device: str) -> tuple:
        return (segment, variant) if device == self.profiles.default_device else (segment, variant, device)

    def _unkey(self, key: tuple) -> tuple[str, int, str]:
        return key if len(key) == 3 else (*key, self.profiles.default_device)

    def _variant_cost(self, key: tuple):
        name, index, device = self._unkey(key)
        return variant_cost(self._segment_entries[name]["variants"][index], device)

    def _evict(self, keep: set) -> None:
        """Drop least recently used modules not in ``keep`` while the held ones exceed the limit."""
        if self.cache_limit_bytes is None:
            return
        held = {key: self._variant_cost(key) for key in self._cache}
        for key in list(self._cache):   # least recently used first
            if self.profiles.memory_of(list(held.values())) <= self.cache_limit_bytes:
                break
            if key not in keep:
                del self._cache[key], held[key]
                self.modules_evicted += 1

    @property
    def held_bytes(self) -> int:
        """Estimated resident bytes of every module the cache holds (configuration included)."""
        return self.profiles.memory_of([self._variant_cost(key) for key in self._cache])

    @property
    def loaded(self) -> list[tuple[str, str]]:
        """(segment, variant id) of every cached module; ``id@device`` for a non-default device."""
        default = self.profiles.default_device
        return [(name, self._segment(name).variants[i].id + ("" if d == default else f"@{d}"))
                for name, i, d in map(self._unkey, self._cache)]

    def _segment(self, name: str) -> Segment:
        return next(s for s in self.segments if s.name == name)

    # -- inference -----------------------------------------------------------------------------
    def __call__(self, *inputs: np.ndarray) -> Any:
        if self._steps is None:
            self.configure()
        with self._lock:
            t0 = time.perf_counter()
            steps = self._steps
            if len(inputs) != len(self.input_names):
                raise UserError(f"the model takes {len(self.input_names)} inputs ({', '.join(self.input_names)}), got {len(inputs)}")
            env = {}
            cpu = self._devices["cpu"]
            for name, shape, x in zip(self.input_names, self.input_shapes, inputs):
                x = _float_input(name, x)
                if tuple(x.shape) != shape:
                    raise UserError(f"input {name} must have shape {shape}, got {tuple(x.shape)}")
                env[(name, "cpu")] = self._tensor(x, cpu)
            for fn, ins, outs in steps:
                env.update(zip(outs, fn(*[env[k] for k in ins])))
            out = build_output(self.manifest["output"], {n: env[(n, "cpu")] for n in self._outputs},
                               leaf=lambda t: t.numpy())
            self._call_ms.append((time.perf_counter() - t0) * 1e3)
            return out


def _float_input(name: str, x) -> np.ndarray:
    """A model input as contiguous float32: floating-point arrays are cast; integers, booleans,
    complex numbers and anything that is not numeric are refused (a silent cast would be a wrong
    answer, e.g. uint8 pixels that the model expects normalised)."""
    arr = np.asarray(x) if not isinstance(x, np.ndarray) else x
    if arr.dtype.kind != "f":
        raise UserError(f"input {name} must be a floating-point array (the model takes float32), got dtype "
                        f"{arr.dtype}; convert and normalise it as the model expects, e.g. x.astype(np.float32)")
    return np.ascontiguousarray(arr, dtype=np.float32)


SLOWDOWN_WINDOW, SLOWDOWN_MIN_CALLS = 32, 8
SLOWDOWN_RANGE = (0.25, 4.0)   # a factor outside this is a measurement gone wrong, not a machine


def median_latency_ms(model, inputs: Sequence[np.ndarray], warmup: int = 3, calls: int = 20, *,
                      all_times: bool = False) -> float | list[float]:
    """Median wall time in ms of ``model(*inputs)`` in its current configuration, after ``warmup``
    untimed calls (``all_times``: the list of every call's time instead)."""
    import statistics
    import time

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


def set_num_threads(num_threads: int) -> None:
    """Threads of TVM's CPU thread pool for every compiled module of this process (the run-time
    form of ``TVM_NUM_THREADS``; the parallel loops of legoc's CPU schedules use this pool)."""
    if not isinstance(num_threads, int) or num_threads < 1:
        raise UserError(f"num_threads must be a positive integer, got {num_threads!r}")
    import tvm

    # affinity mode 1 ("big cores": every core on a homogeneous CPU), as TVM's own start-up
    tvm.get_global_func("runtime.config_threadpool")(1, num_threads)
    if int(tvm.get_global_func("runtime.NumThreads")()) != num_threads:
        raise UserError(f"TVM's thread pool has {int(tvm.get_global_func('runtime.NumThreads')())} threads and "
                        f"cannot grow to {num_threads} once started; set TVM_NUM_THREADS={num_threads} in the "
                        "environment before the process starts")
