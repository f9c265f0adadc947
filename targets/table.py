"""Device targets as a data table (after MLC-LLM's target presets).

A :class:`~legoc.targets.spec.TargetSpec` says everything legoc needs to build for a device and
to tell the user what the board must run: the TVM target (as a dict, the only form TVM 0.27
accepts), the triple of the shared library, which linker makes it, and how device code is stored.
Custom targets come from ``.json`` files of the same fields (:func:`load_target_file`).

Importing this module imports neither tvm nor torch: the ``host`` entry detects the CPU lazily,
on first access, and :meth:`TargetSpec.tvm_target` imports tvm when called.
"""
from __future__ import annotations

import copy
import functools
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Callable

from legoc.errors import UserError, first_line
from legoc.targets.power import cpu_only, power_of
from legoc.targets.spec import TargetSpec, machine_triple, target_from_dict

__all__ = [
    "CPU_SUFFIX", "DEVICE_NAMES", "TARGETS", "TargetSpec", "channel_multiple", "cpu_part",
    "device_name", "device_targets", "get_target", "list_targets", "load_target_file",
    "machine_triple", "target_from_dict",
]

_JSON_HINT = "(or a path to a target .json; NAME:cpu for a Jetson's CPU alone)"


# ---------------------------------------------------------------------------------------------
# The table

_RPI_SOFTWARE = (
    "64-bit Raspberry Pi OS or Ubuntu (aarch64), Python 3 with the apache-tvm 0.27 runtime "
    "(aarch64 wheel; TVM_USE_RUNTIME_LIB=1 needs no compiler)"
)


def _cpu(name: str, description: str, mcpu: str, software: str = _RPI_SOFTWARE) -> TargetSpec:
    return TargetSpec(
        name=name,
        description=description,
        device="cpu",
        target={"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": mcpu},
        host=None,
        triple="aarch64-linux-gnu",
        linker="zig-aarch64",
        board_software=software,
        runs_here=False,
        device_code="native",
        power=power_of(name),
    )


def _jetson(name: str, description: str, arch: str, mcpu: str, software: str,
            device_code: str) -> TargetSpec:
    return TargetSpec(
        name=name,
        description=description,
        device="cuda",
        target={"kind": "cuda", "arch": arch},
        host={"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": mcpu},
        triple="aarch64-linux-gnu",
        linker="zig-aarch64",
        board_software=software,
        runs_here=False,
        device_code=device_code,
        power=power_of(name),
    )


@functools.cache
def _host_spec() -> TargetSpec:
    """This machine's CPU, detected through TVM's LLVM (imports tvm on first call)."""
    import tvm.target.codegen as codegen  # noqa: PLC0415 (lazy on purpose)

    triple = machine_triple()
    target: dict[str, Any] = {"kind": "llvm", "mtriple": triple}
    cpu = str(codegen.llvm_get_system_cpu() or "")
    if cpu and cpu != "generic" and codegen.llvm_is_valid_cpu(cpu, triple):
        target["mcpu"] = cpu
    shown = target.get("mcpu", "generic CPU")
    return TargetSpec(
        name="host",
        description=f"this machine ({shown}, {triple})",
        device="cpu",
        target=target,
        host=None,
        triple=triple,
        linker="native",
        board_software="this machine: Linux, Python 3 with the apache-tvm 0.27 runtime",
        runs_here=True,
        device_code="native",
    )


# Device code per JetPack (why: legoc.targets.cuda and docs/targets.md).
_JETSON_4 = (
    "JetPack 4.6 (L4T R32, Ubuntu 18.04, CUDA 10.2); GPU code is PTX ISA 6.5, JIT-compiled by "
    "the driver; Python 3 with a TVM 0.27 runtime built from source on the board with CUDA"
)
_JETSON_5 = (
    "JetPack 5.1 (L4T R35, Ubuntu 20.04, CUDA 11.4); GPU code is an sm_72 cubin (NVRTC 11.7); "
    "Python 3 with a TVM 0.27 runtime built from source on the board with CUDA"
)
_JETSON_6 = (
    "JetPack 6 (L4T R36, Ubuntu 22.04, CUDA 12.2+); GPU code is an sm_87 cubin (NVRTC 12.2); "
    "Python 3 with a TVM 0.27 runtime built from source on the board with CUDA"
)

# Jetsons: name, description, GPU arch, host CPU, board software, device code.
_JETSONS = (
    ("jetson-nano", "NVIDIA Jetson Nano (Maxwell GPU sm_53, 4x Cortex-A57)",
     "sm_53", "cortex-a57", _JETSON_4, "ptx65:nvrtc11"),
    ("jetson-orin-nano", "NVIDIA Jetson Orin Nano (Ampere GPU sm_87, 6x Cortex-A78AE)",
     "sm_87", "cortex-a78ae", _JETSON_6, "cubin:nvrtc12"),
    ("jetson-tx2", "NVIDIA Jetson TX2 (Pascal GPU sm_62, 4x Cortex-A57 + 2x Denver2)",
     "sm_62", "cortex-a57", _JETSON_4, "ptx65:nvrtc11"),
    ("jetson-xavier-nx", "NVIDIA Jetson Xavier NX (Volta GPU sm_72, 6x Carmel)",
     "sm_72", "carmel", _JETSON_5, "cubin:nvrtc11"),
)
# Raspberry Pis: name, description, CPU.
_RASPBERRY_PIS = (
    ("raspberry-pi-3", "Raspberry Pi 3 (4x Cortex-A53, 64-bit OS)", "cortex-a53"),
    ("raspberry-pi-4", "Raspberry Pi 4 (4x Cortex-A72)", "cortex-a72"),
    ("raspberry-pi-5", "Raspberry Pi 5 (4x Cortex-A76)", "cortex-a76"),
)

