"""The solver's documented constraints that no other test ran (issue 17): ``min_accuracy``,
``block_latency_ms`` and ``allowed`` (legoc.runtime.solver.Budget), alone and together with the
latency and memory budgets, against brute force over every configuration of small random
instances; then the same constraints through ``Model.select`` and ``legoc select`` on a compiled
artifact."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from legoc.errors import UserError
from legoc.runtime.estimate import Profiles
from legoc.runtime.solver import MIB, Budget, Problem, capacity_terms, solve

BASELINE = 0.9
GRID = 0.001        # drops are multiples of this; accuracy thresholds lie half-way between them
LAT_GRID = 0.01     # latencies are multiples of this (ms); latency limits lie half-way between them


def _manifest(costs, frame_ms: float = 0.2):
    """costs[b][v] = (drop steps, latency steps, weight bytes, MACs); one frame segment after the
    blocks. Every figure is on a grid so that no budget lies within rounding of a configuration."""
    segs = [{"name": f"block{b}", "kind": "block", "variants": [
        {"id": f"r{i}", "ratio": i / 10, "macs": macs, "module": {"bytes": 1000},
         "weights": {"file": f"w{b}{i}", "bytes": wb, "sha256": ""},
         "profile": {"latency_ms": {"value": lat * LAT_GRID, "source": "measured-local"},
                     "accuracy_drop": {"value": d * GRID}, "load_ms": {"value": 1.0, "source": "measured-local"},
                     "peak_activation_bytes": {"value": 0}}} for i, (d, lat, wb, macs) in enumerate(vs)]}
        for b, vs in enumerate(costs)]
    segs.append({"name": "frame0", "kind": "frame", "variants": [
        {"id": "frame", "ratio": 0.0, "module": {"bytes": 500}, "weights": {"file": "wf", "bytes": 64, "sha256": ""},
         "profile": {"latency_ms": {"value": frame_ms, "source": "measured-local"},
                     "peak_activation_bytes": {"value": 0}}}]})
    return {"segments": segs, "accuracy": {"baseline": BASELINE, "metric": "top1", "samples": 1000},
            "combination": {"call_overhead_ms": {"value": 0.05}, "module_overhead_bytes": 1}}


def _objective(prof: Profiles, choice) -> int:
    """The solver's objective in its integer units: accuracy (1e-6) plus the capacity tie-break."""
    reward = capacity_terms(prof)
    return round(prof.accuracy(choice) * 1e6) + sum(r[i] for r, i in zip(reward, choice))


def _meets(prof: Profiles, budget: Budget, choice) -> bool:
    """Whether ``choice`` meets every limit of ``budget`` (computed from the estimates directly)."""
    e = prof.estimate(choice)
    for b, (name, i) in enumerate(zip(prof.block_names, choice)):
        if name in budget.allowed and i not in budget.allowed[name]:
            return False
        if name in budget.block_latency_ms and prof.blocks[b][i].latency_ms > budget.block_latency_ms[name]:
            return False
    return ((budget.latency_ms is None or e.latency_ms <= budget.latency_ms)
            and (budget.memory_mb is None or e.memory_bytes <= budget.memory_mb * MIB)
            and (budget.min_accuracy is None or e.accuracy >= budget.min_accuracy))


def _brute(prof: Profiles, budget: Budget):
    """The best objective over every configuration that meets ``budget`` (None: none does)."""
    values = [_objective(prof, c) for c in prof.all_choices() if _meets(prof, budget, c)]
    return max(values) if values else None


def _check(prof: Profiles, budget: Budget) -> str:
    """CP-SAT's answer equals brute force's: the same optimum, every limit met, or both infeasible."""
    best = _brute(prof, budget)
    if best is None:
        with pytest.raises(UserError, match="no configuration meets the budget"):
            solve([Problem(prof, budget)])
        return "infeasible"
    sel = solve([Problem(prof, budget)])
    assert sel.optimal and sel.within_budget
    assert _meets(prof, budget, sel.choice), (sel.choice, budget)
    # objective exact up to the stated integer rounding (one unit per block)
    assert abs(_objective(prof, sel.choice) - best) <= len(prof.blocks), (sel.choice, budget)
    return "optimal"


