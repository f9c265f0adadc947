"""tiling: split a block's output rows into spatial tiles with halos (DeepThings' fused tile
partitioning, MeDNN's row split), so that several devices each compute a band of rows.

For a block (a torch.fx GraphModule with one NCHW tensor in and out, as the partition pass cuts
them, or several consecutive blocks joined by :func:`join`) whose every op is row-local:

1. **Receptive field, backwards.** For output rows ``[a, b)`` every node gets the rows a tile
   must compute: an elementwise op, BatchNorm, a channel concat or chunk needs the same rows of
   its inputs; a conv or pool with kernel k, stride s, dilation d and top padding p needs input
   rows ``[a*s - p, (b-1)*s - p + (k-1)*d + 1)`` (rows outside the image are padding); a nearest
   upsample by an integer factor f needs rows ``[a // f, (b-1) // f + 1)``. A tensor read by
   several ops gets the hull of their needs.
2. **Tile module, forwards.** Each op is rewritten to work on a band: every input is cropped to
   the rows the op needs, and a conv or pool gets its padding explicitly, only where its window
   leaves the image (zeros for convs and average pools, -inf for max pools); its own padding is
   then 0. At an interior edge the tile reads real neighbour rows (the halo) instead.

A tile takes rows ``rows_in`` of the block input and returns rows ``rows_out`` of its output; the
stitched outputs (concatenated along H) equal the whole block. Tiles whose modules are the same
computation on the same input shape share a ``key`` (compile one module per key).

A block that mixes rows (global pooling, Linear, flatten/view/reshape, permute, anything not
listed in ``_SAME``/``_WINDOW``) cannot be tiled: :func:`tile_plan` returns :class:`Untileable`
with a one-line reason naming the node.
"""
from __future__ import annotations

import copy
import hashlib
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

from legoc.errors import UserError

__all__ = ["Tile", "TilePlan", "Untileable", "compile_plan", "compile_tiles", "join", "row_profile", "row_splits", "tile_plan"]

# ops that need the same rows of every tensor input as they produce (elementwise, BN, identity,
# channel concat/chunk); their args are checked further in _rule (concat dim, broadcasting)
_SAME_MODULES = (
    nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.SiLU, nn.GELU,
    nn.Tanh, nn.LeakyReLU, nn.ELU, nn.Mish, nn.Identity, nn.Dropout, nn.Dropout2d,
)
_SAME_FUNCTIONS = {
    operator.add, operator.mul, operator.sub, operator.truediv, operator.neg,
    torch.add, torch.mul, torch.sub, torch.div, torch.relu, torch.sigmoid, torch.tanh, torch.neg,
    F.relu, F.relu6, F.silu, F.hardswish, F.hardsigmoid, F.gelu, F.leaky_relu, F.elu, F.mish,
    F.dropout, F.hardtanh, torch.clamp,
}
_SAME_METHODS = {"add", "add_", "mul", "mul_", "sub", "div", "relu", "relu_", "sigmoid", "tanh",
                 "clamp", "contiguous", "neg"}
_CHANNEL_OPS = {torch.cat, torch.chunk, torch.split, "chunk", "split"}  # must act on dim 1

_GLOBAL_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_MIXING = {  # named reasons for common row-mixing ops
    torch.flatten: "flatten", "flatten": "flatten", "view": "view", "reshape": "reshape",
    torch.reshape: "reshape", "permute": "permute", torch.permute: "permute",
    torch.transpose: "transpose", "transpose": "transpose", "mean": "mean", torch.mean: "mean",
    F.adaptive_avg_pool2d: "global pooling (adaptive_avg_pool2d)",
    F.adaptive_max_pool2d: "global pooling (adaptive_max_pool2d)", "size": "size()",
    F.linear: "linear",
}


@dataclass(frozen=True)
class Untileable:
    """Why a block stays whole (one line, naming the node)."""

    reason: str

    def __bool__(self) -> bool:  # `if plan:` reads as "could it be tiled"
        return False


@dataclass(frozen=True)
class _Window:
    """A sliding window along H: conv or pool geometry plus what pads it."""

    kernel: int
    stride: int
    dilation: int
    pad_top: int
    pad_left: int
    pad_right: int
    fill: float  # padding value: 0 for conv / average pool, -inf for max pool

    def needs(self, a: int, b: int) -> tuple[int, int]:
        """Input rows (may lie outside the image: padding) for output rows [a, b)."""
        return a * self.stride - self.pad_top, (b - 1) * self.stride - self.pad_top + (self.kernel - 1) * self.dilation + 1


