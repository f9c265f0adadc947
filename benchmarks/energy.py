"""Dynamic range in time and energy of the MNIST example on a Jetson Nano, with and without CPU/GPU
mapping and DVFS, next to Xun et al. (MLCAD 2019) — all figures ESTIMATED.

    .venv/bin/python benchmarks/energy.py [--artifact ART]

ART: the MNIST example compiled for jetson-nano with ``--devices cpu,gpu`` (default: compiled
once into ``$LEGOC_CACHE/benchmarks/mnist-jetson-nano-devices.lego``). For each set of knobs —
the variants alone (GPU, clocks at maximum), + mapping (CPU or GPU per block), + DVFS (the board's
levels, legoc.targets.power), + both — the fastest and slowest configuration and the least and
most energy per inference, and each range (slowest / fastest, most / least). Exact: for a fixed
device assignment and clocks, latency and energy are sums over blocks plus terms that do not
depend on the variants, so the extremes are per-block extremes, over every assignment and clock.

What is estimated: every latency (the Nano's published peak clocks x an assumed efficiency,
legoc.targets.calibration; nothing here ran on a Nano), every CPU<->GPU copy, and every energy
(the power model's active watts x latency, latency scaled by the clock for compute-bound
modules, legoc.runtime.energy; the watts are approximations from a vendor budget and one
published tegrastats sample, legoc.targets.power). Xun et al. report how much *wider* the range
becomes than earlier dynamic DNNs' (their measurements on a Jetson Nano, AlexNet/CIFAR-10): 2.73x
(time) and 2.36x (energy) from incrementally trained channel groups, 41.6x and 10.6x combined with
task mapping and DVFS. The column "x variants alone" is the comparable figure here: how much
wider each set of knobs makes the range than legoc's variants alone.
"""
from __future__ import annotations

import argparse
import itertools
from pathlib import Path

from legoc.runtime.artifact import read_manifest
from legoc.runtime.estimate import Profiles
from legoc.runtime.solver import Budget, Problem, solve

ROOT = Path(__file__).resolve().parent.parent
XUN = {"time": 41.6, "energy": 10.6}          # with mapping and DVFS (MLCAD 2019)
XUN_GROUPS = {"time": 2.73, "energy": 2.36}   # incremental channel groups alone


