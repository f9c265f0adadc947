"""Measure the resident memory a configuration adds to a process (Linux).

    python -m legoc.runtime.memory ART --variants 0,2,4,1 [--calls 3]

prints one JSON line: ``{"peak_bytes": …, "resident_bytes": …, "baseline_bytes": …}``. It runs in a
fresh interpreter (``measure_in_subprocess``) so nothing else is loaded: after importing the
runtime and TVM and creating one tensor (the baseline), the kernel's peak-RSS mark is reset
(``/proc/self/clear_refs``), then the artifact is loaded, configured and run ``calls`` times;
``peak_bytes`` is the peak RSS since the reset minus the baseline, ``resident_bytes`` the RSS at the
end minus the baseline.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure_here(artifact: str, variants: list[int], calls: int = 3) -> dict:
    import tvm

    from legoc.runtime import load

    tvm.runtime.tensor(np.zeros(4, np.float32), tvm.cpu())
    base = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark (VmHWM)
    m = load(artifact).configure(variants=variants)
    xs = [np.zeros(s, np.float32) for s in m.input_shapes]
    for _ in range(calls):
        m(*xs)
    return {"peak_bytes": _status("VmHWM") - base, "resident_bytes": _status("VmRSS") - base, "baseline_bytes": base}


def measure_in_subprocess(artifact: str | Path, variants, calls: int = 3, env: dict | None = None) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "legoc.runtime.memory", str(artifact), "--variants", ",".join(map(str, variants)),
         "--calls", str(calls)], capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"memory measurement failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--variants", required=True, help="one variant index per block, comma-separated")
    ap.add_argument("--calls", type=int, default=3)
    args = ap.parse_args(argv)
    print(json.dumps(measure_here(args.artifact, [int(v) for v in args.variants.split(",")], args.calls)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
