"""Where a model's time goes: every kernel (fused PrimFunc) of its monolithic CPU module, timed on
its own, with the rule that scheduled it and its GFLOP/s.

    .venv/bin/python benchmarks/kernels.py [--model mobilenetv2-224|resnet18-224|path/model.py]
                                           [--threads 1] [--top 25] [--number 20 --repeat 5]
                                           [--bandwidth] [--cold] [--chain] [--show NAME]

The module is prepared as ``legoc.targets.build.build_module(prepack=True)`` prepares it (weights
packed at build time) and run through legoc's CPU scheduling passes; each resulting PrimFunc is
then built alone for the host and timed with TVM's time evaluator on random buffers of its own
shapes (median of ``--repeat`` repeats of ``--number`` calls). The sum over kernels, each counted
as often as ``main`` calls it, approximates the module's latency without the VM's own cost.

Memory bound (``--bandwidth``): the bytes of every argument (inputs, weights, output: each read
or written at least once) over one thread's measured copy bandwidth (``benchmarks/peak.py``);
the "x bound" column is a kernel's time over that bound, for memory-bound kernels (depthwise).

In the model (``--chain``): the whole module also runs end to end, its VM instrumented, and each
kernel's median time per call there (inputs as the previous kernel left them, weights as the
last inference left them: the caches of a real run) is printed beside its time alone, with the
module's end-to-end time. The instrument's own cost (a Python call before and after each
kernel, a few microseconds) is inside the in-model figures.

FLOPs: 2 x the multiply-adds of a kernel's reduction (output elements x reduction extent, read
from the PrimFunc's loop nest), so elementwise kernels count 0. ``TVM_NUM_THREADS`` is set from
``--threads`` before TVM starts.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _model_file(name: str, work: Path) -> Path:
    if name.endswith(".py"):
        return Path(name)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from inference import ZOO_SOURCE  # noqa: PLC0415 - benchmarks/inference.py's zoo models

    arch, size = name.rsplit("-", 1)
    path = work / f"{arch}_{size}.py"
    path.write_text(ZOO_SOURCE.format(arch=arch, size=int(size), zoo=str(ROOT / "tests" / "zoo.py")))
    return path


def _calls(main) -> dict:
    """The PrimFuncs ``main`` calls (``call_tir``), each with its argument shapes and dtypes
    (inputs, then the output) and how often it is called."""
    from tvm import relax  # noqa: PLC0415

    calls: dict = {}

    def visit(expr):
        if isinstance(expr, relax.Call) and getattr(expr.op, "name", "") == "relax.call_tir":
            types = [a.ty for a in expr.args[1].fields] + list(expr.ty_args)
            if all(hasattr(t, "shape") and t.shape is not None for t in types):
                try:
                    args = tuple((tuple(int(d) for d in t.shape), str(t.dtype)) for t in types)
                except TypeError:   # a symbolic dimension: not timed
                    return
                name = expr.args[0].name_hint
                n = calls.get(name, (args, 0))[1]
                calls[name] = (args, n + 1)

    relax.analysis.post_order_visit(main.body, visit)
    return calls


def _macs(func) -> int:
    """Multiply-adds of the (unscheduled) PrimFunc's largest reduction block: the product of its
    iterators' extents, spatial and reduction."""
    from tvm import s_tir  # noqa: PLC0415
    from tvm.s_tir.dlight.analysis import get_root_block  # noqa: PLC0415

    sch = s_tir.Schedule(func)
    best = 0
    for block in sch.get_child_blocks(get_root_block(sch)):
        iters = sch.get(block).iter_vars
        if any(iv.iter_type == iv.CommReduce for iv in iters):
            n = 1
            for iv in iters:
                n *= int(iv.dom.extent)
            best = max(best, n)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mobilenetv2-224")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--number", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--bandwidth", action="store_true", help="add each kernel's time over its memory-bandwidth bound")
    ap.add_argument("--cold", action="store_true", help="flush the CPU caches before every call (all arguments but the first)")
    ap.add_argument("--chain", action="store_true", help="also time every kernel inside the whole module's run")
    ap.add_argument("--show", metavar="NAME", help="print the scheduled TIR of every kernel whose name contains NAME")
    args = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)

    import numpy as np
    import torch
    import tvm
    from tvm import relax, s_tir, tirx
    from tvm.relax.frontend.torch import from_exported_program

    from legoc.modelfile import load_model_file
    from legoc.passes.fold import fold_batchnorm
    from legoc.targets.schedules import RULE_ATTR, ApplyCPUSchedules, cpu_pass_context, prepack_weights, scheduling_passes
    from legoc.targets.table import TARGETS

    torch.set_num_threads(args.threads)
    target = TARGETS["host"].tvm_target()
    with tempfile.TemporaryDirectory() as work:
        spec = load_model_file(_model_file(args.model, Path(work)))
    inputs = tuple(spec.example_inputs)
    with torch.no_grad():
        exported = torch.export.export(fold_batchnorm(spec.model.eval()), inputs)
    mod = from_exported_program(exported, keep_params_as_input=True, unwrap_unit_return_tuple=True)
    mod, _ = relax.frontend.detach_params(mod)
    mod = prepack_weights(mod, target)
    with target:
        mod = tvm.transform.Sequential(scheduling_passes(target, rules=[]))(mod)   # fused, plain
        macs = {gv.name_hint: _macs(f) for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}
        mod = ApplyCPUSchedules()(mod)
    calls = _calls(mod["main"])
    gbps = None
    if args.bandwidth:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from peak import copy_bandwidth  # noqa: PLC0415

        gbps = copy_bandwidth()[0]
        print(f"memory bound: one thread copies {gbps:.1f} GB/s (best of 20 copies of 64 MB)")
    dev = tvm.cpu()
    rng = np.random.default_rng(0)
    rows = []
    for gv, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc) or gv.name_hint not in calls:
            continue
        args_spec, n_calls = calls[gv.name_hint]
        if args.show and args.show in gv.name_hint:
            print(func.script())
        with cpu_pass_context():  # as legoc builds (targets/build.py)
            lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
        arrays = [tvm.runtime.tensor(rng.standard_normal(shape).astype(dtype), dev) for shape, dtype in args_spec]
        timer = lib.jit().time_evaluator("main", dev, number=1 if args.cold else args.number,
                                         repeat=args.repeat * (args.number if args.cold else 1),
                                         f_preproc="cache_flush_cpu_non_first_arg" if args.cold else "")
        ms = float(np.median(timer(*arrays).results)) * 1e3
        rule = str(func.attrs[RULE_ATTR]) if func.attrs and RULE_ATTR in func.attrs else "-"
        nbytes = sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in args_spec)
        rows.append((ms * n_calls, ms, n_calls, gv.name_hint, rule, macs.get(gv.name_hint, 0),
                     [list(shape) for shape, _ in args_spec], nbytes))
    rows.sort(reverse=True)
    chain, end_to_end = _in_chain(mod, target, args.repeat * args.number) if args.chain else ({}, None)
    total = sum(r[0] for r in rows)
    total_macs = sum(r[5] * r[2] for r in rows)
    print(f"{args.model}: {len(rows)} kernels, {total:.3f} ms summed ({args.threads} thread(s)), "
          f"{total_macs / 1e6:.1f} M MACs in reductions, {2 * total_macs / total / 1e6:.1f} GFLOP/s overall")
    if chain:
        in_model = sum(chain.get(r[3], 0.0) * r[2] for r in rows)
        print(f"in the model: {in_model:.3f} ms summed over the same kernels; the module end to end "
              f"{end_to_end:.3f} ms (median, instrumented)")
    bound_head = f" {'x bound':>7}" if gbps else ""
    chain_head = f" {'in model':>8}" if chain else ""
    print(f"{'ms total':>9} {'ms':>8}{chain_head} {'×':>2} {'share':>6} {'GFLOP/s':>8}{bound_head}  {'rule':<22} kernel (buffer shapes)")
    for tot, ms, n, name, rule, macs, shapes, nbytes in rows[:args.top]:
        gflops = f"{2 * macs / ms / 1e6:8.1f}" if macs else " " * 8
        bound = f" {ms / (nbytes / gbps / 1e6):7.2f}" if gbps else ""
        in_chain = f" {chain.get(name, float('nan')):8.3f}" if chain else ""
        print(f"{tot:9.3f} {ms:8.3f}{in_chain} {n:2d} {tot / total:6.1%} {gflops}{bound}  {rule:<22} {name} {shapes}")


