"""Conv2dWinograd: the Winograd conv of :class:`~legoc.targets.schedules.WinogradConv3x3`, by
rows of tiles or by groups of output channels."""
from __future__ import annotations

from tvm import s_tir
from tvm.target import Target

from legoc.targets.schedules.analysis import extent, largest_divisor, product, root_blocks
from legoc.targets.schedules.base import CPURule
from legoc.targets.schedules.common_schedules import (accumulator_cache, inline_epilogue, parallel_fused,
                                                      schedule_pad, schedule_spatial)
from legoc.targets.schedules.isa import vector_registers
from legoc.targets.schedules.winograd import NAME

STAGES = ("pad", "phase", "rows", "input", "gemm", "cols")
# transformed filters up to this size run by rows of tiles (each row's task reads all of them,
# from L2); larger ones by groups of output channels. benchmarks/winograd.py, 2 threads, by rows
# -> by groups: ResNet-18's 256-channel 14x14 conv (4.2 MB of F(2x2, 3x3) filters) 0.76 ->
# 0.58 ms, 256x256 at 16x16 (9.4 MB) 0.93 -> 0.56, 128x128 at 28x28 (2.4 MB) 0.53 -> 0.50
ROW_FILTER_BYTES = 1 << 20


class Conv2dWinograd(CPURule):
    """The PrimFunc of :func:`~legoc.targets.schedules.winograd.winograd_te` (+ a fused epilogue).

    With up to :data:`ROW_FILTER_BYTES` of transformed filters, each row of output tiles is one
    parallel task that transforms its input tiles, runs the a * a products over input channels
    and transforms them back, so the transformed tiles (a * a x C x tiles) and products of a
    row stay in the core's L2 instead of going to memory and back (the three stages as passes
    of their own: 0.50 against 0.40 ms for ResNet-18's 64-channel conv at 56 x 56; timings in
    the commit). With more, the input transform runs whole first, then each group of output
    channel vectors is a task (its products and output transform). The pad and the phase split
    run over the whole input.

    * the input transform per (input channel, row of tiles): its a * a outputs unrolled, the
      row's tiles as the vector;
    * the products: a register tile of ``FB`` vectors of output channels by ``XB`` tiles of the
      row, one packed weight vector load and one broadcast per step, as the packed direct conv;
    * the output transform per tile and vector of output channels (the channels as the vector),
      its m * m outputs written NCHW with the epilogue inlined."""

    def schedule(self, sch: s_tir.Schedule, target: Target) -> bool:
        blocks = {sch.get(b).name_hint: b for b in root_blocks(sch)}
        stage = {s: blocks.get(f"{NAME}_{s}") for s in STAGES}
        if any(b is None for b in stage.values()) or NAME not in blocks:
            return False
        out = blocks[NAME]
        order = root_blocks(sch)
        epilogue = order[[sch.get(b).name_hint for b in order].index(NAME) + 1:]
        lanes = int(sch.get(stage["gemm"]).writes[0].source.shape[-1])
        tile = int(sch.get(stage["cols"]).writes[0].source.shape[-1])   # [n, k, rows, cols, a, m]
        left = inline_epilogue(sch, out, epilogue)

        gemm, transformed = stage["gemm"], stage["input"]
        vectors = int(sch.get(gemm).writes[0].source.shape[2])
        fb = 2 if vectors % 2 == 0 else 1
        filters = sch.get(gemm).reads[1].source.shape
        budget = vector_registers(target) - 4
        n, k, h, w = sch.get_loops(out)
        kb, kl = sch.split(k, [None, lanes])
        ty, yy = sch.split(h, [None, tile])
        tx, xx = sch.split(w, [None, tile])
        if product(filters) * 4 <= ROW_FILTER_BYTES:
            # by rows of tiles: (n, tile row) in parallel, each row's three stages under it
            sch.reorder(n, ty, kb, tx, yy, xx, kl)
            _output_transform(sch, stage["cols"], tx, yy, xx, kl, 4)
            sch.compute_at(gemm, ty, preserve_unit_loops=True)
            _, a, gkb, _, gtx, gb, rc = _own(sch, gemm, 2)
            xb = largest_divisor(extent(sch, gtx), max(1, budget // fb))
            kbo, kbi = sch.split(gkb, [None, fb])
            txo, txi = sch.split(gtx, [None, xb])
            sch.reorder(a, kbo, txo, rc, txi, kbi, gb)
            _register_tile(sch, gemm, txo, gb, kbi, txi)
            sch.compute_at(transformed, ty, preserve_unit_loops=True)
            a_in, _, c, _, tiles = _own(sch, transformed, 2)
            sch.reorder(c, a_in, tiles)
            _input_transform(sch, stage["rows"], c, a_in, tiles)
            parallel_fused(sch, [n, ty], 1 << 30)
        else:
            # by channel groups: the input transform whole, first; then (n, group of FB output
            # channel vectors) in parallel, each group's products and output transform under it,
            # so that each core reads its share of the filters once per call, not once per row
            kbo, kbi = sch.split(kb, [None, fb])
            sch.reorder(n, kbo, ty, kbi, tx, yy, xx, kl)
            _output_transform(sch, stage["cols"], tx, yy, xx, kl, 5)
            sch.compute_at(gemm, kbo, preserve_unit_loops=True)
            _, a, gkb, gty, gtx, gb, rc = _own(sch, gemm, 2)
            xb = largest_divisor(extent(sch, gtx), max(1, budget // fb))
            txo, txi = sch.split(gtx, [None, xb])
            sch.reorder(a, gty, txo, rc, txi, gkb, gb)
            _register_tile(sch, gemm, txo, gb, gkb, txi)
            a_in, i_n, c, i_ty, tiles = sch.get_loops(transformed)
            sch.reorder(i_n, c, i_ty, a_in, tiles)
            _input_transform(sch, stage["rows"], i_ty, a_in, tiles)
            parallel_fused(sch, [i_n, c], 1 << 30)
            parallel_fused(sch, [n, kbo], 1 << 30)

        # the whole input: padded (border partitions), then split into column phases
        schedule_pad(sch, stage["pad"], lanes)
        pn, pc, py, pj, px = sch.get_loops(stage["phase"])
        sch.reorder(pn, pc, py, px, pj)
        sch.vectorize(pj)
        parallel_fused(sch, [pn, pc], 1 << 30)

        sch.decompose_reduction(gemm, rc)   # last: the init copies the annotated loops
        for block in left:
            schedule_spatial(sch, block, lanes)
        return True


def _own(sch: s_tir.Schedule, block, skip: int) -> list:
    """``block``'s loops below the first ``skip``: after ``compute_at(preserve_unit_loops=True)``
    one per block iterator, in the iterators' order."""
    loops = sch.get_loops(block)[skip:]
    if len(loops) != len(sch.get(block).iter_vars):
        raise ValueError(f"{sch.get(block).name_hint}: not one loop per block iterator")
    return loops


def _output_transform(sch: s_tir.Schedule, cols, tx, yy, xx, kl, depth: int) -> None:
    """``A^T m A`` per tile and channel vector: the first pass (``cols``) into a local
    [a, m, lanes] tile under the tile loop ``tx`` (``depth`` loops deep), both unrolled, the
    channel vector as the vector."""
    sch.unroll(yy)
    sch.unroll(xx)
    sch.vectorize(kl)
    sch.compute_at(cols, tx, preserve_unit_loops=True)
    sch.transform_layout(cols, ("write", 0), lambda n_, k_, ty_, tx_, e, x: (n_, ty_, tx_, e, x, k_))
    _, k_in, _, _, e, x = _own(sch, cols, depth)
    sch.reorder(e, x, k_in)
    sch.unroll(e)
    sch.unroll(x)
    sch.vectorize(k_in)


def _register_tile(sch: s_tir.Schedule, gemm, anchor, lanes_loop, vectors_loop, tiles_loop) -> None:
    """The products' accumulators cached per register tile and written back under ``anchor``;
    channel vectors and tiles unrolled, the lanes vectorized."""
    acc = accumulator_cache(sch, gemm)
    sch.reverse_compute_at(acc, anchor, preserve_unit_loops=True)
    sch.vectorize(lanes_loop)
    sch.unroll(vectors_loop)
    sch.unroll(tiles_loop)
    sch.vectorize(sch.get_loops(acc)[-1])


def _input_transform(sch: s_tir.Schedule, partial, anchor, a_in, tiles) -> None:
    """``B^T d B``: its first pass (``partial``) per (input channel, tile row) under ``anchor``
    in a local [a, a, tiles] buffer, the second pass's a * a outputs unrolled, the row's tiles
    as the vector in both."""
    sch.compute_at(partial, anchor, preserve_unit_loops=True)
    sch.unroll(a_in)
    sch.vectorize(tiles)
    sch.transform_layout(partial, ("write", 0), lambda n_, c_, ty_, tx_, e_, s: (n_, c_, e_, s, ty_, tx_))
    depth = len(sch.get_loops(partial)) - len(sch.get(partial).iter_vars)
    _, _, _, p_tiles, p_e, p_s = _own(sch, partial, depth)
    sch.reorder(p_e, p_s, p_tiles)
    sch.unroll(p_e)
    sch.unroll(p_s)
    sch.vectorize(p_tiles)
