"""legoc.runtime.cluster_plan: which blocks to tile, over which workers, with which output rows,
chosen from measurements (issue 19).

**The model.** A chain of blocks ``0 .. n-1`` runs on the master (this process): the input is
here and the output must end here. The plan cuts the chain into steps, each a run of consecutive
blocks among the given :class:`Candidate` runs (e.g. every block alone and every run of blocks
joined into one tiled unit), run one after another. A step is either

* **local**: the run whole on the master, its measured seconds ``local_seconds``; or
* **tiled** over some of the workers, taken in their given order, worker ``w`` computing the
  output rows ``[a_w, b_w)`` (consecutive, together all ``H`` rows)::

      T = max_w (rtt_w + c_w * work(a_w, b_w) / work(0, H) + bytes(a_w, b_w) / own_w)
          + sum_w bytes(a_w, b_w) / bandwidth_w

  ``c_w`` is worker ``w``'s measured seconds for the whole run (on its device, no transfer),
  ``work`` the tile's work from :func:`legoc.passes.tiling.row_profile` (multiply-adds over every
  row each op computes, so halo rows computed twice count twice), ``bytes`` its input band (halo
  included) plus its output band, ``rtt_w``, ``own_w`` and ``bandwidth_w`` the worker's measured
  :class:`Link`. A transfer has two parts. One is the worker's own and runs beside the other
  workers' (TVM RPC copies a tensor byte by byte on both ends, CPU-bound: on this machine's
  loopback that is nearly all of it, ~50 MB/s per worker, and two workers' copies overlap). The
  other is shared: on one network interface, or one shaped loopback, transfers to different
  workers share its bandwidth, so those seconds add up. :func:`measure_links` tells them apart
  by timing each link alone and all at once.

Every step's input and output pass through the master, so steps do not overlap.

**Variants.** A candidate may be one variant of its run (:func:`variant_candidates`: every
combination of its blocks' variants), with an accuracy drop that adds up along the chain. A
pruned variant computes less and, where its channels shrink, moves fewer bytes (its profile says
how many), so which variant and where it runs are chosen together.

**Solving it exactly.**

* Rows of one tiled run: a dynamic program over (workers considered, first row not yet given)
  that keeps, per state, the Pareto front of pairs (slowest worker so far, shared transfer
  seconds so far). ``T`` is nondecreasing in both, so a dominated pair never leads to the
  optimum, and the front is exact. A worker may take no rows (sits the step out): "fewer
  workers" is in the search. ``O(W * H^2 * F)`` for W workers, H output rows, fronts of at most
  F pairs.
* The chain (:func:`plan_chain`): a DP over prefixes ``[0, j)`` keeping the Pareto front of
  (seconds, accuracy drop); each candidate enters with its fastest way to run (local, or its best
  rows), since the way does not change its drop. Both objectives add up along the chain, so the
  front is exact; with a latency budget, prefixes over it are cut (seconds only grow). Without
  variants the front is one point and this is ``best[j] = min_i best[i] + min(local, tiled)``.
  A DP rather than CP-SAT: the chain is a path, its fronts stay small (distinct drops), and the
  answer is exact without a time limit; tests check it against brute force.

Measuring is in :mod:`legoc.runtime.cluster_measure` (re-exported here). Torch-free: numpy only.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from legoc.errors import UserError
from legoc.runtime.cluster_measure import LocalModule, measure_links, measure_local, measure_workers

__all__ = ["MASTER", "BlockVariant", "Candidate", "Link", "LocalModule", "MasterBand", "Plan", "PlanRunner", "RunProfile", "Step", "best_rows",
           "chain_candidates", "equal_rows", "measure_links", "measure_local", "measure_workers", "plan_chain",
           "step_seconds", "variant_candidates"]


@dataclass(frozen=True)
class RunProfile:
    """How a run of blocks tiles (made by ``legoc.passes.tiling.row_profile``): per output row
    range ``(a, b)`` the input rows its tile reads and its work."""

    name: str
    height: int  # output rows
    in_height: int
    in_row_bytes: int
    out_row_bytes: int
    rows_in: Mapping[tuple[int, int], tuple[int, int]]
    work: Mapping[tuple[int, int], float]

    def band_bytes(self, a: int, b: int) -> int:
        """Bytes a tile of output rows [a, b) moves: its input band (halo included) and its output."""
        lo, hi = self.rows_in[a, b]
        return (hi - lo) * self.in_row_bytes + (b - a) * self.out_row_bytes

    def work_share(self, a: int, b: int) -> float:
        """The tile's work over the whole run's (more than (b - a) / H: halo rows recompute)."""
        return self.work[a, b] / self.work[0, self.height]


@dataclass(frozen=True)
class Link:
    """A worker's link from the master: seconds per call that do not depend on size (``rtt``);
    bytes per second of the part of a transfer that the workers share (``bandwidth``: one wire,
    one shaped loopback), so that transfers to several workers add up; and bytes per second of
    the part that is the worker's own (``own_bandwidth``: TVM RPC copies a tensor byte by byte on
    both ends, CPU-bound, and each worker's copying runs beside the others')."""

    rtt: float
    bandwidth: float
    own_bandwidth: float = math.inf


@dataclass(frozen=True)
class Candidate:
    """A run of blocks ``[first, last)`` the plan may make one step of: its measured seconds on
    the master (None: not here) and on each worker (None: that worker cannot run it), and its
    profile (None: it cannot be tiled, so it runs locally)."""

    first: int
    last: int
    local_seconds: float | None
    worker_seconds: tuple[float | None, ...]
    profile: RunProfile | None
    variant: str = ""  # which variant of the run's blocks (e.g. "r0.50+r0.00"); "" when there is one
    drop: float = 0.0  # its accuracy drop (added up along the chain), >= 0


@dataclass(frozen=True)
class BlockVariant:
    """One variant of one block (:func:`variant_candidates`): its name, accuracy drop, and
    measured seconds on the master and on each worker (None: not measured there)."""

    name: str
    drop: float
    local_seconds: float | None
    worker_seconds: tuple[float | None, ...]


@dataclass(frozen=True)
class Step:
    """Blocks ``[first, last)`` run locally (``tiles`` empty) or as tiles ``(worker, a, b)``,
    with the model's estimate, split into slowest worker and transfer seconds for a tiled step."""

    first: int
    last: int
    tiles: tuple[tuple[int, int, int], ...]
    seconds: float
    compute: float = 0.0
    transfer: float = 0.0
    variant: str = ""
    drop: float = 0.0

    @property
    def local(self) -> bool:
        return not self.tiles

    def describe(self) -> str:
        what = f"blocks {self.first}-{self.last - 1}" if self.last - self.first > 1 else f"block {self.first}"
        if self.variant:
            what += f" ({self.variant})"
        if self.local:
            return f"{what}: local, {self.seconds * 1e3:.1f} ms"
        rows = ", ".join(f"{'master' if w == MASTER else f'worker {w}'} rows {a}-{b}" for w, a, b in self.tiles)
        return (f"{what}: {rows}; {self.seconds * 1e3:.1f} ms "
                f"({self.compute * 1e3:.1f} slowest worker + {self.transfer * 1e3:.1f} transfer)")


