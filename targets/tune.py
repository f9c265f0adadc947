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
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import tvm
from tvm import relax
from tvm.relax.backend.cpu_generic import pipeline as cpu
from tvm.s_tir import meta_schedule as ms

from legoc.errors import UserError
from legoc.paths import cache_dir
from legoc.targets.schedules import cpu_pipeline
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
    """Legalized and fused (the PrimFuncs MetaSchedule sees and the compile later applies)."""
    with tvm_target:
        return tvm.transform.Sequential(cpu.library_dispatch_passes(tvm_target)
                                        + cpu.legalize_passes(tvm_target))(mod)


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
        contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
            new, work_dir=str(folder / "logs"))
        if contexts:
            ms.tune.tune_tasks(
                tasks=contexts,
                task_weights=weights,
                work_dir=str(folder / "logs"),
                max_trials_global=trials * len(contexts),
                max_trials_per_task=trials,
                num_trials_per_iter=min(64, trials),
                database=database,
                # MetaSchedule's default of 30 s per build is too short on a small, busy machine
                builder=ms.builder.LocalBuilder(timeout_sec=BUILD_TIMEOUT_S),
                runner=runner if runner is not None else "local",
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
