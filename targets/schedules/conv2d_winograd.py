"""Conv2dWinograd: the F(4x4, 3x3) conv of :class:`~legoc.targets.schedules.WinogradConv3x3`,
one row of tiles at a time."""
from __future__ import annotations

from tvm import s_tir
from tvm.target import Target

from legoc.targets.schedules.analysis import extent, largest_divisor, root_blocks
from legoc.targets.schedules.base import CPURule
from legoc.targets.schedules.common_schedules import (accumulator_cache, inline_epilogue, parallel_fused,
                                                      schedule_pad, schedule_spatial)
from legoc.targets.schedules.isa import vector_registers
from legoc.targets.schedules.winograd import NAME, TILE

STAGES = ("pad", "phase", "rows", "input", "gemm", "cols")


class Conv2dWinograd(CPURule):
    """The PrimFunc of :func:`~legoc.targets.schedules.winograd.winograd_te` (+ a fused epilogue).

    Each row of 4x4 output tiles is one parallel task that transforms its input tiles, runs the
    36 products over input channels and transforms them back, so the transformed tiles (36 x C
    x tiles) and products (36 x K x tiles) of a row stay in the core's L2 instead of going to
    memory and back (the three stages as passes of their own: 0.50 against 0.40 ms for
    ResNet-18's 64-channel conv at 56 x 56; timings in the commit). The pad and the phase split
    before it run over the whole input.

    * the input transform per (input channel, row of tiles): its 36 outputs unrolled, the row's
      tiles as the vector;
    * the products: a register tile of ``FB`` vectors of output channels by ``XB`` tiles of the
      row, one packed weight vector load and one broadcast per step, as the packed direct conv;
    * the output transform per tile and vector of output channels (the channels as the vector),
      its 16 outputs written NCHW with the epilogue inlined."""

    def schedule(self, sch: s_tir.Schedule, target: Target) -> bool:
        blocks = {sch.get(b).name_hint: b for b in root_blocks(sch)}
        stage = {s: blocks.get(f"{NAME}_{s}") for s in STAGES}
        if any(b is None for b in stage.values()) or NAME not in blocks:
            return False
        out = blocks[NAME]
        order = root_blocks(sch)
        epilogue = order[[sch.get(b).name_hint for b in order].index(NAME) + 1:]
        lanes = int(sch.get(stage["gemm"]).writes[0].source.shape[-1])
        left = inline_epilogue(sch, out, epilogue)

        # the output transform's loops are the anchor: (n, tile row, channel vector, tile, 4 x 4, lanes)
        n, k, h, w = sch.get_loops(out)
        kb, kl = sch.split(k, [None, lanes])
        ty, yy = sch.split(h, [None, TILE])
        tx, xx = sch.split(w, [None, TILE])
        sch.reorder(n, ty, kb, tx, yy, xx, kl)
        sch.unroll(yy)
        sch.unroll(xx)
        sch.vectorize(kl)
        cols = stage["cols"]
        sch.compute_at(cols, tx, preserve_unit_loops=True)
        # its local tile [6, 4, lanes]: the channel vector innermost
        sch.transform_layout(cols, ("write", 0), lambda n_, k_, ty_, tx_, e, x: (n_, ty_, tx_, e, x, k_))
        _, k_in, _, _, e, x = _own(sch, cols, 4)
        sch.reorder(e, x, k_in)
        sch.unroll(e)
        sch.unroll(x)
        sch.vectorize(k_in)

        # the products of the row, under the same row loop
        gemm = stage["gemm"]
        sch.compute_at(gemm, ty, preserve_unit_loops=True)
        _, a, gkb, _, gtx, gb, rc = _own(sch, gemm, 2)
        fb, xb = _tile(extent(sch, gkb), extent(sch, gtx), vector_registers(target))
        kbo, kbi = sch.split(gkb, [None, fb])
        txo, txi = sch.split(gtx, [None, xb])
        sch.reorder(a, kbo, txo, rc, txi, kbi, gb)
        acc = accumulator_cache(sch, gemm)
        sch.reverse_compute_at(acc, txo, preserve_unit_loops=True)
        sch.vectorize(gb)
        sch.unroll(kbi)
        sch.unroll(txi)
        sch.vectorize(sch.get_loops(acc)[-1])

        # the input transform of the row, per input channel
        transformed = stage["input"]
        sch.compute_at(transformed, ty, preserve_unit_loops=True)
        a_in, _, c, _, tiles = _own(sch, transformed, 2)
        sch.reorder(c, a_in, tiles)
        partial = stage["rows"]
        sch.compute_at(partial, c, preserve_unit_loops=True)
        sch.unroll(a_in)
        sch.vectorize(tiles)
        sch.transform_layout(partial, ("write", 0), lambda n_, c_, ty_, tx_, e_, s: (n_, c_, e_, s, ty_, tx_))
        _, _, _, p_tiles, p_e, p_s = _own(sch, partial, 3)
        sch.reorder(p_e, p_s, p_tiles)
        sch.unroll(p_e)
        sch.unroll(p_s)
        sch.vectorize(p_tiles)

        # the whole input: padded (border partitions), then split into column phases
        schedule_pad(sch, stage["pad"], lanes)
        pn, pc, py, pj, px = sch.get_loops(stage["phase"])
        sch.reorder(pn, pc, py, px, pj)
        sch.vectorize(pj)
        parallel_fused(sch, [pn, pc], 1 << 30)

        parallel_fused(sch, [n, ty], 1 << 30)
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


def _tile(vectors: int, tiles: int, regs: int) -> tuple[int, int]:
    """(FB channel vectors, XB tiles) of the products' register tile: two channel vectors when
    they divide, and as many of the row's tiles as the accumulator budget (all registers but
    four: a weight vector per FB, a broadcast) holds. At 14 tiles a row, AVX-512's 2 x 14 ran
    faster than 2 x 7 (0.37-0.39 against 0.41 ms), although 28 accumulators leave 4 registers."""
    budget = regs - 4
    fb = 2 if vectors % 2 == 0 else 1
    return fb, largest_divisor(tiles, max(1, budget // fb))
