"""Profiles (issue 5): accuracy drop per variant, latency and memory with their sources, the
combination estimators, caching, and the Pareto plot."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from legoc.runtime.estimate import Profiles

# two blocks, a pooling head, 12x12 inputs; with VAL, 64 validation samples labelled by the
# full model (baseline accuracy 1.0)
SMALL = dict(size=12, head="pool")
VAL = dict(samples=64, batch=16, labels="model")


def _state(tmp_path, source: str):
    from legoc.modelfile import load_model_file
    from legoc.passes import PassManager, ProgramState
    from legoc.pipeline import CompileConfig, default_pipeline, train_batches, val_batches

    path = tmp_path / "model.py"
    path.write_text(source)
    spec = load_model_file(path)
    state = ProgramState(model=spec.model, example_inputs=spec.example_inputs, source=str(path),
                         **train_batches(spec), **val_batches(spec))
    cfg = CompileConfig(ratios=(0.0, 0.5, 0.75), blocks=2, progress=False, retrain_epochs=0)
    return PassManager(default_pipeline())(state, cfg).state


def test_accuracy_drop_is_measured_per_variant_in_two_contexts(tmp_path, monkeypatch, two_block_source):
    monkeypatch.setenv("LEGOC_CACHE", str(tmp_path / "cache"))
    state = _state(tmp_path, two_block_source(**SMALL, **VAL))
    acc = state.accuracy
    assert acc["metric"] == "top1" and "val_data (64 samples" in acc["how"]
    assert acc["baseline"] == 1.0
    assert set(acc["contexts"]) == {"others-full", "others-middle"}
    blocks = [s.name for s in state.partition.blocks]
    assert len(acc["variants"]) == sum(len(state.variants[b]) for b in blocks)
    for b in blocks:
        full = acc["variants"][(b, state.variants[b][0].id)]
        assert full["value"] == 0.0 and set(full["contexts"]) == {"others-full", "others-middle"}
    # the drop is the metric of the context minus the metric with the variant substituted: check one by hand
    from legoc.passes.profile import AccuracyProfiler

    b, v = blocks[0], state.variants[blocks[0]][2]
    model = lambda x: state.partition.run(x, replace={b: v.gm})  # noqa: E731
    correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in state.val_batches)
    assert acc["variants"][(b, v.id)]["measured"]["others-full"] == pytest.approx(1.0 - correct / 64)
    # a second profile of the same model is served from the disk cache: nothing recomputed
    again = AccuracyProfiler(state, state.val_batches)
    again.metric({b: 2})
    assert again.computed == 0 and again.reused == 1


def test_without_val_data_fidelity_is_recorded_as_such(tmp_path, monkeypatch, two_block_source):
    monkeypatch.setenv("LEGOC_CACHE", str(tmp_path / "cache"))
    acc = _state(tmp_path, two_block_source(**SMALL)).accuracy
    assert acc["metric"] == "fidelity" and "not an accuracy" in acc["how"]
    assert acc["baseline"] == pytest.approx(1.0)
    drops = [d["value"] for d in acc["variants"].values()]
    assert min(drops) == pytest.approx(0.0) and max(drops) > 0.0


def test_evaluate_hook_gets_val_data_and_must_not_see_other_inputs(tmp_path, monkeypatch, two_block_source):
    monkeypatch.setenv("LEGOC_CACHE", str(tmp_path / "cache"))
    source = two_block_source(**SMALL, **VAL) + '''
def evaluate(model, data):
    with torch.no_grad():
        return sum(float((model(x).argmax(1) == y).float().mean()) for x, y in data) / len(data)
'''
    acc = _state(tmp_path, source).accuracy
    assert acc["metric"] == "evaluate" and acc["baseline"] == 1.0


def test_host_manifest_carries_every_figure_with_its_source(artifact):
    m = artifact("mnist_resnet", "host", ratios=(0.0, 0.4, 0.8)).manifest
    assert m["accuracy"]["metric"] == "evaluate" and m["accuracy"]["baseline"] > 0.95
    for seg in m["segments"]:
        for v in seg["variants"]:
            p = v["profile"]
            assert p["peak_activation_bytes"]["source"].startswith("static") and p["peak_activation_bytes"]["value"] > 0
            assert p["latency_ms"]["source"] == "measured-local" and p["latency_ms"]["value"] > 0
            lo, hi = p["latency_ms"]["range_ms"]   # over the timing workers, the value their median
            assert 0 < lo <= p["latency_ms"]["value"] <= hi
            assert p["load_ms"]["source"] == "measured-local"
            assert p["accuracy_drop"]["source"] == "measured-local" and "val_data" in p["accuracy_drop"]["how"]
    val = m["combination"]["validation"]
    assert len(val) >= 3 and m["combination"]["call_overhead_ms"]["source"] == "measured-local"
    prof = Profiles(m)
    for v in val:   # the estimates recorded are those of the estimator, and every point was measured
        assert v["estimated"]["latency_ms"] == pytest.approx(prof.latency_ms(v["choice"]))
        assert v["measured"]["latency_ms"] > 0 and 0.0 <= v["measured"]["accuracy"] <= 1.0


def test_board_latency_is_estimated_not_measured(artifact):
    m = artifact("mnist_resnet", "raspberry-pi-4", ratios=(0.0, 0.5)).manifest
    for seg in m["segments"]:
        for v in seg["variants"]:
            lat = v["profile"]["latency_ms"]
            assert lat["source"] == "estimated" and lat["value"] > 0 and "GFLOP/s" in lat["how"]
            assert v["profile"]["load_ms"]["source"] == "estimated" and v["profile"]["load_ms"]["value"] > 0
    assert m["combination"]["validation"] == []
    # the per-call overhead is counted once per segment, not also inside every module's figure
    from legoc.targets.calibration import CALL_OVERHEAD_MS, EFFICIENCY, PEAKS

    cal, (eff, _) = PEAKS["raspberry-pi-4"], EFFICIENCY["cpu"]
    assert m["combination"]["call_overhead_ms"] == {**m["combination"]["call_overhead_ms"],
                                                    "value": CALL_OVERHEAD_MS["cpu"], "source": "estimated"}
    prof = Profiles(m)
    n = len(prof.blocks)
    compute = sum(2.0 * v["macs"] / (cal.peak_gflops * 1e9 * eff) * 1e3
                  for s in m["segments"] for v in [s["variants"][0]])
    assert prof.latency_ms([0] * n) == pytest.approx(compute + len(m["segments"]) * CALL_OVERHEAD_MS["cpu"])


def test_memory_estimate_is_not_below_the_measured_peak(artifact):
    from legoc.runtime.memory import measure_in_subprocess

    report = artifact("mnist_resnet", "host", ratios=(0.0, 0.4, 0.8))
    prof = Profiles(report.manifest)
    n = len(prof.blocks)
    for choice in ([0] * n, [2] * n, [0, 2] * (n // 2) + [1] * (n % 2)):
        measured = measure_in_subprocess(report.artifact, choice)["peak_bytes"]
        estimated = prof.memory_bytes(choice)
        assert measured > 0
        assert estimated >= measured, (choice, estimated, measured)
        assert estimated < 2 * measured   # an upper bound, but not a useless one


def test_latency_profiles_are_cached_per_module_and_target(tmp_path, monkeypatch, two_block_source):
    from legoc.pipeline import CompileConfig, compile_model

    monkeypatch.setenv("LEGOC_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "model.py"
    path.write_text(two_block_source(**SMALL, **VAL))
    cfg = dict(ratios=(0.0, 0.5), blocks=2, progress=False, retrain_epochs=0)
    first = compile_model(path, CompileConfig(output=tmp_path / "a.lego", **cfg))
    second = compile_model(path, CompileConfig(output=tmp_path / "b.lego", **cfg))
    variants = sum(len(s["variants"]) for s in first.manifest["segments"])
    assert first.latency_reused == 0 and second.latency_reused == variants
    assert second.manifest["accuracy"]["evaluations"] == 0      # every accuracy figure came from the cache
    lat = lambda m: [v["profile"]["latency_ms"]["value"] for s in m["segments"] for v in s["variants"]]  # noqa: E731
    assert lat(first.manifest) == lat(second.manifest)


def test_a_third_worker_settles_two_that_disagree(monkeypatch, tmp_path):
    """Module timings come from two worker processes; where they differ by more than 10% on any
    item a third one is asked, and every item's figure is the median over the workers."""
    from legoc.runtime import bench

    answers = []

    def fake(path, modules, combinations=(), inputs=None, **options):
        return {"modules": answers.pop(0), "combinations": [], "threads": 2}

    monkeypatch.setattr(bench, "measure_in_subprocess", fake)
    answers[:] = [[1.0, 2.0], [1.05, 2.1]]          # within 10%: two workers
    got = bench.measure_in_processes(tmp_path, [("block0", 0), ("block0", 1)], processes=2)
    assert got["modules"] == pytest.approx([1.025, 2.05]) and len(got["workers"]) == 2
    assert got["spread"]["modules"] == [(1.0, 1.05), (2.0, 2.1)]
    answers[:] = [[1.0, 2.0], [1.0, 4.5], [1.1, 2.2]]   # one slow spell on the second item: three
    got = bench.measure_in_processes(tmp_path, [("block0", 0), ("block0", 1)], processes=2)
    assert got["modules"] == pytest.approx([1.0, 2.2]) and len(got["workers"]) == 3 and answers == []
    assert got["spread"]["modules"][1] == (2.0, 4.5)


