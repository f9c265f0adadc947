"""legoc.runtime.cluster: one tiled block run across several devices over TVM RPC.

Each worker is a TVM RPC server, reached directly by ``HOST:PORT``::

    python -m tvm.exec.rpc_server --host 0.0.0.0 --port 9090      # on each board
    Cluster("board1:9090,board2:9090", tiles)

or through a TVM RPC tracker, as ``n`` free devices registered under one key::

    python -m tvm.exec.rpc_server --tracker TRACKER:9190 --key rpi4  # on each board
    Cluster(2, tiles, tracker="TRACKER:9190", device_key="rpi4")

(sessions are opened by :mod:`legoc.runtime.rpc_session`, as the device farm's are).

A :class:`Cluster` gets one :class:`TileModule` per worker (the compiled tile for that worker's
target, its weights, its input and output rows; ``legoc.passes.tiling.compile_tiles`` makes
them). On connect it uploads every module and its weights once, and checks them: the module is
downloaded back and its sha256 compared, the weights are read back from the device and their
sha256 compared. Per call it sends each worker its rows of the input (halo included), runs all
workers at once (one thread and one RPC session per worker; TVM releases the GIL while a call
waits), gathers the output bands and stitches them along H.

A worker that fails or does not answer within ``timeout`` ends the call with one
:class:`~legoc.errors.UserError` naming it (or, with ``fallback=``, that call's output is
computed by the fallback instead); a partial output is never returned. The worker is then out
of the cluster until :meth:`Cluster.reconnect`.

:class:`LocalWorkers`, :class:`LocalTracker` and :class:`ShapedLoopback` (from
:mod:`legoc.runtime.cluster_local`) start such servers and a tracker on this machine's loopback and
make a slow link, for trying a plan here, and for tests and benchmarks.
:class:`Probe` opens sessions for measuring (``legoc.runtime.cluster_plan``).

Torch-free: numpy and the TVM runtime only.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from legoc.errors import UserError
from legoc.runtime import rpc_session
from legoc.runtime.cluster_local import LocalTracker, LocalWorkers, ShapedLoopback
from legoc.runtime.cluster_worker import TileModule, _Lane, _reason, _Worker

__all__ = ["Cluster", "LocalTracker", "LocalWorkers", "Probe", "ShapedLoopback", "TileModule", "parse_workers"]


def parse_workers(text: str | Sequence[str]) -> list[tuple[str, int]]:
    """``"HOST:PORT,HOST:PORT"`` (or a list of ``HOST:PORT``) -> [(host, port), ...]."""
    items = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    out = [rpc_session.parse_address(item, "a cluster worker is HOST:PORT of a TVM RPC server (e.g. 127.0.0.1:9090)")
           for item in items]
    if not out:
        raise UserError("a cluster needs at least one worker HOST:PORT")
    return out


def _openers(workers, tracker: str | None, device_key: str | None) -> list[tuple[str, Callable]]:
    """Per worker, (its name in messages, ``open(timeout)`` -> a new RPC session): to the plain
    servers ``workers`` (``HOST:PORT,...``), or, with ``tracker``, ``workers`` (a count) sessions
    requested from that tracker for devices registered as ``device_key``."""
    if tracker is None:
        if device_key is not None:
            raise UserError("a cluster device key needs the tracker it is registered with (tracker=HOST:PORT)")
        return [(f"{h}:{p}", lambda t, h=h, p=p: rpc_session.connect_server(h, p, t, f"cluster worker {h}:{p}"))
                for h, p in parse_workers(workers)]
    host, port = rpc_session.parse_address(tracker, "a cluster tracker is HOST:PORT of a TVM RPC tracker "
                                                    "(e.g. 127.0.0.1:9190)")
    if not device_key:
        raise UserError(f"a cluster through the tracker {tracker} needs the device key its workers registered with")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise UserError(f"a cluster through a tracker takes the number of workers to request, got {workers!r}")
    return [(f"'{device_key}' device {i + 1} of tracker {host}:{port}",
             lambda t: rpc_session.request(host, port, device_key, t))
            for i in range(workers)]


@dataclass
class CallStats:
    """The last call: per worker its round-trip seconds, bytes sent and received."""

    seconds: list[float] = field(default_factory=list)
    sent: list[int] = field(default_factory=list)
    received: list[int] = field(default_factory=list)
    total_seconds: float = 0.0
    fallback: bool = False


def _check_step(tiles: Sequence[TileModule | None], step: int) -> None:
    used = [t for t in tiles if t is not None]
    if not used:
        raise UserError(f"cluster step {step} gives no worker a tile")
    if used[0].rows_out[0] != 0 or any(a.rows_out[1] != b.rows_out[0] for a, b in zip(used, used[1:])):
        raise UserError(f"the tiles' output rows {[t.rows_out for t in used]} of step {step} are not consecutive "
                        "from row 0 in worker order")


def _check_cores(cores: Sequence[int | None] | None, n: int) -> list[int | None]:
    if cores is None:
        return [None] * n
    cores = list(cores)
    if len(cores) != n:
        raise UserError(f"{len(cores)} cores for {n} cluster workers: give one core (or None) per worker")
    return cores


# what a lost worker's error tells the user to do, from the command line or from Python
RECOVER = ("restart its RPC server and run again, or run with `--cluster-fallback local` (Python: reconnect(), "
           "or pass fallback=)")


class Cluster:
    """Tiled blocks over TVM RPC workers: one tile per worker, in row order (``tiles``), or
    several steps (``steps``: per step one tile or None per worker; ``cluster(x, step=i)`` runs
    step i). One session per worker holds every step's modules.

    ``workers``: ``"HOST:PORT,..."`` of plain servers, or, with ``tracker="HOST:PORT"`` and
    ``device_key``, how many devices to request from that tracker. ``cores``: per worker, the
    core this process talks to it from (None: any). TVM RPC copies a tensor byte by byte on both
    ends (CPU-bound, about 50 MB/s on this machine), and a worker waits while this process copies
    its band, so for workers on this machine, giving each worker's copying its own core keeps it
    from taking another worker's core (``LocalWorkers.worker_cores``)."""

    def __init__(self, workers: str | Sequence[str] | int, tiles: Sequence[TileModule] | None = None, *,
                 steps: Sequence[Sequence[TileModule | None]] | None = None, device: str = "cpu",
                 timeout: float = 30.0, connect_timeout: float = 10.0, tracker: str | None = None,
                 device_key: str | None = None, cores: Sequence[int | None] | None = None):
        addresses = _openers(workers, tracker, device_key)
        cores = _check_cores(cores, len(addresses))
        if (tiles is None) == (steps is None):
            raise UserError("a cluster takes either tiles (one step) or steps, not both or neither")
        steps = [list(tiles)] if steps is None else [list(s) for s in steps]
        for i, step in enumerate(steps):
            if len(step) != len(addresses):
                raise UserError(f"{len(addresses)} cluster workers for {len(step)} tiles"
                                f"{'' if len(steps) == 1 else f' in step {i}'}: give one worker per tile")
            _check_step(step, i)
        if timeout <= 0:
            raise UserError(f"the cluster timeout must be positive, got {timeout}")
        self.timeout, self.connect_timeout = float(timeout), float(connect_timeout)
        self.steps = steps
        self.workers = [_Worker(name, opener, [s[i] for s in steps], device, cores[i])
                        for i, (name, opener) in enumerate(addresses)]
        self._connect()

    def _connect(self) -> None:
        """Every worker's session, modules and weights; on any failure every session ends."""
        self.stats = CallStats()
        try:
            self._each(self.workers, lambda w: w.connect(self.connect_timeout), self.connect_timeout + 120.0,
                       "connecting")
        except BaseException:
            self.close()
            raise

    def _each(self, workers: Sequence[_Worker], fn: Callable, timeout: float, doing: str) -> list:
        """``fn(worker)`` for the workers concurrently; the results in order, or the first
        failure as one UserError (failed workers are marked lost)."""
        started = [(w, *w.lane.submit(lambda w=w: fn(w))) for w in workers]
        deadline = time.monotonic() + timeout
        results, errors = [], []
        for w, done, box in started:
            if not done.wait(max(0.0, deadline - time.monotonic())):
                w.lost = f"did not answer within {timeout:g} s"
                w.lane.stop()  # stuck in the call: it ends after it, if ever
                w.lane = _Lane(w.lane.core)
                errors.append((w, None))
                continue
            ok, value = box[0]
            if ok:
                results.append(value)
                continue
            if isinstance(value, UserError):
                raise value
            w.lost = _reason(value)
            errors.append((w, value))
        if errors:
            w, exc = errors[0]
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            err = UserError(f"cluster worker {w.address} ({w.rows}) "
                            f"{'' if exc is None else 'failed '}while {doing}: {w.lost}{more}; no output was "
                            f"produced; {RECOVER}")
            if exc is not None:
                raise err from exc
            raise err
        return results

    def _active(self, step: int) -> list[_Worker]:
        if not 0 <= step < len(self.steps):
            raise UserError(f"the cluster has steps 0-{len(self.steps) - 1}, not {step}")
        return [w for w in self.workers if w.tiles[step] is not None]

    def __call__(self, x: np.ndarray, fallback: Callable[[np.ndarray], np.ndarray] | None = None,
                 step: int = 0) -> np.ndarray:
        """The output of step ``step`` for input ``x`` (NCHW), stitched from its workers' bands. If
        a worker is lost (now or before) and ``fallback`` is given, ``fallback(x)`` is returned
        instead."""
        x = np.asarray(x)
        active = self._active(step)
        lost = [w for w in active if w.lost is not None or not w.vms]
        t0 = time.perf_counter()
        try:
            if lost:
                w = lost[0]
                raise UserError(f"cluster worker {w.address} was lost ({w.lost or 'not connected'}); no output was "
                                f"produced; {RECOVER}")
            for w in active:
                w.step = step
            bands = [np.ascontiguousarray(x[:, :, w.tiles[step].rows_in[0]:w.tiles[step].rows_in[1]]) for w in active]
            band_of = {id(w): b for w, b in zip(active, bands)}
            outs = self._each(active, lambda w: w.run(band_of[id(w)], step), self.timeout, "running its tile")
        except UserError:
            if fallback is None:
                raise
            out = fallback(x)
            self.stats = CallStats(total_seconds=time.perf_counter() - t0, fallback=True)
            return out
        for w, o in zip(active, outs):
            if o.shape[2] != w.tiles[step].rows_out[1] - w.tiles[step].rows_out[0]:
                raise UserError(f"cluster worker {w.address} returned {o.shape[2]} rows for {w.rows}: "
                                "its tile module is not the one planned")
        out = np.concatenate(outs, axis=2)
        self.stats = CallStats([w.seconds for w in active], [b.nbytes for b in bands],
                               [o.nbytes for o in outs], time.perf_counter() - t0)
        return out

    def compute_seconds(self, x: np.ndarray, step: int = 0, number: int = 3, repeat: int = 3,
                        cold: bool = False) -> list[float]:
        """Per worker of step ``step`` (in worker order), the median seconds of its tile alone on
        its device for input ``x``, all workers measured at once (as they run in a call);
        ``cold``: weights flushed from the caches before each repeat."""
        x = np.asarray(x)
        active = self._active(step)
        bands = {id(w): np.ascontiguousarray(x[:, :, w.tiles[step].rows_in[0]:w.tiles[step].rows_in[1]])
                 for w in active}
        runs = self._each(active, lambda w: w.compute_seconds(bands[id(w)], step, number, repeat, cold),
                          self.timeout * (number * repeat + 1), "timing its tile")
        return [float(np.median(r)) for r in runs]

    def echo_seconds(self, nbytes: int, repeat: int = 5, together: bool = False) -> list[list[float]]:
        """Per worker, ``repeat`` round trips of ``nbytes`` bytes to its device and back: the
        workers one after another (each link measured alone), or ``together`` (every round trip
        to all workers at once)."""
        if together:
            rounds = [self._each(self.workers, lambda w: w.echo_seconds(nbytes, 1)[0], self.timeout, "echoing data")
                      for _ in range(repeat)]
            return [list(times) for times in zip(*rounds)]
        return [self._each([w], lambda w: w.echo_seconds(nbytes, repeat), self.timeout * repeat, "echoing data")[0]
                for w in self.workers]

    def reconnect(self) -> None:
        """Connect again to the workers that were lost (and upload their tiles again)."""
        for w in self.workers:
            if w.lost is not None or not w.vms:
                w.close()
                rpc_session.release()
                w.connect(self.connect_timeout)

    def close(self) -> None:
        """End every session (TVM's RPC server serves one session at a time)."""
        for w in self.workers:
            w.close()
        rpc_session.release()

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Probe(Cluster):
    """Sessions to workers for measuring, not for tiling: every worker loads every module of
    ``modules`` (step i runs module i whole on every worker), so that :meth:`compute_seconds`
    times each worker on the same work and :meth:`echo_seconds` times each link."""

    def __init__(self, workers: str | Sequence[str] | int, modules: Sequence[TileModule] = (), *, device: str = "cpu",
                 timeout: float = 60.0, connect_timeout: float = 10.0, tracker: str | None = None,
                 device_key: str | None = None, cores: Sequence[int | None] | None = None):
        addresses = _openers(workers, tracker, device_key)
        cores = _check_cores(cores, len(addresses))
        self.timeout, self.connect_timeout = float(timeout), float(connect_timeout)
        self.steps = [[m] * len(addresses) for m in modules]
        self.workers = [_Worker(name, opener, list(modules), device, c) for (name, opener), c in zip(addresses, cores)]
        self._connect()


