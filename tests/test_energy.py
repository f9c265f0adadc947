"""Energy as a budget (issue 20): the boards' power models, the energy estimate, the CP-SAT
selection with energy budgets, an energy objective and DVFS levels against brute force (devices
and two models included), the meters (RAPL, INA3221) and setting clocks, all on fake sysfs trees."""
from __future__ import annotations

import functools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from legoc.errors import UserError
from legoc.runtime.energy import Ina3221, PowerModel, Rapl
from legoc.runtime.estimate import Profiles
from legoc.runtime.solver import MIB, Budget, Problem, solve

# A small board: two CPU levels, three GPU levels (reference: the highest).
POWER = {"devices": {
    "cpu": {"reference_mhz": 1000.0, "sysfs": {"kind": "cpufreq", "policy": "policy0"}, "levels": [
        {"mhz": 500.0, "idle_w": 1.0, "active_w": 2.0, "basis": "test figure"},
        {"mhz": 1000.0, "idle_w": 1.0, "active_w": 4.0, "basis": "test figure"}]},
    "gpu": {"reference_mhz": 900.0, "sysfs": {"kind": "devfreq", "node": "57000000.gpu"}, "levels": [
        {"mhz": 300.0, "idle_w": 1.0, "active_w": 1.5, "basis": "test figure"},
        {"mhz": 600.0, "idle_w": 1.0, "active_w": 2.5, "basis": "test figure"},
        {"mhz": 900.0, "idle_w": 1.0, "active_w": 4.5, "basis": "test figure"}]}},
    "switch_nj_per_byte": 10.0, "switch_basis": "test", "references": ["test"]}


@pytest.fixture(scope="module")
def board_manifest(board_manifest):
    """conftest's synthetic board manifest on the small board POWER, 0.01 ms per module call."""
    return functools.partial(board_manifest, overhead=0.01, power=POWER)


# ---------------------------------------------------------------------------------------------
# the power models


def test_every_builtin_power_model_is_valid_and_every_figure_has_a_basis():
    from legoc.targets import get_target
    from legoc.targets.power import POWER as BOARDS

    assert set(BOARDS) == {"jetson-nano", "raspberry-pi-3", "raspberry-pi-4"}
    for name in BOARDS:
        spec = get_target(name)
        model = PowerModel.from_json(spec.power)
        assert ("gpu" in model.devices) == (spec.device == "cuda")
        for dev in model.devices.values():
            assert dev.reference_mhz == max(lv.mhz for lv in dev.levels)
            for lv in dev.levels:
                assert lv.basis.strip() and lv.idle_w < lv.active_w
                assert ("interpolated" in lv.basis) == (lv.mhz != dev.reference_mhz)
            watts = [lv.active_w for lv in dev.levels]
            assert watts == sorted(watts)
        assert model.switch_nj_per_byte > 0 and model.switch_basis.startswith("derived")
    # the switching energy's read rate is the one the runtime assumes for boards
    from legoc.runtime.estimate import ASSUMED_LOAD_BYTES_PER_S
    from legoc.targets.power import READ_BYTES_PER_S

    assert READ_BYTES_PER_S == ASSUMED_LOAD_BYTES_PER_S
    # a Jetson's CPU alone keeps the CPU's levels; boards without a model have none
    assert list(get_target("jetson-nano:cpu").power["devices"]) == ["cpu"]
    assert get_target("raspberry-pi-5").power is None and "power" not in get_target("raspberry-pi-5").to_json()


def test_custom_target_json_carries_its_power_model(tmp_path):
    from legoc.targets import get_target

    board = {"name": "my-board", "device": "cpu", "target": {"kind": "llvm", "mtriple": "aarch64-linux-gnu"},
             "triple": "aarch64-linux-gnu", "linker": "zig-aarch64",
             "power": {**POWER, "devices": {"cpu": POWER["devices"]["cpu"]}}}
    path = tmp_path / "board.json"
    path.write_text(json.dumps(board))
    spec = get_target(str(path))
    assert PowerModel.from_json(spec.power).devices["cpu"].level(500).active_w == 2.0
    again = tmp_path / "again.json"
    again.write_text(json.dumps(spec.to_json()))
    assert get_target(str(again)).power == spec.power
    # mistakes are one line naming the field
    bad = json.loads(json.dumps(board))
    bad["power"]["devices"]["cpu"]["levels"][0]["active_w"] = 0.5
    path.write_text(json.dumps(bad))
    with pytest.raises(UserError, match=r"field 'power.devices.cpu.levels\[0\].active_w' \(0.5 W\) is below idle_w"):
        get_target(str(path))
    bad["power"]["devices"]["cpu"]["levels"][0] = {"mhz": 500, "idle_w": 1, "active_w": 2}
    path.write_text(json.dumps(bad))
    with pytest.raises(UserError, match=r"'power.devices.cpu.levels\[0\].basis' must say where the figures come from"):
        get_target(str(path))
    cuda = {**board, "device": "cuda", "target": {"kind": "cuda", "arch": "sm_53"},
            "host": {"kind": "llvm", "mtriple": "aarch64-linux-gnu"}, "device_code": "ptx65:nvrtc11"}
    path.write_text(json.dumps(cuda))
    with pytest.raises(UserError, match="'power.devices' needs a \"gpu\" entry for a cuda target"):
        get_target(str(path))


