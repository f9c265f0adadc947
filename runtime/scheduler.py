"""Several models sharing one device, configured jointly.

    s = Scheduler([m1, m2], weights=[2.0, 1.0])
    s.configure(memory_mb=64, latency_ms=[20, 30])     # per-model latency budgets
    s.configure(memory_mb=64, period_ms=25)             # or one processor-time budget per period
    s.configure(latency_ms=[20, 30], period_energy_mj=80, dvfs=True)   # energy, and the board's clocks

One CP-SAT model over every block of every model (legoc.runtime.solver): a shared memory budget,
and either a latency budget per model or one shared processor-time budget (the sum of the
models' latencies, each model running once per period); the weighted sum of estimated
accuracies is maximised (or, ``objective="energy"``, the summed energy minimised). Energy budgets
are per model (``energy_mj``) or shared (``period_energy_mj``: one inference of every model);
with ``dvfs`` the clocks of the board are chosen once for all models and set before they switch.
Each model then switches to its part of the optimum, loading only its changed modules.
"""
from __future__ import annotations

from typing import Sequence

from legoc.errors import UserError
from legoc.runtime import solver


class Scheduler:
    def __init__(self, models: Sequence, weights: Sequence[float] | None = None):
        if not models:
            raise UserError("Scheduler needs at least one model")
        self.models = list(models)
        self.weights = list(weights) if weights is not None else [1.0] * len(self.models)
        if len(self.weights) != len(self.models):
            raise UserError(f"Scheduler got {len(self.models)} models but {len(self.weights)} weights")
        self.last_selection: solver.Selection | None = None

    def select(self, memory_mb: float | None = None, latency_ms: Sequence[float | None] | float | None = None,
               period_ms: float | None = None, min_accuracy: Sequence[float | None] | None = None, *,
               switch_penalty: float = solver.DEFAULT_SWITCH_PENALTY,
               time_limit_s: float = solver.DEFAULT_TIME_LIMIT_S, best_effort: bool = False,
               energy_mj: Sequence[float | None] | float | None = None, period_energy_mj: float | None = None,
               objective: str = "accuracy", dvfs: bool = False) -> solver.Selection:
        """The joint optimum; ``best_effort``, ``objective``, ``dvfs``: see legoc.runtime.solver.solve."""
        n = len(self.models)
        if latency_ms is not None and period_ms is not None:
            raise UserError("give either per-model latency_ms or one period_ms (shared processor time), not both")
        lat = list(latency_ms) if isinstance(latency_ms, (list, tuple)) else [latency_ms] * n
        acc = list(min_accuracy) if min_accuracy is not None else [None] * n
        energy = list(energy_mj) if isinstance(energy_mj, (list, tuple)) else [energy_mj] * n
        if len(lat) != n or len(acc) != n or len(energy) != n:
            raise UserError(f"latency_ms, min_accuracy and energy_mj need one value per model ({n})")
        problems = [m.problem(solver.Budget(latency_ms=lat[k], min_accuracy=acc[k], energy_mj=energy[k]),
                              name=f"model {k} ({m.path.name})", weight=self.weights[k])
                    for k, m in enumerate(self.models)]
        return solver.solve(problems, memory_mb=memory_mb, shared_latency_ms=period_ms,
                            switch_penalty=switch_penalty, time_limit_s=time_limit_s, best_effort=best_effort,
                            objective=objective, dvfs=dvfs, shared_energy_mj=period_energy_mj)

    def configure(self, memory_mb: float | None = None, latency_ms=None, period_ms: float | None = None,
                  min_accuracy=None, **options) -> solver.Selection:
        sel = self.select(memory_mb, latency_ms, period_ms, min_accuracy, **options)
        if sel.levels:   # one board: its clocks are set once, for every model
            self.models[0].set_clocks(sel.levels)
        shares = [None] * len(self.models)
        if memory_mb is not None:
            # each model's module cache: its configuration plus an equal part of the memory left,
            # so that what the models hold together stays within the shared budget
            left = memory_mb - sum(e.memory_bytes for e in sel.estimates) / solver.MIB
            shares = [e.memory_bytes / solver.MIB + max(left, 0.0) / len(self.models) for e in sel.estimates]
        for m, choice, devices, share in zip(self.models, sel.choices, sel.device_choices, shares):
            m.configure(variants=choice, devices=devices, memory_mb=share)
        self.last_selection = sel
        return sel
