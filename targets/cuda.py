"""Jetson GPU code in the form each JetPack can load, built here without a GPU, and checked.

A cuda target's ``device_code`` says what goes into the artifact:

=================  ==========================================================================
``cubin:nvrtc12``  SASS for the target's ``arch`` compiled by NVRTC 12.2 (PyPI
                   ``nvidia-cuda-nvrtc-cu12``): JetPack 6 ships CUDA 12.2+, so its driver loads
                   it as is: no compiler and no JIT on the board.
``cubin:nvrtc11``  SASS compiled by NVRTC 11.7 (``nvidia-cuda-nvrtc-cu11``, the oldest 11.x on
                   PyPI): for JetPack 5 (CUDA 11.4), relying on CUDA's minor-version
                   compatibility of cubins within CUDA 11.
``ptx65:nvrtc11``  PTX for ``compute_XY``, compiled by NVRTC 11.7 and declared PTX ISA 6.5,
                   the newest ISA the CUDA 10.2 driver of JetPack 4 can JIT. Every module is
                   assembled by ptxas for the target's arch at ISA 6.5 to prove it uses nothing
                   newer (ptxas rejects instructions a declared ISA lacks).
=================  ==========================================================================

Why not others: TVM's default without a CUDA runtime library, CUDA C++ source compiled on the
board at load time, needs Python, NVRTC and C++17 libcu++ headers on the board (JetPack 4's
NVRTC 10.2 has no C++17); CUDA 13's nvcc here rejects sm_53/sm_62/sm_72; TVM 0.27's LLVM ``nvptx``
target emits kernels as ``.func`` (not ``.entry``), which no driver can launch; NVRTC 11/12
PTX declares ISA 7.7/8.2, which the JetPack 4 driver refuses.

Building it (:func:`building`, :func:`compile_source`): :mod:`legoc.targets.nvrtc`. Checking
what an artifact carries (:func:`verify`), also from the command line
(``python -m legoc.targets.cuda ART...``): here.
"""
from __future__ import annotations

import re
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from legoc.errors import InternalError, UserError
from legoc.targets.nvrtc import building, compile_source, enable_codegen, nvidia_dir

__all__ = ["DEVICE_CODES", "DeviceCode", "Plan", "Verified", "building", "compile_source", "describe",
           "enable_codegen", "extract", "main", "verify", "verify_artifact"]

DEVICE_CODES = ("cubin:nvrtc12", "cubin:nvrtc11", "ptx65:nvrtc11")
PTX_ISA = {"ptx65": "6.5"}
EM_CUDA = 190
ELFOSABI_CUDA = 0x33


def describe(device_code: str) -> str:
    """One line for the target table and the manifest."""
    return {
        "cubin:nvrtc12": "cubin (SASS) built by NVRTC 12.2; loaded by the driver as is",
        "cubin:nvrtc11": "cubin (SASS) built by NVRTC 11.7; loaded by the driver as is",
        "ptx65:nvrtc11": "PTX ISA 6.5 built by NVRTC 11.7; JIT-compiled by the driver at load",
    }.get(device_code, device_code)


@dataclass(frozen=True)
class Plan:
    """How one cuda target's device code is built."""

    fmt: str  # "cubin" or "ptx"
    nvrtc: str | None  # "nvrtc11" / "nvrtc12"
    arch: str  # "sm_53"
    ptx_isa: str | None  # declared PTX ISA for ptx

    @classmethod
    def of(cls, device_code: str, arch: str) -> "Plan":
        if device_code not in DEVICE_CODES:
            raise UserError(f"device_code {device_code!r} is not one of {', '.join(DEVICE_CODES)}")
        if not re.fullmatch(r"sm_\d{2,3}[a-z]?", arch or ""):
            raise UserError(f"cuda target arch must look like sm_53, got {arch!r}")
        form, nvrtc = device_code.split(":")
        if form == "cubin":
            return cls("cubin", nvrtc, arch, None)
        return cls("ptx", nvrtc, arch, PTX_ISA[form])


