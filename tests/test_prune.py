"""prune: boundary shapes never change; pruning exactly the dead channels changes nothing."""
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from legoc.errors import UserError
from legoc.passes import ProgramState
from legoc.passes.analysis import channel_groups
from legoc.passes.capture import Capture
from legoc.passes.prune import granularity, kept_channels, prune_block, validate_ratios


class Residual(nn.Module):
    def __init__(self, c=16, hidden=12):
        super().__init__()
        self.c1 = nn.Conv2d(c, hidden, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(hidden)
        self.dw = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False)
        self.b2 = nn.BatchNorm2d(hidden)
        self.c2 = nn.Conv2d(hidden, c, 1, bias=False)
        self.b3 = nn.BatchNorm2d(c)

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        y = torch.relu(self.b2(self.dw(y)))
        return torch.relu(x + self.b3(self.c2(y)))


def _gm(model, x):
    return Capture()(ProgramState(model=model.eval(), example_inputs=(x,)), None).state.gm


def test_groups_keep_the_boundary_and_the_residual_fixed():
    x = torch.randn(1, 16, 8, 8)
    groups = channel_groups(_gm(Residual(), x))
    prunable = [g for g in groups if g.prunable]
    assert len(prunable) == 1
    g = prunable[0]
    assert g.channels == 12 and g.producers == ["c1"] and sorted(g.members) == ["b1", "b2", "dw"] and g.consumers == ["c2"]
    # the residual add couples c2's output to the block input: blocked
    assert any(not gr.prunable and "c2" in gr.producers for gr in groups)


def test_pruning_dead_channels_changes_nothing():
    torch.manual_seed(0)
    model = Residual().eval()
    dead = torch.tensor([1, 4, 5, 9])
    with torch.no_grad():
        model.c1.weight[dead] = 0.0        # lowest L1: these are the channels pruned at ratio 4/12
        model.b1.bias[dead] = 0.0
        model.b1.running_mean[dead] = 0.0  # BN output 0 -> relu 0 -> dw 0 -> contributes nothing
        model.b2.bias[dead] = -1.0          # relu(-1 + ...) = 0
        model.b2.running_mean[dead] = 0.0
    x = torch.randn(1, 16, 8, 8)
    gm = _gm(model, x)
    v = prune_block(gm, x, ratio=4 / 12)
    assert list(v.channels.values()) == [(12, 8, 8)]
    assert v.gm.get_submodule("c1").out_channels == 8 and v.gm.get_submodule("dw").groups == 8
    with torch.no_grad():
        assert torch.allclose(v.gm(x), model(x), atol=1e-6)
    full = prune_block(gm, x, ratio=0.0)
    assert v.macs < full.macs and v.param_bytes < full.param_bytes


@settings(max_examples=25, deadline=None)
@given(ratio=st.floats(0.0, 0.95), round_to=st.sampled_from([1, 2, 4, 8]), hidden=st.integers(2, 24))
def test_any_ratio_keeps_boundary_shapes(ratio, round_to, hidden):
    torch.manual_seed(hidden)
    x = torch.randn(1, 16, 6, 6)
    gm = _gm(Residual(hidden=hidden), x)
    v = prune_block(gm, x, ratio=ratio, round_to=round_to)
    with torch.no_grad():
        assert v.gm(x).shape == gm(x).shape
    kept = v.gm.get_submodule("c1").out_channels
    assert kept == kept_channels(hidden, ratio, round_to) if ratio > 0 else kept == hidden
    assert 1 <= kept <= hidden
    if round_to <= hidden and ratio > 0:
        assert kept % round_to == 0 or kept == hidden


def test_prune_never_modifies_the_block():
    x = torch.randn(1, 16, 8, 8)
    gm = _gm(Residual(), x)
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    prune_block(gm, x, ratio=0.5)
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())


def test_ratios_are_validated():
    assert validate_ratios([0.4, 0, 0.2]) == (0.0, 0.2, 0.4)
    with pytest.raises(UserError, match=r"must be in \[0, 1\)"):
        validate_ratios([0, 1.0])
    with pytest.raises(UserError, match="must include 0"):
        validate_ratios([0.2, 0.4])


