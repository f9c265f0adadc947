"""partition: cut the traced graph into swappable blocks by dominator analysis.

1. Dataflow graph of the fx nodes, with a virtual source feeding every graph input; constants
   (get_attr, ops with no tensor inputs) are left out and copied into whoever uses them.
2. The dominators of the output node (networkx ``immediate_dominators``) are the nodes every
   path from the inputs to the output passes through. In a DAG where every node reaches the
   output they are exactly the clean cut points: no tensor other than the cut node's output
   crosses them. Cuts fall after activations: a node whose single user is a BN or an
   activation is never a cut, so conv/BN/ReLU stay together.
3. The nodes between consecutive cuts form *atoms* (one tensor in, one out). A run of atoms
   can be a block if some channel group lies wholly inside it (something to prune that does not
   touch the run's input or output). Dynamic programming picks at most K blocks that cover the
   most MACs and, among those, have the smallest largest block (balanced by MACs). Atoms not in
   a block form the frame.

The general region case (long skips, blocks that are not on the dominator chain) extends step 3.
"""
from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import torch
import torch.fx
import torch.nn as nn

from legoc.errors import InternalError, UserError
from legoc.passes import analysis
from legoc.passes.infra import Pass, PassResult, ProgramState
from legoc.passes.segment import Partition, Segment, extract, output_spec_of

DEFAULT_BLOCKS = 4
_SOURCE = "__legoc_source__"

