"""legoc.targets.schedules: every CPU rule, on random shapes, matches PyTorch; the fallback is safe.

Each case exports a small torch module, legalizes and fuses it with TVM's CPU pipeline, schedules
it with legoc's rules in strict mode (a rule that raises fails the test instead of falling back),
checks which rule scheduled the operator's PrimFunc, builds it for the host and compares the
output with PyTorch (relative to the output's largest magnitude, 1e-4).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from torch import nn

RTOL = 1e-4
CASES = settings(max_examples=6, deadline=None, derandomize=True, phases=[Phase.generate],
                 suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def host():
    from legoc.targets.table import get_target

    return get_target("host").tvm_target()


class Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *xs):
        return self.fn(*xs)


def _relax(module: nn.Module, inputs: tuple):
    import tvm.relax.frontend.torch as relax_torch
    from tvm import relax

    with torch.no_grad():
        exported = torch.export.export(module.eval(), inputs)
    mod = relax_torch.from_exported_program(exported, keep_params_as_input=True,
                                            unwrap_unit_return_tuple=True)
    mod, params = relax.frontend.detach_params(mod)
    return mod, [p.numpy() for p in params.get("main", [])]


def check(module: nn.Module, inputs: tuple, target, rules=None, strict=True) -> dict[str, str]:
    """Schedule, build and run ``module``; assert it matches PyTorch; return PrimFunc -> rule."""
    import tvm
    from tvm import relax

    from legoc.targets.schedules import cpu_pass_context, lowering_passes, scheduled_by, scheduling_passes

    mod, params = _relax(module, inputs)
    with target:
        mod = tvm.transform.Sequential(
            scheduling_passes(target, rules=rules, strict=strict))(mod)
    rules_used = scheduled_by(mod)
    with cpu_pass_context():   # int64 indices, as targets/build.py builds
        executable = tvm.compile(mod, target=target,
                                 relax_pipeline=tvm.transform.Sequential(lowering_passes(target)))
    vm = relax.VirtualMachine(executable, tvm.cpu())
    args = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in
            [*(x.numpy() for x in inputs), *params]]
    out = vm["main"](*args).numpy()
    with torch.no_grad():
        ref = module(*inputs).numpy()
    assert out.shape == ref.shape
    scale = max(float(np.abs(ref).max()), 1e-6)
    err = float(np.abs(out - ref).max()) / scale
    assert err <= RTOL, f"relative error {err:.2e} > {RTOL} (rules {rules_used})"
    return rules_used


def rule_of(rules_used: dict[str, str], op: str) -> str:
    hits = {name: rule for name, rule in rules_used.items() if op in name}
    assert hits, f"no PrimFunc for {op} in {rules_used}"
    assert len(set(hits.values())) == 1, hits
    return next(iter(hits.values()))


def _randn(*shape):
    return torch.randn(*shape)


def _with_epilogue(conv: nn.Module, x: torch.Tensor, act: str) -> tuple[nn.Module, tuple]:
    """(module, inputs): ``conv`` alone ("none"), then a ReLU ("relu"), or plus a random
    residual input, then a ReLU ("residual")."""
    if act == "relu":
        return nn.Sequential(conv, nn.ReLU()), (x,)
    if act == "residual":
        with torch.no_grad():
            shape = conv(x).shape
        return Fn(lambda a, r: torch.relu(conv(a) + r)), (x, _randn(*shape))
    return conv, (x,)


# ---------------------------------------------------------------------------------------------
# conv2d


@CASES
@given(cin=st.integers(1, 20), cout=st.sampled_from([8, 16, 32, 48, 64]),
       k=st.sampled_from([1, 3, 5]), stride=st.sampled_from([1, 2]), pad=st.integers(0, 2),
       hw=st.tuples(st.integers(5, 17), st.integers(5, 17)), bias=st.booleans(),
       act=st.sampled_from(["none", "relu", "residual"]), seed=st.integers(0, 2**16))
def test_conv2d_packed(host, cin, cout, k, stride, pad, hw, bias, act, seed):
    torch.manual_seed(seed)
    h, w = max(hw[0], k), max(hw[1], k)
    conv = nn.Conv2d(cin, cout, k, stride, pad, bias=bias)
    module, inputs = _with_epilogue(conv, _randn(1, cin, h, w), act)
    assert rule_of(check(module, inputs, host), "conv2d") == _conv_rule(host, conv, (h, w))


def _conv_rule(target, conv: nn.Conv2d, hw: tuple[int, int]) -> str:
    """The rule a groups=1 conv2d on an ``hw`` input gets: the pixel-vector rule where
    ``pixel_tile_positions`` takes it, else the packed one."""
    from legoc.targets.schedules import vector_lanes, vector_registers
    from legoc.targets.schedules.pixel_conv import pixel_tile_positions

    kh, kw = conv.kernel_size
    ph, pw = conv.padding
    out_hw = (hw[0] + 2 * ph - kh + 1, hw[1] + 2 * pw - kw + 1)
    takes = conv.stride == (1, 1) and conv.dilation == (1, 1) and pixel_tile_positions(
        conv.out_channels, (kh, kw), out_hw, hw[1] + 2 * pw, vector_lanes(target), vector_registers(target))
    return "Conv2dPixels" if takes else "Conv2dNCHWPacked"


@pytest.fixture(scope="module")
def avx2():
    """An AVX2 CPU (8 lanes, 16 registers): its packed conv tiles run over the flattened plane.
    Runs on any x86-64 CPU with AVX2, the AVX-512 ones included."""
    import tvm

    return tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"})


@settings(max_examples=8, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.too_slow])
@example(cin=9, cout=32, k=3, stride=1, hw=(14, 14), batch=1, act="residual", seed=0)  # 2 x 6, tail 4
@example(cin=8, cout=16, k=3, stride=1, hw=(7, 7), batch=2, act="relu", seed=1)        # 2 x 5, tail 4
@example(cin=11, cout=48, k=3, stride=2, hw=(17, 13), batch=1, act="relu", seed=2)     # 9 x 7 plane
@example(cin=70, cout=16, k=1, stride=1, hw=(14, 14), batch=1, act="none", seed=3)     # 1x1, 70 steps
@example(cin=3, cout=32, k=3, stride=1, hw=(14, 14), batch=1, act="relu", seed=4)      # 27 steps: rows
@example(cin=16, cout=12, k=3, stride=2, hw=(28, 28), batch=1, act="residual", seed=5)  # padded to 16, sliced
@given(cin=st.integers(1, 40), cout=st.sampled_from([12, 16, 32, 40, 48]), k=st.sampled_from([1, 3]),
       stride=st.sampled_from([1, 2]), hw=st.tuples(st.integers(3, 16), st.integers(3, 16)),
       batch=st.integers(1, 2), act=st.sampled_from(["none", "relu", "residual"]),
       seed=st.integers(0, 2**16))
def test_conv2d_packed_flat_tiles(avx2, cin, cout, k, stride, hw, batch, act, seed):
    """The packed conv's tile over the flattened output plane (last tile shorter) equals
    PyTorch for any plane, stride, batch and epilogue, where register_tile takes it (the row
    tile where the reduction is short, or where output channels padded to the vector width
    are sliced off after the conv)."""
    from legoc.targets.schedules.isa import register_tile

    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, k, stride, k // 2, bias=True)
    module, inputs = _with_epilogue(conv, _randn(batch, cin, *hw), act)
    oh, ow = (hw[0] + 2 * (k // 2) - k) // stride + 1, (hw[1] + 2 * (k // 2) - k) // stride + 1
    used = check(module, inputs, avx2, rules=_packed_rules())
    # 12 filters at stride 1: vectors of pixels where the pixel conv takes them (few_filters)
    assert rule_of(used, "conv2d") == _conv_rule(avx2, conv, hw)
    if (oh, ow) in ((14, 14), (7, 7)) and cout % 16 == 0:
        assert register_tile(cout, ow, 8, 16, oh, cin * k * k)[2] == (cin * k * k >= 64)


@settings(max_examples=10, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.too_slow])
@example(pads=(1, 1, 1, 1), c=3, h=5, w=7)      # a 3x3 conv's pad
@example(pads=(1, 0, 1, 0), c=2, h=6, w=6)      # stride 2 on an even map: nothing after
@example(pads=(0, 2, 3, 0), c=1, h=1, w=4)
@given(pads=st.tuples(*[st.integers(0, 3)] * 4).filter(any), c=st.integers(1, 4), h=st.integers(1, 9),
       w=st.integers(1, 9))
def test_pad_runs_as_loop_partitions(host, pads, c, h, w):
    """The packed conv's input pad, scheduled as row and column partitions (zeros at the
    border, a copy inside), equals numpy's for any pad on each side, some sides without. (A
    zero-wide pad is a copy, inlined into the conv: not drawn.)"""
    import tvm
    from tvm import s_tir, te, topi

    from legoc.targets.schedules.common_schedules import partition_pad

    top, bottom, left, right = pads
    x = te.placeholder((1, c, h, w), name="x")
    padded = topi.nn.pad(x, [0, 0, top, left], [0, 0, bottom, right], name="pad_temp")
    sch = s_tir.Schedule(te.create_prim_func([x, padded]))
    assert partition_pad(sch, sch.get_sblock("pad_temp"))
    lib = tvm.compile(tvm.IRModule({"main": sch.mod["main"]}), target=host).jit()
    data = np.random.default_rng(sum(pads) + c + h + w).standard_normal((1, c, h, w)).astype("float32")
    out = tvm.runtime.tensor(np.full((1, c, h + top + bottom, w + left + right), np.nan, "float32"))
    lib["main"](tvm.runtime.tensor(data), out)
    np.testing.assert_array_equal(out.numpy(), np.pad(data, ((0, 0), (0, 0), (top, bottom), (left, right))))


def test_cpu_builds_keep_int64_indices(host):
    """cpu_pass_context turns off TIR's index narrowing (by its pass name in this TVM) and
    keeps the rest of the current pass context: its config and instruments."""
    import tvm
    from tvm import te

    from legoc.targets.schedules import cpu_pass_context
    from legoc.targets.schedules.pipeline import NARROW_INDICES

    assert tvm.tirx.transform.NarrowDataType(32).info.name == NARROW_INDICES

    @tvm.instrument.pass_instrument
    class Ran:
        def __init__(self):
            self.names = []

        def run_before_pass(self, _mod, info):
            self.names.append(info.name)

    x = te.placeholder((4, 8), name="x")
    func = te.create_prim_func([x, te.compute((4, 8), lambda i, j: x[i, j] * 2, name="y")])
    for wide in (False, True):
        ran = Ran()
        with tvm.transform.PassContext(instruments=[ran], config={"tirx.disable_vectorize": True}):
            with cpu_pass_context() if wide else tvm.transform.PassContext.current():
                assert bool(tvm.transform.PassContext.current().config["tirx.disable_vectorize"])
                tvm.compile(tvm.IRModule({"main": func}), target=host)
        assert "tirx.FlattenBuffer" in ran.names
        assert (NARROW_INDICES in ran.names) != wide


def test_build_module_keeps_int64_indices_for_cpu(tmp_path):
    """build_module compiles a cpu target inside cpu_pass_context: TIR's index narrowing does
    not run (a pass instrument records the passes that do)."""
    import tvm

    from legoc.targets.build import build_module
    from legoc.targets.schedules.pipeline import NARROW_INDICES
    from legoc.targets.table import get_target

    @tvm.instrument.pass_instrument
    class Ran:
        def __init__(self):
            self.names = set()

        def run_before_pass(self, _mod, info):
            self.names.add(info.name)

    ran = Ran()
    with tvm.transform.PassContext(instruments=[ran]):
        build_module(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()).eval(), (_randn(1, 3, 8, 8),),
                     get_target("host"), tmp_path / "m.so", name="m")
    assert "tirx.FlattenBuffer" in ran.names and NARROW_INDICES not in ran.names


def test_spatial_block_keeps_its_innermost_loop(host):
    """A spatial block whose rows do not split into vectors (a 14-wide strided slice) runs its
    outer loops fused in parallel and the row as a loop of its own, not one fused loop that
    divides to recover every element's indices."""
    import tvm
    from tvm import s_tir, te, tirx

    from legoc.targets.schedules.common_schedules import schedule_spatial

    x = te.placeholder((1, 16, 28, 28), name="x")
    y = te.compute((1, 16, 14, 14), lambda n, c, h, w: x[n, c, h * 2, w * 2], name="y")
    sch = s_tir.Schedule(te.create_prim_func([x, y]))
    schedule_spatial(sch, sch.get_sblock("y"), 8)
    loops = [sch.get(lp) for lp in sch.get_loops(sch.get_sblock("y"))]
    assert [(int(lp.extent), lp.kind) for lp in loops] == [
        (16 * 14, tirx.ForKind.PARALLEL), (14, tirx.ForKind.SERIAL)]
    lib = tvm.compile(tvm.IRModule({"main": sch.mod["main"]}), target=host).jit()
    data = np.random.default_rng(0).standard_normal((1, 16, 28, 28)).astype("float32")
    out = tvm.runtime.tensor(np.zeros((1, 16, 14, 14), "float32"))
    lib["main"](tvm.runtime.tensor(data), out)
    np.testing.assert_array_equal(out.numpy(), data[:, :, ::2, ::2])


