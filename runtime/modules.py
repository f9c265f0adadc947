"""Loading one compiled module with its weights: what the runtime caches per (segment, variant,
device), and what the compiler loads to time a variant's switch-in."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from legoc.runtime.artifact import verified_path
from legoc.runtime.estimate import device_entry
from legoc.runtime.manifest import Segment, Variant
from legoc.runtime.nesting import leading


def module_entry(var: Variant, device: str | None) -> dict:
    """The variant's entry on ``device`` (its ``devices[device]`` module and weights; the entry
    itself for the default device)."""
    return device_entry(var.entry, device)


class WeightFiles:
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


class Executable:
    """One compiled module with its weights, ready to run on ``device`` (a TVM device;
    ``device_name`` picks the variant's module for a non-default device)."""

    def __init__(self, root: Path, seg: Segment, var: Variant, device, weight_files: WeightFiles,
                 device_name: str | None = None):
        import tvm  # the TVM runtime; with TVM_USE_RUNTIME_LIB=1 only the runtime library loads
        import tvm.runtime.vm  # not imported by `import tvm` in runtime-only mode (a board)

        entry = module_entry(var, device_name)
        what = f"{seg.name} variant {var.id}" + (f" ({device_name})" if entry is not var.entry else "")
        so = verified_path(root, entry["module"], what)
        w = entry["weights"]
        if "shared" in w:  # nested: leading sub-tensors of the block's shared weights
            values = weight_files.get(w["shared"], f"{seg.name} shared weights", keep=True)
            arrays = [values[n][leading(shape)] for n, shape in zip(w["names"], w["shapes"])]
        else:
            values = weight_files.get(w, what + " weights")
            arrays = [values[n] for n in w["names"]]
        self.params = [tvm.runtime.tensor(np.ascontiguousarray(a), device) for a in arrays]
        self.lib = tvm.runtime.load_module(str(so))
        self.vm = tvm.runtime.vm.VirtualMachine(self.lib, device)
        self.main = self.vm["main"]  # looked up once, not per call

    def __call__(self, *inputs):
        out = self.main(*inputs, *self.params)
        if hasattr(out, "numpy"):
            return (out,)
        return tuple(out)

    def one(self, tensor):
        """The module's output for one input tensor, when it makes one tensor (a chain step)."""
        out = self.main(tensor, *self.params)
        return out if hasattr(out, "numpy") else out[0]
