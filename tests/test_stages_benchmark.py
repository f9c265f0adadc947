"""benchmarks/stages_vs_ort.py: the prefixes it cuts, the stage times it derives from them, and
the two runners it builds per prefix (real ONNX Runtime and a real TVM build, outputs against
PyTorch)."""
from __future__ import annotations

import pytest


def _zoo_model(bench, name, tmp_path):
    from legoc.modelfile import load_model_file

    spec = load_model_file(bench.inference.model_file(name, tmp_path))
    return spec.model.eval(), spec.example_inputs[0]


@pytest.mark.parametrize("name, stages", [("resnet18-32", 6), ("mobilenetv2-32", 10)])
def test_prefixes_grow_stage_by_stage_to_the_whole_model(load_benchmark, tmp_path, name, stages):
    import torch

    bench = load_benchmark("stages_vs_ort")
    model, x = _zoo_model(bench, name, tmp_path)
    cut = bench.prefixes(model, name.split("-")[0])
    assert len(cut) == stages and cut[0][0] == "stem" and cut[-1] == ("pool + fc", model)
    # each prefix is the one before it plus the stage's own modules
    for (_, shorter), (_, longer) in zip(cut[:-2], cut[1:-1]):
        head = list(longer.children())[:len(list(shorter.children()))]
        assert all(a is b for a, b in zip(head, shorter.children()))
    with torch.no_grad():
        outs = [m(x) for _, m in cut]
    assert outs[-1].shape == (1, 1000)
    assert all(o.dim() == 4 for o in outs[:-1])


def test_stage_times_are_prefix_differences_within_each_round(load_benchmark):
    bench = load_benchmark("stages_vs_ort")
    stages = [("stem", None), ("layer1", None), ("head", None)]
    medians = {("ort", 0): [1.0, 1.2, 1.0], ("ort", 1): [3.0, 3.4, 3.0], ("ort", 2): [3.5, 3.9, 3.6],
               ("tvm", 0): [1.5, 1.5, 1.2], ("tvm", 1): [3.5, 3.9, 3.6], ("tvm", 2): [4.0, 4.3, 4.1]}
    rows = bench.stage_table(stages, medians)
    assert [r["stage"] for r in rows] == ["stem", "layer1", "head"]
    assert rows[0]["ort"] == pytest.approx(1.0) and rows[0]["legoc"] == pytest.approx(1.5)
    # layer1: ORT 2.0, 2.2, 2.0 and legoc 2.0, 2.4, 2.4 -> ratios 1.0, 1.09, 1.2
    assert rows[1]["ort"] == pytest.approx(2.0) and rows[1]["legoc"] == pytest.approx(2.4)
    assert rows[1]["paired"] == pytest.approx(2.4 / 2.2)
    assert rows[2]["ort_range"] == pytest.approx((0.5, 0.6))


def test_each_prefix_runs_in_both_runners_as_pytorch_does(load_benchmark, tmp_path):
    """The first two prefixes of ResNet-18 at 32x32: the ONNX file and the TVM module of each,
    set up as the benchmark's workers set them up (inference.py's ``_worker``), equal PyTorch."""
    import numpy as np
    import torch

    bench = load_benchmark("stages_vs_ort")
    model, x = _zoo_model(bench, "resnet18-32", tmp_path)
    stages = bench.prefixes(model, "resnet18")[:2]
    specs = bench.build(stages, x, tmp_path, threads=1)
    assert sorted(specs) == [("ort", 0), ("ort", 1), ("tvm", 0), ("tvm", 1)]
    for (kind, i), spec in specs.items():
        with torch.no_grad():
            ref = stages[i][1](x).numpy()
        out = bench.inference._worker(spec)()
        assert out.shape == ref.shape
        assert np.allclose(out, ref, atol=1e-4, rtol=1e-4), (kind, i, float(np.abs(out - ref).max()))
