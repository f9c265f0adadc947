"""DepthwiseConv2d: a depthwise NCHW conv2d, one channel per parallel iteration."""
from __future__ import annotations

from tvm import s_tir
from tvm.target import Target

from legoc.targets.schedules.analysis import (extent, iter_kinds, largest_divisor, product,
                                              split_around_reduction)
from legoc.targets.schedules.base import CPURule
from legoc.targets.schedules.common_schedules import (MIN_PARALLEL, accumulator_cache, inline_epilogue,
                                                      schedule_spatial)
from legoc.targets.schedules.isa import vector_isa


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


class DepthwiseConv2d(CPURule):
    """Depthwise NCHW conv2d (+ fused epilogue): one channel per parallel iteration; its padded
    input plane built in a scratch buffer there (zero border, then an unconditional vectorized
    copy), then each output row computed in chunks held in vector registers, the kernel taps
    outside the vector loop. (ReductionVectorized's generic form reads the padding in place, a
    per-lane select per tap, and parallelizes over vector-wide chunks of a row.)"""

    def matches(self, sch: s_tir.Schedule, block) -> bool:
        """Whether the reduction ``block`` is one this rule takes."""
        return _depthwise_reads(sch, block)

    def schedule(self, sch: s_tir.Schedule, target: Target) -> bool:
        parts = split_around_reduction(sch)
        if parts is None:
            return False
        prologue, conv, epilogue = parts
        if iter_kinds(sch, conv) not in ("SSSSRR", "SSSSRRR") or not self.matches(sch, conv):
            return False
        if len(prologue) > 1:
            return False
        lanes, regs = vector_isa(target)
        loops = sch.get_loops(conv)
        n, f, y, x = loops[:4]
        reduce = loops[4:]
        n_x = extent(sch, x)
        # one row chunk's accumulators and the input vectors of one tap in registers, plus the
        # tap's broadcast weight: at most (regs - 2) / 2 vectors a chunk (NEON: 15, so a 112-wide
        # row goes in two chunks of 14; with 28 vectors LLVM kept the accumulators on the stack)
        max_acc = max(lanes, (regs - 2) // 2 * lanes)
        chunk = n_x if n_x <= max_acc else largest_divisor(n_x, max_acc)
        if chunk < lanes and n_x > max_acc:
            return False
        xo, xi = sch.split(x, [None, chunk])
        sch.reorder(n, f, y, xo, *reduce, xi)
        # the chunk as unrolled machine-width vectors (the widest of lanes, lanes/2, lanes/4 that
        # divides it): each tap's weight is then one broadcast register shared by every vector of
        # the chunk. Left as one chunk-wide vector, LLVM splits it after building a chunk-wide
        # broadcast per tap, hoists those out of the row loop and spills them (a 112-wide row:
        # 63 broadcast vectors on the stack, two loads per FMA). x86 only (8 or 16 lanes): NEON's
        # fmla by element reads the weight from a lane, and there the split cost instructions
        # (benchmarks/codegen.py: 317 -> 401 in MobileNetV2's first stride-2 loop)
        vec = next((v for v in (lanes, lanes // 2, lanes // 4)
                    if lanes >= 8 and v >= 4 and chunk % v == 0 and chunk > v), 0)
        split_vec = vec > 0
        if split_vec:
            xm, xi = sch.split(xi, [None, vec])
            sch.unroll(xm)
        acc_out = accumulator_cache(sch, conv)
        left = inline_epilogue(sch, acc_out, epilogue)
        sch.reverse_compute_at(acc_out, xo, preserve_unit_loops=True)
        nf = sch.fuse(n, f)
        if prologue:
            _pad_per_channel(sch, prologue[0], nf, extent(sch, xo) * chunk, reduce[-1])
        sch.vectorize(xi)
        last = sch.get_loops(acc_out)[-1]
        if split_vec:
            outer, last = sch.split(last, [None, vec])
            sch.unroll(outer)
        sch.vectorize(last)
        work = product(extent(sch, lp) for lp in sch.get_loops(conv))
        if work >= MIN_PARALLEL and extent(sch, nf) > 1:
            sch.parallel(nf)
        sch.decompose_reduction(conv, reduce[0])
        for block in left:
            schedule_spatial(sch, block, lanes)
        return True


def _pad_per_channel(sch: s_tir.Schedule, pad, nf, out_w: int, kernel_x) -> None:
    """Build the pad block's plane inside the fused (batch, channel) loop ``nf``: a zero border,
    then the vectorized copy; at stride 2 the plane's even and odd columns are stored apart, so
    every tap reads contiguous vectors (x*2+rx: columns rx%2, from x + rx//2), not a gather."""
    pad_w = int(sch.get(pad).writes[0].source.shape[3])
    k_w = extent(sch, kernel_x)
    deinterleave = out_w > 1 and pad_w % 2 == 0 and (pad_w - k_w) // (out_w - 1) == 2
    if deinterleave:
        sch.transform_layout(pad, ("write", 0), lambda b, c, h, w: (b, c, h, w % 2, w // 2))
        sch.unroll(kernel_x)
    sch.compute_at(pad, nf, preserve_unit_loops=True)
    inner = sch.get_loops(pad)[1:]
    try:
        fill = sch.decompose_padding(pad, inner[0])
        for block in (fill, pad):
            last = sch.get_loops(block)[-1]
            if deinterleave and extent(sch, last) % 2 == 0:
                wo, wi = sch.split(last, [None, 2])
                sch.unroll(wi)
                if block == pad:
                    # the copy: a plain loop over column pairs, each storing its even and odd
                    # column. LLVM's loop vectorizer turns that into whole-vector loads and
                    # shuffles (vpermt2ps with AVX-512); TVM's vectorizer loads each lane of a
                    # stride-2 ramp by itself (a vinsertps per element on x86), which made the
                    # copy most of a stride-2 layer's time
                    continue
                # the fill: one column parity at a time, contiguous vector stores
                sch.reorder(wi, wo)
                last = wo
            sch.vectorize(last)
    except (RuntimeError, ValueError):
        sch.vectorize(sch.get_loops(pad)[-1])
