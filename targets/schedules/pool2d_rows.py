"""MaxPool2dRows: a max pool2d as rows then columns (:class:`~legoc.targets.schedules.MaxPoolByRows`
makes its PrimFunc), without a padded copy of the input."""
from __future__ import annotations

from tvm import s_tir
from tvm.target import Target

from legoc.targets.schedules.analysis import extent, iter_kinds, product, root_blocks
from legoc.targets.schedules.base import CPURule
from legoc.targets.schedules.common_schedules import MIN_PARALLEL, schedule_spatial
from legoc.targets.schedules.isa import vector_lanes
from legoc.targets.schedules.pool_rows import COLS, PARITY, PARITY_ATTR, ROWS

UNROLL_VECTORS = 16   # an output row of at most this many machine vectors is unrolled


class MaxPool2dRows(CPURule):
    """``max_pool_rows``, ``max_pool_parity`` and ``max_pool_cols`` (+ a fused elementwise
    epilogue).

    (batch, channel, output row) run in parallel; each computes its row of maxima over the
    window's rows (whole-vector loads of the input's rows), splits its columns by parity into a
    second buffer (both a few hundred bytes, on the stack) and computes the output row from
    that, every tap a contiguous vector load. The parity split is a loop over column pairs left
    to LLVM's loop vectorizer, which loads whole vectors and shuffles them apart (TVM's vectorizer
    would load a stride-2 ramp lane by lane); it is partitioned at the input's edges so that
    its middle part has no clamped index. Reading the input's even and odd columns apart straight
    from the input instead (two computes) was as fast on an input in cache and much slower on one
    the previous kernel had just written (timings in 803f089)."""

    def schedule(self, sch: s_tir.Schedule, target: Target) -> bool:
        blocks = root_blocks(sch)
        names = [sch.get(b).name_hint for b in blocks]
        found = [[b for b, name in zip(blocks, names) if name.startswith(prefix)] for prefix in (ROWS, PARITY, COLS)]
        if any(len(f) != 1 for f in found) or any(set(iter_kinds(sch, b)) - {"S"} for b in blocks):
            return False
        rows, parity, cols = (f[0] for f in found)
        annotation = sch.get(parity).annotations.get(PARITY_ATTR)
        at = [blocks.index(b) for b in (rows, parity, cols)]
        if annotation is None or at != list(range(at[0], at[0] + 3)):
            return False
        stride, left, width = (int(v) for v in annotation)
        for block in blocks[:at[0]]:   # an elementwise producer: read in place
            sch.compute_inline(block)
        left_over = []
        for block in blocks[at[2] + 1:]:   # an elementwise epilogue: into the output row
            try:
                sch.reverse_compute_inline(block)
            except (RuntimeError, ValueError):
                left_over.append(block)
        lanes = vector_lanes(target)
        loops = sch.get_loops(cols)
        work = product(extent(sch, lp) for lp in loops)
        n, c, y, x = loops
        row = sch.fuse(n, c, y)
        sch.compute_at(parity, row, preserve_unit_loops=True)
        sch.compute_at(rows, row, preserve_unit_loops=True)
        _vectorize_row(sch, sch.get_loops(rows)[-1], lanes)
        par, i = sch.get_loops(parity)[-2:]
        sch.reorder(i, par)
        sch.unroll(par)
        _partition_edges(sch, i, stride, left, width)
        _vectorize_row(sch, x, lanes)
        if work >= MIN_PARALLEL and extent(sch, row) > 1:
            sch.parallel(row)
        for block in left_over:
            schedule_spatial(sch, block, lanes)
        return True


def _partition_edges(sch: s_tir.Schedule, loop, stride: int, left: int, width: int) -> None:
    """Partition the parity split's loop over column pairs ``i`` around its middle part, where
    ``0 <= stride * i + par - left < width`` for every parity ``par`` (no index clamped)."""
    count = extent(sch, loop)
    first = min(count, -(-left // stride))
    last = min(count, (width - stride + left) // stride + 1)   # one past the middle part
    if last <= first:
        return
    parts = [f for f in (first, last - first, count - last) if f > 0]
    if len(parts) > 1:
        sch.loop_partition(loop, parts[:-1] + [None])


def _vectorize_row(sch: s_tir.Schedule, loop, lanes: int) -> None:
    """Vectorize a row as machine vectors, unrolled when there are at most
    :data:`UNROLL_VECTORS` of them, and a shorter last vector. (Left as one row-wide vector for
    LLVM to split, ResNet's stem pool ran slower: 179f7bd.)"""
    count = extent(sch, loop)
    whole = count // lanes * lanes
    if not whole:
        sch.vectorize(loop)
        return
    if whole < count:
        loop, tail = sch.loop_partition(loop, [whole, None])
        sch.vectorize(tail)
    outer, inner = sch.split(loop, [None, lanes])
    if whole <= UNROLL_VECTORS * lanes:
        sch.unroll(outer)
    sch.vectorize(inner)
