"""legoc.targets: the device table (:mod:`legoc.targets.table`) and per-target compilation
(:mod:`legoc.targets.build`, which imports torch and tvm; import it explicitly).

Importing this package stays light: no torch, no tvm.
"""
from legoc.targets.table import TARGETS, TargetSpec, get_target, list_targets

__all__ = ["TARGETS", "TargetSpec", "get_target", "list_targets"]
