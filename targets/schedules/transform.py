"""ApplyCPUSchedules: the pass that schedules every PrimFunc with the first CPU rule that applies."""
from __future__ import annotations

import os

import tvm
from tvm import tirx
from tvm.s_tir import dlight
from tvm.target import Target

from legoc.targets.schedules.conv2d_blocked import Conv2dBlocked
from legoc.targets.schedules.conv2d_packed import Conv2dNCHWPacked
from legoc.targets.schedules.conv2d_pixels import Conv2dPixels
from legoc.targets.schedules.conv2d_pointwise import Conv2dPointwise
from legoc.targets.schedules.conv2d_winograd import Conv2dWinograd
from legoc.targets.schedules.depthwise import DepthwiseConv2d
from legoc.targets.schedules.depthwise_blocked import DepthwiseBlocked
from legoc.targets.schedules.fallback import Fallback
from legoc.targets.schedules.injective import Injective
from legoc.targets.schedules.pool2d import Pool2d
from legoc.targets.schedules.pool2d_rows import MaxPool2dRows
from legoc.targets.schedules.reduction import ReductionVectorized

RULE_ATTR = "legoc.schedule_rule"  # PrimFunc attribute naming the rule that scheduled it


def default_rules() -> list[dlight.ScheduleRule]:
    """The CPU rules in the order they are tried."""
    return [Conv2dWinograd(), Conv2dBlocked(), DepthwiseBlocked(), Conv2dPixels(), Conv2dPointwise(), Conv2dNCHWPacked(), DepthwiseConv2d(), MaxPool2dRows(), Pool2d(), ReductionVectorized(), Injective(), Fallback()]


@tvm.transform.module_pass(opt_level=0, name="LegocApplyCPUSchedules")
class ApplyCPUSchedules:
    """Schedule every unscheduled PrimFunc with the first rule that applies (dlight's
    ``ApplyDefaultSchedule``, plus: a rule that raises counts as not applying, and the winning
    rule's name is kept in the PrimFunc attribute ``legoc.schedule_rule``).

    ``strict=True`` (or ``LEGOC_SCHEDULE_STRICT=1``) re-raises a rule's error instead (tests).
    """

    def __init__(self, rules: list | None = None, *, strict: bool | None = None):
        self.rules = list(rules) if rules is not None else default_rules()
        self.strict = strict if strict is not None else os.environ.get(
            "LEGOC_SCHEDULE_STRICT", "") not in ("", "0")

    def transform_module(self, mod: tvm.ir.IRModule, _ctx) -> tvm.ir.IRModule:
        updates = {}
        for gvar, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or _is_scheduled(func):
                continue
            target = func.attrs.get("target") if func.attrs is not None else None
            target = target or Target.current(allow_none=False)
            for rule in self.rules:
                try:
                    sch = rule.apply(func, target, False)
                except Exception:  # noqa: BLE001 - a failing rule must never break a build
                    if self.strict:
                        raise
                    sch = None
                if sch is not None:
                    updates[gvar] = sch.mod["main"].with_attrs(
                        {"tirx.is_scheduled": True, RULE_ATTR: type(rule).__name__}
                    )
                    break
        for gvar, func in updates.items():
            mod[gvar] = func
        return mod


def _is_scheduled(func: tirx.PrimFunc) -> bool:
    attrs = func.attrs
    return attrs is not None and "tirx.is_scheduled" in attrs and bool(attrs["tirx.is_scheduled"])


def scheduled_by(mod: tvm.ir.IRModule) -> dict[str, str]:
    """PrimFunc name -> the rule that scheduled it ("" if none did), for a scheduled module."""
    out = {}
    for gvar, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc):
            attrs = func.attrs
            out[gvar.name_hint] = str(attrs[RULE_ATTR]) if attrs is not None and RULE_ATTR in attrs else ""
    return out
