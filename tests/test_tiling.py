"""tiling: spatial tiles of blocks (rows with halos) stitch back to the whole block exactly, for
every block of the zoo that admits tiling and for random conv/pool stacks; blocks that mix rows
stay whole with a one-line reason; a tile compiled by legoc's TVM back end equals torch."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from legoc.errors import UserError
from legoc.passes import ProgramState
from legoc.passes.capture import Capture
from legoc.passes.partition import partition
from legoc.passes.tiling import TilePlan, Untileable, join, row_splits, tile_plan

_spec = importlib.util.spec_from_file_location("legoc_test_zoo", Path(__file__).with_name("zoo.py"))
zoo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(zoo)

SHARES = [(1, 1), (1, 2, 3), (5, 1, 2)]  # k = 2 and 3, uneven


def _blocks(name):
    """(block, random input of the block's input shape) for every block of a zoo model."""
    model, inputs = zoo.MODELS[name]()
    gm = Capture()(ProgramState(model=model, example_inputs=inputs), None).state.gm
    part = partition(gm)
    gen = torch.Generator().manual_seed(0)
    return [(b, torch.randn(part.tensor_meta[b.inputs[0]]["shape"], generator=gen)) for b in part.blocks]


def _close(plan: TilePlan, gm, x) -> float:
    with torch.no_grad():
        return float((plan.run(x) - gm(x)).abs().max())


@pytest.mark.parametrize("name", sorted(zoo.MODELS))
def test_zoo_blocks_tile_exactly_or_say_why(name):
    tiled = []
    for block, x in _blocks(name):
        node_names = {n.name for n in block.gm.graph.nodes}
        for shares in SHARES:
            plan = tile_plan(block.gm, x, shares)
            if isinstance(plan, Untileable):
                # one line naming the node that mixes rows
                assert "\n" not in plan.reason and plan.reason.split(":")[0] in node_names, plan.reason
                break
            assert len(plan.tiles) == len(shares)
            assert [t.rows_out for t in plan.tiles] == row_splits(plan.output_shape[2], shares)
            assert all(0 <= t.rows_in[0] < t.rows_in[1] <= x.shape[2] for t in plan.tiles)
            assert _close(plan, block.gm, x) <= 1e-4, (name, block.name, shares)
        else:
            tiled.append(block.name)
    print(f"{name}: tiled {tiled}")


@pytest.mark.parametrize("name, block, reason", [
    ("mobilenetv3", 0, "global pooling"),  # squeeze-excitation inside the block
    ("resnet_basic", 3, "global pooling"),  # the head block
    ("vgg", 2, "flatten"),
    ("detection", 2, "permute"),
    ("functional", 0, "interpolate mode='bilinear'"),
])
def test_blocks_that_mix_rows_stay_whole(name, block, reason):
    b, x = _blocks(name)[block]
    plan = tile_plan(b.gm, x, (1, 1))
    assert isinstance(plan, Untileable) and not plan
    assert reason in plan.reason


def test_zoo_has_tileable_blocks_of_every_kind():
    # residual adds (resnet), grouped/depthwise convs (resnext, mobilenetv2), concat (inception,
    # densenet), max pools (vgg), nearest upsampling (unet): at least one of each tiles
    for name in ("vgg", "resnet_basic", "resnext", "mobilenetv2", "inception", "densenet", "unet"):
        assert any(tile_plan(b.gm, x, (1, 1)) for b, x in _blocks(name)), name


def test_interior_edges_read_real_rows_and_borders_pad():
    # a 3x3 conv, padding 1: the top tile reads one halo row below, the bottom one above
    conv = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU()).eval()
    gm = torch.fx.symbolic_trace(conv)
    x = torch.randn(1, 2, 10, 7)
    plan = tile_plan(gm, x, (1, 1))
    assert [(t.rows_in, t.rows_out) for t in plan.tiles] == [((0, 6), (0, 5)), ((4, 10), (5, 10))]
    assert plan.halo_rows == 2
    assert _close(plan, gm, x) <= 1e-5
    # the same two middle tiles of a 4-way split are the same computation: one module key
    plan4 = tile_plan(gm, torch.randn(1, 2, 16, 7), (1, 1, 1, 1))
    assert len(plan4.distinct) == 3 and plan4.tiles[1].key == plan4.tiles[2].key


def test_consecutive_blocks_tile_as_one():
    blocks = _blocks("resnet_basic")[:3]
    gm = join([b.gm for b, _ in blocks], blocks[0][1])
    x = blocks[0][1]
    plan = tile_plan(gm, x, (2, 1))
    assert plan, getattr(plan, "reason", "")
    assert _close(plan, gm, x) <= 1e-4
    # the fused halo is the sum of the blocks' halos: more input rows than one block needs
    first = tile_plan(blocks[0][0].gm, x, (2, 1))
    assert plan.halo_rows > first.halo_rows


