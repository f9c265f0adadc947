"""legoc's channel-group analysis vs Torch-Pruning's DependencyGraph, on every block of every zoo model.

    .venv/bin/python benchmarks/compare_torch_pruning.py

A block's input and output shapes are fixed; only interior channels may be pruned. Per block:

* legoc: prunable groups / channels from ``analysis.channel_groups``.
* TP (a): ``DG.get_all_groups(root_module_types=[Conv2d, Linear])`` with nothing ignored.
* TP (b): the same with ``ignored_layers`` = the layers coupled to the block boundary, found by an
  fx walk independent of legoc (`boundary_layers`).

Every group (legoc's and TP's) is verified on a copy of the block: its channel 0 is first made
exactly zero (producers' and BN / depthwise rows zeroed), then pruned (TP: one channel per channel
group of a grouped conv, as tp's MetaPruner prunes them; legoc: ``prune.apply_channels``). The
pruned block must run, keep its output shape ("bnd" otherwise) and give the same output on the
real block input and two random ones ("wrong" otherwise: a wrong slice somewhere). TP (b)
"fail" counts groups that crash / break / give wrong values; TP (b) ch/grp counts the rest.
The "TP only" / "legoc only" lines match groups by the modules whose channels they prune and give
legoc's reason for blocking what only TP prunes.

torch_pruning is traced with ``example_inputs=(x,)``: with a bare batch-1 tensor it first tries
``block(*x)``, i.e. the block on an unbatched input, which often runs.

Times are the analyses only (best of 3, summed over a model's blocks): legoc = ShapeProp +
channel_groups; TP = build_dependency + get_all_groups (case a). Verification runs are not timed.
"wall s" is everything for the model, verification included.
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
REPEATS = 3  # analysis times are the best of REPEATS


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

    Walk forward from the placeholder and backward from the output's argument through every op
    that is not a conv/Linear. Reaching a conv/Linear backward means its out-channels are coupled
    (it is ignored); reaching it forward means it reads them on its in-channels (the walk stops).
    A node reached forward sends the walk backward into its *other* operands only (the other side
    of an add / mul); a concat reached forward is not crossed backward at all, since its other
    inputs keep their own channels. A node reached backward couples all its inputs and users.
    Depthwise convs on the walk are ignored too (TP may root a group at one). Over-approximations
    only make TP (b) more conservative; misses show up as failures in the verification.
    """
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    ignored: set[str] = set()
    seen: set[tuple[str, str, str]] = set()
    stack: list[tuple[torch.fx.Node, str, torch.fx.Node | None]] = [
        (n, "fwd", None) for n in gm.graph.nodes if n.op == "placeholder"]
    stack += [(a, "bwd", out_node) for a in out_node.all_input_nodes]
    while stack:
        n, d, came = stack.pop()
        key = (n.name, d, came.name if came is not None else "")
        if key in seen:
            continue
        seen.add(key)
        if _is_stop(gm, n):
            if d == "bwd":
                ignored.add(n.target)
            continue
        if n.op == "get_attr":
            continue
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.modules.conv._ConvNd):
            ignored.add(n.target)  # depthwise conv on boundary channels
        is_cat = n.op == "call_function" and n.target in (torch.cat, torch.concat)
        if d == "fwd":
            if not is_cat:
                stack += [(a, "bwd", n) for a in n.all_input_nodes if a is not came]
            stack += [(u, "fwd", n) for u in n.users if u is not out_node]
        else:
            stack += [(a, "bwd", n) for a in n.all_input_nodes]
            stack += [(u, "fwd", n) for u in n.users if u is not out_node and u is not came]
    return ignored


# ----------------------------------------------------------------------------- Torch-Pruning


