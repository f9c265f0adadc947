"""Energy per inference: a board's power model (DVFS levels and watts), the estimation rule, and
the meters that measure it instead (RAPL here, INA3221 rails on a Jetson).

Torch-free (runs on the device). A board's power model travels in its target's ``power`` field
(legoc.targets.power: the format, its checks and the built-in boards' figures; a ``"power"``
object in a custom target's JSON), so an artifact's manifest carries the model it was compiled
with (``manifest["target"]["power"]``)::

    {"devices": {"cpu": {"reference_mhz": 1479, "sysfs": {"kind": "cpufreq", "policy": "policy0"},
                         "levels": [{"mhz": 614.4, "idle_w": 1.6, "active_w": 2.33, "basis": "..."}, ...]},
                 "gpu": {...}},
     "switch_nj_per_byte": 29.0, "switch_basis": "...", "references": ["..."],
     "meter": {"kind": "ina3221", "rail": "POM_5V_IN"}}

``active_w`` is the board's power while that device is busy at that clock (the other idles), so
power x time is the board's energy; ``idle_w`` its power with nothing running at that clock.
``reference_mhz`` is the clock the artifact's latency figures assume (the board's maximum: the
estimates use the published peak clock, and ``legoc profile --rpc`` should run with the clocks
at maximum, e.g. ``sudo jetson_clocks``).

The estimation rule (source ``estimated``), for one call of a module on device ``d`` at clock ``f``:

* latency ``t(f) = t_ref x f_ref / f``: the module is taken as compute-bound, every cycle of it
  scales with the clock. A memory-bound module slows down less at a lower clock, so for it t(f)
  (and the energy below) are upper bounds; modelling memory-bound scaling is out of scope.
* energy ``E(f) = active_w(d, f) x t(f)`` (W x ms = mJ).
* a configuration: the sum over its segments, plus the runtime's per-segment dispatch overhead
  (Python on the CPU: scaled like a compute-bound module, at the CPU's active power) plus the
  CPU<->GPU copies (memory-bound: their time is not scaled; charged at the CPU's highest active
  power, an upper bound).
* switching: the bytes of the modules and weights a switch loads x ``switch_nj_per_byte``.

Measured figures replace the estimate where a board or this machine has a power meter: a
variant's ``profile.energy_mj = {"value": mJ per call, "source": "measured-local" |
"measured-rpc", "how": ..., "mhz": clock it was measured at}``. At other clocks a measured figure
is scaled by the power model (``E x active_w(f) t(f) / (active_w(f_ref) t_ref)``), and the result
is an estimate again. Meters:

* :class:`Rapl`: Intel/AMD RAPL package energy counters under ``/sys/class/powercap`` (this
  machine, ``measured-local``; the build VM has none, so energy is unavailable on the host).
* :class:`Ina3221`: a Jetson's INA3221 power monitors, one rail per channel (POM_5V_IN is the
  Jetson Nano module's input, VDD_IN the Xavier's/Orin's), sampled while modules run; in sysfs as
  ``/sys/bus/i2c/drivers/ina3221x/*/iio:device*/rail_name_N`` + ``in_power N_input`` (mW; L4T
  R32) or ``/sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*/inN_label`` + ``inN_input`` (mV) x
  ``currN_input`` (mA) (L4T R35 and later). ``python -m legoc.runtime.energy ART`` runs on the
  board, measures every module of ART there and writes the figures into its manifest as
  ``measured-rpc`` (copy the artifact back, or run it on the board the artifact already lives on).

Every path below takes the sysfs root as a parameter, so tests run them on a fake tree.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from legoc.errors import UserError
from legoc.targets.power import DevicePower, Level, PowerModel  # noqa: F401 - re-exported

MEASURED = ("measured-local", "measured-rpc")


# ---------------------------------------------------------------------------------------------
# The power model (its format and checks live with the boards' data, legoc.targets.power)


def power_model_of(manifest: dict) -> PowerModel | None:
    """The power model recorded with the artifact's target (None: its target has none)."""
    data = (manifest.get("target") or {}).get("power")
    if data is None:
        return None
    return PowerModel.from_json(data, source=f"manifest target {manifest['target'].get('name')} power")


