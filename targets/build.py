"""Compile one torch module (a block segment) into a shared library for a target.

Pipeline: copy -> fold BatchNorm into convs -> ``torch.export`` -> Relax
(``from_exported_program``, weights kept as run-time inputs and detached) -> ``relax.build``
with the target's default pipeline (for cuda that pipeline already fuses and applies the dlight
GPU schedules; on CPU targets ``main`` itself compiled to native code, :func:`default_exec_mode`) ->
``export_library`` linked by this machine's c++ or by zig for aarch64.

Running what this writes (also in runtime-only mode, ``TVM_USE_RUNTIME_LIB=1``)::

    lib = tvm.runtime.load_module(str(built.path))
    vm = tvm.runtime.vm.VirtualMachine(lib, tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(a) for a in inputs + built.params])

Arguments must be ``tvm.runtime.Tensor`` (raw numpy arrays crash the VM). ``out`` is a
``tvm.runtime.Tensor`` for one output, else a ``tvm_ffi.Array`` of Tensors (index it, or
``list(out)``); ``.numpy()`` copies out.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.fx
import tvm
import tvm.relax.frontend.torch as relax_torch
from tvm import relax
from tvm.support import cc as tvm_cc

from legoc.errors import InternalError, LegocError, UserError, describe
from legoc.passes.fold import fold_batchnorm
from legoc.paths import cache_dir
from legoc.targets import cuda
from legoc.targets.spec import TargetSpec, machine_triple

__all__ = ["BuiltModule", "build_module", "fold_batchnorm", "measure_local", "zig_cxx_wrapper", "cache_dir"]


@dataclass
class BuiltModule:
    path: Path  # the exported shared library (.so)
    param_names: list[str]  # weights, passed as trailing inputs after the data inputs, in order
    params: list[np.ndarray]  # their values (numpy, float32 for float weights), same order
    num_inputs: int  # data inputs
    num_outputs: int  # 1 for a tensor, else the length of the returned tuple


def _bug(what: str, name: str, target: TargetSpec, exc: BaseException) -> InternalError:
    return InternalError(
        f"{what} {name} for target {target.name}: {describe(exc)}; "
        "this is a legoc bug, please report it"
    )


def zig_cxx_wrapper(triple: str = "aarch64-linux-gnu") -> Path:
    """A shell script running PyPI ziglang's c++ for ``triple`` (made once, atomically)."""
    try:
        import ziglang  # noqa: F401, PLC0415 - only checks it is installed
    except ImportError as exc:
        raise UserError(
            "the zig cross linker is missing: run `pip install ziglang` in legoc's environment"
        ) from exc
    # zig's global cache is keyed by relative source paths: two Python environments sharing
    # ~/.cache/zig invalidate each other's libc++ build on every link (a full rebuild, serialised
    # by zig's cache lock). Each environment gets its own cache unless the user sets one.
    zig_cache = Path(sys.prefix) / "zig-cache"
    script = (
        "#!/bin/sh\n"
        "# made by legoc: PyPI ziglang as a cross C++ linker\n"
        f'ZIG_GLOBAL_CACHE_DIR="${{ZIG_GLOBAL_CACHE_DIR:-{zig_cache}}}" \\\n'
        f'  exec "{sys.executable}" -m ziglang c++ -target {triple} "$@"\n'
    )
    digest = hashlib.sha256(script.encode()).hexdigest()[:12]
    folder = cache_dir()
    path = folder / f"zig-c++-{triple}-{digest}.sh"
    if path.is_file() and os.access(path, os.X_OK):
        return path
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(script)
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _fcompile(target: TargetSpec):
    """The ``fcompile`` for ``export_library`` (None: TVM's default, this machine's c++)."""
    if target.linker == "native":
        if target.triple != machine_triple():
            raise UserError(
                f"target {target.name} links {target.triple} with the native linker, but this "
                f"machine is {machine_triple()}; use linker 'zig-aarch64' for aarch64"
            )
        if not (os.environ.get("CXX") or os.environ.get("CC") or shutil.which("g++")
                or shutil.which("c++") or shutil.which("clang++")):
            raise UserError(
                f"no C++ compiler to link the {target.name} library: install g++ or set CXX"
            )
        return None
    if target.linker == "zig-aarch64":
        return tvm_cc.cross_compiler(str(zig_cxx_wrapper("aarch64-linux-gnu")))
    raise UserError(f"target {target.name} has unknown linker '{target.linker}'")


def build_signature(*, tune_trials: int = 0, prepack: bool = False, winograd: bool = True) -> dict:
    """What decides the code :func:`build_module` emits besides the module and target: the
    options and a digest of legoc's compiler sources (this file, tuning, the schedules package)."""
    here = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in [here / "build.py", here / "tune.py", *sorted((here / "schedules").glob("*.py"))]:
        h.update(path.read_bytes())
    return {"tune_trials": int(tune_trials), "prepack": bool(prepack),
            "winograd": bool(prepack and winograd), "compiler": h.hexdigest()[:16]}


