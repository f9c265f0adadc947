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

Energy and DVFS (legoc.runtime.energy states the estimation rule): with an energy budget
(``Budget.energy_mj`` per model, ``shared_energy_mj`` for all), ``objective="energy"`` or
``dvfs=True``, each model's energy per inference is a linear expression too: every option's
energy, the frame's and the dispatch overhead's, and ``copy_ms x P`` per copy variable ``t_n``.
``objective``: "accuracy" maximises the objective above within every budget (and then, among
the most accurate choices with devices or DVFS, minimises the summed energy); "energy" minimises
the weighted summed energy (plus each module load's switching energy spread over
``amortize_inferences`` inferences) within the latency, memory, energy and minimum-accuracy
limits. With ``dvfs`` the clock of each device of the board is a decision too, shared by every
model: booleans ``z[d][f]``, exactly one per device; the options of a block become ``(variant,
device, level)``, latency and energy coefficients at that level, with ``sum of x over options on
(d, f) <= z[d][f]`` per block (``==`` with one device), and the frame and the overhead
contribute ``z``-weighted terms. A level that is no faster and needs no less energy per unit of
work than another of its device is never better, so it gets no ``z`` (:func:`_undominated`).
With devices or clocks to choose and energy in play, the "accuracy" objective's tie-break (the
least energy among the most accurate) is part of one solve: the accuracy objective times (an
upper bound of the energy + 1), minus the energy. Without any of the three the model is exactly
the one above.

Integer scaling: accuracy to 1e-6 of the metric (rounded), latency to 1 ns and energy to 1 nJ
rounded *up*, memory in bytes (exact). Rounding up keeps every returned configuration within the
real budget; the optimum can only be missed by a configuration whose true latency (energy) lies
within (number of blocks + 1) ns (nJ) of the budget, and the objective is exact to (number of
blocks) x 5e-7.
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
ENERGY_SCALE = 1_000_000   # energy units (nJ) per mJ
# The energy objective spreads a module load's switching energy over this many inferences: a
# configuration is expected to serve at least that many (3 s at 30 frames per second).
DEFAULT_AMORTIZE_INFERENCES = 100


@dataclass(frozen=True)
class Budget:
    """Limits for one model. ``memory_mb`` is MiB (2**20 bytes) of resident memory the runtime adds."""

    latency_ms: float | None = None
    memory_mb: float | None = None
    min_accuracy: float | None = None
    block_latency_ms: dict = field(default_factory=dict)     # block name -> max latency of its variant
    allowed: dict = field(default_factory=dict)              # block name -> allowed variant indices
    energy_mj: float | None = None   # energy of one inference (legoc.runtime.energy; estimated or measured)

    def __post_init__(self):
        for name in ("latency_ms", "memory_mb", "energy_mj"):
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
    levels: dict = field(default_factory=dict)   # dvfs: device -> MHz chosen (empty: the clocks as profiled)
    switch_energy_mj: tuple = ()   # per model: energy to load what the choice needs (None: no figures)

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


def _check_profiles(p: Problem, shared_latency: bool = False, energy: bool = False) -> None:
    """Refuse a selection whose constraints would read figures the artifact does not have (a
    missing latency, copy cost or energy figure must never count as 0). ``shared_latency``: the
    model's latency is part of a shared processor-time budget; ``energy``: energy is in play."""
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
    if energy:
        why = prof.energy_unavailable()
        if why is not None:
            raise UserError(f"{p.name}: energy is unavailable: {why}")
        if any(prof.option_energy_mj(c, d) is None for vs in prof.device_costs for v in vs for d, c in v.items()) \
                or prof.frame_energy_mj() is None:
            raise UserError(f"{p.name}: some variants have no energy figure (it is estimated from their latency, "
                            f"which target {prof.target_name} lacks); measure them with `legoc profile ART --rpc …`")


def capacity_terms(prof: Profiles) -> list[list[int]]:
    """Objective units of the capacity tie-break per block and variant: the variant's share of the
    full model's block MACs times ``prof.capacity_reward`` (0 everywhere if MACs are unknown)."""
    full = prof.full_block_macs()
    if full is None:
        return [[0] * len(vs) for vs in prof.blocks]
    return [[round(prof.capacity_reward * ACC_SCALE * v.macs / full) for v in vs] for vs in prof.blocks]


