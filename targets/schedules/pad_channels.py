"""PadConvChannels: conv2d output channels padded to the vector width, before legalization."""
from __future__ import annotations

import tvm
from tvm import relax

from legoc.targets.schedules.isa import padded_channels
from legoc.targets.schedules.rewrite import match_conv2d, rewrite_calls, takes_pointwise


def _pad_channels(builder, call, lanes: int, regs: int):
    """A conv2d with its output channels padded to a multiple of the vector width (zero filters
    appended, a slice keeps the real ones), or None where the conv needs no padding."""
    weight = match_conv2d(call)
    if weight is None or takes_pointwise(call, lanes, regs):
        return None
    out_channels = int(weight.ty.shape[0])
    padded, _ = padded_channels(out_channels, lanes)
    if padded == out_channels:
        return None
    attrs = call.attrs
    weight = builder.emit(relax.op.nn.pad(weight, [0, padded - out_channels, 0, 0, 0, 0, 0, 0]))
    conv = builder.emit(relax.op.nn.conv2d(
        call.args[0], weight, attrs.strides, attrs.padding, attrs.dilation, 1,
        "NCHW", "OIHW", "NCHW", attrs.out_dtype if str(attrs.out_dtype) else None))
    return relax.op.strided_slice(conv, axes=[1], begin=[0], end=[out_channels])


@tvm.transform.module_pass(opt_level=0, name="LegocPadConvChannels")
class PadConvChannels:
    """Give groups=1 NCHW conv2d a multiple of the vector width of output channels: weights get
    zero filters appended (a small pass per call), the conv runs on the
    :class:`~legoc.targets.schedules.Conv2dNCHWPacked` fast path, and a slice keeps the real
    channels. Pruned variants have arbitrary channel counts (37, 51, ...), which the packed conv
    cannot vectorize. Convs that :class:`~legoc.targets.schedules.Conv2dPointwise` takes are
    left alone: it vectorizes over pixels, not channels."""

    def __init__(self, lanes: int, regs: int = 32):
        self.lanes = lanes
        self.regs = regs

    def transform_module(self, mod: tvm.ir.IRModule, _ctx) -> tvm.ir.IRModule:
        return rewrite_calls(mod, lambda builder, call: _pad_channels(builder, call, self.lanes, self.regs))