# ---------------------------------------------------------------------------------------------
# the estimate


def test_energy_is_power_times_latency_scaled_by_the_clock(board_manifest):
    # binary fractions and round watts: the sums below are exact
    m = board_manifest([[(0.0, 1.0, 2.0)], [(0.0, 0.5, 0.25)]], {"f0": 0.125, "b0": 0.25}, frame_ms=0.25,
                       overhead=0.0625)
    prof = Profiles(m)
    # as profiled (reference clocks): gpu block0 1.0 ms x 4.5 W, cpu block1 0.25 ms x 4 W, frames
    # 2 x 0.25 ms x 4.5 W, overhead 4 x 1/16 ms x 4 W (cpu), the copy of b0 to the cpu (0.25 ms) x 4 W
    # (the CPU's highest active power); f0 stays on the gpu, b1's copy back costs 0 here
    e = prof.estimate([0, 0], ["gpu", "cpu"])
    assert e.energy_mj == 1.0 * 4.5 + 0.25 * 4.0 + 0.5 * 4.5 + 0.25 * 4.0 + 0.25 * 4.0
    assert e.sources["energy"] == ["estimated"]
    # at gpu 300 MHz and cpu 500 MHz: gpu segments 3x slower at 1.5 W, cpu ones 2x slower at 2 W
    lv = {"gpu": 300.0, "cpu": 500.0}
    slow = prof.estimate([0, 0], ["gpu", "cpu"], lv)
    assert slow.latency_ms == 3.0 + 0.5 + 3 * 0.5 + 2 * 0.25 + 0.25      # copies are not scaled
    assert slow.energy_mj == 3.0 * 1.5 + 0.5 * 2.0 + 1.5 * 1.5 + 0.5 * 2.0 + 0.25 * 4.0
    assert slow.levels == lv
    # the reference clocks given explicitly are the profile as it is
    same = prof.estimate([0, 0], ["gpu", "cpu"], {"gpu": 900.0, "cpu": 1000.0})
    assert (same.latency_ms, same.energy_mj) == (e.latency_ms, e.energy_mj)
    with pytest.raises(UserError, match="no DVFS level at 700 MHz; levels: 300, 600, 900"):
        prof.estimate([0, 0], "gpu", {"gpu": 700.0})


def test_a_measured_figure_replaces_the_estimate_and_scales_with_the_power_model(board_manifest):
    m = board_manifest([[(0.0, 1.0, 2.0)]], {}, frame_ms=0.25, overhead=0.0)
    m["segments"][1]["variants"][0]["profile"]["energy_mj"] = {"value": 3.0, "source": "measured-rpc"}
    prof = Profiles(m)
    e = prof.estimate([0], ["gpu"])
    assert e.energy_mj == 3.0 + 0.5 * 4.5 and e.sources["energy"] == ["estimated", "measured-rpc"]
    # at 300 MHz: 3 mJ x (1.5 W x 3) / (4.5 W x 1)
    assert prof.option_energy_mj(prof.blocks[0][0], "gpu", 300.0) == 3.0
    assert prof.estimate([0], ["gpu"], {"gpu": 300.0, "cpu": 1000.0}).sources["energy"] == ["estimated"]
    # the CPU module has no measured figure of its own: estimated
    assert prof.option_energy_mj(prof.device_costs[0][0]["cpu"], "cpu") == 2.0 * 4.0


