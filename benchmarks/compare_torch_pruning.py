"""legoc's channel-group analysis vs Torch-Pruning's DependencyGraph, on every block of every zoo model.

    .venv/bin/python benchmarks/compare_torch_pruning.py

A block's input and output shapes are fixed; only interior channels may be pruned. Per block:

* legoc: prunable groups / channels from ``analysis.channel_groups``; each prunable group is
  verified by removing 1 channel (``prune.prune_group``) on a copy and running the block.
* TP (a): ``DG.get_all_groups()`` with nothing ignored. Each group is pruned by 1 channel on a
  copy; it *breaks* the boundary if the output shape changes, *crashes* if the block no longer
  runs (e.g. an add with the untouchable block input).
* TP (b): the same with ``ignored_layers`` = the layers coupled to the block boundary, found by an
  fx walk independent of legoc (convs/Linears whose output channels reach the block output, or an
  elementwise op with the block input, through channel-preserving ops). Groups that still break
  or crash are counted as failures; the rest are TP's valid prunable groups / channels.

Times are the analyses only: legoc = ShapeProp + channel_groups; TP = build_dependency +
get_all_groups. Verification runs are not timed.
"""
from __future__ import annotations

import contextlib
import copy
import io
import importlib.util
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp

try:
    import torch_pruning as tp
except ImportError:
    print("torch_pruning is not installed: .venv/bin/pip install torch-pruning==1.6.1 --no-deps")
    sys.exit(0)

from legoc.passes import ProgramState, analysis
from legoc.passes.capture import Capture
from legoc.passes.partition import partition
from legoc.passes import prune as lg_prune

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("legoc_zoo", ROOT / "tests" / "zoo.py")
zoo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(zoo)

ROOT_TYPES = [nn.Conv2d, nn.Linear]


# ----------------------------------------------------------------------------- boundary layers (fx walk)


def _is_stop(gm: torch.fx.GraphModule, n: torch.fx.Node) -> bool:
    """A layer that changes the channel count: conv (not depthwise) or Linear."""
    if n.op != "call_module":
        return False
    m = gm.get_submodule(n.target)
    if isinstance(m, nn.modules.conv._ConvNd):
        return not (m.groups == m.in_channels == m.out_channels)
    return isinstance(m, nn.Linear)


def boundary_layers(gm: torch.fx.GraphModule) -> set[str]:
    """Targets of convs/Linears whose output channels are coupled to the block input or output.

    Walk from the placeholder (forward) and the output's argument (backward) through every op
    that is not a conv/Linear; reaching a conv/Linear backward means its out-channels are coupled.
    A concat reached forward (from one of its inputs) is not crossed: the other inputs' channels
    stay their own. Over-approximations only make TP (b) more conservative; misses show up as
    failures in the verification.
    """
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    ignored: set[str] = set()
    seen: set[tuple[str, str]] = set()
    stack: list[tuple[torch.fx.Node, str]] = [(n, "fwd") for n in gm.graph.nodes if n.op == "placeholder"]
    stack += [(a, "bwd") for a in out_node.all_input_nodes]
    while stack:
        n, d = stack.pop()
        if (n.name, d) in seen:
            continue
        seen.add((n.name, d))
        if _is_stop(gm, n):
            if d == "bwd":
                ignored.add(n.target)
            continue
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.modules.conv._ConvNd):
            ignored.add(n.target)  # a depthwise conv on boundary channels (TP may root a group at it)
        if n.op == "get_attr":
            continue
        if d == "fwd" and n.op == "call_function" and n.target in (torch.cat, torch.concat):
            stack += [(u, "fwd") for u in n.users if u is not out_node]
            continue
        stack += [(a, "bwd") for a in n.all_input_nodes]
        stack += [(u, "fwd") for u in n.users if u is not out_node]
    return ignored


# ----------------------------------------------------------------------------- Torch-Pruning


def _tp_groups(gm: nn.Module, x: torch.Tensor, ignored: set[str]):
    for p in gm.parameters():
        p.requires_grad_(True)
    dg = tp.DependencyGraph().build_dependency(gm, example_inputs=x, verbose=False)
    layers = [gm.get_submodule(t) for t in ignored]
    groups = list(dg.get_all_groups(ignored_layers=layers, root_module_types=ROOT_TYPES))
    return dg, groups