def _tp_groups(gm: nn.Module, x: torch.Tensor, ignored: set[str]):
    for p in gm.parameters():
        p.requires_grad_(True)
    # a tuple: tp first tries model(*example_inputs), which on a bare batch-1 tensor runs it unbatched
    dg = tp.DependencyGraph().build_dependency(gm, example_inputs=(x,), verbose=False)
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
    secs = float("inf")
    for _ in range(REPEATS):
        m = copy.deepcopy(gm)
        t0 = time.perf_counter()
        dg, groups = _tp_groups(m, x, ignored)
        secs = min(secs, time.perf_counter() - t0)
    return secs, [(_root_name(dg, g), len(g[0].idxs), _out_modules(dg, g)) for g in groups]


def _ch_groups(dg, group) -> int:
    """Channel grouping of a TP group: the largest `groups` of a grouped (not depthwise) conv in it."""
    gs = [1]
    for dep, _ in group:
        m = dep.target.module
        if isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1 and not (m.groups == m.in_channels == m.out_channels):
            gs.append(m.groups)
    return max(gs)


def _zero(mod: nn.Module, idxs) -> None:
    """Make output channels `idxs` of a conv / Linear / BN identically zero."""
    with torch.no_grad():
        for name in ("weight", "bias"):
            t = getattr(mod, name, None)
            if t is not None:
                t[list(idxs)] = 0


def _probe_inputs(x: torch.Tensor) -> list[torch.Tensor]:
    """The block's real input and two random ones (more channels are alive on some input)."""
    g = torch.Generator().manual_seed(0)
    return [x] + [torch.randn(x.shape, generator=g) * 2 * x.std() for _ in range(2)]


def verdict(gm: torch.fx.GraphModule, x: torch.Tensor, zero, prune, out_shape) -> str:
    """Run `zero(gm)` (the channels to remove become exactly 0), then `prune(gm)`:
    'ok' if the block runs, keeps its output shape and its outputs (removing zero channels must not
    change them, up to float rounding), 'boundary' if the output shape changed, 'wrong values', or
    'crash: <why>'."""
    xs = _probe_inputs(x)
    try:
        zero(gm)
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):  # fx prints failing code
            ref = [gm(v) for v in xs]
        prune(gm)
        gm.recompile()
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            ys = [gm(v) for v in xs]
    except Exception as exc:  # noqa: BLE001 - any failure of the pruned block is a measurement
        return f"crash: {type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''}"
    if tuple(ys[0].shape) != tuple(out_shape):
        return "boundary"
    same = all((y - r).abs().max() <= 1e-5 * (1 + r.abs().max()) for y, r in zip(ys, ref))
    return "ok" if same else "wrong values"


