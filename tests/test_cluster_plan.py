"""legoc.runtime.cluster_plan: the plan (which runs of blocks to tile, over which workers, with
which rows) is the exact optimum of its model (against brute force on small cases); it gives a
slow worker fewer rows, drops a worker behind a slow link, keeps blocks local when the link is
slow; its measuring functions work through real loopback TVM RPC sessions; a chosen plan compiles
and runs on a cluster equal to torch; behind a 100 Mbit/s link shaped with tc in a network
namespace made here, the measured link is slower and the plan moves work back to the master."""
from __future__ import annotations

import itertools
import math
import os
import random

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from legoc.errors import UserError
from legoc.passes.tiling import compile_plan, compile_tiles, row_profile, tile_plan
from legoc.runtime.cluster import Cluster, LocalWorkers, ShapedLoopback, TileModule
from legoc.runtime.cluster_plan import (MASTER, BlockVariant, Candidate, Link, LocalModule, MasterBand, Plan,
                                        PlanRunner, RunProfile, Step, best_rows, chain_candidates, equal_rows, measure_links, measure_local,
                                        measure_workers, plan_chain, step_seconds, variant_candidates)
from legoc.targets.table import TARGETS


def _profile(rng: random.Random, height: int, halo: int = 1, in_row: int = 1000, out_row: int = 500,
             noise: float = 0.1) -> RunProfile:
    """A synthetic run: each tile reads ``halo`` rows more on each inner side and recomputes them
    (its work: those rows, times a random factor within ``noise``)."""
    rows_in, work = {}, {}
    for a in range(height):
        for b in range(a + 1, height + 1):
            rows_in[a, b] = (max(0, a - halo), min(height, b + halo))
            work[a, b] = (rows_in[a, b][1] - rows_in[a, b][0]) * rng.uniform(1 - noise, 1 + noise)
    work[0, height] = float(height)
    return RunProfile("synthetic", height, height, in_row, out_row, rows_in, work)


def _compositions(h: int, k: int):
    for cuts in itertools.combinations(range(1, h), k - 1):
        c = (0, *cuts, h)
        yield list(zip(c[:-1], c[1:]))


def _brute_rows(cand: Candidate, links, master: bool = False) -> float:
    best = float("inf")
    usable = [w for w, s in enumerate(cand.worker_seconds) if s is not None]
    if master and cand.local_seconds is not None:
        usable.append(MASTER)  # last: the master's band is the bottom one
    for k in range(1, len(usable) + 1):
        for subset in itertools.combinations(usable, k):
            if k > cand.profile.height or subset == (MASTER,):
                continue
            for rows in _compositions(cand.profile.height, k):
                tiles = [(w, a, b) for w, (a, b) in zip(subset, rows)]
                best = min(best, step_seconds(cand, links, tiles).seconds)
    return best


def _random_case(rng: random.Random, height: int, workers: int) -> tuple[Candidate, list[Link]]:
    links = [Link(rtt=rng.uniform(0, 0.02), bandwidth=rng.choice([1e4, 1e5, 1e6, 1e8])) for _ in range(workers)]
    seconds = tuple(None if rng.random() < 0.15 else rng.uniform(0.01, 0.2) for _ in range(workers))
    return Candidate(0, 1, rng.uniform(0.01, 0.3), seconds, _profile(rng, height, halo=rng.randint(0, 2))), links


def test_rows_with_a_master_band_are_the_exact_optimum():
    """The master may take the bottom band itself (no transfer): still the brute-force optimum,
    never the master alone (that is the local step), and it is used when workers are far."""
    rng = random.Random(5)
    for _ in range(200):
        cand, links = _random_case(rng, rng.randint(1, 6), rng.randint(1, 2))
        step = best_rows(cand, links, master=True)
        want = _brute_rows(cand, links, master=True)
        if step is None:
            assert want == float("inf")
            continue
        assert step.seconds == pytest.approx(want, rel=1e-12, abs=1e-15)
        assert any(w != MASTER for w, _, _ in step.tiles)
        assert step_seconds(cand, links, step.tiles).seconds == pytest.approx(step.seconds)
    far = best_rows(_synthetic(), [Link(1e-4, 20e6)] * 2, master=True)
    assert far.tiles[-1][0] == MASTER and far.seconds < best_rows(_synthetic(), [Link(1e-4, 20e6)] * 2).seconds


