"""Runtime scaling (issue 6): CP-SAT selection equals brute force, infeasible budgets are clear
errors, switching loads only what changes within an LRU cache, joint selection for several
models, and inference stays consistent while another thread reconfigures."""
from __future__ import annotations

import itertools
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from legoc.errors import UserError
from legoc.runtime.estimate import Profiles
from legoc.runtime.solver import MIB, Budget, Problem, solve


def _manifest(costs):
    """costs[b][v] = (drop, latency_ms, weight bytes)."""
    segs = []
    for b, vs in enumerate(costs):
        segs.append({"name": f"block{b}", "kind": "block", "variants": [
            {"id": f"v{i}", "ratio": i / 10, "module": {"bytes": 1000},
             "weights": {"file": f"w{b}{i}", "bytes": int(w), "sha256": ""},
             "profile": {"latency_ms": {"value": lat, "source": "measured-local"}, "accuracy_drop": {"value": d},
                         "load_ms": {"value": 1.0, "source": "measured-local"},
                         "peak_activation_bytes": {"value": 0}}} for i, (d, lat, w) in enumerate(vs)]})
    return {"segments": segs, "accuracy": {"baseline": 0.9, "metric": "top1"},
            "combination": {"call_overhead_ms": {"value": 0.1}, "module_overhead_bytes": 1}}


variant = st.tuples(st.floats(0, 0.3), st.floats(0.1, 10), st.integers(0, 3 * MIB))
instances = st.lists(st.lists(variant, min_size=1, max_size=4), min_size=1, max_size=4)


def _brute(problems, memory_mb=None, shared_latency_ms=None):
    best = None
    for combo in itertools.product(*[list(p.profiles.all_choices()) for p in problems]):
        ok, value, mem, lat = True, 0.0, 0, 0.0
        for p, c in zip(problems, combo):
            e = p.profiles.estimate(c)
            b = p.budget
            ok &= b.latency_ms is None or e.latency_ms <= b.latency_ms
            ok &= b.memory_mb is None or e.memory_bytes <= b.memory_mb * MIB
            ok &= b.min_accuracy is None or e.accuracy >= b.min_accuracy
            value += p.weight * e.accuracy
            mem += e.memory_bytes
            lat += e.latency_ms
        ok &= memory_mb is None or mem <= memory_mb * MIB
        ok &= shared_latency_ms is None or lat <= shared_latency_ms
        if ok and (best is None or value > best[0]):
            best = (value, combo)
    return best


@settings(max_examples=60, deadline=None)
@given(instances, st.floats(0.2, 1.0), st.floats(0.2, 1.0))
def test_single_model_selection_equals_brute_force(costs, lat_frac, mem_frac):
    prof = Profiles(_manifest(costs))
    lats = [prof.latency_ms(c) for c in prof.all_choices()]
    mems = [prof.memory_bytes(c) for c in prof.all_choices()]
    budget = Budget(latency_ms=min(lats) + lat_frac * (max(lats) - min(lats)) + 1e-3,
                    memory_mb=(min(mems) + mem_frac * (max(mems) - min(mems))) / MIB + 1e-6)
    problem = Problem(prof, budget)
    best = _brute([problem])
    if best is None:
        with pytest.raises(UserError, match="no configuration meets the budget"):
            solve([problem])
        return
    sel = solve([problem], switch_penalty=0.0)
    assert sel.optimal and sel.status == "OPTIMAL"
    e = sel.estimate
    assert e.latency_ms <= budget.latency_ms + 1e-9 and e.memory_bytes <= budget.memory_mb * MIB
    # equal to brute force up to the stated integer-scaling tolerance
    assert e.accuracy == pytest.approx(best[0], abs=len(costs) * 1e-6 + 1e-9)


@settings(max_examples=25, deadline=None)
@given(st.lists(instances, min_size=2, max_size=3), st.floats(0.3, 1.0), st.booleans())
def test_joint_selection_equals_brute_force(models, frac, shared_time):
    problems = [Problem(Profiles(_manifest(c)), weight=1.0 + k, name=f"m{k}") for k, c in enumerate(models)]
    if np.prod([p.profiles.combinations() for p in problems]) > 5000:
        return
    mem = sum(max(p.profiles.memory_bytes(c) for c in p.profiles.all_choices()) for p in problems) * frac / MIB
    lat = sum(max(p.profiles.latency_ms(c) for c in p.profiles.all_choices()) for p in problems) * frac
    kw = {"memory_mb": mem, "shared_latency_ms": lat if shared_time else None}
    best = _brute(problems, **kw)
    if best is None:
        with pytest.raises(UserError):
            solve(problems, **kw)
        return
    sel = solve(problems, switch_penalty=0.0, **kw)
    value = sum(p.weight * e.accuracy for p, e in zip(problems, sel.estimates))
    assert sel.optimal and value == pytest.approx(best[0], abs=1e-5)
    assert sum(e.memory_bytes for e in sel.estimates) <= mem * MIB


