"""partition: cut the traced graph into swappable blocks by dominator analysis.

1. Candidate blocks: single-entry/single-exit regions with a prunable channel group inside
   (legoc.passes.regions: dataflow graph, dominators, regions).
2. CP-SAT picks at most K disjoint candidates covering the most MACs and, among those, with the
   smallest largest block (balanced by MACs). Everything else is the frame: fixed segments that
   run between blocks (skip connections, concatenations, heads). Segments are ordered
   topologically with every block contracted to one node.
"""
from __future__ import annotations

import heapq
from typing import TYPE_CHECKING

import torch
import torch.fx

from legoc.errors import InternalError, UserError
from legoc.passes import analysis
from legoc.passes.infra import Pass, PassResult, ProgramState
from legoc.passes.regions import Region, bits, cut_points, dataflow_graph, is_constant, regions
from legoc.passes.segment import Partition, Segment, extract, output_spec_of

if TYPE_CHECKING:
    from legoc.pipeline import CompileConfig

__all__ = ["PartitionPass", "choose_blocks", "cut_points", "dataflow_graph", "max_blocks", "partition", "select"]

DEFAULT_BLOCKS = 4
BALANCE = 0.5  # how much a smaller largest block is worth against MACs left in the frame


def _packing(cands: list[Region], time_limit: float):
    """A CP-SAT model with one 0/1 variable per region and no two chosen regions sharing a node,
    and a deterministic solver (one worker, fixed seed, time limit)."""
    from ortools.sat.python import cp_model

    model = cp_model.CpModel()
    use = [model.new_bool_var(f"r{i}") for i in range(len(cands))]
    by_node: dict[int, list[int]] = {}
    for i, c in enumerate(cands):
        for b in bits(c.mask):
            by_node.setdefault(b, []).append(i)
    for members in by_node.values():
        if len(members) > 1:
            model.add_at_most_one(use[i] for i in members)
    solver = cp_model.CpSolver()
    solver.parameters.num_workers = 1
    solver.parameters.random_seed = 0
    solver.parameters.max_time_in_seconds = time_limit
    return model, use, solver


def choose_blocks(cands: list[Region], k: int, time_limit: float = 10.0) -> list[Region]:
    """At most k disjoint regions covering the most MACs; among those, the smallest largest
    block (balanced). Two exact CP-SAT solves on integer MACs (lexicographic objective), one
    worker each so the answer is deterministic."""
    from ortools.sat.python import cp_model

    if not cands or k <= 0:
        return []
    size = [max(1, c.macs) for c in cands]
    model, use, solver = _packing(cands, time_limit)
    model.add(sum(use) <= k)
    coverage = sum(s * u for s, u in zip(size, use))

    def solve():
        status = solver.solve(model)
        if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            raise InternalError(f"block selection found no solution (CP-SAT status {solver.status_name(status)})")
        return [solver.boolean_value(u) for u in use]

    model.maximize(coverage)
    hint = solve()
    best = sum(s for s, u in zip(size, hint) if u)
    model.add(coverage >= best)
    largest = model.new_int_var(0, max(size), "largest")
    for u, s in zip(use, size):
        model.add(largest >= s).only_enforce_if(u)
    model.clear_objective()
    for u, h in zip(use, hint):
        model.add_hint(u, h)
    model.minimize(largest)
    return [c for c, u in zip(cands, solve()) if u]


def max_blocks(cands: list[Region]) -> int:
    """The largest number of disjoint prunable regions: greedy by earliest-ending minimal region
    is not exact for nested regions, so this is a small CP-SAT problem too."""
    if not cands:
        return 0
    # only regions that contain no other candidate can be part of a maximum packing's minimal form
    minimal = [c for c in cands if not any(o.mask != c.mask and o.mask & c.mask == o.mask for o in cands)]
    model, use, solver = _packing(minimal, 10.0)
    model.maximize(sum(use))
    solver.solve(model)
    return int(round(solver.objective_value))


