"""Conv2dBlocked: the 1x1 convs at either end of a channel-blocked inverted residual
(:mod:`~legoc.targets.schedules.block_layout`)."""
from __future__ import annotations

from tvm import s_tir
from tvm.target import Target

from legoc.targets.schedules.analysis import extent, largest_divisor, reduction_named
from legoc.targets.schedules.base import CPURule
from legoc.targets.schedules.block_layout import EXPAND, PROJECT
from legoc.targets.schedules.common_schedules import (accumulator_cache, flatten_plane, inline_epilogue,
                                                      parallel_fused, rows_first, schedule_spatial,
                                                      tile_order)
from legoc.targets.schedules.isa import acc_vectors, vector_isa


class Conv2dBlocked(CPURule):
    """The expansion (NCHW in, NCHW[B]c out: loops n, co, y, x, ci, rc) and the projection
    (NCHW[B]c in, NCHW out: n, f, y, x, rb, ri) of a blocked inverted residual, with their fused
    epilogues. Both are the packed conv's micro-kernel: ``FB`` vectors of output channels times
    ``XB`` output columns of accumulators, one broadcast input scalar per column and reduction
    step. The expansion's accumulators are its output blocks, so the write-back is whole-vector
    stores; the projection's go back to NCHW through a pixel-major tile, as in
    :class:`~legoc.targets.schedules.Conv2dNCHWPacked`."""

    def schedule(self, sch: s_tir.Schedule, target: Target) -> bool:
        lanes, regs = vector_isa(target)
        parts = reduction_named(sch, EXPAND, "SSSSSR")
        if parts is not None:
            return _expand(sch, parts, lanes, regs)
        parts = reduction_named(sch, PROJECT, "SSSSRR")
        if parts is not None:
            return _project(sch, parts, lanes, regs)
        return False