def _manifest(drops, lats, weights=None):
    """A minimal manifest with the fields the estimators read."""
    segs = []
    for b, (ds, ls) in enumerate(zip(drops, lats)):
        vs = []
        for i, (d, lat) in enumerate(zip(ds, ls)):
            w = (weights or {}).get((b, i), {"file": f"w{b}{i}", "bytes": 100 * (i + 1), "sha256": ""})
            vs.append({"id": f"v{i}", "ratio": i / 10, "module": {"bytes": 1000}, "weights": w,
                       "profile": {"latency_ms": {"value": lat, "source": "measured-local"},
                                   "accuracy_drop": {"value": d}, "peak_activation_bytes": {"value": 10}}})
        segs.append({"name": f"block{b}", "kind": "block", "variants": vs})
    return {"segments": segs, "accuracy": {"baseline": 0.9, "metric": "top1"},
            "combination": {"call_overhead_ms": {"value": 0.5}, "module_overhead_bytes": 7}}


@settings(max_examples=40, deadline=None)
# drops to 1e-6 of the metric, the resolution the solver works at: drops of 1e-12 let the two
# paths' float sums break ties differently (hypothesis found [[(0, 2), (1e-12, 1)]] * 2)
@given(st.lists(st.lists(st.tuples(st.floats(0, 0.2).map(lambda d: round(d, 6)), st.floats(0.1, 10)),
                         min_size=1, max_size=4), min_size=1, max_size=4))