def test_rows_are_the_exact_optimum_of_the_model():
    rng = random.Random(0)
    for _ in range(300):
        cand, links = _random_case(rng, rng.randint(1, 7), rng.randint(1, 3))
        step = best_rows(cand, links)
        want = _brute_rows(cand, links)
        if step is None:
            assert want == float("inf")
            continue
        assert step.seconds == pytest.approx(want, rel=1e-12, abs=1e-15)
        # the step is what it claims: its tiles cover the rows in worker order, its estimate re-adds
        assert [a for _, a, _ in step.tiles][0] == 0 and step.tiles[-1][2] == cand.profile.height
        assert all(p[2] == q[1] and p[0] < q[0] for p, q in zip(step.tiles, step.tiles[1:]))
        assert step_seconds(cand, links, step.tiles).seconds == pytest.approx(step.seconds)


def test_chain_plan_is_the_exact_optimum_of_the_model():
    rng = random.Random(1)
    for _ in range(60):
        n, workers = rng.randint(1, 4), rng.randint(1, 2)
        links = [Link(rng.uniform(0, 0.01), rng.choice([1e5, 1e7])) for _ in range(workers)]
        cands = {}
        for i in range(n):
            for j in range(i + 1, n + 1):
                if rng.random() < 0.2 and j - i > 1:
                    continue  # not every run is a candidate
                local = None if rng.random() < 0.1 else rng.uniform(0.01, 0.1) * (j - i)
                prof = None if rng.random() < 0.2 else _profile(rng, rng.randint(1, 4))
                cands[i, j] = Candidate(i, j, local, tuple(rng.uniform(0.01, 0.1) * (j - i) for _ in range(workers)), prof)
        try:
            plan = plan_chain(n, list(cands.values()), links)
        except UserError:
            plan = None

        def brute(i):  # the best cover of blocks [i, n) by candidate runs, each local or best tiled
            if i == n:
                return 0.0
            best = float("inf")
            for (a, b), c in cands.items():
                if a != i:
                    continue
                options = [c.local_seconds] if c.local_seconds is not None else []
                if c.profile is not None:
                    options.append(_brute_rows(c, links))
                if options:
                    best = min(best, min(options) + brute(b))
            return best

        want = brute(0)
        if plan is None:
            assert want == float("inf")
        else:
            assert plan.seconds == pytest.approx(want, rel=1e-9)
            assert [s.first for s in plan.steps][0] == 0 and plan.steps[-1].last == n
            assert all(p.last == q.first for p, q in zip(plan.steps, plan.steps[1:]))


def _covers(n: int, cands, i: int = 0):
    """Every way to cover blocks [i, n) with consecutive candidates."""
    if i == n:
        yield ()
        return
    for c in cands:
        if c.first == i:
            for rest in _covers(n, cands, c.last):
                yield (c, *rest)