@dataclass(frozen=True)
class _Upsample:
    factor: int

    def needs(self, a: int, b: int) -> tuple[int, int]:
        return a // self.factor, (b - 1) // self.factor + 1


@dataclass(frozen=True)
class _Same:
    def needs(self, a: int, b: int) -> tuple[int, int]:
        return a, b


@dataclass
class Tile:
    """One band: input rows ``rows_in`` (halo included) in, output rows ``rows_out`` out."""

    rows_in: tuple[int, int]
    rows_out: tuple[int, int]
    module: torch.fx.GraphModule
    key: str  # equal keys: the same computation on the same input shape (one compiled module)

    @property
    def in_rows(self) -> int:
        return self.rows_in[1] - self.rows_in[0]

    @property
    def out_rows(self) -> int:
        return self.rows_out[1] - self.rows_out[0]


@dataclass
class TilePlan:
    """Tiles of one block (or run of blocks) for given row shares."""

    tiles: list[Tile]
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    shares: tuple[float, ...] = ()
    distinct: dict[str, int] = field(default_factory=dict)  # key -> index of its first tile

    def __bool__(self) -> bool:
        return True

    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each tile's input: rows ``rows_in`` of ``x`` (contiguous)."""
        return [x[:, :, t.rows_in[0]:t.rows_in[1]].contiguous() for t in self.tiles]

    def stitch(self, outputs: Sequence[Any]):
        """The block output from the tiles' outputs in tile order (torch tensors or numpy arrays)."""
        if len(outputs) != len(self.tiles):
            raise ValueError(f"{len(outputs)} tile outputs for {len(self.tiles)} tiles")
        for t, o in zip(self.tiles, outputs):
            if o.shape[2] != t.out_rows:
                raise ValueError(f"tile {t.rows_out} returned {o.shape[2]} rows")
        if isinstance(outputs[0], torch.Tensor):
            return torch.cat(list(outputs), dim=2)
        import numpy as np

        return np.concatenate(list(outputs), axis=2)

    @torch.no_grad()
    def run(self, x: torch.Tensor) -> torch.Tensor:
        """Every tile here, in torch, stitched (what a cluster computes, for checking)."""
        return self.stitch([t.module(s) for t, s in zip(self.tiles, self.split(x))])

    @property
    def halo_rows(self) -> int:
        """Input rows sent more than once (the price of tiling in bytes)."""
        return sum(t.in_rows for t in self.tiles) - self.input_shape[2]


def row_splits(height: int, shares: Sequence[float]) -> list[tuple[int, int]]:
    """Output rows ``[0, height)`` cut into ``len(shares)`` consecutive ranges proportional to
    ``shares`` (rounded; every range at least one row)."""
    k = len(shares)
    if k < 1 or any(not math.isfinite(s) or s <= 0 for s in shares):
        raise UserError(f"tile shares must be positive numbers, got {list(shares)}")
    if k > height:
        raise UserError(f"{k} tiles need at least {k} output rows, the block has {height}; use at most {height} tiles")
    total = float(sum(shares))
    cuts, acc = [0], 0.0
    for i, s in enumerate(shares[:-1]):
        acc += s
        lo = cuts[-1] + 1                      # at least one row for this tile
        hi = height - (k - 1 - i)              # and for every later one
        cuts.append(min(max(round(acc / total * height), lo), hi))
    cuts.append(height)
    return list(zip(cuts[:-1], cuts[1:]))


def join(blocks: Sequence[torch.fx.GraphModule], example_input: torch.Tensor) -> torch.fx.GraphModule:
    """One GraphModule running consecutive blocks in order (each block's output is the next
    one's only input), flattened so that it can be tiled as a whole (fused tiles: the halo
    grows through all of them, but nothing is exchanged between the blocks)."""
    seq = nn.Sequential(*blocks)
    gm = torch.fx.symbolic_trace(seq)
    ShapeProp(gm).propagate(example_input)
    return gm


