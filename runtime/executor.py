"""Running a configuration: its plan compiled into callables, switched in atomically, called
under one lock (TVM VMs are not thread-safe), with the wall time of the latest calls kept to
observe the machine's speed."""
from __future__ import annotations

import statistics
import threading
import time
from collections import deque
from typing import Any

import numpy as np

from legoc.errors import UserError
from legoc.runtime.artifact import build_output
from legoc.runtime.cache import ModuleCache
from legoc.runtime.devices import Devices
from legoc.runtime.manifest import ManifestView
from legoc.runtime.plan import Copy, Run

SLOWDOWN_WINDOW, SLOWDOWN_MIN_CALLS = 32, 8
SLOWDOWN_RANGE = (0.25, 4.0)   # a factor outside this is a measurement gone wrong, not a machine


class _Copier:
    """A Copy step, called like an executable: one tensor in, the copy on ``device`` out."""

    def __init__(self, device):
        self.device = device

    def one(self, tensor):
        return tensor.copyto(self.device)

    def __call__(self, tensor):
        return (self.one(tensor),)


def _float_input(name: str, x) -> np.ndarray:
    """A model input as contiguous float32: floating-point arrays are cast; integers, booleans,
    complex numbers and anything that is not numeric are refused (a silent cast would be a wrong
    answer, e.g. uint8 pixels that the model expects normalised)."""
    arr = np.asarray(x) if not isinstance(x, np.ndarray) else x
    if arr.dtype.kind != "f":
        raise UserError(f"input {name} must be a floating-point array (the model takes float32), got dtype "
                        f"{arr.dtype}; convert and normalise it as the model expects, e.g. x.astype(np.float32)")
    return np.ascontiguousarray(arr, dtype=np.float32)


def model_inputs(view: ManifestView, inputs: tuple) -> list[np.ndarray]:
    """The call's inputs checked against the model's (count, dtype, shape), as contiguous
    float32 arrays in the model's input order; a UserError saying what is wrong otherwise."""
    if len(inputs) != len(view.input_names):
        raise UserError(f"the model takes {len(view.input_names)} inputs ({', '.join(view.input_names)}), "
                        f"got {len(inputs)}")
    arrays = []
    for name, shape, x in zip(view.input_names, view.input_shapes, inputs):
        x = _float_input(name, x)
        if tuple(x.shape) != shape:
            raise UserError(f"input {name} must have shape {shape}, got {tuple(x.shape)}")
        arrays.append(x)
    return arrays


def _input_buffers(view: ManifestView, cpu) -> list:
    """One CPU tensor per model input, made once, with a writable numpy view of its memory: a
    call copies its inputs into them (``np.copyto``) instead of making new TVM tensors, whose
    per-call cost weighs on small models (d0f0c91). Calls are serialised by the executor's lock,
    and outputs are copied out (:func:`to_numpy`), so nothing the caller holds refers to these
    buffers."""
    import tvm

    out = []
    for shape in view.input_shapes:
        tensor = tvm.runtime.empty(shape, "float32", cpu)
        out.append((tensor, np.from_dlpack(tensor)))
    return out


def _chain(view: ManifestView, compiled: tuple) -> tuple | None:
    """The compiled steps as one-tensor callables (``fn.one``) when they form a chain: one model
    input, each step taking exactly the tensor the step before made (the first: the input) and
    making one, the last one's the model's only output; else None. A chain call skips the
    per-step dictionary lookups, input lists and output tuples, which are a measurable share of
    a small model's call (46a8df1)."""
    if len(view.input_names) != 1 or len(view.outputs) != 1:
        return None
    key, calls = (view.input_names[0], "cpu"), []
    for fn, ins, outs in compiled:
        if ins != (key,) or len(outs) != 1 or not hasattr(fn, "one"):
            return None
        calls.append(fn.one)
        key = outs[0]
    return tuple(calls) if key == (view.outputs[0], "cpu") else None


def to_numpy(tensor) -> np.ndarray:
    """A model output as a numpy array of its own: a copy through a DLPack view, cheaper per
    call than ``Tensor.numpy()`` (d0f0c91). A copy, because an output may share memory with an
    input buffer or a weight (a module that returns what it was given)."""
    try:
        return np.from_dlpack(tensor).copy()
    except (TypeError, ValueError, BufferError, RuntimeError):   # a dtype numpy's DLPack import lacks
        return tensor.numpy()


