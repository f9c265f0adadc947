"""The example model files: the model.py convention, fx-traceability, the MNIST data and the
torch-free device app (run against a fake runtime here; the real artifact runs in `make demo`)."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.fx

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TORCH_MODELS = ["cifar_resnet", "vgg_chain", "mobilenetv2", "mnist_resnet"]
_LOADED: dict[str, object] = {}


@pytest.fixture(scope="module")
def examples():
    """A loader for example files by path, with examples/ on sys.path only inside the fixture."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(EXAMPLES))

        def load(name: str):
            if name not in _LOADED:
                spec = importlib.util.spec_from_file_location(f"legoc_example_{name}", EXAMPLES / f"{name}.py")
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
                _LOADED[name] = module
            return _LOADED[name]

        yield load


@pytest.fixture(scope="module")
def built(examples):
    """Build each example model once per test module (mnist_resnet trains if its cache is missing)."""
    cache = {}

    def get(name):
        if name not in cache:
            mod = examples(name)
            cache[name] = (mod, mod.build_model(), mod.example_inputs())
        return cache[name]

    return get


# ---------------------------------------------------------------------------- torch models

@pytest.mark.parametrize("name", TORCH_MODELS)
def test_convention_and_output_shape(built, name):
    mod, model, inputs = built(name)
    assert isinstance(model, torch.nn.Module)
    assert not model.training, "build_model() must return the model in eval mode"
    assert isinstance(inputs, tuple) and all(isinstance(t, torch.Tensor) for t in inputs)
    assert inputs[0].shape[0] == 1
    expected_in = (1, 1, 28, 28) if name == "mnist_resnet" else (1, 3, 32, 32)
    assert tuple(inputs[0].shape) == expected_in
    with torch.no_grad():
        y = model(*inputs)
    assert tuple(y.shape) == (1, 10)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", TORCH_MODELS)
def test_fx_traceable_and_equivalent(built, name):
    mod, model, inputs = built(name)
    traced = torch.fx.symbolic_trace(model, concrete_args=getattr(mod, "concrete_args", None))
    with torch.no_grad():
        ref, got = model(*inputs), traced(*inputs)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,adds", [("cifar_resnet", 9), ("mnist_resnet", 6), ("mobilenetv2", 3), ("vgg_chain", 0)])
def test_residual_adds_in_graph(built, name, adds):
    import operator

    _, model, _ = built(name)
    graph = torch.fx.symbolic_trace(model).graph
    n = sum(1 for node in graph.nodes if node.op == "call_function" and node.target in (operator.add, torch.add))
    assert n == adds


@pytest.mark.parametrize("name", ["cifar_resnet", "vgg_chain", "mobilenetv2"])
def test_random_weights_are_deterministic(examples, name):
    mod = examples(name)
    state_before = torch.random.get_rng_state()
    a, b = mod.build_model().state_dict(), mod.build_model().state_dict()
    assert torch.equal(torch.random.get_rng_state(), state_before), "build_model() must not disturb the global RNG"
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    torch.testing.assert_close(mod.example_inputs()[0], mod.example_inputs()[0])


# ------------------------------------------------------------------------------ MNIST data

