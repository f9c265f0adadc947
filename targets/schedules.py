"""Default schedules for CPU PrimFuncs (no tuning), rules in dlight's ``ScheduleRule`` form.

TVM 0.27's CPU pipeline legalizes and fuses but schedules nothing: every fused PrimFunc runs as
one thread of naive loops. These rules recognise the PrimFuncs legoc's models produce and give
them parallel outer loops, vectorized inner loops sized to the target's vector width, register
blocking and, for ordinary convolutions, a packed weight layout.

A rule is a ``dlight.ScheduleRule``: it gets a PrimFunc and returns a scheduled ``s_tir.Schedule``
or None when it does not apply. :class:`ApplyCPUSchedules` tries them in order
(:func:`default_rules`); the first that returns a schedule wins. Every primitive used (split,
reorder, cache_write, reverse_compute_inline, transform_layout, parallel, vectorize, ...) is
checked by TVM for legality, so a rule either produces an equivalent program or raises; a raising
rule counts as "does not apply" and the next one is tried. :class:`Fallback` only parallelizes
outer data-parallel loops, and a PrimFunc no rule takes is left as TVM made it (correct, slow).
One TVM 0.27 primitive is not safe on its own: reverse_compute_inline accepts a consumer that
reads a slice of its producer and then writes out of bounds, so consumers are inlined only when
they cover the producer element for element (:func:`_same_domain`).

Before legalization (Relax level):

* :class:`PackConvWeights` (``build_module(prepack=True)``): groups=1 NCHW conv2d becomes a conv
  over weights packed ``[O/B, I, KH, KW, B]`` (output channels zero-padded to a multiple of the
  vector width, kernel taps that only ever meet padding dropped); the packing is a Relax
  ``layout_transform`` that ``LiftTransformParams`` moves out of ``main``, run once at build time.
* :class:`PadConvChannels` (otherwise): output channels padded to the vector width, the weights
  packed per call inside the conv's PrimFunc.

The rules:

* :class:`Conv2dNCHWPacked` - an NCHW conv2d (groups=1) with its fused epilogue (bias, residual
  add, ReLU, ...): a register-blocked micro-kernel of ``FB`` vectors of ``L`` output channels
  times ``XB`` output columns of accumulators; per reduction step one vector load of packed
  weights per channel vector and one broadcast input scalar per column. Weights not packed at
  build time are packed at the start of the PrimFunc; the input pad is a zero fill plus a
  vectorized copy; the epilogue is inlined into the accumulator write-back; (batch,
  channel-block, row) are fused and run in parallel.
* :class:`ReductionVectorized` - any PrimFunc with one reduction block over S...R... iterators
  (depthwise and grouped conv2d, dense/matmul, pooling, mean): pads are read in place, the
  innermost non-trivial spatial axis is vectorized (up to 4 accumulator vectors; batch-1 dense
  in long contiguous chunks) with the reduction loops outside it, outer spatial loops run in
  parallel, the epilogue is inlined into the write-back.
* :class:`Injective` - PrimFuncs with spatial blocks only (elementwise, broadcast, pad, reshape,
  transpose): each block's loops are fused, the inner part vectorized, the outer part parallel.
* :class:`Fallback` - anything else: outer data-parallel loops in parallel, nothing more.

Vector width comes from the target CPU's features as LLVM reports them (AVX-512: 16 floats,
AVX2: 8, NEON: 4).
"""
from __future__ import annotations

import os

import tvm
from tvm import relax, s_tir, tirx
from tvm.s_tir import dlight
from tvm.target import Target
from tvm.target.codegen import llvm_cpu_has_features

__all__ = [
    "Conv2dNCHWPacked",
    "DepthwiseConv2d",
    "Fallback",
    "Injective",
    "PackConvWeights",
    "PadConvChannels",
    "prepack_weights",
    "ReductionVectorized",
    "ApplyCPUSchedules",
    "scheduled_by",
    "cpu_pipeline",
    "default_rules",
    "lowering_passes",
    "scheduling_passes",
    "vector_lanes",
]

_DATA_PAR = 0  # tirx.IterVar.DataPar
_COMM_REDUCE = 2  # tirx.IterVar.CommReduce
_MIN_PARALLEL = 2048  # elements below which a parallel loop costs more than it saves


# ---------------------------------------------------------------------------------------------
# Small helpers


def _isa(target: Target) -> tuple[int, int]:
    """(fp32 lanes per vector register, architectural vector registers) of ``target``'s CPU.

    Asked of LLVM feature by feature (``llvm_cpu_has_features``): TVM 0.27's
    ``llvm_get_vector_width`` answers 512 for every x86 CPU, AVX2-only ones (znver3, haswell)
    included, and rules sized for 16 lanes and 32 registers then spill on a 16-register AVX2
    core."""
    triple = str(target.attrs.get("mtriple", "")) or tvm.target.codegen.llvm_get_system_triple()
    if triple.startswith(("aarch64", "arm64")):
        return 4, 32  # NEON: 128-bit, v0-v31
    if not triple.startswith(("x86_64", "i686", "i386")):
        return 4, 16

    def has(feature: str) -> bool:
        try:
            return bool(llvm_cpu_has_features(feature, target))
        except Exception:  # noqa: BLE001 - an mcpu LLVM cannot query: assume SSE
            return False

    if has("avx512f"):
        return 16, 32
    if has("avx2") or has("avx"):
        return 8, 16
    return 4, 16