# ---------------------------------------------------------------------------------------------
# static verification of what an artifact carries


def _tool(name: str) -> Path | None:
    """ptxas (nvidia-cuda-nvcc-cu12) or cuobjdump (nvidia-cuda-cuobjdump), if installed."""
    base = nvidia_dir()
    for sub in ("cuda_nvcc/bin", "cu13/bin", "cuda_cuobjdump/bin"):
        if (base / sub / name).is_file():
            return base / sub / name
    found = shutil.which(name)
    return Path(found) if found else None


@dataclass(frozen=True)
class DeviceCode:
    """The CUDA module found in a TVM library."""

    fmt: str  # "cubin", "ptx", "fatbin" or "cuda"
    data: bytes


def extract(library: bytes) -> DeviceCode:
    """The serialized CUDA module of a TVM-exported library (``__tvm_ffi__library_bin``).

    TVM writes each imported module as kind (u64 length + bytes) and payload (u64 length +
    bytes); a CUDA payload is fmt (string), function map, then the code (u64 length + bytes),
    last. Strings are u64 length + bytes.
    """
    key = struct.pack("<Q", 4) + b"cuda"
    pos = library.find(key)
    while pos >= 0:
        at = pos + len(key)
        (total,) = struct.unpack_from("<Q", library, at)
        payload = library[at + 8: at + 8 + total]
        if len(payload) == total and total > 16:
            (n,) = struct.unpack_from("<Q", payload, 0)
            fmt = payload[8: 8 + n].decode(errors="replace")
            if fmt in ("cubin", "ptx", "fatbin", "cuda"):
                return DeviceCode(fmt, _last_field(payload))
        pos = library.find(key, pos + 1)
    raise UserError("no CUDA module in this library")


def _last_field(payload: bytes) -> bytes:
    for start in range(8, len(payload) - 8):
        (n,) = struct.unpack_from("<Q", payload, start)
        if n and start + 8 + n == len(payload):
            return payload[start + 8:]
    raise InternalError("CUDA module payload without its code field")


@dataclass(frozen=True)
class Verified:
    fmt: str
    arch: str  # "sm_53"
    detail: str  # e.g. "ELF abi 7, toolkit 117" or "PTX ISA 6.5"
    tool: str  # the CUDA tool's own line confirming it


def verify(library: bytes, plan: Plan, *, tools: bool = True) -> Verified:
    """Check that ``library`` carries ``plan``'s device code: format, architecture and (cubin)
    ELF header, or (ptx) ISA and target lines; with ``tools``, CUDA's own tools confirm it:
    ``cuobjdump -elf`` for a cubin, ``ptxas -arch=sm_XY`` for PTX. Raises InternalError."""
    code = extract(library)
    if code.fmt != plan.fmt:
        raise InternalError(f"device code is {code.fmt}, expected {plan.fmt}")
    if code.fmt == "cubin":
        arch, detail = _cubin_header(code.data)
        if arch != plan.arch:
            raise InternalError(f"cubin is for {arch}, expected {plan.arch}")
        tool_line = _cuobjdump(code.data, plan.arch) if tools else ""
        return Verified("cubin", arch, detail, tool_line)
    text = code.data.decode(errors="replace")
    version = re.search(r"^\.version (\d+\.\d+)$", text, re.M)
    target = re.search(r"^\.target (sm_\d+)", text, re.M)
    if not version or not target:
        raise InternalError("PTX without .version/.target lines")
    if version.group(1) != plan.ptx_isa or target.group(1) != plan.arch:
        raise InternalError(f"PTX is ISA {version.group(1)} for {target.group(1)}, expected "
                            f"ISA {plan.ptx_isa} for {plan.arch}")
    entries = len(re.findall(r"^\.visible \.entry ", text, re.M))
    if entries == 0:
        raise InternalError("PTX has no kernel entry (.entry)")
    tool_line = _ptxas(text, plan.arch) if tools else ""
    return Verified("ptx", plan.arch, f"PTX ISA {version.group(1)}, {entries} .entry kernels", tool_line)