@pytest.mark.parametrize("name", ["vgg_chain", "cifar_resnet", "mobilenetv2"])
def test_variants_of_examples_recompose(name, compiled_state):
    state = compiled_state(name)
    x = state.example_inputs
    with torch.no_grad():
        ref = state.model(*x)
        for block in state.partition.blocks:
            variants = state.variants[block.name]
            assert [v.ratio for v in variants] == [0.0, 0.2, 0.4, 0.6, 0.8]
            assert all(a.macs > b.macs for a, b in zip(variants, variants[1:]))
            out = state.partition.run(*x, replace={block.name: variants[-1].gm})
            assert out.shape == ref.shape
            full = state.partition.run(*x, replace={block.name: variants[0].gm})
            assert torch.allclose(full, ref, atol=1e-5)


def test_taylor_importance_scores_channels_by_their_effect_on_the_loss():
    from legoc.passes.prune import taylor_scores

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4)).eval()
    with torch.no_grad():
        model[4].weight[:, 2] = 0.0          # channel 2 of the conv cannot change the loss
    gm = _gm(model, torch.randn(1, 3, 8, 8))
    xs = [(torch.randn(16, 3, 8, 8),) for _ in range(2)]
    ys = [torch.randint(0, 4, (16,)) for _ in range(2)]
    scores = taylor_scores(gm, xs, ys)
    s = scores["0"]
    assert s.shape == (6,) and float(s[2]) == 0.0 and float(s.max()) > 0.0
    assert all(p.grad is None for p in gm.parameters())   # no gradient left behind
    with pytest.raises(UserError, match="--importance taylor needs train_data"):
        taylor_scores(gm, xs, [None, None], "m.py")


def test_taylor_importance_covers_linear_producers():
    # a prunable group whose producer is a Linear (a hidden layer) used to raise KeyError
    from legoc.passes.prune import taylor_scores

    torch.manual_seed(0)
    model = DenseLayer().eval()
    gm = _gm(model, torch.randn(1, 8, 6, 6))
    xs, ys = [(torch.randn(16, 8, 6, 6),)], [torch.randint(0, 5, (16,))]
    scores = taylor_scores(gm, xs, ys)
    assert scores["fc1"].shape == (12,) and float(scores["fc1"].max()) > 0.0
    v = prune_block(gm, xs[0][0][:1], 0.5, importance="taylor", taylor=scores)
    with torch.no_grad():
        assert v.gm(xs[0][0]).shape == gm(xs[0][0]).shape
    assert any(c[2] < c[0] for c in v.channels.values())   # something was pruned by Taylor scores


