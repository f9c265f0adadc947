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

To build any of these, TVM's CUDA codegen must see its CUDA runtime library
(``libtvm_runtime_cuda.so``), which links ``libcudart.so.13`` (PyPI ``nvidia-cuda-runtime``)
and ``libcuda.so.1`` (the driver). A machine without a GPU driver gets a stub ``libcuda.so.1``
whose every function returns CUDA_ERROR_NO_DEVICE; it is built once into legoc's cache. Nothing
here ever runs a kernel.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import re
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from legoc.errors import InternalError, UserError
from legoc.paths import cache_dir

DEVICE_CODES = ("cubin:nvrtc12", "cubin:nvrtc11", "ptx65:nvrtc11")
NVRTC_LIBS = {"nvrtc11": ("libnvrtc.so.11.2", "nvidia-cuda-nvrtc-cu11==11.7.99"),
              "nvrtc12": ("libnvrtc.so.12", "nvidia-cuda-nvrtc-cu12==12.2.140")}
PTX_ISA = {"ptx65": "6.5"}
EM_CUDA = 190
ELFOSABI_CUDA = 0x33
# What libtvm_runtime_cuda.so takes from libcuda.so.1 (apache-tvm 0.27.0.post1).
DRIVER_SYMBOLS = (
    "cuDeviceGetName", "cuFuncSetAttribute", "cuGetErrorName", "cuGetErrorString",
    "cuLaunchKernelEx", "cuModuleGetFunction", "cuModuleLoadData", "cuModuleUnload",
    "cuTensorMapEncodeTiled",
)


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
# making TVM's CUDA codegen available on a machine without a GPU


def _nvidia_dir() -> Path:
    try:
        import nvidia  # noqa: PLC0415 - namespace package of NVIDIA's PyPI wheels
    except ImportError as exc:
        raise UserError("NVIDIA's CUDA wheels are missing: install legoc's requirements.txt "
                        "(nvidia-cuda-runtime, nvidia-cuda-nvrtc-cu11/-cu12, nvidia-cuda-cccl-cu12)") from exc
    return Path(list(nvidia.__path__)[0])


def _tool(name: str) -> Path | None:
    """ptxas (nvidia-cuda-nvcc-cu12) or cuobjdump (nvidia-cuda-cuobjdump), if installed."""
    base = _nvidia_dir()
    for sub in ("cuda_nvcc/bin", "cu13/bin", "cuda_cuobjdump/bin"):
        if (base / sub / name).is_file():
            return base / sub / name
    found = shutil.which(name)
    return Path(found) if found else None


def _stub_libcuda() -> Path:
    """A ``libcuda.so.1`` defining what TVM's CUDA runtime library links, each function
    returning CUDA_ERROR_NO_DEVICE (100). Built once with this machine's C compiler."""
    source = "".join(f"int {name}(void) {{ return 100; }}\n" for name in DRIVER_SYMBOLS)
    folder = cache_dir() / "cuda-stub" / hashlib.sha256(source.encode()).hexdigest()[:12]
    lib = folder / "libcuda.so.1"
    if lib.is_file():
        return lib
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise UserError("building Jetson GPU code needs a C compiler for the libcuda stub: "
                        "install gcc or set CC")
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        (Path(tmp) / "stub.c").write_text(source)
        out = Path(tmp) / "libcuda.so.1"
        proc = subprocess.run([compiler, "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o",
                               str(out), str(Path(tmp) / "stub.c")], capture_output=True, text=True)
        if proc.returncode != 0:
            raise UserError(f"could not build the libcuda stub with {compiler}: "
                            f"{proc.stderr.strip().splitlines()[-1:]}")
        os.replace(out, lib)
    return lib


_READY = False
_PLAN: Plan | None = None
_ORIGINAL_CALLBACK = None


def enable_codegen() -> None:
    """Load TVM's CUDA runtime library (with the real driver, or the stub) and install legoc's
    ``tvm_callback_cuda_compile``. Idempotent."""
    global _READY, _ORIGINAL_CALLBACK
    if _READY:
        return
    import tvm  # noqa: PLC0415
    import tvm_ffi  # noqa: PLC0415

    if tvm_ffi.get_global_func("ffi.Module.create.cuda", allow_missing=True) is None:
        cudart = _nvidia_dir() / "cu13" / "lib" / "libcudart.so.13"
        if not cudart.is_file():
            raise UserError("libcudart.so.13 is missing: install `nvidia-cuda-runtime` "
                            "(legoc's requirements.txt)")
        ctypes.CDLL(str(cudart), mode=ctypes.RTLD_GLOBAL)
        try:
            ctypes.CDLL("libcuda.so.1", mode=ctypes.RTLD_GLOBAL)  # a real driver, if any
        except OSError:
            ctypes.CDLL(str(_stub_libcuda()), mode=ctypes.RTLD_GLOBAL)
        runtime_cuda = Path(tvm.__file__).parent / "lib" / "libtvm_runtime_cuda.so"
        ctypes.CDLL(str(runtime_cuda), mode=ctypes.RTLD_LOCAL)  # registers ffi.Module.create.cuda
        if tvm_ffi.get_global_func("ffi.Module.create.cuda", allow_missing=True) is None:
            raise InternalError(f"{runtime_cuda} loaded but registered no CUDA module")
    _ORIGINAL_CALLBACK = tvm_ffi.get_global_func("tvm_callback_cuda_compile", allow_missing=True)
    tvm_ffi.register_global_func("tvm_callback_cuda_compile", _compile_callback, override=True)
    _READY = True