# name -> spec, or a function making it on first use (``host``). Sorted by name.
_ENTRIES: dict[str, TargetSpec | Callable[[], TargetSpec]] = dict(sorted({
    "host": _host_spec,
    **{row[0]: _jetson(*row) for row in _JETSONS},
    **{row[0]: _cpu(*row) for row in _RASPBERRY_PIS},
}.items()))


class _TargetTable(Mapping):
    """A read-only name -> TargetSpec mapping whose lazy entries are made on first access."""

    def __init__(self, entries: dict[str, TargetSpec | Callable[[], TargetSpec]]):
        self._entries = entries

    def __getitem__(self, name: str) -> TargetSpec:
        entry = self._entries[name]
        return entry if isinstance(entry, TargetSpec) else entry()

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __repr__(self) -> str:
        return f"TARGETS({', '.join(self._entries)})"


TARGETS: Mapping[str, TargetSpec] = _TargetTable(_ENTRIES)


CPU_SUFFIX = ":cpu"


def cpu_part(spec: TargetSpec) -> TargetSpec:
    """The CPU of a GPU board as a target of its own (``jetson-nano:cpu``): its host target
    and linker, device code native. A cpu target is returned unchanged."""
    if spec.device == "cpu":
        return spec
    return TargetSpec(
        name=spec.name + CPU_SUFFIX,
        description=f"the CPU of {spec.description} (no GPU code)",
        device="cpu",
        target=copy.deepcopy(spec.host),
        host=None,
        triple=spec.triple,
        linker=spec.linker,
        board_software=spec.board_software,
        runs_here=False,
        device_code="native",
        power=cpu_only(spec.power),
    )


# What ``--devices`` takes: a Jetson's CPU and its GPU (a cuda target's own device).
DEVICE_NAMES = ("cpu", "gpu")


def device_name(spec: TargetSpec) -> str:
    """The target's own device as ``--devices`` names it: "gpu" for cuda targets, else "cpu"."""
    return "gpu" if spec.device == "cuda" else "cpu"


def device_targets(spec: TargetSpec, devices=None) -> dict[str, TargetSpec]:
    """The target of each device a compile builds for, the target's own (default) device first.

    ``devices`` None or empty: the target's own device alone (no device choice). Otherwise a
    GPU board's devices (``("cpu", "gpu")``): the GPU is ``spec`` itself, the CPU its
    :func:`cpu_part`. Every mistake is a one-line UserError."""
    own = device_name(spec)
    if not devices:
        return {own: spec}
    devices = list(devices)
    unknown = [d for d in devices if d not in DEVICE_NAMES]
    if unknown:
        raise UserError(f"unknown device '{unknown[0]}' in --devices; devices: {', '.join(DEVICE_NAMES)}")
    if spec.device != "cuda":
        raise UserError(f"--devices chooses between the CPU and the GPU of a Jetson; target {spec.name} "
                        "has a CPU only: drop --devices")
    if len(set(devices)) != len(devices):
        raise UserError(f"--devices names a device twice: {','.join(devices)}")
    if own not in devices:
        raise UserError(f"--devices {','.join(devices)} leaves out the GPU of {spec.name}; for its CPU alone "
                        f"use --target {spec.name}{CPU_SUFFIX}")
    out = {own: spec}
    if "cpu" in devices:
        out["cpu"] = cpu_part(spec)
    return out


def list_targets() -> list[TargetSpec]:
    """Every built-in target, sorted by name (detects the host CPU)."""
    return [TARGETS[name] for name in sorted(TARGETS)]


def channel_multiple(spec: TargetSpec) -> int:
    """The multiple ``legoc compile`` rounds pruned channel counts to by default: the fp32 vector
    width of the target's CPU code (a Jetson's host CPU for its cuda targets), so a pruned
    conv's output channels fill whole vectors of the packed layout. Imports tvm."""
    import tvm  # noqa: PLC0415 (lazy on purpose)

    from legoc.targets.schedules import vector_lanes  # noqa: PLC0415

    cpu = spec.target if spec.device == "cpu" else spec.host
    if not cpu or cpu.get("kind") != "llvm":
        return 1
    return vector_lanes(tvm.target.Target(copy.deepcopy(cpu)))


def get_target(name_or_path: str | os.PathLike) -> TargetSpec:
    """A built-in target by name, or a custom target from a ``.json`` file."""
    text = os.fspath(name_or_path)
    if text in TARGETS:
        return TARGETS[text]
    base = text[: -len(CPU_SUFFIX)] if text.endswith(CPU_SUFFIX) else None
    if base in TARGETS and TARGETS[base].device == "cuda":
        return cpu_part(TARGETS[base])
    if text.endswith(".json") or os.sep in text or os.path.isfile(text):
        return load_target_file(Path(text))
    valid = ", ".join(sorted(TARGETS))
    raise UserError(f"unknown target '{text}'; valid targets: {valid} {_JSON_HINT}")


# ---------------------------------------------------------------------------------------------
# Custom targets from JSON


def load_target_file(path: Path) -> TargetSpec:
    """Read and validate a custom target .json (the fields of :class:`TargetSpec`, checked by
    :func:`~legoc.targets.spec.target_from_dict`).

    Required: name, device, target, triple, linker. Optional: description, host (required for
    cuda), board_software, runs_here (computed when missing), device_code.
    """
    if not path.is_file():
        raise UserError(f"target file '{path}' does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"target file '{path}' is not valid JSON: {first_line(exc) or type(exc).__name__}") from exc
    source = f"target file '{path}'"
    if isinstance(data, dict) and data.get("name") in TARGETS:
        raise UserError(
            f"{source}: field 'name' '{data['name']}' is a built-in target; pick another name"
        )
    return target_from_dict(data, source=source)

