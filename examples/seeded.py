"""Random, seeded weights and inputs for the example models that have no data.

Every example built here gets Kaiming-normal convs and randomized BatchNorm affine parameters and
statistics (so channels differ in importance, as in a trained network: pruning has something
to choose), and a small normal Linear. Seeds are applied inside ``fork_rng``, so building a
model never disturbs the caller's random state.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


def build(ctor: Callable[[], nn.Module], seed: int) -> nn.Module:
    """``ctor()`` with seeded random weights, in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ctor()
        init_weights(model)
    return model.eval()


def random_input(shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, ...]:
    """One seeded standard-normal input tensor, as the ``example_inputs()`` tuple."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return (torch.randn(*shape),)


def describe(build_model: Callable[[], nn.Module], example_inputs: Callable[[], tuple]) -> None:
    """What ``python examples/<model>.py`` prints: output shape and parameter count."""
    m = build_model()
    print(m(*example_inputs()).shape, sum(p.numel() for p in m.parameters()), "params")