def _compile_callback(code, *_):
    if _PLAN is None:  # someone else's CUDA build: TVM's own behaviour
        if _ORIGINAL_CALLBACK is None:
            raise InternalError("tvm_callback_cuda_compile called outside legoc's cuda build")
        return _ORIGINAL_CALLBACK(code, *_)
    return compile_source(str(code), _PLAN)


@contextlib.contextmanager
def building(plan: Plan):
    """Within this block, TVM's CUDA builds produce ``plan``'s device code."""
    global _PLAN
    enable_codegen()
    previous, _PLAN = _PLAN, plan
    try:
        yield
    finally:
        _PLAN = previous


# ---------------------------------------------------------------------------------------------
# NVRTC


def _nvrtc(name: str):
    lib_name, wheel = NVRTC_LIBS[name]
    path = _nvidia_dir() / "cuda_nvrtc" / "lib" / lib_name
    if not path.is_file():
        raise UserError(f"{lib_name} is missing: install `{wheel}` (legoc's requirements.txt)")
    return ctypes.CDLL(str(path))


@contextlib.contextmanager
def _thread_locale_kept():
    """NVRTC 11 switches the calling thread's locale to "C" (uselocale) and leaves it so, which
    turns Python's default text encoding into ASCII for the rest of the process: put it back."""
    libc = ctypes.CDLL(None)
    libc.uselocale.restype = ctypes.c_void_p
    libc.uselocale.argtypes = [ctypes.c_void_p]
    before = libc.uselocale(None)  # query
    try:
        yield
    finally:
        libc.uselocale(before)


def compile_source(code: str, plan: Plan) -> bytes:
    """CUDA C++ (TVM's generated kernels) -> cubin bytes or PTX text, per ``plan``."""
    with _thread_locale_kept():
        return _compile_source(code, plan)


def _compile_source(code: str, plan: Plan) -> bytes:
    lib = _nvrtc(plan.nvrtc)
    include = _nvidia_dir() / "cuda_cccl" / "include"
    number = plan.arch.split("_", 1)[1]
    arch = f"sm_{number}" if plan.fmt == "cubin" else f"compute_{number}"
    options = [f"--gpu-architecture={arch}", "-std=c++17", f"-I{include}", "-default-device"]
    prog = ctypes.c_void_p()
    _check(lib, lib.nvrtcCreateProgram(ctypes.byref(prog), code.encode(), b"tvm_kernels.cu",
                                       0, None, None), "nvrtcCreateProgram")
    try:
        argv = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
        result = lib.nvrtcCompileProgram(prog, len(options), argv)
        if result != 0:
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(prog, log)
            first = next((ln for ln in log.value.decode(errors="replace").splitlines() if "error" in ln), "")
            raise InternalError(f"NVRTC ({plan.nvrtc}) could not compile TVM's kernels for "
                                f"{plan.arch}: {first.strip()[:300]}")
        get, get_size = ((lib.nvrtcGetCUBIN, lib.nvrtcGetCUBINSize) if plan.fmt == "cubin"
                         else (lib.nvrtcGetPTX, lib.nvrtcGetPTXSize))
        size = ctypes.c_size_t()
        _check(lib, get_size(prog, ctypes.byref(size)), "nvrtcGetSize")
        buf = ctypes.create_string_buffer(size.value)
        _check(lib, get(prog, buf), "nvrtcGet")
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
    if plan.fmt == "cubin":
        return buf.raw
    ptx = buf.raw.rstrip(b"\0").decode()
    ptx, count = re.subn(r"^\.version \d+\.\d+$", f".version {plan.ptx_isa}", ptx, count=1, flags=re.M)
    if count != 1:
        raise InternalError("NVRTC's PTX has no .version line")
    return ptx.encode()


def _check(lib, result: int, what: str) -> None:
    if result != 0:
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        raise InternalError(f"{what} failed: {lib.nvrtcGetErrorString(result).decode()}")


# ---------------------------------------------------------------------------------------------
# static verification of what an artifact carries


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
