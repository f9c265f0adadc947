"""The target CPU's vector registers, and the packed conv's register tile sized from them."""
from __future__ import annotations

import tvm
from tvm.target import Target
from tvm.target.codegen import llvm_cpu_has_features

from legoc.targets.schedules.analysis import largest_divisor


def vector_isa(target: Target) -> tuple[int, int]:
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


def vector_lanes(target: Target) -> int:
    """fp32 lanes of one vector register of ``target``'s CPU (the packed conv's channel block)."""
    return max(4, vector_isa(target)[0])


def vector_registers(target: Target) -> int:
    """Architectural vector registers (32 on AArch64 and AVX-512 x86, else 16)."""
    return vector_isa(target)[1]


# TVM 0.27 (LowerTVMBuiltin) keeps a constant-size allocation in the global scope on the stack
# only when it is under this many bytes; a larger one is taken from TVM's workspace pool, a call
# in and a call out around every register tile. MobileNetV2's 16- to 32-channel 1x1 convs ran
# 1.3-1.5x slower with 24 accumulators of 64 bytes (1536 B, from the pool) than with 12 or 15.
STACK_BYTES = 1024


def stack_vectors(lanes: int) -> int:
    """Accumulator vectors (fp32, ``lanes`` wide) of a register tile whose cache stays on the
    stack: 15 with AVX-512, 31 with AVX2, 63 with NEON."""
    return (STACK_BYTES - 1) // (4 * lanes)


def acc_vectors(lanes: int, regs: int) -> int:
    """Accumulator vectors of a conv register tile: :func:`acc_registers`, within
    :func:`stack_vectors`."""
    return min(acc_registers(regs), stack_vectors(lanes))


def acc_registers(regs: int) -> int:
    """Vector registers the conv micro-kernel gives to accumulators: half of 32 (2 x 8 tiles);
    12 of 16 on AVX2 (the rest: two weight vectors, one broadcast input, one spare), as in the
    6 x 16 AVX2 GEMM kernels."""
    return regs // 2 if regs > 16 else regs - 4


# Reduction steps (input channels x taps) below which a flat tile loses: its write-back (one
# pixel at a time, across row ends) costs as much as the reduction itself (MobileNetV2's
# 27-step stem lost, ResNet-18's 147-step one gained: 961f73b).
FLAT_MIN_REDUCTION = 64


