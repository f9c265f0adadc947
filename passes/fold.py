"""Fold BatchNorm into the conv or linear layer before it (eval-mode semantics).

Used before compiling (BN statistics become weights) and by nested variants (which share one set
of weights, so per-variant BN statistics cannot exist).
"""
from __future__ import annotations

import copy

import torch
import torch.fx
import torch.fx.experimental.optimization as fx_opt


def fold_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """An eval-mode copy of ``module`` with every Conv/Linear -> BatchNorm pair folded.

    BatchNorms that cannot be folded (functional, or the conv output has other users) stay.
    """
    m = copy.deepcopy(module).eval()
    if isinstance(m, torch.fx.GraphModule):
        return fx_opt.fuse(m, inplace=True, no_trace=True)
    try:
        return fx_opt.fuse(m, inplace=True)
    except Exception:  # noqa: BLE001 - not fx-traceable: use it unfolded
        return m
