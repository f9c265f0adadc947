"""Schedule steps several rules share: parallel outer loops, vectorized spatial blocks, epilogue
inlining, the conv's input pad, the pixel-vector register tile."""
from __future__ import annotations

from tvm import s_tir, tirx
from tvm.sym import Analyzer
from tvm.tirx import IndexMap

from legoc.targets.schedules.analysis import extent, iter_kinds, same_domain, split_around_reduction

MIN_PARALLEL = 2048  # elements below which a parallel loop costs more than it saves


def parallel_fused(sch: s_tir.Schedule, loops: list, work: int) -> None:
    """Fuse the nested ``loops`` (outermost first) and run them in parallel if ``work`` elements
    justify it."""
    if not loops:
        return
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    if work >= MIN_PARALLEL and extent(sch, fused) > 1:
        sch.parallel(fused)


def schedule_spatial(sch: s_tir.Schedule, block, lanes: int) -> None:
    """Fuse a spatial block's loops; vectorize an inner chunk, run the outer part in parallel."""
    loops = sch.get_loops(block)
    if not loops:
        return
    total = 1
    for lp in loops:
        total *= extent(sch, lp)
    inner = extent(sch, loops[-1])
    vec = lanes
    while vec > 1 and inner % vec:  # a power of two dividing the inner extent
        vec //= 2
    if vec >= 4:
        outer_loops = loops[:-1]
        lo, li = sch.split(loops[-1], [None, vec])
        sch.vectorize(li)
        parallel_fused(sch, [*outer_loops, lo], total)
    elif len(loops) > 1 and total // inner >= 2:
        # the innermost loop stays a loop of its own: fused into the parallel loop, every element
        # would recover its indices by division, in int64 in CPU builds (cpu_pass_context; 0d07d93)
        parallel_fused(sch, list(loops[:-1]), total)
    else:
        parallel_fused(sch, list(loops), total)


def flatten_plane(sch: s_tir.Schedule, block, y: int, width: int) -> None:
    """Fuse ``block``'s iterators ``y`` and ``y + 1`` (a row and its column, ``width`` wide) into
    one, ``y * width + x``: a register tile over the flattened plane runs across row ends."""
    ndim = len(sch.get(block).iter_vars)
    sch.transform_block_layout(block, IndexMap.from_func(
        lambda *v: (*v[:y], v[y] * width + v[y + 1], *v[y + 2:]), ndim=ndim))


def inline_epilogue(sch: s_tir.Schedule, writeback, epilogue: list) -> list:
    """Inline the spatial blocks after a reduction into its write-back block, in order, while
    they cover the reduction's output element for element; inline the others into one another
    where TVM can, and return those left (root-level blocks)."""
    stmt = sch.get(writeback)
    shape = [int(d) for d in stmt.writes[0].source.shape]
    left = []
    for block in epilogue:
        # the write-back's output must feed this block only: reverse_compute_inline in TVM 0.27
        # also inlines a buffer that a later block still reads (hardswish x * relu6(x + 3) / 6),
        # leaving that read without a definition
        if left or not same_domain(sch, block, shape) or len(sch.get_consumers(writeback)) != 1:
            left.append(block)
            continue
        try:
            sch.reverse_compute_inline(block)
        except (RuntimeError, ValueError):
            left.append(block)
    # the blocks left (after a channel slice: a pruned variant's conv padded to the vector
    # width) are inlined into one another, so they run as one pass without intermediate buffers
    # rather than one pass and one workspace allocation each
    kept = []
    for block in left[:-1]:
        try:
            sch.compute_inline(block)
        except (RuntimeError, ValueError):
            kept.append(block)
    return kept + left[-1:]


def inline_copies(sch: s_tir.Schedule, blocks: list) -> list:
    """Inline each block that only copies a buffer element for element (the pad of a 1x1 conv,
    zero wide) into its consumer; return the others."""
    left = []
    for block in blocks:
        body = sch.get(block).body
        value = getattr(body, "value", None)
        # TVM 0.27 names a buffer read TensorLoad (tirx.BufferLoad is a factory function)
        if (isinstance(body, tirx.BufferStore) and type(value).__name__ in ("BufferLoad", "TensorLoad")
                and [str(i) for i in value.indices] == [str(i) for i in body.indices]):
            sch.compute_inline(block)
        else:
            left.append(block)
    return left


def conv2d_parts(sch: s_tir.Schedule):
    """(prologue, conv block, epilogue) of a PrimFunc whose one reduction is an NCHW conv2d's
    (n, f, y, x, rc, ry, rx), zero-wide pads already inlined (:func:`inline_copies`); else None."""
    parts = split_around_reduction(sch)
    if parts is None or iter_kinds(sch, parts[1]) != "SSSSRRR":
        return None
    prologue, conv, epilogue = parts
    return inline_copies(sch, prologue), conv, epilogue


def tile_order(n, blocks, y, tiles, *, flat: bool, rows_first: bool) -> list:
    """A conv's outer loops, outermost first: batch, channel blocks, rows (none when ``flat``),
    tiles; with ``rows_first`` the rows (flat: the tiles) go outside the channel blocks.

    Taken when the input outweighs the weights (:func:`rows_first`): on 2 threads a channel
    split makes each thread read every input row, half of them written by the previous kernel
    on the other core, where a row split reads the rows the thread wrote itself (a row split
    too) and gives each thread all of the (smaller) weights. Timings in 302c16c and 8ae7c0f."""
    if flat:
        return [n, tiles, blocks] if rows_first else [n, blocks, tiles]
    return [n, y, blocks, tiles] if rows_first else [n, blocks, y, tiles]


