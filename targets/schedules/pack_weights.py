"""PackConvWeights and prepack_weights: conv2d weights packed ``[O/B, I, KH, KW, B]`` once, at
build time, instead of per call."""
from __future__ import annotations

import tvm
from tvm import relax
from tvm.target import Target

from legoc.targets.schedules.isa import padded_channels, vector_lanes, vector_registers
from legoc.targets.schedules.rewrite import match_conv2d, rewrite_calls, takes_pointwise

TRANSFORM_PARAMS = "main_transform_params"


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


def _live_taps(size: int, kernel: int, stride: int, dilation: int, pad: int, out: int):
    """[first, last + 1) of the kernel taps along one axis that read the input (not padding)
    for some output position; None when cropping to them would need a negative pad."""
    live = [r for r in range(kernel)
            if any(0 <= y * stride + r * dilation - pad < size for y in range(out))]
    if not live or pad - live[0] * dilation < 0:
        return None
    return live[0], live[-1] + 1


def _pack_weights(builder, call, lanes: int, regs: int):
    """A conv2d over weights packed ``[O/B, I, KH, KW, B]`` (taps that only meet padding
    dropped; a slice keeps the real channels), or None where the conv is not packed."""
    weight = match_conv2d(call, packable=True)
    if weight is None or takes_pointwise(call, lanes, regs):
        return None
    out_channels = int(weight.ty.shape[0])
    attrs = call.attrs
    strides = [int(v) for v in attrs.strides]
    dilation = [int(v) for v in attrs.dilation]
    top, left, bottom, right = (int(v) for v in attrs.padding)
    _, _, height, width = (int(d) for d in call.args[0].ty.shape)
    _, _, kh, kw = (int(d) for d in weight.ty.shape)
    out_h = (height + top + bottom - (kh - 1) * dilation[0] - 1) // strides[0] + 1
    out_w = (width + left + right - (kw - 1) * dilation[1] - 1) // strides[1] + 1
    rows = _live_taps(height, kh, strides[0], dilation[0], top, out_h)
    cols = _live_taps(width, kw, strides[1], dilation[1], left, out_w)
    taps = kh * kw if rows is None or cols is None else \
        (rows[1] - rows[0]) * (cols[1] - cols[0])   # as many as the conv below keeps
    padded, block = padded_channels(out_channels, lanes, out_w, regs, out_h,
                                    int(weight.ty.shape[1]) * taps)
    if rows is not None and cols is not None and (rows != (0, kh) or cols != (0, kw)):
        # taps that only ever meet padding multiply zeros: drop them (a 3x3 conv on a 1x1
        # map keeps 1 of its 9 taps, and streams 1/9 of the weights)
        weight = builder.emit(relax.op.strided_slice(
            weight, axes=[2, 3], begin=[rows[0], cols[0]], end=[rows[1], cols[1]]))
        top -= rows[0] * dilation[0]
        left -= cols[0] * dilation[1]
    packed = builder.emit(relax.op.layout_transform(
        weight, lambda o, i, h, w: (o // block, i, h, w, o % block), pad_value=0.0))
    conv = builder.emit(builder.call_te(
        _packed_conv2d_te, call.args[0], packed, strides, [top, left], dilation,
        [out_h, out_w], primfunc_name_hint="conv2d_packed", primfunc_attrs={"op_pattern": 4}))
    if padded == out_channels:
        return conv
    return relax.op.strided_slice(conv, axes=[1], begin=[0], end=[out_channels])


@tvm.transform.module_pass(opt_level=0, name="LegocPackConvWeights")
class PackConvWeights:
    """Rewrite groups=1 NCHW conv2d into a conv over packed weights ``[O/B, I, KH, KW, B]``
    (B: one or two vector widths; output channels zero-padded to a multiple of the vector
    width, a slice keeps the real ones). Convs that :class:`~legoc.targets.schedules.Conv2dPointwise`
    takes keep their weights as they are. The packing is a Relax ``layout_transform`` of the
    weight, so ``relax.transform.LiftTransformParams`` moves it out of ``main`` and it runs once
    at build time (:func:`prepack_weights`), not per call."""

    def __init__(self, lanes: int, regs: int = 32):
        self.lanes = lanes
        self.regs = regs  # vector registers: the register tile decides the packing block

    def transform_module(self, mod: tvm.ir.IRModule, _ctx) -> tvm.ir.IRModule:
        return rewrite_calls(mod, lambda builder, call: _pack_weights(builder, call, self.lanes, self.regs))


def prepack_weights(mod: tvm.ir.IRModule, target: Target, *, winograd: bool = True) -> tvm.ir.IRModule:
    """``mod`` with packed conv weights (:class:`PackConvWeights`) and every computation on
    weights alone (packing, FC weight transposes, bias reshapes) lifted out of ``main`` into
    ``main_transform_params``: run that once on the weights (at build time) and pass its outputs
    to ``main`` in their place. ``main`` needs the ``num_input`` attribute. ``winograd=False``
    keeps 3x3 convs direct (:class:`~legoc.targets.schedules.WinogradConv3x3` not run)."""
    from legoc.targets.schedules.block_layout import BlockInvertedResidual  # noqa: PLC0415
    from legoc.targets.schedules.pixel_conv import PixelVectorConv  # noqa: PLC0415
    from legoc.targets.schedules.split_expand import SplitExpandDepthwise  # noqa: PLC0415
    from legoc.targets.schedules.subsample import SubsampleStridedPointwise  # noqa: PLC0415
    from legoc.targets.schedules.winograd import WinogradConv3x3  # noqa: PLC0415

    with target:
        mod = SubsampleStridedPointwise()(mod)   # first: its stride-1 conv is the one packed
        # inverted residuals go channel-blocked first (their convs are not packed here): blocked,
        # a large expansion and the strided depthwise conv reading it run faster whole than as
        # split groups joined by a concat; then the expansions left unblocked are split, so that
        # the groups' convs are the ones packed (or left to Conv2dPointwise)
        mod = BlockInvertedResidual(vector_lanes(target))(mod)
        mod = SplitExpandDepthwise()(mod)
        # convs of few filters: vectors of pixels, not packed
        mod = PixelVectorConv(vector_lanes(target), vector_registers(target))(mod)
        # large 3x3 stride-1 convs as Winograd F(4x4, 3x3), their filters transformed here
        if winograd:
            mod = WinogradConv3x3(vector_lanes(target))(mod)
        mod = PackConvWeights(vector_lanes(target), vector_registers(target))(mod)
        return relax.transform.LiftTransformParams()(mod)
