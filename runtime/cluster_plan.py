"""legoc.runtime.cluster_plan: which blocks to tile, over which workers, with which output rows,
chosen from measurements (issue 19).

**The model.** A chain of blocks ``0 .. n-1`` runs on the master (this process): the input is
here and the output must end here. The plan cuts the chain into steps, each a run of consecutive
blocks among the given :class:`Candidate` runs (e.g. every block alone and every run of blocks
joined into one tiled unit), run one after another. A step is either

* **local**: the run whole on the master, its measured seconds ``local_seconds``; or
* **tiled** over some of the workers, taken in their given order, worker ``w`` computing the
  output rows ``[a_w, b_w)`` (consecutive, together all ``H`` rows)::

      T = max_w (rtt_w + c_w * work(a_w, b_w) / work(0, H))  +  sum_w bytes(a_w, b_w) / bandwidth_w

  ``c_w`` is worker ``w``'s measured seconds for the whole run (on its device, no transfer),
  ``work`` the tile's work from :func:`legoc.passes.tiling.row_profile` (multiply-adds over every
  row each op computes, so halo rows computed twice count twice), ``bytes`` its input band (halo
  included) plus its output band, ``rtt_w`` and ``bandwidth_w`` the worker's measured link. The
  transfer times add up because the master's link carries every band: on one network interface,
  or one shaped loopback, transfers to different workers share its bandwidth.

Every step's input and output pass through the master, so steps do not overlap.

**Solving it exactly.**

* Rows of one tiled run: a dynamic program over (workers considered, first row not yet given)
  that keeps, per state, the Pareto front of pairs (slowest worker so far, transfer seconds so
  far). ``T`` is nondecreasing in both, so a dominated pair never leads to the optimum, and the
  front is exact. A worker may take no rows (sits the step out): "fewer workers" is in the
  search. ``O(W * H^2 * F)`` for W workers, H output rows, fronts of at most F pairs.
* The chain: ``best[j] = min over candidates [i, j) of best[i] + min(local, best tiled)``, which
  also covers "all local" and "one worker".

Torch-free: the measuring functions use the TVM runtime through :mod:`legoc.runtime.cluster`.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from legoc.errors import UserError

__all__ = ["Candidate", "Link", "LocalModule", "Plan", "PlanRunner", "RunProfile", "Step", "best_rows",
           "chain_candidates", "equal_rows", "measure_links", "measure_local", "measure_workers", "plan_chain",
           "step_seconds"]


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
    """A worker's link from the master: seconds per call that do not depend on size, and bytes
    per second."""

    rtt: float
    bandwidth: float


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

    @property
    def local(self) -> bool:
        return not self.tiles

    def describe(self) -> str:
        what = f"blocks {self.first}-{self.last - 1}" if self.last - self.first > 1 else f"block {self.first}"
        if self.local:
            return f"{what}: local, {self.seconds * 1e3:.1f} ms"
        rows = ", ".join(f"worker {w} rows {a}-{b}" for w, a, b in self.tiles)
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

    def describe(self) -> str:
        return "\n".join([f"estimate {self.seconds * 1e3:.1f} ms", *(s.describe() for s in self.steps)])


def equal_rows(height: int, k: int) -> list[tuple[int, int]]:
    """``[0, height)`` in ``k`` consecutive ranges as equal as rows allow."""
    if not 1 <= k <= height:
        raise UserError(f"{k} tiles of {height} output rows: use 1 to {height} tiles")
    cuts = [round(i * height / k) for i in range(k + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


def _tile_parts(cand: Candidate, links: Sequence[Link], w: int, a: int, b: int) -> tuple[float, float]:
    """(rtt + compute seconds, transfer seconds) of worker ``w`` computing rows [a, b)."""
    p = cand.profile
    return (links[w].rtt + cand.worker_seconds[w] * p.work_share(a, b), p.band_bytes(a, b) / links[w].bandwidth)


def step_seconds(cand: Candidate, links: Sequence[Link], tiles: Sequence[tuple[int, int, int]] = ()) -> Step:
    """The model's estimate for running ``cand`` locally (no ``tiles``) or as the given tiles."""
    if not tiles:
        if cand.local_seconds is None:
            raise UserError(f"blocks {cand.first}-{cand.last - 1} were not measured on the master")
        return Step(cand.first, cand.last, (), cand.local_seconds)
    if cand.profile is None:
        raise UserError(f"blocks {cand.first}-{cand.last - 1} cannot be tiled")
    parts = [_tile_parts(cand, links, w, a, b) for w, a, b in tiles]
    compute, transfer = max(c for c, _ in parts), sum(t for _, t in parts)
    return Step(cand.first, cand.last, tuple(tiles), compute + transfer, compute, transfer)