def _cubin_header(data: bytes) -> tuple[str, str]:
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise InternalError("cubin is not a 64-bit ELF file")
    osabi, abiversion = data[7], data[8]
    e_type, e_machine = struct.unpack_from("<HH", data, 16)
    (e_flags,) = struct.unpack_from("<I", data, 48)
    if e_machine != EM_CUDA or osabi != ELFOSABI_CUDA:
        raise InternalError(f"cubin ELF machine {e_machine}/osabi {osabi:#x} is not CUDA")
    return f"sm_{e_flags & 0xFF}", f"CUDA ELF (EM_CUDA, OSABI 0x33, ABI version {abiversion}, type {e_type})"


def _cuobjdump(cubin: bytes, arch: str) -> str:
    tool = _tool("cuobjdump")
    if tool is None:
        raise UserError("cuobjdump is missing: install `nvidia-cuda-cuobjdump` (requirements.txt)")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "module.cubin"
        path.write_bytes(cubin)
        out = subprocess.run([str(tool), "-elf", str(path)], capture_output=True, text=True)
    line = next((ln.strip() for ln in out.stdout.splitlines() if "elf:" in ln and "sm=" in ln), "")
    if out.returncode != 0 or f"sm={arch.split('_')[1]}," not in line:
        raise InternalError(f"cuobjdump does not confirm {arch}: {line or out.stderr.strip()[:200]}")
    return f"cuobjdump: {line}"


def _ptxas(ptx: str, arch: str) -> str:
    tool = _tool("ptxas")
    if tool is None:
        raise UserError("ptxas is missing: install `nvidia-cuda-nvcc-cu12` (requirements.txt)")
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "module.ptx", Path(tmp) / "module.cubin"
        src.write_text(ptx)
        proc = subprocess.run([str(tool), f"-arch={arch}", str(src), "-o", str(out)],
                              capture_output=True, text=True)
        version = subprocess.run([str(tool), "--version"], capture_output=True, text=True).stdout
    if proc.returncode != 0:
        raise InternalError(f"ptxas rejects the PTX for {arch}: {proc.stderr.strip()[:300]}")
    release = re.search(r"release (\d+\.\d+)", version)
    return f"ptxas {release.group(1) if release else '?'} -arch={arch}: assembled"


def verify_artifact(path: Path, *, tools: bool = True) -> list[tuple[str, Verified]]:
    """Verify every module of a cuda artifact against its manifest's target."""
    import json  # noqa: PLC0415

    manifest = json.loads((Path(path) / "manifest.json").read_text())
    target = manifest["target"]
    if target["device"] != "cuda":
        raise UserError(f"{path}: target {target['name']} is not a cuda target")
    plan = Plan.of(target["device_code"], target["target"].get("arch", ""))
    results = []
    for seg in manifest["segments"]:
        for var in seg["variants"]:
            lib = (Path(path) / var["module"]["file"]).read_bytes()
            results.append((var["module"]["file"], verify(lib, plan, tools=tools)))
    return results


def main(argv: list[str] | None = None) -> int:
    import argparse  # noqa: PLC0415
    import sys  # noqa: PLC0415

    p = argparse.ArgumentParser(prog="python -m legoc.targets.cuda",
                                description="verify the GPU code of Jetson artifacts with CUDA's tools")
    p.add_argument("artifacts", nargs="+")
    args = p.parse_args(argv)
    try:
        for art in args.artifacts:
            results = verify_artifact(Path(art))
            v = results[0][1]
            print(f"{art}: {len(results)} modules, all {v.fmt} for {v.arch}: {v.detail}; {v.tool}")
    except (UserError, InternalError) as exc:
        print(f"legoc: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
