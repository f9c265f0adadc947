"""ReductionVectorized: one reduction block (grouped conv2d, dense/matmul, pooling, mean, sum)."""
from __future__ import annotations

from tvm import s_tir
from tvm.target import Target

from legoc.targets.schedules.analysis import (extent, iter_kinds, largest_divisor, product,
                                              split_around_reduction)
from legoc.targets.schedules.base import CPURule
from legoc.targets.schedules.common_schedules import inline_epilogue, parallel_fused, schedule_spatial
from legoc.targets.schedules.isa import vector_lanes


class ReductionVectorized(CPURule):
    """One reduction block over S...R... iterators (+ spatial prologue/epilogue): pads read in
    place, the innermost non-trivial spatial axis vectorized (up to 4 accumulator vectors;
    batch-1 dense in long contiguous chunks) with the reduction loops outside it, outer spatial
    loops in parallel, the epilogue inlined into the write-back."""

    def schedule(self, sch: s_tir.Schedule, target: Target) -> bool:
        parts = split_around_reduction(sch)
        if parts is None:
            return False
        prologue, red, epilogue = parts
        # pads (and other injective producers) read in place: a pooling window's select costs
        # less than a separate pass over a padded copy
        kept = []
        for block in reversed(prologue):
            try:
                sch.compute_inline(block)
            except (RuntimeError, ValueError):
                kept.insert(0, block)
        prologue = kept
        kind = iter_kinds(sch, red)
        n_s = len(kind) - len(kind.lstrip("S"))
        loops = sch.get_loops(red)
        spatial, reduce = loops[:n_s], loops[n_s:]
        extents = [extent(sch, lp) for lp in spatial]
        work = product(extents) * product(extent(sch, lp) for lp in reduce)
        lanes = vector_lanes(target)
        # the vector axis: the innermost spatial loop longer than 1
        axis = max((i for i, e in enumerate(extents) if e > 1), default=None)
        acc_out = sch.cache_write(red, 0, "local")
        left = inline_epilogue(sch, acc_out, epilogue)
        if axis is None:
            sch.reverse_compute_at(acc_out, spatial[-1], preserve_unit_loops=True)
            sch.decompose_reduction(red, reduce[0])
        else:
            ext = extents[axis]
            vec = lanes
            while vec > 4 and ext % vec:
                vec //= 2
            if ext % vec:
                vec = largest_divisor(ext, lanes)
                if vec < 4 and ext <= 2 * lanes:
                    vec = ext
            # up to 4 vectors of accumulators: independent FMA chains, and longer contiguous
            # reads per reduction step (a GEMV's weight rows)
            groups = ext // vec
            if product(extents) == ext and groups >= 8:
                # a GEMV (batch-1 dense): few long chunks, each reduction step one contiguous
                # run of a weight row into accumulators kept in L1 (at most 64 vectors)
                chunks = next(d for d in range(2, groups + 1) if groups % d == 0 and groups // d <= 64)
                nv, unroll = groups // chunks, False
            else:
                nv, unroll = largest_divisor(groups, 4), True
            vo, vm, vi = sch.split(spatial[axis], [None, nv, vec])
            outer = [*spatial[:axis], vo, *spatial[axis + 1:]]
            sch.reorder(*outer, *reduce, vm, vi)
            sch.reverse_compute_at(acc_out, outer[-1], preserve_unit_loops=True)
            if unroll:
                sch.unroll(vm)
            if vec >= 2:
                sch.vectorize(vi)
                if axis == n_s - 1:  # the write-back's innermost loop is the vector axis
                    sch.vectorize(sch.get_loops(acc_out)[-1])
            parallel_fused(sch, outer, work)
            sch.decompose_reduction(red, reduce[0])
        for block in [*prologue, *left]:
            schedule_spatial(sch, block, lanes)
        return True