def best_rows(cand: Candidate, links: Sequence[Link]) -> Step | None:
    """The fastest tiling of one run under the model (exact: the Pareto DP of the module
    docstring), or None when it cannot be tiled or no worker can run it."""
    p = cand.profile
    if p is None or not any(s is not None for s in cand.worker_seconds):
        return None
    H = p.height
    # front[c]: Pareto-optimal (slowest, transfer, tiles) with rows [0, c) given away
    front: list[list[tuple[float, float, tuple]]] = [[] for _ in range(H + 1)]
    front[0] = [(0.0, 0.0, ())]
    for w, seconds in enumerate(cand.worker_seconds):
        if seconds is None:
            continue
        new = [list(f) for f in front]  # the worker sits out: every state stays
        for a in range(H):
            if not front[a]:
                continue
            for b in range(a + 1, H + 1):
                compute, transfer = _tile_parts(cand, links, w, a, b)
                for slow, moved, tiles in front[a]:
                    new[b].append((max(slow, compute), moved + transfer, tiles + ((w, a, b),)))
        front = [_pareto(f) for f in new]
    if not front[H]:
        return None
    slow, moved, tiles = min(front[H], key=lambda t: (t[0] + t[1], len(t[2])))
    return Step(cand.first, cand.last, tiles, slow + moved, slow, moved)


def _pareto(points: list[tuple[float, float, tuple]]) -> list[tuple[float, float, tuple]]:
    """The points no other point beats in both coordinates (ties: fewer tiles kept)."""
    out, best_moved = [], float("inf")
    for pt in sorted(points, key=lambda t: (t[0], t[1], len(t[2]))):
        if pt[1] < best_moved:
            out.append(pt)
            best_moved = pt[1]
    return out


def plan_chain(n_blocks: int, candidates: Sequence[Candidate], links: Sequence[Link]) -> Plan:
    """The fastest plan for blocks ``0 .. n_blocks-1`` under the model: a DP over the chain, each
    candidate run local or tiled with its best rows."""
    by_end: dict[int, list[tuple[Candidate, Step]]] = {}
    for cand in candidates:
        if not 0 <= cand.first < cand.last <= n_blocks:
            raise UserError(f"candidate blocks {cand.first}-{cand.last - 1} are outside the chain of {n_blocks}")
        options = [step_seconds(cand, links)] if cand.local_seconds is not None else []
        tiled = best_rows(cand, links)
        if tiled is not None:
            options.append(tiled)
        if options:
            by_end.setdefault(cand.last, []).append((cand, min(options, key=lambda s: s.seconds)))
    best: list[tuple[float, tuple[Step, ...]] | None] = [None] * (n_blocks + 1)
    best[0] = (0.0, ())
    for j in range(1, n_blocks + 1):
        for cand, step in by_end.get(j, []):
            if best[cand.first] is None:
                continue
            total = best[cand.first][0] + step.seconds
            steps = best[cand.first][1] + (step,)
            # on a tie (within rounding: a run's local seconds are the sum of its blocks'), fewer
            # steps: one local module rather than several back to back
            if (best[j] is None or total < best[j][0] - 1e-9 * best[j][0]
                    or (total <= best[j][0] + 1e-9 * best[j][0] and len(steps) < len(best[j][1]))):
                best[j] = (total, steps)
    if best[n_blocks] is None:
        raise UserError(f"no candidate runs cover blocks 0-{n_blocks - 1}: measure every block locally or on a worker")
    return Plan(best[n_blocks][1])


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


