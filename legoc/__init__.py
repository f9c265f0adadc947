"""legoc: compile a PyTorch CNN into swappable blocks of pruned variants (LegoDNN as a compiler).

This package is imported by the on-device runtime too (``legoc.runtime``), so it must not import
torch, tvm's compiler or any heavy module at import time.
"""
__version__ = "0.1.0"