def test_no_power_model_no_energy_with_a_clear_reason(board_manifest):
    m = board_manifest([[(0.0, 1.0)]], {}, gpu=False, power=None)
    m["target"].update(name="host", runs_here=True)
    m["energy_meter"] = {"meter": None, "why": "no RAPL package counters under /sys/class/powercap"}
    prof = Profiles(m)
    assert prof.estimate([0]).energy_mj is None and "energy" not in prof.estimate([0]).sources
    with pytest.raises(UserError, match="energy is unavailable: target host has no power model and the artifact has "
                                        "no measured energy figures: this machine's energy can only be measured, and at "
                                        "compile time no RAPL package counters"):
        solve([Problem(prof, Budget(energy_mj=10))])
    with pytest.raises(UserError, match="DVFS needs the target's levels, and target host has no power model"):
        solve([Problem(prof, Budget(latency_ms=10))], dvfs=True)
    # selection without energy is as before
    assert solve([Problem(prof, Budget(latency_ms=10))]).estimate.energy_mj is None
    # an artifact of a board that has a power model now, compiled before it had one, still loads
    old = board_manifest([[(0.0, 1.0)]], {}, gpu=False, power=None)
    old["target"]["name"] = "raspberry-pi-4"
    assert Profiles(old).energy_unavailable().endswith("compiled before legoc had a power model for raspberry-pi-4: "
                                                       "compile it again")


# ---------------------------------------------------------------------------------------------
# selection against brute force


def _configs(prof: Profiles, dvfs: bool):
    """Every (choice, devices, levels) of one model; levels None without DVFS."""
    level_sets = prof.power.level_choices() if dvfs else [None]
    for choice in prof.all_choices():
        for devices in prof.all_device_choices():
            for levels in level_sets:
                yield choice, devices, levels


def _acc_units(prof: Profiles, choice) -> int:
    """The solver's accuracy objective (no capacity reward: no MACs; no switch charge)."""
    return sum(round(-vs[i].drop * 1e6) for vs, i in zip(prof.blocks, choice))


def _fits(prof, budget: Budget, e) -> bool:
    return ((budget.latency_ms is None or e.latency_ms <= budget.latency_ms)
            and (budget.memory_mb is None or e.memory_bytes <= budget.memory_mb * MIB)
            and (budget.min_accuracy is None or e.accuracy >= budget.min_accuracy - 1e-12)
            and (budget.energy_mj is None or e.energy_mj <= budget.energy_mj))


variants = st.tuples(st.integers(0, 5).map(lambda k: k / 100), st.floats(0.1, 5.0), st.floats(0.1, 5.0))
block_lists = st.lists(st.lists(variants, min_size=1, max_size=3), min_size=1, max_size=2)
copy_costs = st.fixed_dictionaries({k: st.floats(0.0, 1.0) for k in ("x", "f0", "b0", "b1", "y")})


@settings(max_examples=60, deadline=None)
@given(block_lists, copy_costs, st.floats(0.0, 1.0), st.floats(0.0, 1.0), st.booleans(), st.booleans())
def test_energy_selection_with_devices_and_dvfs_equals_brute_force(board_manifest, blocks, copies, lat_frac, en_frac,
                                                                   dvfs, by_energy):
    prof = Profiles(board_manifest(blocks, copies))
    every = [(c, d, lv, prof.estimate(c, d, lv)) for c, d, lv in _configs(prof, dvfs)]
    lats, ens = [e.latency_ms for *_, e in every], [e.energy_mj for *_, e in every]
    budget = Budget(latency_ms=min(lats) + lat_frac * (max(lats) - min(lats)) + 1e-3,
                    energy_mj=min(ens) + en_frac * (max(ens) - min(ens)) + 1e-3,
                    min_accuracy=0.86 if by_energy else None)
    fits = [(c, d, lv, e) for c, d, lv, e in every if _fits(prof, budget, e)]
    objective = "energy" if by_energy else "accuracy"
    if not fits:
        with pytest.raises(UserError, match="no configuration meets the budget"):
            solve([Problem(prof, budget)], dvfs=dvfs, objective=objective)
        return
    sel = solve([Problem(prof, budget)], dvfs=dvfs, objective=objective, switch_penalty=0.0)
    e = sel.estimate
    assert sel.optimal and e == prof.estimate(sel.choice, sel.devices, sel.levels or None)
    assert bool(sel.levels) == dvfs
    assert _fits(prof, budget, e)
    terms = 2 * len(blocks) + 8     # integer rounding: 1 nJ per energy term
    if by_energy:
        assert e.energy_mj == pytest.approx(min(f[3].energy_mj for f in fits), abs=terms * 1e-6)
    else:
        best = max(_acc_units(prof, c) for c, *_ in fits)
        assert _acc_units(prof, sel.choice) == best
        # among the most accurate: the least energy (devices and clocks do not change accuracy)
        least = min(f[3].energy_mj for f in fits if _acc_units(prof, f[0]) == best)
        assert e.energy_mj == pytest.approx(least, abs=terms * 1e-6)


