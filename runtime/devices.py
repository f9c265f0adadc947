"""TVM devices by name ("cpu", "gpu"), made on first use once this machine is known to run the
artifact's modules."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from legoc.errors import UserError
from legoc.machine import machine_arch, machine_triple  # noqa: F401 - re-exported
from legoc.runtime.manifest import ManifestView



class Devices:
    """The TVM devices the modules of the artifact at ``path`` run on."""

    def __init__(self, path: Path, view: ManifestView):
        self.path, self.target, self.view = path, view.target, view
        self._made: dict[str, Any] = {}
        self.tensor = None   # tvm.runtime.tensor, once a device is made

    def get(self, device: str):
        """The TVM device for "cpu" or "gpu", after checking this machine can run it."""
        dev = self._made.get(device)
        if dev is not None:
            return dev
        import tvm

        arch = machine_arch()
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
                cpu_too = "cpu" in self.view.profiles.devices
                other = " (configure(devices='cpu') runs its CPU modules)" if cpu_too else ""
                raise UserError(f"{self.path}: the configuration runs modules of target "
                                f"'{self.target.get('name')}' on the GPU, but TVM finds no CUDA GPU here{other}")
        else:
            dev = tvm.cpu()
        self._made[device], self.tensor = dev, tvm.runtime.tensor
        return dev
