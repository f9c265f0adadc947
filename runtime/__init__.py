"""legoc.runtime: load a legoc artifact and run it, choosing one variant per block.

Runs on the device: imports numpy, safetensors and the TVM runtime only (never torch, never
legoc.passes).
"""
from legoc.runtime.model import Model, load, set_num_threads

__all__ = ["Model", "load", "set_num_threads"]