def test_switching_charge_keeps_loaded_blocks():
    # two blocks; variant 1 of block 0 is a hair more accurate, but switching to it costs a load
    costs = [[(0.0010, 2.0, 100), (0.0009, 2.0, 100)], [(0.0, 1.0, 100), (0.05, 0.5, 100)]]
    prof = Profiles(_manifest(costs))
    fresh = solve([Problem(prof, Budget(latency_ms=10))], switch_penalty=0.0)
    assert fresh.choice == (1, 0)
    sticky = solve([Problem(prof, Budget(latency_ms=10), current=[0, 0], loaded={(0, 0), (1, 0)})])
    assert sticky.choice == (0, 0)     # 1e-4 of accuracy is not worth a 1 ms module load (1e-3)
    cached = solve([Problem(prof, Budget(latency_ms=10), current=[0, 0], loaded={(0, 0), (0, 1), (1, 0)})])
    assert cached.choice == (1, 0)     # already in the cache: no charge


def test_slowed_profiles_scale_every_latency_and_change_the_choice():
    # block 0: full (4 ms, exact) or pruned (1 ms, -0.1); at the profiled speed 6 ms fits the full one
    prof = Profiles(_manifest([[(0.0, 4.0, 100), (0.1, 1.0, 50)], [(0.0, 1.0, 100)]]))
    assert solve([Problem(prof, Budget(latency_ms=6.0))]).choice == (0, 0)
    slow = prof.slowed(1.5)
    for choice in prof.all_choices():
        assert slow.latency_ms(choice) == pytest.approx(1.5 * prof.latency_ms(choice))
        assert slow.accuracy(choice) == prof.accuracy(choice)
        assert slow.memory_bytes(choice) == prof.memory_bytes(choice)
    picked = solve([Problem(slow, Budget(latency_ms=6.0))])   # 1.5 x (4 + 1 + 0.2) = 7.8 ms > 6
    assert picked.choice == (1, 0) and picked.estimate.latency_ms == pytest.approx(1.5 * 2.2)
    assert prof.slowed(1.0) is prof


def test_infeasible_budget_states_what_is_reachable():
    prof = Profiles(_manifest([[(0.0, 4.0, 100), (0.1, 1.0, 50)]]))
    with pytest.raises(UserError) as err:
        solve([Problem(prof, Budget(latency_ms=0.5))])
    assert str(err.value) == ("no configuration meets the budget (latency ≤ 0.5 ms): smallest latency 1.10 ms, "
                              "smallest memory 0.00 MiB, best accuracy 0.9000; relax the budget")
    with pytest.raises(UserError, match="latency_ms must be a positive number"):
        Budget(latency_ms=-1)


@pytest.fixture(scope="module")
def mnist(artifact):
    return artifact("mnist_resnet", "host", ratios=(0.0, 0.4, 0.8)).artifact


def _fastest_ms(m) -> float:
    """The smallest estimated latency over every combination of variants (brute force)."""
    import itertools

    counts = [len(b.variants) for b in m.blocks]
    return min(m.profiles.latency_ms(list(c)) for c in itertools.product(*map(range, counts)))


def test_configure_by_budget_switches_only_changed_blocks(mnist):
    from legoc.runtime import load

    m = load(mnist)
    prof = m.profiles
    full = prof.latency_ms([0] * len(m.blocks))
    m.configure(latency_ms=full * 1.5)
    assert m.choice == tuple(m.last_selection.choice) and m.last_selection.optimal
    assert m.last_switch_loaded == len(m.segments)
    tight = _fastest_ms(m) * 1.05
    assert tight < full      # the pruned variants are faster (else the test proves nothing)
    before_choice = m.choice
    m.configure(latency_ms=tight)
    est = m.last_selection.estimate
    assert est.latency_ms <= tight
    changed = sum(a != b for a, b in zip(before_choice, m.choice))
    assert changed > 0 and m.last_switch_loaded == changed   # only the changed blocks were loaded
    before = m.modules_loaded
    m.configure(latency_ms=full * 1.5)      # back: everything it needs is cached
    assert m.modules_loaded == before and m.last_switch_loaded == 0
    with pytest.raises(UserError, match="smallest latency"):
        m.configure(latency_ms=0.001)


def test_selection_adapts_to_the_observed_slowdown(mnist):
    from legoc.runtime import load

    m = load(mnist, adapt_to_speed=True)
    n = len(m.blocks)
    m.configure(variants=[0] * n)
    assert m.slowdown() is None                     # no calls observed yet
    x = np.zeros(m.input_shapes[0], np.float32)
    for _ in range(10):
        m(x)
    observed = m.slowdown()
    assert observed is not None and 0.25 <= observed <= 4.0
    full = m.profiles.latency_ms([0] * n)
    budget = full * 1.05
    # a board at 3x its profiled latency (throttled, or another app on the cores): the latest
    # calls in this configuration took 3x the estimate
    m._call_ms.clear()
    m._call_ms.extend([3.0 * full] * 16)
    assert m.slowdown() == pytest.approx(3.0)
    slowed = m.select(latency_ms=3.0 * budget)
    assert slowed.choice == (0,) * n and slowed.estimate.latency_ms == pytest.approx(3.0 * full)
    tight = m.select(latency_ms=3.0 * full * 0.8)
    assert tight.choice != (0,) * n and tight.estimate.latency_ms <= 3.0 * full * 0.8
    m.adapt_to_speed = False                         # as profiled: the full model fits 0.8 x 3 x full
    assert m.select(latency_ms=3.0 * full * 0.8).choice == (0,) * n
    m.adapt_to_speed = True
    m.configure(variants=[1] + [0] * (n - 1))        # a new configuration: the old times no longer apply
    assert m.slowdown() is None