cpu_variants = st.tuples(st.integers(0, 5).map(lambda k: k / 100), st.floats(0.1, 5.0))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(cpu_variants, min_size=1, max_size=3), min_size=1, max_size=2),
       st.lists(st.lists(cpu_variants, min_size=1, max_size=2), min_size=1, max_size=2),
       st.floats(0.0, 1.0), st.floats(0.0, 1.0), st.booleans(), st.floats(0.5, 2.0))
def test_two_models_share_the_boards_clocks_and_equal_brute_force(board_manifest, blocks_a, blocks_b, lat_frac,
                                                                  en_frac, by_energy, weight):
    a, b = Profiles(board_manifest(blocks_a, {}, gpu=False)), Profiles(board_manifest(blocks_b, {}, gpu=False))
    levels = a.power.level_choices()
    pairs = [(ca, cb, lv, a.estimate(ca, None, lv), b.estimate(cb, None, lv))
             for lv in levels for ca in a.all_choices() for cb in b.all_choices()]
    total = [ea.energy_mj + eb.energy_mj for *_, ea, eb in pairs]
    lat_a = [ea.latency_ms for *_, ea, _ in pairs]
    budget_a = Budget(latency_ms=min(lat_a) + lat_frac * (max(lat_a) - min(lat_a)) + 1e-3,
                      min_accuracy=0.85 if by_energy else None)
    shared = min(total) + en_frac * (max(total) - min(total)) + 1e-3
    fits = [p for p, t in zip(pairs, total) if _fits(a, budget_a, p[3]) and t <= shared]
    objective = "energy" if by_energy else "accuracy"
    problems = [Problem(a, budget_a, weight=weight, name="a"), Problem(b, name="b")]
    if not fits:
        with pytest.raises(UserError, match="no configuration meets the budget"):
            solve(problems, dvfs=True, shared_energy_mj=shared, objective=objective)
        return
    sel = solve(problems, dvfs=True, shared_energy_mj=shared, objective=objective, switch_penalty=0.0)
    ea, eb = sel.estimates
    assert sel.optimal and list(sel.levels) == ["cpu"]
    assert (ea, eb) == (a.estimate(sel.choices[0], None, sel.levels), b.estimate(sel.choices[1], None, sel.levels))
    assert _fits(a, budget_a, ea) and ea.energy_mj + eb.energy_mj <= shared
    if by_energy:
        best = min(weight * p[3].energy_mj + p[4].energy_mj for p in fits)
        assert weight * ea.energy_mj + eb.energy_mj == pytest.approx(best, abs=1e-4)   # 1 nJ rounding per term
    else:
        value = lambda ca, cb: round(weight * _acc_units(a, ca)) + _acc_units(b, cb)   # noqa: E731
        best = max(value(p[0], p[1]) for p in fits)
        assert abs(value(*sel.choices) - best) <= 2   # per-term rounding of the weighted objective


def test_without_energy_the_selection_is_the_one_before(board_manifest):
    # the same problem with and without a power model: identical choice, estimate figures aside
    blocks = [[(0.0, 1.0, 2.0), (0.01, 0.5, 1.0)], [(0.0, 2.0, 1.5), (0.02, 1.0, 0.8)]]
    copies = {"f0": 0.1, "b0": 0.2}
    with_power, without = Profiles(board_manifest(blocks, copies)), Profiles(board_manifest(blocks, copies, power=None))
    for lat in (2.1, 3.0, 5.0, 10.0):
        s1, s2 = solve([Problem(with_power, Budget(latency_ms=lat))]), solve([Problem(without, Budget(latency_ms=lat))])
        assert (s1.choices, s1.device_choices, s1.objective) == (s2.choices, s2.device_choices, s2.objective)
        assert s1.levels == {} and s1.estimate.latency_ms == s2.estimate.latency_ms


def test_dvfs_lowers_the_clock_into_the_latency_slack(board_manifest):
    # one CPU block: at 1000 MHz 1 ms x 4 W = 4 mJ, at 500 MHz 2 ms x 2 W = 4 mJ for the block, but the
    # energy budget cannot be met at the reference clocks once the frame (1 ms) is added; a latency budget
    # with slack lets the solver halve the clock of a board whose power falls faster than its speed
    power = json.loads(json.dumps(POWER))
    power["devices"]["cpu"]["levels"][0]["active_w"] = 1.5      # 500 MHz: 2x slower, 2.67x less power
    prof = Profiles(board_manifest([[(0.0, 1.0)]], {}, gpu=False, frame_ms=0.5, overhead=0.0, power=power))
    assert prof.estimate([0]).energy_mj == 8.0 and prof.estimate([0], None, {"cpu": 500.0}).energy_mj == 6.0
    with pytest.raises(UserError, match="least energy 8.000 mJ"):
        solve([Problem(prof, Budget(latency_ms=10, energy_mj=7))])
    sel = solve([Problem(prof, Budget(latency_ms=10, energy_mj=7))], dvfs=True)
    assert sel.levels == {"cpu": 500.0} and sel.estimate.latency_ms == 4.0 and sel.estimate.energy_mj == 6.0
    with pytest.raises(UserError, match=r"least energy 6.000 mJ \(any DVFS levels\)"):
        solve([Problem(prof, Budget(latency_ms=3, energy_mj=7))], dvfs=True)


