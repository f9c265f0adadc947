"""The base of legoc's CPU rules (dlight's ``ScheduleRule``)."""
from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir import dlight
from tvm.target import Target

from legoc.targets.schedules.analysis import float32_only


class CPURule(dlight.ScheduleRule):
    """A CPU rule: ``schedule`` mutates a fresh Schedule of a float32 PrimFunc for an llvm target
    and says whether it applied; ``apply`` returns that Schedule, or None."""

    def apply(self, func, target: Target, tunable: bool):  # noqa: ARG002 - dlight's signature
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        sch = s_tir.Schedule(func)
        if not float32_only(sch):
            return None
        return sch if self.schedule(sch, target) else None

    def schedule(self, sch: s_tir.Schedule, target: Target) -> bool:
        raise NotImplementedError
