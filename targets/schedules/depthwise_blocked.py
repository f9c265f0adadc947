"""DepthwiseBlocked: a depthwise conv over channel-blocked activations (NCHW[B]c)."""
from __future__ import annotations

from tvm import s_tir
from tvm.target import Target

from legoc.targets.schedules.analysis import extent, largest_divisor, reduction_named
from legoc.targets.schedules.base import CPURule
from legoc.targets.schedules.block_layout import DEPTHWISE
from legoc.targets.schedules.common_schedules import (accumulator_cache, inline_epilogue, rows_first, schedule_spatial,
                                                      tile_order)
from legoc.targets.schedules.isa import acc_vectors, vector_isa


class DepthwiseBlocked(CPURule):
    """The depthwise conv of a blocked inverted residual
    (:mod:`~legoc.targets.schedules.block_layout`; loops n, c, y, x, ci, ry, rx) with its fused
    bias and activation. ``XB`` output pixels of one row of one channel block are accumulated in
    registers, one vector each; per kernel tap one weight vector and one whole-vector input load
    per pixel, at any stride. The pad is inlined: its condition depends on the pixel alone, so a
    tap in the padding skips a whole vector (a branch, not a per-lane select), and no padded copy
    of the input is written. (Blocks, row) pairs run in parallel, rows outermost where the
    expansion before it runs rows first."""

    def schedule(self, sch: s_tir.Schedule, target: Target) -> bool:
        parts = reduction_named(sch, DEPTHWISE, "SSSSSRR")
        if parts is None:
            return False
        prologue, conv, epilogue = parts
        lanes, regs = vector_isa(target)
        for block in prologue:   # the pad: read in place
            sch.compute_inline(block)
        n, c, y, x, ci, ry, rx = sch.get_loops(conv)
        if extent(sch, ci) != lanes:
            return False
        # rows outside channel blocks where the expansion that feeds this conv runs rows first
        # (its criterion: its plane has more pixels than it has output channels), so that each
        # thread reads the rows it wrote on its own core
        data = next((r.source for r in sch.get(conv).reads if len(r.source.shape) == 5), None)
        by_rows = data is not None and rows_first(int(data.shape[2]) * int(data.shape[3]),
                                                  extent(sch, c) * lanes)
        # accumulators plus the weight vector and an input vector or two in registers
        xb = largest_divisor(extent(sch, x), acc_vectors(lanes, regs) - 2)
        xo, xi = sch.split(x, [None, xb])
        outer = tile_order(n, c, y, xo, flat=False, rows_first=by_rows)
        sch.reorder(*outer, ry, rx, xi, ci)
        acc_out = accumulator_cache(sch, conv)
        left = inline_epilogue(sch, acc_out, epilogue)
        sch.reverse_compute_at(acc_out, xo, preserve_unit_loops=True)
        sch.vectorize(ci)
        sch.unroll(xi)
        sch.unroll(ry)
        sch.unroll(rx)
        sch.parallel(sch.fuse(*outer[:-1]))
        sch.decompose_reduction(conv, ry)
        sch.vectorize(sch.get_loops(acc_out)[-1])
        for block in left:
            schedule_spatial(sch, block, lanes)
        return True
