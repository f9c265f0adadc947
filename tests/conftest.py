"""Shared fixtures: example models loaded through legoc's own model-file loader."""
from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
CHAIN_EXAMPLES = ["vgg_chain", "cifar_resnet", "mobilenetv2"]


@pytest.fixture(scope="session")
def load_example():
    from legoc.modelfile import load_model_file

    cache = {}

    def load(name: str):
        if name not in cache:
            cache[name] = load_model_file(EXAMPLES / f"{name}.py")
        return cache[name]

    return load


@pytest.fixture(scope="session")
def compiled_state(load_example):
    """capture -> partition -> prune state of an example (cached per name)."""
    from legoc.passes import PassManager, ProgramState
    from legoc.pipeline import CompileConfig, default_pipeline

    cache = {}

    def get(name: str, **cfg):
        key = (name, tuple(sorted(cfg.items())))
        if key not in cache:
            spec = load_example(name)
            state = ProgramState(model=spec.model, example_inputs=spec.example_inputs, source=name)
            cache[key] = PassManager(default_pipeline())(state, CompileConfig(**cfg)).state
        return cache[key]

    return get


@pytest.fixture(scope="session")
def artifact(tmp_path_factory):
    """Compile an example (or any model file) once per (name, target, ratios) for the session."""
    from legoc.pipeline import CompileConfig, compile_model

    cache = {}

    def get(model: str, target: str = "host", ratios=(0.0, 0.5), blocks=None, **options):
        key = (model, target, tuple(ratios), blocks, tuple(sorted(options.items())))
        if key not in cache:
            path = Path(model) if model.endswith(".py") else EXAMPLES / f"{model}.py"
            out = tmp_path_factory.mktemp("artifacts") / f"{path.stem}-{target}.lego"
            cfg = CompileConfig(target=target, output=out, ratios=tuple(ratios), blocks=blocks, progress=False, **options)
            cache[key] = compile_model(path, cfg)
        return cache[key]

    return get


TINY_MODEL = """
import torch
from torch import nn

def build_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()).eval()

def example_inputs():
    return (torch.zeros(1, CHANNELS, 16, 16),)
"""


@pytest.fixture
def tiny_model_source():
    """The source of a two-conv model file; ``channels`` sets its example input's channel count
    (3 fits the model)."""
    return lambda channels=3: TINY_MODEL.replace("CHANNELS", str(channels))


# Two prunable blocks (a: 3->16->16, b: 16->32->16, conv + BN + ReLU) and a 4-class head. The
# input size, the head and the validation data vary by test; see two_block_source.
TWO_BLOCK_NET = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                               nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                               nn.Conv2d(32, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.head = HEAD

    def forward(self, x):
        return self.head(self.b(self.a(x)))

def build_model():
    torch.manual_seed(0)
    return Net().eval()

def example_inputs():
    return (torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)),)
"""
TWO_BLOCK_VAL = """
def val_data():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(SAMPLES, 3, SIZE, SIZE, generator=g)
    LABELS
    return [(x[i:i + BATCH], y[i:i + BATCH]) for i in range(0, SAMPLES, BATCH)]
"""
TWO_BLOCK_LABELS = {
    # the full model's own answers: baseline accuracy 1.0, every variant's drop is what pruning costs
    "model": "with torch.no_grad():\n        y = build_model()(x).argmax(1)",
    # answers at chance: every variant's drop is noise, some of it below zero
    "random": "y = torch.randint(0, 4, (SAMPLES,), generator=g)",
}
TWO_BLOCK_HEADS = {
    "pool": "nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))",
    "flatten": "nn.Sequential(nn.Flatten(), nn.Linear(16 * SIZE * SIZE, 4))",
    "flatten-nobias": "nn.Sequential(nn.Flatten(), nn.Linear(16 * SIZE * SIZE, 4, bias=False))",
}


@pytest.fixture(scope="session")
def two_block_source():
    """The source of a model file with two prunable blocks: ``size`` x ``size`` inputs, a head
    from TWO_BLOCK_HEADS, and with ``samples`` > 0 a ``val_data()`` of that many samples in
    batches of ``batch``, labelled by the full model ("model") or at random ("random")."""
    def source(size: int = 12, head: str = "pool", samples: int = 0, batch: int = 64, labels: str = "model"):
        text = TWO_BLOCK_NET.replace("HEAD", TWO_BLOCK_HEADS[head])
        if samples:
            text += TWO_BLOCK_VAL.replace("LABELS", TWO_BLOCK_LABELS[labels])
        return (text.replace("SAMPLES", str(samples)).replace("BATCH", str(batch))
                .replace("SIZE", str(size)))

    return source


# A model whose forward has a keyword flag that drives a Python `if`; the model file fixes it
# with `concrete_args` (README, "Your model").
FLAG_MODEL = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                               nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))

    def forward(self, x, return_features=False):
        y = self.a(x)
        if return_features:
            return y
        return self.head(y)


def build_model():
    torch.manual_seed(0)
    return Net().eval()


def example_inputs():
    return (torch.randn(1, 3, 12, 12),)


concrete_args = {"return_features": FLAG}
"""