def default_exec_mode(target: TargetSpec) -> str:
    """How a module's ``main`` runs unless :func:`build_module` is told otherwise:
    ``"compiled"`` on CPU targets, its VM instructions (tensor allocations, shape checks, kernel
    calls) compiled to native code with the kernels (Relax's VMTIR codegen), instead of
    ``"bytecode"`` interpreted one instruction at a time, a cost per call that weighs most on
    small (pruned) blocks. CUDA targets keep bytecode (no GPU here to run the compiled form).
    A VM instrument (``set_instrument``) sees only bytecode."""
    return "compiled" if target.device == "cpu" else "bytecode"


def build_module(
    module: torch.nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    target: TargetSpec,
    out_path: Path,
    *,
    name: str = "module",
    tune_trials: int = 0,
    prepack: bool = False,
    winograd: bool = True,
    exec_mode: str | None = None,
) -> BuiltModule:
    """Compile ``module`` for ``target`` into the shared library ``out_path``.

    ``module`` (eval mode, usually a torch.fx GraphModule) is not modified. Weights, folded
    BatchNorm included, become trailing run-time inputs (``param_names``/``params``). A module
    returning a 1-tuple gives one output (the tuple is unwrapped). The first zig link on a machine
    is slow (zig builds libc++ for aarch64 once); later links reuse it.

    CPU targets get legoc's default schedules (:mod:`legoc.targets.schedules`); with
    ``tune_trials > 0`` MetaSchedule tunes the module first (:mod:`legoc.targets.tune`, a
    persistent database: workloads tuned before are reused, not tuned again).

    ``prepack=True`` (cpu targets, untuned): conv weights are packed for the schedules and FC
    weights transposed here, once; ``params`` are then those transformed weights (other names
    and shapes than the module's parameters), not to be sliced as sub-tensors. With ``winograd``
    (the default) those weights include 3x3 stride-1 convs' Winograd-transformed filters
    (:mod:`legoc.targets.schedules.winograd`); ``winograd=False`` keeps those convs direct.

    ``exec_mode``: ``"compiled"`` or ``"bytecode"`` for ``main`` (default
    :func:`default_exec_mode`); bytecode for a benchmark that instruments the VM's calls.
    """
    out_path = Path(out_path)
    example_inputs = tuple(example_inputs)
    fcompile = _fcompile(target)  # user-fixable setup problems first, before the slow part

    try:
        folded = fold_batchnorm(module)
        with torch.no_grad():
            exported = torch.export.export(folded, example_inputs)
    except Exception as exc:
        raise _bug("torch.export could not export", name, target, exc) from exc

    try:
        mod = relax_torch.from_exported_program(
            exported, keep_params_as_input=True, unwrap_unit_return_tuple=True
        )
    except AssertionError as exc:
        if "Unsupported function types" in str(exc):
            raise UserError(
                f"TVM 0.27 cannot import {name}: {describe(exc).split(': ', 1)[-1]}; "
                "rewrite the model without these operators"
            ) from exc
        raise _bug("TVM could not import", name, target, exc) from exc
    except Exception as exc:
        raise _bug("TVM could not import", name, target, exc) from exc

    try:
        mod, detached = relax.frontend.detach_params(mod)
        main = mod["main"]
        num_inputs = int(main.attrs["num_input"]) if "num_input" in main.attrs else len(
            example_inputs
        )
        param_names = [str(v.name) for v in main.params[num_inputs:]]
        values = list(detached.get("main", []))
        if len(values) != len(param_names) or num_inputs != len(example_inputs):
            raise RuntimeError(
                f"{len(example_inputs)} inputs and {len(values)} weights vs Relax params "
                f"{[str(v.name) for v in main.params]}"
            )
        params = [_to_numpy(v) for v in values]
        ret = main.ret_ty
        num_outputs = len(ret.fields) if isinstance(ret, relax.TupleType) else 1
    except Exception as exc:
        raise _bug("TVM could not import", name, target, exc) from exc

    if prepack and target.device == "cpu" and not tune_trials:
        try:
            mod, param_names, params = _prepack(mod, params, num_inputs, target, winograd)
        except Exception as exc:
            raise _bug("TVM could not prepack the weights of", name, target, exc) from exc

    plan = cuda.Plan.of(target.device_code, target.target.get("arch")) if target.device == "cuda" else None
    try:
        tvm_target = target.tvm_target()
        with tvm_target, (cuda.building(plan) if plan else _cpu_pass_context(target)):
            executable = relax.build(mod, target=tvm_target, relax_pipeline=_relax_pipeline(mod, target, tune_trials),
                                     exec_mode=exec_mode or default_exec_mode(target))
    except LegocError:
        raise
    except Exception as exc:
        raise _bug("TVM could not compile", name, target, exc) from exc

    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_path.stem}.", suffix=".so", dir=out_path.parent)
    os.close(fd)
    try:
        if fcompile is None:
            executable.export_library(tmp)
        else:
            executable.export_library(tmp, fcompile=fcompile)
        os.chmod(tmp, 0o755)
        if plan is not None:  # the device code is what the board's JetPack loads (header check)
            cuda.verify(Path(tmp).read_bytes(), plan, tools=False)
        os.replace(tmp, out_path)
    except LegocError:
        Path(tmp).unlink(missing_ok=True)
        raise
    except Exception as exc:
        Path(tmp).unlink(missing_ok=True)
        raise _bug(f"TVM could not link ({target.linker})", name, target, exc) from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

    return BuiltModule(
        path=out_path,
        param_names=param_names,
        params=params,
        num_inputs=num_inputs,
        num_outputs=num_outputs,
    )