def test_energy_objective_counts_the_switching_energy(board_manifest):
    # two equal-energy variants; the one in use is loaded, the other is not: staying costs nothing
    prof = Profiles(board_manifest([[(0.0, 1.0), (0.0, 1.0)]], {}, gpu=False, weight_bytes=10_000_000))
    stay = solve([Problem(prof, Budget(), current=[1], loaded={(0, 1)})], objective="energy")
    assert stay.choice == (1,) and stay.switch_energy_mj == (0.0,)
    moved = solve([Problem(prof, Budget(), current=[1], loaded={(0, 0), (0, 1)})], objective="energy")
    assert moved.switch_energy_mj == (0.0,)
    fresh = solve([Problem(prof, Budget())], objective="energy")
    assert fresh.switch_energy_mj[0] == pytest.approx((10_000_000 + 1000) * 10 / 1e6)   # bytes x 10 nJ/B


# ---------------------------------------------------------------------------------------------
# meters on fake sysfs trees


def _rapl(tmp_path, uj=0, max_uj=262_143_328_850):
    zone = tmp_path / "sys/class/powercap/intel-rapl:0"
    (zone / "intel-rapl:0:0").mkdir(parents=True)      # a subzone (core): not summed
    (zone / "name").write_text("package-0\n")
    (zone / "energy_uj").write_text(f"{uj}\n")
    (zone / "max_energy_range_uj").write_text(f"{max_uj}\n")
    (zone / "intel-rapl:0:0" / "name").write_text("core\n")
    (zone / "intel-rapl:0:0" / "energy_uj").write_text("5\n")
    return zone / "energy_uj"


def test_rapl_counter_difference_per_call_with_wraparound(tmp_path):
    counter = _rapl(tmp_path, uj=999_500, max_uj=1_000_000)

    def run():   # each call burns 1,000 uJ; the counter wraps at 1,000,000
        counter.write_text(str((int(counter.read_text()) + 1000) % 1_000_000))

    rapl = Rapl(tmp_path)
    assert rapl.available() and [z.name for z in rapl.zones] == ["intel-rapl:0"]
    got = rapl.measure(run, 10)
    assert got.mj_per_call == 1.0 and got.calls == 10
    assert not Rapl(tmp_path / "nothing").available()
    with pytest.raises(UserError, match="did not advance"):
        rapl.measure(lambda: None, 3)


def test_rapl_permission_denied_is_one_line_with_the_command(tmp_path, monkeypatch):
    counter = _rapl(tmp_path)
    real = type(counter).read_text

    def denied(self, *a, **k):
        if self.name == "energy_uj":
            raise PermissionError(13, "Permission denied")
        return real(self, *a, **k)

    monkeypatch.setattr(type(counter), "read_text", denied)
    with pytest.raises(UserError, match=f"{counter}: permission denied reading the RAPL energy counter; grant it "
                                        f"with `sudo chmod a\\+r {counter}`"):
        Rapl(tmp_path).read()


def test_ina3221_both_sysfs_layouts(tmp_path):
    iio = tmp_path / "r32/sys/bus/i2c/drivers/ina3221x/6-0040/iio:device0"
    iio.mkdir(parents=True)
    for k, (rail, mw) in enumerate([("POM_5V_IN", 5000), ("POM_5V_GPU", 2000), ("POM_5V_CPU", 1000)]):
        (iio / f"rail_name_{k}").write_text(rail + "\n")
        (iio / f"in_power{k}_input").write_text(f"{mw}\n")
    ina = Ina3221(tmp_path / "r32")
    assert ina.rails() == {"POM_5V_IN": 5.0, "POM_5V_GPU": 2.0, "POM_5V_CPU": 1.0}
    got = ina.measure(lambda: sum(range(1000)), 50, interval_s=0.001)
    assert got.mean_w == 5.0 and got.mj_per_call == pytest.approx(5.0 * got.seconds * 1e3 / 50)

    hw = tmp_path / "r35/sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon3"
    hw.mkdir(parents=True)
    for k, (label, mv, ma) in enumerate([("VDD_IN", 5000, 1200), ("NC", 0, 0), ("VDD_SOC", 5000, 200)], start=1):
        (hw / f"in{k}_label").write_text(label + "\n")
        (hw / f"in{k}_input").write_text(f"{mv}\n")
        (hw / f"curr{k}_input").write_text(f"{ma}\n")
    ina = Ina3221(tmp_path / "r35")
    assert ina.rails() == {"VDD_IN": 6.0, "VDD_SOC": 1.0} and ina.total_rail() == "VDD_IN"
    with pytest.raises(UserError, match="no INA3221 rail POM_5V_IN under"):
        ina.total_rail("POM_5V_IN")