# --- measuring ------------------------------------------------------------------------------

def measure_links(workers: str | Sequence[str], nbytes: int = 1 << 20, repeat: int = 5,
                  timeout: float = 120.0) -> list[Link]:
    """Each worker's link, measured through a TVM RPC session: the median round trip of a 4-byte
    array (to the device and back) is ``rtt``; ``nbytes`` up and the same back, less ``rtt``,
    gives ``bandwidth``. The links are measured one after another."""
    from legoc.runtime.cluster import Probe

    with Probe(workers, timeout=timeout) as probe:
        probe.echo_seconds(nbytes, 1)  # warm up the sessions and buffers
        tiny = [statistics.median(t) for t in probe.echo_seconds(4, repeat)]
        big = [statistics.median(t) for t in probe.echo_seconds(nbytes, repeat)]
    return [Link(rtt=r, bandwidth=2 * (nbytes // 4 * 4) / max(b - r, 1e-9)) for r, b in zip(tiny, big)]


def measure_workers(workers: str | Sequence[str], modules, inputs: Sequence[np.ndarray], number: int = 3,
                    repeat: int = 3, timeout: float = 120.0) -> list[list[float]]:
    """Seconds of each module (a :class:`legoc.runtime.cluster.TileModule` run whole, on its
    input) on each worker's device, every worker timed at once as in a tiled call:
    ``[module][worker]``."""
    from legoc.runtime.cluster import Probe

    with Probe(workers, modules, timeout=timeout) as probe:
        return [probe.compute_seconds(x, step=i, number=number, repeat=repeat) for i, x in enumerate(inputs)]


class LocalModule:
    """A compiled module (a ``TileModule``) run in this process on its CPU."""

    def __init__(self, module):
        import tvm  # noqa: PLC0415
        import tvm.runtime.vm  # noqa: F401, PLC0415

        self.dev = tvm.cpu()
        self.vm = tvm.runtime.vm.VirtualMachine(tvm.runtime.load_module(str(module.path)), self.dev)
        self.params = [tvm.runtime.tensor(np.ascontiguousarray(w), self.dev) for w in module.weights]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        import tvm  # noqa: PLC0415

        out = self.vm["main"](tvm.runtime.tensor(np.ascontiguousarray(x), self.dev), *self.params)
        return out.numpy() if hasattr(out, "numpy") else out[0].numpy()

    def seconds(self, x: np.ndarray, number: int = 3, repeat: int = 3) -> float:
        import tvm  # noqa: PLC0415

        timer = self.vm.time_evaluator("main", self.dev, number=number, repeat=repeat)
        return float(np.median(timer(tvm.runtime.tensor(np.ascontiguousarray(x), self.dev), *self.params).results))


def measure_local(modules, inputs: Sequence[np.ndarray], number: int = 3, repeat: int = 3) -> list[float]:
    """Seconds of each module on its input in this process (the master's share of a plan)."""
    return [LocalModule(m).seconds(x, number, repeat) for m, x in zip(modules, inputs)]


@dataclass
class PlanRunner:
    """Runs a plan: its local steps with ``local`` (step index -> callable on numpy arrays), its
    tiled steps on ``cluster`` (cluster step ``first_step + k`` is the plan's k-th tiled step, so
    that one cluster can hold several plans)."""

    plan: Plan
    cluster: object | None
    local: dict[int, Callable[[np.ndarray], np.ndarray]]
    first_step: int = 0
    seconds: list[float] = field(default_factory=list)  # the last call, per step

    def __call__(self, x: np.ndarray) -> np.ndarray:
        import time  # noqa: PLC0415

        self.seconds = []
        k = self.first_step
        for i, step in enumerate(self.plan.steps):
            t0 = time.perf_counter()
            if step.local:
                x = self.local[i](x)
            else:
                x = self.cluster(x, step=k)
                k += 1
            self.seconds.append(time.perf_counter() - t0)
        return x