@dataclass(frozen=True)
class Plan:
    steps: tuple[Step, ...]

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.steps)

    @property
    def local_blocks(self) -> int:
        return sum(s.last - s.first for s in self.steps if s.local)

    @property
    def drop(self) -> float:
        return sum(s.drop for s in self.steps)

    def describe(self) -> str:
        drop = f", accuracy drop {self.drop:g}" if any(s.variant for s in self.steps) else ""
        return "\n".join([f"estimate {self.seconds * 1e3:.1f} ms{drop}", *(s.describe() for s in self.steps)])


def equal_rows(height: int, k: int) -> list[tuple[int, int]]:
    """``[0, height)`` in ``k`` consecutive ranges as equal as rows allow."""
    if not 1 <= k <= height:
        raise UserError(f"{k} tiles of {height} output rows: use 1 to {height} tiles")
    cuts = [round(i * height / k) for i in range(k + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


MASTER = -1  # the "worker" of a tile the master computes itself (its band needs no transfer)


def _tile_parts(cand: Candidate, links: Sequence[Link], w: int, a: int, b: int) -> tuple[float, float]:
    """(its own seconds: rtt, compute and its own part of the transfer; its share of the shared
    link's seconds) of worker ``w`` computing rows [a, b)."""
    p = cand.profile
    if w == MASTER:
        return cand.local_seconds * p.work_share(a, b), 0.0
    link = links[w]
    moved = p.band_bytes(a, b)
    return (link.rtt + cand.worker_seconds[w] * p.work_share(a, b) + moved / link.own_bandwidth,
            moved / link.bandwidth)


def step_seconds(cand: Candidate, links: Sequence[Link], tiles: Sequence[tuple[int, int, int]] = ()) -> Step:
    """The model's estimate for running ``cand`` locally (no ``tiles``) or as the given tiles."""
    if not tiles:
        if cand.local_seconds is None:
            raise UserError(f"blocks {cand.first}-{cand.last - 1} were not measured on the master")
        return Step(cand.first, cand.last, (), cand.local_seconds, variant=cand.variant, drop=cand.drop)
    if cand.profile is None:
        raise UserError(f"blocks {cand.first}-{cand.last - 1} cannot be tiled")
    parts = [_tile_parts(cand, links, w, a, b) for w, a, b in tiles]
    compute, transfer = max(c for c, _ in parts), sum(t for _, t in parts)
    return Step(cand.first, cand.last, tuple(tiles), compute + transfer, compute, transfer, cand.variant, cand.drop)


def best_rows(cand: Candidate, links: Sequence[Link], master: bool = False) -> Step | None:
    """The fastest tiling of one run under the model (exact: the Pareto DP of the module
    docstring), or None when it cannot be tiled or no worker can run it. ``master``: the master
    may compute the last band itself (worker :data:`MASTER`: no round trip, no transfer), beside
    at least one worker."""
    p = cand.profile
    if p is None or not any(s is not None for s in cand.worker_seconds):
        return None
    H = p.height
    # front[c]: Pareto-optimal (slowest, transfer, tiles) with rows [0, c) given away
    front: list[list[tuple[float, float, tuple]]] = [[] for _ in range(H + 1)]
    front[0] = [(0.0, 0.0, ())]
    order = list(enumerate(cand.worker_seconds))
    if master and cand.local_seconds is not None:
        order.append((MASTER, cand.local_seconds))
    for w, seconds in order:
        if seconds is None:
            continue
        new = [list(f) for f in front]  # the worker sits out: every state stays
        for a in range(H):
            if not front[a]:
                continue
            for b in range(a + 1, H + 1):
                compute, transfer = _tile_parts(cand, links, w, a, b)
                for slow, moved, tiles in front[a]:
                    if w != MASTER or tiles:  # the master alone is the local step, not a tiling
                        new[b].append((max(slow, compute), moved + transfer, tiles + ((w, a, b),)))
        front = [_pareto(f) for f in new]
    if not front[H]:
        return None
    slow, moved, tiles = min(front[H], key=lambda t: (t[0] + t[1], len(t[2])))
    return Step(cand.first, cand.last, tiles, slow + moved, slow, moved, cand.variant, cand.drop)


def _pareto(points: list[tuple[float, float, tuple]]) -> list[tuple[float, float, tuple]]:
    """The points no other point beats in both coordinates (ties: fewer tiles kept)."""
    out, best_moved = [], float("inf")
    for pt in sorted(points, key=lambda t: (t[0], t[1], len(t[2]))):
        if pt[1] < best_moved:
            out.append(pt)
            best_moved = pt[1]
    return out


def _close(t: float) -> float:
    """Seconds as compared by the chain DP: equal within rounding (a run's local seconds are the
    sum of its blocks', added in another order)."""
    return float(f"{t:.10g}")


def plan_chain(n_blocks: int, candidates: Sequence[Candidate], links: Sequence[Link],
               budget: float | None = None, master: bool = False) -> Plan:
    """The best plan for blocks ``0 .. n_blocks-1`` under the model, each candidate run local or
    tiled with its best rows: without ``budget``, the fastest (then the smallest accuracy drop);
    with a ``budget`` in seconds, the smallest accuracy drop within it (then the fastest). On a
    tie, fewer steps (one local module rather than several back to back).

    Exact: a DP along the chain keeping, per prefix ``[0, j)``, the Pareto front of (seconds,
    accuracy drop) over its plans; both add up along the chain, so a plan dominated on a prefix
    is dominated on every extension. Per candidate (a run in one variant) only its fastest way
    to run counts, as the way (local or rows) does not change its drop. ``master``: a tiled step
    may give the master a band too (:func:`best_rows`)."""
    if budget is not None and budget <= 0:
        raise UserError(f"the latency budget must be positive, got {budget:g} s")
    by_end: dict[int, list[Step]] = {}
    for cand in candidates:
        if not 0 <= cand.first < cand.last <= n_blocks:
            raise UserError(f"candidate blocks {cand.first}-{cand.last - 1} are outside the chain of {n_blocks}")
        if cand.drop < 0:
            raise UserError(f"candidate blocks {cand.first}-{cand.last - 1} ({cand.variant}) have a negative "
                            f"accuracy drop {cand.drop:g}")
        options = [step_seconds(cand, links)] if cand.local_seconds is not None else []
        tiled = best_rows(cand, links, master)
        if tiled is not None:
            options.append(tiled)
        if options:
            by_end.setdefault(cand.last, []).append(min(options, key=lambda s: s.seconds))
    limit = math.inf if budget is None else budget * (1 + 1e-9)
    # front[j]: Pareto-optimal (seconds, drop, steps) covering blocks [0, j)
    front: list[list[tuple[float, float, tuple[Step, ...]]]] = [[] for _ in range(n_blocks + 1)]
    front[0] = [(0.0, 0.0, ())]
    for j in range(1, n_blocks + 1):
        points = [(t + step.seconds, d + step.drop, steps + (step,))
                  for step in by_end.get(j, []) for t, d, steps in front[step.first]
                  if t + step.seconds <= limit]
        kept, best_drop = [], math.inf
        for pt in sorted(points, key=lambda p: (_close(p[0]), p[1], len(p[2]))):
            if pt[1] < best_drop:
                kept.append(pt)
                best_drop = pt[1]
        front[j] = kept
    if not front[n_blocks]:
        if budget is not None:  # the fastest plan, or the error saying why there is none
            fastest = plan_chain(n_blocks, candidates, links, master=master)
            raise UserError(f"no plan meets the latency budget of {budget * 1e3:.1f} ms: the fastest takes "
                            f"{fastest.seconds * 1e3:.1f} ms; raise the budget or add faster variants or workers")
        raise UserError(f"no candidate runs cover blocks 0-{n_blocks - 1}: measure every block locally or on a worker")
    if budget is None:
        best = min(front[n_blocks], key=lambda p: (_close(p[0]), p[1], len(p[2])))
    else:
        best = min(front[n_blocks], key=lambda p: (p[1], _close(p[0]), len(p[2])))
    return Plan(best[2])


def chain_candidates(n_blocks: int, profile: Callable[[int, int], RunProfile | None],
                     local_seconds: Sequence[float | None], worker_seconds: Sequence[Sequence[float | None]],
                     max_run: int | None = None) -> list[Candidate]:
    """Every run ``[i, j)`` of at most ``max_run`` blocks as a candidate, its seconds the sum of
    its blocks' measured seconds (per block: on the master, and per worker), its profile
    ``profile(i, j)`` (the blocks joined)."""
    out = []
    for i in range(n_blocks):
        for j in range(i + 1, min(n_blocks, i + (max_run or n_blocks)) + 1):
            local = None if any(local_seconds[b] is None for b in range(i, j)) else sum(local_seconds[i:j])
            per_worker = tuple(None if any(worker_seconds[b][w] is None for b in range(i, j))
                               else sum(worker_seconds[b][w] for b in range(i, j))
                               for w in range(len(worker_seconds[i])))
            out.append(Candidate(i, j, local, per_worker, profile(i, j)))
    return out


def variant_candidates(variants: Sequence[Sequence[BlockVariant]],
                       profile: Callable[[int, int, tuple[str, ...]], RunProfile | None],
                       max_run: int | None = None) -> list[Candidate]:
    """Every run ``[i, j)`` of at most ``max_run`` blocks in every combination of its blocks'
    variants (``variants[b]``: block b's) as a candidate: seconds and drops added up over its
    blocks, its profile ``profile(i, j, names)`` (the blocks in those variants joined: a pruned
    variant computes less, and moves fewer bytes where its input or output channels shrink)."""
    n = len(variants)
    out = []
    for i in range(n):
        for j in range(i + 1, min(n, i + (max_run or n)) + 1):
            for combo in itertools.product(*variants[i:j]):
                local = None if any(v.local_seconds is None for v in combo) else sum(v.local_seconds for v in combo)
                per_worker = tuple(None if any(v.worker_seconds[w] is None for v in combo)
                                   else sum(v.worker_seconds[w] for v in combo)
                                   for w in range(len(combo[0].worker_seconds)))
                names = tuple(v.name for v in combo)
                out.append(Candidate(i, j, local, per_worker, profile(i, j, names), "+".join(names),
                                     sum(v.drop for v in combo)))
    return out


@dataclass
class PlanRunner:
    """Runs a plan: its local steps with ``local`` (step index -> callable on numpy arrays), its
    tiled steps on ``cluster`` (cluster step ``first_step + k`` is the plan's k-th tiled step, so
    that one cluster can hold several plans). A tiled step with a :data:`MASTER` band has its
    callable in ``local`` too (the whole step's input -> the master's band, e.g. a
    :class:`MasterBand`): it runs here while the workers run theirs, and goes below theirs."""

    plan: Plan
    cluster: object | None
    local: dict[int, Callable[[np.ndarray], np.ndarray]]
    first_step: int = 0
    seconds: list[float] = field(default_factory=list)  # the last call, per step

    def __call__(self, x: np.ndarray) -> np.ndarray:
        import threading  # noqa: PLC0415
        import time  # noqa: PLC0415

        self.seconds = []
        k = self.first_step
        for i, step in enumerate(self.plan.steps):
            t0 = time.perf_counter()
            if step.local:
                x = self.local[i](x)
            elif any(w == MASTER for w, _, _ in step.tiles):
                box: list = []
                worker = threading.Thread(target=lambda x=x, k=k: box.append(self._cluster(x, k)))
                worker.start()
                try:
                    mine = self.local[i](x)
                finally:
                    worker.join()
                if isinstance(box[0], BaseException):
                    raise box[0]
                x = np.concatenate([box[0], mine], axis=2)
                k += 1
            else:
                x = self.cluster(x, step=k)
                k += 1
            self.seconds.append(time.perf_counter() - t0)
        return x

    def _cluster(self, x: np.ndarray, k: int):
        try:
            return self.cluster(x, step=k)
        except BaseException as exc:  # noqa: BLE001 - raised in the calling thread
            return exc


class MasterBand:
    """The master's band of a tiled step: a compiled tile (a ``TileModule``) run here on its
    input rows of the step's input."""

    def __init__(self, module):
        self.rows_in = module.rows_in
        self.run = LocalModule(module)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.run(np.ascontiguousarray(x[:, :, self.rows_in[0]:self.rows_in[1]]))
