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
with ``taskset`` when available, and :class:`ShapedLoopback` makes a network namespace whose own
loopback is a 100 Mbit/s link (``tc``): for trying a plan here, and for tests and benchmarks.
:class:`Probe` opens sessions for measuring (``legoc.runtime.cluster_plan``).

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

__all__ = ["Cluster", "LocalWorkers", "Probe", "ShapedLoopback", "TileModule", "parse_workers"]


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
    """One RPC session to one server, with its tiles (one per step, or None where it sits a step
    out) loaded and their weights on the device."""

    def __init__(self, host: str, port: int, tiles: Sequence[TileModule | None], device: str):
        self.host, self.port, self.tiles, self.device = host, port, list(tiles), device
        self.address = f"{host}:{port}"
        self.remote = self.dev = None
        self.vms: list = []  # per step (its module's VM, its main function), or None
        self.params: list[list] = []
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
        from tvm import rpc  # noqa: PLC0415

        try:  # TVM's own connect retries a refused connection for a long time: check first
            socket.create_connection((self.host, self.port), timeout=connect_timeout).close()
        except OSError as exc:
            why = "connection refused" if isinstance(exc, ConnectionRefusedError) else first_line(exc) or type(exc).__name__
            raise UserError(f"cannot reach cluster worker {self.address}: {why}; start its server with "
                            f"`python -m tvm.exec.rpc_server --host {self.host} --port {self.port}`") from exc
        current = None
        try:
            self.remote = rpc.connect(self.host, self.port)
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
        out = self.vms[step][1](tvm.runtime.tensor(band, self.dev), *self.params[step])
        result = out.numpy() if hasattr(out, "numpy") else out[0].numpy()
        self.seconds = time.perf_counter() - t0
        return result

    def compute_seconds(self, band: np.ndarray, step: int, number: int, repeat: int) -> list[float]:
        """Seconds of the step's tile alone on the device (TVM's time evaluator runs it there:
        no transfer in the time), one per repeat."""
        import tvm  # noqa: PLC0415

        self.step = step
        args = [tvm.runtime.tensor(band, self.dev), *self.params[step]]
        timer = self.vms[step][0].time_evaluator("main", self.dev, number=number, repeat=repeat)
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
        self.params = []


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


class Cluster:
    """Tiled blocks over TVM RPC workers: one tile per worker, in row order (``tiles``), or
    several steps (``steps``: per step one tile or None per worker; ``cluster(x, step=i)`` runs
    step i). One session per worker holds every step's modules."""

    def __init__(self, workers: str | Sequence[str], tiles: Sequence[TileModule] | None = None, *,
                 steps: Sequence[Sequence[TileModule | None]] | None = None, device: str = "cpu",
                 timeout: float = 30.0, connect_timeout: float = 10.0):
        addresses = parse_workers(workers)
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
        self.workers = [_Worker(h, p, [s[i] for s in steps], device) for i, (h, p) in enumerate(addresses)]
        self.stats = CallStats()
        self._each(self.workers, lambda w: w.connect(self.connect_timeout), self.connect_timeout + 120.0, "connecting")

    def _each(self, workers: Sequence[_Worker], fn: Callable, timeout: float, doing: str) -> list:
        """``fn(worker)`` for the workers concurrently; the results in order, or the first
        failure as one UserError (failed workers are marked lost)."""
        started = [(w, *_in_thread(lambda w=w: fn(w))) for w in workers]
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
            err = UserError(f"cluster worker {w.address} ({w.rows}) "
                            f"{'' if exc is None else 'failed '}while {doing}: {w.lost}{more}; no output was "
                            f"produced; restart its RPC server and call reconnect(), or pass fallback=")
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
                                "produced; restart its RPC server and call reconnect(), or pass fallback=")
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

    def compute_seconds(self, x: np.ndarray, step: int = 0, number: int = 3, repeat: int = 3) -> list[float]:
        """Per worker of step ``step`` (in worker order), the median seconds of its tile alone on
        its device for input ``x``, all workers measured at once (as they run in a call)."""
        x = np.asarray(x)
        active = self._active(step)
        bands = {id(w): np.ascontiguousarray(x[:, :, w.tiles[step].rows_in[0]:w.tiles[step].rows_in[1]])
                 for w in active}
        runs = self._each(active, lambda w: w.compute_seconds(bands[id(w)], step, number, repeat),
                          self.timeout * (number * repeat + 1), "timing its tile")
        return [float(np.median(r)) for r in runs]

    def echo_seconds(self, nbytes: int, repeat: int = 5) -> list[list[float]]:
        """Per worker, ``repeat`` round trips of ``nbytes`` bytes to its device and back, the
        workers one after another (each link measured alone)."""
        return [self._each([w], lambda w: w.echo_seconds(nbytes, repeat), self.timeout * repeat, "echoing data")[0]
                for w in self.workers]

    def reconnect(self) -> None:
        """Connect again to the workers that were lost (and upload their tiles again)."""
        for w in self.workers:
            if w.lost is not None or not w.vms:
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


