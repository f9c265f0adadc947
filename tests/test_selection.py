"""Selection that uses its budget (issue 21): accuracy drops estimated from a per-sample signal
finer than validation noise, never below zero inside the noise, and ties broken toward capacity."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from legoc.passes.profile import Drop, calibrate, paired
from legoc.runtime.estimate import Profiles
from legoc.runtime.solver import Budget, Problem, capacity_terms, solve


def _manifest(costs, samples=1000):
    """costs[b][v] = (drop, latency_ms, macs)."""
    segs = [{"name": f"block{b}", "kind": "block", "variants": [
        {"id": f"v{i}", "ratio": i / 10, "macs": macs, "module": {"bytes": 1000},
         "weights": {"file": f"w{b}{i}", "bytes": 100, "sha256": ""},
         "profile": {"latency_ms": {"value": lat, "source": "measured-local"}, "accuracy_drop": {"value": d},
                     "load_ms": {"value": 1.0, "source": "measured-local"}, "peak_activation_bytes": {"value": 0}}}
        for i, (d, lat, macs) in enumerate(vs)]} for b, vs in enumerate(costs)]
    return {"segments": segs, "accuracy": {"baseline": 0.98, "metric": "top1", "samples": samples},
            "combination": {"call_overhead_ms": {"value": 0.1}, "module_overhead_bytes": 1}}


def test_equal_estimates_pick_the_configuration_that_keeps_the_most_macs():
    # every variant estimated as good as full size (the noise case of issue 21): a budget that fits
    # the full model must get it, a tighter one the largest configuration that fits
    costs = [[(0.0, 1.0, 100), (0.0, 0.6, 50), (0.0, 0.3, 20)] for _ in range(4)]
    prof = Profiles(_manifest(costs))
    assert solve([Problem(prof, Budget(latency_ms=10.0))]).choice == (0, 0, 0, 0)
    sel = solve([Problem(prof, Budget(latency_ms=3.5))])
    assert sel.estimate.latency_ms <= 3.5
    fits = [c for c in prof.all_choices() if prof.latency_ms(c) <= 3.5]
    assert prof.capacity(sel.choice) == max(prof.capacity(c) for c in fits)


def test_the_capacity_reward_never_outweighs_a_real_accuracy_difference():
    # one validation sample of 1,000 is 0.001: a pruned variant better by that is still preferred
    costs = [[(0.0, 1.0, 100), (-0.001, 0.5, 10)], [(0.0, 1.0, 100), (0.0, 0.5, 10)]]
    prof = Profiles(_manifest(costs))
    assert solve([Problem(prof, Budget(latency_ms=10.0))]).choice == (1, 0)
    assert sum(max(r) for r in capacity_terms(prof)) == round(0.5 / 1000 * 1e6)


variant = st.tuples(st.sampled_from([0.0, 0.0005, 0.001, 0.01]), st.floats(0.1, 5), st.integers(1, 100))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(variant, min_size=1, max_size=4), min_size=1, max_size=4), st.floats(0.2, 1.0))
def test_selection_with_the_capacity_reward_equals_brute_force(costs, frac):
    prof = Profiles(_manifest(costs, samples=200))
    lats = [prof.latency_ms(c) for c in prof.all_choices()]
    budget = min(lats) + frac * (max(lats) - min(lats)) + 1e-5   # latencies round up to 1 ns
    sel = solve([Problem(prof, Budget(latency_ms=budget))])
    reward = capacity_terms(prof)
    value = lambda c: round(prof.accuracy(c) * 1e6) + sum(r[i] for r, i in zip(reward, c))  # noqa: E731
    best = max(value(c) for c in prof.all_choices() if prof.latency_ms(c) <= budget)
    assert sel.optimal and abs(value(sel.choice) - best) <= len(costs)   # integer rounding per block


def test_paired_interval_and_calibration():
    ref = np.array([1.0] * 90 + [0.0] * 10)
    var = ref.copy()
    var[:5] = 0.0                                    # 5 of 100 answers lost
    mean, lo, hi = paired(ref, var)
    assert mean == pytest.approx(0.05) and lo < 0.05 < hi and hi - lo < 0.1
    _, lo, hi = paired(ref, ref, floor=0.03)          # nothing changed: still not a zero-width interval
    assert (lo, hi) == (-0.03, 0.03)
    assert calibrate([(0.1, 0.02), (0.2, 0.04), (0.0, 0.001)]) == pytest.approx(0.2, rel=0.01)
    assert calibrate([(0.0, 0.01)]) is None and calibrate([(0.1, -0.02)]) is None


@settings(max_examples=200, deadline=None)
@given(st.floats(-0.05, 0.05), st.floats(0.0, 0.03), st.floats(-0.01, 0.5), st.floats(0.0, 0.05),
       st.one_of(st.none(), st.floats(0.01, 2.0)))
def test_an_estimated_drop_is_below_zero_only_when_an_interval_says_so(m, mh, s, sh, alpha):
    d = Drop(metric=m, metric_ci=(m - mh, m + mh), signal=s, signal_ci=(s - sh, s + sh))
    est = d.estimate(alpha)
    if est < 0:
        assert m + mh < 0 or s + sh < 0
    if alpha is not None and m - mh <= alpha * max(s, 0) <= m + mh and s + sh >= 0:
        assert est == pytest.approx(alpha * max(s, 0))   # inside the metric's noise: the signal decides


# two blocks whose drops are pure noise: val_data's labels are at chance, so every pruned
# variant's top-1 drop is noise, some of it below zero
NOISY = dict(size=12, head="flatten-nobias", samples=256, batch=64, labels="random")


@pytest.fixture(scope="module")
def noisy(tmp_path_factory, two_block_source):
    """The NOISY model compiled with ratios 0, 0.5, 0.75 and 2 blocks (its own empty cache)."""
    from legoc.pipeline import CompileConfig, compile_model

    tmp = tmp_path_factory.mktemp("noisy")
    path = tmp / "model.py"
    path.write_text(two_block_source(**NOISY))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LEGOC_CACHE", str(tmp / "cache"))
        return compile_model(path, CompileConfig(output=tmp / "noisy.lego", ratios=(0.0, 0.5, 0.75), blocks=2,
                                                 progress=False, retrain_epochs=0))


def test_a_budget_that_fits_full_size_gets_full_size_when_drops_are_noise(noisy):
    from legoc.runtime import load

    report = noisy
    variants = [v for s in report.manifest["segments"] if s["kind"] == "block" for v in s["variants"]]
    measured = [x for v in variants for x in v["profile"]["accuracy_drop"]["measured"].values()]
    assert min(measured) < 0, "the scenario needs a variant measured better than full size inside the noise"
    for v in variants:
        drop = v["profile"]["accuracy_drop"]
        lo, hi = drop["measured_ci95"]
        assert drop["value"] >= 0 or hi < 0    # never below zero unless the interval says so
        assert lo <= drop["measured"]["others-full"] <= hi or lo <= drop["measured"]["others-middle"] <= hi
    m = load(report.artifact)
    prof = m.profiles
    full = prof.latency_ms([0] * len(prof.blocks))
    m.configure(latency_ms=full * 1.5)
    assert m.choice == (0,) * len(prof.blocks)


def test_inspect_shows_the_interval_and_the_signal(noisy, capsys):
    from legoc.cli import main

    out = noisy.artifact
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "95%" in text and "KL divergence" in text


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(variant, min_size=1, max_size=4), min_size=1, max_size=3), st.floats(0.05, 0.95))
def test_best_effort_under_an_unmeetable_budget_is_the_fastest_configuration(costs, frac):
    # a budget below the fastest configuration: an error by default; with best_effort the
    # configuration that exceeds it least (the fastest), flagged as not within the budget
    from legoc.runtime.solver import Infeasible

    prof = Profiles(_manifest(costs, samples=200))
    fastest = min(prof.latency_ms(c) for c in prof.all_choices())
    budget = frac * fastest
    with pytest.raises(Infeasible):
        solve([Problem(prof, Budget(latency_ms=budget))])
    sel = solve([Problem(prof, Budget(latency_ms=budget))], best_effort=True)
    assert not sel.within_budget
    assert sel.estimate.latency_ms <= fastest + 1e-5 * (len(costs) + 1)
    # a budget that can be met is met as before, flagged within it
    ok = solve([Problem(prof, Budget(latency_ms=fastest + 1e-5 * (len(costs) + 1)))], best_effort=True)
    assert ok.within_budget and ok.estimate.latency_ms <= fastest + 1e-5 * (len(costs) + 1)


def test_best_effort_shares_the_excess_of_a_shared_period_budget():
    costs = [[(0.0, 2.0, 100), (0.01, 1.0, 50)] for _ in range(2)]
    a, b = Profiles(_manifest(costs)), Profiles(_manifest(costs))
    sel = solve([Problem(a), Problem(b)], shared_latency_ms=1.0, best_effort=True)
    assert not sel.within_budget and sel.choices == ((1, 1), (1, 1))
    # memory stays a hard limit
    from legoc.runtime.solver import Infeasible
    with pytest.raises(Infeasible):
        solve([Problem(a), Problem(b)], shared_latency_ms=1.0, memory_mb=1e-6, best_effort=True)