def select(gm: torch.fx.GraphModule, cands: list[Region], order: list[str], k: int | None):
    """Pick at most k blocks; returns (chosen regions, the largest number of blocks possible).

    The score of a choice is (MACs in blocks - BALANCE * MACs of the largest block): as much of
    the model scalable as possible, in blocks of similar size (a U-Net is better cut into stages
    with the skips in the frame than into one block that swallows them).

    Regions whose entry and exit are both on the output's dominator chain are intervals of the
    chain's atoms (the nodes between consecutive cuts): dynamic programming over the atoms picks
    those exactly and fast. Regions inside one atom (a U-Net stage under a long skip, a detection
    head) are packed per atom by CP-SAT and offered to the DP as one option per block count.
    Regions that start inside one atom and end inside another are not considered. An atom that is
    itself a candidate block is not also split into inner blocks."""
    cuts = cut_points(gm)
    pos = {name: i for i, name in enumerate(order)}
    cut_at = {pos[c]: i for i, c in enumerate(cuts)}
    atom_of, atom = [], 0
    for i in range(len(order)):
        atom_of.append(atom)
        if i in cut_at:
            atom += 1
    n_atoms = atom + 1
    intervals: dict[int, list[tuple[int, Region]]] = {}
    single = set()
    inner: dict[int, list[Region]] = {}
    for r in cands:
        e, x = pos[r.entry], pos[r.exit]
        if e in cut_at and x in cut_at:
            first, last = atom_of[e] + 1, atom_of[x]
            intervals.setdefault(first, []).append((last, r))
            if first == last:
                single.add(first)
        elif atom_of[min(bits(r.mask))] == atom_of[x]:
            inner.setdefault(atom_of[x], []).append(r)

    # the most blocks: intervals plus the most disjoint inner regions of frame atoms
    most = [0] * (n_atoms + 1)
    inner_most = {a: max_blocks(rs) for a, rs in inner.items()}
    for p in range(n_atoms):
        most[p + 1] = max(most[p + 1], most[p] + inner_most.get(p, 0))
        for q, _ in intervals.get(p, []):
            most[q + 1] = max(most[q + 1], most[p] + 1)
    limit = most[n_atoms]
    exact = k is not None     # --blocks K asks for K blocks; the default is at most DEFAULT_BLOCKS
    if k is None:
        k = min(DEFAULT_BLOCKS, limit)
    if limit == 0 or k > limit:
        return [], limit

    packs: dict[int, list[tuple[int, int, int, tuple]]] = {}
    for a, rs in inner.items():
        if a in single and inner_most[a] < 2:
            continue  # one inner block would only shrink the atom's own candidate
        packs[a] = []
        for j in range(2 if a in single else 1, min(k, inner_most[a]) + 1):
            chosen = choose_blocks(rs, j)
            packs[a].append((len(chosen), sum(r.macs for r in chosen), max(r.macs for r in chosen), tuple(chosen)))
    total = max(1, analysis.graph_macs(gm))
    sizes = sorted({r.macs for rs in intervals.values() for _, r in rs} | {pk[2] for ps in packs.values() for pk in ps})
    caps = sorted({sizes[round(i * (len(sizes) - 1) / 23)] for i in range(24)}) if sizes else []
    best_score, chosen = None, []
    for cap in caps:  # the largest block allowed; score = coverage - BALANCE * largest
        got = _dp(n_atoms, k, intervals, packs, cap, exact)
        if got is None:
            continue
        cov, neg_largest, regs = got
        score = (cov + BALANCE * neg_largest) / total
        if best_score is None or (score, cov) > best_score:
            best_score, chosen = (score, cov), list(regs)
    return chosen, limit


def _dp(n_atoms, k, intervals, packs, cap, exact: bool = False):
    """Max coverage (then smallest largest block) with blocks of at most ``cap`` MACs, in at most
    ``k`` blocks (``exact``: exactly ``k``; fewer, larger blocks can cover more MACs)."""
    best = [[None] * (k + 1) for _ in range(n_atoms + 1)]
    best[0][0] = (0, 0, ())

    def relax(p, b, cand):
        if b <= k and (best[p][b] is None or cand[:2] > best[p][b][:2]):
            best[p][b] = cand

    for p in range(n_atoms):
        for b in range(k + 1):
            cur = best[p][b]
            if cur is None:
                continue
            relax(p + 1, b, cur)
            for j, cov, largest, regs in packs.get(p, []):
                if largest <= cap:
                    relax(p + 1, b + j, (cur[0] + cov, min(cur[1], -largest), cur[2] + regs))
            for q, r in intervals.get(p, []):
                if r.macs <= cap:
                    relax(q + 1, b + 1, (cur[0] + r.macs, min(cur[1], -r.macs), cur[2] + (r,)))
    options = [best[n_atoms][b] for b in (range(k, k + 1) if exact else range(k + 1))
               if best[n_atoms][b] is not None and best[n_atoms][b][2]]
    return max(options, key=lambda t: (t[0], t[1], -len(t[2]))) if options else None


