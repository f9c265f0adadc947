"""legoc.runtime.tiled: an artifact compiled with ``--tiles K`` run with its tiling plan: the
tiled steps on K workers over TVM RPC (legoc.runtime.cluster), everything else here with the
normal runtime's modules (legoc.runtime.cache), so ``legoc run ART --cluster ...`` needs no
Python of the user's.

The plan is the manifest's ``tiling`` section (written by the compiler's tile stage,
legoc.passes.backend.tile): its steps in block order, each local (its blocks' own modules here)
or tiled (one tile module per worker, listed with their sha256 like every module of the
artifact, so loading, verification and signing cover them). Frame segments always run here.

What a run measured is kept beside the manifest, never in it: ``tiling-measured.json`` in the
artifact folder (``legoc run --cluster ... --record``), which ``legoc inspect`` shows next to the
estimates. It is not covered by the manifest's checksums or signature, and says so.

Torch-free: numpy and the TVM runtime only.
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from legoc.errors import UserError

__all__ = ["MEASURED", "TiledModel", "Workers", "read_measured", "record_measured", "tiling_section"]

MEASURED = "tiling-measured.json"


@dataclass(frozen=True)
class Workers:
    """Where the workers are: direct ``HOST:PORT`` TVM RPC servers (in the plan's worker order),
    or ``count`` boards of ``device_key`` at a TVM RPC tracker."""

    addresses: tuple[str, ...] = ()
    tracker: str | None = None
    device_key: str | None = None
    count: int = 0

    @classmethod
    def of(cls, cluster: str | None, tracker: str | None, device_key: str | None, count: int | None) -> "Workers | None":
        """The workers the command-line options name (None: none named). ``count``: how many
        a tracker must give (the plan's, or ``--tiles``)."""
        from legoc.runtime.cluster import parse_workers

        if cluster and tracker:
            raise UserError("give the workers either as --cluster HOST:PORT,... or as --tracker HOST:PORT "
                            "--device-key KEY, not both")
        if cluster:
            addresses = tuple(f"{h}:{p}" for h, p in parse_workers(cluster))
            return cls(addresses=addresses, count=len(addresses))
        if tracker:
            parse_workers(tracker)   # HOST:PORT, checked the same way
            if not device_key:
                raise UserError("--tracker needs --device-key KEY: the key the workers' RPC servers registered with")
            return cls(tracker=tracker, device_key=device_key, count=int(count or 0))
        return None

    def check(self, timeout: float = 5.0) -> None:
        """Fail fast (before a long compile): every direct worker accepts a connection."""
        import socket

        from legoc.runtime.cluster import parse_workers

        for host, port in parse_workers(list(self.addresses or [self.tracker])):
            try:
                socket.create_connection((host, port), timeout=timeout).close()
            except OSError as exc:
                why = "connection refused" if isinstance(exc, ConnectionRefusedError) else str(exc) or type(exc).__name__
                what, server = (("the tracker", "rpc_tracker") if self.tracker else ("cluster worker", "rpc_server"))
                raise UserError(f"cannot reach {what} {host}:{port}: {why}; start it (`python -m tvm.exec.{server} "
                                f"--host {host} --port {port}`) or fix the address") from exc

    def describe(self) -> str:
        if self.tracker is None:
            return ", ".join(self.addresses)
        return f"{self.count} x '{self.device_key}' via tracker {self.tracker}"

    def _session(self) -> dict:
        """How legoc.runtime.cluster opens the workers' sessions: through the tracker, or not."""
        return {} if self.tracker is None else {"tracker": self.tracker, "device_key": self.device_key}

    def _target(self):
        return list(self.addresses) if self.tracker is None else self.count

    def connect(self, steps, timeout: float):
        """A :class:`legoc.runtime.cluster.Cluster` holding ``steps`` (per tiled step one tile
        module or None per worker)."""
        from legoc.runtime.cluster import Cluster

        return Cluster(self._target(), steps=steps, timeout=timeout, **self._session())

    def measure(self, modules, inputs: Sequence[np.ndarray], timeout: float):
        """(links, seconds[module][worker]): each worker's link and each module (a TileModule,
        run whole on its input) timed on each worker, through TVM RPC sessions."""
        from legoc.runtime.cluster_plan import measure_links, measure_workers

        links = measure_links(self._target(), timeout=timeout, **self._session())
        seconds = measure_workers(self._target(), modules, inputs, timeout=timeout, **self._session())
        return links, seconds


def tiling_section(manifest: dict, path: str | os.PathLike) -> dict:
    """The manifest's tiling plan, or a UserError saying how to make one."""
    tiling = manifest.get("tiling")
    if not tiling:
        raise UserError(f"{path} was compiled without tiles: it has no plan for a cluster; compile it with "
                        "`legoc compile model.py --tiles K` (or run it without --cluster/--tracker)")
    return tiling


@dataclass
class _Item:
    """One thing a call does in order: a frame segment, or a step of the plan."""

    label: str          # "frame seg" / "block0-block1"
    where: str          # "local" / "worker 0 rows 0-8, worker 1 rows 8-16"
    estimate_ms: float | None
    run: Callable[[dict], None]
    tiled: int | None = None    # the cluster step, for a tiled step
    blocks: tuple[str, ...] = ()
    seconds: list[float] = field(default_factory=list)          # per call
    worker_seconds: list[list[float]] = field(default_factory=list)  # per call, per active worker
    fallbacks: int = 0


class TiledModel:
    """The artifact at ``path`` run with its tiling plan over ``workers`` (a :class:`Workers`).
    ``variants``: one index per block (default: the plan's: full size, or the variants chosen
    with ``--tile-latency-ms``); a tiled block must run the variant the plan tiled. ``fallback``: a tiled step whose worker is lost runs here for
    that call instead of failing."""

    def __init__(self, path: str | os.PathLike, workers: Workers, *, timeout: float = 30.0, fallback: bool = False,
                 public_key=None, variants: Sequence[int] | None = None):
        from legoc.runtime.artifact import read_manifest
        from legoc.runtime.cache import ModuleCache
        from legoc.runtime.devices import Devices
        from legoc.runtime.manifest import ManifestView

        self.path = Path(path)
        self.manifest = read_manifest(self.path, public_key)
        self.tiling = tiling_section(self.manifest, self.path)
        self.view = view = ManifestView(self.manifest)
        k = int(self.tiling["workers"])
        if workers.tracker is not None and not workers.count:
            workers = Workers(tracker=workers.tracker, device_key=workers.device_key, count=k)
        if workers.count != k:
            raise UserError(f"{self.path}'s plan tiles over {k} workers, in order; {workers.count} given "
                            f"({workers.describe()}): give exactly {k}")
        self.workers, self.fallback = workers, fallback
        names = [b.name for b in view.blocks]
        # the plan's variant per block (compiled with --tile-latency-ms: chosen with the placement)
        planned = list(self.tiling.get("variants") or [int(self.tiling.get("variant") or 0)] * len(names))
        self.variants = view.check_variants(planned if variants is None else variants)
        for step in self.tiling["steps"]:
            for name in step["blocks"] if step["tiles"] else ():
                v, want = self.variants[names.index(name)], planned[names.index(name)]
                if v != want:
                    raise UserError(f"{name} is tiled by the plan with variant {want}, not {v}: give variant "
                                    f"{want} for it, or run without --cluster")
        self._devices = Devices(self.path, view)
        self._dev = self._devices.get(view.profiles.default_device)   # this machine can run the artifact
        self._modules = ModuleCache(self.path, view, self._devices)
        self.items, tile_steps = self._schedule(names)
        self.cluster = workers.connect(tile_steps, timeout) if tile_steps else None

    # -- the schedule ------------------------------------------------------------------------
    def _schedule(self, names: list[str]):
        """The items of a call in the artifact's segment order, and per tiled step its tile
        modules (checked against their sha256)."""
        from legoc.runtime.cluster import TileModule
        from legoc.runtime.modules import WeightFiles
        from legoc.runtime.artifact import verified_path

        weights = WeightFiles(self.path)
        first_of = {s["blocks"][0]: s for s in self.tiling["steps"]}
        inside = {b for s in self.tiling["steps"] for b in s["blocks"]}
        missing = [n for n in names if n not in inside]
        if missing:
            raise UserError(f"{self.path}: the tiling plan leaves out {', '.join(missing)}; compile it again")
        items, tile_steps = [], []
        for seg in self.view.segments:
            if seg.kind != "block":
                est = (seg.variants[0].entry.get("profile") or {}).get("latency_ms") or {}
                items.append(_Item(f"frame {seg.name}", "local", est.get("value"), self._local([seg])))
                continue
            step = first_of.get(seg.name)
            if step is None:
                continue   # inside a step that began before
            segs = [self.view.segment(n) for n in step["blocks"]]
            label = step["blocks"][0] if len(segs) == 1 else f"{step['blocks'][0]}-{step['blocks'][-1]}"
            if not step["tiles"]:
                items.append(_Item(label, "local", step.get("estimate_ms"), self._local(segs),
                                   blocks=tuple(step["blocks"])))
                continue
            per_worker: list = [None] * int(self.tiling["workers"])
            for t in step["tiles"]:
                what = f"tile of {label} for worker {t['worker']}"
                values = weights.get(t["weights"], what + " weights")
                per_worker[t["worker"]] = TileModule(
                    path=verified_path(self.path, t["module"], what),
                    weights=tuple(np.ascontiguousarray(values[n]) for n in t["weights"]["names"]),
                    rows_in=tuple(t["rows_in"]), rows_out=tuple(t["rows_out"]))
            where = ", ".join(f"worker {t['worker']} rows {t['rows_out'][0]}-{t['rows_out'][1]}" for t in step["tiles"])
            items.append(_Item(label, where, step.get("estimate_ms"),
                               self._tiled(len(tile_steps), segs, step["input"], step["output"]),
                               tiled=len(tile_steps), blocks=tuple(step["blocks"])))
            tile_steps.append(per_worker)
        return items, tile_steps

    def _exe(self, seg):
        index = self.variants[[b.name for b in self.view.blocks].index(seg.name)] if seg.kind == "block" else 0
        return self._modules.get(seg.name, index)

    def _local(self, segs) -> Callable[[dict], None]:
        """Run ``segs`` here, in order, on the call's tensors (by name)."""
        exes = [(s, self._exe(s)) for s in segs]   # loaded (and checked) once, now

        def run(env: dict) -> None:
            for seg, exe in exes:
                env.update(zip(seg.outputs, exe(*[env[n] for n in seg.inputs])))
        return run

    def _tiled(self, k: int, segs, name_in: str, name_out: str) -> Callable[[dict], None]:
        """Run cluster step ``k`` on tensor ``name_in``; its stitched output is ``name_out``."""
        here = self._local(segs) if self.fallback else None
        tensor = self._devices.tensor

        def fallback(x: np.ndarray) -> np.ndarray:
            env = {name_in: tensor(np.ascontiguousarray(x), self._dev)}
            here(env)
            return env[name_out].numpy()

        def run(env: dict) -> None:
            out = self.cluster(env[name_in].numpy(), step=k, fallback=fallback if self.fallback else None)
            env[name_out] = tensor(np.ascontiguousarray(out), self._dev)
        return run

    # -- calls -------------------------------------------------------------------------------
    def __call__(self, *inputs: np.ndarray):
        from legoc.runtime.artifact import build_output

        from legoc.runtime.executor import model_inputs, to_numpy

        view = self.view
        env = {name: self._devices.tensor(x, self._dev)
               for name, x in zip(view.input_names, model_inputs(view, inputs))}
        for item in self.items:
            t0 = time.perf_counter()
            item.run(env)
            item.seconds.append(time.perf_counter() - t0)
            if item.tiled is not None:
                stats = self.cluster.stats
                item.fallbacks += int(stats.fallback)
                item.worker_seconds.append(list(stats.seconds))
        return build_output(self.manifest["output"], env, leaf=to_numpy)

    def reset_times(self) -> None:
        """Forget the times of the calls so far (e.g. after a warm-up)."""
        for item in self.items:
            item.seconds, item.worker_seconds, item.fallbacks = [], [], 0

    def report(self) -> list[dict]:
        """Per item of the calls so far: median measured ms, estimate, and per tile the median
        round trip of its worker (send, run, receive)."""
        rows = []
        for item in self.items:
            row = {"step": item.label, "blocks": list(item.blocks), "where": item.where,
                   "estimate_ms": item.estimate_ms,
                   "measured_ms": statistics.median(item.seconds) * 1e3 if item.seconds else None,
                   "fallbacks": item.fallbacks}
            if item.tiled is not None:
                full = [w for w in item.worker_seconds if w]
                row["tiles_ms"] = [statistics.median(c) * 1e3 for c in zip(*full)] if full else []
            rows.append(row)
        return rows

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.close()

    def __enter__(self) -> "TiledModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def record_measured(path: str | os.PathLike, workers: Workers, rows: list[dict], calls: int, total_ms: float) -> Path:
    """Write what a run measured to ``ART/tiling-measured.json`` (atomically), beside the
    manifest: the manifest, its digest and signature are not touched."""
    from legoc.runtime.artifact import MANIFEST, sha256_file

    root = Path(path)
    data = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "workers": workers.describe(),
            "manifest_sha256": sha256_file(root / MANIFEST),
            "calls": calls, "total_ms": total_ms, "steps": rows,
            "note": "measured by `legoc run --cluster --record`; not covered by the manifest's checksums or signature"}
    fd, tmp = tempfile.mkstemp(prefix=f".{MEASURED}.", suffix=".tmp", dir=root)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, root / MEASURED)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return root / MEASURED


def read_measured(path: str | os.PathLike) -> dict | None:
    """What the last ``legoc run --cluster --record`` measured on this very manifest, or None
    (none, unreadable, or recorded for another manifest)."""
    from legoc.runtime.artifact import MANIFEST, sha256_file

    root = Path(path)
    try:
        data = json.loads((root / MEASURED).read_text())
        same = data.get("manifest_sha256") == sha256_file(root / MANIFEST)
    except (OSError, ValueError, AttributeError):
        return None
    return data if same else None
