"""legoc.runtime.cluster_measure: the measurements a cluster plan is made from (issue 19): each
worker's link (:func:`measure_links`), each module's seconds on each worker (:func:`measure_workers`)
and on the master (:func:`measure_local`), all through TVM (RPC sessions for the workers).

Torch-free: numpy and the TVM runtime only.
"""
from __future__ import annotations

import math
import statistics
from typing import Sequence

import numpy as np

__all__ = ["LocalModule", "measure_links", "measure_local", "measure_workers"]


def measure_links(workers: str | Sequence[str] | int, nbytes: int = 1 << 20, repeat: int = 5,
                  timeout: float = 120.0, **session) -> list:
    """Each worker's link, measured through a TVM RPC session (``session``: ``tracker=``,
    ``device_key=``, ``cores=`` as for :class:`legoc.runtime.cluster.Cluster`): the median round
    trip of a 4-byte array (to the device and back) is ``rtt``; ``nbytes`` up and the same back,
    less ``rtt``, is the transfer, timed for each worker alone and for all workers at once. What
    all at once adds is the shared part (k workers at once: ``bytes / own + k * bytes /
    bandwidth`` each); the rest is the worker's own. One worker: all of it counts as shared."""
    from legoc.runtime.cluster import Probe
    from legoc.runtime.cluster_plan import Link

    moved = 2 * (nbytes // 4 * 4)
    with Probe(workers, timeout=timeout, **session) as probe:
        probe.echo_seconds(nbytes, 1)  # warm up the sessions and buffers
        tiny = [statistics.median(t) for t in probe.echo_seconds(4, repeat)]
        alone = [statistics.median(t) for t in probe.echo_seconds(nbytes, repeat)]
        k = len(probe.workers)
        together = [statistics.median(t) for t in probe.echo_seconds(nbytes, repeat, together=True)] if k > 1 else alone
    links = []
    for r, one, all_ in zip(tiny, alone, together):
        serial = max(one - r, 1e-9)  # seconds of the transfer alone
        shared = min(max(all_ - one, 0.0) / (k - 1), serial) if k > 1 else serial
        links.append(Link(rtt=r, bandwidth=moved / shared if shared > 0 else math.inf,
                          own_bandwidth=moved / (serial - shared) if serial - shared > 0 else math.inf))
    return links


def measure_workers(workers: str | Sequence[str] | int, modules, inputs: Sequence[np.ndarray], number: int = 3,
                    repeat: int = 3, timeout: float = 120.0, cold: bool = False, **session) -> list[list[float]]:
    """Seconds of each module (a :class:`legoc.runtime.cluster.TileModule` run whole, on its
    input) on each worker's device, every worker timed at once as in a tiled call:
    ``[module][worker]`` (``session`` as for :func:`measure_links`). ``cold``: the weights
    flushed from the worker's caches before each repeat, as a call finds them after TVM RPC
    copied the band in (use ``number=1``)."""
    from legoc.runtime.cluster import Probe

    with Probe(workers, modules, timeout=timeout, **session) as probe:
        return [probe.compute_seconds(x, step=i, number=number, repeat=repeat, cold=cold)
                for i, x in enumerate(inputs)]


class LocalModule:
    """A compiled module (a ``TileModule``) run in this process on its CPU."""

    def __init__(self, module):
        import tvm  # noqa: PLC0415
        import tvm.runtime.vm  # noqa: F401, PLC0415

        self.dev = tvm.cpu()
        self.vm = tvm.runtime.vm.VirtualMachine(tvm.runtime.load_module(str(module.path)), self.dev)
        self.params = [tvm.runtime.tensor(np.ascontiguousarray(w), self.dev) for w in module.weights]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        import tvm  # noqa: PLC0415

        out = self.vm["main"](tvm.runtime.tensor(np.ascontiguousarray(x), self.dev), *self.params)
        return out.numpy() if hasattr(out, "numpy") else out[0].numpy()

    def seconds(self, x: np.ndarray, number: int = 3, repeat: int = 3) -> float:
        import tvm  # noqa: PLC0415

        timer = self.vm.time_evaluator("main", self.dev, number=number, repeat=repeat)
        return float(np.median(timer(tvm.runtime.tensor(np.ascontiguousarray(x), self.dev), *self.params).results))


def measure_local(modules, inputs: Sequence[np.ndarray], number: int = 3, repeat: int = 3) -> list[float]:
    """Seconds of each module on its input in this process (the master's share of a plan)."""
    return [LocalModule(m).seconds(x, number, repeat) for m, x in zip(modules, inputs)]


