"""measure-load: every variant's switch-in time (``profile.load_ms``), the cost the runtime pays
to swap it in.

Where the target runs here and the compile validates (``config.validate``), measured as
legoc.runtime does it: verify checksums, read the weights, load the library, create the VM, copy
the weights. For a board, estimated from the bytes to read at an assumed storage speed.
"""
from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING

from legoc.passes.backend.stage import BackendStage
from legoc.passes.infra import PassResult, ProgramState

if TYPE_CHECKING:
    from legoc.pipeline import CompileConfig

LOAD_REPEAT = 3   # loads per variant; the median is recorded


class MeasureLoad(BackendStage):
    """Sets ``profile.load_ms`` of every variant (measured only with ``config.validate``)."""

    name = "measure-load"

    def call(self, state: ProgramState, config: CompileConfig) -> PassResult:
        if state.target.runs_here and not config.validate:
            return PassResult(state, False)
        manifest = copy.deepcopy(state.manifest)
        if state.target.runs_here:
            _measure(manifest, state.artifact.draft(manifest))
        else:
            _estimate(manifest)
        return PassResult(state.replace(manifest=manifest), True)


def _measure(manifest: dict, draft: Path) -> None:
    import tvm

    from legoc.runtime.model import Model
    from legoc.runtime.modules import Executable, WeightFiles

    model = Model(draft)
    dev = tvm.cpu()
    for seg in model.segments:
        for var in seg.variants:
            times = []
            for _ in range(LOAD_REPEAT):
                t0 = time.perf_counter()
                exe = Executable(draft, seg, var, dev, WeightFiles(draft))
                times.append((time.perf_counter() - t0) * 1e3)
                del exe
            entry = next(s for s in manifest["segments"] if s["name"] == seg.name)["variants"][var.index]
            entry["profile"]["load_ms"] = {"value": statistics.median(times), "source": "measured-local",
                                           "how": "legoc.runtime switch-in: checksums, read weights, load library, "
                                                  f"create VM, copy weights; median of {LOAD_REPEAT}"}


def _estimate(manifest: dict) -> None:
    from legoc.runtime.estimate import ASSUMED_LOAD_BYTES_PER_S, variant_cost

    for seg in manifest["segments"]:
        for v in seg["variants"]:
            ms = variant_cost(v).load_bytes / ASSUMED_LOAD_BYTES_PER_S * 1e3
            v["profile"]["load_ms"] = {"value": ms, "source": "estimated",
                                       "how": f"module and weight bytes read at an assumed "
                                              f"{ASSUMED_LOAD_BYTES_PER_S / 1e6:.0f} MB/s (board storage)"}
