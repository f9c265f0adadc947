"""Injective: PrimFuncs of spatial blocks only (elementwise, broadcast, pad, reshape, transpose)."""
from __future__ import annotations

from tvm import s_tir
from tvm.target import Target

from legoc.targets.schedules.analysis import iter_kinds, root_blocks
from legoc.targets.schedules.base import CPURule
from legoc.targets.schedules.common_schedules import schedule_spatial
from legoc.targets.schedules.isa import vector_lanes


class Injective(CPURule):
    """Spatial blocks only: each block fused, vectorized inside, parallel outside."""

    def schedule(self, sch: s_tir.Schedule, target: Target) -> bool:
        blocks = root_blocks(sch)
        if not blocks or any(set(iter_kinds(sch, b)) - {"S"} for b in blocks):
            return False
        lanes = vector_lanes(target)
        for block in blocks:
            schedule_spatial(sch, block, lanes)
        return True