def register_tile(n_f: int, n_x: int, lanes: int, regs: int, n_y: int | None = None,
                  reduction: int = 0) -> tuple[int, int, bool]:
    """(channel vectors FB, output pixels XB, flat) of the packed conv's register tile.

    Within a row (flat False) XB divides the row width and FB x XB accumulators fit; two channel
    vectors unless one vector holds a wider tile (7- and 14-wide maps: 1 x 7, not 2 x 1 or 2 x 2).
    Given the rows ``n_y`` and a ``reduction`` of at least :data:`FLAT_MIN_REDUCTION` steps
    per output, two channel vectors may instead tile the output plane flattened
    (flat True): XB pixels run across row ends and the last tile is shorter, so XB need not
    divide the width. That is taken when it holds more accumulators: on AVX2 (12) 2 x 6 rather
    than 2 x 4 at 56 and 28 wide and 1 x 7 at 14, 2 x 5 rather than 1 x 7 at 7 wide; on
    AVX-512 the row tile (2 x 7) is already full. A last tile of one pixel is avoided: with it
    the whole conv ran 20-25% slower on AVX2, for a cause not found (76d0d6f)."""
    acc = acc_vectors(lanes, regs)
    best = (1, largest_divisor(n_x, acc))
    if n_f % (2 * lanes) == 0:
        xb = largest_divisor(n_x, max(1, acc // 2))
        if 2 * xb >= best[1]:
            best = (2, xb)
    # x86 only: NEON loads a broadcast from a base register, one per pixel of a flat tile, and
    # the static code got worse (benchmarks/codegen.py, 9fb0534); untimed on a board, not taken
    if n_y is not None and lanes >= 8 and reduction >= FLAT_MIN_REDUCTION and n_f % (2 * lanes) == 0:
        plane = n_y * n_x
        xb = next((x for x in range(min(plane, max(1, acc // 2)), 0, -1) if plane % x != 1), 1)
        if 2 * xb > best[0] * best[1]:
            return 2, xb, True
    return best[0], best[1], False


def pointwise_tile(out_channels: int, plane: int, lanes: int, regs: int) -> tuple[int, int] | None:
    """(output channels FC, pixel vectors XV) of :class:`~legoc.targets.schedules.Conv2dPointwise`'s
    register tile for a 1x1 stride-1 conv with ``plane`` output pixels, or None when the plane
    does not split into whole vectors or fewer than 8 accumulators fit (FMA latency x units).

    FC divides the channels and XV the plane's vectors; the registers left after the FC x XV
    accumulators hold the XV input vectors and one broadcast weight, and the accumulators' cache
    stays on the stack (:func:`stack_vectors`: at most 15 on AVX-512). On x86 a weight is a
    broadcast memory operand of the FMA itself ({1toN}), so the most accumulators win (XV up to
    4; on 28x28 planes, 49 vectors, that is 12 x 1 under the stack cap: 24 x 1 before it, measured
    faster than 3 x 7). NEON (4 lanes,
    32 registers, ``vector_isa``'s aarch64 answer) loads each weight with an instruction of its
    own, so there the most FMAs per load win (XV up to 8): 3 x 7 on 14x14 planes rather than
    24 x 1, which loads a weight for every FMA."""
    if plane % lanes:
        return None
    neon = (lanes, regs) == (4, 32)
    best, best_key = None, None
    for xv in range(1, 9 if neon else 5):
        if (plane // lanes) % xv or regs - xv - 2 < xv:
            continue
        fc = largest_divisor(out_channels, min(regs - xv - 2, stack_vectors(lanes)) // xv)
        if fc * xv < 8:
            continue
        key = (fc * xv / (fc + xv), fc * xv) if neon else (fc * xv, xv)
        if best_key is None or key > best_key:
            best, best_key = (fc, xv), key
    return best


def pixel_tile(out_channels: int, lanes: int, regs: int) -> tuple[int, int]:
    """(output channels FC, pixel vectors XV) of :class:`~legoc.targets.schedules.Conv2dPixels`'s
    register tile: the most accumulators FC x XV (FC dividing ``out_channels``, XV at most 6,
    the fewer pixel vectors on a tie) that leave registers for the XV input vectors and one
    broadcast weight, within :func:`stack_vectors`."""
    best, best_acc = (1, 1), 0
    for xv in range(1, 7):
        for fc in range(out_channels, 0, -1):
            if out_channels % fc == 0 and fc * xv + xv + 1 <= regs and fc * xv <= stack_vectors(lanes):
                if fc * xv > best_acc:
                    best, best_acc = (fc, xv), fc * xv
                break
    return best


def padded_channels(out_channels: int, lanes: int, out_w: int | None = None,
                    regs: int = 32, out_h: int | None = None, reduction: int = 0) -> tuple[int, int]:
    """(padded output channels, packing block) for a conv with ``out_channels`` filters,
    ``out_w`` output columns, ``out_h`` rows and ``reduction`` steps (if known): a few filters
    (heavily pruned variants: 3, 6) take one short vector (4 or 8 lanes), not a whole
    ``lanes``-wide one; more take a multiple of ``lanes``, blocked by the register tile's
    channel vectors (:func:`register_tile`)."""
    for width in (4, 8):
        if width < lanes and out_channels <= width:
            return width, width
    padded = -(-out_channels // lanes) * lanes
    fb = register_tile(padded, out_w, lanes, regs, out_h, reduction)[0] if out_w \
        else (2 if padded % (2 * lanes) == 0 else 1)
    return padded, fb * lanes