variant = st.tuples(st.integers(0, 60), st.integers(5, 300), st.integers(0, 4096), st.integers(1, 1000))
instances = st.lists(st.lists(variant, min_size=1, max_size=4), min_size=1, max_size=4)


def _threshold(prof: Profiles, frac: float) -> float:
    """A minimum accuracy between the worst and the best configuration, half-way between grid steps."""
    accs = [prof.accuracy(c) for c in prof.all_choices()]
    lo, hi = min(accs), max(accs)
    steps = math.floor((hi - (lo + frac * (hi - lo))) / GRID + 1e-9)
    return hi - steps * GRID - GRID / 2


@settings(max_examples=60, deadline=None)
@given(instances, st.floats(0.0, 1.0))
def test_min_accuracy_equals_brute_force(costs, frac):
    prof = Profiles(_manifest(costs))
    _check(prof, Budget(min_accuracy=_threshold(prof, frac)))


def _block_latency_limit(data, name, variants):
    # half-way below one of the block's own latencies (the smallest: nothing fits)
    lats = sorted(v.latency_ms for v in variants)
    return data.draw(st.sampled_from(lats), label=f"{name} limit") - LAT_GRID / 2


def _allowed_variants(data, name, variants):
    return data.draw(st.lists(st.integers(0, len(variants) - 1), max_size=len(variants), unique=True),
                     label=f"{name} allowed")


@pytest.mark.parametrize("field, draw", [("block_latency_ms", _block_latency_limit), ("allowed", _allowed_variants)])
@settings(max_examples=60, deadline=None)
@given(instances, st.data())
def test_per_block_constraints_equal_brute_force(field, draw, costs, data):
    # Budget.block_latency_ms or Budget.allowed on a random subset of the blocks
    prof = Profiles(_manifest(costs))
    per_block = {}
    for name, vs in zip(prof.block_names, prof.blocks):
        if data.draw(st.booleans(), label=f"constrain {name}"):
            per_block[name] = draw(data, name, vs)
    _check(prof, Budget(**{field: per_block}))


@settings(max_examples=80, deadline=None)
@given(instances, st.data())
def test_every_constraint_together_equals_brute_force(costs, data):
    prof = Profiles(_manifest(costs))
    names = prof.block_names
    lats = sorted({prof.latency_ms(c) for c in prof.all_choices()})
    mems = sorted({prof.memory_bytes(c) for c in prof.all_choices()})
    limits = {n: max(v.latency_ms for v in vs) - LAT_GRID / 2 for n, vs in zip(names, prof.blocks)
              if len(vs) > 1 and data.draw(st.booleans(), label=f"limit {n}")}
    allowed = {n: data.draw(st.lists(st.integers(0, len(vs) - 1), min_size=1, max_size=len(vs), unique=True),
                            label=f"{n} allowed")
               for n, vs in zip(names, prof.blocks) if data.draw(st.booleans(), label=f"restrict {n}")}
    budget = Budget(
        latency_ms=data.draw(st.sampled_from(lats), label="latency") + LAT_GRID / 2,
        memory_mb=data.draw(st.sampled_from(mems), label="memory") / MIB + 1e-9,
        min_accuracy=_threshold(prof, data.draw(st.floats(0.0, 1.0), label="accuracy")),
        block_latency_ms=limits, allowed=allowed)
    _check(prof, budget)


def test_the_brute_force_cases_reach_both_outcomes():
    # the properties above are only worth something if both branches of _check run
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(40):
        costs = [[(int(rng.integers(0, 60)), int(rng.integers(5, 300)), int(rng.integers(0, 4096)),
                   int(rng.integers(1, 1000))) for _ in range(3)] for _ in range(3)]
        prof = Profiles(_manifest(costs))
        seen.add(_check(prof, Budget(min_accuracy=_threshold(prof, float(rng.uniform(0.5, 1.0))),
                                     block_latency_ms={"block1": 150 * LAT_GRID + LAT_GRID / 2},
                                     allowed={"block0": [1, 2]})))
    assert seen == {"optimal", "infeasible"}


