"""Latency calibration: estimates for targets that do not run here (until they are measured
over TVM RPC), and the fit that calibrates a configuration's latency from measured ones.

``estimated latency = 2 * MACs / (peak FLOP/s * efficiency)`` per module, plus a per-call overhead
once per segment of a configuration (``call_overhead_ms``)

* peak: fp32 FLOP/s of the board from its published core counts and clocks (CPU: cores x clock x
  FLOP per cycle of its NEON units; GPU: CUDA cores x clock x 2);
* efficiency: the share of peak legoc's compiled code reaches. For CPUs it is the share legoc's
  CPU schedules reach of the build host's numpy sgemm peak (``benchmarks/inference.py`` measures
  it, ``benchmarks/estimators.py`` prints the per-variant figure; re-measure it when the CPU
  schedules change). For GPUs nothing here can measure it, so it is an assumption and the
  manifest says so.

These are guesses with a stated basis, recorded with ``source: estimated``; ``legoc profile ART
--rpc`` replaces them with measurements from the board.

A Jetson's CPU (``NAME:cpu``, and the CPU modules of ``--devices cpu,gpu``) has its own peak. For
``--devices`` the cost of moving a tensor between CPU and GPU is estimated too
(:func:`estimate_transfer`): ``per-copy latency + bytes / bandwidth``. Jetson boards have unified
memory (CPU and GPU share one DRAM), but a TVM cuda tensor copy (``Tensor.copyto``) still goes
through ``cudaMemcpy`` from pageable host memory and synchronises: the driver stages it through a
pinned buffer, so the data moves twice and each copy pays a driver call. The figures are
conservative: about a tenth of the DRAM's published peak bandwidth, and a per-copy latency of
20-50 us (synchronous ``cudaMemcpy`` on these ARM hosts). Nothing here has measured them.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Calibration:
    peak_gflops: float        # fp32, whole device
    basis: str                # where the peak comes from


# Board peaks (fp32) from published specifications.
PEAKS = {
    "raspberry-pi-3": Calibration(38.4, "4x Cortex-A53 @ 1.2 GHz x 8 FLOP/cycle (NEON FMA)"),
    "raspberry-pi-4": Calibration(96.0, "4x Cortex-A72 @ 1.5 GHz x 16 FLOP/cycle (2 NEON FMA pipes)"),
    "raspberry-pi-5": Calibration(153.6, "4x Cortex-A76 @ 2.4 GHz x 16 FLOP/cycle (2 NEON FMA pipes)"),
    "jetson-nano": Calibration(236.0, "128 Maxwell CUDA cores @ 921 MHz x 2"),
    "jetson-tx2": Calibration(665.0, "256 Pascal CUDA cores @ 1.3 GHz x 2"),
    "jetson-xavier-nx": Calibration(845.0, "384 Volta CUDA cores @ 1.1 GHz x 2"),
    "jetson-orin-nano": Calibration(1280.0, "1024 Ampere CUDA cores @ 625 MHz x 2"),
    # the CPUs of the Jetsons (NAME:cpu; the cpu modules of --devices cpu,gpu)
    "jetson-nano:cpu": Calibration(45.8, "4x Cortex-A57 @ 1.43 GHz x 8 FLOP/cycle (NEON FMA)"),
    "jetson-tx2:cpu": Calibration(64.0, "4x Cortex-A57 @ 2.0 GHz x 8 FLOP/cycle (the 2 Denver2 cores not counted)"),
    "jetson-xavier-nx:cpu": Calibration(134.4, "6x Carmel @ 1.4 GHz x 16 FLOP/cycle (2 NEON FMA pipes)"),
    "jetson-orin-nano:cpu": Calibration(144.0, "6x Cortex-A78AE @ 1.5 GHz x 16 FLOP/cycle (2 NEON FMA pipes)"),
}
# Share of peak reached by legoc's compiled code (see the module docstring), with its basis.
EFFICIENCY = {"cpu": (0.5, "legoc's CPU schedules on the x86-64 build host reach 53-96% of its numpy sgemm "
                           "peak (benchmarks/inference.py; MNIST example 53%); not measured on ARM"),
              "cuda": (0.25, "assumed for dlight's untuned GPU schedules (half the CPU figure); no GPU on "
                             "the build machine to measure it")}
CALL_OVERHEAD_MS = {"cpu": 0.02, "cuda": 0.05}


def estimate_latency_ms(target_name: str, device: str, macs: int) -> dict:
    """A latency figure ``{"value", "source": "estimated", "how"}`` (value None if the target has no
    calibration: a custom target)."""
    cal = PEAKS.get(target_name)
    eff, eff_basis = EFFICIENCY.get(device, EFFICIENCY["cpu"])
    if cal is None:
        return {"value": None, "source": "unmeasured",
                "how": f"no calibration for custom target {target_name}; measure it over TVM RPC (legoc profile --rpc)"}
    extra = CALL_OVERHEAD_MS.get(device, CALL_OVERHEAD_MS["cpu"]) - CALL_OVERHEAD_MS["cpu"]
    value = 2.0 * macs / (cal.peak_gflops * 1e9 * eff) * 1e3 + extra
    return {"value": value, "source": "estimated",
            "how": f"2 x MACs / ({cal.peak_gflops:g} GFLOP/s peak [{cal.basis}] x efficiency {eff:g} [{eff_basis}])"
                   + (f" + {extra:g} ms launch cost of a {device} call" if extra else "")
                   + "; the dispatch overhead of every call is counted once per segment by the combination estimate"}


def call_overhead_ms() -> dict:
    """The per-segment dispatch overhead of a board (the manifest's ``combination.call_overhead_ms``):
    added once per segment to a configuration's latency, never inside a module's figure (a GPU
    module's figure holds only the extra launch cost of a GPU call)."""
    return {"value": CALL_OVERHEAD_MS["cpu"], "source": "estimated",
            "how": "assumed per-call dispatch overhead on a board (Python, VM invoke)"}


@dataclass(frozen=True)
class Transfer:
    bandwidth_gb_s: float     # effective host<->device copy bandwidth (GB/s, 1e9 bytes)
    per_copy_ms: float        # fixed cost of one copy (driver call, synchronisation)
    basis: str


# Host<->device copies of a TVM cuda tensor on each Jetson (see the module docstring): estimated.
TRANSFERS = {
    "jetson-nano": Transfer(2.0, 0.05, "LPDDR4 25.6 GB/s peak shared by CPU and GPU; pageable cudaMemcpy"),
    "jetson-tx2": Transfer(4.0, 0.04, "LPDDR4 59.7 GB/s peak shared by CPU and GPU; pageable cudaMemcpy"),
    "jetson-xavier-nx": Transfer(5.0, 0.03, "LPDDR4x 51.2 GB/s peak shared by CPU and GPU; pageable cudaMemcpy"),
    "jetson-orin-nano": Transfer(6.0, 0.02, "LPDDR5 68 GB/s peak shared by CPU and GPU; pageable cudaMemcpy"),
}


def estimate_transfer(target_name: str) -> dict:
    """The copy-cost model of a GPU board: ``{"bandwidth_gb_s", "per_copy_ms", "source", "how"}``
    (values None and source ``unmeasured`` without a calibration: a custom target)."""
    cal = TRANSFERS.get(target_name)
    if cal is None:
        return {"bandwidth_gb_s": None, "per_copy_ms": None, "source": "unmeasured",
                "how": f"no transfer calibration for custom target {target_name}"}
    return {"bandwidth_gb_s": cal.bandwidth_gb_s, "per_copy_ms": cal.per_copy_ms, "source": "estimated",
            "how": f"{cal.per_copy_ms:g} ms per copy + bytes / {cal.bandwidth_gb_s:g} GB/s [{cal.basis}; "
                   "about a tenth of the DRAM peak, not measured]"}


def transfer_ms(model: dict, nbytes: int) -> float | None:
    """Milliseconds to copy ``nbytes`` between CPU and GPU under ``model`` (from
    :func:`estimate_transfer`; None if it has no figures)."""
    if model.get("bandwidth_gb_s") is None or model.get("per_copy_ms") is None:
        return None
    return float(model["per_copy_ms"]) + nbytes / (float(model["bandwidth_gb_s"]) * 1e9) * 1e3


def fit_latency(sums: list[float], measured: list[float], segments: int) -> tuple[float, float]:
    """(scale, per-segment overhead ms) fitting ``measured = scale * sums + segments * overhead``
    by least squares, where ``sums`` are the configurations' summed module latencies; scale kept
    within [0.5, 1.5] and overhead >= 0 (noise on a few points)."""
    import numpy as np

    a, b = np.asarray(sums, float), np.asarray(measured, float)
    if len(a) >= 2 and np.ptp(a) > 1e-9:
        scale, intercept = np.polyfit(a, b, 1)
    else:
        scale, intercept = 1.0, float(np.mean(b - a))
    scale = float(min(1.5, max(0.5, scale)))
    intercept = max(0.0, float(np.mean(b - scale * a)))   # refit the intercept after clamping
    return scale, intercept / max(1, segments)
