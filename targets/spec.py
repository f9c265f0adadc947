"""What a device target is (:class:`TargetSpec`), and a dict of its fields checked into one.

Importing this module imports neither tvm nor torch; only :meth:`TargetSpec.tvm_target` and the
machine-dependent checks of :func:`target_from_dict` import tvm, when called.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, fields
from typing import Any

from legoc.errors import UserError
from legoc.machine import machine_triple  # noqa: F401 - re-exported

DEVICES = ("cpu", "cuda")
LINKERS = ("native", "zig-aarch64")
TRIPLES = ("x86_64-linux-gnu", "aarch64-linux-gnu")
DEFAULT_CUDA_CODE = "cubin:nvrtc12"  # custom cuda targets; the forms: legoc.targets.cuda


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
    power: dict | None = None  # DVFS levels and watts (legoc.targets.power.PowerModel); None: none known

    def __hash__(self) -> int:  # dict fields: hash by the canonical JSON form
        return hash(json.dumps(self.to_json(), sort_keys=True))

    def tvm_target(self):
        """The ``tvm.target.Target`` (with its host for cuda). Imports tvm."""
        import tvm  # noqa: PLC0415 (lazy on purpose)

        host = copy.deepcopy(self.host) if self.host is not None else None
        return tvm.target.Target(copy.deepcopy(self.target), host=host)

    def to_json(self) -> dict:
        """A JSON-able dict of every field (what the artifact manifest records).

        Writing it to a file gives a valid custom target for :func:`legoc.targets.get_target`.
        ``power`` is left out when there is none, so a target without a power model has the same
        JSON (and measurement-cache keys, legoc.targets.measure) as before power models existed.
        """
        out = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)}
        if out["power"] is None:
            del out["power"]
        return out


_REQUIRED = ("name", "device", "target", "triple", "linker")
_OPTIONAL = ("description", "host", "board_software", "runs_here", "device_code", "power")


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

    possible = device == "cpu" and linker == "native" and triple == machine_triple()
    runs_here = data.get("runs_here", possible)
    if not isinstance(runs_here, bool):
        raise bad("runs_here", f"must be true or false, got {runs_here!r}")
    if check_here and runs_here and not possible:
        raise bad("runs_here", "is true, but only a native-linked cpu target for "
                  f"{machine_triple()} can run on this machine")

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
        power=_power(data.get("power"), device, source),
    )
    if check_here:
        _check_device_code(spec, bad)
        _check_with_tvm(spec, llvm, llvm_field, bad)
    return spec


def _power(data: Any, device: str, source: str) -> dict | None:
    """The ``power`` field checked (legoc.targets.power.PowerModel.from_json), as JSON; a cuda
    target's model must have its GPU's levels too."""
    if data is None:
        return None
    from legoc.targets.power import PowerModel  # noqa: PLC0415 (light: no numpy, no tvm)

    model = PowerModel.from_json(data, source=source, prefix="power.")
    if device == "cuda" and "gpu" not in model.devices:
        raise UserError(f"{source}: field 'power.devices' needs a \"gpu\" entry for a cuda target")
    return model.to_json()


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
