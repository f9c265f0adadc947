"""Device targets as a data table (after MLC-LLM's target presets).

A :class:`TargetSpec` says everything legoc needs to build for a device and to tell the user what
the board must run: the TVM target (as a dict, the only form TVM 0.27 accepts), the triple of the
shared library, which linker makes it, and how device code is stored.

Importing this module imports neither tvm nor torch: the ``host`` entry detects the CPU lazily,
on first access, and :meth:`TargetSpec.tvm_target` imports tvm when called.
"""
from __future__ import annotations

import copy
import functools
import json
import os
import platform
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

from legoc.errors import UserError, first_line

DEVICES = ("cpu", "cuda")
LINKERS = ("native", "zig-aarch64")
TRIPLES = ("x86_64-linux-gnu", "aarch64-linux-gnu")
DEFAULT_CUDA_CODE = "cubin:nvrtc12"  # custom cuda targets; the forms: legoc.targets.cuda

_JSON_HINT = "(or a path to a target .json; NAME:cpu for a Jetson's CPU alone)"


@dataclass(frozen=True)
class TargetSpec:
    """One device legoc can build for. Frozen; ``target``/``host`` are copied on every use."""

    name: str
    description: str
    device: str  # "cpu" or "cuda"
    target: dict  # TVM target dict for the device code
    host: dict | None  # TVM host target dict (cuda targets); None for cpu targets
    triple: str  # triple of the shared library in the artifact
    linker: str  # "native" (this machine's c++) or "zig-aarch64" (PyPI ziglang)
    board_software: str  # one line: what the board must run
    runs_here: bool  # artifacts can be loaded and executed on this machine
    device_code: str  # "native" for cpu; for cuda one of legoc.targets.cuda.DEVICE_CODES

    def __hash__(self) -> int:  # dict fields: hash by the canonical JSON form
        return hash(json.dumps(self.to_json(), sort_keys=True))

    def tvm_target(self):
        """The ``tvm.target.Target`` (with its host for cuda). Imports tvm."""
        import tvm  # noqa: PLC0415 (lazy on purpose)

        host = copy.deepcopy(self.host) if self.host is not None else None
        return tvm.target.Target(copy.deepcopy(self.target), host=host)

    def to_json(self) -> dict:
        """A JSON-able dict of every field (what the artifact manifest records).

        Writing it to a file gives a valid custom target for :func:`get_target`.
        """
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)}


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
    )


def _machine_triple() -> str:
    """The library triple of this machine ("x86_64-linux-gnu" or "aarch64-linux-gnu")."""
    machine = platform.machine().lower()
    arch = {"amd64": "x86_64", "x86_64": "x86_64", "arm64": "aarch64", "aarch64": "aarch64"}.get(
        machine, machine
    )
    return f"{arch}-linux-gnu"


@functools.cache
def _host_spec() -> TargetSpec:
    """This machine's CPU, detected through TVM's LLVM (imports tvm on first call)."""
    import tvm.target.codegen as codegen  # noqa: PLC0415 (lazy on purpose)

    triple = _machine_triple()
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

# name -> spec, or a function making it on first use (``host``). Kept sorted by name.
_ENTRIES: dict[str, TargetSpec | Callable[[], TargetSpec]] = {
    "host": _host_spec,
    "jetson-nano": _jetson(
        "jetson-nano", "NVIDIA Jetson Nano (Maxwell GPU sm_53, 4x Cortex-A57)",
        "sm_53", "cortex-a57", _JETSON_4, "ptx65:nvrtc11",
    ),
    "jetson-orin-nano": _jetson(
        "jetson-orin-nano", "NVIDIA Jetson Orin Nano (Ampere GPU sm_87, 6x Cortex-A78AE)",
        "sm_87", "cortex-a78ae", _JETSON_6, "cubin:nvrtc12",
    ),
    "jetson-tx2": _jetson(
        "jetson-tx2", "NVIDIA Jetson TX2 (Pascal GPU sm_62, 4x Cortex-A57 + 2x Denver2)",
        "sm_62", "cortex-a57", _JETSON_4, "ptx65:nvrtc11",
    ),
    "jetson-xavier-nx": _jetson(
        "jetson-xavier-nx", "NVIDIA Jetson Xavier NX (Volta GPU sm_72, 6x Carmel)",
        "sm_72", "carmel", _JETSON_5, "cubin:nvrtc11",
    ),
    "raspberry-pi-3": _cpu(
        "raspberry-pi-3", "Raspberry Pi 3 (4x Cortex-A53, 64-bit OS)", "cortex-a53"
    ),
    "raspberry-pi-4": _cpu("raspberry-pi-4", "Raspberry Pi 4 (4x Cortex-A72)", "cortex-a72"),
    "raspberry-pi-5": _cpu("raspberry-pi-5", "Raspberry Pi 5 (4x Cortex-A76)", "cortex-a76"),
}


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

_REQUIRED = ("name", "device", "target", "triple", "linker")
_OPTIONAL = ("description", "host", "board_software", "runs_here", "device_code")