def test_row_tile_write_back_unrolls_its_channels(host):
    """A row tile's write-back (16 channels by 4 columns on AVX2, 14 on AVX-512: MNIST's 4->16
    conv of a pruned block, with its residual add and ReLU) runs its channel loop unrolled around the vectorized
    columns, so LLVM can keep the accumulators in registers and transpose them with shuffles;
    the whole block still equals PyTorch."""
    import tvm
    from tvm import s_tir, tirx

    from legoc.targets.schedules import RULE_ATTR, scheduled_by, scheduling_passes
    from legoc.targets.schedules.analysis import root_blocks

    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(16, 4, 3, 1, 1), nn.Conv2d(4, 16, 3, 1, 1)

        def forward(self, x):
            return torch.relu(self.c2(torch.relu(self.c1(x))) + x)

    x = _randn(1, 16, 28, 28)
    check(Block(), (x,), host)
    mod, _ = _relax(Block(), (x,))
    with host:
        mod = tvm.transform.Sequential(scheduling_passes(host, strict=True))(mod)
    funcs = [f for _, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)
             and str(f.attrs.get(RULE_ATTR, "")) == "Conv2dNCHWPacked"]   # c1 takes Conv2dPixels
    assert len(funcs) == 1, scheduled_by(mod)
    sch = s_tir.Schedule(funcs[0])
    loops = {}
    for block in root_blocks(sch):
        if not sch.get(block).reads or sch.get(block).name_hint.endswith(("_init", "_update")):
            continue
        loops[sch.get(block).name_hint] = [(int(sch.get(lp).extent), sch.get(lp).kind) for lp in sch.get_loops(block)]
    write_backs = [kinds for name, kinds in loops.items()      # the weight pack is vectorized too
                   if "weight" not in name and kinds[-1][1] == tirx.ForKind.VECTORIZED and kinds[-1][0] >= 4]
    assert len(write_backs) == 1, loops
    assert (16, tirx.ForKind.UNROLLED) in write_backs[0], write_backs[0]


