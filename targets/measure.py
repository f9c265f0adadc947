"""Measurements on this machine, cached per (module, target) so a re-compile re-measures only
what changed: a module's latency (TVM time evaluator, timed in a worker process by
legoc.runtime.bench).

The cache key is a fingerprint of the torch module (code and weights), the input shapes, the
target, how it was compiled (legoc's compiler sources, prepacking, tuning) and the measurement
settings; entries live in ``<cache>/profile/latency``."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path


CACHE_VERSION = "latency/7"  # bump when the way latency is measured changes
NUMBER, REPEAT, ROUNDS = 10, 3, 3   # ROUNDS: all new modules are timed in interleaved passes
PROCESSES = 2   # workers timing them one after the other, a third when two disagree by > 10%
                # (legoc.runtime.bench.measure_in_processes says why)


def fingerprint(module, inputs, target_json: dict, build: dict) -> str:
    """``build``: how the module was compiled (:func:`legoc.targets.build.build_signature`), so a
    change of schedules, prepacking or tuning re-measures."""
    from legoc.passes.fingerprint import digest_module

    h = hashlib.sha256(CACHE_VERSION.encode())
    h.update(json.dumps(build, sort_keys=True).encode())
    digest_module(h, module)
    h.update(repr([tuple(t.shape) for t in inputs]).encode())
    h.update(json.dumps(target_json, sort_keys=True).encode())
    h.update(repr((NUMBER, REPEAT, ROUNDS, PROCESSES, threads())).encode())
    return h.hexdigest()[:32]


def threads() -> int:
    """The threads of TVM's CPU pool in this process (the modules' parallel loops use them)."""
    import tvm

    return int(tvm.get_global_func("runtime.NumThreads")())


def _path(key: str) -> Path:
    from legoc.paths import cache_dir

    return cache_dir() / "profile" / "latency" / f"{key}.json"


def cached(key: str) -> dict | None:
    from legoc.paths import read_json_cache

    data = read_json_cache(_path(key))
    return data if data is not None and "latency_ms" in data else None


def store(key: str, data: dict) -> None:
    from legoc.paths import write_json_cache

    write_json_cache(_path(key), data)