_EPILOGUE_MODULES = (nn.modules.batchnorm._BatchNorm,) + tuple(
    m for m in analysis._CHANNEL_MODULES
    if m not in (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
                 nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Upsample, nn.UpsamplingNearest2d,
                 nn.UpsamplingBilinear2d, nn.Identity, nn.ZeroPad2d, nn.ConstantPad2d)
)
_EPILOGUE_FUNCTIONS = {
    f for f in analysis._CHANNEL_FUNCTIONS
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
    g.add_node(_SOURCE)
    for n in gm.graph.nodes:
        if is_constant(n):
            continue
        g.add_node(n.name)
        if n.op == "placeholder":
            g.add_edge(_SOURCE, n.name)
        for a in n.all_input_nodes:
            if not is_constant(a):
                g.add_edge(a.name, n.name)
    return g


def cut_points(gm: torch.fx.GraphModule) -> list[str]:
    """Tensor nodes every input-to-output path passes through, in topological order, minus
    those that would split a conv from its BN/activation."""
    g = dataflow_graph(gm)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    idom = nx.immediate_dominators(g, _SOURCE)
    chain, v = [], idom.get(out.name)
    while v is not None and v != _SOURCE:
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
class _Atoms:
    names: list[list[str]]     # nodes of each atom (no placeholders, no output, no constants)
    macs: list[int]
    candidate: list[bool]      # may be part of a block (starts and ends at a cut, no graph input inside)
    spans: list[tuple[int, int]]  # atom span of every prunable channel group


def _atoms(gm: torch.fx.GraphModule, cuts: list[str]) -> _Atoms:
    cutset = set(cuts)
    names: list[list[str]] = [[]]
    has_input = [False]
    ends_at_cut = [False]
    atom_of: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "output" or is_constant(n):
            continue
        if n.op == "placeholder":
            has_input[-1] = True
        names[-1].append(n.name)
        atom_of[n.name] = len(names) - 1
        if n.name in cutset:
            ends_at_cut[-1] = True
            names.append([])
            has_input.append(False)
            ends_at_cut.append(False)
    by_name = {n.name: n for n in gm.graph.nodes}
    macs = [sum(analysis.node_macs(gm, by_name[x]) for x in atom) for atom in names]
    last = len(names)
    candidate = [i > 0 and ends_at_cut[i] and not has_input[i] and i - 1 >= 0 and ends_at_cut[i - 1]
                 for i in range(len(names))]
    spans = []
    for grp in analysis.channel_groups(gm):
        if not grp.prunable:
            continue
        idx = set()
        for name in grp.nodes:
            n = by_name[name]
            idx.add(atom_of.get(name, 0))
            for u in n.users:
                idx.add(atom_of.get(u.name, last))
        spans.append((min(idx), max(idx)))
    return _Atoms(names, macs, candidate, spans)


def choose_blocks(atoms: _Atoms, k: int) -> list[tuple[int, int]]:
    """At most k disjoint runs [i, j] of candidate atoms, each with a channel group inside, that
    cover the most MACs; ties go to the smallest largest block. Dynamic programming, exact."""
    n = len(atoms.names)
    pref = [0]
    for m in atoms.macs:
        pref.append(pref[-1] + m)

    def prunable(i: int, j: int) -> bool:
        return any(i <= a and b <= j for a, b in atoms.spans)

    # best[p][b] = (covered MACs, -largest block MACs, runs) over atoms < p with b blocks
    NEG = (-1, 0, ())
    best = [[NEG] * (k + 1) for _ in range(n + 1)]
    best[0][0] = (0, 0, ())
    for p in range(n):
        for b in range(k + 1):
            cur = best[p][b]
            if cur is NEG:
                continue
            if cur[:2] > best[p + 1][b][:2]:
                best[p + 1][b] = cur
            if b == k or not atoms.candidate[p]:
                continue
            for j in range(p, n):
                if not atoms.candidate[j]:
                    break
                if not prunable(p, j):
                    continue
                size = pref[j + 1] - pref[p]
                cand = (cur[0] + size, min(cur[1], -size), cur[2] + ((p, j),))
                if cand[:2] > best[j + 1][b + 1][:2]:
                    best[j + 1][b + 1] = cand
    options = [best[n][b] for b in range(k + 1) if best[n][b] is not NEG]
    return list(max(options, key=lambda t: (t[0], t[1], -len(t[2])))[2]) if options else []


def max_blocks(atoms: _Atoms) -> int:
    """The largest number of disjoint blocks this graph allows (greedy by earliest end: optimal
    for interval scheduling of the minimal prunable runs)."""
    count, start = 0, 0
    n = len(atoms.names)
    for j in range(n):
        if not atoms.candidate[j]:
            start = j + 1
            continue
        if any(start <= a and b <= j for a, b in atoms.spans):
            count, start = count + 1, j + 1
    return count


def partition(gm: torch.fx.GraphModule, blocks: int | None = None, source: str = "the model") -> Partition:
    cuts = cut_points(gm)
    atoms = _atoms(gm, cuts)
    limit = max_blocks(atoms)
    if limit == 0:
        raise UserError(
            f"{source} has no block to scale: no run of layers between cut points has interior "
            f"channels to prune (a conv feeding another conv); legoc needs at least two convs in a row"
        )
    if blocks is not None and blocks > limit:
        raise UserError(f"--blocks {blocks} is more than {source} allows: at most {limit} blocks; use --blocks {limit} or fewer")
    if blocks is not None and blocks < 1:
        raise UserError(f"--blocks must be at least 1, got {blocks}")
    k = blocks if blocks is not None else min(DEFAULT_BLOCKS, limit)
    runs = choose_blocks(atoms, k)
    if blocks is not None and len(runs) < blocks:
        raise InternalError(f"partition found {len(runs)} blocks although {blocks} are possible")
    return _assemble(gm, atoms, runs, limit)


def _assemble(gm: torch.fx.GraphModule, atoms: _Atoms, runs: list[tuple[int, int]], limit: int) -> Partition:
    by_name = {n.name: n for n in gm.graph.nodes}
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    graph_inputs = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    # group atoms into segments: each run is one block; maximal stretches between runs are frames
    pieces: list[tuple[str, list[str]]] = []
    run_at = {i: j for i, j in runs}
    p = 0
    frame: list[str] = []
    while p < len(atoms.names):
        if p in run_at:
            if frame:
                pieces.append(("frame", frame))
                frame = []
            j = run_at[p]
            pieces.append(("block", [x for a in range(p, j + 1) for x in atoms.names[a]]))
            p = j + 1
        else:
            frame += [x for x in atoms.names[p] if by_name[x].op != "placeholder"]
            p += 1
    if frame:
        pieces.append(("frame", frame))

    segments: list[Segment] = []
    counters = {"block": 0, "frame": 0}
    seg_of = {}
    for kind, names in pieces:
        if not names:
            continue
        for x in names:
            seg_of[x] = len(segments)
        segments.append(Segment(name="", kind=kind, nodes=names, inputs=[], outputs=[], gm=None))
    for idx, seg in enumerate(segments):
        inside = set(seg.nodes)
        ins: list[str] = []
        outs: list[str] = []
        for x in seg.nodes:
            n = by_name[x]
            for a in n.all_input_nodes:
                if a.name not in inside and not is_constant(a) and a.name not in ins:
                    ins.append(a.name)
            if any(u is out_node or seg_of.get(u.name, idx) != idx for u in n.users):
                outs.append(x)
        seg.inputs, seg.outputs = ins, outs
        if seg.is_block and (len(ins) != 1 or len(outs) != 1):
            raise InternalError(f"block at {seg.nodes[0]}..{seg.nodes[-1]} has {len(ins)} inputs and {len(outs)} outputs")
        seg.name = f"{seg.kind}{counters[seg.kind]}"
        counters[seg.kind] += 1
        seg.gm = extract(gm, seg.nodes, ins, outs, class_name=seg.name)
        seg.macs = sum(analysis.node_macs(gm, by_name[x]) for x in seg.nodes)
    meta = {}
    for n in gm.graph.nodes:
        shape = analysis.shape_of(n)
        if shape is not None:
            meta[n.name] = {"shape": list(shape), "dtype": str(n.meta["tensor_meta"].dtype).replace("torch.", "")}
    return Partition(
        segments=segments,
        graph_inputs=graph_inputs,
        output_spec=output_spec_of(out_node.args[0]),
        total_macs=analysis.graph_macs(gm),
        max_blocks=limit,
        tensor_meta=meta,
    )


class PartitionPass(Pass):
    """Dominator partition into at most ``config.blocks`` blocks plus the frame."""

    name = "partition"

    def requires(self, state: ProgramState) -> None:
        if state.gm is None:
            raise InternalError("partition needs a traced graph (run capture first)")

    def call(self, state: ProgramState, config) -> PassResult:
        part = partition(state.gm, getattr(config, "blocks", None), source=state.source)
        return PassResult(state.replace(partition=part), modified=True)

    def ensures(self, state: ProgramState) -> None:
        with torch.no_grad():
            ref = torch.utils._pytree.tree_leaves(state.gm(*state.example_inputs))
            got = torch.utils._pytree.tree_leaves(state.partition.run(*state.example_inputs))
        worst = max((float((a - b).abs().max()) for a, b in zip(ref, got)), default=0.0)
        if len(ref) != len(got) or worst > 1e-5:
            raise InternalError(f"the blocks do not recompose the model (max abs diff {worst:.3g})")
