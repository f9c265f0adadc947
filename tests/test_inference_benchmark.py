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