# ---------------------------------------------------------------------------------------------
# setting clocks on fake sysfs trees


def _cpufreq(root, governors="performance schedutil userspace", cur=1000000):
    base = root / "sys/devices/system/cpu/cpufreq/policy0"
    base.mkdir(parents=True)
    files = {"scaling_available_frequencies": "500000 1000000", "scaling_available_governors": governors,
             "scaling_governor": "schedutil", "scaling_setspeed": "<unsupported>", "scaling_min_freq": "500000",
             "scaling_max_freq": "1000000", "scaling_cur_freq": str(cur)}
    for name, text in files.items():
        (base / name).write_text(text + "\n")
    return base


def _devfreq(root):
    base = root / "sys/class/devfreq/57000000.gpu"
    base.mkdir(parents=True)
    for name, text in {"available_frequencies": "300000000 600000000 900000000", "min_freq": "300000000",
                       "max_freq": "900000000", "cur_freq": "900000000"}.items():
        (base / name).write_text(text + "\n")
    return base


def test_set_clocks_through_cpufreq_and_devfreq(tmp_path):
    from legoc.runtime import dvfs

    power = PowerModel.from_json(POWER)
    cpu, gpu = _cpufreq(tmp_path), _devfreq(tmp_path)
    # dry run: the writes, nothing written
    dry = dvfs.apply(power, {"cpu": 500.0, "gpu": 600.0}, tmp_path, dry_run=True)
    assert dvfs.commands(dry) == [f"echo userspace | sudo tee {cpu}/scaling_governor",
                                  f"echo 500000 | sudo tee {cpu}/scaling_setspeed",
                                  f"echo 600000000 | sudo tee {gpu}/min_freq",
                                  f"echo 600000000 | sudo tee {gpu}/max_freq"]
    assert (cpu / "scaling_governor").read_text().strip() == "schedutil"
    # for real: the fake kernel does not change cur_freq, so the read-back says it did not take effect
    done = dvfs.apply(power, {"cpu": 500.0, "gpu": 600.0}, tmp_path)
    assert (cpu / "scaling_setspeed").read_text() == "500000" and (gpu / "max_freq").read_text() == "600000000"
    assert [(a.device, a.wanted_mhz, a.current_mhz, a.took_effect) for a in done] == [
        ("cpu", 500.0, 1000.0, False), ("gpu", 600.0, 900.0, False)]
    (gpu / "cur_freq").write_text("600000000")
    assert dvfs.apply(power, {"gpu": 600.0}, tmp_path)[0].took_effect
    # raising the clock above max_freq writes max first, so min <= max holds at every step
    assert [w.path.name for w in dvfs.plan(power, {"gpu": 900.0}, tmp_path)["gpu"]] == ["max_freq", "min_freq"]


def test_set_clocks_without_userspace_governor_pins_min_and_max(tmp_path):
    from legoc.runtime import dvfs

    cpu = _cpufreq(tmp_path, governors="performance schedutil")
    writes = dvfs.plan(PowerModel.from_json(POWER), {"cpu": 500.0}, tmp_path)["cpu"]
    assert [(w.path.name, w.value) for w in writes] == [("scaling_min_freq", "500000"), ("scaling_max_freq", "500000")]
    assert writes[0].path.parent == cpu