def _lanes(target: Target, dtype_bits: int = 32) -> int:
    """Elements of ``dtype_bits`` per vector register for ``target`` (at least 4)."""
    return max(4, _isa(target)[0] * 32 // dtype_bits)


def vector_lanes(target: Target) -> int:
    """fp32 lanes of one vector register of ``target``'s CPU (the packed conv's channel block)."""
    return _lanes(target)


def _num_vector_registers(target: Target) -> int:
    """Architectural vector registers (32 on AArch64 and AVX-512 x86, else 16)."""
    return _isa(target)[1]


def _extent(sch: s_tir.Schedule, loop) -> int:
    return int(sch.get(loop).extent)


def _root_blocks(sch: s_tir.Schedule) -> list:
    root = sch.get_sblock("root")
    return list(sch.get_child_blocks(root))


def _is_plain(sch: s_tir.Schedule, block) -> bool:
    """The block sits in its own loop nest, one loop per block iterator, bound 1:1 in order."""
    realize = sch.get_sref(block).stmt
    loops = sch.get_loops(block)
    iters = realize.iter_vars
    if len(loops) != len(iters):
        return False
    for loop, itv in zip(loops, iters):
        if int(sch.get(loop).extent) != int(itv.dom.extent):
            return False
    return True


def _iter_kinds(sch: s_tir.Schedule, block) -> str:
    kinds = []
    for itv in sch.get(block).iter_vars:
        kind = int(itv.iter_type)
        if kind == _DATA_PAR:
            kinds.append("S")
        elif kind == _COMM_REDUCE:
            kinds.append("R")
        else:
            kinds.append("O")
    return "".join(kinds)


def _float32_only(sch: s_tir.Schedule) -> bool:
    """Every buffer the root blocks read or write is float32 (the rules assume 4-byte lanes)."""
    for block in _root_blocks(sch):
        stmt = sch.get(block)
        for region in [*stmt.reads, *stmt.writes]:
            if str(region.source.dtype) != "float32":
                return False
    return True


def _product(values) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out


def _largest_divisor(n: int, limit: int) -> int:
    for d in range(min(n, limit), 0, -1):
        if n % d == 0:
            return d
    return 1


def _parallel_fused(sch: s_tir.Schedule, loops: list, work: int) -> None:
    """Fuse the nested ``loops`` (outermost first) and run them in parallel if ``work`` elements
    justify it."""
    if not loops:
        return
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    if work >= _MIN_PARALLEL and _extent(sch, fused) > 1:
        sch.parallel(fused)


def _schedule_spatial(sch: s_tir.Schedule, block, lanes: int) -> None:
    """Fuse a spatial block's loops; vectorize an inner chunk, run the outer part in parallel."""
    loops = sch.get_loops(block)
    if not loops:
        return
    total = 1
    for lp in loops:
        total *= _extent(sch, lp)
    inner = _extent(sch, loops[-1])
    vec = lanes
    while vec > 1 and inner % vec:  # a power of two dividing the inner extent
        vec //= 2
    if vec >= 4:
        outer_loops = loops[:-1]
        lo, li = sch.split(loops[-1], [None, vec])
        sch.vectorize(li)
        _parallel_fused(sch, [*outer_loops, lo], total)
    else:
        _parallel_fused(sch, list(loops), total)


def _same_domain(sch: s_tir.Schedule, block, shape: list[int]) -> bool:
    """The block iterates exactly over ``shape`` and writes one buffer of that shape.

    reverse_compute_inline in TVM 0.27 accepts a consumer that reads only part of its producer
    (a channel slice) and then writes the consumer's buffer over the producer's whole domain, out
    of bounds: consumers are inlined only when this holds."""
    stmt = sch.get(block)
    if len(stmt.writes) != 1:
        return False
    extents = [int(iv.dom.extent) for iv in stmt.iter_vars]
    written = [int(d) for d in stmt.writes[0].source.shape]
    return extents == shape and written == shape


def _is_block_split(outer, inner, var, block) -> bool:
    """``outer`` is ``var // block`` and ``inner`` is ``var % block``."""
    block = int(block)
    return (isinstance(outer, tirx.FloorDiv) and isinstance(inner, tirx.FloorMod)
            and outer.a.same_as(var) and inner.a.same_as(var)
            and isinstance(outer.b, tirx.IntImm) and int(outer.b) == block
            and isinstance(inner.b, tirx.IntImm) and int(inner.b) == block)


def _schedule_pack(sch: s_tir.Schedule, block, block_f: int) -> None:
    """Schedule the OIHW -> O/B I H W B weight copy: (o/B, i) parallel, (h, w) serial, the B
    filters of a block as the vectorized inner loop."""
    o, i, h, w = sch.get_loops(block)
    oo, oi = sch.split(o, [None, block_f])
    sch.reorder(oo, i, h, w, oi)
    sch.vectorize(oi)
    work = _extent(sch, oo) * _extent(sch, i) * _extent(sch, h) * _extent(sch, w) * block_f
    _parallel_fused(sch, [oo, i], work)


def _inline_epilogue(sch: s_tir.Schedule, writeback, epilogue: list) -> list:
    """Inline the spatial blocks after a reduction into its write-back block, in order, while
    they cover the reduction's output element for element; return the others (they stay
    root-level blocks)."""
    stmt = sch.get(writeback)
    shape = [int(d) for d in stmt.writes[0].source.shape]
    left = []
    for block in epilogue:
        # the write-back's output must feed this block only: reverse_compute_inline in TVM 0.27
        # also inlines a buffer that a later block still reads (hardswish x * relu6(x + 3) / 6),
        # leaving that read without a definition
        if left or not _same_domain(sch, block, shape) or len(sch.get_consumers(writeback)) != 1:
            left.append(block)
            continue
        try:
            sch.reverse_compute_inline(block)
        except (RuntimeError, ValueError):
            left.append(block)
    return left


class _CPURule(dlight.ScheduleRule):
    """A CPU rule: ``schedule`` mutates a fresh Schedule and says whether it applied."""

    def apply(self, func, target: Target, tunable: bool):  # noqa: ARG002 - dlight's signature
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        sch = s_tir.Schedule(func)
        if not _float32_only(sch):
            return None
        return sch if self.schedule(sch, target) else None

    def schedule(self, sch: s_tir.Schedule, target: Target) -> bool:
        raise NotImplementedError


def _split_around_reduction(sch: s_tir.Schedule):
    """(prologue, reduction block, epilogue) of a PrimFunc with exactly one reduction block whose
    iterators are all spatial then all reduction, in a plain loop nest; else None."""
    blocks = _root_blocks(sch)
    kinds = [_iter_kinds(sch, b) for b in blocks]
    reductions = [i for i, k in enumerate(kinds) if "R" in k]
    if len(reductions) != 1 or any("O" in k for k in kinds):
        return None
    i = reductions[0]
    block = blocks[i]
    kind = kinds[i]
    n_s = len(kind) - len(kind.lstrip("S"))
    if n_s == 0 or kind[n_s:].strip("R") or not _is_plain(sch, block):
        return None
    return blocks[:i], block, blocks[i + 1:]


# ---------------------------------------------------------------------------------------------
# Rules


class Conv2dNCHWPacked(_CPURule):
    """groups=1 NCHW conv2d (+ fused epilogue), channel-vectorized with per-call packed weights."""

    def schedule(self, sch: s_tir.Schedule, target: Target) -> bool:
        parts = _split_around_reduction(sch)
        if parts is None:
            return False
        prologue, conv, epilogue = parts
        if _iter_kinds(sch, conv) != "SSSSRRR":
            return False
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
                    and _is_block_split(starts[0], starts[4], v_f, region.source.shape[4]):
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
        if weight_index is None or not data_ok:
            return False

        n, f, y, x, rc, ry, rx = sch.get_loops(conv)
        n_f, n_x = _extent(sch, f), _extent(sch, x)
        lanes = _lanes(target)
        while lanes > 4 and n_f % lanes:
            lanes //= 2
        if n_f % lanes:
            return False
        regs = _num_vector_registers(target)
        fb, xb = _tile(n_f, n_x, lanes, regs)
        if prepacked:
            if prepacked % lanes or n_f % prepacked:
                return False
            fb = prepacked // lanes
            xb = _largest_divisor(n_x, max(1, _acc_registers(regs) // fb))
        block_f = fb * lanes

        wpack = None
        if not prepacked:  # pack per call, inside this PrimFunc
            wpack = sch.cache_read(conv, weight_index, "global")
            sch.transform_layout(
                wpack, ("write", 0), lambda o, i, h, w: (o // block_f, i, h, w, o % block_f)
            )
        fo, fi = sch.split(f, [None, block_f])
        xo, xi = sch.split(x, [None, xb])
        fi_o, fi_i = sch.split(fi, [fb, lanes])
        sch.reorder(n, fo, y, xo, rc, ry, rx, xi, fi_o, fi_i)
        acc_out = sch.cache_write(conv, 0, "local")
        # channels innermost in the accumulator tile, so each channel vector is one register
        sch.transform_layout(conv, ("write", 0), lambda b, c, h, w: (b, h, w, c))
        left = _inline_epilogue(sch, acc_out, epilogue)
        sch.reverse_compute_at(acc_out, xo, preserve_unit_loops=True)
        sch.vectorize(fi_i)
        sch.unroll(fi_o)
        sch.unroll(xi)
        _parallel_fused(sch, [n, fo, y], 1 << 30)
        sch.decompose_reduction(conv, rc)  # last: the init copies the annotated loops
        wb_loops = sch.get_loops(acc_out)
        wb_tile = wb_loops[len(wb_loops) - 4:]  # n, f, y, x of the tile
        if xb >= 4:
            sch.vectorize(wb_tile[-1])
        # the packing pass: loops in the packed order, so writes are contiguous vectors and each
        # vector gathers one element from block_f filters (their rows stay in L1 across i, h, w)
        if wpack is not None:
            _schedule_pack(sch, wpack, block_f)
        for block in prologue:
            _schedule_pad(sch, block, lanes)
        for block in left:
            _schedule_spatial(sch, block, lanes)
        return True


def _schedule_pad(sch: s_tir.Schedule, block, lanes: int) -> None:
    """A pad block as two passes without conditions (zero fill, then the in-bounds copy, which
    vectorizes); other spatial blocks as :func:`_schedule_spatial`."""
    loops = sch.get_loops(block)
    try:
        fill = sch.decompose_padding(block, loops[0])
    except (RuntimeError, ValueError):
        _schedule_spatial(sch, block, lanes)
        return
    _schedule_spatial(sch, fill, lanes)
    _schedule_spatial(sch, block, lanes)


def _depthwise_reads(sch: s_tir.Schedule, conv) -> bool:
    """The reduction block reads a ``[C, 1, KH, KW]`` weight and a ``[N, C, H, W]`` input for
    an ``[N, C, OH, OW]`` output: a depthwise conv2d (channel multiplier 1), NCHW."""
    stmt = sch.get(conv)
    out = stmt.writes[0].source
    if len(out.shape) != 4:
        return False
    n_f = int(out.shape[1])
    weight = data = False
    for region in stmt.reads:
        src = region.source
        if src.same_as(out) or len(src.shape) != 4:
            continue
        dims = [int(d) for d in src.shape]
        if dims[0] == n_f and dims[1] == 1:
            weight = True
        elif dims[1] == n_f:
            data = True
    return weight and data


class DepthwiseConv2d(_CPURule):
    """Depthwise NCHW conv2d (+ fused epilogue): one channel per parallel iteration; its padded
    input plane built in a scratch buffer there (zero border, then an unconditional vectorized
    copy), then each output row computed in chunks held in vector registers, the kernel taps
    outside the vector loop. (ReductionVectorized's generic form reads the padding in place, a
    per-lane select per tap, and parallelizes over vector-wide chunks of a row.)"""

    def schedule(self, sch: s_tir.Schedule, target: Target) -> bool:
        parts = _split_around_reduction(sch)
        if parts is None:
            return False
        prologue, conv, epilogue = parts
        if _iter_kinds(sch, conv) not in ("SSSSRR", "SSSSRRR") or not _depthwise_reads(sch, conv):
            return False
        if len(prologue) > 1:
            return False
        lanes, regs = _isa(target)
        loops = sch.get_loops(conv)
        n, f, y, x = loops[:4]
        reduce = loops[4:]
        n_x = _extent(sch, x)
        # accumulators of one row chunk in registers; the rest hold a weight and input vectors
        max_acc = max(lanes, (regs - 4) * lanes)
        chunk = n_x if n_x <= max_acc else _largest_divisor(n_x, max_acc)
        if chunk < lanes and n_x > max_acc:
            return False
        xo, xi = sch.split(x, [None, chunk])
        sch.reorder(n, f, y, xo, *reduce, xi)
        acc_out = sch.cache_write(conv, 0, "local")
        left = _inline_epilogue(sch, acc_out, epilogue)
        sch.reverse_compute_at(acc_out, xo, preserve_unit_loops=True)
        nf = sch.fuse(n, f)
        if prologue:
            pad = prologue[0]
            out_w = _extent(sch, xo) * chunk
            pad_w = int(sch.get(pad).writes[0].source.shape[3])
            k_w = _extent(sch, reduce[-1])
            deinterleave = out_w > 1 and pad_w % 2 == 0 and (pad_w - k_w) // (out_w - 1) == 2
            if deinterleave:
                # stride 2: even and odd columns of the padded plane stored apart, so every tap
                # reads contiguous vectors (x*2+rx: columns rx%2, from x + rx//2) instead of a gather
                sch.transform_layout(pad, ("write", 0), lambda b, c, h, w: (b, c, h, w % 2, w // 2))
                sch.unroll(reduce[-1])
            sch.compute_at(pad, nf, preserve_unit_loops=True)
            inner = sch.get_loops(pad)[1:]
            try:
                fill = sch.decompose_padding(pad, inner[0])
                for block in (fill, pad):
                    last = sch.get_loops(block)[-1]
                    if deinterleave and _extent(sch, last) % 2 == 0:
                        # one column parity at a time: contiguous vector stores
                        wo, wi = sch.split(last, [None, 2])
                        sch.reorder(wi, wo)
                        sch.unroll(wi)
                        last = wo
                    sch.vectorize(last)
            except (RuntimeError, ValueError):
                sch.vectorize(sch.get_loops(pad)[-1])
        sch.vectorize(xi)
        sch.vectorize(sch.get_loops(acc_out)[-1])
        work = _product(_extent(sch, lp) for lp in sch.get_loops(conv))
        if work >= _MIN_PARALLEL and _extent(sch, nf) > 1:
            sch.parallel(nf)
        sch.decompose_reduction(conv, reduce[0])
        for block in left:
            _schedule_spatial(sch, block, lanes)
        return True


class ReductionVectorized(_CPURule):
    """One reduction block (+ spatial prologue/epilogue): vectorize the innermost non-trivial
    spatial axis outside-in of the reduction loops, parallel outer spatial loops."""

    def schedule(self, sch: s_tir.Schedule, target: Target) -> bool:
        parts = _split_around_reduction(sch)
        if parts is None:
            return False
        prologue, red, epilogue = parts
        # pads (and other injective producers) read in place: a pooling window's select costs
        # less than a separate pass over a padded copy (max_pool2d 3x3/2 at 112x112: 3x faster)
        kept = []
        for block in reversed(prologue):
            try:
                sch.compute_inline(block)
            except (RuntimeError, ValueError):
                kept.insert(0, block)
        prologue = kept
        kind = _iter_kinds(sch, red)
        n_s = len(kind) - len(kind.lstrip("S"))
        loops = sch.get_loops(red)
        spatial, reduce = loops[:n_s], loops[n_s:]
        extents = [_extent(sch, lp) for lp in spatial]
        work = 1
        for e in extents:
            work *= e
        for lp in reduce:
            work *= _extent(sch, lp)
        lanes = _lanes(target)
        # the vector axis: the innermost spatial loop longer than 1
        axis = max((i for i, e in enumerate(extents) if e > 1), default=None)
        acc_out = sch.cache_write(red, 0, "local")
        left = _inline_epilogue(sch, acc_out, epilogue)
        if axis is None:
            sch.reverse_compute_at(acc_out, spatial[-1], preserve_unit_loops=True)
            sch.decompose_reduction(red, reduce[0])
        else:
            ext = extents[axis]
            vec = lanes
            while vec > 4 and ext % vec:
                vec //= 2
            if ext % vec:
                vec = _largest_divisor(ext, lanes)
                if vec < 4 and ext <= 2 * lanes:
                    vec = ext
            # up to 4 vectors of accumulators: independent FMA chains, and longer contiguous
            # reads per reduction step (a GEMV's weight rows)
            groups = ext // vec
            if _product(extents) == ext and groups >= 8:
                # a GEMV (batch-1 dense): few long chunks, each reduction step one contiguous
                # run of a weight row into accumulators kept in L1 (at most 64 vectors)
                chunks = next(d for d in range(2, groups + 1) if groups % d == 0 and groups // d <= 64)
                nv, unroll = groups // chunks, False
            else:
                nv, unroll = _largest_divisor(groups, 4), True
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
            _parallel_fused(sch, outer, work)
            sch.decompose_reduction(red, reduce[0])
        for block in [*prologue, *left]:
            _schedule_spatial(sch, block, lanes)
        return True


class Injective(_CPURule):
    """Spatial blocks only: each block fused, vectorized inside, parallel outside."""

    def schedule(self, sch: s_tir.Schedule, target: Target) -> bool:
        blocks = _root_blocks(sch)
        if not blocks or any(set(_iter_kinds(sch, b)) - {"S"} for b in blocks):
            return False
        lanes = _lanes(target)
        for block in blocks:
            _schedule_spatial(sch, block, lanes)
        return True


class Fallback(_CPURule):
    """Anything else: the outermost data-parallel loop of each root block runs in parallel."""

    def schedule(self, sch: s_tir.Schedule, target: Target) -> bool:  # noqa: ARG002
        changed = False
        for block in _root_blocks(sch):
            loops = sch.get_loops(block)
            if not loops or _iter_kinds(sch, block)[:1] != "S" or not _is_plain(sch, block):
                continue
            if _extent(sch, loops[0]) > 1:
                try:
                    sch.parallel(loops[0])
                    changed = True
                except (RuntimeError, ValueError):
                    continue
        return changed


def default_rules() -> list[dlight.ScheduleRule]:
    """The CPU rules in the order they are tried."""
    return [Conv2dNCHWPacked(), DepthwiseConv2d(), ReductionVectorized(), Injective(), Fallback()]


RULE_ATTR = "legoc.schedule_rule"  # PrimFunc attribute naming the rule that scheduled it


@tvm.transform.module_pass(opt_level=0, name="LegocApplyCPUSchedules")
class ApplyCPUSchedules:
    """Schedule every unscheduled PrimFunc with the first rule that applies (dlight's
    ``ApplyDefaultSchedule``, plus: a rule that raises counts as not applying, and the winning
    rule's name is kept in the PrimFunc attribute ``legoc.schedule_rule``).

    ``strict=True`` (or ``LEGOC_SCHEDULE_STRICT=1``) re-raises a rule's error instead (tests).
    """

    def __init__(self, rules: list | None = None, *, strict: bool | None = None):
        self.rules = list(rules) if rules is not None else default_rules()
        self.strict = strict if strict is not None else os.environ.get(
            "LEGOC_SCHEDULE_STRICT", "") not in ("", "0")

    def transform_module(self, mod: tvm.ir.IRModule, _ctx) -> tvm.ir.IRModule:
        updates = {}
        for gvar, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or _is_scheduled(func):
                continue
            target = func.attrs.get("target") if func.attrs is not None else None
            target = target or Target.current(allow_none=False)
            for rule in self.rules:
                try:
                    sch = rule.apply(func, target, False)
                except Exception:  # noqa: BLE001 - a failing rule must never break a build
                    if self.strict:
                        raise
                    sch = None
                if sch is not None:
                    updates[gvar] = sch.mod["main"].with_attrs(
                        {"tirx.is_scheduled": True, RULE_ATTR: type(rule).__name__}
                    )
                    break
        for gvar, func in updates.items():
            mod[gvar] = func
        return mod


def _is_scheduled(func: tirx.PrimFunc) -> bool:
    attrs = func.attrs
    return attrs is not None and "tirx.is_scheduled" in attrs and bool(attrs["tirx.is_scheduled"])


def scheduled_by(mod: tvm.ir.IRModule) -> dict[str, str]:
    """PrimFunc name -> the rule that scheduled it ("" if none did), for a scheduled module."""
    out = {}
    for gvar, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc):
            attrs = func.attrs
            out[gvar.name_hint] = str(attrs[RULE_ATTR]) if attrs is not None and RULE_ATTR in attrs else ""
    return out


@relax.expr_functor.mutator
class _ConvChannelPadder(relax.PyExprMutator):
    def __init__(self, mod: tvm.ir.IRModule, lanes: int):
        super().__init__(mod)
        self.lanes = lanes
        self.changed = False

    def visit_call_(self, call):  # noqa: D102 - PyExprMutator's hook
        call = super().visit_call_(call)
        if not isinstance(call, relax.Call) or call.op != tvm.ir.Op.get("relax.nn.conv2d"):
            return call
        attrs = call.attrs
        if (int(attrs.groups) != 1 or str(attrs.data_layout) != "NCHW"
                or str(attrs.kernel_layout) != "OIHW" or str(attrs.out_layout) != "NCHW"):
            return call
        weight_info = call.args[1].ty
        if not isinstance(weight_info, relax.TensorType) or weight_info.shape is None \
                or str(weight_info.dtype) != "float32":
            return call
        try:
            out_channels = int(weight_info.shape[0])
        except TypeError:  # symbolic
            return call
        padded, _ = _padded_channels(out_channels, self.lanes)
        if padded == out_channels:
            return call
        self.changed = True
        weight = self.builder_.emit(relax.op.nn.pad(
            call.args[1], [0, padded - out_channels, 0, 0, 0, 0, 0, 0]))
        conv = self.builder_.emit(relax.op.nn.conv2d(
            call.args[0], weight, attrs.strides, attrs.padding, attrs.dilation, 1,
            "NCHW", "OIHW", "NCHW", attrs.out_dtype if str(attrs.out_dtype) else None))
        return relax.op.strided_slice(conv, axes=[1], begin=[0], end=[out_channels])


@tvm.transform.module_pass(opt_level=0, name="LegocPadConvChannels")
class PadConvChannels:
    """Give groups=1 NCHW conv2d a multiple of the vector width of output channels: weights get
    zero filters appended (a small pass per call), the conv runs on the
    :class:`Conv2dNCHWPacked` fast path, and a slice keeps the real channels. Pruned variants
    have arbitrary channel counts (37, 51, ...), which the packed conv cannot vectorize."""

    def __init__(self, lanes: int):
        self.lanes = lanes

    def transform_module(self, mod: tvm.ir.IRModule, _ctx) -> tvm.ir.IRModule:
        padder = _ConvChannelPadder(mod, self.lanes)
        for gvar, func in mod.functions_items():
            if isinstance(func, relax.Function):
                padder.builder_.update_func(gvar, padder.visit_expr(func))
        return padder.builder_.get() if padder.changed else mod


def _packed_conv2d_te(data, packed, strides, top_left, dilation, out_hw):
    """NCHW conv2d over weights packed as [O/B, I, KH, KW, B] (TE; output channels O/B*B),
    ``out_hw`` outputs, input padded by ``top_left`` before and as needed after."""
    from tvm import te, topi  # noqa: PLC0415

    _, _, height, width = (int(d) for d in data.shape)
    blocks, channels, kh, kw, block = (int(d) for d in packed.shape)
    sh, sw = (int(v) for v in strides)
    dh, dw = (int(v) for v in dilation)
    top, left = (int(v) for v in top_left)
    out_h, out_w = (int(v) for v in out_hw)
    bottom = max(0, (out_h - 1) * sh + (kh - 1) * dh + 1 - top - height)
    right = max(0, (out_w - 1) * sw + (kw - 1) * dw + 1 - left - width)
    padded = topi.nn.pad(data, [0, 0, top, left], [0, 0, bottom, right], name="pad_temp")
    rc = te.reduce_axis((0, channels), name="rc")
    ry = te.reduce_axis((0, kh), name="ry")
    rx = te.reduce_axis((0, kw), name="rx")
    return te.compute(
        (int(data.shape[0]), blocks * block, out_h, out_w),
        lambda n, f, y, x: te.sum(
            padded[n, rc, y * sh + ry * dh, x * sw + rx * dw]
            * packed[f // block, rc, ry, rx, f % block], axis=[rc, ry, rx]),
        name="conv2d_nchw_packed",
    )


@relax.expr_functor.mutator
class _ConvWeightPacker(relax.PyExprMutator):
    def __init__(self, mod: tvm.ir.IRModule, lanes: int, regs: int):
        super().__init__(mod)
        self.lanes = lanes
        self.regs = regs
        self.changed = False

    def visit_call_(self, call):  # noqa: D102 - PyExprMutator's hook
        call = super().visit_call_(call)
        weight = _plain_conv_weight(call)
        if weight is None:
            return call
        out_channels = int(weight.ty.shape[0])
        self.changed = True
        attrs = call.attrs
        strides = [int(v) for v in attrs.strides]
        dilation = [int(v) for v in attrs.dilation]
        top, left, bottom, right = (int(v) for v in attrs.padding)
        _, _, height, width = (int(d) for d in call.args[0].ty.shape)
        _, _, kh, kw = (int(d) for d in weight.ty.shape)
        out_h = (height + top + bottom - (kh - 1) * dilation[0] - 1) // strides[0] + 1
        out_w = (width + left + right - (kw - 1) * dilation[1] - 1) // strides[1] + 1
        padded, block = _padded_channels(out_channels, self.lanes, out_w, self.regs)
        rows = _live_taps(height, kh, strides[0], dilation[0], top, out_h)
        cols = _live_taps(width, kw, strides[1], dilation[1], left, out_w)
        if rows is not None and cols is not None and (rows != (0, kh) or cols != (0, kw)):
            # taps that only ever meet padding multiply zeros: drop them (ResNet-18's layer4 at
            # 32x32 input has 1x1 maps: 8 of 9 taps, and 8/9 of the weights it would stream)
            weight = self.builder_.emit(relax.op.strided_slice(
                weight, axes=[2, 3], begin=[rows[0], cols[0]], end=[rows[1], cols[1]]))
            top -= rows[0] * dilation[0]
            left -= cols[0] * dilation[1]
        packed = self.builder_.emit(relax.op.layout_transform(
            weight, lambda o, i, h, w: (o // block, i, h, w, o % block), pad_value=0.0))
        conv = self.builder_.emit(self.builder_.call_te(
            _packed_conv2d_te, call.args[0], packed, strides, [top, left], dilation,
            [out_h, out_w], primfunc_name_hint="conv2d_packed", primfunc_attrs={"op_pattern": 4}))
        if padded == out_channels:
            return conv
        return relax.op.strided_slice(conv, axes=[1], begin=[0], end=[out_channels])


def _acc_registers(regs: int) -> int:
    """Vector registers the conv micro-kernel gives to accumulators: half of 32 (measured best
    on znver4: 2 x 8 tiles); 12 of 16 on AVX2 (the rest: two weight vectors, one broadcast input,
    one spare), as in the 6 x 16 AVX2 GEMM kernels."""
    return regs // 2 if regs > 16 else regs - 4


def _tile(n_f: int, n_x: int, lanes: int, regs: int) -> tuple[int, int]:
    """(channel vectors FB, output columns XB) of the packed conv's register tile: XB divides the
    row width, FB x XB accumulators fit; two channel vectors unless one vector holds a wider
    tile (7- and 14-wide maps: 1 x 7, not 2 x 1 or 2 x 2)."""
    acc = _acc_registers(regs)
    best = (1, _largest_divisor(n_x, acc))
    if n_f % (2 * lanes) == 0:
        xb = _largest_divisor(n_x, max(1, acc // 2))
        if 2 * xb >= best[1]:
            best = (2, xb)
    return best


def _padded_channels(out_channels: int, lanes: int, out_w: int | None = None,
                     regs: int = 32) -> tuple[int, int]:
    """(padded output channels, packing block) for a conv with ``out_channels`` filters and
    ``out_w`` output columns: a few filters (heavily pruned variants: 3, 6) take one short
    vector (4 or 8 lanes), not a whole ``lanes``-wide one; more take a multiple of ``lanes``,
    blocked by the register tile's channel vectors (:func:`_tile`)."""
    for width in (4, 8):
        if width < lanes and out_channels <= width:
            return width, width
    padded = -(-out_channels // lanes) * lanes
    fb = _tile(padded, out_w, lanes, regs)[0] if out_w else (2 if padded % (2 * lanes) == 0 else 1)
    return padded, fb * lanes


def _live_taps(size: int, kernel: int, stride: int, dilation: int, pad: int, out: int):
    """[first, last + 1) of the kernel taps along one axis that read the input (not padding)
    for some output position; None when cropping to them would need a negative pad."""
    live = [r for r in range(kernel)
            if any(0 <= y * stride + r * dilation - pad < size for y in range(out))]
    if not live or pad - live[0] * dilation < 0:
        return None
    return live[0], live[-1] + 1


def _plain_conv_weight(call):
    """The weight of a float32 groups=1 NCHW/OIHW conv2d with static shapes, else None."""
    if not isinstance(call, relax.Call) or call.op != tvm.ir.Op.get("relax.nn.conv2d"):
        return None
    attrs = call.attrs
    if (int(attrs.groups) != 1 or str(attrs.data_layout) != "NCHW"
            or str(attrs.kernel_layout) != "OIHW" or str(attrs.out_layout) != "NCHW"
            or (str(attrs.out_dtype) not in ("", "float32"))):
        return None
    for arg in call.args[:2]:
        info = arg.ty
        if not isinstance(info, relax.TensorType) or info.shape is None \
                or str(info.dtype) != "float32":
            return None
        try:
            [int(d) for d in info.shape]
        except TypeError:  # symbolic shapes
            return None
    return call.args[1]


@tvm.transform.module_pass(opt_level=0, name="LegocPackConvWeights")
class PackConvWeights:
    """Rewrite groups=1 NCHW conv2d into a conv over packed weights ``[O/B, I, KH, KW, B]``
    (B: one or two vector widths; output channels zero-padded to a multiple of the vector
    width, a slice keeps the real ones). The packing is a Relax ``layout_transform`` of the
    weight, so ``relax.transform.LiftTransformParams`` moves it out of ``main`` and it runs once
    at build time (:func:`prepack_weights`), not per call."""

    def __init__(self, lanes: int, regs: int = 32):
        self.lanes = lanes
        self.regs = regs  # vector registers: the register tile decides the packing block

    def transform_module(self, mod: tvm.ir.IRModule, _ctx) -> tvm.ir.IRModule:
        packer = _ConvWeightPacker(mod, self.lanes, self.regs)
        for gvar, func in mod.functions_items():
            if isinstance(func, relax.Function):
                packer.builder_.update_func(gvar, packer.visit_expr(func))
        return packer.builder_.get() if packer.changed else mod


TRANSFORM_PARAMS = "main_transform_params"


def prepack_weights(mod: tvm.ir.IRModule, target: Target) -> tvm.ir.IRModule:
    """``mod`` with packed conv weights (:class:`PackConvWeights`) and every computation on
    weights alone (packing, FC weight transposes, bias reshapes) lifted out of ``main`` into
    ``main_transform_params``: run that once on the weights (at build time) and pass its outputs
    to ``main`` in their place. ``main`` needs the ``num_input`` attribute."""
    with target:
        mod = PackConvWeights(_lanes(target), _num_vector_registers(target))(mod)
        return relax.transform.LiftTransformParams()(mod)


def cpu_pipeline(target: Target, *, schedule: bool = True,
                 before_schedule: tuple = ()) -> tvm.transform.Pass:
    """TVM 0.27's CPU pipeline (``relax.backend.cpu_generic``) with the CPU rules applied after
    operator fusion. ``before_schedule``: passes run between fusion and the rules (the tuning
    database). ``schedule=False`` gives TVM's own pipeline (no schedules)."""

    @tvm.transform.module_pass(opt_level=0, name="LegocCPUPipeline")
    def _pipeline(mod: tvm.ir.IRModule, _ctx: tvm.transform.PassContext) -> tvm.ir.IRModule:
        with target:
            passes = scheduling_passes(target, schedule=schedule, before_schedule=before_schedule)
            return tvm.transform.Sequential(passes + lowering_passes(target))(mod)

    return _pipeline


def scheduling_passes(target: Target, *, schedule: bool = True, before_schedule: tuple = (),
                      rules: list | None = None, strict: bool | None = None) -> list:
    """cpu_generic's passes up to fused PrimFuncs, then legoc's: conv channel padding before
    legalization, ``before_schedule``, then the rules (``rules``: default_rules())."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu  # noqa: PLC0415

    padding = [PadConvChannels(_lanes(target))] if schedule else []
    scheduled = [ApplyCPUSchedules(rules, strict=strict)] if schedule else []
    return (padding + cpu.library_dispatch_passes(target) + cpu.legalize_passes(target)
            + list(before_schedule) + scheduled)


def lowering_passes(target: Target) -> list:
    """cpu_generic's passes after scheduling: dataflow lowering (not exported by TVM 0.27's
    package, copied from its list) and finalization."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu  # noqa: PLC0415

    return [
        relax.transform.RewriteDataflowReshape(),
        relax.transform.ToNonDataflow(),
        relax.transform.RemovePurityChecking(),
        relax.transform.CallTIRRewrite(),
        *cpu.finalize_passes(target),
    ]
