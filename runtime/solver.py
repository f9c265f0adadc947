"""Choosing one variant per block under budgets: a multiple-choice knapsack solved with OR-Tools
CP-SAT, in process, for one model or jointly for several that share a device.

Data → model → variables → constraints → objective → solve (time limit) → check status:

* variables: ``x[m][b][v]`` (model m, block b uses variant v), exactly one per block;
* constraints: per-model latency (or one shared processor-time budget: the sum of the models'
  latencies), a shared memory budget, per-model minimum accuracy, optional per-block latency
  limits and allowed variants;
* objective: maximise the weighted estimated accuracy minus a charge for every module that must
  be loaded relative to what is loaded now (so a small budget change does not reshuffle blocks),
  plus a reward for the MACs a configuration keeps: at most ``Profiles.capacity_reward`` (half a
  validation sample's worth of accuracy) for keeping every MAC over keeping none. It only decides
  between configurations whose estimates are closer than that, so a budget that fits the full
  model gets the full model, not an equally-estimated smaller one.

Devices (artifacts compiled with ``--devices cpu,gpu``; see legoc.runtime.estimate): the variables
become ``x[m][b][(v, d)]``, one per block, variant *and device*, still exactly one per block. Let
``g_b = sum_v x[m][b][(v, "gpu")]`` (1 if block b runs on the GPU); frame segments have a constant
``g`` (the default device), model inputs and outputs ``g = 0`` (host memory). For every tensor n
crossing a segment boundary, with producer p and consumers c, a boolean ``t_n`` with
``t_n >= g_p - g_c`` and ``t_n >= g_c - g_p`` for each consumer: ``t_n`` is 1 whenever some
consumer runs on another device than the producer, and ``copy_ms(n) * t_n`` is added to the
model's latency (a tensor whose ends are all fixed adds a constant). Nothing pushes ``t_n`` up
except the latency budget, so at an optimum it may be 1 without need only where that is harmless;
the reported estimate is recomputed from the choice. Accuracy does not depend on the device, so
ties are the rule: a second solve keeps the objective at its optimum and minimises latency (the
fastest of the most accurate choices). Without devices the model is the same one as before: one
option per variant, no ``g`` or ``t``, one solve.

Integer scaling: accuracy to 1e-6 of the metric (rounded), latency to 1 ns rounded *up* and
memory in bytes (exact). Rounding latency up keeps every returned configuration within the real
budget; the optimum can only be missed by a configuration whose true latency lies within
(number of blocks + 1) ns of the budget, and the objective is exact to (number of blocks) x 5e-7.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from legoc.errors import InternalError, UserError
from legoc.runtime.estimate import ASSUMED_LOAD_BYTES_PER_S, Estimate, Profiles

ACC_SCALE = 1_000_000      # objective units per metric unit
LAT_SCALE = 1_000_000      # latency units (ns) per ms
MIB = 1 << 20
DEFAULT_TIME_LIMIT_S = 1.0
DEFAULT_SWITCH_PENALTY = 1e-3   # metric units per ms of module loading (0.1 accuracy points per ms)


@dataclass(frozen=True)
class Budget:
    """Limits for one model. ``memory_mb`` is MiB (2**20 bytes) of resident memory the runtime adds."""

    latency_ms: float | None = None
    memory_mb: float | None = None
    min_accuracy: float | None = None
    block_latency_ms: dict = field(default_factory=dict)     # block name -> max latency of its variant
    allowed: dict = field(default_factory=dict)              # block name -> allowed variant indices

    def __post_init__(self):
        for name in ("latency_ms", "memory_mb"):
            v = getattr(self, name)
            if v is not None and not (v > 0 and math.isfinite(v)):
                raise UserError(f"{name} must be a positive number, got {v}")


@dataclass(frozen=True)
class Selection:
    choices: tuple[tuple[int, ...], ...]   # per model, one variant index per block
    estimates: tuple[Estimate, ...]
    optimal: bool
    status: str
    solve_ms: float
    objective: float
    device_choices: tuple[tuple[str, ...], ...] = ()   # per model, one device per block ("cpu"/"gpu")
    within_budget: bool = True   # False: best effort, no configuration met the latency budget (see solve)

    @property
    def choice(self) -> tuple[int, ...]:
        return self.choices[0]

    @property
    def devices(self) -> tuple[str, ...]:
        return self.device_choices[0]

    @property
    def estimate(self) -> Estimate:
        return self.estimates[0]


@dataclass
class Problem:
    """One model in a selection: its profiles, budget, weight and current state."""

    profiles: Profiles
    budget: Budget = field(default_factory=Budget)
    weight: float = 1.0
    current: Sequence[int] | None = None     # the configuration now in use (None: nothing loaded)
    loaded: set = field(default_factory=set)  # (block, variant) or (block, variant, device) in memory
    name: str = "model"
    current_devices: Sequence[str] | None = None   # the devices now in use (None: the default device)


def _cp_model():
    """A fresh ``CpModel``. OR-Tools' constructor adds camelCase aliases of all its methods to every
    instance (``_add_pre_pep8_methods``: ~60 ``setattr`` through ``dir()``), a noticeable part of a
    single-model solve; legoc calls only the snake_case names, so the subclass skips that step."""
    global _CpModel
    if _CpModel is None:
        from ortools.sat.python import cp_model

        class _Model(cp_model.CpModel):
            def _add_pre_pep8_methods(self) -> None:   # the camelCase aliases: unused here
                pass

        _CpModel = _Model
    return _CpModel()


_CpModel = None


def _check_profiles(p: Problem, shared_latency: bool = False) -> None:
    """Refuse a selection whose constraints would read figures the artifact does not have (a
    missing latency or copy cost must never count as 0). ``shared_latency``: the model's latency
    is part of a shared processor-time budget."""
    prof = p.profiles
    if prof.baseline is None or any(v.drop is None for vs in prof.blocks for v in vs):
        raise UserError(f"{p.name}: the artifact has no accuracy profile; compile it with val_data() or "
                        "train_data() in model.py to select by budget, or use configure(variants=[...])")
    uses_latency = p.budget.latency_ms is not None or shared_latency
    how = "select without latency_ms" if not shared_latency else "schedule it without period_ms"
    if uses_latency and any(t.ms is None for t in prof.transfers):
        raise UserError(f"{p.name}: the CPU<->GPU copy costs of target {prof.manifest.get('target', {}).get('name')} "
                        f"are not estimated (no transfer calibration); {how}")
    if (uses_latency or p.budget.block_latency_ms) and (any(
            v.latency_ms is None for vs in prof.blocks + [prof.frame] for v in vs) or any(
            c.latency_ms is None for vs in prof.device_costs for v in vs for c in v.values())):
        raise UserError(f"{p.name}: some variants have no latency figure for target "
                        f"{prof.manifest.get('target', {}).get('name')}; measure them with `legoc profile ART --rpc …` "
                        f"or {how}")


def capacity_terms(prof: Profiles) -> list[list[int]]:
    """Objective units of the capacity tie-break per block and variant: the variant's share of the
    full model's block MACs times ``prof.capacity_reward`` (0 everywhere if MACs are unknown)."""
    full = prof.full_block_macs()
    if full is None:
        return [[0] * len(vs) for vs in prof.blocks]
    return [[round(prof.capacity_reward * ACC_SCALE * v.macs / full) for v in vs] for vs in prof.blocks]


