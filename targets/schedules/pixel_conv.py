"""PixelVectorConv: a stride-1 conv2d with too few output channels for whole channel vectors
(:func:`few_filters`), computed with vectors of output pixels (over the padded plane, flattened)
instead of vectors of output channels."""
from __future__ import annotations

import tvm
from tvm import relax

from legoc.targets.schedules.isa import pixel_tile
from legoc.targets.schedules.rewrite import match_conv2d, rewrite_calls

# output pixels computed per real one (the padded row's extra columns, the last tile's overrun)
# above which the rewrite is not taken: those are FMAs thrown away
MAX_WASTE = 1.25

PIXELS_CONV = "conv2d_nchw_pixels"   # the TE compute's name, which the rule matches


def _positions(out_h: int, padded_width: int, tile: int) -> int:
    """Positions the pixel conv computes: the output rows at the padded width, rounded up to
    whole register tiles."""
    return -(-out_h * padded_width // tile) * tile


def _pixel_conv2d_te(data, weight, pads, out_hw, tile):
    """NCHW conv2d at stride 1 over ``data`` padded by ``pads`` (top, left, bottom, right):
    the padded input (``pad_temp``, with rows added below for the last tile's overrun) read
    as one flat row per channel, the conv computed at every position ``p = y * Wp + x`` of the
    padded width ``Wp`` (``conv2d_nchw_pixels``, a multiple of ``tile`` positions; those with
    ``x >= out_w`` are thrown away), then the real columns copied out as NCHW
    (``pixels_to_nchw``). The flat read is ``pad_temp[n, c, q // Wp, q % Wp]``; the rule
    stores ``pad_temp`` flat, which makes it ``pad_temp[n, c, q]``."""
    from tvm import te, topi  # noqa: PLC0415

    batch, channels, height, width = (int(d) for d in data.shape)
    filters, _, kh, kw = (int(d) for d in weight.shape)
    top, left, _bottom, right = (int(v) for v in pads)
    out_h, out_w = (int(v) for v in out_hw)
    wp = width + left + right
    positions = _positions(out_h, wp, tile)
    rows = -(-(positions + (kh - 1) * wp + kw - 1) // wp)   # padded rows read, overrun included
    padded = topi.nn.pad(data, [0, 0, top, left], [0, 0, rows - top - height, right], name="pad_temp")
    rc = te.reduce_axis((0, channels), name="rc")
    ry = te.reduce_axis((0, kh), name="ry")
    rx = te.reduce_axis((0, kw), name="rx")

    def flat(n, c, q):
        return padded[n, c, q // wp, q % wp]

    conv = te.compute(
        (batch, filters, positions),
        lambda n, f, p: te.sum(flat(n, rc, p + ry * wp + rx) * weight[f, rc, ry, rx], axis=[rc, ry, rx]),
        name=PIXELS_CONV)
    return te.compute((batch, filters, out_h, out_w), lambda n, f, y, x: conv[n, f, y * wp + x],
                      name="pixels_to_nchw")


def few_filters(filters: int, lanes: int) -> bool:
    """Whether a conv's ``filters`` are too few for the packed conv's channel vectors: fewer
    than one vector, or one vector and a second at most half full, which the packed conv would
    pad (a quarter or more of its work on zero filters). Timed on AVX2 (3053dc4): pixel vectors
    won at 9, 10 and 12 filters, lost at 13 and 15, and tied at 8 (one whole vector)."""
    return filters < lanes or (filters < 2 * lanes and 0 < filters % lanes <= lanes // 2)


def pixel_tile_positions(filters: int, kernel: tuple[int, int], out_hw: tuple[int, int], padded_width: int,
                         lanes: int, regs: int) -> int | None:
    """Positions per register tile (``XV x lanes``) of the pixel conv of a stride-1 conv2d with
    ``filters`` output channels, or None when :class:`PixelVectorConv` does not take it: a
    1x1 kernel (:class:`~legoc.targets.schedules.Conv2dPointwise` is the pixel-vector rule for
    those), filters that channel vectors hold well (:func:`few_filters`), or more than
    :data:`MAX_WASTE` positions per output."""
    out_h, out_w = out_hw
    if not few_filters(filters, lanes) or kernel == (1, 1):
        return None
    tile = pixel_tile(filters, lanes, regs)[1] * lanes
    return tile if _positions(out_h, padded_width, tile) <= MAX_WASTE * out_h * out_w else None


def pixel_conv_plan(call, lanes: int, regs: int):
    """(pads, (out_h, out_w), tile positions) when :class:`PixelVectorConv` takes this conv2d
    (groups=1, stride 1, dilation 1, :func:`pixel_tile_positions`), else None."""
    weight = match_conv2d(call, packable=True)
    if weight is None:
        return None
    attrs = call.attrs
    if any(int(v) != 1 for v in attrs.strides) or any(int(v) != 1 for v in attrs.dilation):
        return None
    filters, _, kh, kw = (int(d) for d in weight.ty.shape)
    _, _, out_h, out_w = (int(d) for d in call.ty.shape)
    pads = [int(v) for v in attrs.padding]
    wp = int(call.args[0].ty.shape[3]) + pads[1] + pads[3]
    tile = pixel_tile_positions(filters, (kh, kw), (out_h, out_w), wp, lanes, regs)
    return None if tile is None else (pads, (out_h, out_w), tile)


def _rewrite(builder, call, lanes: int, regs: int):
    plan = pixel_conv_plan(call, lanes, regs)
    if plan is None:
        return None
    pads, out_hw, tile = plan
    return builder.call_te(_pixel_conv2d_te, call.args[0], call.args[1], pads, list(out_hw), tile,
                           primfunc_name_hint="conv2d_pixels", primfunc_attrs={"op_pattern": 4})


@tvm.transform.module_pass(opt_level=0, name="LegocPixelVectorConv")
class PixelVectorConv:
    """Rewrite a stride-1 groups=1 NCHW conv2d with too few output channels for the vector width
    (:func:`few_filters`: a heavily pruned variant, 4 of 16 or 12 of 16 on AVX2) into
    :func:`_pixel_conv2d_te`, which :class:`~legoc.targets.schedules.Conv2dPixels` schedules
    with vectors of output pixels. Channel vectors of 4 lanes on an 8-lane CPU do half the work
    per FMA, and 12 filters padded to 16 a quarter on zeros; pixel vectors are full, at the
    price of the padded row's extra columns (2 of 30 for a 3x3 conv on 28x28)."""

    def __init__(self, lanes: int, regs: int):
        self.lanes, self.regs = lanes, regs

    def transform_module(self, mod: tvm.ir.IRModule, _ctx) -> tvm.ir.IRModule:
        return rewrite_calls(mod, lambda builder, call: _rewrite(builder, call, self.lanes, self.regs))
