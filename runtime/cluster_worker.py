"""legoc.runtime.cluster_worker: one worker of a :class:`legoc.runtime.cluster.Cluster`: its RPC
session, its tiles loaded and checked there, and the thread of this process that talks to it.

Torch-free: numpy and the TVM runtime only.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from legoc.errors import UserError
from legoc.runtime import rpc_session

__all__ = ["TileModule"]


@dataclass(frozen=True)
class TileModule:
    """What one worker runs: a compiled tile (.so for the worker's target) and its weights
    (trailing inputs, in order), reading input rows ``rows_in`` and writing output rows
    ``rows_out`` of the block."""

    path: Path
    weights: tuple[np.ndarray, ...]
    rows_in: tuple[int, int]
    rows_out: tuple[int, int]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(Path(self.path).read_bytes()).hexdigest()


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _reason(exc: BaseException) -> str:
    return rpc_session.reason(exc, limit=200)


class _Lane:
    """One long-lived daemon thread that runs a worker's calls in order, on core ``core`` when
    given (Linux: the thread's own affinity), started on first use and ended by :meth:`stop`. A
    call that never ends leaves the lane stuck: the caller abandons it for a new lane (a daemon
    thread never blocks exit)."""

    def __init__(self, core: int | None):
        self.core = core
        self.jobs: queue.SimpleQueue | None = None

    def _loop(self, jobs: queue.SimpleQueue) -> None:
        if self.core is not None and hasattr(os, "sched_setaffinity"):
            with contextlib.suppress(OSError):
                os.sched_setaffinity(0, {self.core})  # 0: this thread only
        while (job := jobs.get()) is not None:
            fn, box, done = job
            try:
                box.append((True, fn()))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                box.append((False, exc))
            done.set()

    def submit(self, fn: Callable) -> tuple[threading.Event, list]:
        """``fn()`` queued: (event set when it ends, box that then holds (True, result) or
        (False, exception))."""
        if self.jobs is None:
            self.jobs = queue.SimpleQueue()
            threading.Thread(target=self._loop, args=(self.jobs,), daemon=True).start()
        box: list = []
        done = threading.Event()
        self.jobs.put((fn, box, done))
        return done, box

    def stop(self) -> None:
        if self.jobs is not None:
            self.jobs.put(None)
            self.jobs = None


class _Worker:
    """One RPC session to one server, with its tiles (one per step, or None where it sits a step
    out) loaded and their weights on the device."""

    def __init__(self, address: str, open_session: Callable, tiles: Sequence[TileModule | None], device: str,
                 core: int | None = None):
        self.address, self.open_session, self.tiles, self.device = address, open_session, list(tiles), device
        self.lane = _Lane(core)
        self.remote = self.dev = None
        self.vms: list = []  # per step (its module's VM, its main function), or None
        self.params: list[list] = []
        self.inputs: dict[int, object] = {}  # per step, its input band's tensor on the device, reused
        self.lost: str | None = None
        self.seconds = 0.0  # the last call's round trip: send, run, receive
        self.step = 0  # the step of the last call (error messages name its rows)

    @property
    def tile(self) -> TileModule | None:
        return self.tiles[self.step] if self.tiles else None

    @property
    def rows(self) -> str:
        t = self.tile
        return f"rows {t.rows_out[0]}-{t.rows_out[1]}" if t is not None else "no rows"

    def connect(self, connect_timeout: float) -> None:
        import tvm  # noqa: PLC0415 - the TVM runtime, loaded on first use
        import tvm.runtime.vm  # noqa: F401, PLC0415

        self.remote = self.open_session(connect_timeout)  # a UserError when it cannot
        current = None
        try:
            self.dev = self.remote.cuda(0) if self.device == "cuda" else self.remote.cpu(0)
            loaded: dict[str, tuple] = {}  # sha256 -> (VM, main): a module used by several steps loads once
            self.vms, self.params = [], []
            for tile in self.tiles:
                current = tile
                if tile is None:
                    self.vms.append(None)
                    self.params.append([])
                    continue
                data = Path(tile.path).read_bytes()
                want = hashlib.sha256(data).hexdigest()
                if want not in loaded:
                    name = f"legoc-tile-{want[:16]}.so"
                    self.remote.upload(bytearray(data), target=name)
                    back = hashlib.sha256(bytes(self.remote.download(name))).hexdigest()
                    if back != want:
                        raise UserError(f"cluster worker {self.address} holds a different copy of {Path(tile.path).name} "
                                        f"than was sent (sha256 {back[:12]} != {want[:12]}); check its disk and network")
                    vm = tvm.runtime.vm.VirtualMachine(self.remote.load_module(name), self.dev)
                    loaded[want] = (vm, vm["main"])  # looked up once: a lookup is a round trip
                self.vms.append(loaded[want])
                params = [tvm.runtime.tensor(np.ascontiguousarray(w), self.dev) for w in tile.weights]
                for i, (p, w) in enumerate(zip(params, tile.weights)):
                    if _digest(p.numpy()) != _digest(w):
                        raise UserError(f"cluster worker {self.address} holds different values for weight {i} than "
                                        "were sent; check its memory and network")
                self.params.append(params)
        except UserError:
            self.close()
            raise
        except Exception as exc:  # noqa: BLE001 - TVM's RPC errors come in many types
            self.close()
            what = f"its tile {Path(current.path).name}" if current is not None else "a session"
            raise UserError(f"cluster worker {self.address} cannot load {what}: {_reason(exc)}") from exc
        self.lost = None

    def run(self, band: np.ndarray, step: int = 0) -> np.ndarray:
        import tvm  # noqa: PLC0415

        self.step = step
        t0 = time.perf_counter()
        held = self.inputs.get(step)
        if held is None or tuple(held.shape) != band.shape or held.dtype != str(band.dtype):
            held = self.inputs[step] = tvm.runtime.tensor(band, self.dev)
        else:  # the same shape as last call: no allocation round trip
            held.copyfrom(band)
        out = self.vms[step][1](held, *self.params[step])
        result = out.numpy() if hasattr(out, "numpy") else out[0].numpy()
        self.seconds = time.perf_counter() - t0
        return result

    def compute_seconds(self, band: np.ndarray, step: int, number: int, repeat: int,
                        cold: bool = False) -> list[float]:
        """Seconds of the step's tile alone on the device (TVM's time evaluator runs it there:
        no transfer in the time), one per repeat. ``cold``: the CPU caches are flushed of the
        weights before each repeat (TVM's ``cache_flush_cpu_non_first_arg``), as in a call,
        where copying the band in through TVM RPC has just evicted them; best with number=1."""
        import tvm  # noqa: PLC0415

        self.step = step
        args = [tvm.runtime.tensor(band, self.dev), *self.params[step]]
        timer = self.vms[step][0].time_evaluator("main", self.dev, number=number, repeat=repeat,
                                                 f_preproc="cache_flush_cpu_non_first_arg" if cold else "")
        return [float(r) for r in timer(*args).results]

    def echo_seconds(self, nbytes: int, repeat: int) -> list[float]:
        """Round trips of ``nbytes`` bytes to the device and back (one array up, the same back)."""
        import tvm  # noqa: PLC0415

        data = np.zeros(max(1, nbytes // 4), dtype=np.float32)
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            tvm.runtime.tensor(data, self.dev).numpy()
            times.append(time.perf_counter() - t0)
        return times

    def close(self) -> None:
        self.vms, self.dev, self.remote = [], None, None
        self.params, self.inputs = [], {}
        self.lane.stop()