@settings(max_examples=120, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), with_budget=st.booleans())
def test_variants_with_placement_are_the_exact_optimum(seed, with_budget):
    """Blocks with 1-3 variants each (a pruned one faster, moving fewer bytes, with an accuracy
    drop), links with own and shared parts: the plan equals brute force over every cover of the
    chain by candidates (each run its fastest way): the fastest, or with a budget the smallest
    drop within it (then the fastest)."""
    rng = random.Random(seed)
    n, workers = rng.randint(1, 3), rng.randint(1, 2)
    links = [Link(rng.uniform(0, 0.01), rng.choice([1e5, 1e7, math.inf]), rng.choice([1e5, 1e6, math.inf]))
             for _ in range(workers)]
    variants, profiles = [], {}
    for b in range(n):
        vs = []
        for k in range(rng.randint(1, 3)):
            keep = 1.0 if k == 0 else rng.uniform(0.3, 0.9)  # variant k > 0 is pruned
            base = rng.uniform(0.01, 0.1)
            vs.append(BlockVariant(f"b{b}v{k}", 0.0 if k == 0 else round(rng.uniform(0.1, 3.0), 2),
                                   None if rng.random() < 0.1 else base * keep,
                                   tuple(rng.uniform(0.5, 2) * base * keep for _ in range(workers))))
        variants.append(vs)

    def profile(i, j, names):
        if (i, j, names) not in profiles:
            keep = 1.0 - 0.1 * sum(name[-1] != "0" for name in names)  # pruned: fewer bytes
            profiles[i, j, names] = (None if rng.random() < 0.2 else
                                     _profile(rng, rng.randint(1, 4), rng.randint(0, 1), int(4000 * keep), int(2000 * keep)))
        return profiles[i, j, names]

    cands = variant_candidates(variants, profile, max_run=2)

    def fastest_way(c):
        options = [c.local_seconds] if c.local_seconds is not None else []
        if c.profile is not None:
            options.append(_brute_rows(c, links))
        return min(options, default=float("inf"))

    plans = [(sum(fastest_way(c) for c in cover), sum(c.drop for c in cover)) for cover in _covers(n, cands)]
    plans = [p for p in plans if p[0] < float("inf")]
    budget = None
    if with_budget and plans:
        times = sorted(t for t, _ in plans)
        budget = rng.choice([times[0] * 0.9, *times, times[-1] * 1.1])
    feasible = [p for p in plans if budget is None or p[0] <= budget * (1 + 1e-9)]
    if not feasible:
        with pytest.raises(UserError, match="no plan meets the latency budget|no candidate runs cover"):
            plan_chain(n, cands, links, budget=budget)
        return
    plan = plan_chain(n, cands, links, budget=budget)
    if budget is None:
        want_t = min(t for t, _ in feasible)
        want_d = min(d for t, d in feasible if t <= want_t * (1 + 1e-9))
    else:
        want_d = min(d for _, d in feasible)
        want_t = min(t for t, d in feasible if d <= want_d + 1e-12)
    assert plan.drop == pytest.approx(want_d, abs=1e-9)
    assert plan.seconds == pytest.approx(want_t, rel=1e-9)
    assert budget is None or plan.seconds <= budget * (1 + 1e-9)
    assert plan.steps[0].first == 0 and plan.steps[-1].last == n
    assert all(p.last == q.first for p, q in zip(plan.steps, plan.steps[1:]))


def test_a_pruned_variant_moves_fewer_bytes_and_wins_behind_a_slow_link():
    """One block, 16 rows moving 64 KB a row in and out; its pruned variant halves the output
    channels (half the output bytes) and the compute. The fastest plan is the pruned one, tiled;
    a budget only that meets keeps it; a budget the full block also meets takes the full one
    (no accuracy drop); a budget nothing meets is one clear error."""
    full = _profile(random.Random(3), 16, 1, 64 << 10, 64 << 10, 0)
    pruned = RunProfile("pruned", 16, 16, 64 << 10, 32 << 10, full.rows_in, full.work)
    variants = [[BlockVariant("r0.00", 0.0, 0.4, (0.4, 0.4)), BlockVariant("r0.50", 1.5, 0.2, (0.2, 0.2))]]
    cands = variant_candidates(variants, lambda i, j, names: full if names == ("r0.00",) else pruned)
    link = [Link(1e-4, 40e6, 100e6)] * 2
    fastest = plan_chain(1, cands, link)
    assert fastest.steps[0].variant == "r0.50" and fastest.drop == 1.5
    tight = plan_chain(1, cands, link, budget=fastest.seconds * 1.01)
    assert tight.steps[0].variant == "r0.50" and not tight.steps[0].local
    full_step = plan_chain(1, [c for c in cands if c.variant == "r0.00"], link)
    loose = plan_chain(1, cands, link, budget=full_step.seconds * 1.01)
    assert loose.steps[0].variant == "r0.00" and loose.drop == 0.0
    # the pruned tiles moved fewer bytes: their shared transfer seconds are less
    assert tight.steps[0].transfer < best_rows(cands[0], link).transfer
    with pytest.raises(UserError, match=r"^no plan meets the latency budget of 1\.0 ms: the fastest takes"):
        plan_chain(1, cands, link, budget=1e-3)
    assert "accuracy drop 1.5" in fastest.describe() and "(r0.50)" in fastest.describe()


def _block() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()).eval()
    return model, torch.randn(1, 3, 32, 16)


def test_row_profile_matches_the_tiles():
    model, x = _block()
    gm = torch.fx.symbolic_trace(model)
    prof = row_profile(gm, x)
    assert (prof.height, prof.in_height, prof.in_row_bytes, prof.out_row_bytes) == (16, 32, 3 * 16 * 4, 8 * 8 * 4)
    for rows in ([(0, 16)], [(0, 5), (5, 16)], [(0, 1), (1, 9), (9, 16)]):
        plan = tile_plan(gm, x, rows=rows)
        assert [t.rows_in for t in plan.tiles] == [prof.rows_in[r] for r in rows]
    # an inner tile recomputes halo rows: more work than its share of rows; the whole is the sum
    assert prof.work_share(4, 8) > 4 / 16
    # conv 3->8 3x3 and ReLU on 32 rows of 16, 2x2 max pool, conv 8->8 3x3 and ReLU on 16 rows of 8
    assert prof.work[0, 16] == 32 * 128 * 27 + 32 * 128 + 16 * 64 * 4 + 16 * 64 * 72 + 16 * 64
    with pytest.raises(UserError, match="consecutive"):
        tile_plan(gm, x, rows=[(0, 5), (6, 16)])