def _load_ms(v) -> float:
    return v.load_ms if v.load_ms is not None else v.load_bytes / ASSUMED_LOAD_BYTES_PER_S * 1e3


def _bounds(problems: list[Problem], energy: bool = False, dvfs: bool = False) -> str:
    """The smallest latency and memory any configuration reaches (for infeasibility messages)."""
    parts = []
    for p in problems:
        prof = p.profiles
        lat = prof.min_latency_ms() if all(v.latency_ms is not None for v in prof.frame) else None
        mem = prof.memory_bytes([min(range(len(vs)), key=lambda i: prof.memory_of([vs[i]])) for vs in prof.blocks])
        acc = prof.accuracy([min(range(len(vs)), key=lambda i: vs[i].drop) for vs in prof.blocks])
        who = f"{p.name}: " if len(problems) > 1 else ""
        text = (f"{who}smallest latency {lat:.2f} ms, smallest memory {mem / MIB:.2f} MiB, "
                f"best accuracy {acc:.4f}" if lat is not None else
                f"{who}smallest memory {mem / MIB:.2f} MiB, best accuracy {acc:.4f}")
        least = prof.min_energy_mj(dvfs) if energy else None
        parts.append(text + (f", least energy {least:.3f} mJ" + (" (any DVFS levels)" if dvfs else "")
                             if least is not None else ""))
    return "; ".join(parts)


class Infeasible(UserError):
    """No configuration meets the budget."""


OBJECTIVES = ("accuracy", "energy")


def solve(problems: list[Problem], *, memory_mb: float | None = None, shared_latency_ms: float | None = None,
          switch_penalty: float = DEFAULT_SWITCH_PENALTY, time_limit_s: float = DEFAULT_TIME_LIMIT_S,
          workers: int = 1, best_effort: bool = False, objective: str = "accuracy", dvfs: bool = False,
          shared_energy_mj: float | None = None,
          amortize_inferences: int = DEFAULT_AMORTIZE_INFERENCES) -> Selection:
    """The optimal variant choice for every model (see the module docstring).

    ``best_effort``: when no configuration meets the latency budgets (an app that must keep
    running on a machine slower than its budget), return the configuration that exceeds them
    least (the sum of the excesses, in ns, minimised first), the most accurate such, with
    ``within_budget=False``, instead of raising :class:`Infeasible`. Memory, accuracy and energy
    limits stay hard.

    Energy (see "Energy and DVFS" in the module docstring): ``objective`` "accuracy" (the most
    accurate within every budget) or "energy" (the least energy per inference within them);
    ``dvfs``: choose one DVFS level per device of the board too (shared by every model);
    ``shared_energy_mj``: a limit on the summed energy of one inference of every model;
    ``amortize_inferences``: the energy objective charges a module load's switching energy
    spread over this many inferences."""
    if objective not in OBJECTIVES:
        raise UserError(f"unknown objective {objective!r}; choose one of: {', '.join(OBJECTIVES)}")
    if not (isinstance(amortize_inferences, int) and amortize_inferences >= 1):
        raise UserError(f"amortize_inferences must be a whole number of at least 1, got {amortize_inferences!r}")
    energy = _Energy(problems, objective, dvfs, shared_energy_mj, amortize_inferences)
    try:
        return _solve(problems, memory_mb, shared_latency_ms, switch_penalty, time_limit_s, workers, soft=False,
                      energy=energy)
    except Infeasible:
        latency_budget = shared_latency_ms is not None or any(p.budget.latency_ms is not None for p in problems)
        if not (best_effort and latency_budget):
            raise
        return _solve(problems, memory_mb, shared_latency_ms, switch_penalty, time_limit_s, workers, soft=True,
                      energy=energy)


