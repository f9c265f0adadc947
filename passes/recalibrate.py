"""recalibrate: re-estimate the BatchNorm statistics of every pruned variant on real data.

It runs before retraining, which then keeps these statistics fixed (BN in eval mode), so the
statistics a variant is trained with are the ones it is compiled with.

Pruning changes the distribution that reaches each BN inside a block, so the original running
statistics are wrong for a variant. This pass feeds the block's true inputs (recorded by
running the full model on calibration batches from ``train_data()``) through each variant with
its BN layers in training mode and cumulative averaging, then returns them to eval mode. No
weight is trained here (distillation retraining is a separate pass).
"""
from __future__ import annotations

import copy
import dataclasses
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from legoc.errors import InternalError
from legoc.passes.infra import Pass, PassResult, ProgramState

if TYPE_CHECKING:
    from legoc.pipeline import CompileConfig


def recalibrate_bn(module: nn.Module, inputs: list[torch.Tensor]) -> int:
    """Recompute the running statistics of every BN of ``module`` on ``inputs``; returns how many BNs."""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns or not inputs:
        return 0
    saved = [(m.momentum, m.training) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over all calibration batches
        m.train()
    with torch.no_grad():
        for x in inputs:
            module(x)
    for m, (momentum, _) in zip(bns, saved):
        m.momentum = momentum
        m.eval()
    return len(bns)


class Recalibrate(Pass):
    """BN recalibration of every variant with ratio > 0 (skipped, unmodified, without data)."""

    name = "recalibrate"

    def requires(self, state: ProgramState) -> None:
        if state.variants is None:
            raise InternalError("recalibrate needs variants (run prune first)")

    def call(self, state: ProgramState, config: CompileConfig) -> PassResult:
        batches = (state.train_inputs or [])[: config.calibration_batches]
        if not batches or config.nested:  # nested variants share one weight set
            return PassResult(state, modified=False)
        envs = [state.partition.trace_env(*b) for b in batches]
        changed = 0
        variants = {}
        for block in state.partition.blocks:
            xs = [env[block.inputs[0]] for env in envs]
            new = []
            for v in state.variants[block.name]:
                if v.ratio > 0:  # on a copy: a pass never mutates the state it is given
                    v = dataclasses.replace(v, gm=copy.deepcopy(v.gm))
                    changed += recalibrate_bn(v.gm, xs)
                new.append(v)
            variants[block.name] = new
        return PassResult(state.replace(variants=variants, recalibrated=changed > 0), modified=changed > 0)