def test_lru_cache_stays_within_the_memory_budget(mnist):
    from legoc.runtime import load

    m = load(mnist)
    n = len(m.blocks)
    m.configure(variants=[0] * n)
    m.preload([1] * n).preload([2] * n)
    assert len(m._cache) == 3 * n
    limit_mb = m.profiles.memory_bytes([2] * n) / MIB + 0.01
    m.configure(variants=[2] * n, memory_mb=limit_mb)
    assert m.held_bytes <= limit_mb * MIB and m.modules_evicted >= 2 * n
    assert sorted(m._cache) == sorted((b.name, 2) for b in m.blocks)


def test_concurrent_inference_never_mixes_configurations(mnist):
    from legoc.runtime import load

    m = load(mnist)
    n = len(m.blocks)
    x = np.random.default_rng(0).standard_normal(m.input_shapes[0]).astype(np.float32)
    configs = [[0] * n, [2] * n, [0, 2] * (n // 2)]
    expected = [np.asarray(m.configure(variants=c)(x)) for c in configs]
    assert min(np.abs(a - b).max() for a, b in itertools.combinations(expected, 2)) > 1e-3
    errors, outputs = [], []

    def infer():
        try:
            for _ in range(250):
                outputs.append(np.asarray(m(x)))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def reconfigure():
        try:
            for k in range(100):
                m.configure(variants=configs[k % len(configs)])
        except Exception as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=infer) for _ in range(4)] + [threading.Thread(target=reconfigure)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(outputs) == 1000
    mixed = [o for o in outputs if not any(np.allclose(o, e, rtol=0, atol=1e-6) for e in expected)]
    assert not mixed


def test_scheduler_selects_jointly_under_shared_memory_and_time(mnist):
    from legoc.runtime import Scheduler, load

    a, b = load(mnist), load(mnist)
    n = len(a.blocks)
    one_full, fastest = a.profiles.latency_ms([0] * n), _fastest_ms(a)
    assert fastest < one_full
    # room for both at their fastest plus part of the gap: they cannot both run full
    period = 2 * fastest + 0.5 * (one_full - fastest)
    s = Scheduler([a, b], weights=[3.0, 1.0])
    sel = s.configure(period_ms=period)
    lat = [e.latency_ms for e in sel.estimates]
    assert sum(lat) <= period and sel.optimal
    assert sel.estimates[0].accuracy >= sel.estimates[1].accuracy    # the heavier-weighted model gets more
    assert a.choice == sel.choices[0] and b.choice == sel.choices[1]
    with pytest.raises(UserError, match="either per-model latency_ms or one period_ms"):
        s.configure(latency_ms=[10, 10], period_ms=10)
    per = s.configure(latency_ms=[one_full * 1.1, fastest * 1.05], memory_mb=20)
    assert per.estimates[1].latency_ms <= fastest * 1.05


def test_a_shared_time_budget_never_counts_a_missing_latency_as_zero():
    costs = [[(0.0, 1.0, 100), (0.01, 0.5, 50)] for _ in range(2)]
    m = _manifest(costs)
    m["segments"][1]["variants"][1]["profile"]["latency_ms"]["value"] = None   # e.g. a board never measured
    with pytest.raises(UserError, match="no latency figure .* schedule it without period_ms"):
        solve([Problem(Profiles(m))], shared_latency_ms=5.0)
    assert solve([Problem(Profiles(m))]).choice == (0, 0)    # without a time budget it is not needed


def test_scheduler_keeps_every_models_modules_within_the_shared_memory_budget(mnist):
    from legoc.runtime import Scheduler, load

    a, b = load(mnist), load(mnist)
    n = len(a.blocks)
    for m in (a, b):   # both hold every variant, as after a day of budget changes
        m.configure(variants=[0] * n).preload([1] * n).preload([2] * n)
    budget = (a.profiles.memory_bytes([0] * n) + a.profiles.memory_bytes([2] * n)) / MIB
    sel = Scheduler([a, b]).configure(memory_mb=budget)
    assert sum(e.memory_bytes for e in sel.estimates) <= budget * MIB
    assert a.held_bytes + b.held_bytes <= budget * MIB


def test_runtime_still_imports_no_torch(mnist, tmp_path):
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None\n"
            "import numpy as np\nfrom legoc.runtime import load, Scheduler\n"
            f"m = load({str(mnist)!r})\n"
            "m.configure(latency_ms=1000.0)\n"
            "print(m.choice, m(np.zeros(m.input_shapes[0], np.float32)).shape)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "(1, 10)" in out.stdout