@dataclass(frozen=True)
class _Energy:
    """The energy part of a selection: off (``on`` False) unless a budget, the objective or DVFS
    asks for it; then the selection is exactly the one without energy."""

    problems: list
    objective: str
    dvfs: bool
    shared_mj: float | None
    amortize: int

    @property
    def on(self) -> bool:
        return (self.objective == "energy" or self.dvfs or self.shared_mj is not None
                or any(p.budget.energy_mj is not None for p in self.problems))

    def power(self):
        """The one board's power model whose levels the selection chooses (``dvfs``)."""
        models = [p.profiles.power for p in self.problems]
        for p, pm in zip(self.problems, models):
            if pm is None:
                raise UserError(f"{p.name}: DVFS needs the target's levels, and target {p.profiles.target_name} has "
                                "no power model; select without dvfs, or add a \"power\" object to the target's JSON")
        first = models[0].to_json()["devices"]
        for p, pm in zip(self.problems[1:], models[1:]):
            if pm.to_json()["devices"] != first:
                raise UserError(f"DVFS levels are chosen for one board, but {self.problems[0].name} and {p.name} "
                                "were compiled for targets with different power models")
        return models[0]


def _solve(problems: list[Problem], memory_mb, shared_latency_ms, switch_penalty, time_limit_s, workers,
           soft: bool, energy: _Energy) -> Selection:
    """One selection; ``soft``: latency budgets may be exceeded, by as little as possible."""
    import time

    from ortools.sat.python import cp_model

    t0 = time.perf_counter()
    power = energy.power() if energy.dvfs else None   # one board's levels (refused first without any)
    for p in problems:
        _check_profiles(p, shared_latency_ms is not None, energy.on)
    if memory_mb is not None and not (memory_mb > 0 and math.isfinite(memory_mb)):
        raise UserError(f"memory_mb must be a positive number, got {memory_mb}")
    if shared_latency_ms is not None and not (shared_latency_ms > 0 and math.isfinite(shared_latency_ms)):
        raise UserError(f"shared latency budget must be a positive number, got {shared_latency_ms}")
    if energy.shared_mj is not None and not (energy.shared_mj > 0 and math.isfinite(energy.shared_mj)):
        raise UserError(f"shared energy budget must be a positive number, got {energy.shared_mj}")

    # -- data: integer coefficients --------------------------------------------------------------
    model = _cp_model()
    xs: list[list[list]] = []
    options: list[list[list[tuple]]] = []   # per model, block: the (variant, device, level) of each x
    lat_terms, mem_terms, objective, excess = [], [], [], []
    en_terms, en_objective = [], []          # per model: energy expression; the energy objective's terms
    fixed_lat, fixed_mem = 0, 0
    en_ub = 0   # an upper bound of the summed energy terms (units)
    # -- DVFS: one level per device of the board, shared by every model (z[device][MHz])
    z = {d: {lv.mhz: model.new_bool_var(f"z_{d}_{lv.mhz:g}") for lv in _undominated(dev)}
         for d, dev in power.devices.items()} if power else {}
    for group in z.values():
        model.add_exactly_one(group.values())

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
        # options per block: (variant, device, level); one device and no DVFS: exactly the variants
        devices = prof.devices
        levels = {d: (list(z[d]) if z else [None]) for d in devices}
        opts = [[(v, d, lv) for v in range(len(vs)) for d in devices for lv in levels[d]] for vs in prof.device_costs]
        options.append(opts)
        default = prof.default_device
        current = None
        if p.current is not None:
            current = list(zip(p.current, p.current_devices or [default] * len(p.current)))
        loaded = {(k[0], k[1], default) if len(k) == 2 else tuple(k) for k in p.loaded}
        # -- variables
        x = [[model.new_bool_var(f"x_{m}_{b}_{v}" if len(devices) == 1 and not z else f"x_{m}_{b}_{v}_{d}_{lv}")
              for v, d, lv in row] for b, row in enumerate(opts)]
        xs.append(x)
        if current is not None:   # start the search from the configuration in use (at the reference clocks)
            for b, row in enumerate(x):
                for k, var in enumerate(row):
                    v, d, lv = opts[b][k]
                    model.add_hint(var, (v, d) == current[b] and (lv is None or lv == power.devices[d].reference_mhz))
        m_lat, m_mem, m_acc, m_en = [], [], [], []
        reward = capacity_terms(prof)
        ratio = {(d, lv): prof.level_ratio(d, lv) for d in z for lv in z[d]}
        for b, vs in enumerate(prof.device_costs):
            model.add_exactly_one(x[b])
            allowed = budget.allowed.get(names[b])
            limit = budget.block_latency_ms.get(names[b])
            shared = max((c.shared_bytes for v in vs for c in v.values() if c.shared_file), default=0)
            same = {}     # (variant, device) -> what does not depend on the level
            at = {}       # (device, level) -> the options that run there
            block_en = 0
            for k, (v, d, lv) in enumerate(opts[b]):
                var, cost = x[b][k], vs[v][d]
                if (v, d) not in same:
                    mem = prof.memory_of([cost]) - (cost.shared_bytes if cost.shared_file else 0) + shared
                    acc = round(-cost.drop * ACC_SCALE)
                    charge = 0
                    switching = current is not None and (b, v, d) not in loaded and current[b] != (v, d)
                    if switching:
                        charge = round(switch_penalty * _load_ms(cost) * ACC_SCALE)
                    same[v, d] = (mem, acc, switching, round(p.weight * acc) - round(p.weight * charge)
                                  + round(p.weight * reward[b][v]))
                mem, acc, switching, value = same[v, d]
                lat_ms = (cost.latency_ms or 0.0) if lv is None else (cost.latency_ms or 0.0) * ratio[d, lv]
                if (allowed is not None and v not in allowed) or (limit is not None and lat_ms > limit):
                    model.add(var == 0)
                m_lat.append((math.ceil(lat_ms * LAT_SCALE), var))
                m_mem.append((mem, var))
                m_acc.append((acc, var))
                objective.append((value, var))
                if energy.on:
                    e = math.ceil(prof.option_energy_mj(cost, d, lv) * ENERGY_SCALE)
                    m_en.append((e, var))
                    block_en = max(block_en, e)   # the most one block can add (the tie-break's scale)
                    if switching and energy.objective == "energy":   # the load's energy, amortized
                        load = prof.switch_energy_mj(cost) or 0.0
                        en_objective.append((round(p.weight * math.ceil(load * ENERGY_SCALE / energy.amortize)), var))
                if z:
                    at.setdefault((d, lv), []).append(var)
            for (d, lv), group in at.items():   # a block runs at its device's level (one device: exactly)
                model.add(sum(group) == z[d][lv] if len(devices) == 1 else sum(group) <= z[d][lv])
            en_ub += block_en
        # -- device choice: copies between CPU and GPU
        copies: list = []
        fixed_copy_ms = _transfer_terms(model, prof, opts, x, m, m_lat, copies)
        frame_lat += fixed_copy_ms
        fixed_en = 0.0
        if z:   # the frame at its device's level, the dispatch overhead at the CPU's
            frame_lat = fixed_copy_ms
            fd, frame_ms = prof.frame_device, sum(v.latency_ms or 0.0 for v in prof.frame)
            for lv, var in z[fd].items():
                m_lat.append((math.ceil(frame_ms * prof.level_ratio(fd, lv) * LAT_SCALE), var))
            for lv, var in z["cpu"].items():
                m_lat.append((math.ceil(prof.overhead_ms() * prof.level_ratio("cpu", lv) * LAT_SCALE), var))
            frame_en = [(math.ceil(prof.frame_energy_mj(lv) * ENERGY_SCALE), var) for lv, var in z[fd].items()]
            overhead_en = [(math.ceil(prof.overhead_energy_mj(lv) * ENERGY_SCALE), var) for lv, var in z["cpu"].items()]
            m_en += frame_en + overhead_en
            en_ub += max(c for c, _ in frame_en) + max(c for c, _ in overhead_en)
        elif energy.on:
            fixed_en = prof.frame_energy_mj() + prof.overhead_energy_mj()
        if energy.on:
            watts = prof.copy_power_w() or 0.0
            copy_en = [(math.ceil(ms * watts * ENERGY_SCALE), var) for ms, var in copies]
            m_en += copy_en
            en_ub += sum(c for c, _ in copy_en)
            fixed_en += fixed_copy_ms * watts
        frame_lat_int = math.ceil(frame_lat * LAT_SCALE)
        # -- constraints
        lat_expr = _weighted(m_lat) + frame_lat_int
        if budget.latency_ms is not None:
            latency_limit(lat_expr, budget.latency_ms, str(m))
        if budget.memory_mb is not None:
            model.add(_weighted(m_mem) + frame_mem <= int(budget.memory_mb * MIB))
        if budget.min_accuracy is not None:
            base = round(prof.baseline * ACC_SCALE)
            model.add(_weighted(m_acc) + base >= math.ceil(budget.min_accuracy * ACC_SCALE))
        if energy.on:
            fixed_en_int = math.ceil(fixed_en * ENERGY_SCALE)
            en_expr = _weighted(m_en) + fixed_en_int
            en_ub += fixed_en_int
            if budget.energy_mj is not None:
                model.add(en_expr <= math.floor(budget.energy_mj * ENERGY_SCALE))
            en_terms.append(en_expr)
            en_objective += [(round(p.weight * c), var) for c, var in m_en]
        lat_terms.append(lat_expr)
        mem_terms.extend(m_mem)
        fixed_mem += frame_mem
        fixed_lat += frame_lat_int
    if memory_mb is not None:
        model.add(_weighted(mem_terms) + fixed_mem <= int(memory_mb * MIB))
    if shared_latency_ms is not None:
        latency_limit(sum(lat_terms), shared_latency_ms, "shared")
    if energy.shared_mj is not None:
        model.add(sum(en_terms) <= math.floor(energy.shared_mj * ENERGY_SCALE))
    # -- solve with a time limit
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = time_limit_s
    solver.parameters.num_workers = workers
    solver.parameters.symmetry_level = 0       # both cut the solve time of these knapsacks
    solver.parameters.linearization_level = 2  # (benchmarks/solver.py)
    solver.parameters.cp_model_presolve = False  # one-hot knapsacks gain nothing from presolve
    if energy.on:   # with an energy knapsack and clocks the root cut rounds cost more than they save
        solver.parameters.add_cg_cuts = solver.parameters.add_mir_cuts = False
        solver.parameters.add_zero_half_cuts = solver.parameters.add_clique_cuts = False
    if excess:   # best effort: the least excess first, then (below) the best objective at that excess
        model.minimize(sum(excess))
        if solver.solve(model) in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            model.add(sum(excess) <= round(solver.objective_value))
    # -- objective
    accuracy = _weighted(objective)
    free = any(len(p.profiles.devices) > 1 for p in problems) or bool(z)
    # with energy in play and devices or clocks to choose, the least energy among the most accurate
    # choices in one solve: accuracy scaled beyond any energy difference, minus the energy
    tie_break = energy.on and free and energy.objective == "accuracy"
    if energy.objective == "energy":
        model.minimize(_weighted(en_objective))
    elif tie_break:
        model.maximize((en_ub + 1) * accuracy - sum(en_terms))
    else:
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
            asked += [f"{who}energy ≤ {b.energy_mj} mJ"] * (b.energy_mj is not None)
        asked += [f"shared memory ≤ {memory_mb} MiB"] * (memory_mb is not None)
        asked += [f"total latency ≤ {shared_latency_ms} ms"] * (shared_latency_ms is not None)
        asked += [f"total energy ≤ {energy.shared_mj} mJ"] * (energy.shared_mj is not None)
        raise Infeasible(f"no configuration meets the budget ({', '.join(asked) or 'per-block limits'}): "
                         f"{_bounds(problems, energy.on, energy.dvfs)}; relax the budget")
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        if status == cp_model.MODEL_INVALID:
            raise InternalError(f"CP-SAT rejected the selection model: {model.validate()}")
        raise UserError(f"the solver found no configuration within its time limit of {time_limit_s} s "
                        f"(status {name}); raise time_limit_s")
    best = solver.objective_value
    flat = [var for x in xs for row in x for var in row] + [var for group in z.values() for var in group.values()]
    values = [solver.boolean_value(var) for var in flat]
    if status == cp_model.OPTIMAL and free and energy.objective == "accuracy" and not tie_break:
        # the device decides latency, not accuracy: among the most accurate choices, the fastest
        remaining = time_limit_s - (time.perf_counter() - t0)
        values = _fastest_of_best(model, solver, accuracy, round(best), sum(lat_terms), flat, values, remaining)
    value = dict(zip(map(id, flat), values))
    if tie_break:   # the objective's accuracy part
        best = sum(c for c, var in objective if value[id(var)])
    picked = [[opts[b][[value[id(var)] for var in row].index(True)] for b, row in enumerate(x)]
              for x, opts in zip(xs, options)]
    choices = tuple(tuple(o[0] for o in rows) for rows in picked)
    devices = tuple(tuple(o[1] for o in rows) for rows in picked)
    levels = {d: next(lv for lv, var in group.items() if value[id(var)]) for d, group in z.items()}
    at = levels if z else None
    return Selection(
        choices=choices, estimates=tuple(p.profiles.estimate(c, d, at) for p, c, d in zip(problems, choices, devices)),
        optimal=status == cp_model.OPTIMAL, status=name, solve_ms=(time.perf_counter() - t0) * 1e3,
        objective=best / (ENERGY_SCALE if energy.objective == "energy" else ACC_SCALE), device_choices=devices,
        within_budget=not soft, levels=levels,
        switch_energy_mj=tuple(_switch_energy(p, c, d) for p, c, d in zip(problems, choices, devices)))


