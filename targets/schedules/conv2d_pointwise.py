"""Conv2dPointwise: a 1x1 stride-1 NCHW conv2d as a GEMM over the flattened output plane."""
from __future__ import annotations

from tvm import s_tir, tirx
from tvm.sym import Analyzer
from tvm.target import Target

from legoc.targets.schedules.analysis import extent
from legoc.targets.schedules.base import CPURule
from legoc.targets.schedules.common_schedules import conv2d_parts, pixel_vector_tile, schedule_spatial
from legoc.targets.schedules.isa import pointwise_tile, vector_lanes, vector_registers


class Conv2dPointwise(CPURule):
    """groups=1 NCHW 1x1 stride-1 conv2d (+ fused epilogue) whose output plane splits into whole
    vectors: :func:`~legoc.targets.schedules.isa.pointwise_tile` says when.

    NCHW keeps each channel's plane contiguous, so the conv is ``W[F, C] x X[C, H*W]``: a tile of
    ``FC`` output channels times ``XV`` vectors of output pixels, per input channel ``XV`` vector
    loads and ``FC`` broadcast weights, and a write-back (epilogue included) of plain vector
    stores. :class:`~legoc.targets.schedules.Conv2dNCHWPacked` holds channels in its registers
    and has to transpose on the way out, which costs as much as its FMAs when the reduction is
    short (16-32 input channels: MobileNetV2's early expansions). Rows and columns are fused
    into one axis, so 28- and 56-wide planes still split into whole 16-lane vectors. Weights
    are read as they are (OIHW, or packed ``[O/B, I, 1, 1, B]``); the Relax rewrites neither pad
    nor pack the convs this rule takes (:func:`~legoc.targets.schedules.isa.pointwise_tile`)."""

    def schedule(self, sch: s_tir.Schedule, target: Target) -> bool:
        parts = conv2d_parts(sch)   # a zero-wide pad is inlined: the input is read in place
        if parts is None:
            return False
        prologue, conv, epilogue = parts
        if prologue or not is_pointwise(sch.get(conv)):
            return False
        n, f, y, x, _rc, _ry, _rx = sch.get_loops(conv)
        n_f, n_x = extent(sch, f), extent(sch, x)
        lanes = vector_lanes(target)
        tile = pointwise_tile(n_f, extent(sch, y) * n_x, lanes, vector_registers(target))
        if tile is None:
            return False
        fc, xv = tile

        def flat(b, c, h, w):
            return (b, c, h * n_x + w)

        sch.transform_block_layout(conv, lambda b, c, h, w, rc, ry, rx: (b, c, h * n_x + w, rc, ry, rx))
        left = pixel_vector_tile(sch, conv, epilogue, fc, xv, lanes, layout=flat)
        for block in left:
            schedule_spatial(sch, block, lanes)
        return True


def is_pointwise(stmt) -> bool:
    """A conv block (n, f, y, x, rc, ry, rx) with a one-tap kernel that reads its input at
    [n, rc, y, x]: 1x1, stride 1, no padding."""
    v_n, _v_f, v_y, v_x, v_rc, v_ry, v_rx = stmt.iter_vars
    if any(not isinstance(iv.dom.extent, tirx.IntImm) or int(iv.dom.extent) != 1
           for iv in (v_ry, v_rx)):
        return False
    analyzer = Analyzer()
    for iv in (v_ry, v_rx):
        analyzer.bind(iv.var, iv.dom.min)
    return any(
        len(region.region) == 4 and all(analyzer.can_prove_equal(r.min, v.var) for r, v in
                                        zip(region.region, (v_n, v_rc, v_y, v_x)))
        for region in stmt.reads)