class DenseLayer(nn.Module):
    """x -> cat([x, relu(bn(conv(x)))]) -> bn -> relu -> 1x1 conv: a concat inside a block."""

    def __init__(self, c=8, growth=6):
        super().__init__()
        self.conv = nn.Conv2d(c, growth, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(growth)
        self.bn2 = nn.BatchNorm2d(c + growth)
        self.out = nn.Conv2d(c + growth, c, 1)
        self.fc1, self.fc2 = nn.Linear(c, 12), nn.Linear(12, 5)

    def forward(self, x):
        y = torch.cat([x, torch.relu(self.bn(self.conv(x)))], 1)
        z = self.out(torch.relu(self.bn2(y)))
        return self.fc2(torch.relu(self.fc1(z.mean((2, 3)))))


def test_concat_and_linear_groups_are_pruned_at_their_offsets():
    from legoc.passes.analysis import channel_plan

    torch.manual_seed(0)
    model = DenseLayer().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    dead = torch.tensor([0, 3])
    with torch.no_grad():   # conv channels 0 and 3 contribute nothing after the concat
        model.conv.weight[dead] = 0.0
        model.bn.bias[dead] = -5.0
        model.bn.running_mean[dead] = 0.0
        model.out.weight[:, 8 + dead] = 0.0
        model.out.weight[5:] = 0.0       # channels 5..7 of `out` are zero (3 of 8 pruned at 1/3)
        model.out.bias[5:] = 0.0
        model.fc1.weight[4:] *= 0.001    # the least important hidden units of fc1 ...
        model.fc2.weight[:, 4:] = 0.0    # ... do not reach the output
    x = torch.randn(2, 8, 6, 6)
    gm = _gm(model, x)
    plan = channel_plan(gm)
    grown = next(g for g in plan.groups if g.producers == ["conv"])
    assert grown.prunable and grown.shared_layout and "bn2" in grown.members and "out" in grown.consumers
    assert plan.layouts[("bn2", "out")] == [("x", 8), (grown.root, 6)]
    hidden = next(g for g in plan.groups if g.producers == ["fc1"])
    assert hidden.prunable and hidden.consumers == ["fc2"]
    v = prune_block(gm, x, ratio=4 / 12)   # keeps 4 of 6 grown channels, 5 of 8, 8 of 12 hidden units
    assert sorted(v.channels.values()) == [(6, 4, 4), (8, 5, 5), (12, 8, 8)]
    assert v.gm.get_submodule("bn2").num_features == 8 + 4 and v.gm.get_submodule("out").in_channels == 12
    assert v.gm.get_submodule("fc1").out_features == 8 and v.gm.get_submodule("fc2").in_features == 8
    with torch.no_grad():
        assert torch.allclose(v.gm(x), model(x), atol=1e-5)


def test_reading_a_shape_does_not_block_pruning():
    class ViewHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.fc = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Linear(8, 4)

        def forward(self, x):
            y = torch.relu(self.b(torch.relu(self.a(x)))).mean((2, 3), keepdim=True)
            return self.fc(y.view(y.size(0), -1))        # size(0) reads the batch, not channels

    x = torch.randn(2, 3, 10, 10)
    v = prune_block(_gm(ViewHead().eval(), x), x, 0.5)
    assert v.channels == {"a": (8, 4, 4), "b": (8, 4, 4)} and v.gm(x).shape == (2, 4)


class GroupedBlock(nn.Module):
    """1x1 reduce -> GroupNorm -> grouped 3x3 (4 groups of 4) -> BN -> 1x1 expand (ResNeXt-style)."""

    def __init__(self):
        super().__init__()
        self.reduce = nn.Conv2d(8, 16, 1, bias=False)
        self.gn = nn.GroupNorm(4, 16)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.expand = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        y = torch.relu(self.gn(self.reduce(x)))
        return x + self.expand(torch.relu(self.bn(self.grouped(y))))


def test_grouped_conv_and_group_norm_are_pruned_evenly_per_group():
    from legoc.passes.analysis import channel_plan

    torch.manual_seed(0)
    model = GroupedBlock().eval()
    x = torch.randn(2, 8, 6, 6)
    gm = _gm(model, x)
    g = next(g for g in channel_plan(gm).groups if g.producers == ["reduce"])
    assert g.prunable and g.divisions == 4 and {"gn", "grouped", "bn"} <= set(g.members)
    v = prune_block(gm, x, ratio=0.5)                   # 2 of 4 channels in each of the 4 groups
    grouped = v.gm.get_submodule("grouped")
    assert grouped.groups == 4 and grouped.in_channels == grouped.out_channels == 8
    assert v.gm.get_submodule("gn").num_channels == 8 and v.gm.get_submodule("expand").in_channels == 8
    with torch.no_grad():
        assert v.gm(x).shape == model(x).shape


def test_pruning_dead_channels_of_a_grouped_conv_changes_nothing():
    torch.manual_seed(1)
    model = GroupedBlock().eval()
    model.gn = nn.Identity()                             # (GroupNorm statistics would change)
    dead = torch.tensor([1, 2, 5, 6, 8, 11, 12, 15])     # two in each group of four
    with torch.no_grad():
        model.reduce.weight[dead] = 0.0
        model.grouped.weight[dead] = 0.0
        model.bn.bias[dead] = -3.0
        model.bn.running_mean[dead] = 0.0
    x = torch.randn(2, 8, 6, 6)
    v = prune_block(_gm(model, x), x, ratio=0.5)
    with torch.no_grad():
        assert torch.allclose(v.gm(x), model(x), atol=1e-5)


def test_peak_activation_bytes_follows_tensor_liveness():
    from legoc.passes.analysis import peak_activation_bytes

    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 8, 1), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return x + self.b(self.a(x))   # x stays alive across both convs

    x = torch.randn(1, 4, 5, 5)
    gm = _gm(Skip().eval(), x)
    unit = 5 * 5 * 4                                   # bytes per channel of a float32 5x5 map
    # at conv a: x (4 ch) + a (8 ch); at conv b: x + a + b (4 ch) = 16 channels alive
    assert peak_activation_bytes(gm) == 16 * unit