def blocked_tile(blocks: int, n_x: int, acc: int, regs: int) -> tuple[int, int]:
    """(channel vectors FB, columns XB) of the blocked convs' register tile: the most FMAs per
    load (each reduction step loads FB weight vectors and broadcasts XB inputs for FB x XB
    FMAs), FB dividing the output channel blocks and XB the row; at most ``acc``
    accumulators, and they, the FB weight vectors and a broadcast within ``regs`` registers
    (AVX2 has no embedded broadcast: more spill); XB of at least 2 where the row allows, since
    at XB = 1 every pixel streams the whole weight. (Measurements: commit 063c275, README.)"""
    min_x = 2 if largest_divisor(n_x, acc) >= 2 else 1
    best, key = (1, largest_divisor(n_x, acc)), None
    for fb in range(1, min(blocks, acc) + 1):
        if blocks % fb:
            continue
        xb = largest_divisor(n_x, acc // fb)
        while xb >= min_x and fb * xb + fb + 1 > regs:
            xb = largest_divisor(n_x, xb - 1) if xb > 1 else 0
        if xb < min_x:
            continue
        k = (fb * xb / (fb + xb), xb)
        if key is None or k > key:
            best, key = (fb, xb), k
    return best


def flat_tile(blocks: int, n_x: int, n_y: int, acc: int, regs: int) -> tuple[int, int] | None:
    """(2, XB) over the flattened plane (the last tile shorter) where :func:`blocked_tile` finds
    only one channel vector per tile in a row (AVX2 on 7-wide maps: 1 x 7); else None. XB is
    as large as the accumulators and registers allow (measurements: aace0a0, README)."""
    fb, xb = blocked_tile(blocks, n_x, acc, regs)
    if fb > 1 or blocks % 2:
        return None
    flat = min(acc // 2, (regs - 3) // 2, n_y * n_x)
    return (2, flat) if 2 * flat > fb * xb else None


def _expand(sch: s_tir.Schedule, parts, lanes: int, regs: int) -> bool:
    prologue, conv, epilogue = parts
    if prologue:
        return False
    n, co, y, x, ci, rc = sch.get_loops(conv)
    block, n_y, n_x = extent(sch, ci), extent(sch, y), extent(sch, x)
    if block != lanes:
        return False
    acc = acc_vectors(lanes, regs)
    flat = flat_tile(extent(sch, co), n_x, n_y, acc, regs)
    if flat:  # (y, x) -> y * W + x: tiles run across row ends
        fb, xb = flat
        flatten_plane(sch, conv, 2, n_x)
        n, co, x, ci, rc = sch.get_loops(conv)
    else:
        fb, xb = blocked_tile(extent(sch, co), n_x, acc, regs)
    # a 1x1 conv: input and weights per input channel are pixels and filters
    by_rows = rows_first(n_y * n_x, extent(sch, co) * block)
    coo, coi = sch.split(co, [None, fb])
    xo, xi = sch.split(x, [None, xb])
    outer = tile_order(n, coo, y, xo, flat=flat, rows_first=by_rows)
    sch.reorder(*outer, rc, xi, coi, ci)
    acc_out = accumulator_cache(sch, conv)
    if flat:
        sch.transform_layout(conv, ("write", 0), lambda b, c, h, w, l_: (b, c, h * n_x + w, l_))
    left = inline_epilogue(sch, acc_out, epilogue)
    if flat:
        flatten_plane(sch, acc_out, 2, n_x)
    sch.reverse_compute_at(acc_out, outer[-1], preserve_unit_loops=True)
    sch.vectorize(ci)
    sch.unroll(coi)
    sch.unroll(xi)
    parallel_fused(sch, outer if flat else outer[:-1], 1 << 30)
    sch.decompose_reduction(conv, rc)  # last: the init copies the annotated loops
    sch.vectorize(sch.get_loops(acc_out)[-1])
    for blk in left:
        schedule_spatial(sch, blk, lanes)
    return True


def _project(sch: s_tir.Schedule, parts, lanes: int, regs: int) -> bool:
    prologue, conv, epilogue = parts
    if prologue:
        return False
    stmt = sch.get(conv)
    out = stmt.writes[0].source
    # the weight [F/L, CB, B, L]: the reduction's other reads are the blocked input (5-D) and its own output
    weight = next((r.source for r in stmt.reads if len(r.source.shape) == 4 and not r.source.same_as(out)), None)
    if weight is None:
        return False
    block = int(weight.shape[3])   # the weight's output channel block: the vector width used
    n, f, y, x, rb, ri = sch.get_loops(conv)
    n_f, n_y, n_x = extent(sch, f), extent(sch, y), extent(sch, x)
    if n_f % block or block > lanes:
        return False
    acc = acc_vectors(lanes, regs)
    flat = flat_tile(n_f // block, n_x, n_y, acc, regs)
    if flat:  # (y, x) -> y * W + x: tiles run across row ends
        fb, xb = flat
        flatten_plane(sch, conv, 2, n_x)
        n, f, x, rb, ri = sch.get_loops(conv)
    else:
        fb, xb = blocked_tile(n_f // block, n_x, acc, regs)
    fo, fi = sch.split(f, [None, fb * block])
    fio, fii = sch.split(fi, [fb, block])
    xo, xi = sch.split(x, [None, xb])
    outer = tile_order(n, fo, y, xo, flat=flat, rows_first=rows_first(n_y * n_x, n_f))
    sch.reorder(*outer, rb, ri, xi, fio, fii)
    acc_out = accumulator_cache(sch, conv)
    # channels innermost in the accumulator tile, so each channel vector is one register
    if flat:
        sch.transform_layout(conv, ("write", 0), lambda b, c, h, w: (b, h * n_x + w, c))
    else:
        sch.transform_layout(conv, ("write", 0), lambda b, c, h, w: (b, h, w, c))
    left = inline_epilogue(sch, acc_out, epilogue)
    if flat:
        flatten_plane(sch, acc_out, 2, n_x)
    sch.reverse_compute_at(acc_out, outer[-1], preserve_unit_loops=True)
    sch.vectorize(fii)
    sch.unroll(fio)
    sch.unroll(xi)
    parallel_fused(sch, outer if flat else outer[:-1], 1 << 30)
    sch.decompose_reduction(conv, rb)
    if xb >= 4 and not flat:  # a row's XB columns are contiguous in the NCHW output
        sch.vectorize(sch.get_loops(acc_out)[-1])
    for blk in left:
        schedule_spatial(sch, blk, lanes)
    return True