def artifact(path: str | None) -> Path:
    if path:
        return Path(path)
    from legoc.paths import cache_dir
    from legoc.pipeline import CompileConfig, compile_model

    out = cache_dir() / "benchmarks" / "mnist-jetson-nano-devices.lego"
    if not (out / "manifest.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        print(f"compiling {out} (once) ...")
        compile_model(ROOT / "examples" / "mnist_resnet.py",
                      CompileConfig(target="jetson-nano", output=out, devices=("cpu", "gpu"), progress=False))
    return out


def extremes(prof: Profiles, mapping: bool, dvfs: bool) -> dict:
    """Fastest, slowest, least and most energy over every configuration the knobs allow:
    ``{"min_latency": (value, choice, devices, levels), ...}``."""
    assignments = list(itertools.product(prof.devices, repeat=len(prof.blocks))) if mapping else [None]
    level_sets = prof.power.level_choices() if dvfs else [None]
    out = {}
    for devs in assignments:
        per_block = prof.device_list(devs)
        for lv in level_sets:
            at = lv or {}

            def latency(b, v):
                d = per_block[b]
                return prof.device_costs[b][v][d].latency_ms * prof.level_ratio(d, at.get(d))

            def energy(b, v):
                d = per_block[b]
                return prof.option_energy_mj(prof.device_costs[b][v][d], d, at.get(d))

            for what, cost in (("latency", latency), ("energy", energy)):
                for pick in (min, max):
                    choice = [pick(range(len(vs)), key=lambda v, b=b: cost(b, v)) for b, vs in enumerate(prof.blocks)]
                    e = prof.estimate(choice, devs, lv)
                    value = e.latency_ms if what == "latency" else e.energy_mj
                    key = f"{pick.__name__}_{what}"
                    if key not in out or pick(value, out[key][0]) != out[key][0]:
                        out[key] = (value, tuple(choice), prof.device_list(devs), e.levels)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", help="the MNIST example compiled for jetson-nano --devices cpu,gpu")
    args = ap.parse_args(argv)
    path = artifact(args.artifact)
    manifest = read_manifest(path)
    prof = Profiles(manifest)
    if manifest["target"]["name"] != "jetson-nano" or len(prof.devices) < 2 or prof.power is None:
        raise SystemExit(f"{path}: needs a jetson-nano artifact compiled with --devices cpu,gpu and a power model")
    sources = sorted({v.latency_source for vs in prof.device_costs for v in vs for v in v.values()})
    print(f"{path}: {len(prof.blocks)} blocks x {len(prof.blocks[0])} variants, devices {', '.join(prof.devices)}, "
          f"DVFS levels " + "; ".join(f"{d} {', '.join(f'{lv.mhz:g}' for lv in dev.levels)} MHz"
                                       for d, dev in prof.power.devices.items())
          + f"; latency sources: {', '.join(sources)}; every figure below is ESTIMATED")
    rows = [("variants alone (GPU, max clocks)", False, False), ("variants + mapping", True, False),
            ("variants + DVFS", False, True), ("variants + mapping + DVFS", True, True)]
    base = None
    print(f"\n| knobs | fastest ms | slowest ms | time range | x variants alone | least mJ | most mJ | energy range "
          f"| x variants alone |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, mapping, dvfs in rows:
        x = extremes(prof, mapping, dvfs)
        t_range = x["max_latency"][0] / x["min_latency"][0]
        e_range = x["max_energy"][0] / x["min_energy"][0]
        if base is None:
            base = (t_range, e_range)
        print(f"| {label} | {x['min_latency'][0]:.3f} | {x['max_latency'][0]:.3f} | {t_range:.2f}x | "
              f"{t_range / base[0]:.2f}x | {x['min_energy'][0]:.3f} | {x['max_energy'][0]:.3f} | {e_range:.2f}x | "
              f"{e_range / base[1]:.2f}x |")
        if mapping and dvfs:
            for key in ("min_latency", "max_latency", "min_energy", "max_energy"):
                value, choice, devs, lv = x[key]
                print(f"|   {key.replace('_', ' ')}: variants {','.join(map(str, choice))}, devices {','.join(devs)}, "
                      f"clocks {', '.join(f'{d} {m:g}' for d, m in lv.items()) or 'max'} | | | | | | | | |")
    print(f"\nXun et al. (measured, Jetson Nano, AlexNet/CIFAR-10), range wider than earlier dynamic DNNs': channel "
          f"groups alone {XUN_GROUPS['time']}x time / {XUN_GROUPS['energy']}x energy; with mapping and DVFS "
          f"{XUN['time']}x time / {XUN['energy']}x energy. The 'x variants alone' column above is legoc's analogue "
          "(its own variants as the baseline), estimated.")

    # the solver on the same artifact: energy budgets across the range, with and without DVFS
    full = prof.energy_mj([0] * len(prof.blocks))
    print("\nCP-SAT selection (objective accuracy, estimated figures), energy budgets as shares of the full model's "
          f"{full:.3f} mJ (GPU, max clocks):")
    print("| energy budget | knobs | variants | devices | clocks | est. acc | est. ms | est. mJ | solve ms |")
    print("|---:|---|---|---|---|---:|---:|---:|---:|")
    for share in (1.05, 0.75, 0.5, 0.4):
        for dvfs in (False, True):
            try:
                sel = solve([Problem(prof, Budget(energy_mj=share * full))], dvfs=dvfs)
            except Exception as exc:   # noqa: BLE001 - an infeasible budget is a row too
                print(f"| {share:.0%} | {'mapping + DVFS' if dvfs else 'mapping'} | - | - | - | - | - | - | "
                      f"({type(exc).__name__}) |")
                continue
            e = sel.estimate
            print(f"| {share:.0%} | {'mapping + DVFS' if dvfs else 'mapping'} | {','.join(map(str, sel.choice))} | "
                  f"{','.join(sel.devices)} | {', '.join(f'{d} {m:g}' for d, m in sel.levels.items()) or 'max'} | "
                  f"{e.accuracy:.4f} | {e.latency_ms:.3f} | {e.energy_mj:.3f} | {sel.solve_ms:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
