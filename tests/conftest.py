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
