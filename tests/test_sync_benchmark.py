"""benchmarks/sync.py: its three forms of a chain of kernels compute the same thing, and only the
``region`` form shares one parallel launch through barriers (no timing here)."""
from __future__ import annotations


def _llvm_source(exe) -> str:
    mod = exe.mod
    libs = mod.imports if hasattr(mod, "imports") else mod.imported_modules
    return libs[0].inspect_source("ll")


def test_the_three_forms_agree_and_only_region_uses_barriers(load_benchmark):
    import tvm
    from tvm import relax

    sync = load_benchmark("sync")
    exes = sync.compile_forms(kernels=4, width=5)   # 5: not a vector width, a loop tail
    vms = {form: relax.VirtualMachine(exe, tvm.cpu()) for form, exe in exes.items()}
    sync.check(vms, kernels=4, width=5)   # each against numpy
    launches, barriers = {}, {}
    for form, exe in exes.items():
        src = _llvm_source(exe)
        # each launch or barrier loads the runtime's function pointer
        launches[form] = src.count("load ptr, ptr @__TVMBackendParallelLaunch")
        barriers[form] = src.count("load ptr, ptr @__TVMBackendParallelBarrier")
    assert launches == {"calls": 1, "loops": 4, "region": 1}   # calls: one PrimFunc, called 4 times
    assert barriers["calls"] == barriers["loops"] == 0 and barriers["region"] >= 3


def test_kernels_below_two_are_refused(load_benchmark, capsys):
    import pytest

    sync = load_benchmark("sync")
    with pytest.raises(SystemExit):
        sync.main(["--kernels", "1"])
    assert "--kernels must be at least 2" in capsys.readouterr().err
