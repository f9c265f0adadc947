"""prune: descendant variants of every block by structured pruning of interior channels.

For each block and each ratio r, every prunable channel group inside the block (see
legoc.passes.analysis: a group never touches the block's input or output tensor, so boundary
shapes never change) keeps the ``round(C * (1 - r))`` channels of highest importance, rounded
to a multiple of ``round_to`` (``legoc compile``: the target's vector width unless ``--round-to``
says otherwise), or of a finer :func:`granularity` where that would merge two ratios. Producers lose output filters, BN and depthwise convs lose
per-channel parameters, consumers lose input channels.

Nested variants (``config.nested``, after Xun et al. 2019): BN is folded first, the channels of
every group are reordered by importance (a permutation: the block computes the same function),
and the variant at ratio r keeps the first ``kept_channels`` of each group. Every parameter of
every variant is then the leading sub-tensor of the full variant's parameter, so one set of
weights serves all sizes (see legoc.runtime.nesting.leading).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.fx
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp

from legoc.errors import InternalError, UserError
from legoc.passes import analysis
from legoc.passes.infra import Pass, PassResult, ProgramState
from legoc.runtime.nesting import leading

if TYPE_CHECKING:
    from legoc.pipeline import CompileConfig

DEFAULT_RATIOS = (0.0, 0.2, 0.4, 0.6, 0.8)
IMPORTANCE = ("l1", "bn", "taylor")
TAYLOR_BATCHES = 8


@dataclass
class Variant:
    """One descendant of a block: its module, pruning ratio and static costs."""

    block: str
    ratio: float
    gm: torch.fx.GraphModule
    macs: int
    param_bytes: int
    channels: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # group -> (original, computed, kept)
    nested: bool = False   # weights are leading sub-tensors of the block's full-size variant
    # group -> the criterion that ranked its channels: the one asked for, or "l1" where "bn" found
    # no BatchNorm scale in the group (only groups whose channels were ranked)
    importance: dict[str, str] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"r{self.ratio:.2f}"


def kept_channels(channels: int, ratio: float, round_to: int = 1) -> int:
    keep = round(channels * (1.0 - ratio))
    if round_to > 1:
        keep = round(keep / round_to) * round_to
    return int(min(channels, max(keep, round_to if round_to <= channels else 1, 1)))


def granularity(channels: int, ratios, round_to: int) -> int:
    """The multiple a group of ``channels`` is rounded to: ``round_to`` (by default the target's
    vector width, so pruned convs fill whole vectors instead of padding to them) unless that
    would give two of ``ratios`` the same count, then the largest of round_to/2, round_to/4, ...
    that keeps them apart (a 16-channel group at 0/0.2/0.4/0.6/0.8 keeps 16/12/10/6/4 at
    multiple 2, where multiples of 8 would make ratios 0 and 0.2, 0.4 to 0.8 the same variant).
    ``ratios`` empty: ``round_to`` as given."""
    wanted = sorted({float(r) for r in ratios})
    g = max(1, int(round_to))
    while g > 1 and wanted:
        counts = [channels if r == 0 else kept_channels(channels, r, g) for r in wanted]
        if len(set(counts)) == len(counts):
            break
        g //= 2
    return g


def taylor_scores(gm: torch.fx.GraphModule, inputs: list, targets: list, source: str = "the model") -> dict:
    """First-order Taylor importance (Molchanov et al. 2017) of every conv's and Linear's output channels:
    mean over samples of |sum over positions of activation x d(loss)/d(activation)|, with the
    task loss on the model file's training data (cross-entropy for class targets, else MSE).
    Keys are conv module names, which the blocks share with the traced model."""
    convs = {n.target for n in gm.graph.nodes if n.op == "call_module"   # every channel producer
             and isinstance(gm.get_submodule(n.target), (nn.modules.conv._ConvNd, nn.Linear))}
    pairs = [(x, t) for x, t in zip(inputs, targets) if t is not None][:TAYLOR_BATCHES]
    if not pairs:
        raise UserError(f"--importance taylor needs train_data() in {source} to yield (input, target) batches")
    acts: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(mod, args, out):  # returns None: the output is not replaced
            out.retain_grad()
            acts[name] = out
        return hook

    hooks = [gm.get_submodule(t).register_forward_hook(keep(t)) for t in convs]
    scores: dict[str, torch.Tensor] = {}
    try:
        for x, t in pairs:
            gm.zero_grad(set_to_none=True)
            with torch.enable_grad():
                out = gm(*x)
                if isinstance(out, torch.Tensor) and out.dim() == 2 and not t.is_floating_point():
                    loss = nn.functional.cross_entropy(out, t)
                elif isinstance(out, torch.Tensor) and out.shape == t.shape:
                    loss = nn.functional.mse_loss(out, t.to(out.dtype))
                else:
                    raise UserError(f"--importance taylor: cannot pick a loss for {source}'s output and targets "
                                    f"(needs class logits with integer targets, or targets shaped like the output)")
                loss.backward()
            for name, a in acts.items():
                contrib = (a * a.grad).flatten(2).sum(2).abs().mean(0) if a.dim() > 2 else (a * a.grad).abs().mean(0)
                scores[name] = scores.get(name, 0) + contrib.detach()
    finally:
        for h in hooks:
            h.remove()
        gm.zero_grad(set_to_none=True)
    return scores


def _importance(gm: torch.fx.GraphModule, plan: analysis.ChannelPlan, group: analysis.ChannelGroup, how: str,
                taylor: dict | None = None) -> tuple[torch.Tensor, str]:
    """The score of every channel of ``group`` and the criterion that gave it: ``how``, except
    that "bn" falls back to "l1" for a group without a BatchNorm scale (the caller records it)."""
    score = torch.zeros(group.channels)
    if how == "taylor":
        for t in group.producers:
            if taylor is None or t not in taylor:
                raise InternalError(f"no Taylor score for {t}, a producer of channel group {group.root}")
            score += taylor[t]
        return score, "taylor"
    if how == "bn":
        found = False
        for t in group.members:
            mod = gm.get_submodule(t)
            if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.weight is not None:
                offset = _offset(plan.layouts[(t, "out")], group.root)
                score += mod.weight.detach()[offset:offset + group.channels].abs()
                found = True
        if found:
            return score, "bn"
    for t in group.producers:  # L1 norm of each output filter
        w = gm.get_submodule(t).weight.detach()
        score += w.abs().reshape(w.shape[0], -1).sum(1)
    return score, "l1"


def _offset(layout: list[tuple[str, int]], root: str) -> int:
    offset = 0
    for r, length in layout:
        if r == root:
            return offset
        offset += length
    raise InternalError(f"channel group {root} is not in the layout {layout}")


def _slice_param(mod: nn.Module, name: str, idx: torch.Tensor, dim: int) -> None:
    t = getattr(mod, name, None)
    if t is None:
        return
    new = t.detach().index_select(dim, idx).clone()
    if isinstance(t, nn.Parameter):
        setattr(mod, name, nn.Parameter(new, requires_grad=t.requires_grad))
    else:
        setattr(mod, name, new)


def apply_channels(gm: torch.fx.GraphModule, plan: analysis.ChannelPlan, keep: dict[str, torch.Tensor]) -> None:
    """Keep (and order) the channels ``keep[group root]`` of every listed group, in every module
    that touches it: producers' outputs, BN/depthwise per-channel parameters, consumers' inputs.
    A module whose axis holds several groups (after a concat) is sliced once, group by group."""
    for (target, role), layout in plan.layouts.items():
        parts, offset = [], 0
        for root, length in layout:
            parts.append(offset + (keep[root] if root in keep else torch.arange(length)))
            offset += length
        idx = torch.cat(parts)
        if torch.equal(idx, torch.arange(offset)):
            continue
        mod, n = gm.get_submodule(target), int(idx.numel())
        if isinstance(mod, nn.modules.conv._ConvNd) and role == "out" and 1 < mod.groups < mod.in_channels:
            _slice_grouped_conv(mod, idx)
            continue
        if isinstance(mod, nn.GroupNorm):
            _slice_param(mod, "weight", idx, 0)
            _slice_param(mod, "bias", idx, 0)
            mod.num_channels = n
            continue
        if role == "in":
            _slice_param(mod, "weight", idx, 1)
            if isinstance(mod, nn.Linear):
                mod.in_features = n
            else:
                mod.in_channels = n
        elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
            for name in ("weight", "bias", "running_mean", "running_var"):
                _slice_param(mod, name, idx, 0)
            mod.num_features = n
        else:
            _slice_param(mod, "weight", idx, 0)
            _slice_param(mod, "bias", idx, 0)
            if isinstance(mod, nn.Linear):
                mod.out_features = n
            elif mod.groups > 1:  # depthwise
                mod.in_channels = mod.out_channels = mod.groups = n
            else:
                mod.out_channels = n


def _slice_grouped_conv(conv: nn.modules.conv._ConvNd, idx: torch.Tensor) -> None:
    """Keep channels ``idx`` (the same number in every conv group) on both axes of a grouped conv
    whose input and output channels pair up: group j keeps rows idx_j and, of its local input
    columns, idx_j - j * width."""
    g, width = conv.groups, conv.in_channels // conv.groups
    per = idx.numel() // g
    rows = []
    for j in range(g):
        kj = idx[j * per:(j + 1) * per]
        if not bool(((kj >= j * width) & (kj < (j + 1) * width)).all()):
            raise InternalError(f"uneven channels for grouped conv with {g} groups: {idx.tolist()}")
        rows.append(conv.weight.detach()[kj][:, kj - j * width])
    conv.weight = nn.Parameter(torch.cat(rows).clone(), requires_grad=conv.weight.requires_grad)
    _slice_param(conv, "bias", idx, 0)
    conv.in_channels = conv.out_channels = int(idx.numel())


def _choose(score: torch.Tensor, n_per: int, divisions: int) -> torch.Tensor:
    """Indices of the top ``n_per`` scores in each of ``divisions`` equal runs, ascending."""
    per = score.numel() // divisions
    parts = [j * per + torch.topk(score[j * per:(j + 1) * per], n_per, sorted=False).indices for j in range(divisions)]
    return torch.sort(torch.cat(parts)).values


def prune_block(block_gm: torch.fx.GraphModule, example_input: torch.Tensor, ratio: float,
                importance: str = "l1", round_to: int = 1, name: str = "block", taylor: dict | None = None,
                ratios=()) -> Variant:
    """A pruned copy of ``block_gm`` (never modified) at ``ratio``. Kept counts are multiples of
    ``round_to``, or of a finer :func:`granularity` where ``round_to`` would merge two of
    ``ratios`` (all the ratios being compiled). ``channels``: group -> (original, kept before
    rounding, kept)."""
    gm = copy.deepcopy(block_gm)
    ShapeProp(gm).propagate(example_input)
    channels, used = {}, {}
    if ratio > 0:
        plan = analysis.channel_plan(gm)
        keep = {}
        for group in plan.groups:
            if not group.prunable:
                continue
            d = group.divisions
            g = granularity(group.channels // d, ratios, round_to)
            n = kept_channels(group.channels // d, ratio, g) * d
            if n < group.channels:
                score, used[group.root] = _importance(gm, plan, group, importance, taylor)
                keep[group.root] = _choose(score, n // d, d)
            channels[group.root] = (group.channels, kept_channels(group.channels // d, ratio) * d, n)
        apply_channels(gm, plan, keep)
        gm.recompile()
        ShapeProp(gm).propagate(example_input)
    return Variant(block=name, ratio=ratio, gm=gm.eval(), macs=analysis.graph_macs(gm),
                   param_bytes=analysis.param_bytes(gm), channels=channels, importance=used)


def nest_block(block_gm: torch.fx.GraphModule, example_input: torch.Tensor, ratios, importance: str = "l1",
               round_to: int = 1, name: str = "block", taylor: dict | None = None) -> list[Variant]:
    """Nested variants of ``block_gm`` (never modified), one per ratio, sharing one weight set.
    Groups that share a module axis with other groups (after a concat) stay whole: a prefix of
    one of them would not be a leading sub-tensor of that module's weights; so do groups pruned
    evenly across conv groups (ResNeXt), for the same reason."""
    from legoc.passes.fold import fold_batchnorm

    full = fold_batchnorm(block_gm)
    ShapeProp(full).propagate(example_input)
    plan = analysis.channel_plan(full)
    groups = [g for g in plan.groups if g.prunable and not g.shared_layout and g.divisions == 1]
    scored = {g.root: _importance(full, plan, g, importance, taylor) for g in groups}
    order = {root: torch.argsort(score, descending=True, stable=True)
             for root, (score, _) in scored.items()}   # most important channels first: a permutation, same function
    apply_channels(full, plan, order)
    full.recompile()
    variants = []
    for r in ratios:
        gm = copy.deepcopy(full)
        keep, channels, used = {}, {}, {}
        for g in groups:
            n = kept_channels(g.channels, r, granularity(g.channels, ratios, round_to)) if r > 0 else g.channels
            if n < g.channels:
                keep[g.root] = torch.arange(n)
                used[g.root] = scored[g.root][1]
            channels[g.root] = (g.channels, kept_channels(g.channels, r) if r > 0 else g.channels, n)
        apply_channels(gm, plan, keep)
        gm.recompile()
        ShapeProp(gm).propagate(example_input)
        variants.append(Variant(block=name, ratio=r, gm=gm.eval(), macs=analysis.graph_macs(gm),
                                param_bytes=analysis.param_bytes(gm), channels=channels, nested=True,
                                importance=used))
    return variants


def copy_leading(src: nn.Module, dst: nn.Module, *, into_src: bool = False) -> None:
    """Copy between a nested variant ``dst`` and the full-size ``src``: every parameter and
    buffer of ``dst`` is the leading sub-tensor of ``src``'s (``into_src`` writes it back)."""
    big = dict(src.named_parameters()) | dict(src.named_buffers())
    with torch.no_grad():
        for n, t in list(dst.named_parameters()) + list(dst.named_buffers()):
            region = big[n][leading(t.shape)]
            if into_src:
                region.copy_(t)
            else:
                t.copy_(region)