def _load_ms(v) -> float:
    return v.load_ms if v.load_ms is not None else v.load_bytes / ASSUMED_LOAD_BYTES_PER_S * 1e3


def _bounds(problems: list[Problem]) -> str:
    """The smallest latency and memory any configuration reaches (for infeasibility messages)."""
    parts = []
    for p in problems:
        prof = p.profiles
        lat = prof.min_latency_ms() if all(v.latency_ms is not None for v in prof.frame) else None
        mem = prof.memory_bytes([min(range(len(vs)), key=lambda i: prof.memory_of([vs[i]])) for vs in prof.blocks])
        acc = prof.accuracy([min(range(len(vs)), key=lambda i: vs[i].drop) for vs in prof.blocks])
        who = f"{p.name}: " if len(problems) > 1 else ""
        parts.append(f"{who}smallest latency {lat:.2f} ms, smallest memory {mem / MIB:.2f} MiB, "
                     f"best accuracy {acc:.4f}" if lat is not None else
                     f"{who}smallest memory {mem / MIB:.2f} MiB, best accuracy {acc:.4f}")
    return "; ".join(parts)


class Infeasible(UserError):
    """No configuration meets the budget."""


def solve(problems: list[Problem], *, memory_mb: float | None = None, shared_latency_ms: float | None = None,
          switch_penalty: float = DEFAULT_SWITCH_PENALTY, time_limit_s: float = DEFAULT_TIME_LIMIT_S,
          workers: int = 1, best_effort: bool = False) -> Selection:
    """The optimal variant choice for every model (see the module docstring).

    ``best_effort``: when no configuration meets the latency budgets (an app that must keep
    running on a machine slower than its budget), return the configuration that exceeds them
    least (the sum of the excesses, in ns, minimised first), the most accurate such, with
    ``within_budget=False``, instead of raising :class:`Infeasible`. Memory and accuracy limits
    stay hard."""
    try:
        return _solve(problems, memory_mb, shared_latency_ms, switch_penalty, time_limit_s, workers, soft=False)
    except Infeasible:
        latency_budget = shared_latency_ms is not None or any(p.budget.latency_ms is not None for p in problems)
        if not (best_effort and latency_budget):
            raise
        return _solve(problems, memory_mb, shared_latency_ms, switch_penalty, time_limit_s, workers, soft=True)


