"""legoc.runtime.rpc_session: opening TVM RPC sessions with one-line errors, shared by the device
farm (``legoc.targets.rpc``) and the cluster (``legoc.runtime.cluster``).

Two ways to a device, both TVM's own:

* a plain server, ``python -m tvm.exec.rpc_server --host H --port P``: :func:`connect_server`;
* a server registered with a tracker under a device key, ``python -m tvm.exec.rpc_server
  --tracker T:9190 --key KEY``: :func:`request` (one free device with that key per call; the
  tracker hands a device to one session at a time).

Each first checks with a plain socket that the address answers at all, because TVM's own
connect retries a refused connection for a long time. Failures are :class:`UserError` s of one
line saying what is wrong and what to do. A session ends when its last reference goes:
:func:`release` collects at once (a TVM RPC server serves one session at a time, so a session
left to the garbage collector blocks the next one).

Torch-free: the TVM runtime only.
"""
from __future__ import annotations

import gc
import socket

from legoc.errors import UserError, first_line

__all__ = ["check_reachable", "connect_server", "connect_tracker", "parse_address", "reason", "release", "request"]


def parse_address(text: str, expected: str) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port), or the UserError ``EXPECTED, got TEXT``."""
    host, sep, port = (text or "").strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"{expected}, got {text!r}")
    return host, int(port)


def reason(exc: BaseException, limit: int = 300) -> str:
    """The informative line of a TVM RPC error (it wraps the remote error in boilerplate)."""
    for line in str(exc).splitlines():
        line = line.strip()
        if line and "Error caught from RPC call" not in line and not line.startswith("Traceback"):
            return line if len(line) <= limit else line[:limit - 3] + "..."
    return type(exc).__name__


def check_reachable(host: str, port: int, timeout: float, what: str, then: str) -> None:
    """A UserError ``cannot reach WHAT: why; THEN`` unless something accepts a TCP connection at
    ``host:port`` within ``timeout`` seconds."""
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        why = "connection refused" if isinstance(exc, ConnectionRefusedError) else first_line(exc) or type(exc).__name__
        raise UserError(f"cannot reach {what}: {why}; {then}") from exc


def connect_server(host: str, port: int, timeout: float, what: str | None = None):
    """An RPC session to the plain server at ``host:port`` (``what`` names it in errors)."""
    from tvm import rpc  # noqa: PLC0415 - the TVM runtime, loaded on first use

    what = what or f"the TVM RPC server at {host}:{port}"
    check_reachable(host, port, timeout, what,
                    f"start its server with `python -m tvm.exec.rpc_server --host {host} --port {port}`")
    try:
        return rpc.connect(host, port, session_timeout=0)
    except Exception as exc:  # noqa: BLE001 - TVM's RPC errors come in many types
        raise UserError(f"{what} does not speak TVM RPC: {reason(exc)}") from exc


def connect_tracker(host: str, port: int, timeout: float):
    """A connected tracker session whose requests wait at most ``timeout`` seconds."""
    from tvm import rpc  # noqa: PLC0415

    address = f"{host}:{port}"
    check_reachable(host, port, min(timeout, 10), f"the RPC tracker at {address}",
                    f"start one with `python -m tvm.exec.rpc_tracker --host {host} --port {port}`")
    try:
        tracker = rpc.connect_tracker(host, port)
        tracker._sock.settimeout(timeout)  # TrackerSession has no public timeout; requests block otherwise
        return tracker
    except (OSError, RuntimeError) as exc:
        raise UserError(f"{address} is not a TVM RPC tracker: {first_line(exc)}") from exc


def request(host: str, port: int, key: str, timeout: float, session_timeout: float = 0.0,
            longer: str = "a longer timeout waits longer"):
    """A session to a free device registered as ``key`` with the tracker at ``host:port``
    (``session_timeout`` > 0: the server ends the session after that many seconds). ``longer``
    says, in the error when none comes free within ``timeout``, how to wait longer."""
    address = f"{host}:{port}"
    tracker = connect_tracker(host, port, timeout)
    try:
        return tracker.request(key, priority=1, session_timeout=session_timeout, max_retry=1)
    except (OSError, RuntimeError) as exc:
        if "timed out" in str(exc):
            raise UserError(
                f"no free device with key '{key}' at the RPC tracker {address} within {timeout:g} s "
                f"(another session may hold it, or its RPC server stopped; {longer})") from exc
        raise UserError(f"could not get a '{key}' device from the RPC tracker at {address}: "
                        f"{first_line(exc)}") from exc
    finally:
        tracker.close()


def release() -> None:
    """End the sessions whose last reference the caller just dropped: now, not at the garbage
    collector's leisure (their server serves nobody else until then)."""
    gc.collect()
