"""SplitExpandDepthwise: an expansion (1x1 conv + bias + activation) feeding a depthwise conv,
run as channel groups whose expanded activations fit in the core's L2 cache."""
from __future__ import annotations

import tvm
from tvm import relax

from legoc.targets.schedules.rewrite import match_conv2d, rewrite_functions

# expanded activations above SPLIT_BYTES are split into groups of at most GROUP_BYTES. One
# setting for every target (per-target cache sizes are not modelled): the x86 host here has a 2 MB
# L2 per core, where MobileNetV2's 1.8 MB expansions at 56x56 ran faster whole (0.43 ms against
# 0.48 ms split in two, in the model); a Raspberry Pi 4 has 1 MB shared by its four cores.
SPLIT_BYTES = 2 << 20
GROUP_BYTES = 5 << 18   # 1.25 MB
GROUP_CHANNELS = 8      # a group's channels are a multiple of this (whole vectors for the rules)
ACTIVATIONS = ("relax.clip", "relax.nn.relu")


def _call(expr, name: str):
    return expr if isinstance(expr, relax.Call) and getattr(expr.op, "name", "") == name else None


def group_channels(channels: int, plane: int) -> int:
    """Channels per group for an expansion of ``channels`` x ``plane`` float32 activations, or
    0 when it stays whole (up to :data:`SPLIT_BYTES`)."""
    if channels * plane * 4 <= SPLIT_BYTES:
        return 0
    per_group = max(GROUP_CHANNELS, GROUP_BYTES // (plane * 4) // GROUP_CHANNELS * GROUP_CHANNELS)
    while channels % per_group:
        per_group -= GROUP_CHANNELS
    return per_group if 0 < per_group < channels else 0


@relax.expr_functor.mutator
class _Splitter(relax.PyExprMutator):
    def __init__(self, mod: tvm.ir.IRModule):
        super().__init__(mod)
        self.changed = False
        self.users: dict = {}

    def visit_dataflow_block_(self, block):  # noqa: D102 - PyExprMutator's hook
        self.users = relax.analysis.udchain(block)
        return super().visit_dataflow_block_(block)

    def _single_use(self, var) -> bool:
        return isinstance(var, relax.Var) and len(self.users.get(var, ())) == 1

    def _bound(self, var):
        return self.lookup_binding(var) if isinstance(var, relax.Var) else None

    def visit_call_(self, call):  # noqa: D102 - PyExprMutator's hook
        call = super().visit_call_(call)
        found = self._match(call)
        if found is None:
            return call
        expand, bias, act, per_group = found
        self.changed = True
        x, w1 = expand.args
        w2 = call.args[1]
        channels = int(w2.ty.shape[0])
        a1, a2 = expand.attrs, call.attrs
        outs = []
        for start in range(0, channels, per_group):
            end = start + per_group
            emit = self.builder_.emit
            w1g = emit(relax.op.strided_slice(w1, axes=[0], begin=[start], end=[end]))
            bg = emit(relax.op.strided_slice(bias, axes=[1], begin=[start], end=[end]))
            y = emit(relax.op.nn.conv2d(x, w1g, a1.strides, a1.padding, a1.dilation, 1, "NCHW", "OIHW",
                                        "NCHW", a1.out_dtype if str(a1.out_dtype) else None))
            y = emit(relax.op.add(y, bg))
            y = emit(relax.Call(act.op, [y, *act.args[1:]], act.attrs))
            w2g = emit(relax.op.strided_slice(w2, axes=[0], begin=[start], end=[end]))
            outs.append(emit(relax.op.nn.conv2d(y, w2g, a2.strides, a2.padding, a2.dilation, per_group,
                                                "NCHW", "OIHW", "NCHW",
                                                a2.out_dtype if str(a2.out_dtype) else None)))
        return relax.op.concat(outs, axis=1)

    def _match(self, call):
        """(expansion conv, its bias, its activation, channels per group) when ``call`` is a
        depthwise conv2d of an activation of a bias add of a 1x1 stride-1 conv, each used once,
        whose output is too large for the L2; else None."""
        if _call(call, "relax.nn.conv2d") is None:
            return None
        attrs = call.attrs
        channels = int(attrs.groups)
        weight = call.args[1]
        # stride 1 would need a concat as large as the expansion itself: only strided ones
        if (channels == 1 or all(int(v) == 1 for v in attrs.strides)
                or str(attrs.data_layout) != "NCHW" or str(attrs.kernel_layout) != "OIHW"
                or not isinstance(weight.ty, relax.TensorType) or weight.ty.shape is None
                or [int(weight.ty.shape[i]) for i in (0, 1)] != [channels, 1]):
            return None
        act_var = call.args[0]
        act = self._bound(act_var)
        if act is None or getattr(act.op, "name", "") not in ACTIVATIONS or not self._single_use(act_var):
            return None
        add = _call(self._bound(act.args[0]), "relax.add")
        if add is None or not self._single_use(act.args[0]):
            return None
        expand = self._bound(add.args[0])
        bias = add.args[1]
        if (match_conv2d(expand, packable=True) is None or not self._single_use(add.args[0])
                or not isinstance(bias.ty, relax.TensorType) or bias.ty.shape is None):
            return None
        out_channels, _, kh, kw = (int(d) for d in expand.args[1].ty.shape)
        if (out_channels != channels or (kh, kw) != (1, 1)
                or [int(d) for d in bias.ty.shape] != [1, channels, 1, 1]
                or any(int(v) != 1 for v in expand.attrs.strides)
                or any(int(v) != 0 for v in expand.attrs.padding)):
            return None
        n, _, height, width = (int(d) for d in expand.args[0].ty.shape)
        per_group = group_channels(channels, n * height * width)
        return (expand, bias, act, per_group) if per_group else None


@tvm.transform.module_pass(opt_level=0, name="LegocSplitExpandDepthwise")
class SplitExpandDepthwise:
    """Run a 1x1 expansion (+ bias + ReLU/clip) and the strided depthwise conv it feeds as
    channel groups, when the expanded activations exceed :data:`SPLIT_BYTES`: each group's
    expansion is written and at once read back by its depthwise conv while it is still in the
    L2 cache, and a concat joins the groups' outputs (a quarter of the expansion's size at
    stride 2; at stride 1 it would cost what the groups save, so those are left whole). MobileNetV2's first expansion writes 4.8 MB at 112x112
    (the L2 here holds 2 MB); in the whole model it took 1.08 ms against 0.76 ms alone, and the
    depthwise conv reading it 0.57 against 0.44 (``benchmarks/kernels.py --chain``). In a prepacked
    build (:func:`~legoc.targets.schedules.prepack_weights`) an inverted residual is channel-blocked
    before this runs and so stays whole: blocked, the pair is faster whole than split."""

    def transform_module(self, mod: tvm.ir.IRModule, _ctx) -> tvm.ir.IRModule:
        out = rewrite_functions(mod, _Splitter(mod))
        return relax.transform.DeadCodeElimination()(out) if out is not mod else mod
