"""The boards' power models: DVFS levels (MHz) and the board's power at each (idle and active
watts), every figure with its basis; and the format's checks (:class:`PowerModel`). How the
runtime estimates energy from it: legoc.runtime.energy. Light: no numpy, tvm or torch.

How the figures are made, board by board (each level's ``basis`` says which case it is):

* the clocks are levels the board's kernel offers (cpufreq ``scaling_available_frequencies``,
  devfreq ``available_frequencies``), a subset of four or fewer per device: each level is a
  decision of the solver, and its solve time grows with their number. A board owner can list
  others in a target JSON (``legoc targets`` shows the built-in JSON form).
* ``idle_w`` and the active power at the highest clock are published measurements or vendor
  figures (cited per board). ``idle_w`` is taken as the same at every clock (the measurements
  are at the default governor's idle clock).
* the active power at the other clocks is *interpolated*, not measured:
  ``active_w(f) = idle_w + (active_w(f_max) - idle_w) x (f / f_max)^2``. Dynamic power is C V^2 f;
  with the supply voltage held fixed it would scale as f, with the voltage proportional to the
  clock as f^3; the exponent 2 is an assumption between the two (DVFS tables lower the voltage
  with the clock, down to a floor).
* switching energy: ``switch_nj_per_byte = active_w(cpu, f_max) / 200 MB/s``: the board at full
  CPU power for as long as reading the bytes takes at the read rate the runtime assumes for
  boards (:data:`READ_BYTES_PER_S`, legoc.runtime.estimate's ASSUMED_LOAD_BYTES_PER_S). A derived
  upper bound, not measured.

Boards without a power model here (jetson-tx2, jetson-xavier-nx, jetson-orin-nano,
raspberry-pi-5, the host): no pair of idle and full-load figures that could be checked was at
hand when this table was written, so they have none rather than a guessed one; energy budgets
are refused for them with a one-line error until a board owner adds a ``power`` object to a
target JSON or measures (``python -m legoc.runtime.energy ART`` on the board). The host has no
power model either: this machine's energy can only be measured (RAPL; the build VM has none).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from legoc.errors import UserError

POWER_DEVICES = ("cpu", "gpu")
SYSFS_KINDS = ("cpufreq", "devfreq")
# The read rate the runtime assumes for boards' module files (legoc.runtime.estimate keeps the same
# figure as ASSUMED_LOAD_BYTES_PER_S; a test checks they agree): the switching energy's basis.
READ_BYTES_PER_S = 200e6


# ---------------------------------------------------------------------------------------------
# The power model


@dataclass(frozen=True)
class Level:
    """One DVFS level of a device: its clock and the board's power at it."""

    mhz: float
    idle_w: float
    active_w: float
    basis: str          # where the figures come from (a reference, or how they were derived)


@dataclass(frozen=True)
class DevicePower:
    levels: tuple[Level, ...]     # ascending clock
    reference_mhz: float          # the clock the latency figures assume; one of the levels
    sysfs: dict                   # how to set it: {"kind": "cpufreq", "policy": "policy0"} | {"kind": "devfreq", "node": ...}

    def level(self, mhz: float | None) -> Level:
        """The level at ``mhz`` (None: the reference level)."""
        want = self.reference_mhz if mhz is None else mhz
        found = self._by_mhz.get(want)    # the solver asks for the same few clocks many times
        if found is not None:
            return found
        for lv in self.levels:
            if math.isclose(lv.mhz, want, abs_tol=1e-6):
                return lv
        raise UserError(f"no DVFS level at {want:g} MHz; levels: {', '.join(f'{lv.mhz:g}' for lv in self.levels)}")

    @functools.cached_property
    def _by_mhz(self) -> dict:
        return {lv.mhz: lv for lv in self.levels}

    def ratio(self, mhz: float | None) -> float:
        """Latency at ``mhz`` over latency at the reference clock (compute-bound: f_ref / f)."""
        return 1.0 if mhz is None else self.reference_mhz / self.level(mhz).mhz

    @property
    def max_active_w(self) -> float:
        return max(lv.active_w for lv in self.levels)