def test_mnist_digits_splits(examples):
    digits = examples("mnist_digits")
    splits = digits.load_splits()
    assert list(splits) == ["train", "val", "test"]
    sizes = {"train": 3000, "val": 1000, "test": 1000}
    lo, hi = (0 - 0.1307) / 0.3081, (1 - 0.1307) / 0.3081
    for name, (x, y) in splits.items():
        assert x.shape == (sizes[name], 1, 28, 28) and x.dtype == np.float32
        assert y.shape == (sizes[name],) and y.dtype == np.int64
        assert np.bincount(y).tolist() == [sizes[name] // 10] * 10
        assert x.min() == pytest.approx(lo, abs=1e-5) and x.max() == pytest.approx(hi, abs=1e-5)
    # Deterministic for a seed, different for another (further split checks: test_splits.py).
    again = digits.load_splits()
    assert all(np.array_equal(a, b) for k in splits for a, b in zip(splits[k], again[k]))
    assert not np.array_equal(digits.load_splits(seed=1)["test"][0], splits["test"][0])


def test_mnist_digits_does_not_import_torch():
    code = (f"import sys; sys.path.insert(0, {str(EXAMPLES)!r}); import mnist_digits; "
            "mnist_digits.load_splits(); assert 'torch' not in sys.modules, 'torch was imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------------------- mnist_resnet

def test_mnist_resnet_data_and_accuracy(built):
    mod, model, _ = built("mnist_resnet")
    train, val, test = mod.train_data(), mod.val_data(), mod.test_data()
    assert [sum(len(y) for _, y in d) for d in (train, val, test)] == [3000, 1000, 1000]
    assert all(x.shape[0] <= 64 and x.shape[1:] == (1, 28, 28) for x, _ in train + val + test)
    assert train[0][0].dtype == torch.float32 and train[0][1].dtype == torch.int64
    acc = mod.evaluate(model, test)
    assert 0.95 <= acc <= 1.0, f"test accuracy {acc:.4f}"
    assert mod.cache_path().is_file()


def test_mnist_resnet_cache_key(examples, monkeypatch, tmp_path):
    mod = examples("mnist_resnet")
    monkeypatch.setenv("LEGOC_CACHE", str(tmp_path))
    path = mod.cache_path()
    assert path.parent == tmp_path / "examples" and path.name.startswith("mnist_resnet-")
    assert path.suffix == ".safetensors"
    h = mod.config_hash()
    monkeypatch.setitem(mod.TRAIN, "epochs", mod.TRAIN["epochs"] + 1)
    assert mod.config_hash() != h, "changing a training hyper-parameter must change the cache key"
    monkeypatch.setitem(mod.TRAIN, "epochs", mod.TRAIN["epochs"] - 1)
    assert mod.config_hash() == h


def test_mnist_resnet_cache_roundtrip(examples, built, monkeypatch, tmp_path):
    mod, model, inputs = built("mnist_resnet")
    monkeypatch.setenv("LEGOC_CACHE", str(tmp_path))
    path = mod.cache_path()
    examples("mnist_training").save_atomic(model, path)
    assert path.is_file() and [p.name for p in path.parent.iterdir()] == [path.name]  # no temp left
    reloaded = mod.build_model()  # loads from tmp_path without training
    with torch.no_grad():
        torch.testing.assert_close(reloaded(*inputs), model(*inputs))


# ------------------------------------------------------------------ demo app (fake runtime)

FAKE_RUNTIME = textwrap.dedent('''
    import sys, types
    import numpy as np
    sys.path.insert(0, EXAMPLES)
    import mnist_digits
    import demo_app

    class Variant:
        def __init__(self, ratio, macs):
            self.ratio, self.macs, self.param_bytes = ratio, macs, macs // 10

    class Block:
        def __init__(self, name, n):
            self.name = name
            self.variants = [Variant(r, int(1e6 * (1 - r))) for r in np.linspace(0, 0.8, n)]

    class FakeModel:
        """Nearest-centroid classifier; smaller variants add noise."""
        input_shapes = [(1, 1, 28, 28)]

        def __init__(self, path):
            xt, yt = mnist_digits.load_splits()["train"]
            self.centroids = np.stack([xt[yt == c].mean(0).ravel() for c in range(10)])
            self.blocks = [Block("block0", 5), Block("block1", 5), Block("block2", 3)]
            self.frame = [Block("stem", 1)]
            self.rng = np.random.default_rng(0)
            self.noise = None
            self.configured = []

        def configure(self, variants):
            assert len(variants) == len(self.blocks)
            self.configured.append(list(variants))
            self.noise = float(np.mean([b.variants[i].ratio for b, i in zip(self.blocks, variants)]))

        def __call__(self, x):
            assert x.shape == (1, 1, 28, 28) and x.dtype == np.float32
            d = -((self.centroids - x.reshape(1, -1)) ** 2).sum(1)
            return (d + self.noise * 300 * self.rng.standard_normal(10)).reshape(1, 10).astype(np.float32)

    made = []
    runtime = types.ModuleType("legoc.runtime")
    runtime.load = lambda path: made.append(FakeModel(path)) or made[-1]
    sys.modules["legoc.runtime"] = runtime
    rc = demo_app.main(["fake.lego", "--limit", "200"])
    assert rc == 0
    assert made[0].configured == [[0, 0, 0], [2, 2, 1], [4, 4, 2]], made[0].configured
    assert "torch" not in sys.modules, "demo_app imported torch"
''')


def test_demo_app_with_fake_runtime():
    code = f"EXAMPLES = {str(EXAMPLES)!r}\n" + FAKE_RUNTIME
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "COLUMNS": "160"})
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    for name in ("full", "middle", "smallest"):
        assert name in out
    assert "all 0.00" in out and "200 test MNIST digits" in out


def test_demo_app_helpers(examples):
    demo = examples("demo_app")
    assert demo.describe_ratios([0.5, 0.5]) == "all 0.50"
    assert demo.describe_ratios([0.0, 0.25]) == "0.00 0.25"

    class B:
        def __init__(self, n):
            self.variants = list(range(n))

    assert demo.configurations([B(5), B(4), B(1)]) == [
        ("full", [0, 0, 0]), ("middle", [2, 2, 0]), ("smallest", [4, 3, 0])]


def test_demo_budget_trace_follows_the_artifacts_own_range(examples, artifact):
    """The demo's budgets scale with the artifact (fastest .. full), so every step is feasible
    and the tight steps really pick smaller variants, on a fast or a slow machine."""
    from legoc.runtime import load

    demo = examples("demo_app")
    mnist_digits = examples("mnist_digits")
    m = load(artifact("mnist_resnet", "host", ratios=(0.0, 0.4, 0.8)).artifact)
    steps = demo.budgets(m)
    full = m.profiles.latency_ms([0] * len(m.blocks))
    assert [s[0] for s in steps] == [e for e, _, _ in demo.BUDGET_TRACE]
    assert steps[0][1] >= full and min(s[1] for s in steps) >= m.profiles.min_latency_ms()
    x, y = mnist_digits.load_splits()["test"]
    rows = demo.follow_budget(m, x, y, limit=20)
    for row, (_, lat, mem) in zip(rows, steps):
        assert row["est_latency_ms"] <= lat
        if mem is not None:
            assert row["est_memory_mb"] <= mem
    assert rows[0]["choice"] != rows[3]["choice"]     # the battery saver step shrinks the model
    # back to idle: the budget loosens, so the choice is no less accurate than under memory pressure
    # (staying costs no loading; the solver's MACs tie-break is worth at most capacity_reward). It
    # need not return to the idle choice: reloading evicted modules is charged, and variants whose
    # estimates tie with the full ones may stay.
    assert rows[-1]["est_accuracy"] >= rows[-2]["est_accuracy"] - m.profiles.capacity_reward
    # only blocks that changed are loaded again
    assert rows[-1]["loaded"] <= sum(a != b for a, b in zip(rows[-2]["choice"], rows[-1]["choice"]))
