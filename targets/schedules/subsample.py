"""SubsampleStridedPointwise: a strided 1x1 conv (ResNet's downsample shortcut) run as a
subsampling copy of its input followed by the same conv at stride 1."""
from __future__ import annotations

import tvm
from tvm import relax

from legoc.targets.schedules.rewrite import match_conv2d, rewrite_calls

# output planes (pixels) from which the rewrite is taken: it paid at 28x28 and 14x14 outputs and
# not at 7x7 (benchmarks/kernels.py --cold; timings in 77f9a37 and the README)
MIN_PLANE = 14 * 14


def _rewrite(builder, call):
    weight = match_conv2d(call, packable=True)
    if weight is None:
        return None
    attrs = call.attrs
    strides = [int(v) for v in attrs.strides]
    if ([int(weight.ty.shape[i]) for i in (2, 3)] != [1, 1] or strides == [1, 1]
            or any(int(v) != 0 for v in attrs.padding) or any(int(v) != 1 for v in attrs.dilation)):
        return None
    _, _, out_h, out_w = (int(d) for d in call.ty.shape)
    if out_h * out_w < MIN_PLANE:
        return None
    x = call.args[0]
    height, width = int(x.ty.shape[2]), int(x.ty.shape[3])
    sub = builder.emit(relax.op.strided_slice(x, axes=[2, 3], begin=[0, 0], end=[height, width], strides=strides))
    return relax.op.nn.conv2d(sub, weight, [1, 1], [0, 0, 0, 0], [1, 1], 1, "NCHW", "OIHW", "NCHW",
                              attrs.out_dtype if str(attrs.out_dtype) else None)


@tvm.transform.module_pass(opt_level=0, name="LegocSubsampleStridedPointwise")
class SubsampleStridedPointwise:
    """Rewrite a 1x1 conv2d with stride (sh, sw) != 1, no padding, and an output plane of at
    least :data:`MIN_PLANE` pixels into ``strided_slice`` (every sh-th row, every sw-th column)
    and the conv at stride 1. Read in place, the strided conv touches every cache line of its
    input to use a half or a quarter of it, and its register tile broadcasts every other
    float; the copy streams the input once, and the stride-1 conv reads a dense plane, which
    :class:`~legoc.targets.schedules.Conv2dPointwise` can take."""

    def transform_module(self, mod: tvm.ir.IRModule, _ctx) -> tvm.ir.IRModule:
        return rewrite_calls(mod, _rewrite)