def load_target_file(path: Path) -> TargetSpec:
    """Read and validate a custom target .json (the fields of :class:`TargetSpec`).

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


def target_from_dict(data: Any, *, source: str = "target", check_here: bool = True) -> TargetSpec:
    """Validate a dict of TargetSpec fields (e.g. ``TargetSpec.to_json()``).

    Errors are UserErrors naming ``source`` and the bad field. ``check_here=False`` skips the
    checks that depend on this machine (runs_here, and TVM parsing the target and the mcpu, which
    needs tvm's compiler library): use it to read the target back from an artifact manifest.
    """

    def bad(field: str, why: str) -> UserError:
        return UserError(f"{source}: field '{field}' {why}")

    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a JSON object with the fields of a target")
    unknown = sorted(set(data) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        allowed = ", ".join(_REQUIRED + _OPTIONAL)
        raise bad(unknown[0], f"is not a target field (fields: {allowed})")
    for key in _REQUIRED:
        if key not in data:
            raise bad(key, "is missing")

    def string(key: str, default: str | None = None) -> str:
        value = data.get(key, default)
        if not isinstance(value, str) or (key == "name" and not value.strip()):
            raise bad(key, f"must be a non-empty string, got {value!r}")
        return value

    name = string("name")
    device = string("device")
    if device not in DEVICES:
        raise bad("device", f"must be one of {', '.join(DEVICES)}, got {device!r}")
    triple = string("triple")
    if triple not in TRIPLES:
        raise bad("triple", f"must be one of {', '.join(TRIPLES)}, got {triple!r}")
    linker = string("linker")
    if linker not in LINKERS:
        raise bad("linker", f"must be one of {', '.join(LINKERS)}, got {linker!r}")
    if linker == "zig-aarch64" and triple != "aarch64-linux-gnu":
        raise bad("linker", f"'zig-aarch64' links aarch64-linux-gnu only, not {triple}")

    target = data["target"]
    if not isinstance(target, dict) or not isinstance(target.get("kind"), str):
        raise bad("target", 'must be a TVM target object with a "kind", e.g. {"kind": "llvm"}')
    host = data.get("host")
    if host is not None and (not isinstance(host, dict) or not isinstance(host.get("kind"), str)):
        raise bad("host", 'must be null or a TVM target object with a "kind"')
    if device == "cpu":
        if target["kind"] != "llvm":
            raise bad("target", f'kind must be "llvm" for a cpu target, got {target["kind"]!r}')
        if host is not None:
            raise bad("host", "must be null for a cpu target")
        llvm, llvm_field = target, "target"
    else:
        if target["kind"] != "cuda":
            raise bad("target", f'kind must be "cuda" for a cuda target, got {target["kind"]!r}')
        if host is None or host["kind"] != "llvm":
            raise bad("host", 'must be an llvm target ({"kind": "llvm", ...}) for a cuda target')
        llvm, llvm_field = host, "host"
    mtriple = llvm.get("mtriple")
    if mtriple is not None and (
        not isinstance(mtriple, str) or mtriple.split("-")[0] != triple.split("-")[0]
    ):
        raise bad(f"{llvm_field}.mtriple", f"{mtriple!r} does not match triple {triple!r}")

    possible = device == "cpu" and linker == "native" and triple == _machine_triple()
    runs_here = data.get("runs_here", possible)
    if not isinstance(runs_here, bool):
        raise bad("runs_here", f"must be true or false, got {runs_here!r}")
    if check_here and runs_here and not possible:
        raise bad("runs_here", "is true, but only a native-linked cpu target for "
                  f"{_machine_triple()} can run on this machine")

    spec = TargetSpec(
        name=name,
        description=string("description", f"custom target {name}"),
        device=device,
        target=copy.deepcopy(target),
        host=copy.deepcopy(host),
        triple=triple,
        linker=linker,
        board_software=string("board_software", "unspecified"),
        runs_here=runs_here,
        device_code=string("device_code", "native" if device == "cpu" else DEFAULT_CUDA_CODE),
    )
    if check_here:
        _check_device_code(spec, bad)
    if check_here:
        _check_with_tvm(spec, llvm, llvm_field, bad)
    return spec


def _check_device_code(spec: TargetSpec, bad) -> None:
    if spec.device == "cpu":
        if spec.device_code != "native":
            raise bad("device_code", f'must be "native" for a cpu target, got {spec.device_code!r}')
        return
    from legoc.targets.cuda import DEVICE_CODES, Plan  # noqa: PLC0415 (light: no tvm)

    if spec.device_code not in DEVICE_CODES:
        raise bad("device_code", f"must be one of {', '.join(DEVICE_CODES)}, got {spec.device_code!r}")
    try:
        Plan.of(spec.device_code, spec.target.get("arch"))
    except UserError as exc:
        raise bad("target", f'needs an "arch" like "sm_53" for device_code {spec.device_code!r}, '
                  f"got {spec.target.get('arch')!r}") from exc


def _check_with_tvm(spec: TargetSpec, llvm: dict, llvm_field: str, bad) -> None:
    """Let TVM parse the target and LLVM judge the mcpu (imports tvm)."""
    import tvm.target.codegen as codegen  # noqa: PLC0415 (lazy on purpose)

    mcpu = llvm.get("mcpu")
    if mcpu is not None:
        if not isinstance(mcpu, str) or not codegen.llvm_is_valid_cpu(mcpu, spec.triple):
            raise bad(f"{llvm_field}.mcpu", f"{mcpu!r} is not a CPU LLVM knows for {spec.triple}")
    try:
        spec.tvm_target()
    except Exception as exc:  # noqa: BLE001 - TVM raises many kinds; the message is what matters
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        first = lines[0] if lines else type(exc).__name__
        first = first if len(first) <= 200 else first[:197] + "..."
        raise bad("target", f"is rejected by TVM: {first}") from exc