def test_set_clocks_errors_are_one_line(tmp_path, monkeypatch):
    from legoc.runtime import dvfs

    power = PowerModel.from_json(POWER)
    with pytest.raises(UserError, match="no such cpufreq directory for the cpu clock"):
        dvfs.apply(power, {"cpu": 500.0}, tmp_path)
    cpu = _cpufreq(tmp_path)
    (cpu / "scaling_available_frequencies").write_text("400000 1000000\n")
    with pytest.raises(UserError, match=r"the kernel does not offer 500 MHz for the cpu \(it offers 400, 1000 MHz\)"):
        dvfs.apply(power, {"cpu": 500.0}, tmp_path)
    (cpu / "scaling_available_frequencies").write_text("500000 1000000\n")

    def denied(path, value):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(dvfs, "_write", denied)
    with pytest.raises(UserError) as info:
        dvfs.apply(power, {"cpu": 500.0}, tmp_path)
    assert str(info.value) == (f"{cpu}/scaling_governor: permission denied setting the cpu clock; run as root, or grant "
                               f"it with `sudo chmod a+w {cpu}/scaling_governor {cpu}/scaling_setspeed` (until reboot)")


# ---------------------------------------------------------------------------------------------
# real artifacts: the compile-time stage, inspect and select


@pytest.fixture(scope="module")
def small(tmp_path_factory, two_block_source):
    path = tmp_path_factory.mktemp("small") / "small.py"
    path.write_text(two_block_source(size=8, head="flatten", samples=128, batch=64, labels="model"))
    return path


@pytest.fixture(scope="module")
def nano_artifact(small, artifact):
    """The small model compiled for jetson-nano (estimated latencies, the Nano's power model)."""
    return artifact(str(small), "jetson-nano", ratios=(0.0, 0.5), blocks=2, retrain_epochs=0).artifact