def _solve(problems: list[Problem], memory_mb, shared_latency_ms, switch_penalty, time_limit_s, workers,
           soft: bool) -> Selection:
    """One selection; ``soft``: latency budgets may be exceeded, by as little as possible."""
    import time

    from ortools.sat.python import cp_model

    t0 = time.perf_counter()
    for p in problems:
        _check_profiles(p, shared_latency_ms is not None)
    if memory_mb is not None and not (memory_mb > 0 and math.isfinite(memory_mb)):
        raise UserError(f"memory_mb must be a positive number, got {memory_mb}")
    if shared_latency_ms is not None and not (shared_latency_ms > 0 and math.isfinite(shared_latency_ms)):
        raise UserError(f"shared latency budget must be a positive number, got {shared_latency_ms}")

    # -- data: integer coefficients --------------------------------------------------------------
    model = _cp_model()
    xs: list[list[list]] = []
    options: list[list[list[tuple[int, str]]]] = []   # per model, block: the (variant, device) of each x
    lat_terms, mem_terms, objective, excess = [], [], [], []
    fixed_lat, fixed_mem = 0, 0

    def latency_limit(expr, limit_ms: float, label: str) -> None:
        limit = math.floor(limit_ms * LAT_SCALE)
        if not soft:
            model.add(expr <= limit)
            return
        over = model.new_int_var(0, 1 << 50, f"over_{label}")   # ns beyond the budget
        model.add(expr - over <= limit)
        excess.append(over)

    for m, p in enumerate(problems):
        prof, budget = p.profiles, p.budget
        names = prof.block_names
        unknown = set(budget.block_latency_ms) | set(budget.allowed)
        if unknown - set(names):
            raise UserError(f"{p.name}: unknown block(s) {sorted(unknown - set(names))}; blocks are {names}")
        frame_lat = sum(v.latency_ms or 0.0 for v in prof.frame) + prof.call_overhead_ms * prof.num_segments
        frame_mem = prof.memory_of(prof.frame)
        # options per block: (variant, device); one device: exactly the variants, as without devices
        devices = prof.devices
        opts = [[(v, d) for v in range(len(vs)) for d in devices] for vs in prof.device_costs]
        options.append(opts)
        default = prof.default_device
        current = None
        if p.current is not None:
            current = list(zip(p.current, p.current_devices or [default] * len(p.current)))
        loaded = {(k[0], k[1], default) if len(k) == 2 else tuple(k) for k in p.loaded}
        # -- variables
        x = [[model.new_bool_var(f"x_{m}_{b}_{v}" if len(devices) == 1 else f"x_{m}_{b}_{v}_{d}")
              for v, d in row] for b, row in enumerate(opts)]
        xs.append(x)
        if current is not None:   # start the search from the configuration in use
            for b, row in enumerate(x):
                for k, var in enumerate(row):
                    model.add_hint(var, opts[b][k] == current[b])
        m_lat, m_mem, m_acc = [], [], []
        reward = capacity_terms(prof)
        for b, vs in enumerate(prof.device_costs):
            model.add_exactly_one(x[b])
            allowed = budget.allowed.get(names[b])
            limit = budget.block_latency_ms.get(names[b])
            shared = max((c.shared_bytes for v in vs for c in v.values() if c.shared_file), default=0)
            for k, (v, d) in enumerate(opts[b]):
                cost = vs[v][d]
                if (allowed is not None and v not in allowed) or (limit is not None and cost.latency_ms > limit):
                    model.add(x[b][k] == 0)
                lat = math.ceil((cost.latency_ms or 0.0) * LAT_SCALE)
                mem = prof.memory_of([cost]) - (cost.shared_bytes if cost.shared_file else 0) + shared
                acc = round(-cost.drop * ACC_SCALE)
                charge = 0
                if current is not None and (b, v, d) not in loaded and current[b] != (v, d):
                    charge = round(switch_penalty * _load_ms(cost) * ACC_SCALE)
                m_lat.append((lat, x[b][k]))
                m_mem.append((mem, x[b][k]))
                m_acc.append((acc, x[b][k]))
                objective.append((round(p.weight * acc) - round(p.weight * charge) + round(p.weight * reward[b][v]),
                                  x[b][k]))
        # -- device choice: copies between CPU and GPU
        frame_lat += _transfer_terms(model, prof, opts, x, m, m_lat)
        frame_lat_int = math.ceil(frame_lat * LAT_SCALE)
        # -- constraints
        lat_expr = sum(c * var for c, var in m_lat) + frame_lat_int
        if budget.latency_ms is not None:
            latency_limit(lat_expr, budget.latency_ms, str(m))
        if budget.memory_mb is not None:
            model.add(sum(c * var for c, var in m_mem) + frame_mem <= int(budget.memory_mb * MIB))
        if budget.min_accuracy is not None:
            base = round(prof.baseline * ACC_SCALE)
            model.add(sum(c * var for c, var in m_acc) + base >= math.ceil(budget.min_accuracy * ACC_SCALE))
        lat_terms.append(lat_expr)
        mem_terms.extend(m_mem)
        fixed_mem += frame_mem
        fixed_lat += frame_lat_int
    if memory_mb is not None:
        model.add(sum(c * var for c, var in mem_terms) + fixed_mem <= int(memory_mb * MIB))
    if shared_latency_ms is not None:
        latency_limit(sum(lat_terms), shared_latency_ms, "shared")
    # -- solve with a time limit
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = time_limit_s
    solver.parameters.num_workers = workers
    solver.parameters.symmetry_level = 0       # both cut the solve time of these knapsacks
    solver.parameters.linearization_level = 2  # (benchmarks/solver.py)
    solver.parameters.cp_model_presolve = False  # one-hot knapsacks gain nothing from presolve
    if excess:   # best effort: the least excess first, then (below) the most accurate at that excess
        model.minimize(sum(excess))
        if solver.solve(model) in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            model.add(sum(excess) <= round(solver.objective_value))
    # -- objective
    accuracy = sum(c * var for c, var in objective)
    model.maximize(accuracy)
    status = solver.solve(model)
    name = solver.status_name(status)
    # -- check the status
    if status == cp_model.INFEASIBLE:
        asked = []
        for p in problems:
            b = p.budget
            who = f"{p.name}: " if len(problems) > 1 else ""
            asked += [f"{who}latency ≤ {b.latency_ms} ms"] * (b.latency_ms is not None)
            asked += [f"{who}memory ≤ {b.memory_mb} MiB"] * (b.memory_mb is not None)
            asked += [f"{who}accuracy ≥ {b.min_accuracy}"] * (b.min_accuracy is not None)
        asked += [f"shared memory ≤ {memory_mb} MiB"] * (memory_mb is not None)
        asked += [f"total latency ≤ {shared_latency_ms} ms"] * (shared_latency_ms is not None)
        raise Infeasible(f"no configuration meets the budget ({', '.join(asked) or 'per-block limits'}): "
                        f"{_bounds(problems)}; relax the budget")
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        if status == cp_model.MODEL_INVALID:
            raise InternalError(f"CP-SAT rejected the selection model: {model.validate()}")
        raise UserError(f"the solver found no configuration within its time limit of {time_limit_s} s "
                        f"(status {name}); raise time_limit_s")
    best = solver.objective_value
    values = [[[solver.boolean_value(var) for var in row] for row in x] for x in xs]
    if status == cp_model.OPTIMAL and any(len(p.profiles.devices) > 1 for p in problems):
        # the device decides latency, not accuracy: among the most accurate choices, the fastest
        remaining = time_limit_s - (time.perf_counter() - t0)
        values = _fastest_of_best(model, solver, accuracy, round(best), sum(lat_terms), xs, values, remaining)
    picked = [[opts[b][row.index(True)] for b, row in enumerate(x)] for x, opts in zip(values, options)]
    choices = tuple(tuple(v for v, _ in rows) for rows in picked)
    devices = tuple(tuple(d for _, d in rows) for rows in picked)
    return Selection(
        choices=choices, estimates=tuple(p.profiles.estimate(c, d) for p, c, d in zip(problems, choices, devices)),
        optimal=status == cp_model.OPTIMAL, status=name, solve_ms=(time.perf_counter() - t0) * 1e3,
        objective=best / ACC_SCALE, device_choices=devices, within_budget=not soft)


