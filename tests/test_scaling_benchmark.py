"""benchmarks/scaling.py's budget sweep on the small MNIST example, two budgets: the torch-free
worker steps the budget, picks by CP-SAT, and scores every configuration on the test split."""
from __future__ import annotations

import numpy as np
import torch


def test_budget_sweep_reports_test_split_accuracy(artifact, load_example, load_benchmark, tmp_path):
    scaling = load_benchmark("scaling")
    example = load_example("mnist_resnet")
    art = artifact("mnist_resnet", "host", ratios=(0.0, 0.4, 0.8)).artifact
    test = list(example.test_data())
    x = np.concatenate([b[0].numpy() for b in test]).astype(np.float32)
    y = np.concatenate([b[1].numpy() for b in test])
    np.savez(tmp_path / "test.npz", x=x, y=y)
    from legoc.runtime import load

    n = len(load(art).blocks)
    request = {"test": str(tmp_path / "test.npz"), "artifacts": {"legoc": str(art)}, "scalable": ["legoc"],
               "budgets": [0.6, 50.0], "items": [["legoc", [0] * n], ["legoc", [2] * n]], "calls": 6, "rounds": 2}
    result = scaling.run_worker("tvm", request)

    sweep = result["sweeps"]["legoc"]
    assert sweep["full_ms"] > 0
    assert [s["fraction"] for s in sweep["steps"]] == [50.0, 0.6, 50.0]   # down, then back up
    for step in sweep["steps"]:
        assert "choice" in step and step["measured_ms"] > 0   # best effort: never an error to the app
        if step["within_budget"]:
            assert step["est_ms"] <= step["budget_ms"] + 1e-9
        else:   # 0.6 x the full latency may be below what the (speed-adapted) profile allows: the fastest
            assert step["fraction"] == 0.6 and step["est_ms"] > step["budget_ms"]
    # a budget far above the full model's latency gets the full model (issue 21), both ways
    assert sweep["steps"][0]["choice"] == [0] * n and sweep["steps"][2]["choice"] == [0] * n
    configs = {tuple(c["choice"]): c for c in result["configs"]}
    assert (0,) * n in configs and (2,) * n in configs
    assert all(tuple(s["choice"]) in configs for s in sweep["steps"] if "choice" in s)
    # accuracy is on the 1,000 test digits, from the compiled artifact: it matches PyTorch's
    full = configs[(0,) * n]["accuracy"]
    with torch.no_grad():
        want = example.evaluate(example.model, test)
    assert len(y) == 1000 and abs(full - want) <= 0.002, (full, want)
    assert 0.5 < configs[(2,) * n]["accuracy"] <= 1.0
    assert len(configs[(2,) * n]["correct"]) == 1000
    assert configs[(2,) * n]["correct"].count("1") == round(configs[(2,) * n]["accuracy"] * 1000)
    assert configs[(2,) * n]["latency_ms"] > 0
    costs = result["costs"]["legoc"]
    assert costs["reload_ms"] > costs["swap_ms"] > 0 and costs["reload_bytes"] > costs["swap_bytes"] > 0
