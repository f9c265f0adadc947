"""legoc.runtime.cluster: one tiled block run across several devices over TVM RPC.

Each worker is a plain TVM RPC server reached directly by ``HOST:PORT``::

    python -m tvm.exec.rpc_server --host 0.0.0.0 --port 9090      # on each board

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

:class:`LocalWorkers` starts such servers on this machine's loopback, each pinned to its own core
with ``taskset`` when available: for trying a plan here, and for tests and benchmarks.

Torch-free: numpy and the TVM runtime only.
"""
from __future__ import annotations

import contextlib
import gc
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from legoc.errors import UserError, first_line

__all__ = ["Cluster", "LocalWorkers", "TileModule", "parse_workers"]


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


def parse_workers(text: str | Sequence[str]) -> list[tuple[str, int]]:
    """``"HOST:PORT,HOST:PORT"`` (or a list of ``HOST:PORT``) -> [(host, port), ...]."""
    items = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    out = []
    for item in items:
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise UserError(f"a cluster worker is HOST:PORT of a TVM RPC server (e.g. 127.0.0.1:9090), got {item!r}")
        out.append((host, int(port)))
    if not out:
        raise UserError("a cluster needs at least one worker HOST:PORT")
    return out


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _reason(exc: BaseException) -> str:
    """The informative line of a TVM RPC error (it wraps the remote error in boilerplate)."""
    for line in str(exc).splitlines():
        line = line.strip()
        if line and "Error caught from RPC call" not in line and not line.startswith("Traceback"):
            return line if len(line) <= 200 else line[:197] + "..."
    return type(exc).__name__


def _in_thread(fn: Callable):
    """``fn()`` started in a daemon thread: (thread, box); the box gets (True, result) or
    (False, exception) when it ends. A thread that never ends is abandoned (a daemon never
    blocks exit)."""
    box: list = []

    def run():
        try:
            box.append((True, fn()))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box.append((False, exc))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


class _Worker:
    """One RPC session to one server, with its tile loaded and its weights on the device."""

    def __init__(self, host: str, port: int, tile: TileModule, device: str):
        self.host, self.port, self.tile, self.device = host, port, tile, device
        self.address = f"{host}:{port}"
        self.remote = self.dev = self.main = None
        self.params: list = []
        self.lost: str | None = None
        self.seconds = 0.0  # the last call's round trip: send, run, receive

    def connect(self, connect_timeout: float) -> None:
        import tvm  # noqa: PLC0415 - the TVM runtime, loaded on first use
        import tvm.runtime.vm  # noqa: F401, PLC0415
        from tvm import rpc  # noqa: PLC0415

        try:  # TVM's own connect retries a refused connection for a long time: check first
            socket.create_connection((self.host, self.port), timeout=connect_timeout).close()
        except OSError as exc:
            why = "connection refused" if isinstance(exc, ConnectionRefusedError) else first_line(exc) or type(exc).__name__
            raise UserError(f"cannot reach cluster worker {self.address}: {why}; start its server with "
                            f"`python -m tvm.exec.rpc_server --host {self.host} --port {self.port}`") from exc
        try:
            self.remote = rpc.connect(self.host, self.port)
            self.dev = self.remote.cuda(0) if self.device == "cuda" else self.remote.cpu(0)
            data = Path(self.tile.path).read_bytes()
            want = hashlib.sha256(data).hexdigest()
            name = f"legoc-tile-{want[:16]}.so"
            self.remote.upload(bytearray(data), target=name)
            back = hashlib.sha256(bytes(self.remote.download(name))).hexdigest()
            if back != want:
                raise UserError(f"cluster worker {self.address} holds a different copy of {Path(self.tile.path).name} "
                                f"than was sent (sha256 {back[:12]} != {want[:12]}); check its disk and network")
            lib = self.remote.load_module(name)
            vm = tvm.runtime.vm.VirtualMachine(lib, self.dev)
            self.main = vm["main"]
            self.params = [tvm.runtime.tensor(np.ascontiguousarray(w), self.dev) for w in self.tile.weights]
            for i, (p, w) in enumerate(zip(self.params, self.tile.weights)):
                if _digest(p.numpy()) != _digest(w):
                    raise UserError(f"cluster worker {self.address} holds different values for weight {i} than "
                                    "were sent; check its memory and network")
        except UserError:
            self.close()
            raise
        except Exception as exc:  # noqa: BLE001 - TVM's RPC errors come in many types
            self.close()
            raise UserError(f"cluster worker {self.address} cannot load its tile "
                            f"{Path(self.tile.path).name}: {_reason(exc)}") from exc
        self.lost = None

    def run(self, band: np.ndarray) -> np.ndarray:
        import tvm  # noqa: PLC0415

        t0 = time.perf_counter()
        out = self.main(tvm.runtime.tensor(band, self.dev), *self.params)
        result = out.numpy() if hasattr(out, "numpy") else out[0].numpy()
        self.seconds = time.perf_counter() - t0
        return result

    def close(self) -> None:
        self.main = self.dev = self.remote = None
        self.params = []