def partition(gm: torch.fx.GraphModule, blocks: int | None = None, source: str = "the model") -> Partition:
    if blocks is not None and blocks < 1:
        raise UserError(f"--blocks must be at least 1, got {blocks}")
    cands, order = regions(gm)
    chosen, limit = select(gm, cands, order, blocks)
    if limit == 0:
        raise UserError(
            f"{source} has no block to scale: no single-entry/single-exit region has interior "
            f"channels to prune (a conv feeding another conv); legoc needs at least two convs in a row"
        )
    if blocks is not None and blocks > limit:
        raise UserError(f"--blocks {blocks} is more than {source} allows: at most {limit} blocks; use --blocks {limit} or fewer")
    if blocks is not None and len(chosen) < blocks:
        raise InternalError(f"partition found {len(chosen)} blocks although {blocks} are possible")
    return _assemble(gm, _pieces(gm, chosen, order), limit)


def _pieces(gm: torch.fx.GraphModule, chosen: list[Region], order: list[str]) -> list[tuple[str, list[str]]]:
    """Blocks and frame runs in a topological order of the graph with every block contracted."""
    pos = {name: i for i, name in enumerate(order)}
    unit_of: dict[str, int] = {}
    units: list[list[str]] = []
    kinds: list[str] = []
    for r in sorted(chosen, key=lambda r: min(bits(r.mask))):
        for b in bits(r.mask):
            unit_of[order[b]] = len(units)
        units.append([order[b] for b in sorted(bits(r.mask))])
        kinds.append("block")
    by_name = {n.name: n for n in gm.graph.nodes}
    for name in order:
        if name not in unit_of and by_name[name].op not in ("placeholder", "output"):
            unit_of[name] = len(units)
            units.append([name])
            kinds.append("frame")
    indeg = [0] * len(units)
    succ: list[set[int]] = [set() for _ in units]
    for u, names in enumerate(units):
        for name in names:
            for a in by_name[name].all_input_nodes:
                v = unit_of.get(a.name)
                if v is not None and v != u and u not in succ[v]:
                    succ[v].add(u)
                    indeg[u] += 1
    heap = [(pos[units[u][0]], u) for u in range(len(units)) if indeg[u] == 0]
    heapq.heapify(heap)
    seq = []
    while heap:
        _, u = heapq.heappop(heap)
        seq.append(u)
        for v in succ[u]:
            indeg[v] -= 1
            if indeg[v] == 0:
                heapq.heappush(heap, (pos[units[v][0]], v))
    if len(seq) != len(units):
        raise InternalError("the chosen blocks make the segment graph cyclic")
    pieces: list[tuple[str, list[str]]] = []
    for u in seq:
        if kinds[u] == "frame" and pieces and pieces[-1][0] == "frame":
            pieces[-1][1].extend(units[u])
        else:
            pieces.append((kinds[u], list(units[u])))
    return pieces


def _assemble(gm: torch.fx.GraphModule, pieces: list[tuple[str, list[str]]], limit: int) -> Partition:
    by_name = {n.name: n for n in gm.graph.nodes}
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    graph_inputs = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
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

    def call(self, state: ProgramState, config: CompileConfig) -> PassResult:
        part = partition(state.gm, config.blocks, source=state.source)
        return PassResult(state.replace(partition=part), modified=True)

    def ensures(self, state: ProgramState) -> None:
        with torch.no_grad():
            ref = torch.utils._pytree.tree_leaves(state.gm(*state.example_inputs))
            got = torch.utils._pytree.tree_leaves(state.partition.run(*state.example_inputs))
        worst = max((float((a - b).abs().max()) for a, b in zip(ref, got)), default=0.0)
        if len(ref) != len(got) or worst > 1e-5:
            raise InternalError(f"the blocks do not recompose the model (max abs diff {worst:.3g})")
