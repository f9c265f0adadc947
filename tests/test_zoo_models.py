"""The test zoo itself: every model runs, traces with torch.fx, exports with torch.export."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location("legoc_test_zoo", Path(__file__).with_name("zoo.py"))
zoo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(zoo)

IMG = (1, 3, 32, 32)
# name -> (input shapes, output structure: a shape, a tuple of structures or a dict of structures)
EXPECTED = {
    "vgg": ([IMG], (1, 10)),
    "resnet_basic": ([IMG], (1, 10)),
    "resnet_bottleneck": ([IMG], (1, 10)),
    "preact_resnet": ([IMG], (1, 10)),
    "resnext": ([IMG], (1, 10)),
    "mobilenetv2": ([IMG], (1, 10)),
    "mobilenetv3": ([IMG], (1, 10)),
    "densenet": ([IMG], (1, 10)),
    "inception": ([IMG], (1, 10)),
    "shufflenetv2": ([IMG], (1, 10)),
    "unet": ([IMG], (1, 1, 32, 32)),
    "detection": ([IMG], ((1, 192, 4), (1, 192, 4))),
    "two_inputs": ([IMG, IMG], (1, 10)),
    "functional": ([IMG], (1, 10)),
    "dict_output": ([IMG], {"logits": (1, 10), "features": (1, 32, 8, 8)}),
    "tuple_output": ([IMG], ((1, 10), (1, 10))),
}
DAG_CASES = [(0, 3), (1, 8), (2, 15), (3, 30), (5, 22)]
MAX_MACS = 30e6


def structure(out):
    if isinstance(out, torch.Tensor):
        return tuple(out.shape)
    if isinstance(out, dict):
        return {k: structure(v) for k, v in out.items()}
    assert isinstance(out, tuple), type(out)
    return tuple(structure(v) for v in out)


def leaves(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in leaves(v)]
    return [t for v in out for t in leaves(v)]


def assert_close(a, b, atol=1e-6):
    assert structure(a) == structure(b)
    for x, y in zip(leaves(a), leaves(b)):
        assert torch.allclose(x, y, rtol=0, atol=atol), (x - y).abs().max()


_CACHE: dict = {}


def build(name):
    """(model, inputs, eager output) per zoo entry, built once per session."""
    if name not in _CACHE:
        if isinstance(name, tuple):
            model, inputs = zoo.random_dag(*name)
        else:
            model, inputs = zoo.MODELS[name]()
        with torch.no_grad():
            out = model(*inputs)
        _CACHE[name] = (model, inputs, out)
    return _CACHE[name]


def test_zoo_names():
    assert set(zoo.MODELS) == set(EXPECTED)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_model_runs_with_expected_structure(name):
    model, inputs, out = build(name)
    in_shapes, out_structure = EXPECTED[name]
    assert not model.training
    assert [tuple(x.shape) for x in inputs] == [tuple(s) for s in in_shapes]
    assert structure(out) == out_structure
    assert all(torch.isfinite(t).all() for t in leaves(out))
    macs = zoo.count_macs(model, inputs)
    print(f"{name}: inputs {[tuple(x.shape) for x in inputs]}, {macs / 1e6:.2f} M MACs")
    assert 0 < macs <= MAX_MACS


@pytest.mark.parametrize("name", list(EXPECTED))
def test_model_is_deterministic_with_random_bn(name):
    model, inputs, out = build(name)
    model2, inputs2 = zoo.MODELS[name]()
    for x, y in zip(inputs, inputs2):
        assert torch.equal(x, y)
    sd, sd2 = model.state_dict(), model2.state_dict()
    assert sd.keys() == sd2.keys()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns, "every zoo model has BatchNorm"
    for bn in bns:
        assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
        assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))


@pytest.mark.parametrize("name", list(EXPECTED) + DAG_CASES, ids=str)
def test_fx_trace_matches(name):
    model, inputs, out = build(name)
    gm = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        traced = gm(*inputs)
    assert_close(traced, out)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert len(placeholders) == len(inputs)


@pytest.mark.parametrize("name", list(EXPECTED) + DAG_CASES, ids=str)
def test_torch_export_and_tvm_import(name):
    model, inputs, out = build(name)
    with torch.no_grad():
        ep = torch.export.export(model, inputs)
        assert_close(ep.module()(*inputs), out, atol=1e-5)
    try:
        from tvm.relax.frontend.torch import from_exported_program
    except ImportError:
        return
    mod = from_exported_program(ep, keep_params_as_input=True)
    assert "main" in [gv.name_hint for gv in mod.get_global_vars()]


@pytest.mark.parametrize("seed,n_layers", DAG_CASES)
def test_random_dag_shape_and_size(seed, n_layers):
    model, inputs, out = build((seed, n_layers))
    assert [tuple(x.shape) for x in inputs] == [(1, 3, 16, 16)]
    assert tuple(out.shape) == (1, 10)
    assert len(model.specs) == n_layers + 1  # stem + n_layers ops
    assert 0 < zoo.count_macs(model, inputs) <= MAX_MACS


def test_random_dag_is_deterministic_and_varied():
    m1, x1 = zoo.random_dag(11, 20)
    m2, x2 = zoo.random_dag(11, 20)
    assert m1.specs == m2.specs and torch.equal(x1[0], x2[0])
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    assert torch.equal(m1(*x1), m2(*x2))
    assert zoo.random_dag(12, 20)[0].specs != m1.specs
    kinds = set()
    for seed in range(12):
        model, inputs = zoo.random_dag(seed, 3 + (seed * 7) % 28)
        kinds.update(s[0] for s in model.specs)
        gm = torch.fx.symbolic_trace(model)
        with torch.no_grad():
            assert torch.equal(gm(*inputs), model(*inputs))
        # no dead code: every op result is consumed by a later op or by the head
        used = set(model.leaves)
        for s in model.specs:
            used.update(s[1] if s[0] == "cat" else s[1:3] if s[0] == "add" else s[1:2])
        assert used >= set(range(1, len(model.specs) + 1))
    assert kinds == {"conv", "relu", "add", "cat", "maxpool", "avgpool"}


@pytest.mark.parametrize("n_layers", [2, 31])
def test_random_dag_rejects_bad_sizes(n_layers):
    with pytest.raises(ValueError):
        zoo.random_dag(0, n_layers)