def _prepack(mod, params: list[np.ndarray], num_inputs: int, target: TargetSpec, winograd: bool = True):
    """Weights transformed once, here (legoc.targets.schedules.prepack_weights): the module
    without its ``main_transform_params``, the new parameter names and values."""
    from legoc.targets.schedules import TRANSFORM_PARAMS, cpu_pass_context, cpu_pipeline, prepack_weights  # noqa: PLC0415
    from legoc.targets.table import TARGETS  # noqa: PLC0415

    mod = prepack_weights(mod, target.tvm_target(), winograd=winograd)
    if TRANSFORM_PARAMS not in [gv.name_hint for gv in mod.get_global_vars()]:
        return mod, [str(v.name) for v in mod["main"].params[num_inputs:]], params
    here = TARGETS["host"].tvm_target()  # the transform runs on this machine
    transform = tvm.IRModule({TRANSFORM_PARAMS: mod[TRANSFORM_PARAMS]})
    with here, cpu_pass_context():
        vm = relax.VirtualMachine(tvm.compile(transform, target=here, relax_pipeline=cpu_pipeline(here)),
                                  tvm.cpu())
    out = vm[TRANSFORM_PARAMS]([tvm.runtime.tensor(np.ascontiguousarray(p)) for p in params])
    values = [_to_numpy(v) for v in (list(out) if not isinstance(out, tvm.runtime.Tensor) else [out])]
    mod = tvm.IRModule({gv: f for gv, f in mod.functions_items() if gv.name_hint != TRANSFORM_PARAMS},
                       attrs=mod.attrs)
    # the lifted parameters' names repeat (lv, lv1, ... per lifted binding): number them
    names = [f"prepacked{i}_{v.name}" for i, v in enumerate(mod["main"].params[num_inputs:])]
    if len(names) != len(values):
        raise RuntimeError(f"{len(values)} transformed weights for {len(names)} parameters")
    return mod, names, values


def _cpu_pass_context(target: TargetSpec):
    """:func:`~legoc.targets.schedules.cpu_pass_context` for a cpu target (int64 indices); the
    current pass context unchanged for others (GPU code keeps TVM's 32-bit indices)."""
    if target.device != "cpu":
        return contextlib.nullcontext()
    from legoc.targets.schedules import cpu_pass_context  # noqa: PLC0415 - imports tvm.s_tir

    return cpu_pass_context()


def _relax_pipeline(mod, target: TargetSpec, tune_trials: int):
    """The Relax pipeline for ``target``: TVM's default for cuda (dlight GPU schedules); for cpu,
    TVM's CPU pipeline plus legoc's CPU schedules, after MetaSchedule tuning if asked."""
    if tune_trials < 0:
        raise UserError(f"--tune-trials must be 0 (no tuning) or more, got {tune_trials}")
    if target.device != "cpu":
        if tune_trials:
            raise UserError(f"--tune-trials tunes cpu targets only; {target.name} is {target.device}")
        return "default"
    from legoc.targets.schedules import cpu_pipeline  # noqa: PLC0415 - imports tvm.s_tir

    tvm_target = target.tvm_target()
    if tune_trials:
        from legoc.targets.tune import tuned_pipeline  # noqa: PLC0415

        return tuned_pipeline(mod, target, tune_trials)
    return cpu_pipeline(tvm_target)


def measure_local(path: Path, inputs: tuple[np.ndarray, ...], params: list[np.ndarray],
                  number: int = 5, repeat: int = 3) -> float:
    """Median latency in ms of a module built for a target that runs here (TVM time evaluator)."""
    lib = tvm.runtime.load_module(str(path))
    dev = tvm.cpu()
    vm = tvm.runtime.vm.VirtualMachine(lib, dev)
    args = [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in (*inputs, *params)]
    timer = vm.time_evaluator("main", dev, number=number, repeat=repeat)
    return float(timer(*args).median) * 1e3


def _to_numpy(value) -> np.ndarray:
    """A TVM tensor as a numpy array (float weights as float32)."""
    arr = np.ascontiguousarray(value.numpy())
    if np.issubdtype(arr.dtype, np.floating) and arr.dtype != np.float32:
        arr = arr.astype(np.float32)
    return arr
