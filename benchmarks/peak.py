"""This machine's fp32 peak: measured (numpy sgemm) and theoretical (FMA units x lanes x clock).

    .venv/bin/python benchmarks/peak.py [--threads 2] [--runs 10] [--json]

The basis every GFLOP/s of ``benchmarks/inference.py`` and the README is stated against.

* **measured**: numpy's sgemm 2048^3 on ``--threads`` threads, median of ``--runs`` calls, in a
  subprocess of its own whose environment has ``OPENBLAS_CORETYPE`` and ``OPENBLAS_L2_SIZE``
  removed: some machines set them machine-wide (``OPENBLAS_CORETYPE=Haswell``), which forces an
  AVX2 kernel onto an AVX-512 CPU and halves the figure. Only that subprocess changes; tests and
  CI keep the variables as they are. threadpoolctl reports the OpenBLAS kernel it ran
  ("SkylakeX": AVX-512; "Haswell", "Zen": AVX2), so the basis says what reached it.
* **theoretical**: cores x FMA units x fp32 lanes per FMA x 2 flops x clock, read from
  /proc/cpuinfo. Assumptions, printed with the figure: 2 FMA units per core (every x86 core
  since Haswell/Zen 1); lanes from the widest vector flag (avx512f: 16, avx2/fma: 8, else 4),
  except AMD Zen 4 (family 0x19, model >= 0x10), whose AVX-512 instructions run on 256-bit
  units (8 lanes); the clock is "cpu MHz", which a VM reports as its nominal clock, not turbo,
  so the true ceiling can be higher than this figure.
* **memory bandwidth** (``--bandwidth``, and :func:`copy_bandwidth` for other benchmarks): one
  thread copying 64 MB with numpy (read + write counted), best of 20 copies: the bound a
  memory-bound kernel (a depthwise conv) is compared with. One thread, because legoc's
  single-thread kernel timings are what it bounds.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass

UNSET = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
FMA_UNITS = 2

_CHILD = r"""
import json, statistics, sys, time
import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

n, runs, threads = (int(v) for v in sys.argv[1:4])
rng = np.random.default_rng(0)
a = rng.random((n, n), dtype=np.float32)
b = rng.random((n, n), dtype=np.float32)
with threadpool_limits(threads, user_api="blas"):
    for _ in range(2):
        a @ b
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
blas = [i for i in threadpool_info() if i.get("user_api") == "blas"]
print(json.dumps({"gflops": [2 * n ** 3 / t / 1e9 for t in times],
                  "kernel": blas[0].get("architecture", "?") if blas else "?",
                  "library": blas[0].get("internal_api", "?") if blas else "?"}))
"""


@dataclass
class Peak:
    measured_gflops: float  # median of the runs
    measured_min: float
    measured_max: float
    kernel: str             # OpenBLAS kernel (threadpoolctl "architecture")
    library: str
    threads: int
    theoretical_gflops: float
    theoretical_basis: str  # the arithmetic and its assumptions, one line

    def describe(self) -> str:
        return (f"measured {self.measured_gflops:.0f} GFLOP/s (numpy sgemm 2048³, {self.threads} threads, "
                f"{self.library} {self.kernel} kernel, runs {self.measured_min:.0f}–{self.measured_max:.0f}); "
                f"theoretical {self.theoretical_gflops:.0f} GFLOP/s ({self.theoretical_basis})")


def measure_sgemm(threads: int = 2, runs: int = 10, n: int = 2048) -> dict:
    """numpy sgemm in a subprocess with the OpenBLAS overrides removed from its environment."""
    env = {k: v for k, v in os.environ.items() if k not in UNSET}
    env["OPENBLAS_NUM_THREADS"] = env["OMP_NUM_THREADS"] = str(threads)
    out = subprocess.run([sys.executable, "-c", _CHILD, str(n), str(runs), str(threads)], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cpuinfo() -> dict:
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if ":" in line:
                    key, value = (s.strip() for s in line.split(":", 1))
                    info.setdefault(key, value)  # first processor's entry
    except OSError:
        pass
    return info


def theoretical(cores: int) -> tuple[float, str]:
    """(GFLOP/s, the arithmetic with its assumptions) for ``cores`` cores of this CPU."""
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    if "avx512f" in flags:
        lanes, isa = 16, "AVX-512"
        if info.get("vendor_id") == "AuthenticAMD" and info.get("cpu family") == "25" \
                and int(info.get("model", "0")) >= 0x10:
            lanes, isa = 8, "AVX-512 on Zen 4's 256-bit units"
    elif "fma" in flags and "avx2" in flags:
        lanes, isa = 8, "AVX2+FMA"
    else:
        lanes, isa = 4, "SSE (no FMA flag: counted as fused anyway)"
    mhz = float(info.get("cpu MHz", "0") or 0)
    if not mhz:
        return 0.0, f"no clock in /proc/cpuinfo ({platform.machine()})"
    gflops = cores * FMA_UNITS * lanes * 2 * mhz / 1e3
    return gflops, (f"{cores} cores x {FMA_UNITS} FMA units x {lanes} lanes ({isa}) x 2 flops x "
                    f"{mhz / 1e3:.2f} GHz reported clock; {info.get('model name', '?')}")


def copy_bandwidth(mbytes: int = 64, runs: int = 20) -> tuple[float, float]:
    """(best, median) GB/s of one thread copying ``mbytes`` MB (bytes read plus bytes written)."""
    import statistics  # noqa: PLC0415
    import time  # noqa: PLC0415

    import numpy as np  # noqa: PLC0415

    src = np.ones(mbytes * 2 ** 20 // 4, dtype=np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)   # pages touched before timing
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    moved = 2 * src.nbytes / 1e9
    return moved / min(times), moved / statistics.median(times)


def peak(threads: int = 2, runs: int = 10) -> Peak:
    m = measure_sgemm(threads, runs)
    g = sorted(m["gflops"])
    median = g[len(g) // 2] if len(g) % 2 else (g[len(g) // 2 - 1] + g[len(g) // 2]) / 2
    theo, basis = theoretical(threads)
    return Peak(median, g[0], g[-1], m["kernel"], m["library"], threads, theo, basis)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--bandwidth", action="store_true", help="also one thread's copy bandwidth")
    args = ap.parse_args()
    p = peak(args.threads, args.runs)
    print(json.dumps(asdict(p), indent=1) if args.json else p.describe())
    if args.bandwidth:
        best, median = copy_bandwidth()
        print(f"memory: one thread copies {best:.1f} GB/s (best of 20 copies of 64 MB, read + write; median {median:.1f})")


if __name__ == "__main__":
    main()
