"""benchmarks/layers_vs_ort.py: both workers on a small zoo model (mobilenetv2 at 32x32), their
layer classes, and the conv classification (depthwise, 1x1 widening/narrowing, k x k, prepacked)."""
from __future__ import annotations

import pytest


def test_conv_classes(load_benchmark):
    kind = load_benchmark("layers_vs_ort")._kind
    assert kind([1, 96, 56, 56], [96, 1, 3, 3]) == "dw"
    assert kind([1, 24, 56, 56], [144, 24, 1, 1]) == "pw-exp"
    assert kind([1, 144, 56, 56], [24, 144, 1, 1]) == "pw-proj"
    assert kind([1, 96, 14, 14], [18, 96, 1, 1, 32]) == "pw-exp"     # prepacked [O/B, I, 1, 1, B]
    assert kind([1, 3, 224, 224], [64, 3, 7, 7]) == "conv7"
    assert kind([1, 1, 28, 28], [8, 1, 3, 3]) == "conv3"             # one input channel: not depthwise
    assert kind([1, 1280], None) == "other"
    blocked = load_benchmark("layers_vs_ort")._blocked_kind    # [N, C/B, H, W, B] tensors
    assert blocked("fused_conv2d_blocked3_add9_tir_clip5", [[1, 32, 28, 28], [24, 32, 8], [1, 24, 28, 28, 8]]) == ("pw-exp", 28)
    assert blocked("fused_depthwise_blocked1_add7", [[1, 18, 56, 56, 8], [18, 3, 3, 8], [1, 18, 28, 28, 8]]) == ("dw", 28)
    assert blocked("fused_conv2d_blocked4_add8_add10", [[1, 24, 28, 28, 8], [4, 24, 8, 8], [1, 32, 28, 28]]) == ("pw-proj", 28)


def test_both_workers_time_the_same_layer_classes(tmp_path, load_benchmark):
    bench = load_benchmark("layers_vs_ort")
    (tmp_path / "ort").mkdir()
    (tmp_path / "legoc").mkdir()
    ort = bench._ort("mobilenetv2-32", tmp_path / "ort")
    legoc = bench._legoc("mobilenetv2-32", tmp_path / "legoc")
    for result in (ort, legoc):
        assert result["e2e"] > 0
        assert all(ms >= 0 for ms in result["classes"].values())
        kinds = {key.split("|")[0] for key in result["classes"]}
        assert {"dw", "pw-exp", "pw-proj"} <= kinds, kinds
    # the depthwise layers of both, at the same output widths
    widths = lambda r: {k for k in r["classes"] if k.startswith("dw|")}  # noqa: E731
    assert widths(ort) == widths(legoc)


def test_end_to_end_clock_follows_the_thread_count(monkeypatch, load_benchmark):
    """CPU time on 1 thread, wall clock on more (CPU time would add up both threads' work). The
    clocks are stand-ins that tick 1 ms (CPU) and 10 ms (wall) per reading: the real CPU clock
    counts every thread of this process, including TVM workers left spinning by earlier tests."""
    bench = load_benchmark("layers_vs_ort")

    class Clocks:
        cpu = wall = 0.0

        def process_time(self):
            self.cpu += 0.001
            return self.cpu

        def perf_counter(self):
            self.wall += 0.010
            return self.wall

    monkeypatch.setattr(bench, "time", Clocks())
    monkeypatch.setenv("TVM_NUM_THREADS", "1")
    assert bench._median_ms(lambda: None, warm=0, calls=3) == pytest.approx(1.0)
    monkeypatch.setenv("TVM_NUM_THREADS", "2")
    assert bench._median_ms(lambda: None, warm=0, calls=3) == pytest.approx(10.0)