def test_weight_heavy_conv_reads_its_weights_in_chunks(host, monkeypatch):
    """A channel block whose weights exceed CHUNK_WEIGHTS (lowered here so that a small conv
    qualifies) runs its reduction in chunks of CHUNK_CHANNELS input channels, each over the
    block's whole plane, with a residual add and ReLU; the block still equals PyTorch, with
    and without a channel count that is not a whole number of chunks."""
    import tvm
    from tvm import s_tir, tirx

    from legoc.targets.schedules import RULE_ATTR, conv2d_packed, scheduled_by, scheduling_passes
    from legoc.targets.schedules.analysis import root_blocks

    monkeypatch.setattr(conv2d_packed, "CHUNK_WEIGHTS", 1024)
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self, channels):
            super().__init__()
            self.conv = nn.Conv2d(channels, 8, 3, 1, 1)

        def forward(self, x):
            return torch.relu(self.conv(x) + x[:, :8])

    for channels, chunks in ((48, 3), (40, None)):
        x = _randn(1, channels, 5, 5)
        check(Block(channels), (x,), host)
        mod, _ = _relax(Block(channels), (x,))
        with host:
            mod = tvm.transform.Sequential(scheduling_passes(host, strict=True))(mod)
        funcs = [f for _, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)
                 and str(f.attrs.get(RULE_ATTR, "")) == "Conv2dNCHWPacked"]
        assert len(funcs) == 1, scheduled_by(mod)
        sch = s_tir.Schedule(funcs[0])
        update = [b for b in root_blocks(sch) if sch.get(b).name_hint.endswith("_update")]
        extents = [int(sch.get(lp).extent) for lp in sch.get_loops(update[0])]
        # chunked: (batch x channel block) parallel, the chunks, the rows of the block's plane;
        # else (batch x channel block x row) parallel, the row's tiles, the whole reduction
        assert (extents[1:3] == [chunks, 5]) if chunks else (extents[2] == channels), extents


def _packed_rules():
    """The default rules without Conv2dPointwise, so 1x1 convs take the packed rule too."""
    from legoc.targets.schedules import Conv2dPointwise, default_rules

    return [r for r in default_rules() if not isinstance(r, Conv2dPointwise)]


def test_register_tiles_fit_and_avoid_one_pixel_tails():
    """Every tile fits the accumulators and its channel vectors divide the filters; a flat
    tile holds more accumulators than the row tile it replaces, never leaves a one-pixel last
    tile and needs a reduction of 64 steps or more; AVX-512 keeps its row tiles (2 x 7) on
    ResNet's maps, and NEON its row tiles everywhere."""
    from legoc.targets.schedules.isa import acc_vectors, register_tile

    for lanes, regs in ((16, 32), (8, 16), (4, 32)):
        acc = acc_vectors(lanes, regs)
        for n_f in (lanes, 2 * lanes, 3 * lanes, 8 * lanes):
            for n_y in range(1, 60):
                for n_x in (1, 2, 5, 7, 13, 14, 28, 56, 112):
                    fb, xb, flat = register_tile(n_f, n_x, lanes, regs, n_y, 576)
                    assert register_tile(n_f, n_x, lanes, regs, n_y, 63)[2] is False
                    assert n_f % (fb * lanes) == 0 and fb * xb <= acc
                    row = register_tile(n_f, n_x, lanes, regs)
                    assert not row[2] and n_x % row[1] == 0
                    if flat:
                        assert fb * xb > row[0] * row[1] and (n_y * n_x) % xb != 1
                    else:
                        assert (fb, xb) == row[:2]
    for hw in (56, 28, 14, 7):
        assert register_tile(64, hw, 16, 32, hw, 576) == (2, 7, False)
        assert not register_tile(64, hw, 4, 32, hw, 576)[2]   # NEON: row tiles
    assert register_tile(256, 14, 8, 16, 14, 2304) == (2, 6, True)
    assert register_tile(512, 7, 8, 16, 7, 4608) == (2, 5, True)


@CASES
@given(cin=st.integers(1, 12), cout=st.integers(1, 40).filter(lambda c: c % 16),
       k=st.sampled_from([1, 3]), stride=st.sampled_from([1, 2]), seed=st.integers(0, 2**16))
def test_conv2d_odd_channels(host, cin, cout, k, stride, seed):
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, k, stride, k // 2)
    used = check(conv, (_randn(1, cin, 11, 9),), host)
    # the output channels are padded to 4, 8 or a multiple of the vector width (PadConvChannels)
    # unless the conv has fewer filters than a vector holds and the pixel rule takes it
    assert rule_of(used, "conv2d") == _conv_rule(host, conv, (11, 9))


@settings(max_examples=10, deadline=None, derandomize=True,
          phases=[Phase.explicit, Phase.generate], suppress_health_check=[HealthCheck.too_slow])
@example(cin=16, cout=4, k=3, pad=1, hw=(28, 28), act="residual", batch=1, seed=0)   # the MNIST example at r0.75
@example(cin=3, cout=1, k=5, pad=2, hw=(17, 23), act="relu", batch=2, seed=1)
@example(cin=7, cout=3, k=3, pad=0, hw=(30, 9), act="none", batch=1, seed=2)         # no padding: rows overrun
@example(cin=5, cout=3, k=(3, 5), pad=(1, 2), hw=(20, 26), act="relu", batch=3, seed=3)
@example(cin=16, cout=12, k=3, pad=1, hw=(28, 28), act="residual", batch=1, seed=4)  # r0.25: 12 of 16
@example(cin=8, cout=13, k=3, pad=1, hw=(12, 12), act="relu", batch=1, seed=5)      # 13: packed rule
@given(cin=st.integers(1, 20), cout=st.integers(1, 15), k=st.sampled_from([2, 3, 5, (3, 5)]),
       pad=st.integers(0, 2), hw=st.tuples(st.integers(6, 30), st.integers(6, 30)),
       act=st.sampled_from(["none", "relu", "residual"]), batch=st.integers(1, 2), seed=st.integers(0, 2**16))
def test_conv2d_few_filters_as_pixel_vectors(host, cin, cout, k, pad, hw, act, batch, seed):
    """Stride-1 convs with too few filters for whole channel vectors (fewer than one, or a
    second at most half full): the pixel-vector rule (vectors of consecutive positions of the
    padded plane, flattened) where it takes them, and equal to PyTorch, the padded columns and
    the last tile's overrun dropped."""
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, k, 1, pad)
    module, inputs = _with_epilogue(conv, _randn(batch, cin, *hw), act)
    expected = _conv_rule(host, conv, hw)
    assert rule_of(check(module, inputs, host), "conv2d") == expected


@pytest.mark.parametrize("lanes, pixels", [
    (4, [1, 2, 3, 5, 6]),                                   # NEON
    (8, [1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12]),              # AVX2: 13-15 would be padded less
    (16, [*range(1, 16), *range(17, 25)]),                  # AVX-512
])
def test_few_filters_take_pixel_vectors(avx2, lanes, pixels):
    """Pixel vectors for fewer filters than a vector, or one vector and a second at most half
    full (the packed conv would pad a quarter or more of its work); whole vectors and fuller
    second vectors stay packed. On AVX2 the MNIST example's r0.75 and r0.25 convs (16->4 and
    16->12 at 28x28) are pixel convs, a 13-filter one is not."""
    from legoc.targets.schedules.pixel_conv import few_filters

    assert [f for f in range(1, 3 * lanes) if few_filters(f, lanes)] == pixels
    for cout, rule in ((4, "Conv2dPixels"), (12, "Conv2dPixels"), (13, "Conv2dNCHWPacked"),
                       (16, "Conv2dNCHWPacked")):
        assert _conv_rule(avx2, nn.Conv2d(16, cout, 3, 1, 1), (28, 28)) == rule


@settings(max_examples=10, deadline=None, derandomize=True,
          phases=[Phase.explicit, Phase.generate], suppress_health_check=[HealthCheck.too_slow])
@example(cin=24, cout=144, hw=(28, 28), act="relu6", seed=1)   # MobileNetV2's expansion
@example(cin=13, cout=36, hw=(8, 8), act="residual", seed=2)   # odd input channels
@example(cin=9, cout=37, hw=(4, 16), act="none", seed=3)       # prime filters: packed rule
@given(cin=st.integers(1, 40), cout=st.integers(1, 72),
       hw=st.sampled_from([(8, 8), (4, 16), (16, 5), (12, 12), (2, 40), (28, 28), (7, 7), (6, 6)]),
       act=st.sampled_from(["none", "relu6", "residual", "nobias"]), seed=st.integers(0, 2**16))