def rows_first(input_elements: int, weight_elements: int) -> bool:
    """Whether a conv runs rows outside channel blocks (:func:`tile_order`): its input has more
    elements than its weights."""
    return input_elements > weight_elements


def accumulator_cache(sch: s_tir.Schedule, block):
    """``block``'s write cached in the "global" scope: TVM 0.27 keeps an allocation on the stack
    only when it is "global" and under 1 KB (the tiles are sized for that:
    :func:`~legoc.targets.schedules.isa.stack_vectors`); any other comes from TVM's workspace
    pool, a call in and one out, here inside the parallel loop once per tile or channel."""
    return sch.cache_write(block, 0, "global")


def pixel_vector_tile(sch: s_tir.Schedule, conv, epilogue: list, fc: int, xv: int, lanes: int,
                      layout=None) -> list:
    """Schedule a conv block (n, f, p, reductions...) whose ``p`` runs over output pixels, as a
    register tile of ``fc`` filters x ``xv`` vectors of ``lanes`` consecutive pixels: per
    reduction step ``xv`` vector loads and ``fc`` broadcast weights, the accumulators written
    back with plain vector stores, (n, pixel block, filter block) in parallel. ``layout``: an
    index map to apply to the conv's write and its write-back block (the pointwise rule's
    flattened plane). Returns the epilogue blocks not inlined into the write-back."""
    n, f, p, *reduction = sch.get_loops(conv)
    fo, fi = sch.split(f, [None, fc])
    po, pv, pl = sch.split(p, [None, xv, lanes])
    # pixel blocks outside filter blocks: an input tile stays in L1 across the filters
    sch.reorder(n, po, fo, *reduction, fi, pv, pl)
    acc_out = accumulator_cache(sch, conv)
    if layout is not None:
        sch.transform_layout(conv, ("write", 0), layout)
    left = inline_epilogue(sch, acc_out, epilogue)
    if layout is not None:
        sch.transform_block_layout(acc_out, layout)
    sch.reverse_compute_at(acc_out, fo, preserve_unit_loops=True)
    sch.vectorize(pl)
    sch.unroll(pv)
    sch.unroll(fi)
    parallel_fused(sch, [n, po, fo], 1 << 30)
    sch.decompose_reduction(conv, reduction[0])  # last: the init copies the annotated loops
    _wo, wi = sch.split(sch.get_loops(acc_out)[-1], [None, lanes])
    sch.vectorize(wi)
    return left


def schedule_pad(sch: s_tir.Schedule, block, lanes: int) -> None:
    """A spatial pad of an NCHW plane as loop partitions (:func:`partition_pad`); another pad
    as two passes without conditions (zero fill, then the in-bounds copy, which vectorizes);
    other spatial blocks as :func:`schedule_spatial`."""
    if partition_pad(sch, block):
        return
    loops = sch.get_loops(block)
    try:
        fill = sch.decompose_padding(block, loops[0])
    except (RuntimeError, ValueError):
        schedule_spatial(sch, block, lanes)
        return
    schedule_spatial(sch, fill, lanes)
    schedule_spatial(sch, block, lanes)


def _split_border(sch: s_tir.Schedule, loop, before: int, inside: int):
    """Partition a pad's ``loop`` into [border before,] inside[, border after]; the interior
    part's loop, or None when the axis has no border."""
    after = extent(sch, loop) - before - inside
    if before < 0 or after < 0 or before + after == 0:
        return None
    parts = sch.loop_partition(loop, [f for f in (before, inside, after) if f][:-1] + [None])
    return parts[1 if before else 0]


def _pad_offsets(sch: s_tir.Schedule, block) -> list[tuple[int, int]] | None:
    """(before, inside) per axis of ``block`` when it is ``out[i] = if_then_else(cond,
    in[i - before], 0)``, a constant pad; else None."""
    stmt = sch.get(block)
    value = getattr(stmt.body, "value", None)
    op = getattr(getattr(value, "op", None), "name", "")
    if not op.endswith("if_then_else") or type(value.args[1]).__name__ not in ("BufferLoad", "TensorLoad"):
        return None
    load = value.args[1]
    if len(load.indices) != len(stmt.iter_vars):
        return None
    analyzer = Analyzer()
    out = []
    for iv, index, size in zip(stmt.iter_vars, load.indices, load.source.shape):
        before = analyzer.simplify(iv.var - index)
        if not isinstance(before, tirx.IntImm) or not isinstance(size, tirx.IntImm):
            return None
        out.append((int(before), int(size)))
    return out


def partition_pad(sch: s_tir.Schedule, block) -> bool:
    """Pad only the rows and columns of an NCHW plane: the pad loop split at the border
    (``loop_partition``), rows first, then the columns of the interior rows, so the border
    parts write zeros and the interior part copies, each without a condition left in the
    loop. The zero fill plus copy it replaces wrote the whole plane twice, one float per
    store (rows of W + 2 floats do not split into vectors); timings in 6378a56 and the README."""
    offsets = _pad_offsets(sch, block)
    loops = sch.get_loops(block)
    if offsets is None or len(offsets) != 4 or len(loops) != 4 or offsets[0][0] or offsets[1][0]:
        return False
    n, c, h, w = loops
    work = extent(sch, n) * extent(sch, c) * extent(sch, h) * extent(sch, w)
    rows = _split_border(sch, h, *offsets[2])
    if rows is not None:   # the columns of the interior rows next
        w = sch.get_loops(sch.get_child_blocks(rows)[0])[-1]
    _split_border(sch, w, *offsets[3])
    parallel_fused(sch, [n, c], work)
    return True