def test_a_board_artifact_carries_its_power_model_and_shows_energy(nano_artifact, tmp_path, capsys):
    from legoc.cli import main
    from legoc.runtime.artifact import read_manifest
    from legoc.targets import get_target

    m = read_manifest(nano_artifact)
    assert m["target"]["power"] == get_target("jetson-nano").power
    assert m["energy_meter"]["meter"] is None and "python -m legoc.runtime.energy" in m["energy_meter"]["why"]
    assert main(["inspect", str(nano_artifact)]) == 0
    out = capsys.readouterr().out
    assert "energy (mJ)" in out and "energy column: one call at the reference clocks; ~ estimated" in out
    prof = Profiles(m)
    e = prof.option_energy_mj(prof.blocks[0][0], "gpu")
    assert f"~{e:.3f}" in out and e == pytest.approx(5.8 * prof.blocks[0][0].latency_ms)
    # select within an energy budget the reference clocks cannot meet, with DVFS
    full = prof.estimate([0, 0])
    least_at_max = prof.min_energy_mj()
    budget = least_at_max * 0.99
    assert main(["select", str(nano_artifact), "--energy-mj", f"{budget}"]) == 2
    assert f"least energy {least_at_max:.3f} mJ" in capsys.readouterr().err
    assert main(["select", str(nano_artifact), "--energy-mj", f"{budget}", "--dvfs"]) == 0
    out = capsys.readouterr().out
    assert "clocks: cpu " in out and "(estimated)" in out and full.energy_mj > budget
    # the least energy within a latency budget, and its clocks set on a fake sysfs tree (dry run)
    cpu, gpu = tmp_path / "sys/devices/system/cpu/cpufreq/policy0", tmp_path / "sys/class/devfreq/57000000.gpu"
    cpu.mkdir(parents=True)
    gpu.mkdir(parents=True)
    assert main(["select", str(nano_artifact), "--objective", "energy", "--latency-ms", f"{full.latency_ms * 3}",
                 "--dvfs", "--set-clocks", "--dry-run", "--sysfs", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "would write:" in out and f"sudo tee {gpu}/max_freq" in out and f"sudo tee {cpu}/scaling_max_freq" in out
    assert not (gpu / "max_freq").exists()
    assert main(["select", str(nano_artifact), "--dry-run"]) == 2
    assert "add --dvfs" in capsys.readouterr().err


def test_host_compile_records_why_there_is_no_energy_or_measures_it_with_rapl(small, tmp_path, monkeypatch, capsys):
    import os
    import threading

    from legoc.cli import main
    from legoc.passes.backend import energy as stage
    from legoc.pipeline import CompileConfig, compile_model
    from legoc.runtime.artifact import read_manifest

    monkeypatch.setenv("LEGOC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(stage, "SYSFS_ROOT", str(tmp_path / "empty"))
    cfg = dict(ratios=(0.0, 0.5), blocks=2, retrain_epochs=0, progress=False)
    plain = compile_model(small, CompileConfig(output=tmp_path / "plain.lego", validate=False, **cfg)).artifact
    assert read_manifest(plain)["energy_meter"]["why"].startswith("no RAPL package counters under")
    assert main(["select", str(plain), "--energy-mj", "1"]) == 2
    assert "energy is unavailable: target host has no power model" in capsys.readouterr().err

    # the board-side helper on a fake INA3221 (a constant 5 W module rail): every module measured,
    # the figures written into the manifest (this artifact runs here: measured-local)
    from legoc.runtime import energy

    iio = tmp_path / "ina/sys/bus/i2c/drivers/ina3221x/6-0040/iio:device0"
    iio.mkdir(parents=True)
    (iio / "rail_name_0").write_text("POM_5V_IN\n")
    (iio / "in_power0_input").write_text("5000\n")
    assert energy.main([str(plain), "--sysfs", str(tmp_path / "ina"), "--seconds", "0.02"]) == 0
    m = read_manifest(plain)
    figures = [v["profile"]["energy_mj"] for s in m["segments"] for v in s["variants"]]
    assert all(f["source"] == "measured-local" and f["value"] > 0 and "mean 5.00 W" in f["how"] for f in figures)
    assert Profiles(m).energy_unavailable() is None
    assert energy.main([str(plain), "--sysfs", str(tmp_path / "empty")]) == 2
    assert "no power meter on this machine" in capsys.readouterr().err

    # a fake RAPL package counter that a thread advances by 1 mJ per ms of wall time (a 1 W package)
    counter = _rapl(tmp_path / "rapl")
    stop = threading.Event()

    def tick():
        uj = 0
        while not stop.wait(0.001):
            uj += 1000
            tmp = counter.with_suffix(".tmp")
            tmp.write_text(str(uj))
            os.replace(tmp, counter)

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    monkeypatch.setattr(stage, "SYSFS_ROOT", str(tmp_path / "rapl"))
    try:
        measured = compile_model(small, CompileConfig(output=tmp_path / "rapl.lego", **cfg)).artifact
    finally:
        stop.set()
        thread.join()
    m = read_manifest(measured)
    assert m["energy_meter"] == {"meter": "rapl", "why": None, "zones": ["intel-rapl:0"]}
    figures = [v["profile"]["energy_mj"] for s in m["segments"] for v in s["variants"]]
    assert all(f["source"] == "measured-local" and f["value"] > 0 and "Rapl over" in f["how"] for f in figures)
    prof = Profiles(m)
    # the dispatch overhead has no meter of its own: charged at the measured modules' mean power (estimated)
    assert prof.energy_unavailable() is None
    # (a dispatch overhead measured as nothing, as on a loaded machine, adds no estimated part)
    sources = ["estimated", "measured-local"] if prof.overhead_ms() else ["measured-local"]
    assert prof.estimate([0, 0]).sources["energy"] == sources
    assert main(["select", str(measured), "--energy-mj", str(prof.estimate([1, 1]).energy_mj * 1.5)]) == 0
    assert f"mJ ({', '.join(sources)})" in capsys.readouterr().out


def test_model_and_scheduler_choose_and_set_the_boards_clocks(nano_artifact, tmp_path):
    from legoc.runtime import Scheduler
    from legoc.runtime.model import Model

    a, b = Model(nano_artifact), Model(nano_artifact)
    a.sysfs_root = str(tmp_path)
    full = a.profiles.estimate([0, 0])
    sel = a.select(latency_ms=full.latency_ms * 3, objective="energy", dvfs=True)
    assert set(sel.levels) == {"cpu", "gpu"} and sel.estimate.levels == sel.levels
    assert sel.estimate.energy_mj < full.energy_mj and sel.estimate.latency_ms <= full.latency_ms * 3
    with pytest.raises(UserError, match="no such cpufreq directory for the cpu clock"):
        a.set_clocks(sel.levels)             # the fake tree has no cpufreq yet
    _cpufreq(tmp_path, governors="performance", cur=1479000)
    (tmp_path / "sys/devices/system/cpu/cpufreq/policy0/scaling_available_frequencies").write_text(
        "614400 921600 1224000 1479000\n")
    gpu = tmp_path / "sys/class/devfreq/57000000.gpu"
    gpu.mkdir(parents=True)
    (gpu / "cur_freq").write_text("921600000\n")
    done = a.set_clocks(sel.levels, dry_run=True)
    assert [(x.device, x.wanted_mhz) for x in done] == list(sel.levels.items())
    assert all(x.current_mhz in (1479.0, 921.6) for x in done)     # nothing written: as before
    # two models on one board: one clock per device for both, within a shared energy budget
    s = Scheduler([a, b])
    joint = s.select(latency_ms=full.latency_ms * 3, period_energy_mj=2 * full.energy_mj, dvfs=True)
    assert joint.levels and all(e.levels == joint.levels for e in joint.estimates)
    assert sum(e.energy_mj for e in joint.estimates) <= 2 * full.energy_mj