def _shape(node: torch.fx.Node):
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _height(node: torch.fx.Node) -> int | None:
    """H of a 4-D tensor node (of the first tensor of a tuple-valued node, e.g. chunk)."""
    meta = node.meta.get("tensor_meta")
    if _is_tuple_meta(meta):
        meta = meta[0]
    shape = tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None
    return shape[2] if shape is not None and len(shape) == 4 else None


def _is_tuple_meta(meta) -> bool:
    """Whether a node's tensor_meta describes several tensors (TensorMetadata is itself a tuple)."""
    return isinstance(meta, (tuple, list)) and not hasattr(meta, "shape") and len(meta) > 0


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _conv_window(m: nn.Conv2d, name: str) -> _Window | str:
    if m.padding_mode != "zeros":
        return f"{name}: conv with padding_mode '{m.padding_mode}' (only zero padding is tiled)"
    (kh, kw), (sh, _), (dh, dw) = m.kernel_size, m.stride, m.dilation
    if isinstance(m.padding, str):  # 'valid' or 'same' (stride 1): torch pads the extra row at the end
        if m.padding == "valid":
            ph = pw = pr = 0
        else:
            ph, pw = (dh * (kh - 1)) // 2, (dw * (kw - 1)) // 2
            pr = dw * (kw - 1) - pw
    else:
        ph, pw = m.padding
        pr = pw
        if isinstance(m.padding, str) or m.padding_mode != "zeros":
            return f"{name}: unsupported conv padding {m.padding!r}"
    return _Window(kh, sh, dh, ph, pw, pr, 0.0)