class Executor:
    """The configuration in use: its plan (``steps``), the variant (``choice``) and device
    (``block_devices``) of every block, and the callables that run it. Tensors are keyed by
    (name, device) while a call runs, unless the plan is a chain (:func:`_chain`): then each
    step's one tensor goes straight to the next."""

    def __init__(self, view: ManifestView, devices: Devices):
        self.view, self.devices = view, devices
        self.lock = threading.Lock()   # the switch and every call
        self.compiled: tuple[tuple[Any, tuple, tuple], ...] | None = None   # (callable, input keys, output keys)
        self.steps: tuple[Run | Copy, ...] = ()
        self.choice: tuple[int, ...] = ()
        self.block_devices: tuple[str, ...] = ()
        self.call_ms: deque[float] = deque(maxlen=SLOWDOWN_WINDOW)   # the current configuration's
        self._cpu = None
        self._inputs: list | None = None   # (TVM tensor, numpy view of it) per model input
        self._chain: tuple | None = None    # the steps as one-tensor callables, when they form a chain

    def compile(self, steps: tuple[Run | Copy, ...], cache: ModuleCache) -> tuple:
        """The callables of ``steps``, loading the modules ``cache`` does not hold yet."""
        compiled = []
        for step in steps:
            if isinstance(step, Run):
                exe = cache.get(step.segment, step.variant, step.device)
                compiled.append((exe, tuple((n, step.device) for n in step.inputs),
                                 tuple((n, step.device) for n in step.outputs)))
            else:
                compiled.append((_Copier(self.devices.get(step.dst)), ((step.tensor, step.src),),
                                 ((step.tensor, step.dst),)))
        return tuple(compiled)

    def switch(self, steps: tuple[Run | Copy, ...], compiled: tuple) -> None:
        """Make ``steps`` the configuration in use: every call runs wholly on the old or the new one."""
        block_runs = [s for s in steps if isinstance(s, Run) and s.segment in self.view.block_names]
        cpu = self.devices.get("cpu")   # made when the modules were loaded
        with self.lock:
            if steps != self.steps:
                self.call_ms.clear()   # the observed times were of the old configuration
            self.compiled, self.steps = compiled, steps
            self._chain = _chain(self.view, compiled)
            self.choice = tuple(s.variant for s in block_runs)
            self.block_devices = tuple(s.device for s in block_runs)
            if self._inputs is None or cpu is not self._cpu:
                self._inputs = _input_buffers(self.view, cpu)
            self._cpu = cpu

    def __call__(self, inputs: tuple) -> Any:
        view = self.view
        with self.lock:
            t0 = time.perf_counter()
            for x, (_, buffer) in zip(model_inputs(view, inputs), self._inputs):
                np.copyto(buffer, x)
            if self._chain is not None:   # each step takes the previous one's tensor: no lookups
                tensor = self._inputs[0][0]
                for fn in self._chain:
                    tensor = fn(tensor)
                outputs = {view.outputs[0]: tensor}
            else:
                env = {(name, "cpu"): tensor for name, (tensor, _) in zip(view.input_names, self._inputs)}
                for fn, ins, outs in self.compiled:
                    env.update(zip(outs, fn(*[env[k] for k in ins])))
                outputs = {n: env[(n, "cpu")] for n in view.outputs}
            out = build_output(view.manifest["output"], outputs, leaf=to_numpy)
            self.call_ms.append((time.perf_counter() - t0) * 1e3)
            return out

    def slowdown(self) -> float | None:
        """The median wall time of the latest calls (at least SLOWDOWN_MIN_CALLS, up to
        SLOWDOWN_WINDOW) over the configuration's latency estimate, clamped to SLOWDOWN_RANGE;
        None before enough calls or without a latency estimate."""
        with self.lock:
            times, choice, devices = list(self.call_ms), self.choice, self.block_devices
        if len(times) < SLOWDOWN_MIN_CALLS or not choice:
            return None
        estimate = self.view.profiles.latency_ms(choice, devices)
        if not estimate:
            return None
        return min(SLOWDOWN_RANGE[1], max(SLOWDOWN_RANGE[0], statistics.median(times) / estimate))