def test_joint_min_accuracy_per_model_equals_brute_force():
    # two models, each with its own minimum accuracy, sharing memory: the weighted optimum
    rng = np.random.default_rng(3)
    for trial in range(15):
        profs = [Profiles(_manifest([[(int(rng.integers(0, 40)), int(rng.integers(5, 200)), int(rng.integers(0, 4096)),
                                       int(rng.integers(1, 500))) for _ in range(3)] for _ in range(2)]))
                 for _ in range(2)]
        budgets = [Budget(min_accuracy=_threshold(p, float(rng.uniform(0.3, 0.9)))) for p in profs]
        shared = sum(max(p.memory_bytes(c) for c in p.all_choices()) for p in profs) * 0.8 / MIB
        best = None
        for combo in itertools.product(*[list(p.all_choices()) for p in profs]):
            if all(_meets(p, b, c) for p, b, c in zip(profs, budgets, combo)) and \
                    sum(p.memory_bytes(c) for p, c in zip(profs, combo)) <= shared * MIB:
                value = sum(w * _objective(p, c) for w, p, c in zip((2, 1), profs, combo))
                best = value if best is None else max(best, value)
        problems = [Problem(p, b, weight=w, name=f"m{k}") for k, (p, b, w) in enumerate(zip(profs, budgets, (2, 1)))]
        if best is None:
            with pytest.raises(UserError, match="no configuration meets the budget"):
                solve(problems, memory_mb=shared)
            continue
        sel = solve(problems, memory_mb=shared)
        assert sel.optimal and all(_meets(p, b, c) for p, b, c in zip(profs, budgets, sel.choices)), trial
        value = sum(w * _objective(p, c) for w, p, c in zip((2, 1), profs, sel.choices))
        assert abs(value - best) <= (2 + 1) * 2, trial   # one rounding unit per block, times the weights


def test_constraint_errors_are_one_line_and_say_what_to_do():
    prof = Profiles(_manifest([[(0, 100, 10, 10), (5, 50, 10, 5)], [(0, 100, 10, 10), (10, 40, 10, 4)]]))
    with pytest.raises(UserError) as info:
        solve([Problem(prof, Budget(allowed={"block9": [0]}))])
    assert str(info.value) == "model: unknown block(s) ['block9']; blocks are ['block0', 'block1']"
    with pytest.raises(UserError) as info:
        solve([Problem(prof, Budget(min_accuracy=0.95))])
    assert str(info.value).startswith("no configuration meets the budget (accuracy ≥ 0.95): ")
    assert "best accuracy 0.9000; relax the budget" in str(info.value)
    with pytest.raises(UserError, match=r"no configuration meets the budget \(per-block limits\)"):
        solve([Problem(prof, Budget(allowed={"block0": []}))])
    # a per-block latency limit needs every latency figure, like a latency budget
    m = _manifest([[(0, 100, 10, 10), (5, 50, 10, 5)]])
    m["segments"][0]["variants"][1]["profile"]["latency_ms"]["value"] = None
    with pytest.raises(UserError, match="some variants have no latency figure"):
        solve([Problem(Profiles(m), Budget(block_latency_ms={"block0": 1.0}))])
    assert solve([Problem(Profiles(m), Budget(allowed={"block0": [1]}))]).choice == (1,)   # no latency needed


# --------------------------------------------------------------------- on a compiled artifact


