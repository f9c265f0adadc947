"""Honest data splits: train / val / test are disjoint; compile never reads test_data(); the
reported accuracy comes from `legoc evaluate` on the test split; validation points used to fit
the latency estimator are marked as fitted."""
from __future__ import annotations

import importlib.util
import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def _example(name: str):
    """Load an example module by path (examples/ on sys.path while it imports its neighbours)."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        spec = importlib.util.spec_from_file_location(f"legoc_splits_{name}", EXAMPLES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(EXAMPLES))


@pytest.fixture(scope="module")
def digits():
    return _example("mnist_digits")


@pytest.fixture(scope="module")
def training():
    return _example("mnist_training")


# ---------------------------------------------------------------------------------- splits

def _rows(x: np.ndarray) -> set[bytes]:
    return {r.tobytes() for r in x.reshape(len(x), -1)}


def test_splits_are_disjoint_stratified_and_sized(digits):
    s = digits.load_splits()
    per_class = {"train": digits.N_TRAIN_PER_CLASS, "val": digits.N_VAL_PER_CLASS, "test": digits.N_TEST_PER_CLASS}
    assert per_class == {"train": 300, "val": 100, "test": 100}
    for name, (x, y) in s.items():
        assert len(x) == len(y) == 10 * per_class[name]
        assert np.bincount(y, minlength=10).tolist() == [per_class[name]] * 10
        assert len(set(y[:20].tolist())) > 3, f"{name}: classes are not interleaved"
    rows = {name: _rows(x) for name, (x, _) in s.items()}
    # no image is in two splits (the 5,000 digits are pairwise distinct, so this is index disjointness)
    assert not rows["train"] & rows["val"] and not rows["train"] & rows["test"] and not rows["val"] & rows["test"]


def test_splits_are_seeded(digits):
    a, b, c = digits.load_splits(0), digits.load_splits(0), digits.load_splits(1)
    for name in ("train", "val", "test"):
        assert np.array_equal(a[name][0], b[name][0]) and np.array_equal(a[name][1], b[name][1])
        assert not np.array_equal(a[name][0], c[name][0])
    # another seed redistributes digits between the splits, it does not only reorder them
    assert _rows(a["test"][0]) != _rows(c["test"][0])


# ----------------------------------------------------------------------- shared training

class _Tiny(torch.nn.Module):
    """Takes exactly 1x12x12 inputs, so training only works when batches are resized."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(144, 10)

    def forward(self, x):
        return self.fc(x.reshape(x.shape[0], 144))


def test_train_classifier_resizes_is_deterministic_and_keeps_the_rng(digits, training):
    x, y = digits.load_splits()["train"]
    x, y = x[:256], y[:256]
    val = training.batches(x[:64], y[:64], 32)

    def run():
        torch.manual_seed(0)
        return training.train_classifier(_Tiny(), x, y, epochs=2, lr=1e-2, weight_decay=0.0, seed=3,
                                         val=val, log=lambda m: None, input_size=12)

    state = torch.random.get_rng_state()
    a = run()
    torch.random.set_rng_state(state)
    b = run()
    assert not a.training
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert training.evaluate(a, [(training.resize(xb, 12), yb) for xb, yb in val]) > 0.3   # it learned


def test_cached_weights_trains_once(training, tmp_path, monkeypatch):
    monkeypatch.setenv("LEGOC_CACHE", str(tmp_path))
    calls = []

    def train():
        calls.append(1)
        torch.manual_seed(1)
        return _Tiny()

    spec = {"arch": "tiny", "epochs": 1}
    first = training.cached_weights("tiny", spec, _Tiny, train)
    again = training.cached_weights("tiny", dict(reversed(spec.items())), _Tiny, train)   # key order irrelevant
    assert calls == [1] and not again.training
    assert torch.equal(first.fc.weight, again.fc.weight)
    assert training.cache_path("tiny", spec).parent == tmp_path / "examples"
    assert training.cache_path("tiny", spec) != training.cache_path("tiny", {**spec, "epochs": 2})


# ------------------------------------------------- compile never reads test_data; evaluate does

