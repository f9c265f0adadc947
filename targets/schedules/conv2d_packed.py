"""Conv2dNCHWPacked: a groups=1 NCHW conv2d as a register-blocked micro-kernel over packed weights."""
from __future__ import annotations

from tvm import s_tir, tirx
from tvm.target import Target

from legoc.targets.schedules.analysis import extent, is_block_split, largest_divisor, product, same_domain
from legoc.targets.schedules.base import CPURule
from legoc.targets.schedules.common_schedules import (accumulator_cache, conv2d_parts, flatten_plane,
                                                      inline_epilogue, parallel_fused, rows_first,
                                                      schedule_pad, schedule_spatial, tile_order)
from legoc.targets.schedules.isa import acc_vectors, register_tile, vector_lanes, vector_registers


# a channel block's weights above this many floats are read in chunks of CHUNK_CHANNELS input
# channels (16 x 3 x 3 x 32 floats: 18 KB, within L1)
CHUNK_WEIGHTS = 128 * 1024
CHUNK_CHANNELS = 16


class Conv2dNCHWPacked(CPURule):
    """groups=1 NCHW conv2d (+ fused epilogue: bias, residual add, ReLU, ...).

    A micro-kernel of ``FB`` vectors of ``L`` output channels times ``XB`` output columns (or
    ``XB`` pixels of the flattened plane: :func:`~legoc.targets.schedules.isa.register_tile`) of
    accumulators; per reduction step one vector load of packed weights per channel vector and
    one broadcast input scalar per column. Weights not packed at build time
    (:class:`~legoc.targets.schedules.PackConvWeights`) are packed ``[O/B, I, KH, KW, B]`` at the
    start of the PrimFunc; the input pad is partitioned into its zero border and the copied
    interior (:func:`~legoc.targets.schedules.common_schedules.partition_pad`); the epilogue is inlined into the accumulator write-back;
    (batch, channel block, row) run in parallel (flat: (batch, channel block, tile)), rows
    outermost when the input outweighs the weights; a channel block with more weights than
    :data:`CHUNK_WEIGHTS` runs its reduction in chunks of input channels over its whole plane."""

    def schedule(self, sch: s_tir.Schedule, target: Target) -> bool:
        parts = conv2d_parts(sch)   # a zero-wide pad is inlined: the input is read in place
        if parts is None:
            return False
        prologue, conv, epilogue = parts
        stmt = sch.get(conv)
        ivars = [iv.var for iv in stmt.iter_vars]
        v_n, v_f, v_y, v_x, v_rc, v_ry, v_rx = ivars
        # find the weight read [f, rc, ry, rx] and a data read whose channel index is rc alone
        weight_index = data_ok = None
        prepacked = 0  # the block size B of weights already packed as [O/B, I, KH, KW, B]
        for idx, region in enumerate(stmt.reads):
            starts = [r.min for r in region.region]
            if any(int(r.extent) != 1 for r in region.region if isinstance(r.extent, tirx.IntImm)):
                continue
            if len(starts) == 5 and all(isinstance(s, tirx.Var) and s.same_as(v) for s, v in
                                        zip(starts[1:4], (v_rc, v_ry, v_rx))) \
                    and is_block_split(starts[0], starts[4], v_f, region.source.shape[4]):
                weight_index, prepacked = idx, int(region.source.shape[4])
                continue
            if len(starts) != 4:
                continue
            if all(isinstance(s, tirx.Var) for s in starts) and \
                    [s.same_as(v) for s, v in zip(starts, (v_f, v_rc, v_ry, v_rx))] == [True] * 4:
                weight_index = idx
            elif isinstance(starts[1], tirx.Var) and starts[1].same_as(v_rc) and \
                    isinstance(starts[0], tirx.Var) and starts[0].same_as(v_n):
                data_ok = True
                data_elems = product(region.source.shape)
        if weight_index is None or not data_ok:
            return False

        n, f, y, x, rc, ry, rx = sch.get_loops(conv)
        n_f, n_y, n_x = extent(sch, f), extent(sch, y), extent(sch, x)
        lanes = vector_lanes(target)
        while lanes > 4 and n_f % lanes:
            lanes //= 2
        if n_f % lanes:
            return False
        regs = vector_registers(target)
        fb, xb, flat = register_tile(n_f, n_x, lanes, regs, n_y,
                                     extent(sch, rc) * extent(sch, ry) * extent(sch, rx))
        if prepacked:
            if prepacked % lanes or n_f % prepacked:
                return False
            if prepacked != fb * lanes:  # packed for another tile: the row tile of its width
                fb, flat = prepacked // lanes, False
                xb = _row_columns(n_x, lanes, regs, fb)
        out_shape = [int(d) for d in stmt.writes[0].source.shape]
        if flat and not all(same_domain(sch, block, out_shape) for block in epilogue):
            # an epilogue that is not inlined into the write-back (a channel slice: the conv of
            # a pruned variant padded to the vector width) reads the conv's output in a pass of
            # its own; after a flat tile that made the whole kernel 1.7x slower (2a09f19)
            flat, xb = False, _row_columns(n_x, lanes, regs, fb)
        block_f = fb * lanes
        if flat:  # the tile runs over the plane flattened, (y, x) -> y * W + x
            flatten_plane(sch, conv, 2, n_x)
            n, f, x, rc, ry, rx = sch.get_loops(conv)
            y = None

        wpack = None
        if not prepacked:  # pack per call, inside this PrimFunc
            wpack = sch.cache_read(conv, weight_index, "global")
            sch.transform_layout(
                wpack, ("write", 0), lambda o, i, h, w: (o // block_f, i, h, w, o % block_f)
            )
        fo, fi = sch.split(f, [None, block_f])
        xo, xi = sch.split(x, [None, xb])  # flat: the last tile is shorter (a predicate)
        fi_o, fi_i = sch.split(fi, [fb, lanes])
        taps = extent(sch, ry) * extent(sch, rx)
        by_rows = rows_first(data_elems, n_f * extent(sch, rc) * taps)
        outer = tile_order(n, fo, y, xo, flat=flat, rows_first=by_rows)
        # a channel block whose weights outgrow the caches (ResNet-18's 512-channel 7x7 convs:
        # 590 KB per 32 filters) reads them from memory at its first row and from L2 after; in
        # chunks of CHUNK_CHANNELS input channels, each chunk is read once and then serves every
        # row of the block from L1, so the stream is spread over the whole block's work (the
        # accumulators of the block's plane go to a buffer between chunks)
        chunked = not flat and not by_rows and block_f * extent(sch, rc) * taps > CHUNK_WEIGHTS \
            and extent(sch, rc) % CHUNK_CHANNELS == 0
        if chunked:
            rco, rci = sch.split(rc, [None, CHUNK_CHANNELS])
            sch.reorder(n, fo, rco, y, xo, rci, ry, rx, xi, fi_o, fi_i)
        else:
            sch.reorder(*outer, rc, ry, rx, xi, fi_o, fi_i)
        acc_out = accumulator_cache(sch, conv)
        # channels innermost in the accumulator tile, so each channel vector is one register
        if flat:
            sch.transform_layout(conv, ("write", 0), lambda b, c, h, w: (b, h * n_x + w, c))
        else:
            sch.transform_layout(conv, ("write", 0), lambda b, c, h, w: (b, h, w, c))
        left = inline_epilogue(sch, acc_out, epilogue)
        if flat:
            flatten_plane(sch, acc_out, 2, n_x)
        # the write-back per register tile (chunked: per channel block, after its last chunk)
        sch.reverse_compute_at(acc_out, fo if chunked else outer[-1], preserve_unit_loops=True)
        sch.vectorize(fi_i)
        sch.unroll(fi_o)
        sch.unroll(xi)
        if chunked:
            parallel_fused(sch, [n, fo], 1 << 30)
            sch.decompose_reduction(conv, rco)
        else:
            parallel_fused(sch, outer if flat else outer[:-1], 1 << 30)  # flat: tiles in parallel too
            sch.decompose_reduction(conv, rc)  # last: the init copies the annotated loops
        if xb >= 4 and not flat and not chunked:  # a row's XB columns are contiguous in the NCHW output
            write_back = sch.get_loops(acc_out)
            sch.vectorize(write_back[-1])
            # its channel loop unrolled: LLVM then keeps the accumulators in registers and
            # transposes them with shuffles, where the loop stored them to the stack and gathered
            # each channel's XB columns back one insert at a time (measured in the commit)
            if extent(sch, write_back[-3]) == block_f:
                sch.unroll(write_back[-3])
        # the packing pass: loops in the packed order, so writes are contiguous vectors and each
        # vector gathers one element from block_f filters (their rows stay in L1 across i, h, w)
        if wpack is not None:
            _schedule_pack(sch, wpack, block_f)
        for block in prologue:
            schedule_pad(sch, block, lanes)
        for block in left:
            schedule_spatial(sch, block, lanes)
        return True


def _row_columns(n_x: int, lanes: int, regs: int, fb: int) -> int:
    """XB of a row tile with ``fb`` channel vectors: the widest that divides the row and fits."""
    return largest_divisor(n_x, max(1, acc_vectors(lanes, regs) // fb))


def _schedule_pack(sch: s_tir.Schedule, block, block_f: int) -> None:
    """Schedule the OIHW -> O/B I H W B weight copy: (o/B, i) parallel, (h, w) serial, the B
    filters of a block as the vectorized inner loop."""
    o, i, h, w = sch.get_loops(block)
    oo, oi = sch.split(o, [None, block_f])
    sch.reorder(oo, i, h, w, oi)
    sch.vectorize(oi)
    work = extent(sch, oo) * extent(sch, i) * extent(sch, h) * extent(sch, w) * block_f
    parallel_fused(sch, [oo, i], work)