def tp_try(gm: torch.fx.GraphModule, x: torch.Tensor, ignored: set[str], k: int, root: str, out_shape) -> str:
    """Prune one channel (one per channel group of a grouped conv, as tp's MetaPruner does) of
    TP's k-th group on a copy; see `verdict`."""
    gm = copy.deepcopy(gm)
    try:
        dg, groups = _tp_groups(gm, x, ignored)
        g = groups[k]
        assert _root_name(dg, g) == root, "group order changed between builds"
        ch = _ch_groups(dg, g)
        idxs = [i * (len(g[0].idxs) // ch) for i in range(ch)]
        pg = dg.get_pruning_group(g[0].dep.target.module, g[0].dep.handler, idxs)
    except Exception as exc:  # noqa: BLE001
        return f"crash: {type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''}"

    def zero(_):
        for dep, ix in pg:
            m = dep.target.module
            if dg.is_out_channel_pruning_fn(dep.handler) and isinstance(
                    m, (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm)):
                _zero(m, ix)

    return verdict(gm, x, zero, lambda _: pg.prune(), out_shape)


# ----------------------------------------------------------------------------- legoc


def legoc_analyse(gm: torch.fx.GraphModule, x: torch.Tensor):
    secs = float("inf")
    for _ in range(REPEATS):
        m = copy.deepcopy(gm)
        t0 = time.perf_counter()
        ShapeProp(m).propagate(x)
        groups = analysis.channel_groups(m)
        secs = min(secs, time.perf_counter() - t0)
    return secs, groups


def legoc_try(gm: torch.fx.GraphModule, x: torch.Tensor, k: int, out_shape) -> str:
    """Prune channel 0 of legoc's k-th prunable group on a copy (channel 0 of every conv group
    when the group must be pruned evenly across a grouped conv); see `verdict`."""
    gm = copy.deepcopy(gm)
    ShapeProp(gm).propagate(x)
    plan = analysis.channel_plan(gm)
    g = [g for g in plan.groups if g.prunable][k]
    per = g.channels // g.divisions
    dropped = [j * per for j in range(g.divisions)]
    keep = torch.tensor([c for c in range(g.channels) if c not in dropped])
    zero_at = []
    for (target, role), layout in plan.layouts.items():
        if role == "out" and any(r == g.root for r, _ in layout):
            zero_at.append((target, lg_prune._offset(layout, g.root)))
    prune = lambda m: lg_prune.apply_channels(m, plan, {g.root: keep})  # noqa: E731
    zero = lambda m: [_zero(m.get_submodule(t), [off + c for c in dropped]) for t, off in zero_at]  # noqa: E731
    return verdict(gm, x, zero, prune, out_shape)


# ----------------------------------------------------------------------------- main


def measure_block(b, x, out_shape, notes: Counter) -> dict:
    r = {}
    secs, groups = legoc_analyse(b.gm, x)
    pr = [g for g in groups if g.prunable]
    fails = [legoc_try(b.gm, x, k, out_shape) for k in range(len(pr))]
    r["lg_t"], r["lg_g"], r["lg_c"] = secs, len(pr), sum(g.channels for g in pr)
    r["lg_fail"] = sum(f != "ok" for f in fails)
    for f in fails:
        if f != "ok":
            notes[f"legoc {f}"] += 1
    lg_ok_mods = {m for g, f in zip(pr, fails) if f == "ok" for m in g.producers + g.members}
    lg_blocked = {m: g.blocked for g in groups if not g.prunable for m in g.producers + g.members}

    # (a) nothing ignored
    secs, ga = tp_analyse(b.gm, x, set())
    ra = [tp_try(b.gm, x, set(), k, root, out_shape) for k, (root, _, _) in enumerate(ga)]
    r["tp_t"], r["a_g"], r["a_c"] = secs, len(ga), sum(c for _, c, _ in ga)
    r["a_bnd"] = sum(s == "boundary" for s in ra)
    r["a_crash"] = sum(s.startswith("crash") for s in ra)
    r["a_wrong"] = sum(s == "wrong values" for s in ra)
    for s in ra:
        if s not in ("ok", "boundary"):
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
    cols = ["model", "blk", "lg ch/grp", "lg fail", "TP(a) grp", "(a) bnd", "(a) crash", "(a) wrong",
            "TP(b) ch/grp", "(b) fail", "lg ms", "TP ms", "wall s"]
    fmt = "{:<18} {:>3} {:>9} {:>7} {:>9} {:>7} {:>9} {:>9} {:>12} {:>8} {:>7} {:>7} {:>6}"
    print(fmt.format(*cols))
    total = Counter()
    notes_all: dict[str, Counter] = {}
    for name in zoo.MODELS:
        t_model = time.perf_counter()
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
        acc["wall"] = time.perf_counter() - t_model
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
        name, a["blk"], f"{a['lg_c']}/{a['lg_g']}", a["lg_fail"], a["a_g"], a["a_bnd"], a["a_crash"], a["a_wrong"],
        f"{a['b_c']}/{a['b_g']}", a["b_fail"], f"{a['lg_t'] * 1e3:.1f}", f"{a['tp_t'] * 1e3:.1f}", f"{a['wall']:.1f}")


if __name__ == "__main__":
    main()