@dataclass(frozen=True)
class PowerModel:
    """A board's power model (see the module docstring); built from JSON by :meth:`from_json`."""

    devices: dict                 # "cpu"/"gpu" -> DevicePower
    switch_nj_per_byte: float
    switch_basis: str
    references: tuple[str, ...]
    meter: dict | None = None     # how the board measures its power ({"kind": "ina3221", "rail": ...})

    @classmethod
    def from_json(cls, data, source: str = "power", prefix: str = "") -> "PowerModel":
        """Validate a ``power`` object; every mistake is a one-line UserError naming ``source``
        and the field (``prefix`` before its name, e.g. "power.")."""

        def bad(where: str, why: str) -> UserError:
            return UserError(f"{source}: field '{prefix}{where}' {why}")

        def number(value, where: str, positive: bool = True) -> float:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or (value <= 0 if positive else value < 0):
                raise bad(where, f"must be a {'positive ' if positive else 'non-negative '}number, got {value!r}")
            return float(value)

        if not isinstance(data, dict):
            raise UserError(f"{source}: field '{prefix.rstrip('.') or 'power'}' must be a JSON object with 'devices' and "
                            "'switch_nj_per_byte'")
        unknown = sorted(set(data) - {"devices", "switch_nj_per_byte", "switch_basis", "references", "meter"})
        if unknown:
            raise bad(unknown[0], "is not a power field (fields: devices, switch_nj_per_byte, switch_basis, "
                                  "references, meter)")
        devs = data.get("devices")
        if not isinstance(devs, dict) or "cpu" not in devs:
            raise bad("devices", 'must be an object with a "cpu" entry (and "gpu" for a Jetson)')
        out = {}
        for name, d in devs.items():
            where = f"devices.{name}"
            if name not in POWER_DEVICES:
                raise bad(where, f"is not a device ({', '.join(POWER_DEVICES)})")
            if not isinstance(d, dict) or not isinstance(d.get("levels"), list) or not d["levels"]:
                raise bad(f"{where}.levels", "must be a non-empty list of {mhz, idle_w, active_w, basis}")
            levels = []
            for k, lv in enumerate(d["levels"]):
                at = f"{where}.levels[{k}]"
                if not isinstance(lv, dict):
                    raise bad(at, "must be an object {mhz, idle_w, active_w, basis}")
                basis = lv.get("basis")
                if not isinstance(basis, str) or not basis.strip():
                    raise bad(f"{at}.basis", "must say where the figures come from (a reference)")
                levels.append(Level(number(lv.get("mhz"), f"{at}.mhz"), number(lv.get("idle_w"), f"{at}.idle_w"),
                                    number(lv.get("active_w"), f"{at}.active_w"), basis))
                if levels[-1].active_w < levels[-1].idle_w:
                    raise bad(f"{at}.active_w", f"({levels[-1].active_w:g} W) is below idle_w ({levels[-1].idle_w:g} W)")
            mhz = [lv.mhz for lv in levels]
            if mhz != sorted(mhz) or len(set(mhz)) != len(mhz):
                raise bad(f"{where}.levels", "must be in ascending mhz, each clock once")
            ref = number(d.get("reference_mhz"), f"{where}.reference_mhz")
            if not any(math.isclose(ref, m, abs_tol=1e-6) for m in mhz):
                raise bad(f"{where}.reference_mhz", f"({ref:g}) must be one of the levels ({', '.join(f'{m:g}' for m in mhz)})")
            sysfs = d.get("sysfs")
            if not isinstance(sysfs, dict) or sysfs.get("kind") not in SYSFS_KINDS \
                    or not isinstance(sysfs.get("policy" if sysfs.get("kind") == "cpufreq" else "node"), str):
                raise bad(f"{where}.sysfs", 'must be {"kind": "cpufreq", "policy": "policy0"} or '
                                            '{"kind": "devfreq", "node": "57000000.gpu"}')
            out[name] = DevicePower(tuple(levels), ref, dict(sysfs))
        basis = data.get("switch_basis", "")
        refs = data.get("references", [])
        if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
            raise bad("references", "must be a list of strings")
        meter = data.get("meter")
        if meter is not None and (not isinstance(meter, dict) or meter.get("kind") not in ("ina3221", "rapl")):
            raise bad("meter", 'must be null or {"kind": "ina3221", "rail": "POM_5V_IN"} or {"kind": "rapl"}')
        return cls(out, number(data.get("switch_nj_per_byte"), "switch_nj_per_byte", positive=False),
                   basis if isinstance(basis, str) else "", tuple(refs), meter)

    def to_json(self) -> dict:
        return {"devices": {name: {"reference_mhz": d.reference_mhz, "sysfs": dict(d.sysfs),
                                   "levels": [{"mhz": lv.mhz, "idle_w": lv.idle_w, "active_w": lv.active_w,
                                               "basis": lv.basis} for lv in d.levels]}
                            for name, d in self.devices.items()},
                "switch_nj_per_byte": self.switch_nj_per_byte, "switch_basis": self.switch_basis,
                "references": list(self.references), "meter": self.meter}

    def reference_levels(self) -> dict[str, float]:
        return {name: d.reference_mhz for name, d in self.devices.items()}

    def level_choices(self) -> list[dict[str, float]]:
        """Every assignment of one level per device (for brute force and bounds)."""
        import itertools

        names = list(self.devices)
        return [dict(zip(names, combo)) for combo in
                itertools.product(*[[lv.mhz for lv in self.devices[n].levels] for n in names])]

    def check_levels(self, levels: dict | None) -> dict[str, float | None]:
        """``levels`` (device -> MHz; missing devices at their reference) as a complete mapping;
        UserError for a device or clock the model does not have."""
        levels = dict(levels or {})
        for name in levels:
            if name not in self.devices:
                raise UserError(f"no DVFS levels for device '{name}'; the power model has {', '.join(self.devices)}")
        out = {}
        for name, d in self.devices.items():
            out[name] = d.level(levels.get(name)).mhz
        return out



