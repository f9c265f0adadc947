"""Fallback: any other PrimFunc gets its outer data-parallel loops run in parallel, nothing more."""
from __future__ import annotations

from tvm import s_tir
from tvm.target import Target

from legoc.targets.schedules.analysis import extent, is_plain, iter_kinds, root_blocks
from legoc.targets.schedules.base import CPURule


class Fallback(CPURule):
    """Anything else: the outermost data-parallel loop of each root block runs in parallel."""

    def schedule(self, sch: s_tir.Schedule, target: Target) -> bool:  # noqa: ARG002
        changed = False
        for block in root_blocks(sch):
            loops = sch.get_loops(block)
            if not loops or iter_kinds(sch, block)[:1] != "S" or not is_plain(sch, block):
                continue
            if extent(sch, loops[0]) > 1:
                try:
                    sch.parallel(loops[0])
                    changed = True
                except (RuntimeError, ValueError):
                    continue
        return changed