def _in_chain(mod, target, calls: int) -> tuple[dict, float]:
    """Run the scheduled module end to end on random inputs and weights ``calls`` times with its
    VM instrumented: (kernel -> median ms per call inside the run, median end-to-end ms)."""
    import statistics  # noqa: PLC0415
    import time  # noqa: PLC0415

    import numpy as np  # noqa: PLC0415
    import tvm  # noqa: PLC0415
    from tvm import relax  # noqa: PLC0415

    from legoc.targets.schedules import cpu_pass_context, lowering_passes  # noqa: PLC0415

    with cpu_pass_context():
        executable = tvm.compile(mod, target=target, relax_pipeline=tvm.transform.Sequential(lowering_passes(target)))
    dev = tvm.cpu()
    vm = relax.VirtualMachine(executable, dev)
    rng = np.random.default_rng(1)
    args = [tvm.runtime.tensor(rng.standard_normal([int(d) for d in p.ty.shape]).astype(str(p.ty.dtype)), dev)
            for p in mod["main"].params]
    per_call: dict[str, list[float]] = {}
    started: dict[str, float] = {}

    def instrument(_func, symbol, before, _ret, *_args):
        if before:
            started[symbol] = time.perf_counter()
        else:
            per_call.setdefault(symbol, []).append((time.perf_counter() - started[symbol]) * 1e3)
        return 0

    for _ in range(5):
        vm["main"](*args)
    vm.set_instrument(instrument)
    runs = []
    for _ in range(calls):
        t0 = time.perf_counter()
        vm["main"](*args)
        runs.append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(times) for name, times in per_call.items()}, statistics.median(runs)


if __name__ == "__main__":
    main()