# ---------------------------------------------------------------------------------------------
# The boards


INTERPOLATED = ("interpolated: idle_w + (active_w at {fmax:g} MHz - idle_w) x (f / {fmax:g})^2, an assumed "
                "exponent between fixed-voltage (f) and voltage-proportional (f^3) dynamic power")


def _device(mhz: list[float], idle_w: float, full_w: float, basis: str, sysfs: dict,
            reference_mhz: float | None = None) -> dict:
    """A device's entry: ``idle_w`` and ``full_w`` (active at the highest clock) from ``basis``,
    the other clocks interpolated (see the module docstring)."""
    fmax = max(mhz)
    levels = []
    for f in sorted(mhz):
        active = full_w if f == fmax else idle_w + (full_w - idle_w) * (f / fmax) ** 2
        how = basis if f == fmax else f"{INTERPOLATED.format(fmax=fmax)}; anchors: {basis}"
        levels.append({"mhz": f, "idle_w": idle_w, "active_w": round(active, 4), "basis": how})
    return {"reference_mhz": reference_mhz or fmax, "sysfs": sysfs, "levels": levels}


def _switch(devices: dict) -> tuple[float, str]:
    cpu = max(lv["active_w"] for lv in devices["cpu"]["levels"])
    return (round(cpu / READ_BYTES_PER_S * 1e9, 3),
            f"derived, not measured: the board at full CPU power ({cpu:g} W) for as long as the bytes take to read "
            f"at the assumed {READ_BYTES_PER_S / 1e6:g} MB/s (legoc.runtime.estimate.ASSUMED_LOAD_BYTES_PER_S)")


def _board(devices: dict, references: list[str], meter: dict | None) -> dict:
    nj, basis = _switch(devices)
    return {"devices": devices, "switch_nj_per_byte": nj, "switch_basis": basis, "references": references,
            "meter": meter}


# --- NVIDIA Jetson Nano (4x Cortex-A57, 128-core Maxwell GPU; L4T R32 / JetPack 4.6) ------------
_NANO_MODES = ("NVIDIA L4T 32.1 Development Guide, 'Power Management for Jetson Nano Devices', Supported Modes: "
               "MAXN = 10 W budget with 4 CPUs at up to 1479 MHz and the GPU at up to 921.6 MHz; 5W mode = 2 CPUs at "
               "up to 918 MHz, GPU up to 640 MHz")
_NANO_IDLE = ("approximation from one published tegrastats line of a near-idle Jetson Nano (JetPack 4.6.1; CPUs 3-6% "
              "busy at 1224 MHz, GPU 0%): POM_5V_IN 1750 mW now / 1628 mW average, i.e. the module's input rail "
              "(not the carrier board) at about 1.6 W")
