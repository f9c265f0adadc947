"""Channel-blocked inverted residuals (legoc.targets.schedules.block_layout): the rewrite, its two
rules, and modules built with them equal to PyTorch."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn

RTOL = 1e-4


def _block(cin: int, hidden: int, cout: int, k: int, stride: int, act, residual: bool, seed: int):
    """expand 1x1 + BN + act -> depthwise kxk + BN + act -> project 1x1 + BN (+ input)."""
    torch.manual_seed(seed)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), act(),
                nn.Conv2d(hidden, hidden, k, stride, k // 2, groups=hidden, bias=False),
                nn.BatchNorm2d(hidden), act(),
                nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))
            self.residual = residual

        def forward(self, x):
            y = self.body(x)
            return x + y if self.residual else y

    model = Block().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


def _avx2():
    """legoc's host target with an AVX2 CPU (haswell: 8 lanes, 16 registers), which runs on any
    x86-64 CPU with AVX2, the AVX-512 ones included."""
    from legoc.targets.table import get_target, target_from_dict

    host = get_target("host")
    return target_from_dict({**host.to_json(), "name": "host",
                             "target": {**host.target, "mcpu": "haswell"}}, check_here=False)


def _prepacked(model: nn.Module, x: torch.Tensor, target):
    """The Relax module build_module(prepack=True) schedules: weights transforms lifted out."""
    import tvm.relax.frontend.torch as relax_torch

    from legoc.passes.fold import fold_batchnorm
    from legoc.targets.schedules import prepack_weights

    with torch.no_grad():
        exported = torch.export.export(fold_batchnorm(model), (x,))
    mod = relax_torch.from_exported_program(exported, keep_params_as_input=True, unwrap_unit_return_tuple=True)
    mod["main"] = mod["main"].with_attr("num_input", 1)
    return prepack_weights(mod, target)


def _rules(model: nn.Module, x: torch.Tensor, target) -> dict[str, str]:
    """PrimFunc -> rule after prepack_weights and legoc's scheduling passes (strict: a rule that
    raises fails the test)."""
    import tvm

    from legoc.targets.schedules import scheduled_by, scheduling_passes

    mod = _prepacked(model, x, target)
    with target:
        mod = tvm.transform.Sequential(scheduling_passes(target, strict=True))(mod)
    return scheduled_by(mod)


def _run(model: nn.Module, x: torch.Tensor, folder, name: str = "m", spec=None) -> float:
    """build_module(prepack=True) for the host (or ``spec``, a target this machine runs), run;
    relative error against PyTorch. (Each module needs a path of its own: a second library
    loaded from the same path in one process is the first one again.)"""
    import tvm

    from legoc.targets.build import build_module
    from legoc.targets.table import get_target

    built = build_module(model, (x,), spec or get_target("host"), folder / f"{name}.so", prepack=True)
    vm = tvm.runtime.vm.VirtualMachine(tvm.runtime.load_module(str(built.path)), tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(a) for a in [x.numpy(), *built.params]]).numpy()
    with torch.no_grad():
        ref = model(x).numpy()
    assert out.shape == ref.shape
    return float(np.abs(out - ref).max()) / max(float(np.abs(ref).max()), 1e-6)


@pytest.fixture(scope="module")
def host():
    from legoc.targets.table import get_target

    return get_target("host").tvm_target()


@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@example(cin=24, hidden=144, cout=24, k=3, stride=1, hw=(14, 14), relu6=True, batch=1, seed=0)   # MobileNetV2
@example(cin=16, hidden=37, cout=24, k=3, stride=2, hw=(9, 13), relu6=False, batch=2, seed=1)   # odd hidden
@example(cin=3, hidden=5, cout=12, k=5, stride=1, hw=(1, 1), relu6=True, batch=1, seed=2)       # all padding
@given(cin=st.integers(1, 40), hidden=st.integers(2, 70), cout=st.sampled_from([4, 8, 12, 16, 24, 32, 40]),
       k=st.sampled_from([3, 5]), stride=st.sampled_from([1, 2]),
       hw=st.tuples(st.integers(1, 17), st.integers(1, 17)), relu6=st.booleans(),
       batch=st.integers(1, 2), seed=st.integers(0, 99))
def test_blocked_inverted_residual_matches_pytorch(host, tmp_path_factory, cin, hidden, cout, k, stride, hw,
                                                   relu6, batch, seed):
    """Any channel counts (hidden ones padded to the vector width), strides, kernels and maps:
    the blocked chain equals PyTorch, and the blocked rules schedule its three convs. (One hidden
    channel is not a depthwise conv but a plain one: not drawn.)"""
    act = nn.ReLU6 if relu6 else nn.ReLU
    residual = stride == 1 and cin == cout
    model = _block(cin, hidden, cout, k, stride, act, residual, seed)
    torch.manual_seed(seed + 1000)
    x = torch.randn(batch, cin, *hw)
    used = _rules(model, x, host)
    blocked = sorted(rule for rule in used.values() if rule in ("Conv2dBlocked", "DepthwiseBlocked"))
    assert blocked == ["Conv2dBlocked", "Conv2dBlocked", "DepthwiseBlocked"], used
    assert _run(model, x, tmp_path_factory.mktemp("block")) <= RTOL


@pytest.mark.parametrize("cin,hidden,cout,stride,hw,batch", [
    (16, 48, 16, 1, (7, 7), 2),     # expansion 2 x 6 and projection 2 x 6 (residual), 49 pixels
    (24, 64, 32, 2, (14, 13), 1),   # stride 2 to 7 x 7
    (8, 96, 40, 1, (9, 7), 1),      # 63 pixels; the projection (5 blocks) keeps the row tile
])
def test_blocked_flat_tiles_match_pytorch(tmp_path, cin, hidden, cout, stride, hw, batch):
    """On an AVX2 CPU the blocked convs of 7-wide maps tile the flattened plane (2 x 6, the last
    tile shorter) instead of a row (1 x 7), and still equal PyTorch."""
    from legoc.targets.schedules.conv2d_blocked import flat_tile

    spec = _avx2()
    model = _block(cin, hidden, cout, 3, stride, nn.ReLU6, stride == 1 and cin == cout, 5)
    x = torch.randn(batch, cin, *hw)
    used = _rules(model, x, spec.tvm_target())
    assert sorted(r for r in used.values() if "Blocked" in r) == ["Conv2dBlocked", "Conv2dBlocked", "DepthwiseBlocked"]
    out_w = (hw[1] - 1) // stride + 1
    assert flat_tile(hidden // 8, out_w, 7, 12, 16) == (2, 6)
    assert _run(model, x, tmp_path, f"flat{hidden}", spec) <= RTOL


def test_large_strided_expansion_is_blocked_not_split(host, tmp_path, monkeypatch):
    """An inverted residual whose expansion exceeds SplitExpandDepthwise's threshold and feeds a
    stride-2 depthwise conv (MobileNetV2's 16 -> 96 at 112x112, scaled down) is channel-blocked
    whole: no split groups, no concat, and it equals PyTorch."""
    from legoc.targets.schedules import split_expand

    monkeypatch.setattr(split_expand, "SPLIT_BYTES", 48 * 16 * 16 * 4)
    monkeypatch.setattr(split_expand, "GROUP_BYTES", 24 * 16 * 16 * 4)
    assert split_expand.group_channels(96, 16 * 16) == 24   # the split would take it
    model = _block(16, 96, 24, 3, 2, nn.ReLU6, False, 7)
    x = torch.randn(1, 16, 16, 16)
    used = _rules(model, x, host)
    assert not any("concatenate" in name for name in used), used
    assert sorted(r for r in used.values() if "Blocked" in r) == ["Conv2dBlocked", "Conv2dBlocked", "DepthwiseBlocked"]
    assert _run(model, x, tmp_path, "whole") <= RTOL


def test_flat_tile_only_where_a_row_holds_one_channel_vector():
    """flat_tile: AVX2's 7-wide maps (1 x 7 in a row) get 2 x 6; odd block counts, wider rows
    and CPUs with 32 registers keep the row tile."""
    from legoc.targets.schedules.conv2d_blocked import blocked_tile, flat_tile
    from legoc.targets.schedules.isa import acc_vectors

    assert flat_tile(120, 7, 7, 12, 16) == (2, 6)     # 160->960 at 7x7
    assert flat_tile(160, 7, 7, 12, 16) == (2, 6)     # the head, 320->1280
    assert flat_tile(40, 7, 7, 12, 16) == (2, 6)      # projection 960->320
    assert flat_tile(5, 7, 7, 12, 16) is None         # odd blocks
    assert flat_tile(72, 14, 14, 12, 16) is None      # 4 x 2 in a row
    for lanes, regs in ((16, 32), (4, 32)):
        assert flat_tile(120, 7, 7, acc_vectors(lanes, regs), regs) is None
    for blocks in range(1, 130):
        for n_x in (1, 2, 3, 5, 7, 14, 28, 56):
            for n_y in (1, 3, 7):
                tile = flat_tile(blocks, n_x, n_y, 12, 16)
                if tile:
                    fb, xb = tile
                    assert blocks % fb == 0 and fb * xb <= 12 and fb * xb + fb + 1 <= 16
                    assert fb * xb > blocked_tile(blocks, n_x, 12, 16)[1]


def test_chains_the_rewrite_must_not_take_stay_nchw(host, tmp_path):
    """Projections to a channel count that is not a multiple of 4, and expansions whose output
    is read twice, stay in NCHW (and still equal PyTorch)."""
    model = _block(8, 24, 6, 3, 1, nn.ReLU6, False, 0)
    x = torch.randn(1, 8, 10, 10)
    used = _rules(model, x, host)
    assert not {"Conv2dBlocked", "DepthwiseBlocked"} & set(used.values()), used
    assert _run(model, x, tmp_path) <= RTOL

    class TwoReaders(nn.Module):   # the expansion's activation also feeds the output
        def __init__(self):
            super().__init__()
            self.expand = nn.Sequential(nn.Conv2d(8, 16, 1), nn.ReLU())
            self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1, groups=16), nn.ReLU())
            self.project = nn.Conv2d(16, 16, 1)

        def forward(self, x):
            e = self.expand(x)
            return self.project(self.dw(e)) + e

    model = TwoReaders().eval()
    used = _rules(model, x, host)
    assert not {"Conv2dBlocked", "DepthwiseBlocked"} & set(used.values()), used
    assert _run(model, x, tmp_path, "two_readers") <= RTOL


def test_blocked_rules_build_for_aarch64():
    """NEON (4 lanes): the chain is blocked by 4, its rules apply, and it compiles to NEON FMAs."""
    import tvm

    from legoc.targets.schedules import TRANSFORM_PARAMS, cpu_pass_context, cpu_pipeline
    from legoc.targets.table import get_target

    target = get_target("raspberry-pi-4").tvm_target()
    model = _block(16, 40, 16, 3, 1, nn.ReLU6, True, 3)
    x = torch.randn(1, 16, 12, 12)
    used = _rules(model, x, target)
    assert sorted(r for r in used.values() if "Blocked" in r) == ["Conv2dBlocked", "Conv2dBlocked", "DepthwiseBlocked"]
    mod = _prepacked(model, x, target)
    mod = tvm.IRModule({gv: f for gv, f in mod.functions_items() if gv.name_hint != TRANSFORM_PARAMS})
    with cpu_pass_context():   # as targets/build.py builds
        executable = tvm.compile(mod, target=target, relax_pipeline=cpu_pipeline(target))
    asm = "\n".join(m.inspect_source("asm") for m in executable.mod.imports)
    assert "fmla" in asm and ".4s" in asm, "no NEON fused multiply-add in the aarch64 assembly"


def test_blocked_tile_fits_the_registers():
    """Every tile divides the channel blocks and the row, fits its accumulators, weight vectors
    and broadcast in the registers, and takes XB = 1 only on rows of 1; the tiles measured best
    on AVX2 (16 registers) are the ones chosen."""
    from legoc.targets.schedules.conv2d_blocked import blocked_tile
    from legoc.targets.schedules.isa import acc_vectors

    for lanes, regs in ((16, 32), (8, 16), (4, 32)):
        acc = acc_vectors(lanes, regs)
        for blocks in range(1, 130):
            for n_x in (1, 2, 3, 5, 7, 14, 28, 56, 112):
                fb, xb = blocked_tile(blocks, n_x, acc, regs)
                assert blocks % fb == 0 and n_x % xb == 0, (blocks, n_x, fb, xb)
                assert fb * xb <= acc and fb * xb + fb + 1 <= regs, (lanes, blocks, n_x, fb, xb)
                assert xb > 1 or n_x == 1, (lanes, blocks, n_x, fb, xb)
    assert blocked_tile(3, 56, 12, 16) == (3, 4)    # 144->24 at 56: 0.26 ms against 0.33 at 1 x 8
    assert blocked_tile(72, 14, 12, 16) == (4, 2)   # 96->576 at 14: 0.23 ms against 0.29 at 1 x 7
    assert blocked_tile(20, 7, 12, 16) == (1, 7)    # 960->160 at 7: not 4 x 1 (1.8x slower)


@pytest.mark.parametrize("cout,batch", [(32, 1), (37, 2)])
def test_blocked_head_before_global_pooling_matches_pytorch(host, tmp_path, cout, batch):
    """A 1x1 conv + bias + ReLU6 feeding global average pooling (a network's head) runs blocked:
    pooled per channel block, then back to [N, C, 1, 1] (channels that are not a multiple of the
    vector width: the padding sliced off), and equals PyTorch."""
    torch.manual_seed(cout)
    model = nn.Sequential(nn.Conv2d(8, cout, 1), nn.ReLU6(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(cout, 10)).eval()
    x = torch.randn(batch, 8, 7, 7)
    used = _rules(model, x, host)
    assert "Conv2dBlocked" in used.values(), used
    assert _run(model, x, tmp_path) <= RTOL


@pytest.mark.parametrize("hidden,hw,rows", [(32, (14, 14), True), (96, (4, 4), False)])
def test_depthwise_splits_as_its_expansion(host, hidden, hw, rows):
    """On 2 threads each thread should read the rows it wrote: the depthwise conv runs rows
    outside channel blocks exactly where the expansion before it does (a plane of more pixels
    than hidden channels), channel blocks first otherwise."""
    import re

    import tvm

    from legoc.targets.schedules import scheduled_by, scheduling_passes

    model = _block(16, hidden, 16, 3, 1, nn.ReLU6, True, 0)
    mod = _prepacked(model, torch.randn(1, 16, *hw), host)
    with host:
        mod = tvm.transform.Sequential(scheduling_passes(host, strict=True))(mod)
    rules = scheduled_by(mod)

    def parallel_loops(name):
        return re.findall(r"for (\w+) in T\.parallel\(", mod[name].script())

    split = {}
    for name, rule in rules.items():
        if rule in ("Conv2dBlocked", "DepthwiseBlocked"):
            loops = parallel_loops(name)
            assert loops, (name, rule)
            # the fused loop's name lists its loops outermost first: rows ("y") before channel blocks
            split.setdefault(rule, []).append(loops[0])
    (dw,) = split["DepthwiseBlocked"]
    expand = next(n for n in split["Conv2dBlocked"] if "co" in n)
    assert (dw.index("y") < dw.index("c")) is rows, dw
    assert (expand.index("y") < expand.index("co")) is rows, expand
