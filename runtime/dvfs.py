"""Setting the DVFS levels a selection chose (``Selection.levels``: device -> MHz) on the board,
through the kernel's standard interfaces, and reading back what took effect.

* CPU (cpufreq, ``/sys/devices/system/cpu/cpufreq/<policy>/``): with the ``userspace`` governor
  available, ``scaling_governor = userspace`` then ``scaling_setspeed = kHz``; otherwise the clock
  is pinned by ``scaling_min_freq`` and ``scaling_max_freq`` (written in the order that keeps
  min <= max at every step).
* Jetson GPU (devfreq, ``/sys/class/devfreq/<node>/``, e.g. ``57000000.gpu`` on a Nano): pinned by
  ``min_freq`` and ``max_freq`` in Hz, in the same order (what ``jetson_clocks`` does).

A clock the kernel does not offer (``scaling_available_frequencies`` / ``available_frequencies``)
is refused before anything is written. After writing, the current clock is read back
(``scaling_cur_freq`` / ``cur_freq``): a thermal limit or the Jetson's ``nvpmodel`` power mode
can cap it below the request, and :class:`Applied` says so. Writing needs root: a permission
error is one line with the command that grants it. ``dry_run`` returns the writes (and
:func:`commands` prints them as shell lines) without touching anything.

The sysfs root is a parameter (default ``/``), so tests run everything on a fake tree.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from legoc.errors import UserError
from legoc.runtime.energy import PowerModel


@dataclass(frozen=True)
class Write:
    path: Path
    value: str


@dataclass(frozen=True)
class Applied:
    """One device's clock after :func:`apply`: what was asked and what the kernel reports."""

    device: str
    wanted_mhz: float
    current_mhz: float | None    # None: the kernel has no current-clock file to read back
    writes: tuple[Write, ...]

    @property
    def took_effect(self) -> bool:
        return self.current_mhz is not None and math.isclose(self.current_mhz, self.wanted_mhz, rel_tol=1e-3)


def _dir(root: Path, device: str, sysfs: dict) -> Path:
    if sysfs["kind"] == "cpufreq":
        return root / "sys/devices/system/cpu/cpufreq" / sysfs["policy"]
    return root / "sys/class/devfreq" / sysfs["node"]


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return None
    except PermissionError:
        raise UserError(f"{path}: permission denied reading it; run as root") from None


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _pin(base: Path, lo: str, hi: str, value: int) -> list[Write]:
    """Writes that set both ``lo`` and ``hi`` to ``value`` keeping lo <= hi throughout."""
    cur_hi = _read(base / hi)
    order = [hi, lo] if cur_hi is not None and value > int(cur_hi) else [lo, hi]
    return [Write(base / name, str(value)) for name in order]


def plan(power: PowerModel, levels: dict, root: str | os.PathLike = "/") -> dict[str, list[Write]]:
    """The writes that set every device of ``levels`` (device -> MHz) to its clock, by device;
    UserError for a device the power model or this machine lacks, or a clock the kernel does not
    offer."""
    root = Path(root)
    out = {}
    for device, mhz in levels.items():
        dev = power.devices.get(device)
        if dev is None:
            raise UserError(f"no DVFS levels for device '{device}' in the power model ({', '.join(power.devices)})")
        mhz = dev.level(mhz).mhz
        base = _dir(root, device, dev.sysfs)
        if not base.is_dir():
            raise UserError(f"{base}: no such {dev.sysfs['kind']} directory for the {device} clock; is this the "
                            "board the artifact was compiled for (legoc.targets.power names the sysfs node)?")
        if dev.sysfs["kind"] == "cpufreq":
            value, unit = round(mhz * 1000), "kHz"
            available = _read(base / "scaling_available_frequencies")
            governors = (_read(base / "scaling_available_governors") or "").split()
        else:
            value, unit = round(mhz * 1e6), "Hz"
            available, governors = _read(base / "available_frequencies"), []
        if available is not None:
            offered = [int(f) for f in available.split()]
            if not any(abs(f - value) <= (500 if unit == "kHz" else 500_000) for f in offered):   # within 0.5 MHz
                shown = ", ".join(f"{f / (1000 if unit == 'kHz' else 1e6):g}" for f in offered)
                raise UserError(f"{base}: the kernel does not offer {mhz:g} MHz for the {device} (it offers {shown} "
                                "MHz); list those in the target's power levels")
            value = min(offered, key=lambda f: abs(f - value))
        if dev.sysfs["kind"] == "cpufreq" and "userspace" in governors:
            out[device] = [Write(base / "scaling_governor", "userspace"), Write(base / "scaling_setspeed", str(value))]
        elif dev.sysfs["kind"] == "cpufreq":
            out[device] = _pin(base, "scaling_min_freq", "scaling_max_freq", value)
        else:
            out[device] = _pin(base, "min_freq", "max_freq", value)
    return out


def apply(power: PowerModel, levels: dict, root: str | os.PathLike = "/", dry_run: bool = False) -> list[Applied]:
    """Set every device of ``levels`` to its clock (see the module docstring) and read back the
    clock now in effect; ``dry_run``: nothing is written (``current_mhz`` is what runs now)."""
    writes = plan(power, levels, root)
    done = []
    for device, ws in writes.items():
        if not dry_run:
            for k, w in enumerate(ws):
                try:
                    _write(w.path, w.value)
                except PermissionError:
                    paths = " ".join(str(x.path) for x in ws)
                    raise UserError(f"{w.path}: permission denied setting the {device} clock; run as root, or grant "
                                    f"it with `sudo chmod a+w {paths}` (until reboot)") from None
                except OSError as exc:
                    raise UserError(f"{w.path}: the kernel refused {w.value} ({exc.strerror or exc}); "
                                    f"{k} of {len(ws)} writes for the {device} clock were done") from None
        done.append(Applied(device, float(power.devices[device].level(levels[device]).mhz),
                            current_mhz(power, device, root), tuple(ws)))
    return done


def current_mhz(power: PowerModel, device: str, root: str | os.PathLike = "/") -> float | None:
    """The clock ``device`` runs at now, as the kernel reports it (None if it does not)."""
    dev = power.devices[device]
    base = _dir(Path(root), device, dev.sysfs)
    if dev.sysfs["kind"] == "cpufreq":
        text = _read(base / "scaling_cur_freq")
        return None if text is None else int(text) / 1000
    text = _read(base / "cur_freq")
    return None if text is None else int(text) / 1e6


def commands(writes: dict[str, list[Write]] | list[Applied]) -> list[str]:
    """The writes as shell lines (``echo VALUE | sudo tee PATH``), for a dry run."""
    groups = writes.values() if isinstance(writes, dict) else [a.writes for a in writes]
    return [f"echo {w.value} | sudo tee {w.path}" for ws in groups for w in ws]
