"""The device farm: measure an artifact's variants on a board registered with a TVM RPC tracker.

The standard TVM way to reach real boards::

    python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port 9190                # once, anywhere
    python -m tvm.exec.rpc_server --tracker TRACKER:9190 --key rpi4       # on each board

then ``legoc compile model.py --target raspberry-pi-4 --rpc TRACKER:9190 --device-key rpi4`` or
``legoc profile ART --rpc TRACKER:9190 --device-key rpi4``. Every variant's module is uploaded
to the board, loaded there, and timed with TVM's time evaluator on random inputs of the right
shapes with the variant's real weights; the manifest records
``profile.latency_ms = {"value": ms, "source": "measured-rpc", "how": ...}``.

One session serves all variants, and it is released (every remote object dropped) before
returning or raising: TVM's RPC server serves one session at a time, so a session left open
blocks the next request to that board. Failures are one-line :class:`UserError`s; the manifest
is rewritten only after every variant was measured, atomically.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from legoc.errors import InternalError, UserError, first_line
from legoc.runtime import rpc_session
from legoc.runtime.artifact import MANIFEST, read_manifest, verified_path


@dataclass(frozen=True)
class RpcConfig:
    """Where the device is and how to time it."""

    host: str
    port: int
    key: str
    timeout: float = 60.0  # seconds to reach the tracker and to get a free device
    session_timeout: float = 600.0  # the server ends a session older than this
    number: int = 10  # runs per timing
    repeat: int = 3  # timings; the median is recorded

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port), or a UserError."""
    return rpc_session.parse_address(text, "--rpc takes HOST:PORT of a TVM RPC tracker (e.g. 127.0.0.1:9190)")


def make_config(address: str | None, key: str | None, **options) -> RpcConfig | None:
    """The RpcConfig of the command-line options (None when --rpc is not given)."""
    if address is None:
        if key is not None:
            raise UserError("--device-key needs --rpc HOST:PORT (the RPC tracker)")
        return None
    if not key:
        raise UserError("--rpc needs --device-key KEY: the key the board's RPC server registered with")
    host, port = parse_address(address)
    cfg = RpcConfig(host, port, key, **{k: v for k, v in options.items() if v is not None})
    if cfg.timeout <= 0 or cfg.number < 1 or cfg.repeat < 1:
        raise UserError("--rpc-timeout must be positive; --rpc-number and --rpc-repeat at least 1")
    return cfg


# ---------------------------------------------------------------------------------------------
# tracker


def _tracker(cfg: RpcConfig):
    """A connected TrackerSession, or a UserError saying what is wrong."""
    return rpc_session.connect_tracker(cfg.host, cfg.port, cfg.timeout)


def check_device(cfg: RpcConfig) -> dict:
    """Fail fast (before a long compile): the tracker answers and a server has registered
    ``cfg.key``. Returns that key's queue (``{"free": n, "pending": m}``)."""
    tracker = _tracker(cfg)
    try:
        summary = tracker.summary()
    except (OSError, RuntimeError) as exc:
        raise UserError(f"the RPC tracker at {cfg.address} did not answer: {first_line(exc)}") from exc
    finally:
        tracker.close()
    queues = summary.get("queue_info", {})
    servers = [s for s in summary.get("server_info", []) if str(s.get("key", "")).split(":")[-1] == cfg.key]
    if cfg.key not in queues and not servers:
        known = ", ".join(sorted(queues)) or "none"
        raise UserError(
            f"no device with key '{cfg.key}' is registered with the RPC tracker at {cfg.address} "
            f"(keys: {known}); start one on the board with `python -m tvm.exec.rpc_server "
            f"--tracker {cfg.address} --key {cfg.key}`"
        )
    return queues.get(cfg.key, {})


def _request(cfg: RpcConfig):
    return rpc_session.request(cfg.host, cfg.port, cfg.key, cfg.timeout, cfg.session_timeout,
                               longer="--rpc-timeout waits longer")


# ---------------------------------------------------------------------------------------------
# measuring


@dataclass(frozen=True)
class Job:
    """One module to time: its file, its inputs' shapes and dtypes, its weights."""

    label: str  # "block0/r0.50"
    module: Path
    inputs: tuple[tuple[tuple[int, ...], str], ...]
    weights: tuple[np.ndarray, ...]


def jobs_of(root: Path, manifest: dict) -> list[Job]:
    """Every variant of every segment of an artifact (files checked against their sha256)."""
    from safetensors.numpy import load_file  # noqa: PLC0415

    files: dict[str, dict] = {}
    jobs = []
    for seg in manifest["segments"]:
        shapes = tuple((tuple(seg["tensors"][n]["shape"]), seg["tensors"][n].get("dtype", "float32"))
                       for n in seg["inputs"])
        for var in seg["variants"]:
            label = f"{seg['name']}/{var['id']}"
            w = var["weights"]
            entry = w["shared"] if "shared" in w else w
            if entry["file"] not in files:
                files[entry["file"]] = load_file(str(verified_path(root, entry, label + " weights")))
            values = files[entry["file"]]
            if "shared" in w:
                arrays = [values[n][tuple(slice(0, s) for s in shape)] for n, shape in zip(w["names"], w["shapes"])]
            else:
                arrays = [values[n] for n in w["names"]]
            module = verified_path(root, var["module"], label)
            jobs.append(Job(label, module, shapes, tuple(np.ascontiguousarray(a) for a in arrays)))
    return jobs


def _reason(exc: BaseException) -> str:
    return rpc_session.reason(exc, limit=300)