class Probe(Cluster):
    """Sessions to workers for measuring, not for tiling: every worker loads every module of
    ``modules`` (step i runs module i whole on every worker), so that :meth:`compute_seconds`
    times each worker on the same work and :meth:`echo_seconds` times each link."""

    def __init__(self, workers: str | Sequence[str], modules: Sequence[TileModule] = (), *, device: str = "cpu",
                 timeout: float = 60.0, connect_timeout: float = 10.0):
        addresses = parse_workers(workers)
        self.timeout, self.connect_timeout = float(timeout), float(connect_timeout)
        self.steps = [[m] * len(addresses) for m in modules]
        self.workers = [_Worker(h, p, list(modules), device) for h, p in addresses]
        self.stats = CallStats()
        self._each(self.workers, lambda w: w.connect(self.connect_timeout), self.connect_timeout + 120.0, "connecting")


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


class ShapedLoopback:
    """A network namespace of its own whose loopback is shaped by ``tc`` to ``rate`` (a token
    bucket: ``tbf rate RATE burst 32kbit latency 400ms``), for trying a plan behind a slow link:
    master and workers inside it talk over that loopback only. Needs root and iproute2 (``ip``,
    ``tc``). The loopback's MTU is set to 1500 as on Ethernet: tbf drops any packet larger than
    its bucket, and a 64 KB loopback segment is. ``with link.inside():`` puts the calling thread
    (and the threads and processes it starts) in the namespace."""

    def __init__(self, rate: str = "100mbit", name: str | None = None):
        self.rate = rate
        self.name = name or f"legoc-link-{os.getpid()}"
        self.made = False

    @staticmethod
    def unavailable() -> str | None:
        """Why a shaped loopback cannot be made here (None: it can)."""
        if os.geteuid() != 0:
            return "making a network namespace and shaping it needs root"
        missing = [t for t in ("ip", "tc") if shutil.which(t) is None]
        if missing:
            return f"{' and '.join(missing)} not installed (apt-get install iproute2)"
        return None

    def _run(self, *cmd: str) -> None:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise UserError(f"`{' '.join(cmd)}` failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")

    def __enter__(self) -> "ShapedLoopback":
        why = self.unavailable()
        if why:
            raise UserError(f"cannot make a shaped loopback: {why}")
        self._run("ip", "netns", "add", self.name)
        self.made = True
        try:
            self._run("ip", "-n", self.name, "link", "set", "lo", "mtu", "1500", "up")
            self._run("ip", "netns", "exec", self.name, "tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate",
                      self.rate, "burst", "32kbit", "latency", "400ms")
        except UserError:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.made:
            subprocess.run(["ip", "netns", "del", self.name], capture_output=True, check=False)
            self.made = False

    @contextlib.contextmanager
    def inside(self):
        import ctypes  # noqa: PLC0415

        clone_newnet = 0x40000000
        libc = ctypes.CDLL(None, use_errno=True)
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
        try:
            if libc.setns(target, clone_newnet) != 0:
                raise UserError(f"cannot enter network namespace {self.name}: {os.strerror(ctypes.get_errno())}")
            yield self
        finally:
            try:
                if libc.setns(home, clone_newnet) != 0:
                    raise UserError(f"cannot leave network namespace {self.name}: {os.strerror(ctypes.get_errno())}")
            finally:
                os.close(home)
                os.close(target)
