"""A loaded artifact: blocks with variants, the frame, and the chosen configuration.

``m = load("model.lego"); m.configure(variants=[0, 2, 4, 1]); y = m(x)``. Only the modules a
configuration needs are loaded (each checked against its sha256 first) and they stay cached, so
switching a configuration loads only the blocks that change.
"""
from __future__ import annotations

import platform
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from legoc.errors import UserError
from legoc.runtime.artifact import build_output, read_manifest, verified_path

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


class _Executable:
    """One compiled module with its weights, ready to run."""

    def __init__(self, root: Path, seg: Segment, var: Variant, device, weight_files: "_WeightFiles"):
        import tvm  # the TVM runtime; with TVM_USE_RUNTIME_LIB=1 only the runtime library loads
        import tvm.runtime.vm  # not imported by `import tvm` in runtime-only mode (a board)

        what = f"{seg.name} variant {var.id}"
        so = verified_path(root, var.entry["module"], what)
        w = var.entry["weights"]
        if "shared" in w:  # nested: leading sub-tensors of the block's shared weights
            values = weight_files.get(w["shared"], f"{seg.name} shared weights")
            arrays = [values[n][tuple(slice(0, s) for s in shape)] for n, shape in zip(w["names"], w["shapes"])]
        else:
            values = weight_files.get(w, what + " weights")
            arrays = [values[n] for n in w["names"]]
        self.params = [tvm.runtime.tensor(np.ascontiguousarray(a), device) for a in arrays]
        self.lib = tvm.runtime.load_module(str(so))
        self.vm = tvm.runtime.vm.VirtualMachine(self.lib, device)

    def __call__(self, *inputs):
        out = self.vm["main"](*inputs, *self.params)
        if hasattr(out, "numpy"):
            return (out,)
        return tuple(out)


class _WeightFiles:
    """Weight files read once each (after their checksum): nested variants of a block all slice
    the same shared file, so switching between them reads no weights from disk."""

    def __init__(self, root: Path):
        self.root, self.values, self.reads = root, {}, 0

    def get(self, entry: dict, what: str) -> dict:
        if entry["file"] not in self.values:
            from safetensors.numpy import load_file

            self.values[entry["file"]] = load_file(str(verified_path(self.root, entry, what)))
            self.reads += 1
        return self.values[entry["file"]]


class Model:
    """A runtime-scalable model loaded from an artifact."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
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
        self._cache: dict[tuple[str, int], _Executable] = {}
        self._weights = _WeightFiles(self.path)
        self._lock = threading.Lock()
        self._device = None
        self._plan: tuple[tuple[Segment, _Executable], ...] | None = None
        self.choice: tuple[int, ...] = ()

    # -- configuration -------------------------------------------------------------------------
    def _check_runs_here(self) -> None:
        arch = _MACHINE_ARCH.get(platform.machine().lower(), platform.machine())
        triple = self.target.get("triple", "")
        if not triple.startswith(arch) or self.target.get("device") != "cpu":
            raise UserError(
                f"{self.path}: compiled for target '{self.target.get('name')}' ({triple}, "
                f"{self.target.get('device')}), which this {arch} machine cannot run; copy it to the "
                f"board, or compile with --target host to run it here"
            )

    def _executable(self, seg: Segment, index: int) -> _Executable:
        key = (seg.name, index)
        exe = self._cache.get(key)
        if exe is None:
            if self._device is None:
                import tvm

                self._check_runs_here()
                self._device, self._tensor = tvm.cpu(), tvm.runtime.tensor
            exe = self._cache[key] = _Executable(self.path, seg, seg.variants[index], self._device, self._weights)
        return exe

    def configure(self, variants: Sequence[int] | None = None) -> "Model":
        """Pick one variant per block (indices into ``block.variants``; default: all full size).
        Loads only modules not already loaded; the switch is atomic for concurrent callers."""
        if variants is None:
            variants = [0] * len(self.blocks)
        variants = [int(v) for v in variants]
        if len(variants) != len(self.blocks):
            raise UserError(f"configure(variants=…) needs one index per block: {len(self.blocks)} blocks, got {len(variants)}")
        for b, v in zip(self.blocks, variants):
            if not 0 <= v < len(b.variants):
                raise UserError(f"{b.name} has variants 0..{len(b.variants) - 1}, got {v}")
        choice = dict(zip((b.name for b in self.blocks), variants))
        plan = tuple((s, self._executable(s, choice.get(s.name, 0))) for s in self.segments)
        with self._lock:
            self._plan, self.choice = plan, tuple(variants)
        return self

    @property
    def loaded(self) -> list[tuple[str, str]]:
        return [(name, self._segment(name).variants[i].id) for name, i in self._cache]

    def _segment(self, name: str) -> Segment:
        return next(s for s in self.segments if s.name == name)

    # -- inference -----------------------------------------------------------------------------
    def __call__(self, *inputs: np.ndarray) -> Any:
        if self._plan is None:
            self.configure()
        with self._lock:
            plan = self._plan
            if len(inputs) != len(self.input_names):
                raise UserError(f"the model takes {len(self.input_names)} inputs ({', '.join(self.input_names)}), got {len(inputs)}")
            env = {}
            for name, shape, x in zip(self.input_names, self.input_shapes, inputs):
                x = np.ascontiguousarray(x, dtype=np.float32)
                if tuple(x.shape) != shape:
                    raise UserError(f"input {name} must have shape {shape}, got {tuple(x.shape)}")
                env[name] = self._tensor(x, self._device)
            for seg, exe in plan:
                env.update(zip(seg.outputs, exe(*[env[n] for n in seg.inputs])))
            return build_output(self.manifest["output"], env, leaf=lambda t: t.numpy())


def load(path: str | Path) -> Model:
    """Open an artifact (the manifest is read and validated; modules load on configure/first call)."""
    return Model(path)
