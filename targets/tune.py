"""Optional MetaSchedule tuning with a persistent database (``legoc compile --tune-trials N``).

The database is a MetaSchedule JSON database in ``cache_dir()/tune/<target-key>/``, keyed by
workload: a fused PrimFunc, compared structurally (its shapes included). Before tuning, every
workload of the module is looked up there; only workloads without a record are tuned, ``N``
trials each. So the variants of a block that share shapes, the same block in a later compile,
or a re-compile after a small model change tune only what is new.

Compiling then applies the best record of every workload in the database and schedules the rest
(workloads MetaSchedule could not tune) with legoc's default CPU rules.

Measurements run on this machine (MetaSchedule's local builder and runner): only targets that
run here can be tuned. ``tune_module(..., runner=...)`` takes any MetaSchedule runner, the hook
for measuring on a board over TVM RPC (``ms.runner.RPCRunner``).
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import tvm
from tvm import relax
from tvm.relax.backend.cpu_generic import pipeline as cpu
from tvm.s_tir import meta_schedule as ms

from legoc.errors import UserError
from legoc.paths import cache_dir
from legoc.targets.schedules import cpu_pipeline
from legoc.targets.schedules.pipeline import relax_rewrites
from legoc.targets.table import TargetSpec

__all__ = ["TuneReport", "database_dir", "tune_module", "tuned_pipeline"]

BUILD_TIMEOUT_S = 300


@dataclass
class TuneReport:
    workloads: int  # distinct workloads in the module
    reused: int  # of them, found in the database (not tuned again)
    tuned: int  # newly tuned now
    trials: int  # trials per newly tuned workload
    database: Path


def database_dir(target: TargetSpec) -> Path:
    """The tuning database folder of ``target``: its name plus a hash of its TVM target (so a
    different mcpu or triple never reuses another CPU's records)."""
    key = json.dumps({"target": target.target, "host": target.host}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", target.name)
    return cache_dir() / "tune" / f"{safe}-{digest}"


def _open_database(folder: Path) -> ms.database.JSONDatabase:
    folder.mkdir(parents=True, exist_ok=True)
    return ms.database.JSONDatabase(work_dir=str(folder), module_equality="structural")


def _fused(mod: tvm.ir.IRModule, tvm_target) -> tvm.ir.IRModule:
    """Legalized and fused as the compile pipeline does it before applying the database (conv
    output channels padded first, :func:`legoc.targets.schedules.scheduling_passes`), so the
    workloads tuned are the ones the compile looks up."""
    with tvm_target:
        return tvm.transform.Sequential(relax_rewrites(tvm_target)
                                        + cpu.library_dispatch_passes(tvm_target)
                                        + cpu.legalize_passes(tvm_target))(mod)


def _import_tensor_intrinsics() -> None:
    """Import ``tvm.s_tir.tensor_intrin`` (MetaSchedule's TuneContext does, on first use) from a
    thread of its own.

    The import parses every TVMScript tensor intrinsic TVM ships, and each parse calls
    ``inspect.stack()``, which for every frame of the calling thread may scan all of
    ``sys.modules``: the cost grows with the depth of the caller's stack and the number of
    modules loaded. From inside a compile (torch loaded) it took 103 s on this machine; from a
    fresh thread's short stack 34 s, 35-65 s in a pytest process. It is the bulk of a small
    tuning run; an upstream fix (registering intrinsics lazily) would remove it."""
    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return
    failure = []

    def run():
        try:
            importlib.import_module("tvm.s_tir.tensor_intrin")
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            failure.append(exc)

    worker = threading.Thread(target=run, name="legoc-import-tensor-intrin")
    worker.start()
    worker.join()
    if failure:
        raise failure[0]


def build_candidate(mod: tvm.ir.IRModule, target, _params) -> tvm.runtime.Module:
    """MetaSchedule's ``default_build`` without its ``import tvm.s_tir.tensor_intrin``.

    That import parses every TVMScript tensor intrinsic TVM ships (CUDA's included), and each
    parse walks the call stack with ``inspect.stack()``: about 25 s of CPU on this machine. The
    local builder starts new worker processes for every batch of candidates, so each batch paid
    it again. The candidates it gets are already scheduled (any tensorization was applied by
    the search, in this process), so building them needs no intrinsic registry."""
    from tvm.driver import build as tvm_build  # noqa: PLC0415
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock  # noqa: PLC0415

    from legoc.targets.schedules import cpu_pass_context  # noqa: PLC0415

    with cpu_pass_context():   # int64 indices, as the compile builds the winner (targets/build.py)
        return tvm_build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


def _search_strategy(trials: int) -> ms.search_strategy.EvolutionarySearch:
    """MetaSchedule's evolutionary search with its population scaled to the trial budget.

    Before every batch of measurements the search samples a population of schedules and evolves
    it for ``genetic_num_iters`` rounds, scoring every member with the cost model; the work
    grows with the population. Its defaults (512 schedules, at least 50 of them freshly sampled)
    suit budgets of hundreds of trials, not a handful (2 trials pick 2 schedules out of 512).
    Here the population is 32 per trial, from 64 up to the default 512."""
    population = min(512, max(64, 32 * trials))
    return ms.search_strategy.EvolutionarySearch(population_size=population,
                                                 init_min_unmeasured=min(50, population // 2))


def _tuning_target(target: TargetSpec):
    """The TVM target to tune for: MetaSchedule's CPU rules need ``num-cores`` (this machine's
    physical cores, the parallelism of the measurements)."""
    import psutil  # noqa: PLC0415 - a MetaSchedule dependency

    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    return tvm.target.Target({**target.target, "num-cores": int(cores)})


def tune_module(mod: tvm.ir.IRModule, target: TargetSpec, trials: int, *,
                runner: ms.runner.Runner | None = None) -> TuneReport:
    """Tune the workloads of the Relax module ``mod`` that the database of ``target`` lacks,
    ``trials`` trials each; records go to :func:`database_dir`."""
    if trials <= 0:
        raise UserError(f"--tune-trials must be 1 or more to tune, got {trials}")
    if target.device != "cpu":
        raise UserError(f"tuning supports cpu targets only; {target.name} is {target.device}")
    if runner is None and not target.runs_here:
        raise UserError(
            f"target {target.name} does not run on this machine, so it cannot be tuned here; "
            "tuning on the board needs a TVM RPC runner (issue #7)"
        )
    tvm_target = _tuning_target(target)
    folder = database_dir(target)
    database = _open_database(folder)
    tasks = ms.relax_integration.extract_tasks(_fused(mod, tvm_target), tvm_target)
    new = [t for t in tasks
           if database.query_tuning_record(t.dispatched[0], tvm_target, t.task_name) is None]
    if new:
        _import_tensor_intrinsics()
        contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
            new, work_dir=str(folder / "logs"), strategy=_search_strategy(trials))
        if contexts:
            per_batch = min(64, trials)
            ms.tune.tune_tasks(
                tasks=contexts,
                task_weights=weights,
                work_dir=str(folder / "logs"),
                max_trials_global=trials * len(contexts),
                max_trials_per_task=trials,
                num_trials_per_iter=per_batch,
                database=database,
                # MetaSchedule's default of 30 s per build is too short on a small, busy machine;
                # no more worker processes than candidates in a batch (each imports tvm)
                builder=ms.builder.LocalBuilder(timeout_sec=BUILD_TIMEOUT_S, f_build=build_candidate,
                                                max_workers=max(1, min(os.cpu_count() or 1, per_batch))),
                runner=runner if runner is not None else "local",
                # the cost model ranks a task's candidates from its second batch on; with one
                # batch per task (trials <= per_batch) it would be trained and never used, and
                # XGBoost's import (scikit-learn's with it) alone took 10 s here
                cost_model="xgb" if trials > per_batch else "random",
            )
    return TuneReport(workloads=len(tasks), reused=len(tasks) - len(new), tuned=len(new),
                      trials=trials, database=folder)


def tuned_pipeline(mod: tvm.ir.IRModule, target: TargetSpec, trials: int,
                   *, runner: ms.runner.Runner | None = None) -> tvm.transform.Pass:
    """Tune what is new in ``mod`` (:func:`tune_module`), then return the Relax pipeline that
    compiles it with the database's best schedules and legoc's rules for the rest."""
    report = tune_module(mod, target, trials, runner=runner)
    if os.environ.get("LEGOC_TUNE_VERBOSE"):
        print(f"tuning: {report.workloads} workloads, {report.reused} from the database, "
              f"{report.tuned} tuned ({report.trials} trials each) in {report.database}")
    return apply_database_pipeline(target)


def apply_database_pipeline(target: TargetSpec) -> tvm.transform.Pass:
    """TVM's CPU pipeline with the tuning database of ``target`` applied after fusion, then
    legoc's CPU rules for workloads the database has no record of."""
    folder = database_dir(target)
    folder.mkdir(parents=True, exist_ok=True)
    return cpu_pipeline(target.tvm_target(), before_schedule=(
        relax.transform.MetaScheduleApplyDatabase(work_dir=str(folder)),))
