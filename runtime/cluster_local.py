"""legoc.runtime.cluster_local: stand-in devices on this machine, for trying a cluster plan here
and for tests and benchmarks (issue 19).

* :class:`LocalWorkers`: ``n`` TVM RPC servers on this machine's loopback, each pinned to its own
  core with ``taskset`` (when installed), plain (``HOST:PORT``) or registered with a tracker under
  a device key;
* :class:`LocalTracker`: a TVM RPC tracker on loopback;
* :class:`ShapedLoopback`: a network namespace whose own loopback is a slow link (``tc``).

Every process is started in its own process group and stopped by its id.

Torch-free: the standard library and TVM's own ``tvm.exec`` entry points.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from legoc.errors import UserError

__all__ = ["LocalTracker", "LocalWorkers", "ShapedLoopback"]


HOST = "127.0.0.1"


def _free_port(host: str = HOST) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _spawn(cmd: list[str], log: Path | None, env: dict) -> subprocess.Popen:
    """``cmd`` in its own process group (stopped by its id), output to ``log`` or nowhere."""
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 - handed to the child
    try:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
    finally:
        if out is not subprocess.DEVNULL:
            out.close()


def _stop(procs: Sequence[subprocess.Popen]) -> None:
    for proc in procs:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(10)
                break
            except subprocess.TimeoutExpired:
                continue


def _wait_listening(proc: subprocess.Popen, port: int, deadline: float, what: str) -> None:
    while True:
        with contextlib.suppress(OSError):
            socket.create_connection((HOST, port), timeout=1).close()
            return
        if proc.poll() is not None or time.monotonic() > deadline:
            raise UserError(f"{what} on port {port} did not start (exit code {proc.returncode})")
        time.sleep(0.2)


class LocalTracker:
    """A TVM RPC tracker (``python -m tvm.exec.rpc_tracker``) on this machine's loopback."""

    def __init__(self, log_dir: Path | None = None):
        self.log_dir = log_dir
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def free(self, key: str) -> int:
        """How many servers registered as ``key`` are free now."""
        from legoc.runtime.rpc_session import connect_tracker  # noqa: PLC0415

        tracker = connect_tracker(HOST, self.port, 10)
        try:
            return int(tracker.summary().get("queue_info", {}).get(key, {}).get("free", 0))
        finally:
            tracker.close()

    def start(self, timeout: float = 60.0) -> "LocalTracker":
        self.port = _free_port()
        cmd = [sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", HOST, "--port", str(self.port),
               "--port-end", str(self.port + 1), "--silent"]
        self.proc = _spawn(cmd, self.log_dir / "tracker.log" if self.log_dir else None, dict(os.environ))
        try:
            _wait_listening(self.proc, self.port, time.monotonic() + timeout, "the local TVM RPC tracker")
        except UserError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc is not None:
            _stop([self.proc])
            self.proc = None

    def __enter__(self) -> "LocalTracker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class LocalWorkers:
    """``n`` TVM RPC servers on this machine's loopback, worker ``i`` pinned to core
    ``cores[i % len(cores)]`` with ``taskset`` (when installed) and using ``threads`` threads;
    reached directly (:attr:`addresses`), or, with ``tracker`` (a :class:`LocalTracker`) and
    ``key``, registered with that tracker under that device key. ``python`` and ``env`` run the
    servers in another Python (e.g. an emulated board's). Each server runs in its own process
    group, stopped by its id on exit."""

    HOST = HOST

    def __init__(self, n: int, cores: Sequence[int] | None = None, threads: int = 1, log_dir: Path | None = None,
                 python: Sequence[str] | None = None, env: dict | None = None,
                 tracker: LocalTracker | None = None, key: str | None = None):
        if (tracker is None) != (key is None):
            raise UserError("local workers register with a tracker under a key: give both or neither")
        self.n, self.threads = n, threads
        self.cores = list(cores) if cores is not None else sorted(os.sched_getaffinity(0))
        self.log_dir, self.python = log_dir, list(python or [sys.executable])
        self.env = env
        self.tracker, self.key = tracker, key
        self.procs: list[subprocess.Popen] = []
        self.ports: list[int] = []
        self.pinned = shutil.which("taskset") is not None

    @property
    def addresses(self) -> list[str]:
        return [f"{self.HOST}:{p}" for p in self.ports]

    @property
    def worker_cores(self) -> list[int | None]:
        """Per worker, the core it is pinned to (None: not pinned)."""
        return [self.cores[i % len(self.cores)] if self.pinned else None for i in range(self.n)]

    def start(self, timeout: float = 120.0) -> "LocalWorkers":
        env = dict(self.env if self.env is not None else os.environ)
        env["TVM_NUM_THREADS"] = str(self.threads)
        for i in range(self.n):
            port = _free_port()
            cmd = [*self.python, "-m", "tvm.exec.rpc_server", "--host", self.HOST, "--port", str(port),
                   "--port-end", str(port + 1)]
            if self.tracker is not None:
                cmd += ["--tracker", self.tracker.address, "--key", self.key]
            if self.pinned:
                cmd = ["taskset", "-c", str(self.cores[i % len(self.cores)]), *cmd]
            self.procs.append(_spawn(cmd, self.log_dir / f"worker{i}.log" if self.log_dir else None, env))
            self.ports.append(port)
        deadline = time.monotonic() + timeout
        try:
            for proc, port in zip(self.procs, self.ports):
                _wait_listening(proc, port, deadline, "the local TVM RPC server")
            while self.tracker is not None and self.tracker.free(self.key) < self.n:
                if time.monotonic() > deadline:
                    raise UserError(f"the local TVM RPC servers did not all register as '{self.key}' with "
                                    f"the tracker at {self.tracker.address} within {timeout:g} s")
                time.sleep(0.2)
        except UserError:
            self.stop()
            raise
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
        _stop(self.procs)

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
