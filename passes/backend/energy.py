"""measure-energy: every module's energy where this machine can measure it, and a note of why
not where it cannot.

Energy is otherwise estimated at load time from the latency figures and the target's power
model, which the manifest carries with its target (legoc.runtime.energy states the rule), so it
follows the latencies whatever measures them later (``legoc profile --rpc``). Where the target
runs here and this machine has RAPL counters (``/sys/class/powercap``), each module is run under
them, in a process of its own (``python -m legoc.runtime.energy --rapl --print``), and its figure
recorded as ``profile.energy_mj`` with source ``measured-local``. The
manifest's ``energy_meter`` says which meter was used, or why none was (the build VM has none:
the host then has no energy figures, and an energy budget is refused with that reason). A board
measures itself: ``python -m legoc.runtime.energy ART`` on it (``measured-rpc``).
"""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING

from legoc.passes.backend.stage import BackendStage
from legoc.passes.infra import PassResult, ProgramState

if TYPE_CHECKING:
    from legoc.pipeline import CompileConfig

SYSFS_ROOT = "/"   # where the meters are looked for (tests: a fake tree)


class MeasureEnergy(BackendStage):
    """Sets ``energy_meter`` and, with a meter here, every module's ``profile.energy_mj``."""

    name = "measure-energy"

    def call(self, state: ProgramState, config: CompileConfig) -> PassResult:
        from legoc.runtime.energy import Rapl

        manifest = copy.deepcopy(state.manifest)
        if not state.target.runs_here:
            manifest["energy_meter"] = {"meter": None, "why": f"{state.target.name} is measured on the board: "
                                                              "`python -m legoc.runtime.energy ART` there"}
            return PassResult(state.replace(manifest=manifest), True)
        rapl = Rapl(SYSFS_ROOT)
        if not rapl.available():
            manifest["energy_meter"] = {"meter": None, "why": rapl.why_not()}
            return PassResult(state.replace(manifest=manifest), True)
        if not config.validate:
            manifest["energy_meter"] = {"meter": None, "why": "compiled without measurements (validate off)"}
            return PassResult(state.replace(manifest=manifest), True)
        measured, why = _measure(state.artifact.draft(manifest))
        if measured is None:   # counters that cannot be read or do not move: no figures, and why
            manifest["energy_meter"] = {"meter": None, "why": why}
            return PassResult(state.replace(manifest=manifest), True)
        for s in manifest["segments"]:
            for k, v in enumerate(s["variants"]):
                v["profile"]["energy_mj"] = measured[f"{s['name']}:{k}"]
        manifest["energy_meter"] = {"meter": "rapl", "why": None, "zones": [z.name for z in rapl.zones]}
        return PassResult(state.replace(manifest=manifest), True)


def _measure(draft) -> tuple[dict | None, str | None]:
    """Every module's figure measured by ``python -m legoc.runtime.energy --rapl --print`` in a
    process of its own (a compiler process has torch's threads spinning, which RAPL would count):
    (figures by "segment:index", None) or (None, why not)."""
    import json
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "legoc.runtime.energy", str(draft), "--sysfs", SYSFS_ROOT,
                           "--rapl", "--print"], capture_output=True, text=True, timeout=1800, env=dict(os.environ))
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        return None, (lines[-1].removeprefix("legoc: error: ") if lines else f"exit {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), None
