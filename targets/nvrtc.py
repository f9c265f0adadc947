"""Jetson GPU code built here, without a GPU: TVM's CUDA codegen made available, and its CUDA
C++ compiled by NVRTC into the form a :class:`~legoc.targets.cuda.Plan` asks for.

TVM's CUDA codegen must see its CUDA runtime library (``libtvm_runtime_cuda.so``), which links
``libcudart.so.13`` (PyPI ``nvidia-cuda-runtime``) and ``libcuda.so.1`` (the driver). A machine
without a GPU driver gets a stub ``libcuda.so.1`` whose every function returns
CUDA_ERROR_NO_DEVICE; it is built once into legoc's cache. Nothing here ever runs a kernel.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from legoc.errors import InternalError, UserError
from legoc.paths import cache_dir

if TYPE_CHECKING:
    from legoc.targets.cuda import Plan

NVRTC_LIBS = {"nvrtc11": ("libnvrtc.so.11.2", "nvidia-cuda-nvrtc-cu11==11.7.99"),
              "nvrtc12": ("libnvrtc.so.12", "nvidia-cuda-nvrtc-cu12==12.2.140")}
# What libtvm_runtime_cuda.so takes from libcuda.so.1 (apache-tvm 0.27.0.post1).
DRIVER_SYMBOLS = (
    "cuDeviceGetName", "cuFuncSetAttribute", "cuGetErrorName", "cuGetErrorString",
    "cuLaunchKernelEx", "cuModuleGetFunction", "cuModuleLoadData", "cuModuleUnload",
    "cuTensorMapEncodeTiled",
)


# ---------------------------------------------------------------------------------------------
# making TVM's CUDA codegen available on a machine without a GPU


def nvidia_dir() -> Path:
    """The folder of NVIDIA's PyPI CUDA wheels (the ``nvidia`` namespace package)."""
    try:
        import nvidia  # noqa: PLC0415 - namespace package of NVIDIA's PyPI wheels
    except ImportError as exc:
        raise UserError("NVIDIA's CUDA wheels are missing: install legoc's requirements.txt "
                        "(nvidia-cuda-runtime, nvidia-cuda-nvrtc-cu11/-cu12, nvidia-cuda-cccl-cu12)") from exc
    return Path(list(nvidia.__path__)[0])


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
        cudart = nvidia_dir() / "cu13" / "lib" / "libcudart.so.13"
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
    path = nvidia_dir() / "cuda_nvrtc" / "lib" / lib_name
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
    include = nvidia_dir() / "cuda_cccl" / "include"
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

