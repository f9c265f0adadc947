"""PadConvChannels: conv2d output channels padded to the vector width, before legalization."""
from __future__ import annotations

import tvm
from tvm import relax

from legoc.targets.schedules.isa import padded_channels
from legoc.targets.schedules.rewrite import match_conv2d, rewrite_functions, takes_pointwise


@relax.expr_functor.mutator
class _ConvChannelPadder(relax.PyExprMutator):
    def __init__(self, mod: tvm.ir.IRModule, lanes: int, regs: int):
        super().__init__(mod)
        self.lanes = lanes
        self.regs = regs
        self.changed = False

    def visit_call_(self, call):  # noqa: D102 - PyExprMutator's hook
        call = super().visit_call_(call)
        weight = match_conv2d(call)
        if weight is None or takes_pointwise(call, self.lanes, self.regs):
            return call
        out_channels = int(weight.ty.shape[0])
        padded, _ = padded_channels(out_channels, self.lanes)
        if padded == out_channels:
            return call
        self.changed = True
        attrs = call.attrs
        weight = self.builder_.emit(relax.op.nn.pad(
            weight, [0, padded - out_channels, 0, 0, 0, 0, 0, 0]))
        conv = self.builder_.emit(relax.op.nn.conv2d(
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
        return rewrite_functions(mod, _ConvChannelPadder(mod, self.lanes, self.regs))
