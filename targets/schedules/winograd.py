"""WinogradConv3x3: a 3x3 stride-1 conv2d as Winograd's F(4x4, 3x3) minimal filtering (F(2x2,
3x3) on maps whose sides are even but not multiples of 4), its weights transformed once at
build time.

A 3x3 conv computes each 4x4 output tile from a 6x6 input tile in 16 x 9 = 144 multiplies per
input and output channel; F(4x4, 3x3) takes 36 (Lavin and Gray, 2016): the input tile is
transformed (``B^T d B``), multiplied element by element with the transformed filter
(``U = G g G^T``), summed over input channels, which makes 36 independent matrix products
``[tiles x C] x [C x K]``, and transformed back (``A^T m A``). The multiplies per output fall
4x (F(2x2, 3x3): 2.25x); the transforms are additions and multiplies by small constants. The matrices are TVM's
(``tvm.topi.nn.winograd_util``): Cook-Toom with the interpolation points 0, -1, 1, 1/2, -2 (F(2, 3): 0, -1, 1)
that Barabasz et al. found most accurate (the rule's test bounds the error against
PyTorch).

The rewrite runs in :func:`~legoc.targets.schedules.prepack_weights` only: the filter transform
is Relax ops on the weight, so ``LiftTransformParams`` moves it to build time. It takes a conv
(+ whatever FuseOps fuses after it) when :func:`winograd_tile` gives it a tile; its PrimFunc is
scheduled by :class:`~legoc.targets.schedules.Conv2dWinograd`.
"""
from __future__ import annotations

import functools

import numpy as np
import tvm
from tvm import relax

from legoc.targets.schedules.rewrite import match_conv2d, rewrite_calls

TILES = (4, 2)      # output tiles, preferred first: F(4x4, 3x3), else F(2x2, 3x3)
KERNEL = 3
NAME = "conv2d_winograd"   # the PrimFunc's name hint and its blocks' prefix (the rule matches it)

# which convs are taken (benchmarks/winograd.py, 2 threads, AVX-512, single runs; the README has
# the table): Winograd ran 0.49-0.98x the direct conv's time with 16 to 256 channels on maps of
# 8x8 to 56x56 (16 -> 16 at 28x28 0.97x; one loss kept, 16 -> 16 at 16x16: 1.11x of 0.013 ms),
# and lost where the filters, 4x their direct size once transformed (F(2x2, 3x3): 1.8x), serve
# few tiles (256 and 512 channels at 8x8, 2.4 and 9.4 MB per tile: 1.07-1.3x; 512 at 4x4: 2x)
# or there are few input channels (3 -> 64 at 32x32: 1.33x)
MIN_CHANNELS = 16                  # input and output channels, each
MAX_FILTER_BYTES_PER_TILE = 1 << 20


