"""The modules a model has loaded, least recently used first, within an optional memory limit."""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

from legoc.runtime.devices import Devices
from legoc.runtime.estimate import VariantCost, variant_cost
from legoc.runtime.manifest import ManifestView
from legoc.runtime.modules import Executable, WeightFiles


class ModuleCache:
    """Executables by key: ``(segment, variant)`` on the default device, ``(segment, variant,
    device)`` on another. ``limit_bytes`` (None: no limit) bounds the estimated resident memory
    of what is held; :meth:`evict` enforces it."""

    def __init__(self, root: Path, view: ManifestView, devices: Devices):
        self.root, self.view, self.devices = root, view, devices
        self.entries: OrderedDict[tuple, Executable] = OrderedDict()   # most recently used last
        self.weights = WeightFiles(root)
        self.limit_bytes: int | None = None
        self.loaded = self.evicted = 0   # counts of modules loaded and dropped so far

    def key(self, segment: str, variant: int, device: str) -> tuple:
        return (segment, variant) if device == self.view.profiles.default_device else (segment, variant, device)

    def unkey(self, key: tuple) -> tuple[str, int, str]:
        return key if len(key) == 3 else (*key, self.view.profiles.default_device)

    def held(self) -> list[tuple[str, int, str]]:
        """(segment, variant index, device) of every held module, least recently used first."""
        return [self.unkey(key) for key in self.entries]

    def get(self, segment: str, index: int, device: str | None = None) -> Executable:
        """The module of ``segment``'s variant ``index`` on ``device`` (default: the artifact's
        own), loaded if not held; it becomes the most recently used."""
        device = device or self.view.profiles.default_device
        key = self.key(segment, index, device)
        exe = self.entries.get(key)
        if exe is None:
            dev = self.devices.get(device)
            self.devices.get("cpu")   # model inputs are made in host memory
            seg = self.view.segment(segment)
            exe = Executable(self.root, seg, seg.variants[index], dev, self.weights, device_name=device)
            self.entries[key] = exe
            self.loaded += 1
        self.entries.move_to_end(key)
        return exe

    def _cost(self, key: tuple) -> VariantCost:
        name, index, device = self.unkey(key)
        return variant_cost(self.view.segment(name).variants[index].entry, device)

    def evict(self, keep: set) -> None:
        """Drop least recently used modules not in ``keep`` (keys) while the held ones exceed the limit."""
        if self.limit_bytes is None:
            return
        profiles = self.view.profiles
        held = {key: self._cost(key) for key in self.entries}
        for key in list(self.entries):   # least recently used first
            if profiles.memory_of(list(held.values())) <= self.limit_bytes:
                break
            if key not in keep:
                del self.entries[key], held[key]
                self.evicted += 1

    def held_bytes(self) -> int:
        """Estimated resident bytes of every held module."""
        return self.view.profiles.memory_of([self._cost(key) for key in self.entries])
