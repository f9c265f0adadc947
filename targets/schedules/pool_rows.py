"""MaxPoolByRows: a windowed max pool2d computed without a padded copy of its input, as a max over
rows (into a small buffer per output row, then its columns split by parity) and then a max over
columns, for :class:`~legoc.targets.schedules.MaxPool2dRows`."""
from __future__ import annotations

import functools

import tvm
from tvm import relax

from legoc.targets.schedules.rewrite import rewrite_calls

ROWS = "max_pool_rows"   # the TE computes' names, which the rule matches
PARITY = "max_pool_parity"
COLS = "max_pool_cols"
# the parity compute's annotation: (column stride, left pad, input width), for the rule's partition
PARITY_ATTR = "legoc_pool_columns"


def _max_pool_te(data, pool, strides, pads):
    """Max pool2d of NCHW ``data`` (``pads`` top, left, bottom, right) as three computes.

    A max is unchanged by repeating a value its window already holds, so an index outside the
    input is clamped to the nearest edge instead of reading a -inf border; the edge value is in
    that window whenever each pad is smaller than the kernel (checked by :func:`max_pool_plan`).

    ``max_pool_rows[n, c, y, w]``: the max over output row ``y``'s window rows, at every input
    column; ``max_pool_parity[n, c, y, par, i]``: that row's padded column ``sw * i + par``,
    columns stored by their parity ``par`` (stride ``sw``); ``max_pool_cols[n, c, y, x]``, the
    max over the taps ``rx``, then reads ``parity[n, c, y, rx % sw, x + rx // sw]``:
    contiguous in ``x`` for every tap."""
    from tvm import te, tirx  # noqa: PLC0415

    batch, channels, height, width = (int(d) for d in data.shape)
    (kh, kw), (sh, sw) = pool, strides
    top, left, bottom, right = pads
    out_h = (height + top + bottom - kh) // sh + 1
    out_w = (width + left + right - kw) // sw + 1

    def clamp(value, last):
        return tirx.max(tirx.min(value, last), 0)

    rows = te.compute((batch, channels, out_h, width), lambda n, c, y, w: functools.reduce(
        tirx.max, [data[n, c, clamp(y * sh - top + ry, height - 1), w] for ry in range(kh)]), name=ROWS)
    parity = te.compute((batch, channels, out_h, sw, out_w + (kw - 1) // sw),
                        lambda n, c, y, par, i: rows[n, c, y, clamp(i * sw + par - left, width - 1)],
                        name=PARITY, attrs={PARITY_ATTR: [sw, left, width]})
    return te.compute((batch, channels, out_h, out_w),
                      lambda n, c, y, x: functools.reduce(
                          tirx.max, [parity[n, c, y, rx % sw, x + rx // sw] for rx in range(kw)]),
                      name=COLS)


def max_pool_plan(call):
    """((kh, kw), (sh, sw), pads) when :class:`MaxPoolByRows` takes this call: a float32 NCHW
    ``max_pool2d`` of static shape, no dilation, no ceil mode, column stride 1 or 2 (the
    parities a row buffer holds), every pad smaller than the kernel on its axis, and an output
    of more than one pixel (a global pool stays with the reduction rule); else None."""
    if not isinstance(call, relax.Call) or call.op != tvm.ir.Op.get("relax.nn.max_pool2d"):
        return None
    attrs = call.attrs
    if str(attrs.layout) != "NCHW" or str(attrs.out_layout) != "NCHW" or bool(attrs.ceil_mode) \
            or any(int(v) != 1 for v in attrs.dilation):
        return None
    for info in (call.args[0].ty, call.ty):
        if not isinstance(info, relax.TensorType) or info.shape is None or str(info.dtype) != "float32" \
                or len(info.shape) != 4:
            return None
        try:
            [int(d) for d in info.shape]
        except TypeError:   # symbolic shapes
            return None
    _, _, out_h, out_w = (int(d) for d in call.ty.shape)
    pool = tuple(int(v) for v in attrs.pool_size)
    strides = tuple(int(v) for v in attrs.strides)
    pads = tuple(int(v) for v in attrs.padding)
    if strides[1] not in (1, 2) or out_h * out_w <= 1:
        return None
    if any(p >= pool[axis % 2] or p < 0 for axis, p in enumerate(pads)):
        return None
    return pool, strides, pads


def _rewrite(builder, call):
    plan = max_pool_plan(call)
    if plan is None:
        return None
    pool, strides, pads = plan
    return builder.call_te(_max_pool_te, call.args[0], pool, strides, pads,
                           primfunc_name_hint="max_pool2d_rows", primfunc_attrs={"op_pattern": 4})


@tvm.transform.module_pass(opt_level=0, name="LegocMaxPoolByRows")
class MaxPoolByRows:
    """Rewrite a max_pool2d (:func:`max_pool_plan`) into :func:`_max_pool_te`. Pooled as a
    depthwise conv (:class:`~legoc.targets.schedules.Pool2d`), each channel's input was first
    copied into a padded plane with its columns split by parity (a fill, then a copy through
    shuffles) and then read once per tap; here the input is read in place, three rows at a time
    for ResNet's 3x3/2 stem pool, with whole-vector loads, and only a row of maxima is stored."""

    def transform_module(self, mod: tvm.ir.IRModule, _ctx) -> tvm.ir.IRModule:
        return rewrite_calls(mod, _rewrite)