def _pool_window(kind: str, kernel, stride, padding, dilation, ceil_mode, count_include_pad, height, name) -> _Window | str:
    kh, kw = _pair(kernel)
    sh, sw = _pair(stride if stride not in (None, [], ()) else kernel)
    ph, pw = _pair(padding)
    dh, _ = _pair(dilation)
    if ceil_mode:
        floor_rows = (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        ceil_rows = -(-(height + 2 * ph - dh * (kh - 1) - 1) // sh) + 1
        if ceil_rows != floor_rows:
            return f"{name}: {kind} pool with ceil_mode=True has a partial last window (not tiled)"
    if kind == "avg" and not count_include_pad and (ph or pw):
        return f"{name}: average pool with count_include_pad=False and padding (its divisor changes at the border)"
    return _Window(kh, sh, dh, ph, pw, pw, float("-inf") if kind == "max" else 0.0)


class _Rules:
    """How each node maps output rows to input rows (or why it cannot be tiled)."""

    def __init__(self, gm: torch.fx.GraphModule):
        self.gm = gm
        self.rules: dict[str, Any] = {}

    def of(self, n: torch.fx.Node):  # -> rule | str (reason)
        gm, name = self.gm, n.name
        if n.op == "call_module":
            m = gm.get_submodule(n.target)
            if isinstance(m, nn.Conv2d):
                return _conv_window(m, name)
            if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
                if isinstance(m, nn.MaxPool2d) and m.return_indices:
                    return f"{name}: max pool returning indices"
                h = _height(n.args[0])
                if isinstance(m, nn.MaxPool2d):
                    return _pool_window("max", m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, True, h, name)
                if m.divisor_override is not None and m.padding:
                    return f"{name}: average pool with divisor_override and padding"
                return _pool_window("avg", m.kernel_size, m.stride, m.padding, 1, m.ceil_mode, m.count_include_pad, h, name)
            if isinstance(m, _SAME_MODULES):
                return _Same()
            if isinstance(m, _GLOBAL_POOLS):
                return f"{name}: global pooling ({type(m).__name__}) mixes all rows"
            if isinstance(m, nn.Upsample):
                return self._upsample(name, m.scale_factor, m.mode, m.size)
            return f"{name}: {type(m).__name__} is not row-local"
        if n.op in ("call_function", "call_method"):
            t = n.target
            if t in (F.max_pool2d, F.avg_pool2d):
                kw = self._kwargs(n)
                h = _height(n.args[0])
                if t is F.max_pool2d:
                    if kw.get("return_indices"):
                        return f"{name}: max pool returning indices"
                    return _pool_window("max", kw["kernel_size"], kw.get("stride"), kw.get("padding", 0),
                                        kw.get("dilation", 1), kw.get("ceil_mode", False), True, h, name)
                if kw.get("divisor_override") is not None and kw.get("padding", 0):
                    return f"{name}: average pool with divisor_override and padding"
                return _pool_window("avg", kw["kernel_size"], kw.get("stride"), kw.get("padding", 0), 1,
                                    kw.get("ceil_mode", False), kw.get("count_include_pad", True), h, name)
            if t is F.interpolate:
                kw = self._kwargs(n)
                return self._upsample(name, kw.get("scale_factor"), kw.get("mode", "nearest"), kw.get("size"))
            if t in _CHANNEL_OPS:
                dim = self._dim(n)
                if dim not in (1, -3):
                    return f"{name}: {getattr(t, '__name__', t)} along dim {dim} (only channel dim 1 is row-local)"
                return _Same()
            if t is operator.getitem:
                if not isinstance(n.args[0], torch.fx.Node) or not _is_tuple_meta(n.args[0].meta.get("tensor_meta")):
                    return f"{name}: indexing a tensor may mix rows"
                return _Same()  # an element of a chunk/split
            if t in _SAME_FUNCTIONS or t in _SAME_METHODS:
                return self._broadcast_check(n)
            what = _MIXING.get(t, getattr(t, "__name__", str(t)))
            return f"{name}: {what} is not row-local"
        return None  # placeholder / output / get_attr

    def _kwargs(self, n: torch.fx.Node) -> dict:
        return _kwargs(self.gm, n)

    def _dim(self, n: torch.fx.Node) -> int:
        if n.op == "call_method":
            return n.kwargs.get("dim", n.args[2] if len(n.args) > 2 else 0)
        dim = n.kwargs.get("dim")
        if dim is None:
            pos = 1 if n.target is torch.cat else 2
            dim = n.args[pos] if len(n.args) > pos else 0
        return dim

    def _upsample(self, name, scale, mode, size):
        if size is not None or mode != "nearest":
            return f"{name}: interpolate mode={mode!r} size={size!r} (only nearest with an integer scale factor is tiled)"
        f = scale[0] if isinstance(scale, (tuple, list)) else scale
        if f is None or float(f) != int(f) or int(f) < 1:
            return f"{name}: interpolate by {scale!r} (only an integer scale factor is tiled)"
        return _Upsample(int(f))

    def _broadcast_check(self, n: torch.fx.Node):
        h = _height(n)
        if h is None:
            return f"{n.name}: produces no 4-D tensor"
        for a in n.all_input_nodes:
            if a.op == "get_attr":
                shape = tuple(_attr(self.gm, a.target).shape)
                if len(shape) >= 2 and shape[-2] != 1:
                    return f"{n.name}: a constant with {shape[-2]} rows is broadcast into it"
            elif _height(a) != h:
                return (f"{n.name}: broadcasts {a.name} ({_height(a)} rows) over {h} rows "
                        "(e.g. squeeze-excitation after global pooling)")
        return _Same()


def _attr(gm: torch.nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _fit(graph: torch.fx.Graph, x: torch.fx.Node, have: tuple[int, int], want: tuple[int, int],
         height: int, window: _Window | None) -> torch.fx.Node:
    """``x`` holds rows ``have`` of a tensor of ``height`` rows; return a node holding rows
    ``want`` (which may reach outside the image: those rows are the window's padding), plus the
    window's horizontal padding."""
    r0, r1 = want
    lo = min(max(r0, 0), height)
    hi = max(min(r1, height), lo)
    top = min(max(lo - r0, 0), r1 - r0)
    bottom = (r1 - r0) - (hi - lo) - top
    if (lo, hi) != have:
        x = graph.call_function(operator.getitem, (x, (slice(None), slice(None), slice(lo - have[0], hi - have[0]))))
    left = right = 0
    if window is not None:
        left, right = window.pad_left, window.pad_right
    if top or bottom or left or right:
        fill = window.fill if window is not None else 0.0
        x = graph.call_function(F.pad, (x, (left, right, top, bottom)), {"value": fill})
    return x


def _unpadded(m: nn.Module) -> nn.Module:
    """A conv or pool module without padding (the tile pads explicitly), sharing the weights."""
    new = copy.copy(m)
    if isinstance(m, nn.Conv2d):
        new.padding, new.padding_mode = (0, 0), "zeros"
        new._reversed_padding_repeated_twice = [0, 0, 0, 0]
    else:
        new.padding, new.ceil_mode = 0, False
    return new


def _analyse(gm: torch.fx.GraphModule, example_input: torch.Tensor):
    """(nodes, rule per node, result node, input shape, output shape) of a tileable block, or
    :class:`Untileable` naming the first node that mixes rows."""
    ShapeProp(gm).propagate(example_input)
    nodes = list(gm.graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    out_node = next(n for n in nodes if n.op == "output")
    if len(inputs) != 1 or not isinstance(out_node.args[0], torch.fx.Node):
        return Untileable(f"the block has {len(inputs)} inputs and a {type(out_node.args[0]).__name__} output (one tensor each is tiled)")
    result = out_node.args[0]
    rules = _Rules(gm)
    rule: dict[torch.fx.Node, Any] = {}
    for n in nodes:  # the first op that mixes rows names the reason
        r = rules.of(n)
        if isinstance(r, str):
            return Untileable(r)
        if n.op in ("call_module", "call_function", "call_method"):
            for a in n.all_input_nodes:
                if a.op != "get_attr" and _height(a) is None:
                    return Untileable(f"{n.name}: reads {a.name}, which is not a 4-D tensor")
        rule[n] = r
    in_shape, out_shape = _shape(inputs[0]), _shape(result)
    if in_shape is None or len(in_shape) != 4 or out_shape is None or len(out_shape) != 4:
        return Untileable(f"the block maps {in_shape} to {out_shape}: only 4-D NCHW tensors are tiled")
    return nodes, rule, result, tuple(in_shape), tuple(out_shape)


def tile_plan(gm: torch.fx.GraphModule, example_input: torch.Tensor, shares: Sequence[float] | None = None, *,
              rows: Sequence[tuple[int, int]] | None = None) -> TilePlan | Untileable:
    """Tiles of ``gm`` (one NCHW tensor in, one out) for output row shares ``shares`` (k tiles,
    top to bottom) or for explicit consecutive output row ranges ``rows`` (as a plan chose them),
    or :class:`Untileable` saying which node mixes rows."""
    if (shares is None) == (rows is None):
        raise UserError("tile_plan takes either row shares or output row ranges, not both or neither")
    found = _analyse(gm, example_input)
    if isinstance(found, Untileable):
        return found
    nodes, rule, result, in_shape, out_shape = found
    if rows is None:
        rows = row_splits(out_shape[2], shares)
    else:
        rows = [(int(a), int(b)) for a, b in rows]
        if (not rows or rows[0][0] != 0 or rows[-1][1] != out_shape[2] or any(a >= b for a, b in rows)
                or any(p[1] != q[0] for p, q in zip(rows, rows[1:]))):
            raise UserError(f"tile rows {rows} do not cut the block's {out_shape[2]} output rows into consecutive "
                            "non-empty ranges from row 0")
        total = out_shape[2]
        shares = [(b - a) / total for a, b in rows]
    tiles = [_tile(gm, nodes, rule, result, r, in_shape[2]) for r in rows]
    distinct: dict[str, int] = {}
    for i, t in enumerate(tiles):
        distinct.setdefault(t.key, i)
    return TilePlan(tiles, in_shape, out_shape, tuple(float(s) for s in shares), distinct)


def _node_work(gm: torch.fx.GraphModule, n: torch.fx.Node) -> float:
    """Work of one output row of ``n``: multiply-adds for a conv, window reads for a pool,
    elements for anything else (what a tile's latency grows with)."""
    shape = _shape(n)
    if shape is None or len(shape) != 4 or n.op not in ("call_module", "call_function", "call_method"):
        return 0.0
    per_row = shape[0] * shape[1] * shape[3]
    if n.op == "call_module":
        m = gm.get_submodule(n.target)
        if isinstance(m, nn.Conv2d):
            return float(per_row * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1])
        if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
            kh, kw = _pair(m.kernel_size)
            return float(per_row * kh * kw)
    elif n.target in (F.max_pool2d, F.avg_pool2d):
        kh, kw = _pair(_kwargs(gm, n)["kernel_size"])
        return float(per_row * kh * kw)
    return float(per_row)


def row_profile(gm: torch.fx.GraphModule, example_input: torch.Tensor, name: str = "block"):
    """What a planner needs to know of tiling ``gm``: for every output row range ``[a, b)`` the
    input rows its tile reads (halo included) and its work (multiply-adds, pool window reads and
    elementwise elements over every row each node computes, halo rows recomputed included), plus
    the bytes of one input and one output row. A :class:`legoc.runtime.cluster_plan.RunProfile`,
    or :class:`Untileable`."""
    from legoc.runtime.cluster_plan import RunProfile

    found = _analyse(gm, example_input)
    if isinstance(found, Untileable):
        return found
    nodes, rule, result, in_shape, out_shape = found
    per_row = {n: _node_work(gm, n) for n in nodes}
    height = out_shape[2]
    rows_in: dict[tuple[int, int], tuple[int, int]] = {}
    work: dict[tuple[int, int], float] = {}
    placeholder = next(n for n in nodes if n.op == "placeholder")
    for a in range(height):
        for b in range(a + 1, height + 1):
            need = _needs(nodes, rule, result, (a, b))
            rows_in[a, b] = need[placeholder]
            work[a, b] = sum(per_row[n] * (r[1] - r[0]) for n, r in need.items())
    item = example_input.element_size()
    return RunProfile(name=name, height=height, in_height=in_shape[2],
                      in_row_bytes=in_shape[0] * in_shape[1] * in_shape[3] * item,
                      out_row_bytes=out_shape[0] * out_shape[1] * out_shape[3] * item,
                      rows_in=rows_in, work=work)


def _needs(nodes, rule, result, rows_out) -> dict:
    """The rows every node must compute for output rows ``rows_out``: the hull of what its users
    need (backwards through the graph)."""
    need: dict[torch.fx.Node, tuple[int, int]] = {result: tuple(rows_out)}
    for n in reversed(nodes):
        if n.op in ("output", "get_attr"):
            continue
        if n not in need:  # every user needs only padding of it: compute one row nobody reads
            need[n] = (0, 1)
        if n.op == "placeholder":
            continue
        r0, r1 = rule[n].needs(*need[n])
        for a in n.all_input_nodes:
            if a.op == "get_attr":
                continue
            h = _height(a)
            lo, hi = max(r0, 0), min(r1, h)
            if lo < hi:
                old = need.get(a)
                need[a] = (lo, hi) if old is None else (min(old[0], lo), max(old[1], hi))
    return need


def _tile(gm, nodes, rule, result, rows_out, in_height) -> Tile:
    # 1. rows each node must compute (backwards)
    need = _needs(nodes, rule, result, rows_out)

    # 2. the tile: every op on its band, inputs fitted to what it needs (forwards)
    graph = torch.fx.Graph()
    root: dict[str, Any] = {}
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    have = dict(need)  # rows env[n] holds: what it needs, or for an element of a chunk the chunk's rows
    for n in nodes:
        if n.op == "placeholder":
            env[n] = graph.placeholder(n.name)
            continue
        if n.op == "get_attr":
            root[n.target] = _attr(gm, n.target)
            env[n] = graph.get_attr(n.target)
            continue
        if n.op == "output":
            graph.output(_fit(graph, env[result], have[result], rows_out, _height(result), None))
            continue
        if n.target is operator.getitem:  # an element of a chunk holds the rows of the chunk
            env[n] = graph.node_copy(n, lambda a: env[a])
            have[n] = have[n.args[0]]
            continue
        r = rule[n]
        want = r.needs(*need[n])
        window = r if isinstance(r, _Window) else None
        fitted = {a: (env[a] if a.op == "get_attr" else _fit(graph, env[a], have[a], want, _height(a), window))
                  for a in n.all_input_nodes}
        if window is not None and n.op == "call_module":
            root[n.target] = _unpadded(gm.get_submodule(n.target))
            env[n] = graph.call_module(n.target, (fitted[n.args[0]],))
        elif window is not None:  # F.max_pool2d / F.avg_pool2d: padding 0, floor mode
            kw = _kwargs(gm, n)
            kw.update(input=fitted[n.args[0]], padding=0, ceil_mode=False)
            env[n] = graph.call_function(n.target, (), kw)
        else:
            if n.op == "call_module":
                root[n.target] = gm.get_submodule(n.target)
            env[n] = graph.node_copy(n, lambda a: fitted[a])
            if isinstance(r, _Upsample):  # whole input rows upsampled: a few rows more than needed
                have[n] = (want[0] * r.factor, want[1] * r.factor)
    module = torch.fx.GraphModule(root, graph, class_name="Tile")
    rows_in = need[next(n for n in nodes if n.op == "placeholder")]
    key = hashlib.sha256(f"{rows_in[1] - rows_in[0]}\n{module.code}".encode()).hexdigest()[:16]
    return Tile(rows_in=rows_in, rows_out=tuple(rows_out), module=module, key=key)


def _kwargs(gm: torch.fx.GraphModule, n: torch.fx.Node) -> dict:
    """A call's arguments by name (F.max_pool2d(x, 2) -> {"input": x, "kernel_size": 2, ...})."""
    norm = n.normalized_arguments(gm, normalize_to_only_use_kwargs=True)
    if norm is None:
        raise UserError(f"cannot read the arguments of {n.name} ({n.target}) to tile it")
    return dict(norm.kwargs)


def compile_tiles(plan: TilePlan, example_input: torch.Tensor, target, folder, *, prepack: bool = True,
                  winograd: bool = True, name: str = "block"):
    """One TVM module per distinct tile (legoc's back end, ``target`` a TargetSpec) in
    ``folder``; returns a :class:`legoc.runtime.cluster.TileModule` per tile, in tile order
    (tiles with the same key share the module file and weights)."""
    from pathlib import Path

    from legoc.runtime.cluster import TileModule
    from legoc.targets.build import build_module

    folder = Path(folder)
    bands = plan.split(example_input)
    built = {}
    for key, i in plan.distinct.items():
        built[key] = build_module(plan.tiles[i].module, (bands[i],), target, folder / f"{name}-tile-{key}.so",
                                  name=f"{name} tile {i}", prepack=prepack, winograd=winograd)
    return [TileModule(path=built[t.key].path, weights=tuple(built[t.key].params), rows_in=t.rows_in,
                       rows_out=t.rows_out) for t in plan.tiles]


def compile_plan(plan, blocks: Sequence[torch.fx.GraphModule], example_input: torch.Tensor, target, folder,
                 n_workers: int, *, prepack: bool = True, cache: dict | None = None):
    """Compile every step of a :class:`legoc.runtime.cluster_plan.Plan` over ``blocks`` (the
    chain, ``example_input`` its input): a local step's blocks whole, a tiled step's tiles with
    the rows the plan gave each worker. Returns ``(cluster_steps, local)``: per tiled step one
    TileModule or None per worker (for ``Cluster(steps=...)``), and per local step's index its
    TileModule (for a tiled step with a master band, that band's TileModule, to wrap in
    ``MasterBand``). ``cache`` (a dict kept by the caller) reuses steps compiled before."""
    from pathlib import Path

    from legoc.runtime.cluster import TileModule
    from legoc.targets.build import build_module

    folder = Path(folder)
    cache = {} if cache is None else cache
    cluster_steps, local = [], {}
    x = example_input
    with torch.no_grad():
        for i, step in enumerate(plan.steps):
            run = blocks[step.first] if step.last - step.first == 1 else join(blocks[step.first:step.last], x)
            key = (step.first, step.last, step.tiles)
            if key not in cache:
                name = f"run{step.first}-{step.last}"
                if step.local:
                    built = build_module(run, (x,), target, folder / f"{name}-whole.so", name=name, prepack=prepack)
                    y = run(x)
                    cache[key] = TileModule(path=built.path, weights=tuple(built.params), rows_in=(0, x.shape[2]),
                                            rows_out=(0, y.shape[2]))
                else:
                    tiled = tile_plan(run, x, rows=[(a, b) for _, a, b in step.tiles])
                    if isinstance(tiled, Untileable):
                        raise UserError(f"the plan tiles blocks {step.first}-{step.last - 1}, but {tiled.reason}")
                    modules = compile_tiles(tiled, x, target, folder, prepack=prepack, name=name)
                    per_worker: list = [None] * n_workers
                    master = None
                    for (w, _, _), m in zip(step.tiles, modules):
                        if w < 0:   # legoc.runtime.cluster_plan.MASTER: a band computed here, not sent
                            master = m
                        else:
                            per_worker[w] = m
                    cache[key] = (per_worker, master)
            if step.local:
                local[i] = cache[key]
            else:
                per_worker, master = cache[key]
                cluster_steps.append(per_worker)
                if master is not None:
                    local[i] = master   # the master's band: the caller wraps it (runtime.cluster_plan.MasterBand)
            x = run(x)
    return cluster_steps, local
