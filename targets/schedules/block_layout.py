"""BlockInvertedResidual: an inverted residual's expanded activations kept channel-blocked
(NCHW[B]c, B = the vector width) from the expansion to the projection.

NCHW is the wrong layout for a depthwise conv on a CPU: each channel is a plane of its own, so a
vector is a piece of one row (7 or 14 floats at MobileNetV2's late layers, narrower than an
AVX-512 or AVX2 register), every channel needs its own padded plane, and a stride-2 tap reads
every other float. With the channels blocked, one vector is B channels of one pixel: every tap of
every output pixel is one whole-vector load and one FMA, at any width and stride, and the
padding is a condition per pixel, not per lane. ONNX Runtime's CPU convs run the whole graph
that way (NCHWc); legoc keeps NCHW at block boundaries and blocks only what lies between a
1x1 expansion and a 1x1 projection, which no other op reads:

* the expansion (1x1 conv, NCHW input) writes its output blocked directly: the packed conv's
  micro-kernel holds B output channels per register, so the write-back is a plain vector store
  instead of the transpose back to NCHW;
* the depthwise conv (+ bias, activation) reads and writes blocks
  (:class:`~legoc.targets.schedules.DepthwiseBlocked`);
* the projection reads one input channel of a pixel as a broadcast scalar, as the packed conv
  does from NCHW, and writes NCHW.

A network's head, a 1x1 conv + bias + activation feeding global average pooling, is blocked the
same way: the conv writes blocks and the pooling reads them, so its NCHW write-back (a transpose
at 7x7) goes too.

Expanded channels that are not a multiple of B are padded with zero weights and biases; the
projection's weights for them are zero, so they add nothing. Weights are re-laid out by Relax
``layout_transform`` calls, which ``LiftTransformParams`` moves to build time
(:func:`~legoc.targets.schedules.prepack_weights`; this rewrite runs only there)."""
from __future__ import annotations

import tvm
from tvm import relax

from legoc.targets.schedules.rewrite import match_conv2d, rewrite_functions
from legoc.targets.schedules.split_expand import ACTIVATIONS, _call

# block names of the TE computes below: the rules recognise their PrimFuncs by them
EXPAND = "conv2d_blocked_expand"
DEPTHWISE = "depthwise_blocked"
PROJECT = "conv2d_blocked_project"


def _expand_te(data, weight):
    """[N, C, H, W] x [EB, C, B] -> [N, EB, H, W, B]: a 1x1 stride-1 conv, output blocked."""
    from tvm import te  # noqa: PLC0415

    n, _, h, w = (int(d) for d in data.shape)
    blocks, channels, block = (int(d) for d in weight.shape)
    rc = te.reduce_axis((0, channels), name="rc")
    return te.compute((n, blocks, h, w, block),
                      lambda b, co, y, x, ci: te.sum(data[b, rc, y, x] * weight[co, rc, ci], axis=rc),
                      name=EXPAND)


def _depthwise_te(data, weight, strides, padding, dilation):
    """Depthwise conv of [N, CB, H, W, B] with [CB, KH, KW, B] -> [N, CB, OH, OW, B]."""
    from tvm import te, topi  # noqa: PLC0415

    n, blocks, h, w, block = (int(d) for d in data.shape)
    _, kh, kw, _ = (int(d) for d in weight.shape)
    (sh, sw), (dh, dw) = strides, dilation
    top, left, bottom, right = padding
    out_h = (h + top + bottom - (kh - 1) * dh - 1) // sh + 1
    out_w = (w + left + right - (kw - 1) * dw - 1) // sw + 1
    padded = topi.nn.pad(data, [0, 0, top, left, 0], [0, 0, bottom, right, 0], name="pad_temp")
    ry = te.reduce_axis((0, kh), name="ry")
    rx = te.reduce_axis((0, kw), name="rx")
    return te.compute(
        (n, blocks, out_h, out_w, block),
        lambda b, c, y, x, ci: te.sum(padded[b, c, y * sh + ry * dh, x * sw + rx * dw, ci]
                                      * weight[c, ry, rx, ci], axis=[ry, rx]),
        name=DEPTHWISE)


