"""legoc: compile a PyTorch CNN into swappable blocks of pruned variants (LegoDNN as a compiler).

This package is imported by the on-device runtime too (``legoc.runtime``), so it must not import
torch, tvm's compiler or any heavy module at import time.
"""
__version__ = "0.1.0"

import os as _os


def _physical_cores() -> int:
    """CPUs this process may use, counting a core's hardware threads once."""
    try:
        cpus = len(_os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = _os.cpu_count() or 1
    try:
        with open("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list") as f:
            text = f.read().strip()
        siblings = sum(int(b) - int(a) + 1 if "-" in part else 1
                       for part in text.split(",") for a, _, b in [part.partition("-")])
    except (OSError, ValueError):
        siblings = 1
    return max(1, cpus // max(1, siblings))


# TVM sizes its CPU thread pool once, when it first starts, from TVM_NUM_THREADS, else
# OMP_NUM_THREADS, else half the logical CPUs on x86 (it assumes two hardware threads per core):
# on a machine without hyperthreading every compiled module would then run on half the cores.
# Unless the user chose, use every physical core; legoc.runtime.set_num_threads lowers it later.
if "TVM_NUM_THREADS" not in _os.environ and "OMP_NUM_THREADS" not in _os.environ:
    _os.environ["TVM_NUM_THREADS"] = str(_physical_cores())