@pytest.fixture(scope="session")
def flag_model_source():
    """The source of a model file with ``concrete_args = {"return_features": flag}``: the
    features of block a, (1, 16, 12, 12), with the flag on; the head's (1, 4) off."""
    return lambda flag: FLAG_MODEL.replace("FLAG", str(bool(flag)))


def _board_manifest(blocks, copy_ms, *, frame_ms=0.25, overhead=0.0, power=None, gpu=True, weight_bytes=1000):
    """A synthetic manifest: frame0 -> block0 -> ... -> frame1 (with a skip tensor frame0 ->
    frame1). ``blocks[b]`` = [(drop, gpu_ms, cpu_ms), ...] with ``gpu`` (a Jetson-like board: the
    GPU its default device, the CPU the other, copies of tensor k taking ``copy_ms[k]`` ms), else
    [(drop, cpu_ms), ...] on a CPU board; ``power``: the target's power model (None: none)."""
    def variant(i, drop, ms, cpu_ms=None):
        v = {"id": f"r{i}", "ratio": i / 10, "module": {"bytes": 1000},
             "weights": {"file": f"w{i}", "bytes": weight_bytes, "sha256": ""},
             "profile": {"latency_ms": {"value": ms, "source": "estimated"}, "accuracy_drop": {"value": drop},
                         "peak_activation_bytes": {"value": 0}}}
        if cpu_ms is not None:
            v["devices"] = {"cpu": {"module": {"bytes": 1000}, "weights": {"bytes": 2 * weight_bytes, "sha256": ""},
                                    "profile": {"latency_ms": {"value": cpu_ms, "source": "estimated"}}}}
        return v

    frame = [{"id": "frame", "ratio": 0.0, "module": {"bytes": 1000}, "weights": {"bytes": 0, "sha256": ""},
              "profile": {"latency_ms": {"value": frame_ms, "source": "estimated"}}}]
    n = len(blocks)
    segs = [{"name": "frame0", "kind": "frame", "inputs": ["x"], "outputs": ["f0"], "variants": frame}]
    for b, vs in enumerate(blocks):
        segs.append({"name": f"block{b}", "kind": "block", "inputs": ["f0" if b == 0 else f"b{b - 1}"],
                     "outputs": [f"b{b}"], "variants": [variant(i, *v) for i, v in enumerate(vs)]})
    segs.append({"name": "frame1", "kind": "frame", "inputs": [f"b{n - 1}", "f0"], "outputs": ["y"], "variants": frame})
    target_power = power if gpu or power is None else {**power, "devices": {"cpu": power["devices"]["cpu"]}}
    m = {"segments": segs, "target": {"name": "board", "device": "cuda" if gpu else "cpu", "power": target_power},
         "accuracy": {"baseline": 0.9, "metric": "top1"},
         "combination": {"call_overhead_ms": {"value": overhead}, "module_overhead_bytes": 0}}
    if gpu:
        tensors = {"x": ("input", ["frame0"]), "f0": ("frame0", ["block0", "frame1"]), "y": ("frame1", ["output"])}
        tensors.update({f"b{b}": (f"block{b}", [f"block{b + 1}" if b + 1 < n else "frame1"]) for b in range(n)})
        m["devices"] = {"default": "gpu", "choices": ["gpu", "cpu"], "frame": "gpu",
                        "transfer": {"source": "estimated", "tensors": {
                            k: {"from": f, "to": t, "bytes": 4, "ms": copy_ms.get(k, 0.0)}
                            for k, (f, t) in tensors.items()}}}
    return m


@pytest.fixture(scope="session")
def board_manifest():
    """Builds synthetic board manifests (see _board_manifest) for the estimator and solver tests."""
    return _board_manifest


@pytest.fixture
def load_benchmark():
    """A loader of benchmarks/<name>.py as a module (benchmarks/ is not a package)."""
    return _load_benchmark


def _load_benchmark(name: str):
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