def _undominated(dev) -> list:
    """The levels of a device no other level beats: every latency on the device scales with the
    level's ``ratio`` and every energy with ``active_w x ratio`` (legoc.runtime.energy), so a
    level that is no faster and needs no less energy per unit of work than another is never
    better in any budget or objective, and is left out of the model."""
    def key(lv):
        return dev.ratio(lv.mhz), lv.active_w * dev.ratio(lv.mhz)

    return [lv for lv in dev.levels
            if not any(key(o)[0] <= key(lv)[0] and key(o)[1] <= key(lv)[1] and key(o) != key(lv) for o in dev.levels)]


def _weighted(terms: list):
    """The linear expression sum(c x) of ``(c, x)`` terms (faster to build than ``sum``)."""
    from ortools.sat.python import cp_model

    return cp_model.LinearExpr.weighted_sum([var for _, var in terms], [c for c, _ in terms])


def _switch_energy(p: Problem, choice, devices) -> float | None:
    """mJ to load what the choice needs and ``p`` does not hold (None without energy figures)."""
    prof = p.profiles
    default = prof.default_device
    loaded = {(k[0], k[1], default) if len(k) == 2 else tuple(k) for k in p.loaded}
    current = list(zip(p.current, p.current_devices or [default] * len(p.current))) if p.current is not None else None
    total = 0.0
    for b, (v, d) in enumerate(zip(choice, devices)):
        if (b, v, d) in loaded or (current is not None and current[b] == (v, d)):
            continue
        e = prof.switch_energy_mj(prof.device_costs[b][v][d])
        if e is None:
            return None
        total += e
    return total