MODEL_FILE = textwrap.dedent('''
    """A tiny classifier on 8x8 inputs whose test_data() records every call in TEST_CALLS."""
    import os
    import torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = torch.nn.Conv2d(3, 16, 3, padding=1)
            self.c2 = torch.nn.Conv2d(16, 16, 3, padding=1)
            self.c3 = torch.nn.Conv2d(16, 16, 3, padding=1)
            self.fc = torch.nn.Linear(16, 4)

        def forward(self, x):
            x = torch.relu(self.c1(x))
            x = torch.relu(self.c2(x))
            x = torch.relu(self.c3(x))
            return self.fc(x.mean((2, 3)))

    def build_model():
        torch.manual_seed(0)
        return Net().eval()

    def example_inputs():
        return (torch.zeros(1, 3, 8, 8),)

    def _data(seed, n=64):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 3, 8, 8, generator=g)
        return [(x[i:i + 16], torch.randint(0, 4, (16,), generator=g)) for i in range(0, n, 16)]

    def train_data():
        return _data(1)

    def val_data():
        return _data(2)

    def test_data():
        with open(os.environ["TEST_CALLS"], "a") as f:
            f.write("called\\n")
        # labels: the full model's prediction on the first half, a wrong class on the second
        model, out = build_model(), []
        for k, (x, _) in enumerate(_data(3)):
            with torch.no_grad():
                pred = model(x).argmax(1)
            out.append((x, pred if k < 2 else (pred + 1) % 4))
        return out

    def evaluate(model, data):
        model.eval()
        with torch.no_grad():
            hits = sum(int((model(x).argmax(1) == y).sum()) for x, y in data)
        return hits / sum(len(y) for _, y in data)
''')


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A model file with a recording test_data(), compiled once (2 blocks x 2 ratios)."""
    from legoc.pipeline import CompileConfig, compile_model

    root = tmp_path_factory.mktemp("splits")
    model, calls = root / "tiny_model.py", root / "test_calls.txt"
    model.write_text(MODEL_FILE)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TEST_CALLS", str(calls))
        report = compile_model(model, CompileConfig(output=root / "tiny.lego", ratios=(0.0, 0.5), blocks=2,
                                                    retrain_epochs=0, progress=False))
    return model, calls, report.artifact


def test_compile_never_calls_test_data(tiny):
    _, calls, artifact = tiny
    assert (artifact / "manifest.json").is_file()
    assert not calls.exists(), "legoc compile called test_data()"


def test_validation_points_are_marked_fitted(tiny):
    _, _, artifact = tiny
    manifest = json.loads((artifact / "manifest.json").read_text())
    val = manifest["combination"]["validation"]
    assert val and all(isinstance(v["fitted"], bool) for v in val)
    blocks = [s for s in manifest["segments"] if s["kind"] == "block"]
    n = min(len(s["variants"]) for s in blocks)
    uniform = [v for v in val if len(set(v["choice"])) == 1]
    # exactly the uniform configurations calibrate the latency fit; the others are held out
    assert [v["fitted"] for v in val] == [len(set(v["choice"])) == 1 for v in val] and len(uniform) == n


def test_evaluate_reports_test_accuracy(tiny, monkeypatch, capsys):
    from legoc.cli import main
    from legoc.evaluate import split_batches, top1
    from legoc.modelfile import load_model_file
    from legoc.runtime import load

    model, calls, artifact = tiny
    monkeypatch.setenv("TEST_CALLS", str(calls))
    monkeypatch.setenv("COLUMNS", "200")
    code = main(["evaluate", str(artifact), str(model), "--uniform", "--variants", "1,0", "--record"])
    out = capsys.readouterr().out
    assert code == 0 and calls.exists()
    assert "64 samples of tiny_model.py's test_data()" in out and "evaluate() of model.py" in out
    ev = json.loads((artifact / "manifest.json").read_text())["evaluation"]
    assert ev["split"] == "test" and ev["samples"] == 64
    assert [r["label"] for r in ev["results"]] == ["variants 1,0", "full", "uniform 1"]
    full = ev["results"][1]
    # the full configuration is the original model: right on the first half, wrong on the second
    assert full["choice"] == [0, 0] and full["accuracy"] == pytest.approx(0.5, abs=1 / 32)
    # model.py's evaluate() on the runtime and legoc's own NumPy top-1 agree
    m = load(artifact)
    m.configure(variants=[1, 0])
    assert top1(m, split_batches(load_model_file(model), "test")) == pytest.approx(ev["results"][0]["accuracy"])
    code = main(["inspect", str(artifact), "--plot", str(artifact.parent / "pareto.png")])
    out = capsys.readouterr().out
    assert code == 0 and "fitted (in-sample" in out and "test acc." in out and "legoc evaluate" in out
    assert (artifact.parent / "pareto.png").read_bytes()[:4] == b"\x89PNG"


def test_inspect_shows_fitted_and_held_out_points_apart():
    from rich.console import Console

    from legoc.show import print_validation as _print_validation

    def point(choice, fitted, est, meas):
        return {"choice": choice, "fitted": fitted, "estimated": {"accuracy": 0.9, "latency_ms": est, "memory_bytes": 0},
                "measured": {"accuracy": 0.9, "latency_ms": meas}}

    con = Console(record=True, width=200)
    _print_validation(con, [point([0, 0], True, 1.0, 1.0), point([1, 1], True, 0.5, 0.5),
                            point([0, 1], False, 0.8, 1.0), point([1, 0], False, 0.6, 0.5)])
    out = con.export_text()
    held, fitted = out.index("held out"), out.index("fitted (in-sample")
    assert held < out.index("0 1") < out.index("1 0") < fitted < out.index("0 0") < out.index("1 1")
    assert "-20.0%" in out and "+20.0%" in out
    assert "mean |latency error|: held out 20.0% over 2; fitted 0.0% over 2" in out


def test_evaluate_without_test_data_is_a_one_line_user_error(tiny, tmp_path, capsys):
    from legoc.cli import main

    _, _, artifact = tiny
    plain = tmp_path / "no_test.py"
    plain.write_text(MODEL_FILE.split("def test_data():")[0])
    code = main(["evaluate", str(artifact), str(plain)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "defines no test_data()" in err and "\n" not in err


def test_evaluate_configurations_choice_and_errors():
    from types import SimpleNamespace

    from legoc.errors import UserError
    from legoc.evaluate import configurations

    blocks = [SimpleNamespace(name="block0", variants=[0, 1, 2]), SimpleNamespace(name="block1", variants=[0, 1])]
    budgets = []
    model = SimpleNamespace(blocks=blocks, select=lambda latency_ms: budgets.append(latency_ms) or SimpleNamespace(choice=[2, 1]))
    assert configurations(model) == [("full", (0, 0)), ("uniform 1", (1, 1))]   # uniform by default
    assert configurations(model, [[2, 0]], [0.5]) == [("variants 2,0", (2, 0)), ("budget 0.5 ms", (2, 1))]
    assert budgets == [0.5]
    assert [label for label, _ in configurations(model, [[1, 1]], uniform=True)] == ["variants 1,1", "full", "uniform 1"]
    with pytest.raises(UserError, match="one index per block"):
        configurations(model, [[0]])
    with pytest.raises(UserError, match="block block1 has variants 0..1, got 2"):
        configurations(model, [[0, 2]])