def test_row_splits():
    assert row_splits(10, (1, 1)) == [(0, 5), (5, 10)]
    assert row_splits(10, (3, 1)) == [(0, 8), (8, 10)]
    assert row_splits(3, (100, 1, 1)) == [(0, 1), (1, 2), (2, 3)]  # every tile keeps one row
    with pytest.raises(UserError, match="at least 4 output rows"):
        row_splits(3, (1, 1, 1, 1))
    with pytest.raises(UserError, match="positive"):
        row_splits(8, (1, 0))


_layer = st.tuples(
    st.sampled_from(["conv", "conv", "conv", "max", "avg", "fmax"]),
    st.integers(1, 5),  # kernel
    st.integers(1, 2),  # stride
    st.integers(1, 2),  # dilation
    st.integers(0, 2),  # padding
)


class _Stack(nn.Module):
    """Convs (any kernel, stride, dilation, padding) and pools, some functional, with a residual
    add around the first conv when it keeps the shape."""

    def __init__(self, layers, channels=3):
        super().__init__()
        self.layers, self.mods, self.residual = layers, nn.ModuleList(), []
        for kind, k, s, d, p in layers:
            pad, dil = (p if kind == "conv" else min(p, k // 2)), (1 if kind == "avg" else d)
            self.residual.append(s == 1 and 2 * pad == dil * (k - 1))  # keeps the shape
            if kind == "conv":
                self.mods.append(nn.Conv2d(channels, channels, k, s, p, dilation=d))
            elif kind == "max":
                self.mods.append(nn.MaxPool2d(k, s, min(p, k // 2), dilation=d))
            elif kind == "avg":
                self.mods.append(nn.AvgPool2d(k, s, min(p, k // 2)))
            else:
                self.mods.append(nn.Identity())

    def forward(self, x):
        for (kind, k, s, d, p), m, residual in zip(self.layers, self.mods, self.residual):
            if kind == "fmax":
                y = F.max_pool2d(x, k, s, min(p, k // 2), d)
            else:
                y = m(x)
            x = y + x if residual else F.relu(y)
        return x


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layers=st.lists(_layer, min_size=1, max_size=4), height=st.integers(8, 40),
       width=st.integers(6, 12), shares=st.lists(st.integers(1, 5), min_size=2, max_size=4))
# a dilated max pool whose windows lie wholly in the padding: -inf in both outputs (found in CI)
@example(layers=[("conv", 1, 1, 1, 0), ("conv", 1, 1, 1, 0), ("conv", 5, 1, 2, 0), ("max", 2, 1, 2, 1)],
         height=10, width=9, shares=[1, 1])
def test_random_conv_stacks_tile_exactly(layers, height, width, shares):
    torch.manual_seed(0)
    model = _Stack(layers).eval()
    x = torch.randn(1, 3, height, width)
    try:
        with torch.no_grad():
            ref = model(x)
    except RuntimeError:  # the stack shrinks the image to nothing: not a model
        event("not a model")
        return
    gm = torch.fx.symbolic_trace(model)
    if ref.shape[2] < len(shares):
        with pytest.raises(UserError, match="output rows"):
            tile_plan(gm, x, shares)
        event("fewer output rows than tiles")
        return
    event("tiled")
    plan = tile_plan(gm, x, shares)
    assert plan, plan
    # assert_close: equal infinities match (a difference of two -inf is nan)
    torch.testing.assert_close(plan.run(x), ref, rtol=0, atol=1e-4)


def test_tvm_tile_equals_torch(tmp_path):
    """Every distinct tile of a small block compiled for the host by legoc's back end equals its
    torch module (the -inf padding of a max pool, explicit zero padding, halo crops)."""
    import tvm
    import tvm.runtime.vm

    from legoc.targets.build import build_module
    from legoc.targets.table import TARGETS

    block, x = _blocks("vgg")[1]  # conv-bn-relu, max pool, conv-bn-relu
    plan = tile_plan(block.gm, x, (1, 2))
    assert len(plan.distinct) == 2
    outs = []
    for i, (tile, part) in enumerate(zip(plan.tiles, plan.split(x))):
        built = build_module(tile.module, (part,), TARGETS["host"], tmp_path / f"tile{i}.so", prepack=bool(i))
        vm = tvm.runtime.vm.VirtualMachine(tvm.runtime.load_module(str(built.path)), tvm.cpu())
        got = vm["main"](tvm.runtime.tensor(part.numpy()), *[tvm.runtime.tensor(p) for p in built.params]).numpy()
        with torch.no_grad():
            assert np.abs(got - tile.module(part).numpy()).max() <= 1e-4
        outs.append(got)
    with torch.no_grad():
        assert np.abs(plan.stitch(outs) - block.gm(x).numpy()).max() <= 1e-4