def energy_figure(entry: dict) -> dict | None:
    """A variant entry's measured energy figure (None if it has none)."""
    fig = (entry.get("profile") or {}).get("energy_mj")
    if not fig or fig.get("value") is None or fig.get("source") not in MEASURED:
        return None
    return fig


# ---------------------------------------------------------------------------------------------
# Meters: RAPL (this machine) and INA3221 (a Jetson)


def _read(path: Path, what: str) -> str:
    try:
        return path.read_text().strip()
    except PermissionError:
        raise UserError(f"{path}: permission denied reading {what}; grant it with `sudo chmod a+r {path}` "
                        "(or run as root)") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read {what} ({exc.strerror or exc})") from None


@dataclass(frozen=True)
class Sample:
    """One measurement: energy per call and what it came from."""

    mj_per_call: float
    mean_w: float
    seconds: float
    calls: int


class Rapl:
    """RAPL energy counters under ``ROOT/sys/class/powercap``: the ``psys`` (platform) domain if
    there is one, else the sum of the ``package-N`` domains. Counters are microjoules and wrap at
    ``max_energy_range_uj``."""

    def __init__(self, root: str | os.PathLike = "/"):
        self.base = Path(root) / "sys/class/powercap"
        zones = sorted(p for p in self.base.glob("intel-rapl:*") if p.name.count(":") == 1) if self.base.is_dir() else []
        names = {z: (z / "name").read_text().strip() if (z / "name").is_file() else "" for z in zones}
        psys = [z for z in zones if names[z] == "psys"]
        self.zones = psys or [z for z in zones if names[z].startswith("package")]

    def available(self) -> bool:
        return bool(self.zones)

    def why_not(self) -> str:
        return (f"no RAPL package counters under {self.base} (this machine exposes no power meter to Linux; "
                "a VM usually does not)")

    def read(self) -> list[int]:
        if not self.zones:
            raise UserError(self.why_not())
        return [int(_read(z / "energy_uj", "the RAPL energy counter")) for z in self.zones]

    def ranges(self) -> list[int]:
        return [int(_read(z / "max_energy_range_uj", "the RAPL counter range")) for z in self.zones]

    def measure(self, run: Callable[[], object], calls: int) -> Sample:
        """Energy per call of ``run`` over ``calls`` calls (counter difference, wraps handled)."""
        ranges = self.ranges()
        e0, t0 = self.read(), time.perf_counter()
        for _ in range(calls):
            run()
        e1, t1 = self.read(), time.perf_counter()
        uj = sum((b - a) % r if b < a else b - a for a, b, r in zip(e0, e1, ranges))
        seconds = t1 - t0
        if uj <= 0:
            raise UserError(f"the RAPL counters under {self.base} did not advance over {calls} calls; "
                            "they are not usable here")
        return Sample(uj / 1e3 / calls, uj / 1e6 / seconds if seconds > 0 else 0.0, seconds, calls)


