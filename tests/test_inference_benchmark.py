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
