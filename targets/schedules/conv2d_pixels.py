"""Conv2dPixels: a conv2d with few output channels, as a register-blocked micro-kernel over vectors
of output pixels (:class:`~legoc.targets.schedules.PixelVectorConv` makes its PrimFunc)."""
from __future__ import annotations

from tvm import s_tir
from tvm.target import Target

from legoc.targets.schedules.analysis import extent, reduction_named
from legoc.targets.schedules.base import CPURule
from legoc.targets.schedules.common_schedules import pixel_vector_tile, schedule_pad, schedule_spatial
from legoc.targets.schedules.isa import pixel_tile, vector_lanes, vector_registers
from legoc.targets.schedules.pixel_conv import PIXELS_CONV


class Conv2dPixels(CPURule):
    """``conv2d_nchw_pixels`` (n, f, p, rc, ry, rx) over the flattened padded input (+ the copy
    to NCHW and the fused epilogue).

    A tile of ``FC`` output channels times ``XV`` vectors of consecutive positions
    (:func:`~legoc.targets.schedules.isa.pixel_tile`): per reduction step (input channel, tap)
    ``XV`` unaligned vector loads of the flattened input, shifted by the tap, and ``FC``
    broadcast weights. The input pad (``pad_temp``) is stored as one flat row per channel and
    runs as rows and columns, its border partitioned from its interior; the copy to NCHW,
    which drops the padded columns, runs after the conv with the epilogue inlined into it."""

    def schedule(self, sch: s_tir.Schedule, target: Target) -> bool:
        parts = reduction_named(sch, PIXELS_CONV, "SSSRRR")
        if parts is None:
            return False
        prologue, conv, epilogue = parts
        _n, f, p, *_reduction = sch.get_loops(conv)
        lanes, regs = vector_lanes(target), vector_registers(target)
        fc, xv = pixel_tile(extent(sch, f), lanes, regs)
        if extent(sch, p) % (xv * lanes):
            return False
        left = pixel_vector_tile(sch, conv, epilogue, fc, xv, lanes)
        for block in prologue:
            _store_flat(sch, block)
            schedule_pad(sch, block, lanes)
        for block in left:
            schedule_spatial(sch, block, lanes)
        return True


def _store_flat(sch: s_tir.Schedule, block) -> None:
    """Store the pad's output ``[N, C, R, Wp]`` as ``[N, C, R * Wp]``: the conv's reads
    ``pad_temp[n, c, q // Wp, q % Wp]`` become ``pad_temp[n, c, q]``, contiguous in ``q``."""
    shape = [int(d) for d in sch.get(block).writes[0].source.shape]
    if len(shape) != 4:
        return
    width = shape[3]
    sch.transform_layout(block, ("write", 0), lambda n, c, h, w: (n, c, h * width + w))
