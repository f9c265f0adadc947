"""A model's part in a selection: its profiles, budget and current state as a solver Problem,
and the optimal configuration for a budget (legoc.runtime.solver)."""
from __future__ import annotations

from typing import Callable, Sequence

from legoc.errors import UserError
from legoc.runtime import solver
from legoc.runtime.estimate import Profiles


def problem(profiles: Profiles, budget: solver.Budget | None, *, name: str, weight: float = 1.0,
            block_names: Sequence[str], held: Sequence[tuple[str, int, str]] = (),
            choice: Sequence[int] = (), devices: Sequence[str] = (), slowdown: float | None = None) -> solver.Problem:
    """One model as a solver item: ``held`` the (segment, variant, device) of its loaded modules,
    ``choice``/``devices`` its configuration in use (empty: none), ``slowdown`` a factor on its
    latencies (None: as profiled)."""
    index = {n: b for b, n in enumerate(block_names)}
    loaded = {(index[n], i, d) for n, i, d in held if n in index}
    if slowdown is not None:
        profiles = profiles.slowed(slowdown)
    return solver.Problem(profiles, budget or solver.Budget(), weight, list(choice) if choice else None,
                          loaded, name, list(devices) if choice else None)


def select(problem_for: Callable[[solver.Budget], solver.Problem], latency_ms: float | None = None,
           memory_mb: float | None = None, min_accuracy: float | None = None, *,
           block_latency_ms: dict | None = None, allowed: dict | None = None, switch_penalty: float | None = None,
           time_limit_s: float | None = None, best_effort: bool = False, energy_mj: float | None = None,
           objective: str = "accuracy", dvfs: bool = False) -> solver.Selection:
    """The optimal configuration of the model ``problem_for`` describes for a budget (see
    :meth:`legoc.runtime.model.Model.select`)."""
    budget = solver.Budget(latency_ms, memory_mb, min_accuracy, dict(block_latency_ms or {}), dict(allowed or {}),
                           energy_mj)
    return solver.solve([problem_for(budget)],
                        switch_penalty=solver.DEFAULT_SWITCH_PENALTY if switch_penalty is None else switch_penalty,
                        time_limit_s=time_limit_s or solver.DEFAULT_TIME_LIMIT_S, best_effort=best_effort,
                        objective=objective, dvfs=dvfs)


def by_budget(variants, devices, latency_ms, memory_mb, min_accuracy, options: dict) -> bool:
    """Whether a configure() call asks the solver for its configuration (a budget or solver
    options, and no variants); devices then come from the solver too."""
    if variants is not None or (latency_ms is None and memory_mb is None and min_accuracy is None and not options):
        return False
    if devices is not None:
        raise UserError("configure(devices=…) goes with variants=…; with a budget the solver chooses the devices")
    return True