def test_conv2d_pointwise(host, cin, cout, hw, act, seed):
    """1x1 stride-1 convs, odd channel counts included: the pixel-vector rule takes the convs
    ``pointwise_tile`` accepts (unpadded: no channel slice) and those it accepts once their
    channels are padded for the packed rule (1-7 filters); the packed rule takes the rest."""
    from legoc.targets.schedules import pointwise_tile, vector_lanes, vector_registers
    from legoc.targets.schedules.isa import padded_channels

    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, 1, bias=act != "nobias")
    x = _randn(1, cin, *hw)
    if act == "relu6":
        module, inputs = nn.Sequential(conv, nn.ReLU6()), (x,)
    elif act == "residual":
        module, inputs = Fn(lambda a, r: conv(a) + r), (x, _randn(1, cout, *hw))
    else:
        module, inputs = conv, (x,)
    used = check(module, inputs, host)
    lanes, regs = vector_lanes(host), vector_registers(host)
    takes = pointwise_tile(cout, hw[0] * hw[1], lanes, regs)
    padded = padded_channels(cout, lanes, hw[1], regs)[0]
    expected = takes or pointwise_tile(padded, hw[0] * hw[1], lanes, regs)
    assert rule_of(used, "conv2d") == ("Conv2dPointwise" if expected else "Conv2dNCHWPacked")
    if takes:
        assert not any("strided_slice" in name for name in used), used


@pytest.mark.parametrize("stride,act", [(2, "relu6"), (2, "relu"), (1, "relu6")])
def test_expansion_runs_in_l2_sized_channel_groups(host, monkeypatch, tmp_path, stride, act):
    """An expansion (1x1 conv + BN + activation) feeding a strided depthwise conv, whose
    activations exceed GROUP_BYTES, runs as channel groups joined by a concat (at stride 1 it
    stays whole); outputs equal PyTorch, in the scheduling pipeline and in a prepacked build."""
    import tvm

    from legoc.targets.build import build_module
    from legoc.targets.schedules import split_expand
    from legoc.targets.table import get_target

    monkeypatch.setattr(split_expand, "SPLIT_BYTES", 48 * 16 * 16 * 4)   # 48 channels at 16x16
    monkeypatch.setattr(split_expand, "GROUP_BYTES", 24 * 16 * 16 * 4)
    torch.manual_seed(stride)
    layer = nn.ReLU6 if act == "relu6" else nn.ReLU
    model = nn.Sequential(nn.Conv2d(12, 72, 1), nn.BatchNorm2d(72), layer(),
                          nn.Conv2d(72, 72, 3, stride, 1, groups=72), nn.BatchNorm2d(72), layer()).eval()
    for bn in (model[1], model[4]):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    x = _randn(1, 12, 16, 16)
    from legoc.passes.fold import fold_batchnorm

    used = check(fold_batchnorm(model), (x,), host)
    assert any("concatenate" in name for name in used) == (stride > 1), used
    assert any(rule == "Conv2dPointwise" for rule in used.values()), used
    built = build_module(model, (x,), get_target("host"), tmp_path / "m.so", prepack=True)
    vm = tvm.runtime.vm.VirtualMachine(tvm.runtime.load_module(str(built.path)), tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(a) for a in [x.numpy(), *built.params]]).numpy()
    with torch.no_grad():
        ref = model(x).numpy()
    assert float(np.abs(out - ref).max()) <= RTOL * float(np.abs(ref).max())


