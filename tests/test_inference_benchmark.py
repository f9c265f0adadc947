"""benchmarks/inference.py: the paired ratio and the table it prints (no timing here)."""
from __future__ import annotations

import io


def test_paired_ratio_is_the_median_of_ratios_within_rounds(load_benchmark):
    paired = load_benchmark("inference").paired_ratio
    # a slow spell (rounds 2 and 4) hits both runners of a round alike: it cancels in the ratio
    assert abs(paired([5.0, 7.5, 5.0, 7.6, 5.1], [5.0, 7.5, 5.0, 7.6, 5.1]) - 1.0) < 1e-12
    assert abs(paired([5.5, 8.0, 5.5], [5.0, 8.0, 5.0]) - 1.1) < 1e-12
    assert paired([2.0, 3.0, 12.0], [1.0, 3.0, 4.0]) == 2.0


def test_table_shows_paired_ratios_and_overhead(load_benchmark):
    from rich.console import Console

    bench = load_benchmark("inference")
    names = ["pytorch eager", "onnxruntime", "tvm monolithic", "legoc full", "legoc r0.50"]
    medians = {"pytorch eager": [20.0, 30.0], "onnxruntime": [5.0, 7.0], "tvm monolithic": [5.5, 7.7],
               "legoc full": [5.5, 7.7], "legoc r0.50": [2.0, 3.0]}
    rows = [{"runner": n, "ms": medians[n][0], "lo": min(medians[n]), "hi": max(medians[n]),
             "macs": 1e9 if n != "legoc r0.50" else 4e8,
             "paired_ort": bench.paired_ratio(medians[n], medians["onnxruntime"])} for n in names]
    overhead = bench.paired_ratio(medians["legoc full"], medians["tvm monolithic"])
    basis = type("Basis", (), {"measured_gflops": 100.0, "theoretical_gflops": 80.0})()
    out = io.StringIO()
    bench._print_model(Console(file=out, width=250), "m", {"rows": rows, "blocks": [], "round_to": 8,
                                                                   "overhead_paired": overhead}, basis)
    text = out.getvalue()
    assert "× ORT paired" in text and "1.10" in text   # legoc full: 5.5/5.0 and 7.7/7.0
    assert "+0.0%" in text                               # overhead, paired
    assert "--no-winograd" not in text
    out = io.StringIO()
    bench._print_model(Console(file=out, width=250), "m", {"rows": rows, "blocks": [], "round_to": 8, "winograd": False,
                                                                   "overhead_paired": overhead}, basis)
    assert "3x3 convs direct (--no-winograd)" in out.getvalue()   # the title says what was built


def test_block_efficiency_is_paired_within_each_worker(load_benchmark, monkeypatch, tmp_path):
    """A variant's efficiency is its time against its own block's full module timed by the same
    worker: a worker that ran everything 2x slow gives the same efficiency as the others."""
    from rich.console import Console

    from legoc.runtime import bench as runtime_bench

    bench = load_benchmark("inference")
    answers = [[2.0, 1.0, 0.5], [4.0, 2.0, 1.0], [2.0, 1.25, 0.5]]
    monkeypatch.setattr(runtime_bench, "measure_in_subprocess",
                        lambda *a, **k: {"modules": answers.pop(0), "combinations": [], "threads": 2})
    variants = [{"id": f"r{r:.2f}", "macs": m, "channels": {"g": [64, c]}, "profile": {"latency_ms": {"value": 1.0}}}
                for r, m, c in ((0.0, 4e6, 64), (0.5, 2e6, 32), (0.75, 1e6, 16))]
    tiny = {"name": "block1", "variants": [dict(v, macs=v["macs"] / 10) for v in variants]}   # < 1 M MACs: left out
    rows = bench._block_efficiency(tmp_path, [{"name": "block0", "variants": variants}, tiny], workers=3)
    assert [r["variant"] for r in rows] == ["r0.00", "r0.50", "r0.75"] and answers == []
    assert rows[1]["eff"] == 1.0 and (rows[1]["eff_lo"], rows[1]["eff_hi"]) == (0.8, 1.0)
    assert rows[2]["eff"] == 1.0 and rows[2]["ms"] == 0.5 and rows[2]["workers"] == 3
    out = io.StringIO()
    basis = type("Basis", (), {"measured_gflops": 100.0, "theoretical_gflops": 80.0})()
    full = {"runner": "legoc full", "ms": 1.0, "lo": 1.0, "hi": 1.0, "macs": 1e9, "paired_ort": 1.0}
    res = {"rows": [dict(full, runner=n) for n in ("pytorch eager", "onnxruntime", "tvm monolithic", "legoc full")],
           "blocks": rows, "round_to": 16, "overhead_paired": 1.0}
    bench._print_model(Console(file=out, width=250), "m", res, basis)
    assert "3 worker processes" in out.getvalue() and "0.80–1.00" in out.getvalue()


def test_runners_stay_alive_and_take_turns(load_benchmark, tmp_path, monkeypatch):
    """ONNX Runtime workers (real processes, a tiny ONNX model): each loads once, answers its
    rounds' batches with that many timings, writes its first output, and exits when closed; a
    runner of two processes (``--processes 2``) has them answer alternate rounds."""
    import numpy as np
    import torch

    bench = load_benchmark("inference")
    monkeypatch.setattr(bench, "SETTLE_S", 0.0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    x = torch.randn(1, 3, 8, 8)
    torch.onnx.export(model, (x,), str(tmp_path / "m.onnx"), input_names=["x"], dynamo=False)
    np.save(tmp_path / "x.npy", x.numpy())
    spec = {"kind": "ort", "onnx": str(tmp_path / "m.onnx"), "threads": 1, "input": str(tmp_path / "x.npy"),
            "warmup": 1, "clock": "wall"}
    procs = {"a": [bench.Runner({**spec, "output": str(tmp_path / "a.npy")}, tmp_path / "a.log")],
             "b": [bench.Runner({**spec, "output": None}, tmp_path / f"b{i}.log") for i in range(2)]}
    workers = [*procs["a"], *procs["b"]]
    try:
        medians, times = bench.interleaved_rounds(procs, rounds=3, calls=4)
    finally:
        for proc in workers:
            proc.close()
    assert [len(medians[k]) for k in "ab"] == [3, 3] and [len(times[k]) for k in "ab"] == [12, 12]
    assert all(t > 0 for k in "ab" for t in times[k])
    assert [w.batches for w in workers] == [3, 2, 1]   # b's processes: rounds 0 and 2, round 1
    with torch.no_grad():
        assert np.allclose(np.load(tmp_path / "a.npy"), model(x).numpy(), atol=1e-5)
    assert all(proc.proc.returncode == 0 for proc in workers)