def _fastest_of_best(model, solver, accuracy, best: int, latency, variables: list, values: list,
                     time_limit_s: float) -> list:
    """Second pass for device choices: keep the objective at its optimum ``best`` and minimise the
    summed latency (the first pass's values of ``variables`` as hints). Returns their new values,
    or ``values`` unchanged if the time left does not reach an optimum."""
    from ortools.sat.python import cp_model

    if time_limit_s <= 0.01:
        return values
    model.add(accuracy >= best)
    model.clear_hints()
    for var, value in zip(variables, values):
        model.add_hint(var, value)
    model.minimize(latency)
    solver.parameters.max_time_in_seconds = time_limit_s
    if solver.solve(model) not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return values
    return [solver.boolean_value(var) for var in variables]


def _transfer_terms(model, prof: Profiles, opts, x, m: int, m_lat: list, copies: list | None = None) -> float:
    """The copies of one model (see the module docstring): appends ``(ns, t_n)`` latency terms
    for copies that depend on the device choice (and ``(ms, t_n)`` to ``copies``) and returns
    the ms of those that do not."""
    if not prof.transfers:
        return 0.0

    def on_gpu(segment: int | None):
        """g of a segment: a linear expression of x for a block, 0/1 for the frame and host."""
        if segment is None:
            return 0
        block = prof.segment_block[segment]
        if block is None:
            return int(prof.frame_device == "gpu")
        return sum(var for var, opt in zip(x[block], opts[block]) if opt[1] == "gpu")

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
        if copies is not None:
            copies.append((ms, copy))
    return fixed
