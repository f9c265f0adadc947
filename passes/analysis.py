"""Graph analyses shared by the passes: shapes, MACs, and channel groups.

A *channel group* is a set of tensors whose channel dimension (dim 1) must be pruned together:
conv -> BN -> activation -> depthwise conv -> ...; both sides of a residual add; an SE gate
multiplied into its feature map. Each group has producers (convs whose output channels create
it), consumers (convs/Linears that read it on their input-channel axis) and members whose
per-channel parameters are sliced (BN, depthwise convs). A group touching anything the analysis
does not understand (a graph input or output, a concat, a reshape that mixes channels, a grouped
conv, a module called twice) is *blocked*: it is never pruned. That is how block boundaries stay
fixed: a block's input and output tensors are placeholder/output nodes of the block's graph.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

# Modules and functions that keep the channel axis (elementwise along channels, or spatial only).
CHANNEL_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid,
    nn.Sigmoid, nn.Tanh, nn.Mish, nn.Dropout, nn.Dropout2d, nn.Identity, nn.MaxPool1d, nn.MaxPool2d,
    nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
    nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.ZeroPad2d, nn.ConstantPad2d,
)
CHANNEL_FUNCTIONS = {
    F.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.sigmoid,
    F.tanh, F.mish, F.dropout, F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.interpolate, F.pad,
    torch.relu, torch.sigmoid, torch.tanh, torch.clamp, torch.max_pool2d, torch.avg_pool1d,
}
_CHANNEL_METHODS = {"relu", "relu_", "sigmoid", "tanh", "clamp", "contiguous", "clone", "float", "detach"}
_BINARY_FUNCTIONS = {operator.add, operator.iadd, operator.mul, operator.imul, operator.sub,
                     operator.isub, operator.truediv, torch.add, torch.mul, torch.sub, torch.div}
_BINARY_METHODS = {"add", "add_", "mul", "mul_", "sub", "sub_", "div", "div_"}
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze}
_RESHAPE_METHODS = {"flatten", "view", "reshape", "squeeze"}
_MEAN_METHODS = {"mean", "sum", "amax"}


def shape_of(node: torch.fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        return None
    return tuple(meta.shape)


def node_macs(gm: torch.fx.GraphModule, node: torch.fx.Node) -> int:
    """Multiply-accumulates of one node (convs, linears, matmuls); 0 for everything else."""
    out = shape_of(node)
    if out is None:
        return 0
    numel = 1
    for d in out:
        numel *= d
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if isinstance(mod, nn.modules.conv._ConvNd):
            k = 1
            for d in mod.kernel_size:
                k *= d
            return numel * (mod.in_channels // mod.groups) * k
        if isinstance(mod, nn.Linear):
            return numel * mod.in_features
    if node.op == "call_function" and node.target in (torch.matmul, operator.matmul, torch.bmm, F.linear):
        a = shape_of(node.args[0]) if isinstance(node.args[0], torch.fx.Node) else None
        return numel * a[-1] if a else 0
    return 0


def graph_macs(gm: torch.fx.GraphModule) -> int:
    return sum(node_macs(gm, n) for n in gm.graph.nodes)


def _tensor_bytes(n: torch.fx.Node) -> int:
    meta = n.meta.get("tensor_meta")
    metas = [meta] if hasattr(meta, "shape") else (meta if isinstance(meta, (tuple, list)) else [])
    total = 0
    for m in metas:
        if m is not None and hasattr(m, "shape"):
            numel = 1
            for d in m.shape:
                numel *= d
            total += numel * m.dtype.itemsize
    return total


def peak_activation_bytes(gm: torch.fx.GraphModule) -> int:
    """The most bytes of activations alive at once when gm runs its nodes in order: a tensor
    lives from the node that makes it (or the input) to its last user. Weights not counted."""
    nodes = list(gm.graph.nodes)
    last_use = {}
    for i, n in enumerate(nodes):
        for a in n.all_input_nodes:
            last_use[a.name] = i
    live: dict[str, int] = {}
    peak = 0
    for i, n in enumerate(nodes):
        if n.op not in ("get_attr", "output"):
            live[n.name] = _tensor_bytes(n)
        peak = max(peak, sum(live.values()))
        for a in n.all_input_nodes:
            if last_use.get(a.name) == i:
                live.pop(a.name, None)
    return peak


def param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters()) + sum(
        b.numel() * b.element_size() for b in module.buffers() if b.is_floating_point()
    )


@dataclass
class ChannelGroup:
    """Tensors whose channel axis is pruned together (see module docstring)."""

    root: str
    nodes: list[str]
    channels: int
    producers: list[str] = field(default_factory=list)   # conv / Linear targets (out channels)
    members: list[str] = field(default_factory=list)     # BN / depthwise conv targets (per-channel)
    consumers: list[str] = field(default_factory=list)   # conv / Linear targets (in channels)
    blocked: str | None = None                           # why it cannot be pruned, or None
    shared_layout: bool = False                          # some module sees it beside other groups (a concat)
    divisions: int = 1   # equal consecutive runs (grouped conv / GroupNorm groups): prune the same number in each

    @property
    def prunable(self) -> bool:
        return self.blocked is None


@dataclass
class ChannelPlan:
    """Every channel group of a graph, and how each module's channel axes are laid out in groups.

    ``layouts[(target, "out")]``: the groups along a producer's output axis or a member's
    per-channel axis; ``layouts[(target, "in")]``: along a consumer's input axis. A layout is a
    list of (group root, length): one entry for an ordinary tensor, several after a concat.
    """

    groups: list[ChannelGroup]
    layouts: dict[tuple[str, str], list[tuple[str, int]]]

    def group(self, root: str) -> ChannelGroup:
        return next(g for g in self.groups if g.root == root)


class _UnionFind:
    """Union-find over node names; the root of a merged set is its earliest node (deterministic)."""

    def __init__(self, order: dict[str, int]):
        self.parent: dict[str, str] = {}
        self._order = order

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb, key=self._order.get)] = min(ra, rb, key=self._order.get)


def channel_groups(gm: torch.fx.GraphModule) -> list[ChannelGroup]:
    """Every channel group of gm (shapes must be annotated; see capture.annotate_shapes)."""
    return channel_plan(gm).groups


def _cat_dim(n: torch.fx.Node):
    dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
    rank = len(shape_of(n) or ())
    return dim + rank if isinstance(dim, int) and dim < 0 else dim


def channel_plan(gm: torch.fx.GraphModule) -> ChannelPlan:
    """Channel groups of gm and the channel layout of every module that touches them."""
    nodes = list(gm.graph.nodes)
    uf = _UnionFind({n.name: i for i, n in enumerate(nodes)})
    blocked: dict[str, str] = {}          # node -> reason (expanded over the node's layout at the end)
    entries: list[tuple[str, str, str]] = []   # (module target, "out" | "in", node whose layout it has)
    producers: dict[str, list[str]] = {}  # node -> targets producing it
    composite: dict[str, list[str]] = {}  # cat node -> its input nodes (in order)
    alias: dict[str, str] = {}            # channel-preserving op on a concat -> its source
    divisions: dict[str, int] = {}        # node -> number of equal channel runs an op requires
    module_uses: dict[str, int] = {}
    for n in nodes:
        if n.op == "call_module":
            module_uses[n.target] = module_uses.get(n.target, 0) + 1

    def has_channels(x) -> bool:
        s = shape_of(x) if isinstance(x, torch.fx.Node) else None
        return s is not None and len(s) >= 2

    def is_composite(x: torch.fx.Node) -> bool:
        return x.name in composite or x.name in alias

    def block(x, why: str) -> None:
        if isinstance(x, torch.fx.Node) and has_channels(x):
            blocked.setdefault(x.name, why)

    def same_channels(a: torch.fx.Node, b: torch.fx.Node, why_not: str) -> None:
        """b carries a's channels one to one (elementwise along channels)."""
        sa, sb = shape_of(a), shape_of(b)
        if sa is None or sb is None or len(sa) < 2 or len(sb) < 2 or sa[1] != sb[1]:
            block(a, why_not)
            block(b, why_not)
        elif is_composite(a):
            alias[b.name] = a.name
        else:
            uf.union(a.name, b.name)

    def block_all(n: torch.fx.Node, why: str) -> None:
        for a in n.all_input_nodes:
            block(a, why)
        block(n, why)

    for n in nodes:
        if has_channels(n):
            uf.find(n.name)
        tensor_args = [a for a in n.args if isinstance(a, torch.fx.Node)]
        if n.op == "placeholder":
            block(n, f"graph input {n.name}")
            continue
        if n.op == "output":
            for a in n.all_input_nodes:
                block(a, f"graph output {a.name}")
            continue
        if n.op == "get_attr":
            block(n, f"constant {n.target}")
            continue
        if n.op == "call_module":
            mod = gm.get_submodule(n.target)
            stateful = any(True for _ in mod.parameters()) or any(True for _ in mod.buffers())
            if module_uses[n.target] > 1 and stateful:
                block_all(n, f"module {n.target} is called {module_uses[n.target]} times")
                continue
            src = tensor_args[0] if tensor_args else None
            if isinstance(mod, nn.modules.conv._ConvNd) and not isinstance(mod, nn.modules.conv._ConvTransposeNd):
                if mod.groups == 1:
                    producers.setdefault(n.name, []).append(n.target)
                    entries += [(n.target, "out", n.name), (n.target, "in", src.name)]
                elif mod.groups == mod.in_channels == mod.out_channels:
                    same_channels(src, n, f"depthwise conv {n.target}")
                    entries.append((n.target, "out", n.name))
                elif mod.in_channels == mod.out_channels and not is_composite(src):
                    # grouped conv (ResNeXt): channel c of every group maps to itself; pruned
                    # by the same number in each group, the group count stays
                    same_channels(src, n, f"grouped conv {n.target}")
                    entries.append((n.target, "out", n.name))
                    divisions[n.name] = mod.groups
                else:
                    block_all(n, f"grouped conv {n.target}")
            elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
                same_channels(src, n, f"batch norm {n.target}")
                entries.append((n.target, "out", n.name))
            elif isinstance(mod, nn.GroupNorm) and not is_composite(src):
                same_channels(src, n, f"group norm {n.target}")
                if mod.affine:
                    entries.append((n.target, "out", n.name))
                divisions[n.name] = mod.num_groups
            elif isinstance(mod, nn.Linear):
                s = shape_of(src)
                if s is not None and len(s) == 2:
                    entries.append((n.target, "in", src.name))
                else:
                    block(src, f"linear {n.target} on a tensor of rank != 2")
                if len(shape_of(n) or ()) == 2:
                    producers.setdefault(n.name, []).append(n.target)
                    entries.append((n.target, "out", n.name))
                else:
                    block(n, f"linear output {n.target} of rank != 2")
            elif isinstance(mod, CHANNEL_MODULES):
                same_channels(src, n, f"{type(mod).__name__} {n.target}")
            else:
                block_all(n, f"unsupported module {type(mod).__name__} ({n.target})")
            continue
        # call_function / call_method
        tgt = n.target
        is_method = n.op == "call_method"
        if (is_method and tgt in ("size", "dim")) or (not is_method and tgt is getattr and n.args[1:2] == ("shape",)):
            continue  # reads a shape, not the channels: no coupling
        if not is_method and tgt is torch.cat:
            parts = n.args[0] if n.args else n.kwargs.get("tensors", ())
            if _cat_dim(n) == 1 and parts and all(isinstance(a, torch.fx.Node) and has_channels(a) for a in parts):
                composite[n.name] = [a.name for a in parts]
            else:
                for a in parts:
                    block(a, f"concat {n.name} along another axis")
                block(n, f"concat {n.name} along another axis")
        elif (not is_method and tgt in CHANNEL_FUNCTIONS) or (is_method and tgt in _CHANNEL_METHODS):
            same_channels(tensor_args[0], n, f"{getattr(tgt, '__name__', tgt)} at {n.name}")
            for a in tensor_args[1:]:
                block(a, f"extra operand of {n.name}")
        elif (not is_method and tgt in _BINARY_FUNCTIONS) or (is_method and tgt in _BINARY_METHODS):
            out = shape_of(n)
            coupled = []
            for a in tensor_args:
                s = shape_of(a)
                if s is not None and out is not None and len(s) == len(out) and len(s) >= 2 and s[1] == out[1]:
                    coupled.append(a)
                elif s is not None and out is not None and len(s) == len(out) and len(s) >= 2 and s[1] == 1:
                    pass  # broadcast along channels: no channel coupling
                else:
                    block(a, f"broadcast in {n.name}")
                    block(n, f"broadcast in {n.name}")
            if any(is_composite(a) for a in coupled):
                for a in coupled:
                    block(a, f"elementwise {n.name} on a concatenation")
                block(n, f"elementwise {n.name} on a concatenation")
            else:
                for a in coupled:
                    same_channels(a, n, f"elementwise {n.name}")
        elif (not is_method and tgt in _RESHAPE_FUNCTIONS) or (is_method and tgt in _RESHAPE_METHODS) or (
            is_method and tgt in _MEAN_METHODS
        ):
            src, s, out = tensor_args[0], shape_of(tensor_args[0]), shape_of(n)
            spatial = 1
            for d in (s or (0, 0))[2:]:
                spatial *= d
            keeps_channels = (
                s is not None and out is not None and len(out) >= 2 and s[0] == out[0] and s[1] == out[1]
                and (spatial == 1 or tgt in _MEAN_METHODS)
                and all(d == 1 for d in out[2:])
            )
            if keeps_channels and not (tgt in _MEAN_METHODS and _reduces_channel_axis(n)):
                same_channels(src, n, f"reshape {n.name}")
            else:
                block_all(n, f"reshape or reduction {n.name} moves the channel axis")
        else:
            block_all(n, f"unsupported op {getattr(tgt, '__name__', tgt)} at {n.name}")

    def layout(name: str) -> list[tuple[str, int]]:
        if name in alias:
            return layout(alias[name])
        if name in composite:
            return [seg for part in composite[name] for seg in layout(part)]
        return [(uf.find(name), shape_of(by_name[name])[1])]

    by_name = {n.name: n for n in nodes}
    groups: dict[str, ChannelGroup] = {}
    for n in nodes:
        if not has_channels(n) or is_composite(n):
            continue
        root = uf.find(n.name)
        g = groups.get(root)
        if g is None:
            g = groups[root] = ChannelGroup(root=root, nodes=[], channels=shape_of(n)[1])
        g.nodes.append(n.name)
        g.producers += producers.get(n.name, [])
    for name, why in blocked.items():
        for root, _ in layout(name):
            if groups[root].blocked is None:
                groups[root].blocked = why
    layouts: dict[tuple[str, str], list[tuple[str, int]]] = {}
    for target, role, node in entries:
        lay = layouts[(target, role)] = layout(node)
        for root, _ in lay:
            g = groups[root]
            if role == "in":
                g.consumers.append(target)
            elif target not in g.producers:
                g.members.append(target)
            if len(lay) > 1:
                g.shared_layout = True
    for name in list(composite) + list(alias):  # concat nodes belong to the groups they carry
        for root, _ in layout(name):
            if name not in groups[root].nodes:
                groups[root].nodes.append(name)
    for name, d in divisions.items():
        g = groups[uf.find(name)]
        g.divisions = math.lcm(g.divisions, d)
    for g in groups.values():
        if g.divisions > 1 and (g.channels % g.divisions or g.shared_layout) and g.blocked is None:
            g.blocked = f"{g.channels} channels in {g.divisions} groups cannot be pruned evenly"
        if g.blocked is None and not g.producers:
            g.blocked = "no conv produces these channels"
        if g.blocked is None and g.channels < 2:
            g.blocked = "fewer than 2 channels"
    return ChannelPlan(list(groups.values()), layouts)


def _reduces_channel_axis(n: torch.fx.Node) -> bool:
    dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
    if dims is None:
        return True
    dims = dims if isinstance(dims, (tuple, list)) else (dims,)
    return any(d in (1, -3) for d in dims) if len(shape_of(n.args[0]) or ()) == 4 else any(d == 1 for d in dims)