@dataclass
class CallStats:
    """The last call: per worker its round-trip seconds, bytes sent and received."""

    seconds: list[float] = field(default_factory=list)
    sent: list[int] = field(default_factory=list)
    received: list[int] = field(default_factory=list)
    total_seconds: float = 0.0
    fallback: bool = False


class Cluster:
    """A tiled block over TVM RPC workers (one tile per worker, in row order)."""

    def __init__(self, workers: str | Sequence[str], tiles: Sequence[TileModule], *, device: str = "cpu",
                 timeout: float = 30.0, connect_timeout: float = 10.0):
        addresses = parse_workers(workers)
        if len(addresses) != len(tiles):
            raise UserError(f"{len(addresses)} cluster workers for {len(tiles)} tiles: give one worker per tile")
        tiles = list(tiles)
        if tiles[0].rows_out[0] != 0 or any(a.rows_out[1] != b.rows_out[0] for a, b in zip(tiles, tiles[1:])):
            raise UserError(f"the tiles' output rows {[t.rows_out for t in tiles]} are not consecutive from row 0")
        if timeout <= 0:
            raise UserError(f"the cluster timeout must be positive, got {timeout}")
        self.timeout, self.connect_timeout = float(timeout), float(connect_timeout)
        self.workers = [_Worker(h, p, t, device) for (h, p), t in zip(addresses, tiles)]
        self.stats = CallStats()
        self._each(lambda w: w.connect(self.connect_timeout), self.connect_timeout + 120.0, "connecting")

    def _each(self, fn: Callable, timeout: float, doing: str) -> list:
        """``fn(worker)`` for every worker concurrently; the results in order, or the first
        failure as one UserError (failed workers are marked lost)."""
        started = [(w, *_in_thread(lambda w=w: fn(w))) for w in self.workers]
        deadline = time.monotonic() + timeout
        results, errors = [], []
        for w, thread, box in started:
            thread.join(max(0.0, deadline - time.monotonic()))
            if not box:
                w.lost = f"did not answer within {timeout:g} s"
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
            err = UserError(f"cluster worker {w.address} (rows {w.tile.rows_out[0]}-{w.tile.rows_out[1]}) "
                            f"{'' if exc is None else 'failed '}while {doing}: {w.lost}{more}; no output was "
                            f"produced; restart its RPC server and call reconnect(), or pass fallback=")
            if exc is not None:
                raise err from exc
            raise err
        return results

    def __call__(self, x: np.ndarray, fallback: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
        """The block's output for input ``x`` (NCHW), stitched from every worker's band. If a worker
        is lost (now or before) and ``fallback`` is given, ``fallback(x)`` is returned instead."""
        x = np.asarray(x)
        lost = [w for w in self.workers if w.lost is not None or w.main is None]
        t0 = time.perf_counter()
        try:
            if lost:
                w = lost[0]
                raise UserError(f"cluster worker {w.address} was lost ({w.lost or 'not connected'}); no output was "
                                "produced; restart its RPC server and call reconnect(), or pass fallback=")
            bands = [np.ascontiguousarray(x[:, :, w.tile.rows_in[0]:w.tile.rows_in[1]]) for w in self.workers]
            band_of = {id(w): b for w, b in zip(self.workers, bands)}
            outs = self._each(lambda w: w.run(band_of[id(w)]), self.timeout, "running its tile")
        except UserError:
            if fallback is None:
                raise
            out = fallback(x)
            self.stats = CallStats(total_seconds=time.perf_counter() - t0, fallback=True)
            return out
        for w, o in zip(self.workers, outs):
            if o.shape[2] != w.tile.rows_out[1] - w.tile.rows_out[0]:
                raise UserError(f"cluster worker {w.address} returned {o.shape[2]} rows for rows "
                                f"{w.tile.rows_out[0]}-{w.tile.rows_out[1]}: its tile module is not the one planned")
        out = np.concatenate(outs, axis=2)
        self.stats = CallStats([w.seconds for w in self.workers], [b.nbytes for b in bands],
                               [o.nbytes for o in outs], time.perf_counter() - t0)
        return out

    def reconnect(self) -> None:
        """Connect again to the workers that were lost (and upload their tiles again)."""
        for w in self.workers:
            if w.lost is not None or w.main is None:
                w.close()
                gc.collect()
                w.connect(self.connect_timeout)

    def close(self) -> None:
        """End every session (TVM's RPC server serves one session at a time)."""
        for w in self.workers:
            w.close()
        gc.collect()  # a session closes when its last reference goes: now

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LocalWorkers:
    """``n`` TVM RPC servers on this machine's loopback, worker ``i`` pinned to core
    ``cores[i % len(cores)]`` with ``taskset`` (when installed) and using ``threads`` threads.
    Each server runs in its own process group, stopped by its id on exit."""

    HOST = "127.0.0.1"

    def __init__(self, n: int, cores: Sequence[int] | None = None, threads: int = 1, log_dir: Path | None = None,
                 python: Sequence[str] | None = None, env: dict | None = None):
        self.n, self.threads = n, threads
        self.cores = list(cores) if cores is not None else sorted(os.sched_getaffinity(0))
        self.log_dir, self.python = log_dir, list(python or [sys.executable])
        self.env = env
        self.procs: list[subprocess.Popen] = []
        self.ports: list[int] = []
        self.pinned = shutil.which("taskset") is not None

    @property
    def addresses(self) -> list[str]:
        return [f"{self.HOST}:{p}" for p in self.ports]

    def start(self, timeout: float = 120.0) -> "LocalWorkers":
        env = dict(self.env if self.env is not None else os.environ)
        env["TVM_NUM_THREADS"] = str(self.threads)
        for i in range(self.n):
            port = _free_port(self.HOST)
            cmd = [*self.python, "-m", "tvm.exec.rpc_server", "--host", self.HOST, "--port", str(port),
                   "--port-end", str(port + 1)]
            if self.pinned:
                cmd = ["taskset", "-c", str(self.cores[i % len(self.cores)]), *cmd]
            out = open(self.log_dir / f"worker{i}.log", "w") if self.log_dir else subprocess.DEVNULL  # noqa: SIM115
            self.procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                               env=env, start_new_session=True))
            if out is not subprocess.DEVNULL:
                out.close()
            self.ports.append(port)
        deadline = time.monotonic() + timeout
        for proc, port in zip(self.procs, self.ports):
            while True:
                with contextlib.suppress(OSError):
                    socket.create_connection((self.HOST, port), timeout=1).close()
                    break
                if proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise UserError(f"the local TVM RPC server on port {port} did not start "
                                    f"(exit code {proc.returncode})")
                time.sleep(0.2)
        return self

    def kill(self, i: int) -> None:
        """SIGKILL worker ``i`` and its session process (a board that loses power)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.procs[i].pid, signal.SIGKILL)
        self.procs[i].wait(10)

    def pause(self, i: int) -> None:
        """SIGSTOP worker ``i`` (a board that hangs: connected, never answering)."""
        os.killpg(self.procs[i].pid, signal.SIGSTOP)

    def resume(self, i: int) -> None:
        os.killpg(self.procs[i].pid, signal.SIGCONT)

    def stop(self) -> None:
        for proc in self.procs:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                try:
                    proc.wait(10)
                    break
                except subprocess.TimeoutExpired:
                    continue

    def __enter__(self) -> "LocalWorkers":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