# ---------------------------------------------------------------------------------------------
# rounding to the target's vector width


def test_granularity_keeps_every_ratio_a_distinct_variant():
    ratios = (0.0, 0.2, 0.4, 0.6, 0.8)
    # large groups take the full multiple
    assert granularity(64, ratios, 8) == 8 and granularity(960, ratios, 16) == 16
    # a 16-channel group at multiples of 8 would merge ratios 0/0.2 and 0.4/0.6/0.8: finer
    assert granularity(16, ratios, 8) == 2
    assert [kept_channels(16, r, 2) for r in ratios[1:]] == [12, 10, 6, 4]
    assert granularity(16, (0.0, 0.5), 8) == 8          # two ratios: multiples of 8 keep them apart
    assert granularity(13, (), 8) == 8                  # no ratios given: round_to as asked
    for channels in range(2, 70):
        for rt in (1, 2, 4, 8, 16):
            g = granularity(channels, ratios, rt)
            assert g <= rt and (g & (g - 1)) == 0
            counts = [channels] + [kept_channels(channels, r, g) for r in ratios[1:]]
            if g > 1:
                assert len(set(counts)) == len(counts)


@pytest.mark.parametrize("round_to", [1, 8])
def test_rounded_and_unrounded_odd_channels_compile_equal_to_pytorch(round_to, tmp_path):
    """Odd channel counts (13 hidden channels of a conv-dw-conv block), pruned with rounding off
    and on, compiled by TVM with legoc's schedules: equal to the pruned PyTorch block (<= 1e-4)."""
    import numpy as np

    from legoc.targets.build import build_module
    from legoc.targets.table import get_target

    torch.manual_seed(round_to)
    model = Residual(c=11, hidden=37).eval()
    with torch.no_grad():
        for bn in (model.b1, model.b2, model.b3):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
    x = torch.randn(1, 11, 13, 15)
    gm = _gm(model, x)
    ratios = (0.0, 0.3, 0.6)
    for ratio in ratios[1:]:
        v = prune_block(gm, x, ratio, round_to=round_to, ratios=ratios)
        (original, computed, kept), = v.channels.values()
        assert original == 37 and computed == round(37 * (1 - ratio))
        assert kept == computed if round_to == 1 else kept % granularity(37, ratios, round_to) == 0
        built = build_module(v.gm, (x,), get_target("host"), tmp_path / f"r{ratio}.so", prepack=True)
        import tvm

        dev = tvm.cpu()
        vm = tvm.runtime.vm.VirtualMachine(tvm.runtime.load_module(str(built.path)), dev)
        out = vm["main"](tvm.runtime.tensor(x.numpy(), dev), *[tvm.runtime.tensor(p, dev) for p in built.params])
        with torch.no_grad():
            ref = v.gm(x).numpy()
        err = float(np.abs(out.numpy() - ref).max()) / float(np.abs(ref).max())
        assert err <= 1e-4, (ratio, round_to, err)


def test_compile_config_resolves_round_to_from_the_target():
    from legoc.pipeline import CompileConfig
    from legoc.targets.table import channel_multiple, get_target

    assert CompileConfig().round_to is None                  # resolved by compile_model
    assert channel_multiple(get_target("raspberry-pi-4")) == 4  # NEON: 4 fp32 lanes
    assert channel_multiple(get_target("host")) in (4, 8, 16)
    with pytest.raises(UserError):
        CompileConfig(round_to=0)