_NANO_SPLIT = ("approximation from the vendor budget, not a measurement: the 10 W MAXN budget minus the 1.6 W idle, "
               "split evenly between a fully busy CPU and a fully busy GPU (4.2 W each above idle); cross-check: the "
               "same model puts the 5W mode (2 of 4 cores at 918 MHz, GPU at 640 MHz) at 4.4 W, within its 5 W budget")
_NANO = _board({
    # cpufreq offers 102..1479 MHz (15 levels); these four: 5W mode's cap (918 -> 921.6), and between
    "cpu": _device([614.4, 921.6, 1224.0, 1479.0], 1.6, 5.8, f"idle: {_NANO_IDLE}; active at 1479 MHz: {_NANO_SPLIT}",
                   {"kind": "cpufreq", "policy": "policy0"}),
    # devfreq offers 76.8..921.6 MHz in 76.8 MHz steps; these four: every third
    "gpu": _device([230.4, 460.8, 691.2, 921.6], 1.6, 5.8, f"idle: {_NANO_IDLE}; active at 921.6 MHz: {_NANO_SPLIT}",
                   {"kind": "devfreq", "node": "57000000.gpu"}),
}, [_NANO_MODES, "levels: L4T R32 cpufreq scaling_available_frequencies (102000..1479000 kHz) and "
                 "/sys/devices/57000000.gpu/devfreq/57000000.gpu/available_frequencies (76800000..921600000 Hz)",
    "the CPU latency estimates (legoc.targets.calibration) use the marketed 1.43 GHz; they are taken here as the "
    "1479 MHz reference level (3% apart)"],
    {"kind": "ina3221", "rail": "POM_5V_IN"})

# --- Raspberry Pi 4 Model B (4x Cortex-A72 at 1.5 GHz) ---------------------------------------------
_PI4 = ("Pi Dramble power consumption benchmarks (J. Geerling, pidramble.com/wiki/benchmarks/power-consumption), "
        "Raspberry Pi 4 Model B at the board's USB-C input: idle 540 mA (2.7 W), 400% CPU load (stress --cpu 4) "
        "1280 mA (6.4 W)")
_PI4_BOARD = _board({
    "cpu": _device([600.0, 1000.0, 1200.0, 1500.0], 2.7, 6.4, _PI4, {"kind": "cpufreq", "policy": "policy0"}),
}, [_PI4, "levels: raspberrypi-cpufreq on Linux 5.10 and later offers 600..1500 MHz in 100 MHz steps (older kernels: "
          "600/750/1000/1500); arm_freq_min 600, arm_freq 1500 (Raspberry Pi config.txt documentation)",
    "Raspberry Pi documentation, power supply table: typical bare-board active current 600 mA (about 3 W), between "
    "the two measurements above"], None)

# --- Raspberry Pi 3 Model B (4x Cortex-A53 at 1.2 GHz) ---------------------------------------------
_PI3 = ("Pi Dramble power consumption benchmarks (J. Geerling, pidramble.com/wiki/benchmarks/power-consumption), "
        "Raspberry Pi 3 Model B: idle 260 mA (1.4 W), 400% CPU load (stress --cpu 4) 730 mA (3.7 W) (these two "
        "figures were not re-checked against the page when entered)")
_PI3_BOARD = _board({
    "cpu": _device([600.0, 1200.0], 1.4, 3.7, _PI3, {"kind": "cpufreq", "policy": "policy0"}),
}, [_PI3, "levels: the Pi 3 B firmware's two clocks, arm_freq_min 600 and arm_freq 1200 (config.txt documentation)",
    "Raspberry Pi documentation, power supply table: typical bare-board active current 400 mA (about 2 W)"], None)

# board name -> power object (legoc.runtime.energy.PowerModel.from_json reads it)
POWER: dict[str, dict] = {
    "jetson-nano": _NANO,
    "raspberry-pi-3": _PI3_BOARD,
    "raspberry-pi-4": _PI4_BOARD,
}


def power_of(board: str) -> dict | None:
    """A copy of the board's power object (None: no power model for it)."""
    import copy

    return copy.deepcopy(POWER.get(board))


def cpu_only(power: dict | None) -> dict | None:
    """The power object of a GPU board's CPU alone (``NAME:cpu`` targets): its CPU levels only."""
    if power is None:
        return None
    import copy

    out = copy.deepcopy(power)
    out["devices"] = {"cpu": out["devices"]["cpu"]}
    return out