class Ina3221:
    """A Jetson's INA3221 power monitors under ``ROOT/sys/bus/i2c/drivers`` (both sysfs layouts,
    see the module docstring): :meth:`rails` reads every rail's power in watts."""

    def __init__(self, root: str | os.PathLike = "/", rail: str | None = None):
        self.base = Path(root) / "sys/bus/i2c/drivers"
        self.rail = rail            # the rail :meth:`measure` reads (None: the module's input rail)
        self.channels: dict[str, Callable[[], float]] = {}
        for dev in sorted(self.base.glob("ina3221x/*/iio:device*")):          # L4T R32 (iio)
            for name_file in sorted(dev.glob("rail_name_*")):
                k = name_file.name.rsplit("_", 1)[1]
                rail = name_file.read_text().strip()
                self.channels[rail] = lambda p=dev / f"in_power{k}_input": float(_read(p, "an INA3221 rail")) / 1e3
        for dev in sorted(self.base.glob("ina3221/*/hwmon/hwmon*")):          # L4T R35+ (hwmon)
            for label in sorted(dev.glob("in*_label")):
                k = label.name[2:-len("_label")]
                rail = label.read_text().strip()
                if rail.upper().startswith("NC"):   # an unconnected channel
                    continue
                self.channels[rail] = lambda v=dev / f"in{k}_input", c=dev / f"curr{k}_input": (
                    float(_read(v, "an INA3221 voltage")) * float(_read(c, "an INA3221 current")) / 1e6)

    def available(self) -> bool:
        return bool(self.channels)

    def why_not(self) -> str:
        return f"no INA3221 power monitor under {self.base} (not a Jetson, or its driver is not loaded)"

    def rails(self) -> dict[str, float]:
        if not self.channels:
            raise UserError(self.why_not())
        return {rail: read() for rail, read in self.channels.items()}

    def total_rail(self, rail: str | None = None) -> str:
        """The rail that measures the whole module: ``rail`` if given, else POM_5V_IN or VDD_IN."""
        names = list(self.channels)
        for want in ([rail] if rail else ["POM_5V_IN", "VDD_IN"]):
            if want in names:
                return want
        raise UserError(f"no INA3221 rail {rail or 'POM_5V_IN or VDD_IN'} under {self.base}; rails: {', '.join(names)}")

    def measure(self, run: Callable[[], object], calls: int, rail: str | None = None,
                interval_s: float = 0.005) -> Sample:
        """Energy per call of ``run``: the rail's mean power, sampled every ``interval_s`` in a
        thread while ``calls`` calls run, times their wall time. (The INA3221 averages over a few
        ms itself, so runs should last well beyond that.)"""
        read = self.channels[self.total_rail(rail or self.rail)]
        samples, stop = [read()], threading.Event()

        def sample():
            while not stop.wait(interval_s):
                samples.append(read())

        thread = threading.Thread(target=sample, daemon=True)
        t0 = time.perf_counter()
        thread.start()
        try:
            for _ in range(calls):
                run()
        finally:
            stop.set()
            thread.join()
        seconds = time.perf_counter() - t0
        samples.append(read())
        mean_w = sum(samples) / len(samples)
        return Sample(mean_w * seconds * 1e3 / calls, mean_w, seconds, calls)


def meter_for(power: PowerModel | None, root: str | os.PathLike = "/"):
    """The power meter this machine has: a Jetson's INA3221 if it is there (measuring the rail the
    power model names, else the module's input rail), else RAPL if readable; None without one."""
    ina = Ina3221(root, rail=((power.meter or {}).get("rail") if power is not None else None))
    if ina.available():
        return ina
    rapl = Rapl(root)
    return rapl if rapl.available() else None


# ---------------------------------------------------------------------------------------------
# Measuring an artifact's modules


