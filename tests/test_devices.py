"""CPU or GPU per block on Jetson targets (--devices cpu,gpu): what is compiled and recorded, the
estimator with copies between devices, the device-aware solver against brute force, and the
runtime's plan (which module on which device, where copies go). Nothing here runs CUDA: there is
no GPU on the build machine, so the runtime is checked up to the plan it would execute."""
from __future__ import annotations

import json
import struct
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from legoc.errors import UserError
from legoc.runtime.estimate import Profiles
from legoc.runtime.solver import MIB, Budget, Problem, solve

EM_AARCH64 = 183

# A stem and a head around two prunable blocks; the stem's output skips to the head, so the
# frame has a tensor with two consumers (block0 and frame1).
TINY = textwrap.dedent('''
    import torch
    from torch import nn


    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.b1 = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1))
            self.b2 = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1))
            self.head = nn.Linear(8, 4)

        def forward(self, x):
            y = torch.relu(self.stem(x))
            z = self.b2(torch.relu(self.b1(y))) + y
            return self.head(z.mean((2, 3)))


    def build_model():
        return Tiny().eval()


    def example_inputs():
        return (torch.randn(1, 3, 8, 8),)
''')


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.py"
    path.write_text(TINY)
    return path


@pytest.fixture(scope="module")
def nano(tiny, artifact):
    """The tiny model compiled for jetson-nano with --devices cpu,gpu."""
    return artifact(str(tiny), "jetson-nano", ratios=(0.0, 0.5), blocks=2, retrain_epochs=0,
                    devices=("cpu", "gpu")).artifact


def _manifest(path) -> dict:
    return json.loads((path / "manifest.json").read_text())


# ---------------------------------------------------------------------------------------------
# options


