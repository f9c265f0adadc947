"""Candidate blocks of a traced graph: single-entry/single-exit regions found by dominator
analysis (steps 1 and 2 of legoc.passes.partition).

1. Dataflow graph of the fx nodes, with a virtual source feeding every graph input; constants
   (get_attr, ops with no tensor inputs) are left out and copied into whoever uses them.
2. Regions: for every tensor node x (a possible block exit) and every dominator e of x (networkx
   ``immediate_dominators``; a possible block entry), the nodes on paths from e to x form a
   single-entry region; it is single-exit when nothing but x is used outside it. Cuts fall after
   activations: an entry or exit whose single user is a BN or an activation is skipped, so
   conv/BN/ReLU stay together. A region is a candidate block if a prunable channel group lies
   wholly inside it (something to prune that touches neither its input nor its output).
"""
from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import torch
import torch.fx
import torch.nn as nn

from legoc.passes import analysis

SOURCE = "__legoc_source__"   # virtual node feeding every graph input

_EPILOGUE_MODULES = (nn.modules.batchnorm._BatchNorm,) + tuple(
    m for m in analysis.CHANNEL_MODULES
    if m not in (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
                 nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Upsample, nn.UpsamplingNearest2d,
                 nn.UpsamplingBilinear2d, nn.Identity, nn.ZeroPad2d, nn.ConstantPad2d)
)
_EPILOGUE_FUNCTIONS = {
    f for f in analysis.CHANNEL_FUNCTIONS
    if getattr(f, "__name__", "") in {"relu", "relu6", "leaky_relu", "elu", "gelu", "silu", "hardswish",
                                      "hardsigmoid", "sigmoid", "tanh", "mish", "dropout", "clamp"}
}


def is_constant(n: torch.fx.Node) -> bool:
    return n.op == "get_attr" or (n.op in ("call_function", "call_method") and not n.all_input_nodes)


def _is_epilogue(gm: torch.fx.GraphModule, n: torch.fx.Node) -> bool:
    if n.op == "call_module":
        return isinstance(gm.get_submodule(n.target), _EPILOGUE_MODULES)
    if n.op == "call_function":
        return n.target in _EPILOGUE_FUNCTIONS
    if n.op == "call_method":
        return n.target in {"relu", "relu_", "sigmoid", "tanh", "clamp"}
    return False


def dataflow_graph(gm: torch.fx.GraphModule) -> nx.DiGraph:
    g = nx.DiGraph()
    g.add_node(SOURCE)
    for n in gm.graph.nodes:
        if is_constant(n):
            continue
        g.add_node(n.name)
        if n.op == "placeholder":
            g.add_edge(SOURCE, n.name)
        for a in n.all_input_nodes:
            if not is_constant(a):
                g.add_edge(a.name, n.name)
    return g


def cut_points(gm: torch.fx.GraphModule) -> list[str]:
    """Tensor nodes every input-to-output path passes through, in topological order, minus
    those that would split a conv from its BN/activation."""
    g = dataflow_graph(gm)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    idom = nx.immediate_dominators(g, SOURCE)
    chain, v = [], idom.get(out.name)
    while v is not None and v != SOURCE:
        chain.append(v)
        v = idom[v]
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    by_name = {n.name: n for n in gm.graph.nodes}
    cuts = []
    for name in sorted(chain, key=order.get):
        n = by_name[name]
        shape = analysis.shape_of(n)
        if shape is None:  # not a single tensor (a tuple from chunk/split, a size, ...)
            continue
        users = list(n.users)
        if len(users) == 1 and _is_epilogue(gm, users[0]):
            continue
        cuts.append(name)
    return cuts


@dataclass
class Region:
    """A single-entry/single-exit region: the nodes on paths from ``entry`` (outside) to ``exit``."""

    entry: str
    exit: str
    mask: int          # bitset over the graph's node indices
    macs: int


def bits(mask: int):
    """The indices of the set bits of ``mask``, lowest first (regions are node bitsets)."""
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low


def regions(gm: torch.fx.GraphModule) -> tuple[list[Region], list[str]]:
    """Every SESE region with a prunable channel group inside, and the node order its masks use.

    For an exit x and an entry e that dominates x, the region is B = descendants(e) ∩
    ancestors-or-self(x). Dominance makes every input of B come from B or e (single entry); the
    region is single-exit when no node of B other than x has a user outside B. Walking e up x's
    dominator chain only grows B, so the walk stops at the first user outside.
    """
    nodes = [n for n in gm.graph.nodes if not is_constant(n)]
    index = {n.name: i for i, n in enumerate(nodes)}
    preds = [[index[a.name] for a in n.all_input_nodes if a.name in index] for n in nodes]
    users = [0] * len(nodes)
    for i, ps in enumerate(preds):
        for p in ps:
            users[p] |= 1 << i
    anc = [0] * len(nodes)
    for i, ps in enumerate(preds):
        m = 1 << i
        for p in ps:
            m |= anc[p]
        anc[i] = m
    desc = [0] * len(nodes)
    for i in range(len(nodes) - 1, -1, -1):
        m = 0
        for u in bits(users[i]):
            m |= desc[u] | (1 << u)
        desc[i] = m
    macs = [analysis.node_macs(gm, n) for n in nodes]
    groups = []
    for g in analysis.channel_groups(gm):
        if g.prunable:
            gmask = 0
            for name in g.nodes:
                gmask |= 1 << index[name]
            gall = gmask
            for i in bits(gmask):
                gall |= users[i]
            groups.append((gmask, gall))
    idom = nx.immediate_dominators(dataflow_graph(gm), SOURCE)

    def boundary_ok(n: torch.fx.Node) -> bool:
        if analysis.shape_of(n) is None:
            return False
        us = list(n.users)
        return not (len(us) == 1 and _is_epilogue(gm, us[0]))

    found: list[Region] = []
    for x, xn in enumerate(nodes):
        if xn.op in ("placeholder", "output") or not boundary_ok(xn):
            continue
        inside = [gall for gmask, gall in groups if not (gmask >> x) & 1 and gall & ~anc[x] == 0]
        if not inside:
            continue
        outside_users = 0  # nodes of anc(x) with a user that is not in anc(x)
        for i in bits(anc[x] & ~(1 << x)):
            if users[i] & ~anc[x]:
                outside_users |= 1 << i
        e = idom.get(xn.name)
        while e is not None and e != SOURCE:
            ei = index[e]
            body = anc[x] & desc[ei]
            if body & outside_users:
                break
            if boundary_ok(nodes[ei]) and any(gall & ~desc[ei] == 0 for gall in inside):
                found.append(Region(e, xn.name, body, sum(macs[i] for i in bits(body))))
            e = idom.get(e)
    return found, [n.name for n in nodes]
