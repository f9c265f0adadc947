"""legoc.runtime: load a legoc artifact and run it, choosing one variant per block by hand or by
budget (CP-SAT), for one model or several sharing a device.

Runs on the device: imports numpy, safetensors, OR-Tools (when selecting) and the TVM runtime
only (never torch, never legoc.passes).
"""
from legoc.runtime.model import Model, load, set_num_threads
from legoc.runtime.scheduler import Scheduler
from legoc.runtime.solver import Budget, Selection

__all__ = ["Budget", "Model", "Scheduler", "Selection", "load", "set_num_threads"]