def _session_lost(remote) -> bool:
    """Whether the RPC session is gone (the server stopped, the board rebooted, the network
    failed), as opposed to an error the device reported: one round trip that needs nothing but
    a live session (looking up a function every TVM runtime has; a device query would not do,
    the client answers ``exist`` from its cache)."""
    try:
        remote.get_function("runtime.GetDeviceAttr")
        return False
    except Exception:  # noqa: BLE001 - any failure of the round trip means no session
        return True


PROFILE_AGAIN = "the manifest was not changed; run `legoc profile` again once the board's RPC server is back"
COMPILE_AGAIN = "nothing was written; compile again once the board's RPC server is back"


def measure(jobs: list[Job], cfg: RpcConfig, device: str = "cpu", log=None,
            built_for: str = "", then: str = PROFILE_AGAIN) -> dict[str, float]:
    """Median latency (ms) of each job on the device behind ``cfg.key``, in one session that is
    released before this returns or raises. ``then``: what the error of a session lost midway
    tells the user to do."""
    import tvm  # noqa: PLC0415
    import tvm.runtime.vm  # noqa: F401, PLC0415

    def lost(label: str, exc: BaseException) -> UserError:
        return UserError(f"lost the RPC session to the device behind key '{cfg.key}' (tracker {cfg.address}) "
                         f"while measuring {label}: {_reason(exc)}; {then}")

    remote = _request(cfg)
    results: dict[str, float] = {}
    try:
        dev = remote.cuda(0) if device == "cuda" else remote.cpu(0)
        if device == "cuda" and not dev.exist:
            raise UserError(f"the device behind key '{cfg.key}' has no CUDA GPU (or its TVM runtime "
                            "was built without CUDA)")
        rng = np.random.default_rng(0)
        for k, job in enumerate(jobs):
            name = f"legoc_{os.getpid()}_{k}.so"
            try:
                remote.upload(str(job.module), target=name)
                lib = remote.load_module(name)
            except Exception as exc:  # noqa: BLE001 - TVM's RPC errors come in many types
                if _session_lost(remote):
                    raise lost(job.label, exc) from exc
                raise UserError(f"the device behind key '{cfg.key}' cannot load {job.label}"
                                f"{built_for}: {_reason(exc)}") from exc
            try:
                vm = tvm.runtime.vm.VirtualMachine(lib, dev)
                args = [tvm.runtime.tensor(rng.standard_normal(shape).astype(dtype), dev)
                        for shape, dtype in job.inputs]
                args += [tvm.runtime.tensor(w, dev) for w in job.weights]
                timer = vm.time_evaluator("main", dev, number=cfg.number, repeat=cfg.repeat)
                results[job.label] = float(timer(*args).median) * 1e3
            except Exception as exc:  # noqa: BLE001
                if _session_lost(remote):
                    raise lost(job.label, exc) from exc
                raise UserError(f"running {job.label} on the device behind key '{cfg.key}' "
                                f"failed: {_reason(exc)}") from exc
            finally:
                vm = lib = args = timer = None  # drop remote objects before the session
                try:
                    remote.remove(name)
                except Exception:  # noqa: BLE001 - best effort; the server's temp dir goes anyway
                    pass
            if log:
                log(f"{job.label}: {results[job.label]:.3f} ms")
    finally:
        dev = remote = None
        rpc_session.release()
    return results


def profile_artifact(path: str | os.PathLike, cfg: RpcConfig, log=None) -> dict:
    """Measure every variant of the artifact at ``path`` over RPC and rewrite its manifest
    (atomically, only when all were measured). Returns the new manifest."""
    root = Path(path)
    manifest = read_manifest(root)
    check_device(cfg)
    latencies = measure(jobs_of(root, manifest), cfg, manifest["target"]["device"], log,
                        _built_for(manifest))
    record(manifest, latencies, cfg)
    write_manifest(root, manifest)
    return manifest


def measure_into(root: Path, manifest: dict, cfg: RpcConfig, log=None) -> None:
    """Measure the variants of an artifact being written (files under ``root``, manifest not yet
    on disk) and record them in ``manifest``: `legoc compile --rpc` does this before committing."""
    record(manifest, measure(jobs_of(Path(root), manifest), cfg, manifest["target"]["device"], log,
                             _built_for(manifest), then=COMPILE_AGAIN), cfg)


def _built_for(manifest: dict) -> str:
    target = manifest["target"]
    return f" (built for {target['name']}: {target['triple']}, {target['device']})"


def record(manifest: dict, latencies: dict[str, float], cfg: RpcConfig) -> None:
    """Put measured latencies into the manifest's variant profiles (in memory)."""
    how = (f"TVM time_evaluator over RPC on the device with key '{cfg.key}' (tracker "
           f"{cfg.address}), median of {cfg.repeat} x {cfg.number} runs, random inputs, "
           f"measured {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}")
    for seg in manifest["segments"]:
        for var in seg["variants"]:
            label = f"{seg['name']}/{var['id']}"
            if label not in latencies:
                raise InternalError(f"{label} was not measured")
            var.setdefault("profile", {})["latency_ms"] = {
                "value": latencies[label], "source": "measured-rpc", "how": how}


def write_manifest(root: Path, manifest: dict) -> None:
    """Replace ``root/manifest.json`` and its digest, each atomically. A signature of the old
    manifest no longer holds: it is removed (sign again with `legoc sign`)."""
    from legoc.runtime.signing import DIGEST, SIGNATURE, digest_text

    data = json.dumps(manifest, indent=1).encode()
    (root / SIGNATURE).unlink(missing_ok=True)
    for name, content in ((MANIFEST, data), (DIGEST, digest_text(data).encode())):
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=root)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(content)
            os.replace(tmp, root / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