@pytest.mark.parametrize("cin,cout,hw,stride", [
    (16, 32, (28, 28), 2),    # 14x14 out: subsampled, and the stride-1 conv is Conv2dPointwise's
    (12, 24, (29, 31), 2),    # odd sides: the last row and column are kept
    (8, 16, (30, 45), (2, 3)),
    (16, 32, (13, 13), 2),    # 7x7 out: below MIN_PLANE, left strided
])
def test_strided_pointwise_conv_is_subsampled(host, tmp_path, cin, cout, hw, stride):
    """A 1x1 strided conv (+ bias, + a residual as in ResNet's downsample) runs as a subsampling
    copy and the conv at stride 1 when its output plane has at least MIN_PLANE pixels; outputs
    equal PyTorch in the scheduling pipeline and in a prepacked build."""
    import tvm

    from legoc.targets.build import build_module
    from legoc.targets.schedules.subsample import MIN_PLANE
    from legoc.targets.table import get_target

    torch.manual_seed(cin)

    class Down(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(cin, cout, 1, stride)

        def forward(self, x, r):
            return torch.relu(self.conv(x) + r)

    model = Down().eval()
    x = _randn(1, cin, *hw)
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    out_hw = ((hw[0] - 1) // sh + 1, (hw[1] - 1) // sw + 1)
    r = _randn(1, cout, *out_hw)
    used = check(model, (x, r), host)
    assert any("strided_slice" in name for name in used) == (out_hw[0] * out_hw[1] >= MIN_PLANE), used
    built = build_module(model, (x, r), get_target("host"), tmp_path / "m.so", prepack=True)
    vm = tvm.runtime.vm.VirtualMachine(tvm.runtime.load_module(str(built.path)), tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(a) for a in [x.numpy(), r.numpy(), *built.params]]).numpy()
    with torch.no_grad():
        ref = model(x, r).numpy()
    assert float(np.abs(out - ref).max()) <= RTOL * float(np.abs(ref).max())


def test_group_channels_divide_and_fit():
    from legoc.targets.schedules.split_expand import (GROUP_BYTES, GROUP_CHANNELS, SPLIT_BYTES,
                                                      group_channels)

    assert group_channels(96, 112 * 112) == 24    # MobileNetV2's first expansion: 4 groups
    assert group_channels(144, 56 * 56) == 0      # 1.8 MB: whole
    for channels in range(8, 400, 8):
        for plane in (49, 196, 784, 3136, 12544, 50176):
            g = group_channels(channels, plane)
            if channels * plane * 4 <= SPLIT_BYTES:
                assert g == 0
            elif g:
                assert channels % g == 0 and g % GROUP_CHANNELS == 0 and g < channels
                assert g * plane * 4 <= GROUP_BYTES or g == GROUP_CHANNELS


def test_pointwise_tile_fits_the_registers():
    """Every tile leaves registers for its input vectors and a broadcast, has at least 8
    accumulators, and divides the channels and the plane's vectors."""
    from legoc.targets.schedules import pointwise_tile
    from legoc.targets.schedules.isa import STACK_BYTES

    for lanes, regs in ((16, 32), (8, 16), (4, 32)):
        for channels in range(1, 130):
            for plane in (lanes * 4, 49 * lanes, 196, 784, 3136, 12544):
                tile = pointwise_tile(channels, plane, lanes, regs)
                if tile is None:
                    continue
                fc, xv = tile
                assert plane % (lanes * xv) == 0 and channels % fc == 0
                assert 8 <= fc * xv and fc * xv + xv + 2 <= regs, (lanes, regs, channels, plane, tile)
                assert fc * xv * lanes * 4 < STACK_BYTES   # the accumulators' cache is on the stack
    # AVX-512: at most 15 accumulators (960 B); 24 (1536 B) came from TVM's workspace pool per tile
    assert pointwise_tile(144, 3136, 16, 32) == (3, 4)
    assert pointwise_tile(96, 196, 16, 32) is None  # 14x14: not whole 16-lane vectors
    assert pointwise_tile(192, 784, 16, 32) == (12, 1)   # x86: weights are broadcast operands
    assert pointwise_tile(144, 3136, 8, 16) == (6, 2)    # AVX2: 12 accumulators, as before
    assert pointwise_tile(576, 196, 4, 32) == (3, 7)     # NEON: a load per weight, fewest loads


@CASES
@given(c=st.integers(1, 40), mult=st.sampled_from([1, 2]), k=st.sampled_from([3, 5]),
       stride=st.sampled_from([1, 2]), hw=st.integers(5, 16), seed=st.integers(0, 2**16))
def test_conv2d_depthwise(host, c, mult, k, stride, hw, seed):
    torch.manual_seed(seed)
    conv = nn.Conv2d(c, c * mult, k, stride, k // 2, groups=c)
    # one channel: groups=1, a plain conv; a channel multiplier of 2: the generic reduction rule
    want = _conv_rule(host, conv, (hw, hw)) if c == 1 else "DepthwiseConv2d" if mult == 1 else "ReductionVectorized"
    assert rule_of(check(conv, (_randn(1, c, hw, hw),), host), "conv2d") == want


@CASES
@given(c=st.integers(2, 37), stride=st.sampled_from([1, 2]), pad=st.integers(0, 2), dil=st.sampled_from([1, 2]),
       h=st.integers(5, 19), w=st.integers(5, 130), seed=st.integers(0, 2**16))
def test_depthwise_with_epilogue_odd_shapes(host, c, stride, pad, dil, h, w, seed):
    """DepthwiseConv2d (MobileNet's conv-BN-ReLU6) on odd channel counts, odd and even widths,
    rows longer than the register chunk (split, or the generic rule when no divisor fits),
    stride 2 (deinterleaved columns), dilation, no padding."""
    torch.manual_seed(seed)
    conv = nn.Conv2d(c, c, 3, stride, pad, dilation=dil, groups=c, bias=True)
    module = nn.Sequential(conv, nn.ReLU6())
    assert rule_of(check(module, (_randn(1, c, h, w),), host), "conv2d") in ("DepthwiseConv2d", "ReductionVectorized")
    if w <= 32:   # a row of at most 32 outputs fits the register chunk on any x86 or NEON CPU
        assert rule_of(check(module, (_randn(1, c, h, w),), host), "conv2d") == "DepthwiseConv2d"


def test_depthwise_rule_builds_for_aarch64():
    """The depthwise rule also schedules for a NEON target (4 lanes, 32 registers)."""
    import tvm

    from legoc.targets.schedules import cpu_pass_context, cpu_pipeline, scheduled_by, scheduling_passes
    from legoc.targets.table import get_target

    torch.manual_seed(0)
    target = get_target("raspberry-pi-4").tvm_target()
    mod, _ = _relax(nn.Sequential(nn.Conv2d(24, 24, 3, 2, 1, groups=24), nn.ReLU6()), (_randn(1, 24, 30, 30),))
    with target:
        scheduled = tvm.transform.Sequential(scheduling_passes(target, strict=True))(mod)
    assert "DepthwiseConv2d" in scheduled_by(scheduled).values()
    with cpu_pass_context():   # as targets/build.py builds
        executable = tvm.compile(mod, target=target, relax_pipeline=cpu_pipeline(target))
    asm = "\n".join(m.inspect_source("asm") for m in executable.mod.imports)
    assert "fmla" in asm and ".4s" in asm


@pytest.mark.parametrize("layer", ["depthwise 7x7", "pointwise 24->144 56x56"])
@pytest.mark.parametrize("target_name", ["host", "raspberry-pi-4"])
def test_small_scratch_buffers_live_on_the_stack(target_name, layer):
    """Per-channel and per-tile scratch (a 7x7 depthwise layer's padded plane and accumulators;
    Conv2dPointwise's register tile) is on the stack, not taken from TVM's workspace pool once
    per channel or tile. TVM 0.27 keeps an allocation on the stack only when it is under 1 KB
    and in the "global" scope: so the rules' accumulator caches are "global" and AVX-512 tiles
    hold at most 15 accumulators (with "local" caches the 960-channel 7x7 layer ran 1.5x slower,
    and with 24 accumulators from the pool MobileNetV2's shallow 1x1 convs 1.3-1.5x slower)."""
    import tvm

    from legoc.targets.schedules import cpu_pass_context, cpu_pipeline
    from legoc.targets.table import get_target

    target = get_target(target_name).tvm_target()
    if layer.startswith("depthwise"):
        module, x = nn.Sequential(nn.Conv2d(96, 96, 3, 1, 1, groups=96), nn.ReLU6()), _randn(1, 96, 7, 7)
    else:
        module, x = nn.Sequential(nn.Conv2d(24, 144, 1), nn.ReLU6()), _randn(1, 24, 56, 56)
    mod, _ = _relax(module, (x,))
    with target:
        with cpu_pass_context():   # as targets/build.py builds
            executable = tvm.compile(mod, target=target, relax_pipeline=cpu_pipeline(target))
    ir = "\n".join(m.inspect_source("ll") for m in executable.mod.imports)
    loads = [line for line in ir.splitlines() if "@__TVMBackendAllocWorkspace" in line and "load" in line]
    assert not loads, loads


def test_stride2_plane_split_is_vectorized_by_shuffles(host):
    """At stride 2 the depthwise and pool rules store a padded plane's even and odd columns apart;
    that copy is whole-vector loads and shuffles, not one insert per element (TVM's vectorizer
    loads a stride-2 ramp lane by lane: a max pool's copy then took most of its time)."""
    import platform

    import tvm

    from legoc.targets.schedules import cpu_pass_context, cpu_pipeline

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86 instruction names")
    for module in (nn.Sequential(nn.Conv2d(24, 24, 3, 2, 1, groups=24), nn.ReLU6()), nn.MaxPool2d(3, 2, 1)):
        mod, _ = _relax(module, (_randn(1, 24, 56, 56),))
        with host:
            with cpu_pass_context():   # as targets/build.py builds
                executable = tvm.compile(mod, target=host, relax_pipeline=cpu_pipeline(host))
        asm = "\n".join(m.inspect_source("asm") for m in executable.mod.imports)
        shuffles = sum(asm.count(op) for op in ("vpermt2ps", "vpermi2ps", "vshufps", "vpermps", "vpermpd"))
        # AVX-512: none; AVX2 (znver3): one vinsertps per 8-float vector, for the last element
        # of a 7-element tail load, beside a shuffle and a permute (the lane-by-lane form had 7+)
        assert "vscatter" not in asm and shuffles
        assert asm.count("vinsertps") <= shuffles, (asm.count("vinsertps"), shuffles)


def test_vector_width_from_cpu_features():
    """Lanes and registers from the CPU's features, not TVM 0.27's llvm_get_vector_width (512 for
    every x86 CPU): AVX2-only CPUs get 8 lanes and 16 registers."""
    import tvm

    from legoc.targets.schedules import vector_isa as _isa

    def isa(mcpu, triple="x86_64-linux-gnu"):
        return _isa(tvm.target.Target({"kind": "llvm", "mtriple": triple, "mcpu": mcpu}))

    assert isa("znver3") == (8, 16) and isa("haswell") == (8, 16)
    assert isa("skylake-avx512") == (16, 32) and isa("znver4") == (16, 32)
    assert isa("cortex-a72", "aarch64-linux-gnu") == (4, 32)


@CASES
@given(groups=st.sampled_from([2, 4]), cpg=st.integers(1, 8), opg=st.integers(1, 8),
       stride=st.sampled_from([1, 2]), seed=st.integers(0, 2**16))
def test_conv2d_grouped(host, groups, cpg, opg, stride, seed):
    torch.manual_seed(seed)
    conv = nn.Sequential(nn.Conv2d(groups * cpg, groups * opg, 3, stride, 1, groups=groups),
                         nn.ReLU())
    used = check(conv, (_randn(1, groups * cpg, 10, 12),), host)
    # one input and one output channel per group is a depthwise conv
    want = "DepthwiseConv2d" if cpg == opg == 1 else "ReductionVectorized"
    assert rule_of(used, "conv2d") == want


# ---------------------------------------------------------------------------------------------
# dense, pooling, reductions, elementwise


@CASES
@given(batch=st.integers(1, 3), fin=st.integers(1, 80), fout=st.integers(1, 130),
       seed=st.integers(0, 2**16))
def test_dense(host, batch, fin, fout, seed):
    torch.manual_seed(seed)
    used = check(nn.Linear(fin, fout), (_randn(batch, fin),), host)
    assert rule_of(used, "matmul") == "ReductionVectorized"


@settings(max_examples=6, deadline=None, derandomize=True,
          phases=[Phase.explicit, Phase.generate], suppress_health_check=[HealthCheck.too_slow])
@example(kind="max", k=3, stride=2, pad=1, c=5, hw=40, seed=0)   # ResNet's stem pool, smaller
@example(kind="avg", k=3, stride=2, pad=1, c=3, hw=24, seed=1)
@given(kind=st.sampled_from(["max", "avg"]), k=st.sampled_from([2, 3]),
       stride=st.sampled_from([1, 2]), pad=st.integers(0, 1), c=st.integers(1, 20),
       hw=st.integers(4, 15), seed=st.integers(0, 2**16))
def test_pool2d(host, kind, k, stride, pad, c, hw, seed):
    torch.manual_seed(seed)
    pool = nn.MaxPool2d(k, stride, pad) if kind == "max" else nn.AvgPool2d(k, stride, pad)
    used = check(pool, (_randn(1, c, hw, hw),), host)
    assert rule_of(used, "pool2d") == ("MaxPool2dRows" if kind == "max" else "Pool2d")


@settings(max_examples=8, deadline=None, derandomize=True,
          phases=[Phase.explicit, Phase.generate], suppress_health_check=[HealthCheck.too_slow])
@example(kh=3, kw=3, sh=2, sw=2, c=64, h=28, w=28, seed=0)   # ResNet's stem pool on a 56x56 map
@example(kh=3, kw=3, sh=2, sw=2, c=1, h=9, w=301, seed=1)    # a row of 151: 18 vectors and a tail
@example(kh=2, kw=2, sh=2, sw=2, c=3, h=8, w=8, seed=2)      # VGG's, no padding
@given(kh=st.integers(1, 5), kw=st.integers(1, 5), sh=st.integers(1, 3), sw=st.integers(1, 2),
       c=st.integers(1, 9), h=st.integers(5, 20), w=st.integers(5, 40), seed=st.integers(0, 2**16))
def test_max_pool_by_rows(host, kh, kw, sh, sw, c, h, w, seed):
    """MaxPoolByRows + MaxPool2dRows: any kernel, row stride, column stride 1 or 2 and pads up to
    half the kernel (PyTorch's limit) equal PyTorch, the edges clamped instead of padded."""
    torch.manual_seed(seed)
    pool = nn.MaxPool2d((kh, kw), (sh, sw), (kh // 2, kw // 2))
    assert rule_of(check(pool, (_randn(1, c, h, w),), host), "pool2d") == "MaxPool2dRows"


def test_max_pool_by_rows_leaves_what_it_cannot_clamp(host):
    """A pool with dilation or ceil mode (a window may then hold no input, or the clamp may skip
    a value) or a column stride of 3 stays with Pool2d, and still equals PyTorch."""
    torch.manual_seed(0)
    for pool in (nn.MaxPool2d(3, 2, 1, dilation=2), nn.MaxPool2d(3, 2, 1, ceil_mode=True), nn.MaxPool2d(3, 3)):
        assert rule_of(check(pool, (_randn(1, 4, 14, 14),), host), "pool2d") == "Pool2d"


@CASES
@given(c=st.integers(1, 70), hw=st.integers(1, 9),
       op=st.sampled_from(["adaptive", "mean23", "sum1", "sum3k"]), seed=st.integers(0, 2**16))
def test_reductions(host, c, hw, op, seed):
    torch.manual_seed(seed)
    fn = {"adaptive": nn.AdaptiveAvgPool2d(1),
          "mean23": Fn(lambda x: x.mean(dim=(2, 3))),
          "sum1": Fn(lambda x: x.sum(dim=1)),
          "sum3k": Fn(lambda x: x.sum(dim=3, keepdim=True))}[op]
    used = check(fn, (_randn(2, c, hw, hw),), host)
    assert set(used.values()) <= {"ReductionVectorized", "Injective"}
    assert "ReductionVectorized" in used.values()


@CASES
@given(shape=st.lists(st.integers(1, 19), min_size=1, max_size=4),
       op=st.sampled_from(["sigmoid_mul", "hardswish", "add_bcast", "relu6"]),
       seed=st.integers(0, 2**16))
def test_elementwise(host, shape, op, seed):
    torch.manual_seed(seed)
    fn = {"sigmoid_mul": lambda x: torch.sigmoid(x) * x + 1,
          "hardswish": F.hardswish,
          "add_bcast": lambda x: x + x.sum(dim=-1, keepdim=True).detach() * 0 + 0.5,
          "relu6": F.relu6}[op]
    used = check(Fn(fn), (_randn(*shape),), host)
    assert used and all(rule for rule in used.values())


@pytest.mark.parametrize("act", [nn.Hardswish(), nn.SiLU(), nn.GELU()], ids=["hardswish", "silu", "gelu"])
def test_conv2d_with_an_epilogue_that_reads_the_conv_twice(host, act):
    """x * f(x) after a conv (hardswish in MobileNetV3): the conv output feeds two epilogue blocks,
    so it must not be inlined away (TVM 0.27's reverse_compute_inline allows it and the build
    then fails on a buffer read before its definition)."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), act)
    assert rule_of(check(module, (_randn(1, 3, 32, 32),), host), "conv2d") == "Conv2dNCHWPacked"


def test_whole_residual_block_uses_packed_conv(host):
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(16, 16, 3, 1, 1), nn.Conv2d(16, 16, 3, 1, 1)
            self.fc = nn.Linear(16, 10)

        def forward(self, x):
            y = torch.relu(self.c2(torch.relu(self.c1(x))) + x)
            y = F.max_pool2d(y, 3, 2, 1)
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))

    used = check(Block(), (_randn(1, 16, 14, 14),), host)
    assert rule_of(used, "conv2d") == "Conv2dNCHWPacked"


# ---------------------------------------------------------------------------------------------
# fallback and safety


def test_softmax_gets_a_rule_or_stays_correct(host):
    torch.manual_seed(0)
    used = check(nn.Softmax(dim=1), (_randn(2, 100),), host)
    assert rule_of(used, "softmax") in ("Fallback", "ReductionVectorized", "")


def test_raising_rule_falls_back_to_the_next(host):
    from legoc.targets.schedules import CPURule as _CPURule
    from legoc.targets.schedules import Injective

    class Broken(_CPURule):
        def schedule(self, sch, target):
            raise RuntimeError("broken rule")

    module = Fn(lambda x: torch.sigmoid(x) * 2)
    used = check(module, (_randn(3, 33),), host, rules=[Broken(), Injective()], strict=False)
    assert set(used.values()) == {"Injective"}
    with pytest.raises(RuntimeError, match="broken rule"):
        check(module, (_randn(3, 33),), host, rules=[Broken()], strict=True)


def test_no_rule_leaves_the_function_unscheduled_and_correct(host):
    torch.manual_seed(0)
    used = check(nn.Conv2d(3, 8, 3, 1, 1), (_randn(1, 3, 7, 7),), host, rules=[])
    assert set(used.values()) == {""}


def test_rules_build_for_aarch64_with_neon():
    """The same rules cross-compile for a Raspberry Pi 4 (cortex-a72) and vectorize with NEON."""
    import tvm

    from legoc.targets.schedules import cpu_pass_context, cpu_pipeline, scheduled_by, scheduling_passes
    from legoc.targets.table import get_target

    torch.manual_seed(0)
    target = get_target("raspberry-pi-4").tvm_target()
    model = nn.Sequential(nn.Conv2d(8, 16, 3, 1, 1), nn.ReLU(), nn.Conv2d(16, 24, 1),
                          nn.Conv2d(24, 3, 3, 1, 1), nn.MaxPool2d(3, 2, 1), nn.AvgPool2d(2))
    mod, _ = _relax(model, (_randn(1, 8, 12, 12),))
    with target:
        rules = set(scheduled_by(tvm.transform.Sequential(
            scheduling_passes(target, strict=True))(mod)).values())
    assert {"Conv2dNCHWPacked", "Conv2dPointwise", "Conv2dPixels", "MaxPool2dRows", "Pool2d"} <= rules, rules
    with cpu_pass_context():   # as targets/build.py builds
        executable = tvm.compile(mod, target=target, relax_pipeline=cpu_pipeline(target))
    asm = "\n".join(m.inspect_source("asm") for m in executable.mod.imports)
    assert "fmla" in asm and ".4s" in asm, "no NEON fused multiply-add in the aarch64 assembly"


def test_prepacked_weights_match_pytorch(tmp_path):
    """build_module(prepack=True): conv weights packed and FC weights transposed at build time;
    the module takes those transformed weights and still equals PyTorch (odd channel counts
    included: the packed conv pads output channels to the vector width)."""
    import tvm

    from legoc.targets.build import build_module
    from legoc.targets.table import get_target

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 37, 3, 2, 1), nn.ReLU(), nn.Conv2d(37, 32, 1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
    x = _randn(1, 3, 13, 11)
    built = build_module(model, (x,), get_target("host"), tmp_path / "m.so", prepack=True)
    shapes = [p.shape for p in built.params]
    assert any(len(s) == 5 for s in shapes), shapes  # [O/B, I, KH, KW, B]
    assert (32, 10) in shapes  # the FC weight, transposed once
    vm = tvm.runtime.vm.VirtualMachine(tvm.runtime.load_module(str(built.path)), tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(a) for a in [x.numpy(), *built.params]]).numpy()
    with torch.no_grad():
        ref = model(x).numpy()
    assert float(np.abs(out - ref).max()) <= RTOL * float(np.abs(ref).max())


def test_prepacked_pixel_conv_matches_pytorch(tmp_path):
    """build_module(prepack=True): a 3x3 conv with 4 filters on a 28x28 map runs as the pixel
    conv, its weights as they are (OIHW, nothing to pack), beside packed convs, and the
    module equals PyTorch."""
    import tvm

    from legoc.targets.build import build_module
    from legoc.targets.table import get_target

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 4, 3, 1, 1), nn.ReLU(), nn.Conv2d(4, 16, 3, 1, 1), nn.ReLU(),
                          nn.Conv2d(16, 5, 5, 1, 2)).eval()
    x = _randn(1, 16, 28, 28)
    built = build_module(model, (x,), get_target("host"), tmp_path / "pix.so", prepack=True)
    shapes = [tuple(p.shape) for p in built.params]
    assert (4, 16, 3, 3) in shapes and (5, 16, 5, 5) in shapes, shapes   # pixel convs: OIHW
    assert any(len(s) == 5 for s in shapes), shapes                        # 4 -> 16: packed
    vm = tvm.runtime.vm.VirtualMachine(tvm.runtime.load_module(str(built.path)), tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(a) for a in [x.numpy(), *built.params]]).numpy()
    with torch.no_grad():
        ref = model(x).numpy()
    assert float(np.abs(out - ref).max()) <= RTOL * float(np.abs(ref).max())


def test_prepacked_flat_tiles_match_pytorch(tmp_path):
    """build_module(prepack=True) for an AVX2 CPU packs a 14x14 conv's weights for the flat
    2 x 6 tile (blocks of 16 filters, not the row tile's 8), keeps the row tile where the
    reduction is short, and equals PyTorch."""
    import tvm

    from legoc.targets.build import build_module
    from legoc.targets.table import get_target, target_from_dict

    host = get_target("host")
    avx2 = target_from_dict({**host.to_json(), "name": "host",
                             "target": {**host.target, "mcpu": "haswell"}}, check_here=False)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 32, 3, 1, 1), nn.ReLU(), nn.Conv2d(32, 32, 3, 2, 1),
                          nn.ReLU(), nn.Conv2d(32, 6, 1), nn.Conv2d(6, 32, 3, 1, 1)).eval()
    x = _randn(2, 8, 14, 14)
    built = build_module(model, (x,), avx2, tmp_path / "flat.so", prepack=True)
    assert [tuple(p.shape) for p in built.params if len(p.shape) == 5] == \
        [(2, 8, 3, 3, 16), (2, 32, 3, 3, 16), (1, 32, 1, 1, 8), (4, 6, 3, 3, 8)]
    # 2 x 6 at 14x14 and 2 x 5 at 7x7 (flat); 6 filters in one 8-lane vector; the row tile
    # 1 x 7 for the last conv, whose reduction is 54 steps
    vm = tvm.runtime.vm.VirtualMachine(tvm.runtime.load_module(str(built.path)), tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(a) for a in [x.numpy(), *built.params]]).numpy()
    with torch.no_grad():
        ref = model(x).numpy()
    assert float(np.abs(out - ref).max()) <= RTOL * float(np.abs(ref).max())


# ---------------------------------------------------------------------------------------------
# tuning (the tuning itself takes minutes here: benchmarks/inference.py --tune-trials N runs it)


def test_tuning_database_is_per_cpu(monkeypatch, tmp_path):
    from legoc.targets.table import get_target, target_from_dict
    from legoc.targets.tune import database_dir

    monkeypatch.setenv("LEGOC_CACHE", str(tmp_path))
    host = get_target("host")
    other = target_from_dict({**host.to_json(), "name": "host",
                              "target": {**host.target, "mcpu": "x86-64"}}, check_here=False)
    assert database_dir(host).parent == tmp_path / "tune"
    assert database_dir(host) == database_dir(get_target("host"))
    assert database_dir(host) != database_dir(other)


def test_tuning_a_board_without_a_runner_is_a_user_error():
    import tvm

    from legoc.errors import UserError
    from legoc.targets.table import get_target
    from legoc.targets.tune import tune_module

    with pytest.raises(UserError, match="raspberry-pi-4 does not run on this machine"):
        tune_module(tvm.IRModule(), get_target("raspberry-pi-4"), 8)
    with pytest.raises(UserError, match="--tune-trials must be 1 or more"):
        tune_module(tvm.IRModule(), get_target("host"), 0)


@CASES
@given(hw=st.integers(1, 3), k=st.sampled_from([3, 5]), stride=st.sampled_from([1, 2]),
       pad=st.integers(0, 2), dil=st.sampled_from([1, 2]), seed=st.integers(0, 2**16))
def test_prepacked_tiny_maps_drop_dead_taps(tmp_path_factory, hw, k, stride, pad, dil, seed):
    """Kernel taps that only meet padding (tiny feature maps) are cropped before packing."""
    import tvm

    from legoc.targets.build import build_module
    from legoc.targets.table import get_target

    torch.manual_seed(seed)
    size = max(hw, (k - 1) * dil + 1 - 2 * pad)
    model = nn.Sequential(nn.Conv2d(8, 16, k, stride, pad, dilation=dil), nn.ReLU()).eval()
    x = _randn(1, 8, size, size)
    built = build_module(model, (x,), get_target("host"),
                         tmp_path_factory.mktemp("taps") / "m.so", prepack=True)
    vm = tvm.runtime.vm.VirtualMachine(tvm.runtime.load_module(str(built.path)), tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(a) for a in [x.numpy(), *built.params]]).numpy()
    with torch.no_grad():
        ref = model(x).numpy()
    assert out.shape == ref.shape
    assert float(np.abs(out - ref).max()) <= RTOL * max(float(np.abs(ref).max()), 1e-6)


def _prepacked_rules(module: nn.Module, inputs: tuple, target) -> dict[str, str]:
    """PrimFunc -> rule of ``module`` prepared as build_module(prepack=True) prepares it (weights
    transformed by prepack_weights), scheduled in strict mode."""
    import tvm

    from legoc.targets.schedules import prepack_weights, scheduled_by, scheduling_passes

    mod, _ = _relax(module, inputs)
    mod["main"] = mod["main"].with_attr("num_input", len(inputs))
    mod = prepack_weights(mod, target)
    with target:
        return scheduled_by(tvm.transform.Sequential(scheduling_passes(target, strict=True))(mod))


def _prepacked_error(module: nn.Module, inputs: tuple, path) -> float:
    """Max |legoc - PyTorch| over the output's largest magnitude, built with prepack=True."""
    import tvm

    from legoc.targets.build import build_module
    from legoc.targets.table import get_target

    built = build_module(module, inputs, get_target("host"), path, prepack=True)
    vm = tvm.runtime.vm.VirtualMachine(tvm.runtime.load_module(str(built.path)), tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(np.ascontiguousarray(a))
                       for a in [*(x.numpy() for x in inputs), *built.params]]).numpy()
    with torch.no_grad():
        ref = module(*inputs).numpy()
    assert out.shape == ref.shape
    return float(np.abs(out - ref).max()) / max(float(np.abs(ref).max()), 1e-6)


@CASES
@given(cin=st.integers(16, 40), cout=st.sampled_from([16, 32, 48]),
       hw=st.tuples(st.sampled_from([4, 6, 8, 14, 28]), st.sampled_from([4, 8, 10, 16, 28])),
       batch=st.integers(1, 2), bias=st.booleans(), act=st.sampled_from(["none", "relu", "residual"]),
       seed=st.integers(0, 2**16))
@example(cin=64, cout=64, hw=(56, 56), batch=1, bias=True, act="residual", seed=0)  # ResNet-18's layer1
@example(cin=128, cout=128, hw=(28, 28), batch=1, bias=True, act="relu", seed=1)  # 2.4 MB: by groups
@example(cin=256, cout=256, hw=(14, 14), batch=1, bias=True, act="residual", seed=2)  # F(2x2, 3x3), groups
def test_conv2d_winograd(host, tmp_path_factory, cin, cout, hw, batch, bias, act, seed):
    """A 3x3 stride-1 padding-1 conv (odd input channel counts, non-square maps, sides multiples
    of 4 (F(4x4, 3x3)) or only of 2 (F(2x2, 3x3)), batch 2, with and without bias, ReLU and a
    residual add, filters small enough to run by rows of tiles or not) runs as Winograd in a
    prepacked build (Conv2dWinograd schedules it, its epilogue fused) and equals PyTorch to
    1e-4 of the output's largest magnitude."""
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, 3, 1, 1, bias=bias)
    module, inputs = _with_epilogue(conv, _randn(batch, cin, *hw), act)
    module.eval()
    rules = _prepacked_rules(module, inputs, host)
    assert rule_of(rules, "conv2d_winograd") == "Conv2dWinograd", rules
    # the epilogue runs in the Winograd PrimFunc (FuseOps, op_pattern 4), not in one of its own
    assert not [n for n in rules if "winograd" not in n and ("relu" in n or "add" in n)], rules
    err = _prepacked_error(module, inputs, tmp_path_factory.mktemp("wino") / "w.so")
    assert err <= RTOL, f"relative error {err:.2e}"


@pytest.mark.parametrize("cin,cout,hw,kwargs,taken", [
    (64, 64, (56, 56), {}, True),
    (16, 16, (8, 12), {}, True),
    (15, 64, (28, 28), {}, False),                  # too few input channels
    (64, 24, (28, 28), {}, False),                  # output channels not whole vectors
    (64, 64, (14, 14), {}, True),                   # F(2x2, 3x3)
    (64, 64, (7, 7), {}, False),                    # odd sides: no whole tiles
    (64, 64, (28, 14), {}, True),
    (64, 64, (28, 28), {"stride": 2}, False),
    (64, 64, (28, 28), {"dilation": 2, "padding": 2}, False),
    (64, 64, (28, 28), {"padding": 0}, False),      # output smaller than the input
    (64, 64, (28, 28), {"groups": 2}, False),
    (64, 64, (28, 28), {"kernel_size": 5, "padding": 2}, False),
    (128, 128, (8, 8), {}, True),                   # 2.4 MB of filters over 4 tiles
    (256, 256, (8, 8), {}, False),                  # 9.4 MB over 4: above 1 MB a tile
    (256, 256, (16, 16), {}, True),
])
def test_which_convs_take_winograd(host, cin, cout, hw, kwargs, taken):
    """takes_winograd: 3x3, stride 1, dilation 1, padding 1, groups 1, whole 4x4 or 2x2 tiles
    and channel vectors, at least 16 channels in and out, at most 1 MB of transformed filters
    per tile."""
    from tvm import relax

    from legoc.targets.schedules import takes_winograd, vector_lanes

    args = {"kernel_size": 3, "stride": 1, "padding": 1, **kwargs}
    conv = nn.Conv2d(cin, cout, **args)
    mod, _ = _relax(conv, (_randn(1, cin, *hw),))
    calls = []
    relax.analysis.post_order_visit(mod["main"].body, lambda e: calls.append(e) if isinstance(
        e, relax.Call) and getattr(e.op, "name", "") == "relax.nn.conv2d" else None)
    assert len(calls) == 1
    assert takes_winograd(calls[0], vector_lanes(host)) == taken


def test_winograd_builds_for_aarch64_with_neon():
    """For the Raspberry Pi 4 (4-lane NEON) a 3x3 conv of 32 channels at 16x16 runs as
    Winograd, filters packed for 4 lanes, and compiles to fused multiply-adds."""
    import tvm

    from legoc.targets.schedules import (TRANSFORM_PARAMS, cpu_pass_context, cpu_pipeline, prepack_weights,
                                         scheduled_by, scheduling_passes)
    from legoc.targets.table import get_target

    torch.manual_seed(0)
    target = get_target("raspberry-pi-4").tvm_target()
    model = nn.Sequential(nn.Conv2d(32, 32, 3, 1, 1), nn.ReLU()).eval()
    mod, _ = _relax(model, (_randn(1, 32, 16, 16),))
    mod["main"] = mod["main"].with_attr("num_input", 1)
    mod = prepack_weights(mod, target)
    shapes = [tuple(int(d) for d in p.ty.shape) for p in mod["main"].params[1:]]
    assert (36, 8, 32, 4) in shapes, shapes
    with target:
        used = scheduled_by(tvm.transform.Sequential(scheduling_passes(target, strict=True))(mod))
    assert rule_of(used, "conv2d_winograd") == "Conv2dWinograd"
    mod = tvm.IRModule({gv: f for gv, f in mod.functions_items() if gv.name_hint != TRANSFORM_PARAMS})
    with cpu_pass_context():
        executable = tvm.compile(mod, target=target, relax_pipeline=cpu_pipeline(target))
    asm = "\n".join(m.inspect_source("asm") for m in executable.mod.imports)
    assert "fmla" in asm and ".4s" in asm, "no NEON fused multiply-add in the aarch64 assembly"


def test_compile_uses_winograd_unless_told_not_to(artifact):
    """legoc compile: 3x3 stride-1 convs run as Winograd by default (the manifest says so, the
    weights hold transformed filters [a * a, K/B, C, B]); CompileConfig(winograd=False)
    (--no-winograd) keeps them direct (packed [O/B, I, KH, KW, B]); both artifacts give the same
    outputs, at full size and pruned."""
    import json

    from safetensors.numpy import load_file

    from legoc.runtime import load

    def transformed(shape) -> bool:
        return len(shape) == 4 and shape[0] in (16, 36) and shape[3] in (4, 8, 16)

    reports = {flag: artifact("cifar_resnet", "host", ratios=(0.0, 0.5), winograd=flag) for flag in (True, False)}
    outs = {}
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    for flag, report in reports.items():
        manifest = json.loads((report.artifact / "manifest.json").read_text())
        assert manifest["options"]["winograd"] is flag
        shapes = [a.shape for f in (report.artifact / "weights").rglob("*.safetensors") for a in load_file(f).values()]
        assert any(transformed(s) for s in shapes) is flag, shapes
        model = load(report.artifact)
        outs[flag] = []
        for variants in ([0] * len(model.blocks), [1] * len(model.blocks)):
            model.configure(variants)
            outs[flag].append(np.asarray(model(x)))
    for a, b in zip(outs[True], outs[False]):
        assert float(np.abs(a - b).max()) <= RTOL * float(np.abs(b).max())


def test_prepacked_parameter_names_are_unique(tmp_path):
    from legoc.targets.build import build_module
    from legoc.targets.table import get_target

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1), nn.ReLU(), nn.Conv2d(16, 16, 3, 1, 1),
                          nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1)).eval()
    built = build_module(model, (_randn(1, 3, 8, 8),), get_target("host"), tmp_path / "m.so",
                         prepack=True)
    assert len(set(built.param_names)) == len(built.param_names) == len(built.params)


def test_compile_config_rejects_negative_tune_trials():
    from legoc.errors import UserError
    from legoc.pipeline import CompileConfig

    assert CompileConfig().tune_trials == 0
    with pytest.raises(UserError, match="--tune-trials must be 0 \\(no tuning\\) or more, got -1"):
        CompileConfig(tune_trials=-1)