def test_model_select_with_every_constraint_on_an_artifact(artifact):
    from legoc.runtime import load

    m = load(artifact("mnist_resnet", "host", ratios=(0.0, 0.4, 0.8)).artifact)
    prof, names = m.profiles, [b.name for b in m.blocks]
    accs = sorted({prof.accuracy(c) for c in prof.all_choices()})
    budget = Budget(
        latency_ms=float(np.median([prof.latency_ms(c) for c in prof.all_choices()])),
        min_accuracy=accs[len(accs) // 3],
        block_latency_ms={names[0]: max(v.latency_ms for v in prof.blocks[0]) * 0.999},   # not the largest
        allowed={names[-1]: [1, 2]})
    best = _brute(prof, budget)
    sel = m.select(budget.latency_ms, None, budget.min_accuracy, block_latency_ms=budget.block_latency_ms,
                   allowed=budget.allowed, switch_penalty=0.0)
    assert best is not None and sel.optimal and _meets(prof, budget, sel.choice)
    assert abs(_objective(prof, sel.choice) - best) <= len(names)
    assert sel.choice[-1] in (1, 2) and prof.blocks[0][sel.choice[0]].latency_ms <= budget.block_latency_ms[names[0]]
    m.configure(min_accuracy=budget.min_accuracy, allowed=budget.allowed)   # configure takes them too
    assert m.choice[-1] in (1, 2) and prof.accuracy(m.choice) >= budget.min_accuracy


def test_cli_select_with_min_accuracy(artifact, capsys):
    from legoc.cli import main
    from legoc.runtime import load

    path = artifact("mnist_resnet", "host", ratios=(0.0, 0.4, 0.8)).artifact
    prof = load(path).profiles
    accs = sorted({prof.accuracy(c) for c in prof.all_choices()})
    floor = accs[len(accs) // 2]
    capsys.readouterr()
    assert main(["select", str(path), "--min-accuracy", str(floor)]) == 0
    out = capsys.readouterr().out
    picked = tuple(int(v) for v in out.split("variants: ")[1].split()[0].split(","))
    assert prof.accuracy(picked) >= floor
    assert _objective(prof, picked) >= _brute(prof, Budget(min_accuracy=floor)) - len(picked)
    assert main(["select", str(path), "--min-accuracy", str(accs[-1] + 0.01)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("legoc: error: no configuration meets the budget (accuracy ≥ ") and "\n" not in err


# ------------------------------------------------------------------------ the solver benchmark


def test_the_solver_benchmark_counts_every_solve_infeasible_and_out_of_time_included(capsys, monkeypatch):
    """benchmarks/solver.py used to drop the solves that raised (infeasible, or no solution
    within the time limit) from its statistics; every third solve here raises, and every solve
    must still be counted, and said to be infeasible."""
    import importlib.util
    from pathlib import Path

    from legoc.runtime.solver import Infeasible

    spec = importlib.util.spec_from_file_location(
        "solver_benchmark", Path(__file__).resolve().parent.parent / "benchmarks" / "solver.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    calls = []

    def every_third_raises(problems, **kw):
        calls.append(1)
        if len(calls) % 3 == 0:
            raise Infeasible("no configuration meets the budget")
        return solve(problems, **kw)

    monkeypatch.setattr(bench, "solve", every_third_raises)
    argv = ["--solves", "12", "--joint-solves", "3"]
    if "--dvfs-solves" in Path(spec.origin).read_text():   # its DVFS part (issue 20) runs after these two
        argv += ["--dvfs-solves", "1"]
    assert bench.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    single = next(ln for ln in lines if ln.startswith("single model, 8 blocks"))
    joint = next(ln for ln in lines if ln.startswith("10 models x 8 blocks"))
    # calls: 1 warm-up, 12 single (calls 2..13: 3, 6, 9, 12 raise), 3 joint (14..16: 15 raises)
    assert "12 solves" in single and "4 infeasible" in single and "8 optimal" in single, single
    assert "3 solves" in joint and "1 infeasible or out of time" in joint, joint
    opt = int(joint.split(" optimal")[0].rsplit(" ", 1)[1])
    feasible = int(joint.split(" feasible but not proven optimal")[0].rsplit(" ", 1)[1])
    assert opt + feasible == 2, joint