class MixedNorm(nn.Module):
    """Two prunable groups in one block: a conv with BatchNorm, then a conv without (bn falls back)."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(8, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12)
        self.c2 = nn.Conv2d(12, 10, 3, padding=1)
        self.c3 = nn.Conv2d(10, 8, 1)

    def forward(self, x):
        return self.c3(torch.relu(self.c2(torch.relu(self.b1(self.c1(x))))))


def test_bn_importance_records_the_groups_that_fell_back_to_l1():
    torch.manual_seed(0)
    model = MixedNorm().eval()
    with torch.no_grad():   # BN scale and L1 norm disagree: the BN scale must decide for c1's group
        model.b1.weight.copy_(torch.arange(12, dtype=torch.float32) + 1)       # channels 6..11 largest
        model.c1.weight.mul_(torch.linspace(3, 0.1, 12).view(12, 1, 1, 1))      # L1: channels 0..5 largest
    x = torch.randn(1, 8, 6, 6)
    gm = _gm(model, x)
    v = prune_block(gm, x, 0.5, importance="bn")
    assert v.importance == {"c1": "bn", "c2": "l1"}
    kept = v.gm.get_submodule("b1").weight.detach()
    assert sorted(kept.tolist()) == [7.0, 8.0, 9.0, 10.0, 11.0, 12.0]            # by BN scale, not L1
    assert prune_block(gm, x, 0.5).importance == {"c1": "l1", "c2": "l1"}
    assert prune_block(gm, x, 0.0, importance="bn").importance == {}           # nothing ranked at full size


def _front(model, x, train=None, **cfg):
    """capture -> partition -> prune of ``model`` with the compile options ``cfg``."""
    from legoc.passes import PassManager
    from legoc.passes.partition import PartitionPass
    from legoc.passes.prune import Prune
    from legoc.pipeline import CompileConfig

    inputs, targets = train if train else ([], [])
    state = ProgramState(model=model.eval(), example_inputs=(x,), source="m.py", train_inputs=inputs,
                         train_targets=targets)
    return PassManager([Capture(), PartitionPass(), Prune()])(state, CompileConfig(**cfg)).state


class ConvMlp(nn.Module):
    """A conv block with BatchNorm, a conv block without, and a hidden Linear layer."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                               nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(16, 24, 3, padding=1), nn.ReLU(), nn.Conv2d(24, 16, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 32), nn.ReLU(),
                                  nn.Linear(32, 5))

    def forward(self, x):
        return self.head(self.b(self.a(x)))


def test_the_prune_pass_with_bn_importance_warns_and_records_each_fallback(capsys):
    torch.manual_seed(0)
    state = _front(ConvMlp(), torch.randn(1, 3, 8, 8), ratios=(0.0, 0.5), importance="bn", round_to=1)
    used = {(b, g): how for b, vs in state.variants.items() for v in vs for g, how in v.importance.items()}
    assert "bn" in used.values() and "l1" in used.values(), used
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("legoc: warning: --importance bn: "), err
    assert all(f"{b}/{g}" in err[0] for (b, g), how in used.items() if how == "l1")
    _front(ConvMlp(), torch.randn(1, 3, 8, 8), ratios=(0.0, 0.5), round_to=1)   # l1: nothing to warn about
    assert capsys.readouterr().err == ""


def test_the_prune_pass_with_taylor_importance_ranks_linear_groups():
    # through the pass (not taylor_scores alone): a block holding a hidden Linear layer
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    train = ([(torch.randn(8, 3, 8, 8, generator=g),) for _ in range(3)],
             [torch.randint(0, 5, (8,), generator=g) for _ in range(3)])
    state = _front(ConvMlp(), torch.randn(1, 3, 8, 8), train, ratios=(0.0, 0.5), importance="taylor", round_to=1)
    producers = {grp.root: grp.producers for block in state.partition.blocks for grp in channel_groups(block.gm)}
    used = {g: how for vs in state.variants.values() for v in vs for g, how in v.importance.items()}
    assert used and set(used.values()) == {"taylor"}
    linear = [g for g in used if any(isinstance(state.gm.get_submodule(t), nn.Linear) for t in producers.get(g, []))]
    assert linear, (used, producers)     # a Linear producer's group was ranked by Taylor scores
    with torch.no_grad():
        x = torch.randn(2, 3, 8, 8)
        ref = state.partition.run(x)
        for block in state.partition.blocks:
            for v in state.variants[block.name]:
                assert state.partition.run(x, replace={block.name: v.gm}).shape == ref.shape