def _project_te(data, weight):
    """[N, CB, H, W, B] x [F/L, CB, B, L] -> [N, F, H, W]: a 1x1 conv from blocked input, NCHW out."""
    from tvm import te  # noqa: PLC0415

    n, blocks, h, w, block = (int(d) for d in data.shape)
    fblocks, _, _, lanes = (int(d) for d in weight.shape)
    rb = te.reduce_axis((0, blocks), name="rb")
    ri = te.reduce_axis((0, block), name="ri")
    return te.compute(
        (n, fblocks * lanes, h, w),
        lambda b, f, y, x: te.sum(data[b, rb, y, x, ri] * weight[f // lanes, rb, ri, f % lanes], axis=[rb, ri]),
        name=PROJECT)


def project_lanes(out_channels: int, lanes: int) -> int:
    """The projection's output channel block: the widest of ``lanes``, ``lanes``/2, 4 dividing
    its output channels, or 0 (the chain is then left in NCHW)."""
    return next((v for v in (lanes, lanes // 2, 4) if v >= 4 and out_channels % v == 0), 0)


@relax.expr_functor.mutator
class _Blocker(relax.PyExprMutator):
    def __init__(self, mod: tvm.ir.IRModule, lanes: int):
        super().__init__(mod)
        self.lanes = lanes
        self.changed = False
        self.users: dict = {}

    def visit_dataflow_block_(self, block):  # noqa: D102 - PyExprMutator's hook
        self.users = relax.analysis.udchain(block)
        return super().visit_dataflow_block_(block)

    def _bound(self, var):
        return self.lookup_binding(var) if isinstance(var, relax.Var) else None

    def _single_use(self, var) -> bool:
        return isinstance(var, relax.Var) and len(self.users.get(var, ())) == 1

    def _bias_act(self, var):
        """(conv, bias, activation) when ``var`` is activation(conv + bias), each used once."""
        act = self._bound(var)
        if not isinstance(act, relax.Call) or getattr(act.op, "name", "") not in ACTIVATIONS \
                or not self._single_use(var):
            return None
        add = _call(self._bound(act.args[0]), "relax.add")
        if add is None or not self._single_use(act.args[0]) or not self._single_use(add.args[0]):
            return None
        bias = add.args[1]
        conv = self._bound(add.args[0])
        if not isinstance(bias.ty, relax.TensorType) or bias.ty.shape is None or conv is None:
            return None
        return conv, bias, act

    def _blocked_bias(self, bias):
        """[1, C, 1, 1] -> [1, CB, 1, 1, B], zero-padded."""
        lanes = self.lanes
        return self.builder_.emit(relax.op.layout_transform(
            bias, lambda n, c, h, w: (n, c // lanes, h, w, c % lanes), pad_value=0.0))

    def _expansion(self, expand, bias, act):
        """activation(expansion + bias), blocked: [N, CB, H, W, B]."""
        emit, lanes = self.builder_.emit, self.lanes
        x, w1 = expand.args
        out1, in1 = (int(w1.ty.shape[i]) for i in (0, 1))
        w1p = emit(relax.op.layout_transform(emit(relax.op.reshape(w1, [out1, in1])),
                                             lambda o, i: (o // lanes, i, o % lanes), pad_value=0.0))
        e = emit(self.builder_.call_te(_expand_te, x, w1p, primfunc_name_hint="conv2d_blocked",
                                       primfunc_attrs={"op_pattern": 4}))
        return emit(relax.Call(act.op, [emit(relax.op.add(e, self._blocked_bias(bias))), *act.args[1:]],
                               act.attrs))

    def visit_call_(self, call):  # noqa: D102 - PyExprMutator's hook
        call = super().visit_call_(call)
        pooled = self._match_pool(call)
        if pooled is not None:
            return self._pool(call, pooled)
        chain = self._match(call)
        if chain is None:
            return call
        self.changed = True
        first, (dw, b2, act2), lanes_out = chain
        emit = self.builder_.emit
        lanes = self.lanes
        e = self._expansion(*first)
        a = dw.attrs
        c2, _, kh, kw = (int(d) for d in dw.args[1].ty.shape)
        w2p = emit(relax.op.layout_transform(emit(relax.op.reshape(dw.args[1], [c2, kh, kw])),
                                             lambda c, h, w: (c // lanes, h, w, c % lanes), pad_value=0.0))
        d = emit(self.builder_.call_te(
            _depthwise_te, e, w2p, [int(v) for v in a.strides], [int(v) for v in a.padding],
            [int(v) for v in a.dilation], primfunc_name_hint="depthwise_blocked",
            primfunc_attrs={"op_pattern": 4}))
        d = emit(relax.Call(act2.op, [emit(relax.op.add(d, self._blocked_bias(b2))), *act2.args[1:]], act2.attrs))
        out3, in3 = (int(call.args[1].ty.shape[i]) for i in (0, 1))
        w3p = emit(relax.op.layout_transform(
            emit(relax.op.reshape(call.args[1], [out3, in3])),
            lambda o, i: (o // lanes_out, i // lanes, i % lanes, o % lanes_out), pad_value=0.0))
        return self.builder_.call_te(_project_te, d, w3p, primfunc_name_hint="conv2d_blocked",
                                     primfunc_attrs={"op_pattern": 4})

    def _match_pool(self, call):
        """(expansion, bias, activation) when ``call`` is a global average pool (mean over H and
        W, dimensions kept) of activation(1x1 conv + bias), each used once; else None. (A
        network's head: MobileNetV2's 320->1280 conv at 7x7, whose NCHW write-back transposed.)"""
        if _call(call, "relax.mean") is None or not call.attrs.keepdims or call.attrs.axis is None:
            return None
        data = call.args[0]
        if not isinstance(data.ty, relax.TensorType) or data.ty.shape is None or len(data.ty.shape) != 4:
            return None
        if sorted(int(a) % 4 for a in call.attrs.axis) != [2, 3]:
            return None
        found = self._bias_act(data)
        if found is None or not _pointwise(found[0]):
            return None
        channels = int(found[0].args[1].ty.shape[0])
        bias = found[1]
        if [int(d) for d in bias.ty.shape] != [1, channels, 1, 1] or str(bias.ty.dtype) != "float32":
            return None
        return found

    def _pool(self, call, found):
        """The head, blocked: the mean of each [B]-channel block, then back to [N, C, 1, 1] (a
        1x1 map has the same memory order in both layouts)."""
        self.changed = True
        emit = self.builder_.emit
        e = self._expansion(*found)
        pooled = emit(relax.op.mean(e, axis=[2, 3], keepdims=True))
        n, blocks, _, _, block = (int(d) for d in pooled.ty.shape)
        flat = relax.op.reshape(pooled, [n, blocks * block, 1, 1])
        channels = int(call.ty.shape[1])
        if blocks * block == channels:
            return flat
        return relax.op.strided_slice(emit(flat), axes=[1], begin=[0], end=[channels])

    def _match(self, call):
        """((expansion, bias, activation), (depthwise conv, bias, activation), projection block)
        when ``call`` is a 1x1 projection of that chain, each link used once; else None."""
        if not _pointwise(call):
            return None
        out_channels = int(call.args[1].ty.shape[0])
        lanes_out = project_lanes(out_channels, self.lanes)
        second = self._bias_act(call.args[0])
        if not lanes_out or second is None:
            return None
        dw = second[0]
        if _call(dw, "relax.nn.conv2d") is None:
            return None
        attrs, weight = dw.attrs, dw.args[1]
        channels = int(attrs.groups)
        if (channels == 1 or str(attrs.data_layout) != "NCHW" or str(attrs.kernel_layout) != "OIHW"
                or str(attrs.out_layout) != "NCHW" or str(attrs.out_dtype) not in ("", "float32")
                or not isinstance(weight.ty, relax.TensorType) or weight.ty.shape is None
                or str(weight.ty.dtype) != "float32"
                or [int(weight.ty.shape[i]) for i in (0, 1)] != [channels, 1]):
            return None
        first = self._bias_act(dw.args[0])
        if first is None or not _pointwise(first[0]) or int(first[0].args[1].ty.shape[0]) != channels:
            return None
        for bias in (first[1], second[1]):
            if [int(d) for d in bias.ty.shape] != [1, channels, 1, 1] or str(bias.ty.dtype) != "float32":
                return None
        return first, second, lanes_out


def _pointwise(call) -> bool:
    """A float32 1x1 stride-1 unpadded groups=1 NCHW conv2d with static shapes."""
    weight = match_conv2d(call, packable=True)
    if weight is None:
        return False
    attrs = call.attrs
    return ([int(weight.ty.shape[i]) for i in (2, 3)] == [1, 1]
            and all(int(v) == 1 for v in attrs.strides) and all(int(v) == 0 for v in attrs.padding))


@tvm.transform.module_pass(opt_level=0, name="LegocBlockInvertedResidual")
class BlockInvertedResidual:
    """Rewrite expansion (1x1 conv + bias + ReLU/clip) -> depthwise conv (+ bias + ReLU/clip)
    -> 1x1 projection, and 1x1 conv + bias + ReLU/clip -> global average pooling, each link used
    once, into channel-blocked computes (module docstring).
    ``lanes``: the block, the target's vector width."""

    def __init__(self, lanes: int):
        self.lanes = lanes

    def transform_module(self, mod: tvm.ir.IRModule, _ctx) -> tvm.ir.IRModule:
        out = rewrite_functions(mod, _Blocker(mod, self.lanes))
        return relax.transform.DeadCodeElimination()(out) if out is not mod else mod