def validate_ratios(ratios) -> tuple[float, ...]:
    ratios = tuple(float(r) for r in ratios)
    bad = [r for r in ratios if not 0.0 <= r < 1.0]
    if bad:
        raise UserError(f"pruning ratios must be in [0, 1), got {bad[0]}; e.g. --ratios 0,0.2,0.4,0.6,0.8")
    if 0.0 not in ratios:
        raise UserError("pruning ratios must include 0 (the full-size variant of every block)")
    return tuple(sorted(set(ratios)))


def _warn_fallback(variants: dict[str, list[Variant]], importance: str) -> None:
    """One warning line when some groups were not ranked by the criterion asked for (``bn`` on
    groups without a BatchNorm scale): each variant's ``importance`` records which were."""
    fell = sorted({(b, g) for b, vs in variants.items() for v in vs for g, how in v.importance.items()
                   if how != importance})
    if fell:
        from legoc.pipeline import warn  # noqa: PLC0415 - the pipeline imports this module

        groups = ", ".join(f"{b}/{g}" for b, g in fell)
        warn(f"--importance {importance}: {len(fell)} pruned channel group(s) have no BatchNorm scale and were "
             f"ranked by L1 norm instead ({groups}); each variant's importance in the manifest says which")


class Prune(Pass):
    """Variants of every block at ``config.ratios`` (L1 importance unless ``config.importance``)."""

    name = "prune"

    def requires(self, state: ProgramState) -> None:
        if state.partition is None:
            raise InternalError("prune needs a partition (run partition first)")

    def call(self, state: ProgramState, config: CompileConfig) -> PassResult:
        ratios, importance = validate_ratios(config.ratios), config.importance
        round_to = config.round_to or 1   # None (not resolved from a target): no rounding
        env = state.partition.trace_env(*state.example_inputs)
        taylor = None
        if importance == "taylor":
            taylor = taylor_scores(copy.deepcopy(state.gm), state.train_inputs or [], state.train_targets or [],
                                   state.source)
        variants = {}
        for block in state.partition.blocks:
            x = env[block.inputs[0]]
            if config.nested:
                variants[block.name] = nest_block(block.gm, x, ratios, importance, round_to, block.name, taylor)
            else:
                variants[block.name] = [
                    prune_block(block.gm, x, r, importance, round_to, block.name, taylor, ratios) for r in ratios
                ]
        _warn_fallback(variants, importance)
        return PassResult(state.replace(variants=variants), modified=any(r > 0 for r in ratios))

    def ensures(self, state: ProgramState) -> None:
        env = state.partition.trace_env(*state.example_inputs)
        with torch.no_grad():
            for block in state.partition.blocks:
                x, want = env[block.inputs[0]], env[block.outputs[0]]
                for v in state.variants[block.name]:
                    got = v.gm(x)
                    if tuple(got.shape) != tuple(want.shape):
                        raise InternalError(f"variant {v.id} of {block.name} changed the block's output shape "
                                            f"{tuple(want.shape)} -> {tuple(got.shape)}")
                    if v.ratio == 0 and not torch.allclose(got, want, atol=1e-5, rtol=1e-4):
                        raise InternalError(f"the full-size variant of {block.name} differs from the block")
