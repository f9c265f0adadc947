"""Nested variants: one weight set per block, every variant a prefix of it, trained incrementally."""
import json

import numpy as np
import torch

from legoc.passes import PassManager, ProgramState
from legoc.passes.prune import leading, nest_block
from legoc.passes.retrain import Retrain, _held_mse
from legoc.pipeline import CompileConfig, default_pipeline
from legoc.runtime import load

RATIOS = (0.0, 0.2, 0.4, 0.6, 0.8)


def _block(load_example):
    spec = load_example("cifar_resnet")
    state = PassManager(default_pipeline()[:2])(ProgramState(model=spec.model, example_inputs=spec.example_inputs),
                                                CompileConfig()).state
    env = state.partition.trace_env(*spec.example_inputs)
    block = state.partition.blocks[1]
    return block, env[block.inputs[0]], env[block.outputs[0]]


def test_every_nested_variant_is_a_prefix_of_the_full_one(load_example):
    block, x, y = _block(load_example)
    variants = nest_block(block.gm, x, RATIOS)
    full = dict(variants[0].gm.named_parameters())
    with torch.no_grad():
        assert torch.allclose(variants[0].gm(x), y, atol=1e-5, rtol=1e-4)   # BN folded, channels permuted
        for v in variants[1:]:
            assert v.gm(x).shape == y.shape and v.nested
            for n, p in v.gm.named_parameters():
                assert torch.equal(p, full[n][leading(p.shape)]), (v.id, n)
    assert [v.macs for v in variants] == sorted((v.macs for v in variants), reverse=True)


def test_incremental_training_freezes_what_smaller_variants_use(load_example, tmp_path, monkeypatch):
    monkeypatch.setenv("LEGOC_CACHE", str(tmp_path))
    spec = load_example("cifar_resnet")
    cfg = CompileConfig(ratios=(0.0, 0.5, 0.75), nested=True, retrain_epochs=2, retrain_minutes=5, progress=False)
    state = PassManager(default_pipeline()[:3])(ProgramState(model=spec.model, example_inputs=spec.example_inputs), cfg).state
    gen = torch.Generator().manual_seed(0)
    state = state.replace(train_inputs=[(torch.randn(8, 3, 32, 32, generator=gen),) for _ in range(6)])
    result = Retrain()(state, cfg).state
    part = result.partition
    held = [part.trace_env(*b) for b in state.train_inputs[-1:]]
    for block in part.blocks:
        vs = result.variants[block.name]
        full = dict(vs[0].gm.named_parameters())
        pairs = [(e[block.inputs[0]], e[block.outputs[0]]) for e in held]
        for v in vs:
            for n, p in v.gm.named_parameters():
                assert torch.equal(p, full[n][leading(p.shape)])
            # the smaller variants' weights were not changed by training the larger ones after them
            info = result.retrain_report[(block.name, v.id)]
            assert abs(_held_mse(v.gm, pairs) - info["held_mse_after"]) <= 1e-6 * max(1.0, info["held_mse_after"])


def test_nested_artifact_stores_one_weight_set_and_switches_without_reading_weights(artifact, load_example):
    rep = artifact("cifar_resnet", ratios=RATIOS, nested=True)
    manifest = json.loads((rep.artifact / "manifest.json").read_text())
    assert manifest["nested"] is True
    for seg in manifest["segments"]:
        if seg["kind"] != "block":
            continue
        files = {v["weights"]["shared"]["file"] for v in seg["variants"]}
        assert len(files) == 1                                   # one weight file for all 5 variants
        shared_bytes = seg["variants"][0]["weights"]["shared"]["bytes"]
        assert shared_bytes <= 1.3 * seg["variants"][0]["param_bytes"]
    m = load(rep.artifact)
    spec = load_example("cifar_resnet")
    x = np.random.RandomState(3).randn(*m.input_shapes[0]).astype(np.float32)
    with torch.no_grad():
        ref = spec.model(torch.from_numpy(x)).numpy()
    assert np.abs(m.configure()(x) - ref).max() <= 1e-4 * np.abs(ref).max()
    for i in range(len(RATIOS)):
        m.configure(variants=[i] * len(m.blocks))(x)
    assert m._weights.reads == len(m.blocks)                      # each shared file read once