def _synthetic(height=16, in_row=64 << 10, out_row=64 << 10, compute=0.2):
    """One run of ``height`` rows moving 1 MB in and 1 MB out, ``compute`` s whole anywhere."""
    return Candidate(0, 1, compute, (compute, compute), _profile(random.Random(2), height, 1, in_row, out_row, 0))


def test_slow_worker_gets_fewer_rows_and_far_worker_sits_out():
    cand = _synthetic()
    fast = Link(1e-4, 1e9)
    even = best_rows(cand, [fast, fast])
    assert [b - a for _, a, b in even.tiles] == [8, 8]
    slow = best_rows(Candidate(0, 1, 0.2, (0.2, 0.6), cand.profile), [fast, fast])
    assert [w for w, _, _ in slow.tiles] == [0, 1]
    assert slow.tiles[1][2] - slow.tiles[1][1] < slow.tiles[0][2] - slow.tiles[0][1]
    # a worker with a 1 s round trip is left out: "fewer workers" is one of the plans searched
    far = best_rows(cand, [fast, Link(1.0, 1e9)])
    assert [w for w, _, _ in far.tiles] == [0] and far.tiles[0][1:] == (0, 16)


def test_slow_link_keeps_blocks_local():
    cands = chain_candidates(2, lambda i, j: _profile(random.Random(i * 3 + j), 16 * (j - i), 1, 64 << 10, 64 << 10),
                             [0.2, 0.2], [[0.2, 0.2], [0.2, 0.2]])
    fast = plan_chain(2, cands, [Link(1e-4, 1e9)] * 2)
    slow = plan_chain(2, cands, [Link(1e-4, 12.5e6)] * 2)
    assert fast.local_blocks == 0 and fast.seconds < 0.4
    assert slow.local_blocks == 2 and slow.seconds == pytest.approx(0.4)
    assert len(slow.steps) == 1  # one local run, not two local steps back to back (equal cost)
    assert "local" in slow.describe() and "worker 1 rows" in fast.describe()
    assert equal_rows(10, 3) == [(0, 3), (3, 7), (7, 10)]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Two small blocks, compiled whole for the host: (blocks, input, whole modules, inputs)."""
    model, x = _block()
    blocks = [torch.fx.symbolic_trace(model[:3]), torch.fx.symbolic_trace(model[3:])]
    folder = tmp_path_factory.mktemp("plan")
    from legoc.targets.build import build_module

    modules, inputs, cur = [], [], x
    with torch.no_grad():
        for i, b in enumerate(blocks):
            built = build_module(b, (cur,), TARGETS["host"], folder / f"b{i}.so", name=f"b{i}")
            y = b(cur)
            modules.append(TileModule(built.path, tuple(built.params), (0, cur.shape[2]), (0, y.shape[2])))
            inputs.append(cur.numpy())
            cur = y
    return blocks, x, modules, inputs, folder


def test_measured_plan_compiles_and_runs_equal_to_torch(chain, tmp_path):
    blocks, x, modules, inputs, folder = chain
    with torch.no_grad():
        ref = blocks[1](blocks[0](x)).numpy()
    with LocalWorkers(2, log_dir=tmp_path) as workers:
        links = measure_links(workers.addresses, nbytes=1 << 18, repeat=3)
        per_worker = measure_workers(workers.addresses, modules, inputs, number=2, repeat=2)
        local = measure_local(modules, inputs, number=2, repeat=2)
        assert all(link.rtt > 0 and link.bandwidth > 0 for link in links)
        assert all(s > 0 for row in per_worker for s in row) and all(s > 0 for s in local)
        cands = chain_candidates(2, lambda i, j: row_profile(blocks[i] if j - i == 1 else
                                                             torch.fx.symbolic_trace(nn.Sequential(*blocks[i:j])),
                                                             torch.from_numpy(inputs[i])), local, per_worker)
        measured = plan_chain(2, cands, links)
        # whatever the measurements chose, plus fixed plans that exercise every kind of step
        plans = [measured,
                 Plan((Step(0, 1, (), 0.0), Step(1, 2, ((0, 0, 3), (1, 3, 16)), 0.0))),  # local, then tiled
                 Plan((Step(0, 1, ((1, 0, 16),), 0.0), Step(1, 2, ((0, 0, 5), (1, 5, 16)), 0.0))),  # worker 0 sits out
                 Plan((Step(0, 2, ((0, 0, 6), (1, 6, 16)), 0.0),))]  # the two blocks joined
        cache = {}
        for plan in plans:
            steps, local_modules = compile_plan(plan, blocks, x, TARGETS["host"], tmp_path, 2, cache=cache)
            cluster = Cluster(workers.addresses, steps=steps, timeout=60) if steps else None
            try:
                runner = PlanRunner(plan, cluster, {i: LocalModule(m) for i, m in local_modules.items()})
                out = runner(x.numpy())
                assert out.shape == ref.shape and np.abs(out - ref).max() <= 1e-4, plan.describe()
                assert len(runner.seconds) == len(plan.steps)
            finally:
                if cluster is not None:
                    cluster.close()
        # the master computing the bottom band of block 1 while the two workers compute theirs
        rows = [(0, 5), (5, 11), (11, 16)]
        tiles = compile_tiles(tile_plan(blocks[1], torch.from_numpy(inputs[1]), rows=rows),
                              torch.from_numpy(inputs[1]), TARGETS["host"], tmp_path, name="mb")
        plan = Plan((Step(0, 1, (), 0.0), Step(1, 2, ((0, 0, 5), (1, 5, 11), (MASTER, 11, 16)), 0.0)))
        assert "master rows 11-16" in plan.describe()
        with Cluster(workers.addresses, steps=[tiles[:2]], timeout=60, cores=workers.worker_cores) as cluster:
            runner = PlanRunner(plan, cluster, {0: LocalModule(modules[0]), 1: MasterBand(tiles[2])})
            out = runner(x.numpy())
            assert out.shape == ref.shape and np.abs(out - ref).max() <= 1e-4
            assert sum(cluster.stats.received) == ref[:, :, :11].nbytes  # the workers sent rows 0-10 only


# --- the shaped link ---------------------------------------------------------------------------

@pytest.fixture
def shaped():
    """A network namespace whose loopback is shaped to 100 Mbit/s (tbf), removed afterwards."""
    why = ShapedLoopback.unavailable()
    if why:
        pytest.skip(f"the shaped link: {why}")
    with ShapedLoopback("100mbit", name=f"legoc-test-{os.getpid()}") as link:
        yield link


def test_shaped_link_is_slower_and_the_plan_keeps_work_local(shaped, tmp_path):
    with LocalWorkers(2, log_dir=tmp_path) as workers:
        plain = measure_links(workers.addresses, nbytes=1 << 20, repeat=3)
    with shaped.inside():
        with LocalWorkers(2, log_dir=tmp_path) as workers:
            shaped = measure_links(workers.addresses, nbytes=1 << 20, repeat=3)
    # tbf passes at most 100 Mbit/s (12.5 MB/s) through the namespace's loopback: a transfer to
    # one worker alone (its shared and its own part in series) runs no faster. The split into
    # shared and own parts is a difference of two timings and moves with the machine's noise
    # (one run measured a shared 19.1 MB/s with an own 19.0 MB/s, 9.5 MB/s alone), so the
    # bound is on the whole
    def alone(link):
        return 1.0 / (1.0 / link.bandwidth + 1.0 / link.own_bandwidth)

    assert all(alone(s) < 1.5 * 12.5e6 for s in shaped), shaped
    assert all(alone(s) < alone(p) for s, p in zip(shaped, plain)), (shaped, plain)
    # a run that is worth tiling over the machine's loopback (0.2 s whole, 2 MB moved) stays
    # local behind the shaped link: moving its bands costs more than computing them here
    cands = chain_candidates(2, lambda i, j: _profile(random.Random(i * 3 + j), 16 * (j - i), 1, 64 << 10, 64 << 10),
                             [0.2, 0.2], [[0.2, 0.2], [0.2, 0.2]])
    fast, slow = plan_chain(2, cands, plain), plan_chain(2, cands, shaped)
    assert slow.local_blocks > fast.local_blocks, (fast.describe(), slow.describe())