def _root_name(dg, group) -> str:
    return dg._module2name[group[0].dep.target.module]


def _out_modules(dg, group) -> set[str]:
    """Names of the modules whose output / per-channel axis the group prunes."""
    return {dg._module2name[dep.target.module] for dep, _ in group
            if dg.is_out_channel_pruning_fn(dep.handler) and dep.target.module in dg._module2name}


def tp_analyse(gm: torch.fx.GraphModule, x: torch.Tensor, ignored: set[str]):
    """(seconds, [(root name, channels, out-pruned module names)]) for TP's groups."""
    gm = copy.deepcopy(gm)
    t0 = time.perf_counter()
    dg, groups = _tp_groups(gm, x, ignored)
    secs = time.perf_counter() - t0
    return secs, [(_root_name(dg, g), len(g[0].idxs), _out_modules(dg, g)) for g in groups]


def _ch_groups(dg, group) -> int:
    """Channel grouping of a TP group: the largest `groups` of a grouped (not depthwise) conv in it."""
    gs = [1]
    for dep, _ in group:
        m = dep.target.module
        if isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1 and not (m.groups == m.in_channels == m.out_channels):
            gs.append(m.groups)
    return max(gs)


def tp_try(gm: torch.fx.GraphModule, x: torch.Tensor, ignored: set[str], k: int, root: str, out_shape) -> str:
    """Prune channel 0 of TP's k-th group on a copy: 'ok', 'boundary' or 'crash: <why>'."""
    gm = copy.deepcopy(gm)
    try:
        dg, groups = _tp_groups(gm, x, ignored)
        g = groups[k]
        assert _root_name(dg, g) == root, "group order changed between builds"
        # one channel per channel group of a grouped conv (as tp's MetaPruner does), else one channel
        ch = _ch_groups(dg, g)
        idxs = [i * (len(g[0].idxs) // ch) for i in range(ch)]
        dg.get_pruning_group(g[0].dep.target.module, g[0].dep.handler, idxs).prune()
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):  # fx prints failing code
            y = gm(x)
    except Exception as exc:  # noqa: BLE001 - any failure of the pruned block is a measurement
        return f"crash: {type(exc).__name__}: {str(exc).splitlines()[0][:90] if str(exc) else ''}"
    return "ok" if tuple(y.shape) == tuple(out_shape) else "boundary"


# ----------------------------------------------------------------------------- legoc


def legoc_analyse(gm: torch.fx.GraphModule, x: torch.Tensor):
    gm = copy.deepcopy(gm)
    t0 = time.perf_counter()
    ShapeProp(gm).propagate(x)
    groups = analysis.channel_groups(gm)
    return time.perf_counter() - t0, groups


def legoc_try(gm: torch.fx.GraphModule, x: torch.Tensor, k: int, out_shape) -> str:
    gm = copy.deepcopy(gm)
    ShapeProp(gm).propagate(x)
    g = [g for g in analysis.channel_groups(gm) if g.prunable][k]
    try:
        keep = torch.arange(1, g.channels)
        if hasattr(lg_prune, "apply_channels"):  # concat-aware analysis (ChannelPlan)
            lg_prune.apply_channels(gm, analysis.channel_plan(gm), {g.root: keep})
        else:
            lg_prune.prune_group(gm, g, keep)
        gm.recompile()
        with torch.no_grad():
            y = gm(x)
    except Exception as exc:  # noqa: BLE001
        return f"crash: {type(exc).__name__}"
    return "ok" if tuple(y.shape) == tuple(out_shape) else "boundary"


# ----------------------------------------------------------------------------- main


def measure_block(b, x, out_shape, notes: Counter) -> dict:
    r = {}
    secs, groups = legoc_analyse(b.gm, x)
    pr = [g for g in groups if g.prunable]
    fails = [legoc_try(b.gm, x, k, out_shape) for k in range(len(pr))]
    r["lg_t"], r["lg_g"], r["lg_c"] = secs, len(pr), sum(g.channels for g in pr)
    r["lg_fail"] = sum(f != "ok" for f in fails)
    lg_ok_mods = {m for g, f in zip(pr, fails) if f == "ok" for m in g.producers + g.members}
    lg_blocked = {m: g.blocked for g in groups if not g.prunable for m in g.producers + g.members}

    # (a) nothing ignored
    secs, ga = tp_analyse(b.gm, x, set())
    ra = [tp_try(b.gm, x, set(), k, root, out_shape) for k, (root, _, _) in enumerate(ga)]
    r["tp_t"], r["a_g"], r["a_c"] = secs, len(ga), sum(c for _, c, _ in ga)
    r["a_bnd"] = sum(s == "boundary" for s in ra)
    r["a_crash"] = sum(s.startswith("crash") for s in ra)
    for s in ra:
        if s.startswith("crash"):
            notes[f"(a) {s}"] += 1

    # (b) boundary layers ignored
    ign = boundary_layers(b.gm)
    _, gb = tp_analyse(b.gm, x, ign)
    rb = [tp_try(b.gm, x, ign, k, root, out_shape) for k, (root, _, _) in enumerate(gb)]
    ok = [grp for grp, s in zip(gb, rb) if s == "ok"]
    r["b_g"], r["b_c"] = len(ok), sum(c for _, c, _ in ok)
    r["b_fail"] = len(gb) - len(ok)
    for (root, _, _), s in zip(gb, rb):
        if s != "ok":
            notes[f"(b) {s} (root {root})"] += 1
    # who finds what the other does not (matched by the modules whose channels are pruned)
    for root, c, mods in ok:
        if not mods & lg_ok_mods:
            why = next((lg_blocked[m] for m in sorted(mods) if m in lg_blocked), "in no legoc group")
            notes[f"TP only ({_kind(why)})"] += c
    tp_ok_mods = {m for _, _, mods in ok for m in mods}
    for g, f in zip(pr, fails):
        if f == "ok" and not set(g.producers + g.members) & tp_ok_mods:
            notes["legoc only"] += g.channels
    return r


def _kind(why: str) -> str:
    """Reduce a legoc 'blocked' reason to its kind (drop node names)."""
    for key in ("cat", "chunk", "grouped conv", "graph input", "graph output", "permute", "size",
                "reshape", "called"):
        if key in why:
            return f"legoc: {key}"
    return f"legoc: {why}"


def main() -> None:
    warnings.filterwarnings("ignore")
    t_start = time.perf_counter()
    cols = ["model", "blk", "lg ch/grp", "lg fail", "TP(a) grp", "(a) bnd", "(a) crash",
            "TP(b) ch/grp", "(b) fail", "lg ms", "TP ms"]
    fmt = "{:<18} {:>3} {:>9} {:>7} {:>9} {:>7} {:>9} {:>12} {:>8} {:>7} {:>7}"
    print(fmt.format(*cols))
    total = Counter()
    notes_all: dict[str, Counter] = {}
    for name in zoo.MODELS:
        model, inputs = zoo.MODELS[name]()
        gm = Capture()(ProgramState(model=model, example_inputs=inputs), None).state.gm
        part = partition(gm)
        env = part.trace_env(*inputs)
        acc = Counter()
        notes = Counter()
        for b in part.blocks:
            x = env[b.inputs[0]].detach()
            r = measure_block(b, x, tuple(env[b.outputs[0]].shape), notes)
            acc.update({k: v for k, v in r.items()})
        acc["blk"] = len(part.blocks)
        total.update(acc)
        notes_all[name] = notes
        print(_row(fmt, name, acc))
    print(_row(fmt, "TOTAL", total))
    print()
    for name, notes in notes_all.items():
        for k, v in sorted(notes.items()):
            unit = "ch" if k.startswith(("TP only", "legoc only")) else "grp"
            print(f"  {name}: {k}: {v} {unit}")
    print(f"\ntorch {torch.__version__}, torch_pruning {getattr(tp, '__version__', '?')}; "
          f"wall {time.perf_counter() - t_start:.1f} s")


def _row(fmt: str, name: str, a: Counter) -> str:
    return fmt.format(
        name, a["blk"], f"{a['lg_c']}/{a['lg_g']}", a["lg_fail"], a["a_g"], a["a_bnd"], a["a_crash"],
        f"{a['b_c']}/{a['b_g']}", a["b_fail"], f"{a['lg_t'] * 1e3:.1f}", f"{a['tp_t'] * 1e3:.1f}")


if __name__ == "__main__":
    main()