@pytest.mark.parametrize("target, devices, message", [
    ("host", "cpu,gpu", "--devices chooses between the CPU and the GPU of a Jetson; target host has a CPU only: "
                        "drop --devices"),
    ("jetson-nano:cpu", "cpu", "--devices chooses between the CPU and the GPU of a Jetson; target jetson-nano:cpu "
                               "has a CPU only: drop --devices"),
    ("jetson-nano", "cpu,tpu", "unknown device 'tpu' in --devices; devices: cpu, gpu"),
    ("jetson-nano", "cpu", "--devices cpu leaves out the GPU of jetson-nano; for its CPU alone use "
                           "--target jetson-nano:cpu"),
    ("jetson-nano", "gpu,gpu", "--devices names a device twice: gpu,gpu"),
])
def test_devices_option_errors_are_one_line(tiny, tmp_path, capsys, target, devices, message):
    from legoc.cli import main

    out = tmp_path / "o.lego"
    code = main(["compile", str(tiny), "--target", target, "--devices", devices, "-o", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == f"legoc: error: {message}"
    assert not out.exists()


def test_default_is_the_targets_own_device():
    from legoc.targets.table import device_targets, get_target

    nano = get_target("jetson-nano")
    assert device_targets(nano) == {"gpu": nano}
    assert device_targets(nano, ("gpu",)) == {"gpu": nano}
    both = device_targets(nano, ("cpu", "gpu"))
    assert list(both) == ["gpu", "cpu"] and both["cpu"] == get_target("jetson-nano:cpu")


# ---------------------------------------------------------------------------------------------
# the artifact


def test_manifest_holds_both_modules_with_checksums_and_sources(nano):
    from legoc.runtime.artifact import sha256_file
    from legoc.targets import cuda
    from legoc.targets.calibration import TRANSFERS

    m = _manifest(nano)
    dev = m["devices"]
    assert (dev["default"], dev["choices"], dev["frame"]) == ("gpu", ["gpu", "cpu"], "gpu")
    assert dev["targets"]["cpu"]["name"] == "jetson-nano:cpu" and dev["targets"]["cpu"]["device"] == "cpu"
    plan = cuda.Plan.of("ptx65:nvrtc11", "sm_53")
    blocks = [s for s in m["segments"] if s["kind"] == "block"]
    assert len(blocks) == 2 and all(len(s["variants"]) == 2 for s in blocks)
    for seg in m["segments"]:
        for v in seg["variants"]:
            if seg["kind"] == "frame":
                assert "devices" not in v        # the frame runs on the default device only
                continue
            cpu = v["devices"]["cpu"]
            files = [v["module"], v["weights"], cpu["module"], cpu["weights"]]
            for entry in files:
                assert sha256_file(nano / entry["file"]) == entry["sha256"]
                assert (nano / entry["file"]).stat().st_size == entry["bytes"]
            assert v["module"]["file"] != cpu["module"]["file"]
            # prepacked CPU weights are other arrays than the GPU's: their own file and names
            assert v["weights"]["file"] != cpu["weights"]["file"] and v["weights"]["names"] != cpu["weights"]["names"]
            gpu_lib = (nano / v["module"]["file"]).read_bytes()
            cpu_lib = (nano / cpu["module"]["file"]).read_bytes()
            for lib in (gpu_lib, cpu_lib):
                assert lib[:4] == b"\x7fELF" and struct.unpack_from("<H", lib, 18)[0] == EM_AARCH64
            verified = cuda.verify(gpu_lib, plan, tools=False)   # the Nano's PTX (ISA 6.5, sm_53)
            assert (verified.fmt, verified.arch) == ("ptx", "sm_53")
            with pytest.raises(UserError, match="no CUDA module"):
                cuda.extract(cpu_lib)                            # the CPU module has no GPU code
            gpu_ms, cpu_ms = v["profile"]["latency_ms"], cpu["profile"]["latency_ms"]
            assert gpu_ms["source"] == cpu_ms["source"] == "estimated"
            assert "Cortex-A57" in cpu_ms["how"] and "Maxwell" in gpu_ms["how"]
            # per MAC the Nano's GPU is the faster (a module this small may still be faster on the
            # CPU: a GPU module's figure holds the extra launch cost of a GPU call)
            from legoc.targets.calibration import CALL_OVERHEAD_MS
            assert cpu_ms["value"] > gpu_ms["value"] - (CALL_OVERHEAD_MS["cuda"] - CALL_OVERHEAD_MS["cpu"]) > 0
    # every boundary tensor with its bytes and its estimated copy time
    transfer = dev["transfer"]
    cal = TRANSFERS["jetson-nano"]
    assert transfer["source"] == "estimated" and transfer["bandwidth_gb_s"] == cal.bandwidth_gb_s
    tensors = transfer["tensors"]
    assert {n: (t["from"], t["to"]) for n, t in tensors.items()} == {
        "x": ("input", ["frame0"]), "relu": ("frame0", ["block0", "frame1"]), "relu_1": ("block0", ["block1"]),
        "b2_2": ("block1", ["frame1"]), "head": ("frame1", ["output"])}
    for name, t in tensors.items():
        meta = next(s["tensors"][name] for s in m["segments"] if name in s["tensors"])
        count = 1
        for d in meta["shape"]:
            count *= d
        assert t["bytes"] == 4 * count
        assert t["ms"] == pytest.approx(cal.per_copy_ms + t["bytes"] / (cal.bandwidth_gb_s * 1e9) * 1e3, rel=1e-12)


def test_inspect_and_select_show_devices(nano, capsys):
    from legoc.cli import main

    assert main(["inspect", str(nano)]) == 0
    out = capsys.readouterr().out
    assert "gpu ~" in out and "cpu ~" in out
    assert main(["select", str(nano), "--latency-ms", "100"]) == 0
    out = capsys.readouterr().out
    # equal accuracy on both devices: the solver takes the fastest, all on the GPU here
    assert "devices: gpu,gpu" in out and "of which CPU<->GPU copies:" in out


# ---------------------------------------------------------------------------------------------
# the runtime's plan (no GPU here: checked without executing)


def test_runtime_plan_places_modules_and_copies(nano):
    from legoc.runtime.model import Copy, Model, Run

    m = Model(nano)
    steps = m.plan([0, 1], ["cpu", "gpu"])
    assert steps == (
        Copy("x", "cpu", "gpu", 768),                       # the input starts in host memory
        Run("frame0", 0, "gpu", "modules/frame0/frame.so", ("x",), ("relu",)),
        Copy("relu", "gpu", "cpu", 2048),
        Run("block0", 0, "cpu", "modules/block0/r0.00.cpu.so", ("relu",), ("relu_1",)),
        Copy("relu_1", "cpu", "gpu", 2048),
        Run("block1", 1, "gpu", "modules/block1/r0.50.so", ("relu_1",), ("b2_2",)),
        Run("frame1", 0, "gpu", "modules/frame1/frame.so", ("b2_2", "relu"), ("head",)),   # relu: still on the GPU
        Copy("head", "gpu", "cpu", 16),                     # the output back to host memory
    )
    # the plan's copies are exactly what the estimator charges, for every device assignment
    prof, tensors = m.profiles, _manifest(nano)["devices"]["transfer"]["tensors"]
    for devices in prof.all_device_choices():
        copies = [s for s in m.plan([0, 0], devices) if isinstance(s, Copy)]
        assert len({c.tensor for c in copies}) == len(copies)
        assert sum(tensors[c.tensor]["ms"] for c in copies) == pytest.approx(prof.transfer_ms(devices), rel=1e-12)
    assert m.plan(devices="cpu")[3] == Run("block0", 0, "cpu", "modules/block0/r0.00.cpu.so", ("relu",), ("relu_1",))
    with pytest.raises(UserError, match="no modules for device 'tpu': it was compiled for gpu, cpu"):
        m.plan([0, 0], ["tpu", "cpu"])
    with pytest.raises(UserError, match="need one device per block"):
        m.configure([0, 0], devices=["cpu"])
    with pytest.raises(UserError, match="compiled for target 'jetson-nano'.*cannot run"):
        m.configure([0, 0], devices="cpu")                  # aarch64 modules on this x86 machine


def test_old_manifest_without_devices_still_loads(nano, tmp_path):
    """A manifest from before --devices (no ``devices`` anywhere) is the default device alone."""
    import shutil

    from legoc.runtime.model import Copy, Model, Run

    old = tmp_path / "old.lego"
    shutil.copytree(nano, old)
    m = _manifest(old)
    del m["devices"]
    for s in m["segments"]:
        for v in s["variants"]:
            v.pop("devices", None)
    from legoc.targets.rpc import write_manifest

    write_manifest(old, m)     # with its digest, as legoc rewrites manifests
    model = Model(old)
    prof = model.profiles
    assert prof.devices == ("gpu",) and prof.transfers == [] and prof.transfer_ms() == 0.0
    steps = model.plan([1, 0])
    assert [type(s) for s in steps] == [Copy, Run, Run, Run, Run, Copy]
    assert all(s.device == "gpu" for s in steps if isinstance(s, Run))
    with pytest.raises(UserError, match="no modules for device 'cpu'.*compile with --devices cpu,gpu"):
        model.plan([0, 0], "cpu")
    assert prof.latency_ms([0, 0]) == pytest.approx(sum(v.latency_ms for v in prof.chosen([0, 0]) + prof.frame)
                                                    + prof.call_overhead_ms * 4)


# ---------------------------------------------------------------------------------------------
# synthetic artifacts (conftest's board_manifest): frame0 -> block0 -> ... -> frame1, plus a skip
# tensor frame0 -> frame1


def test_estimate_of_a_mixed_plan_is_latencies_plus_copies(board_manifest):
    # binary fractions: the sums below are exact in floating point
    prof = Profiles(board_manifest([[(0.0, 1.0, 0.5), (0.01, 0.75, 0.25)], [(0.0, 2.0, 4.0), (0.02, 1.5, 3.0)]],
                                   {"x": 0.125, "f0": 0.0625, "b0": 0.5, "b1": 0.25, "y": 0.125},
                                   frame_ms=0.25, overhead=0.03125))
    est = prof.estimate([1, 0], ["cpu", "gpu"])
    # block0 r1 on the cpu (0.25), block1 r0 on the gpu (2.0), frames 2 x 0.25, overhead 4 x 1/32;
    # copies: f0 to the cpu (block0), b0 back to the gpu; x and y stay where the frame is (gpu) and
    # host: the input and output copies are paid in every plan (frame on the gpu)
    transfers = 0.0625 + 0.5 + 0.125 + 0.125
    assert est.transfer_ms == transfers
    assert est.latency_ms == 0.25 + 2.0 + 0.5 + 4 * 0.03125 + transfers
    assert est.sources["transfer"] == ["estimated"]
    assert prof.transfer_ms(["gpu", "gpu"]) == 0.125 + 0.125                  # input and output only
    assert prof.transfer_ms(["gpu", "cpu"]) == 0.125 + 0.125 + 0.5 + 0.25     # b0 to the cpu, b1 back (f0 stays)
    # memory is the chosen device's module and weights
    assert prof.memory_bytes([0, 0], ["cpu", "cpu"]) - prof.memory_bytes([0, 0]) == 2 * 1000
    assert est.accuracy == pytest.approx(0.9 - 0.01)


def _brute(prof: Profiles, budget: Budget):
    """Every (variant, device) assignment: the most accurate within budget, fastest among those."""
    best = None
    for choice in prof.all_choices():
        for devices in prof.all_device_choices():
            e = prof.estimate(choice, devices)
            if budget.latency_ms is not None and e.latency_ms > budget.latency_ms:
                continue
            if budget.memory_mb is not None and e.memory_bytes > budget.memory_mb * MIB:
                continue
            key = (round(e.accuracy, 9), -e.latency_ms)
            if best is None or key > best[0]:
                best = (key, choice, devices, e)
    return best


variants = st.tuples(st.integers(0, 5).map(lambda k: k / 100), st.floats(0.1, 5.0), st.floats(0.1, 5.0))
block_lists = st.lists(st.lists(variants, min_size=1, max_size=3), min_size=1, max_size=3)
copy_costs = st.fixed_dictionaries({k: st.floats(0.0, 2.0) for k in ("x", "f0", "b0", "b1", "b2", "y")})


@settings(max_examples=60, deadline=None)
@given(block_lists, copy_costs, st.floats(0.0, 1.0), st.floats(0.3, 1.0))
def test_device_choice_equals_brute_force(board_manifest, blocks, copies, lat_frac, mem_frac):
    prof = Profiles(board_manifest(blocks, copies, weight_bytes=100_000))
    every = [prof.estimate(c, d) for c in prof.all_choices() for d in prof.all_device_choices()]
    lats, mems = [e.latency_ms for e in every], [e.memory_bytes for e in every]
    budget = Budget(latency_ms=min(lats) + lat_frac * (max(lats) - min(lats)) + 1e-3,
                    memory_mb=(min(mems) + mem_frac * (max(mems) - min(mems))) / MIB + 1e-6)
    best = _brute(prof, budget)
    if best is None:
        with pytest.raises(UserError, match="no configuration meets the budget"):
            solve([Problem(prof, budget)])
        return
    sel = solve([Problem(prof, budget)], switch_penalty=0.0)
    assert sel.optimal and len(sel.devices) == len(blocks) and set(sel.devices) <= {"cpu", "gpu"}
    e = sel.estimate
    assert e == prof.estimate(sel.choice, sel.devices)
    assert e.latency_ms <= budget.latency_ms + 1e-9 and e.memory_bytes <= budget.memory_mb * MIB
    assert e.accuracy == pytest.approx(best[3].accuracy, abs=1e-9)
    # the fastest of the most accurate (ties are the rule: accuracy does not depend on the device)
    assert e.latency_ms == pytest.approx(best[3].latency_ms, abs=1e-5)


@pytest.fixture(scope="module")
def chain(board_manifest):
    """Profiles of two blocks of one variant each, (gpu_ms, cpu_ms); copies of f0, b0, b1 (x, y: none)."""
    return lambda block0, block1, copies: Profiles(board_manifest([[(0.0, *block0)], [(0.0, *block1)]], copies))


def test_transfer_cost_makes_all_gpu_win_over_mixed(chain):
    # block0 is faster on the cpu, but moving its input and output across costs more than it saves
    prof = chain((1.0, 0.75), (1.0, 5.0), {"f0": 0.5, "b0": 0.5, "b1": 0.5})
    blocks_only = {d: sum(c.latency_ms for c in prof.chosen([0, 0], d)) for d in [("cpu", "gpu"), ("gpu", "gpu")]}
    assert blocks_only[("cpu", "gpu")] < blocks_only[("gpu", "gpu")]          # without copies: mixed
    assert prof.latency_ms([0, 0], ["gpu", "gpu"]) < prof.latency_ms([0, 0], ["cpu", "gpu"])
    sel = solve([Problem(prof, Budget(latency_ms=100))])
    assert sel.devices == ("gpu", "gpu") and sel.estimate.transfer_ms == 0.0
    assert solve([Problem(prof, Budget(latency_ms=2.6))]).devices == ("gpu", "gpu")


def test_transfer_cost_makes_all_cpu_win_over_mixed(chain):
    # block1 alone would go to the gpu, but the big tensor between the blocks makes that dearer
    prof = chain((3.0, 0.25), (1.0, 1.25), {"f0": 0.5, "b0": 1.0, "b1": 0.5})
    assert prof.latency_ms([0, 0], ["cpu", "cpu"]) < prof.latency_ms([0, 0], ["cpu", "gpu"])
    sel = solve([Problem(prof, Budget(latency_ms=100))])
    assert sel.devices == ("cpu", "cpu")
    assert sel.estimate.transfer_ms == 0.5 + 0.5     # f0 to the cpu, b1 back to the frame's gpu


def test_mixed_plan_wins_when_copies_are_cheap_enough(chain):
    prof = chain((3.0, 0.25), (1.0, 5.0), {"f0": 0.5, "b0": 0.5, "b1": 0.5})
    lat = {d: prof.latency_ms([0, 0], d) for d in prof.all_device_choices()}
    assert min(lat, key=lat.get) == ("cpu", "gpu")
    sel = solve([Problem(prof, Budget(latency_ms=lat[("cpu", "gpu")] + 0.01))])
    assert sel.devices == ("cpu", "gpu") and sel.estimate.latency_ms == pytest.approx(lat[("cpu", "gpu")])
    with pytest.raises(UserError, match=f"smallest latency {lat[('cpu', 'gpu')]:.2f} ms"):
        solve([Problem(prof, Budget(latency_ms=lat[("cpu", "gpu")] - 0.01))])


def test_switch_charge_counts_the_device(chain):
    # equal accuracy everywhere and block0 faster on the gpu; the configuration in use (block0 on
    # the cpu) is loaded, block0's gpu module is not: staying is free, moving costs a load
    prof = chain((1.0, 1.5), (1.0, 5.0), {"f0": 0.0, "b0": 0.0, "b1": 0.0})
    sticky = solve([Problem(prof, Budget(latency_ms=100), current=[0, 0], current_devices=["cpu", "gpu"],
                            loaded={(0, 0, "cpu"), (1, 0, "gpu")})])
    assert sticky.devices == ("cpu", "gpu")
    moved = solve([Problem(prof, Budget(latency_ms=100), current=[0, 0], current_devices=["cpu", "gpu"],
                           loaded={(0, 0, "cpu"), (0, 0, "gpu"), (1, 0, "gpu")})])
    assert moved.devices == ("gpu", "gpu")     # both cached: no charge, and the gpu is faster