def measure_modules(path: str | os.PathLike, meter, *, source: str, min_seconds: float = 0.2,
                    manifest: dict | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Every module of the artifact at ``path`` (each variant of each segment, on the target's own
    device) run on this machine under ``meter`` until ``min_seconds`` have passed; returns the
    manifest (``manifest``, or the artifact's) with ``profile.energy_mj`` set to the measured
    figure (``source``: "measured-local" or "measured-rpc")."""
    import copy

    import numpy as np
    import tvm

    from legoc.runtime.artifact import read_manifest
    from legoc.runtime.manifest import ManifestView
    from legoc.runtime.modules import Executable, WeightFiles

    path = Path(path)
    manifest = copy.deepcopy(manifest if manifest is not None else read_manifest(path))
    view = ManifestView(manifest)
    dev = tvm.cpu() if (manifest.get("target") or {}).get("device") != "cuda" else tvm.cuda(0)
    power = power_model_of(manifest)
    own = "gpu" if (manifest.get("target") or {}).get("device") == "cuda" else "cpu"
    rng = np.random.default_rng(0)
    weights = WeightFiles(path)
    kind = type(meter).__name__
    for seg, raw in zip(view.segments, manifest["segments"]):
        args = [tvm.runtime.tensor(rng.standard_normal(raw["tensors"][n]["shape"]).astype(
            raw["tensors"][n].get("dtype", "float32")), dev) for n in seg.inputs]
        for var, entry in zip(seg.variants, raw["variants"]):
            exe = Executable(path, seg, var, dev, weights)
            exe.main(*args, *exe.params)   # load and warm
            calls, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < min_seconds / 10 or calls < 3:   # calls for about a tenth
                exe.main(*args, *exe.params)
                calls += 1
            per = max((time.perf_counter() - t0) / calls, 1e-6)
            got = meter.measure(lambda: exe.main(*args, *exe.params), max(3, int(min_seconds / per)))
            mhz = power.devices[own].reference_mhz if power is not None and own in power.devices else None
            entry["profile"]["energy_mj"] = {
                "value": got.mj_per_call, "source": source, "mhz": mhz,
                "how": f"{kind} over {got.calls} calls ({got.seconds:.2f} s, mean {got.mean_w:.2f} W): the whole "
                       f"{'board' if kind == 'Ina3221' else 'package'}'s energy per call, idle power included"}
            if log:
                log(f"{seg.name}/{var.id}: {got.mj_per_call:.4f} mJ per call ({got.mean_w:.2f} W)")
            del exe
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m legoc.runtime.energy ART [--sysfs ROOT] [--seconds S] [--rapl] [--print]``: on
    the board, measure every module of ART with the board's meter and write the figures into ART's
    manifest (``--print``: print them as JSON instead; ``--rapl``: RAPL only, as ``legoc compile``
    uses it, in a process of its own so the compiler's threads do not burn power meanwhile)."""
    import argparse
    import json
    import sys

    from legoc.runtime.artifact import read_manifest

    ap = argparse.ArgumentParser(prog="python -m legoc.runtime.energy", description=main.__doc__.split(":")[0])
    ap.add_argument("artifact")
    ap.add_argument("--sysfs", default="/", help="root of the sysfs tree (default /)")
    ap.add_argument("--seconds", type=float, default=0.2, help="measuring time per module (default 0.2)")
    ap.add_argument("--rapl", action="store_true", help="use RAPL only")
    ap.add_argument("--print", action="store_true", help="print the figures as JSON; leave the manifest as it is")
    args = ap.parse_args(argv)
    try:
        manifest = read_manifest(args.artifact)
        meter = Rapl(args.sysfs) if args.rapl else meter_for(power_model_of(manifest), args.sysfs)
        if meter is None or not meter.available():
            raise UserError(f"no power meter on this machine: {Ina3221(args.sysfs).why_not()}; "
                            f"{Rapl(args.sysfs).why_not()}")
        runs_here = bool((manifest.get("target") or {}).get("runs_here"))
        out = measure_modules(args.artifact, meter, source="measured-local" if runs_here else "measured-rpc",
                              min_seconds=args.seconds, manifest=manifest, log=lambda m: print(f"  {m}", file=sys.stderr))
        if args.print:
            print(json.dumps({f"{s['name']}:{k}": v["profile"]["energy_mj"]
                              for s in out["segments"] for k, v in enumerate(s["variants"])}))
            return 0
        from legoc.targets.rpc import write_manifest

        write_manifest(Path(args.artifact), out)
    except UserError as exc:
        print(f"legoc: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"measured every module of {args.artifact} with {type(meter).__name__}; manifest updated")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