@functools.cache
def matrices(tile: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A [a, m], B [a, a], G [a, 3]) of F(m x m, 3x3), m = ``tile``, a = m + 2, float64:
    ``Y = A^T [(G g G^T) * (B^T d B)] A``."""
    from tvm.topi.nn.winograd_util import _cook_toom_convolution, _interpolation_points  # noqa: PLC0415

    a, b, g = _cook_toom_convolution(_interpolation_points(tile + KERNEL - 2), tile, KERNEL)
    return tuple(np.asarray(x, dtype=np.float64) for x in (a, b, g))


def tile_for(height: int, width: int) -> int | None:
    """The output tile of a ``height`` x ``width`` map: the largest of :data:`TILES` that
    divides both (4 at 56 and 28, 2 at 14), or None."""
    return next((t for t in TILES if height % t == 0 and width % t == 0), None)


def takes_winograd(call, lanes: int) -> bool:
    """Whether this conv2d runs as Winograd (:func:`winograd_tile`)."""
    return winograd_tile(call, lanes) is not None


def winograd_tile(call, lanes: int) -> int | None:
    """The output tile this conv2d runs with as Winograd, or None where it stays direct. Taken:
    groups 1, 3x3, stride 1, dilation 1, padding 1 on every side (output as large as the input),
    rows and columns whole tiles (:func:`tile_for`), output channels whole vectors of ``lanes``,
    at least :data:`MIN_CHANNELS` channels in and out, and transformed filters of at most
    :data:`MAX_FILTER_BYTES_PER_TILE` per output tile."""
    weight = match_conv2d(call, packable=True)
    if weight is None:
        return None
    attrs = call.attrs
    out_channels, in_channels, kh, kw = (int(d) for d in weight.ty.shape)
    _, _, height, width = (int(d) for d in call.args[0].ty.shape)
    tile = tile_for(height, width)
    taken = (tile is not None and (kh, kw) == (KERNEL, KERNEL)
             and all(int(v) == 1 for v in attrs.strides) and all(int(v) == 1 for v in attrs.dilation)
             and all(int(v) == 1 for v in attrs.padding)
             and out_channels % lanes == 0 and min(in_channels, out_channels) >= MIN_CHANNELS
             and (tile + KERNEL - 1) ** 2 * in_channels * out_channels * 4
             <= MAX_FILTER_BYTES_PER_TILE * (height // tile) * (width // tile))
    return tile if taken else None


def _linear(coefs, term):
    """sum of ``coefs[i] * term(i)`` over the nonzero coefficients (+-1 as adds and subtracts)."""
    from tvm import tirx  # noqa: PLC0415

    out = None
    for i, c in enumerate(coefs):
        if c == 0:
            continue
        t = term(i)
        t = t if c == 1 else -t if c == -1 else t * tirx.const(float(c), "float32")
        out = t if out is None else out + t
    return out if out is not None else tirx.const(0.0, "float32")


def _piecewise(var, n: int, expr):
    """``expr(i)`` where ``var == i``, for i < n: a Select chain the schedule unrolls away."""
    from tvm import tirx  # noqa: PLC0415

    out = expr(n - 1)
    for i in range(n - 2, -1, -1):
        out = tirx.Select(var == i, expr(i), out)
    return out


def winograd_te(data, packed):
    """F(m x m, 3x3) conv2d of NCHW ``data`` (padding 1) with filters transformed and packed
    ``[a * a, K/B, C, B]`` (a = m + 2; TE; every stage named ``conv2d_winograd_*`` for the rule):

    * ``pad``: the input padded by 1 (and on the right to whole m-column phases);
    * ``phase``: each padded row split into its m column phases, ``[.., y, j, x / m]``, so that
      the tiles' columns, m apart in a row, are contiguous in a phase;
    * ``rows``, ``input``: ``B^T d B`` in two passes (columns of the tile, then rows), each a
      sum of the nonzero terms;
    * ``gemm``: the a * a products over input channels, ``[n, a * a, K/B, tile row, tile, B]``;
    * ``cols``, the output: ``A^T m A`` in two passes, written NCHW."""
    from tvm import te, topi  # noqa: PLC0415

    batch, channels, height, width = (int(d) for d in data.shape)
    squared, blocks, _, block = (int(d) for d in packed.shape)
    alpha = int(round(squared ** 0.5))
    m = alpha - KERNEL + 1   # the output tile
    a_mat, b_mat, _ = matrices(m)
    rows, cols = height // m, width // m
    padded = topi.nn.pad(data, [0, 0, 1, 1], [0, 0, 1, m * (cols + 1) - width - 1],
                         name=f"{NAME}_pad")
    phase = te.compute((batch, channels, height + 2, m, cols + 1),
                       lambda n, c, y, j, x: padded[n, c, y, x * m + j], name=f"{NAME}_phase")
    # B^T d: [n, c, tile row, tile, eps, s]
    partial = te.compute(
        (batch, channels, rows, cols, alpha, alpha),
        lambda n, c, ty, tx, e, s: _piecewise(e, alpha, lambda ei: _linear(
            b_mat[:, ei], lambda r: phase[n, c, ty * m + r, s % m, tx + s // m])),
        name=f"{NAME}_rows")
    # (B^T d) B: [a * a, n, c, tile row, tile]
    transformed = te.compute(
        (alpha * alpha, batch, channels, rows, cols),
        lambda a, n, c, ty, tx: _piecewise(a % alpha, alpha, lambda nu: _linear(
            b_mat[:, nu], lambda s: partial[n, c, ty, tx, a // alpha, s])),
        name=f"{NAME}_input")
    rc = te.reduce_axis((0, channels), name="rc")
    product = te.compute(
        (batch, alpha * alpha, blocks, rows, cols, block),
        lambda n, a, kb, ty, tx, b: te.sum(transformed[a, n, rc, ty, tx] * packed[a, kb, rc, b], axis=rc),
        name=f"{NAME}_gemm")
    # (products) A: [n, k, tile row, tile, eps, x]
    half = te.compute(
        (batch, blocks * block, rows, cols, alpha, m),
        lambda n, k, ty, tx, e, x: _piecewise(x, m, lambda xi: _linear(
            a_mat[:, xi], lambda nu: product[n, e * alpha + nu, k // block, ty, tx, k % block])),
        name=f"{NAME}_cols")
    return te.compute(
        (batch, blocks * block, height, width),
        lambda n, k, h, w: _piecewise(h % m, m, lambda yi: _linear(
            a_mat[:, yi], lambda e: half[n, k, h // m, w // m, e, w % m])),
        name=NAME)


def _transform_filters(builder, weight, lanes: int, tile: int):
    """``G g G^T`` of OIHW ``weight`` as Relax ops, packed ``[a * a, K/B, C, B]`` (B = ``lanes``)."""
    _, _, g_mat = matrices(tile)
    alpha = tile + KERNEL - 1
    out_channels, in_channels = int(weight.ty.shape[0]), int(weight.ty.shape[1])
    g = relax.const(g_mat.astype("float32"))
    gt = relax.const(np.ascontiguousarray(g_mat.T).astype("float32"))
    emit = builder.emit
    u = emit(relax.op.matmul(emit(relax.op.matmul(g, weight)), gt))       # [K, C, a, a]
    u = emit(relax.op.reshape(u, [out_channels // lanes, lanes, in_channels, alpha * alpha]))
    return emit(relax.op.permute_dims(u, [3, 0, 2, 1]))                     # [a * a, K/B, C, B]


def _rewrite(builder, call, lanes: int):
    tile = winograd_tile(call, lanes)
    if tile is None:
        return None
    packed = _transform_filters(builder, call.args[1], lanes, tile)
    return builder.call_te(winograd_te, call.args[0], packed, primfunc_name_hint=NAME,
                           primfunc_attrs={"op_pattern": 4})


@tvm.transform.module_pass(opt_level=0, name="LegocWinogradConv3x3")
class WinogradConv3x3:
    """Rewrite the 3x3 stride-1 conv2d that :func:`winograd_tile` takes into Winograd's
    F(4x4, 3x3) or F(2x2, 3x3) (:func:`winograd_te`) over filters transformed by Relax ops (lifted to build time by
    :func:`~legoc.targets.schedules.prepack_weights`). ``op_pattern`` 4: bias, ReLU and a
    residual add after it fuse into its PrimFunc, written with its output."""

    def __init__(self, lanes: int):
        self.lanes = lanes

    def transform_module(self, mod: tvm.ir.IRModule, _ctx) -> tvm.ir.IRModule:
        return rewrite_calls(mod, lambda builder, call: _rewrite(builder, call, self.lanes))