def test_pareto_front_equals_brute_force(blocks):
    m = _manifest([[d for d, _ in b] for b in blocks], [[lat for _, lat in b] for b in blocks])
    prof = Profiles(m)
    allc = list(prof.all_choices())
    pts = {c: (prof.latency_ms(c), prof.accuracy(c)) for c in allc}
    front = prof.pareto_front()
    front_dp = prof.pareto_front(limit=0)   # the DP path gives the same front
    assert [e for _, e in front] == [e for _, e in front_dp]
    eps = 1e-9
    for c, e in front:   # nothing strictly better in both
        assert not any(l2 <= e.latency_ms - eps and a2 >= e.accuracy + eps for l2, a2 in pts.values())
    for c, (lat, acc) in pts.items():   # everything else is weakly dominated by a front point
        assert any(e.latency_ms <= lat + eps and e.accuracy >= acc - eps for _, e in front)


def test_estimators_add_up_and_count_shared_weights_once():
    shared = {"file": "weights/block0/shared.safetensors", "bytes": 4000, "sha256": ""}
    weights = {(0, i): {"shared": shared, "names": ["w"], "shapes": [[10 * (2 - i)]]} for i in range(2)}
    m = _manifest([[0.0, 0.05], [0.0, 0.1]], [[4.0, 2.0], [3.0, 1.0]], weights)
    prof = Profiles(m)
    assert prof.accuracy([1, 1]) == pytest.approx(0.9 - 0.15)
    assert prof.latency_ms([1, 0]) == pytest.approx(2.0 + 3.0 + 2 * 0.5)
    # block0 nested: 40 bytes of its slice + the shared file once; block1: its own file (100 bytes)
    assert prof.memory_bytes([1, 0]) == (1000 + 40 + 10 + 7) + (1000 + 100 + 10 + 7) + 4000
    both = prof.memory_of([prof.blocks[0][0], prof.blocks[0][1]])
    assert both == (1000 + 80 + 10 + 7) + (1000 + 40 + 10 + 7) + 4000   # shared file held once
    assert prof.switch_bytes([0, 0], [0, 1]) == 1000 + 200
    assert prof.switch_bytes([0, 0], [1, 0]) == 1000     # nested: the shared file is already read
    assert prof.switch_bytes(None, [0, 0]) == 1000 + 1000 + 100


def test_inspect_plots_the_pareto_front(artifact, tmp_path, capsys):
    from legoc.cli import main

    report = artifact("mnist_resnet", "host", ratios=(0.0, 0.4, 0.8))
    png = tmp_path / "pareto.png"
    assert main(["inspect", str(report.artifact), "--plot", str(png), "--graph", str(tmp_path / "g.svg")]) == 0
    out = capsys.readouterr().out
    assert png.stat().st_size > 10_000 and (tmp_path / "g.svg").is_file()
    assert "estimate vs measurement" in out and "acc. drop" in out
    # an artifact for a board without accuracy data cannot draw a front: one clear line
    m = json.loads((Path(report.artifact) / "manifest.json").read_text())
    m["accuracy"] = None
    from legoc.errors import UserError
    from legoc.plot import plot_pareto

    with pytest.raises(UserError, match="no accuracy or latency figure"):
        plot_pareto(m, tmp_path / "x.png")