def _fastest_of_best(model, solver, accuracy, best: int, latency, xs, values, time_limit_s: float):
    """Second pass for device choices: keep the objective at its optimum ``best`` and minimise the
    summed latency (every x fixed by the first pass is a hint). Returns the new x values, or
    ``values`` unchanged if the time left does not reach an optimum."""
    from ortools.sat.python import cp_model

    if time_limit_s <= 0.01:
        return values
    model.add(accuracy >= best)
    model.clear_hints()
    for x, vx in zip(xs, values):
        for row, vrow in zip(x, vx):
            for var, value in zip(row, vrow):
                model.add_hint(var, value)
    model.minimize(latency)
    solver.parameters.max_time_in_seconds = time_limit_s
    if solver.solve(model) not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return values
    return [[[solver.boolean_value(var) for var in row] for row in x] for x in xs]


def _transfer_terms(model, prof: Profiles, opts, x, m: int, m_lat: list) -> float:
    """The copies of one model (see the module docstring): appends ``(ns, t_n)`` latency terms
    for copies that depend on the device choice and returns the ms of those that do not."""
    if not prof.transfers:
        return 0.0

    def on_gpu(segment: int | None):
        """g of a segment: a linear expression of x for a block, 0/1 for the frame and host."""
        if segment is None:
            return 0
        block = prof.segment_block[segment]
        if block is None:
            return int(prof.frame_device == "gpu")
        return sum(var for var, (_, d) in zip(x[block], opts[block]) if d == "gpu")

    fixed = 0.0
    for t in prof.transfers:
        ms = t.ms or 0.0   # None only without a latency budget (checked before): then it does not matter
        src, dsts = on_gpu(t.producer), [on_gpu(c) for c in t.consumers]
        if isinstance(src, int) and all(isinstance(g, int) for g in dsts):
            fixed += ms if any(g != src for g in dsts) else 0.0
            continue
        copy = model.new_bool_var(f"t_{m}_{t.name}")
        for g in dsts:
            model.add(copy >= src - g)
            model.add(copy >= g - src)
        m_lat.append((math.ceil(ms * LAT_SCALE), copy))
    return fixed
