"""What the Relax rewrites (:mod:`.pad_channels`, :mod:`.pack_weights`) share: matching the
conv2d they handle, and running a mutator over a module's Relax functions."""
from __future__ import annotations

import tvm
from tvm import relax


def match_conv2d(call, *, packable: bool = False):
    """The weight of ``call`` if it is a conv2d the rewrites handle, else None: groups=1, NCHW
    data, OIHW weight, NCHW output, a float32 weight with a static number of filters.
    ``packable``: also float32 data and output, every shape static (the packed TE conv's needs)."""
    if not isinstance(call, relax.Call) or call.op != tvm.ir.Op.get("relax.nn.conv2d"):
        return None
    attrs = call.attrs
    if (int(attrs.groups) != 1 or str(attrs.data_layout) != "NCHW"
            or str(attrs.kernel_layout) != "OIHW" or str(attrs.out_layout) != "NCHW"):
        return None
    if packable and str(attrs.out_dtype) not in ("", "float32"):
        return None
    for arg in call.args[:2] if packable else call.args[1:2]:
        info = arg.ty
        if not isinstance(info, relax.TensorType) or info.shape is None \
                or str(info.dtype) != "float32":
            return None
        try:
            [int(d) for d in (info.shape if packable else [info.shape[0]])]
        except TypeError:  # symbolic shapes
            return None
    return call.args[1]


def takes_pointwise(call, lanes: int, regs: int) -> bool:
    """Whether :class:`~legoc.targets.schedules.Conv2dPointwise` will schedule this conv2d (a
    1x1 stride-1 unpadded conv over a plane of whole vectors): the rewrites then leave it as it
    is, since that rule needs neither padded output channels nor packed weights."""
    from legoc.targets.schedules.isa import pointwise_tile  # noqa: PLC0415 - isa imports nothing of ours but analysis

    weight = match_conv2d(call, packable=True)
    if weight is None:
        return False
    attrs = call.attrs
    out_channels, _, kh, kw = (int(d) for d in weight.ty.shape)
    if (kh, kw) != (1, 1) or any(int(v) != 1 for v in attrs.strides) \
            or any(int(v) != 0 for v in attrs.padding):
        return False
    _, _, height, width = (int(d) for d in call.args[0].ty.shape)
    return pointwise_tile(out_channels, height * width, lanes, regs) is not None


def rewrite_functions(mod: tvm.ir.IRModule, mutator) -> tvm.ir.IRModule:
    """Every Relax function of ``mod`` through ``mutator`` (a ``PyExprMutator`` on ``mod`` with a
    ``changed`` flag); ``mod`` itself when nothing changed."""
    for gvar, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gvar, mutator.visit_expr(func))
    return mutator.builder_.get() if mutator.changed else mod


@relax.expr_functor.mutator
class _CallRewriter(relax.PyExprMutator):
    """Every call, its arguments rewritten first, offered to ``replace(builder, call)``."""

    def __init__(self, mod: tvm.ir.IRModule, replace):
        super().__init__(mod)
        self.replace = replace
        self.changed = False

    def visit_call_(self, call):  # noqa: D102 - PyExprMutator's hook
        call = super().visit_call_(call)
        new = self.replace(self.builder_, call)
        if new is None:
            return call
        self.changed = True
        return new


def rewrite_calls(mod: tvm.ir.IRModule, replace) -> tvm.ir.IRModule:
    """Every call of ``mod``'s Relax functions replaced by ``replace(builder, call)`` where that
    returns an expression (``builder`` emits any bindings it needs first), kept where it returns
    None; ``mod`` itself when nothing changed."""
    return rewrite_functions(mod, _CallRewriter(mod, replace))
