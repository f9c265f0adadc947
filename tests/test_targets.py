"""legoc.targets: the target table, custom JSON targets, and builds for host/aarch64/cuda.

The aarch64 builds link with zig; the first zig link on a machine takes ~90 s (zig builds libc++
for aarch64 once and caches it in the environment's zig-cache), later ones well under a second.
"""
from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from legoc.errors import InternalError, UserError

EM_AARCH64 = 183
EM_X86_64 = 62

UNKNOWN_MESSAGE = (
    "unknown target 'xyz'; valid targets: host, jetson-nano, jetson-orin-nano, jetson-tx2, "
    "jetson-xavier-nx, raspberry-pi-3, raspberry-pi-4, raspberry-pi-5 "
    "(or a path to a target .json; NAME:cpu for a Jetson's CPU alone)"
)


# ---------------------------------------------------------------------------------------------
# helpers (test-only)


def load_and_run_local(path, inputs: list[np.ndarray], params: list[np.ndarray]):
    """Run a built library on this machine the way legoc.runtime does; outputs as numpy."""
    import tvm  # noqa: PLC0415
    from tvm.runtime.vm import VirtualMachine  # noqa: PLC0415

    lib = tvm.runtime.load_module(str(path))
    vm = VirtualMachine(lib, tvm.cpu())
    args = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in [*inputs, *params]]
    out = vm["main"](*args)
    if isinstance(out, tvm.runtime.Tensor):
        return [out.numpy()]
    return [o.numpy() for o in out]


def elf_header(path: Path) -> tuple[int, int, int]:
    """(EI_CLASS, e_type, e_machine) of a little-endian ELF file."""
    head = path.read_bytes()[:20]
    assert head[:4] == b"\x7fELF", f"{path} is not ELF"
    assert head[5] == 1, "expected little-endian"
    e_type, e_machine = struct.unpack_from("<HH", head, 16)
    return head[4], e_type, e_machine


def cuda_module_format(data: bytes) -> str:
    """The stored format of the CUDA module serialized in a TVM library blob.

    The blob holds, per module: kind (u64 length + bytes), payload (u64 length + bytes); a CUDA
    payload starts with its format string: "cuda" (source), "ptx", "cubin" or "fatbin".
    """
    key = struct.pack("<Q", 4) + b"cuda"
    pos = data.find(key)
    while pos >= 0:
        at = pos + len(key) + 8  # skip the payload length
        (n,) = struct.unpack_from("<Q", data, at)
        if 0 < n < 16:
            return data[at + 8: at + 8 + n].decode()
        pos = data.find(key, pos + 1)
    raise AssertionError("no serialized CUDA module found")


TARGETS_NANO_JSON = {
    "name": "nano", "device": "cuda", "target": {"kind": "cuda", "arch": "sm_53"},
    "host": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a57"},
    "triple": "aarch64-linux-gnu", "linker": "zig-aarch64",
}


def relclose(got: np.ndarray, want: np.ndarray, rel: float = 1e-4) -> bool:
    scale = max(float(np.abs(want).max()), 1e-6)
    return float(np.abs(got - want).max()) <= rel * scale


# ---------------------------------------------------------------------------------------------
# the table


def test_import_is_light():
    code = (
        "import sys, legoc.targets, legoc.targets.table as t; "
        "t.get_target('raspberry-pi-4'); "
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('tvm', 'torch', 'numpy')]; "
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_table_lookups():
    from legoc.targets import TARGETS, get_target, list_targets

    names = [s.name for s in list_targets()]
    assert names == sorted(names)
    for required in ("host", "raspberry-pi-4", "jetson-nano", "jetson-orin-nano",
                     "raspberry-pi-3", "raspberry-pi-5", "jetson-tx2", "jetson-xavier-nx"):
        assert required in TARGETS and required in names

    rpi4 = get_target("raspberry-pi-4")
    assert rpi4.device == "cpu" and rpi4.host is None
    assert rpi4.target == {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72"}
    assert (rpi4.triple, rpi4.linker, rpi4.runs_here) == ("aarch64-linux-gnu", "zig-aarch64", False)
    assert rpi4.device_code == "native"

    nano = get_target("jetson-nano")
    assert nano.device == "cuda"
    assert nano.target == {"kind": "cuda", "arch": "sm_53"}
    assert nano.host == {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a57"}
    assert nano.device_code == "ptx65:nvrtc11" and not nano.runs_here
    assert get_target("jetson-tx2").device_code == "ptx65:nvrtc11"
    assert get_target("jetson-xavier-nx").device_code == "cubin:nvrtc11"
    assert get_target("jetson-orin-nano").device_code == "cubin:nvrtc12"

    # a Jetson's CPU alone (NAME:cpu): its host target, native device code
    nano_cpu = get_target("jetson-nano:cpu")
    assert nano_cpu.name == "jetson-nano:cpu" and nano_cpu.device == "cpu"
    assert nano_cpu.target == nano.host and nano_cpu.host is None
    assert (nano_cpu.triple, nano_cpu.linker, nano_cpu.device_code) == (
        "aarch64-linux-gnu", "zig-aarch64", "native")
    with pytest.raises(UserError, match="unknown target 'raspberry-pi-4:cpu'"):
        get_target("raspberry-pi-4:cpu")

    orin = get_target("jetson-orin-nano")
    assert orin.target["arch"] == "sm_87" and orin.host["mcpu"] == "cortex-a78ae"
    assert get_target("jetson-xavier-nx").host["mcpu"] == "carmel"
    assert get_target("jetson-tx2").target["arch"] == "sm_62"

    host = get_target("host")
    assert host.device == "cpu" and host.runs_here and host.linker == "native"
    assert host.target["kind"] == "llvm" and host.triple.endswith("-linux-gnu")
    assert host is get_target("host")  # detected once

    # to_json is JSON-able, complete, and a copy
    for spec in list_targets():
        data = json.loads(json.dumps(spec.to_json()))
        assert data["name"] == spec.name and data["target"] == spec.target
        data["target"]["kind"] = "changed"
        assert spec.target["kind"] != "changed"
        assert hash(spec) == hash(spec)


def test_every_target_is_valid_for_tvm():
    import tvm.target.codegen as codegen

    from legoc.targets import list_targets

    for spec in list_targets():
        tgt = spec.tvm_target()
        assert str(tgt.kind.name) == spec.target["kind"]
        llvm = spec.host or spec.target
        if "mcpu" in llvm:
            assert codegen.llvm_is_valid_cpu(llvm["mcpu"], spec.triple), spec.name
        if spec.host:
            assert str(tgt.host.kind.name) == "llvm"


def test_unknown_target_message():
    from legoc.targets import get_target

    with pytest.raises(UserError) as info:
        get_target("xyz")
    assert str(info.value) == UNKNOWN_MESSAGE


def _custom(**over):
    data = {
        "name": "my-board",
        "description": "an aarch64 board",
        "device": "cpu",
        "target": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a55"},
        "triple": "aarch64-linux-gnu",
        "linker": "zig-aarch64",
        "board_software": "Debian 12 arm64 with the apache-tvm 0.27 runtime",
    }
    data.update(over)
    return data


def test_custom_json_target(tmp_path):
    from legoc.targets import get_target

    path = tmp_path / "board.json"
    path.write_text(json.dumps(_custom()))
    spec = get_target(str(path))
    assert spec.name == "my-board" and spec.target["mcpu"] == "cortex-a55"
    assert spec.host is None and spec.runs_here is False and spec.device_code == "native"
    assert spec.tvm_target().kind.name == "llvm"

    # a built-in's to_json written under a new name round-trips
    nano = get_target("jetson-nano").to_json()
    nano["name"] = "my-nano"
    path2 = tmp_path / "nano.json"
    path2.write_text(json.dumps(nano))
    again = get_target(str(path2))
    assert again.to_json() == nano


@pytest.mark.parametrize(
    "over, field",
    [
        ({"device": "gpu"}, "device"),
        ({"linker": "gcc"}, "linker"),
        ({"triple": "riscv64-linux-gnu"}, "triple"),
        ({"target": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-z99"}},
         "target.mcpu"),
        ({"target": {"kind": "llvm", "mtriple": "x86_64-linux-gnu"}}, "target.mtriple"),
        ({"target": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "bogus": 1}}, "target"),
        ({"target": "llvm"}, "target"),
        ({"device": "cuda", "target": {"kind": "cuda", "arch": "sm_53"}}, "host"),
        ({"device_code": "cubin:nvrtc12"}, "device_code"),
        ({"device": "cuda", "target": {"kind": "cuda", "arch": "sm_53"}, "device_code": "sass",
          "host": {"kind": "llvm", "mtriple": "aarch64-linux-gnu"}}, "device_code"),
        ({"device": "cuda", "target": {"kind": "cuda"}, "device_code": "cubin:nvrtc12",
          "host": {"kind": "llvm", "mtriple": "aarch64-linux-gnu"}}, "target"),
        ({"runs_here": True}, "runs_here"),
        ({"colour": "red"}, "colour"),
        ({"name": "raspberry-pi-4"}, "name"),
        ({"name": ""}, "name"),
    ],
)
def test_custom_json_target_invalid(tmp_path, over, field):
    from legoc.targets import get_target

    path = tmp_path / "bad.json"
    path.write_text(json.dumps(_custom(**over)))
    with pytest.raises(UserError) as info:
        get_target(str(path))
    message = str(info.value)
    assert str(path) in message and f"field '{field}'" in message, message
    assert "\n" not in message


def test_custom_json_missing_field_and_bad_file(tmp_path):
    from legoc.targets import get_target

    data = _custom()
    del data["linker"]
    path = tmp_path / "nolinker.json"
    path.write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"field 'linker' is missing"):
        get_target(str(path))

    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(UserError, match=r"is not valid JSON"):
        get_target(str(broken))

    with pytest.raises(UserError, match=r"does not exist"):
        get_target(str(tmp_path / "missing.json"))


# ---------------------------------------------------------------------------------------------
# builds

torch = pytest.importorskip("torch")


class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.relu = torch.nn.ReLU(inplace=True)
        self.pool = torch.nn.MaxPool2d(2)
        self.fc = torch.nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        y = self.pool(self.relu(self.bn(self.conv(x))))
        return self.fc(torch.flatten(y, 1))


class TwoOut(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(4, 6, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(6)
        self.b = torch.nn.Conv2d(4, 6, 1)
        self.gap = torch.nn.AdaptiveAvgPool2d(1)

    def forward(self, x, z):
        y = torch.relu(self.bn(self.a(x))) + self.b(x)
        up = torch.nn.functional.interpolate(y, scale_factor=2, mode="nearest")
        return torch.cat([up, z], dim=1), self.gap(y).flatten(1)


def _randomize_bn(module):
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=gen))
                m.bias.copy_(torch.randn(m.num_features, generator=gen))
    return module.eval()


def _convnet():
    torch.manual_seed(0)
    gm = torch.fx.symbolic_trace(_randomize_bn(ConvNet()))
    return gm.eval(), (torch.randn(1, 3, 8, 8),)


def test_host_build_matches_torch(tmp_path):
    from legoc.targets import get_target
    from legoc.targets.build import build_module

    gm, inputs = _convnet()
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    code_before = gm.code
    out = tmp_path / "sub" / "convnet.so"
    t0 = time.perf_counter()
    built = build_module(gm, inputs, get_target("host"), out, name="convnet")
    print(f"host build: {time.perf_counter() - t0:.2f} s")

    # the input module is untouched (BN still there, same weights)
    assert gm.code == code_before and isinstance(gm.bn, torch.nn.BatchNorm2d)
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())

    assert built.path == out and out.is_file()
    assert [p.name for p in tmp_path.joinpath("sub").iterdir()] == ["convnet.so"]  # no temp left
    assert elf_header(out) == (2, 3, EM_X86_64)  # 64-bit shared object
    assert built.num_inputs == 1 and built.num_outputs == 1
    # BN folded into the conv: only conv and fc weights, no running stats
    assert built.param_names == ["p_conv_weight", "p_conv_bias", "p_fc_weight", "p_fc_bias"]
    assert [p.shape for p in built.params] == [(8, 3, 3, 3), (8,), (10, 128), (10,)]
    assert all(p.dtype == np.float32 for p in built.params)

    with torch.no_grad():
        want = gm(*inputs).numpy()
    got = load_and_run_local(out, [x.numpy() for x in inputs], built.params)
    assert len(got) == 1 and got[0].shape == want.shape
    assert relclose(got[0], want)

    # weights are real run-time inputs: new weights change the result as in torch
    scaled = [p * 2 if name == "p_fc_weight" else p for name, p in zip(built.param_names,
                                                                        built.params)]
    got2 = load_and_run_local(out, [x.numpy() for x in inputs], scaled)
    fc_bias = gm.fc.bias.detach().numpy()
    assert relclose(got2[0] - fc_bias, 2 * (want - fc_bias))


def test_host_build_two_outputs(tmp_path):
    from legoc.targets import get_target
    from legoc.targets.build import build_module

    torch.manual_seed(1)
    gm = torch.fx.symbolic_trace(_randomize_bn(TwoOut()))
    inputs = (torch.randn(1, 4, 6, 6), torch.randn(1, 2, 12, 12))
    built = build_module(gm, inputs, get_target("host"), tmp_path / "two.so", name="two")
    assert built.num_inputs == 2 and built.num_outputs == 2
    assert "p_bn_weight" not in built.param_names and len(built.params) == 4

    with torch.no_grad():
        want = [t.numpy() for t in gm(*inputs)]
    got = load_and_run_local(built.path, [x.numpy() for x in inputs], built.params)
    assert [g.shape for g in got] == [w.shape for w in want]
    assert all(relclose(g, w) for g, w in zip(got, want))


def test_runtime_only_loading(tmp_path):
    """legoc.runtime's path: TVM_USE_RUNTIME_LIB=1, tvm.runtime.vm.VirtualMachine."""
    from legoc.targets import get_target
    from legoc.targets.build import build_module

    gm, inputs = _convnet()
    built = build_module(gm, inputs, get_target("host"), tmp_path / "m.so")
    np.save(tmp_path / "x.npy", inputs[0].numpy())
    for i, p in enumerate(built.params):
        np.save(tmp_path / f"p{i}.npy", p)
    script = f"""
import sys, numpy as np, tvm
from tvm.runtime.vm import VirtualMachine
assert "tvm.relax" not in sys.modules
lib = tvm.runtime.load_module({str(built.path)!r})
vm = VirtualMachine(lib, tvm.cpu())
args = [np.load({str(tmp_path)!r} + "/x.npy")]
args += [np.load({str(tmp_path)!r} + f"/p{{i}}.npy") for i in range({len(built.params)})]
out = vm["main"](*[tvm.runtime.tensor(a) for a in args])
np.save({str(tmp_path)!r} + "/out.npy", out.numpy())
"""
    env = {**__import__("os").environ, "TVM_USE_RUNTIME_LIB": "1"}
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=120)
    with torch.no_grad():
        want = gm(*inputs).numpy()
    assert relclose(np.load(tmp_path / "out.npy"), want)


def test_raspberry_pi_4_build_is_aarch64(tmp_path, monkeypatch):
    from legoc.targets import get_target
    from legoc.targets.build import build_module

    monkeypatch.setenv("LEGOC_CACHE", str(tmp_path / "cache"))
    gm, inputs = _convnet()
    t0 = time.perf_counter()
    built = build_module(gm, inputs, get_target("raspberry-pi-4"), tmp_path / "rpi.so")
    print(f"raspberry-pi-4 build: {time.perf_counter() - t0:.2f} s")
    assert elf_header(built.path) == (2, 3, EM_AARCH64)
    assert built.param_names == ["p_conv_weight", "p_conv_bias", "p_fc_weight", "p_fc_bias"]
    wrappers = list((tmp_path / "cache").glob("zig-c++-aarch64-linux-gnu-*.sh"))
    assert len(wrappers) == 1 and wrappers[0].stat().st_mode & 0o111
    assert b"__tvm_ffi__library_bin" in built.path.read_bytes()


JETSON_FORMS = [
    # target, format in the artifact, arch, what CUDA's tools report
    ("jetson-nano", "ptx", "sm_53", "ptxas 12.2 -arch=sm_53: assembled"),
    ("jetson-tx2", "ptx", "sm_62", "ptxas 12.2 -arch=sm_62: assembled"),
    ("jetson-xavier-nx", "cubin", "sm_72", "sm=72, toolkit=117"),
    ("jetson-orin-nano", "cubin", "sm_87", "sm=87, toolkit=122"),
]


@pytest.mark.parametrize("name, fmt, arch, tool", JETSON_FORMS)
def test_jetson_build_carries_loadable_gpu_code(tmp_path, name, fmt, arch, tool):
    """Each Jetson's GPU code is built here in the form its JetPack loads, and CUDA's own tools
    confirm format and architecture (cuobjdump for cubins, ptxas at the declared ISA for PTX)."""
    from legoc.targets import cuda, get_target
    from legoc.targets.build import build_module

    gm, inputs = _convnet()
    spec = get_target(name)
    t0 = time.perf_counter()
    built = build_module(gm, inputs, spec, tmp_path / f"{name}.so")
    print(f"{name} build: {time.perf_counter() - t0:.2f} s")
    assert elf_header(built.path) == (2, 3, EM_AARCH64)
    assert built.num_inputs == 1 and built.num_outputs == 1 and len(built.params) == 4
    data = built.path.read_bytes()
    assert cuda_module_format(data) == fmt
    assert b'extern "C" __global__' not in data  # no source left: nothing to compile on the board

    code = cuda.extract(data)
    if fmt == "cubin":
        assert code.data[:4] == b"\x7fELF" and code.data[7] == 0x33  # CUDA ELF
        assert int.from_bytes(code.data[18:20], "little") == 190  # EM_CUDA
        assert code.data[48] == int(arch[3:])  # e_flags: SASS architecture
    else:
        text = code.data.decode()
        assert "\n.version 6.5\n" in text and f"\n.target {arch}\n" in text
        assert text.count(".visible .entry ") >= 3  # conv, pool, matmul... launchable kernels
    verified = cuda.verify(data, cuda.Plan.of(spec.device_code, arch))
    assert (verified.fmt, verified.arch) == (fmt, arch) and tool in verified.tool


def test_ptx_isa_check_has_teeth():
    """ptxas rejects PTX that claims an ISA too old for what it uses: the ISA 6.5 check is real."""
    from legoc.errors import InternalError as Internal
    from legoc.targets import cuda

    plan = cuda.Plan.of("ptx65:nvrtc11", "sm_53")
    ptx = cuda.compile_source(
        'extern "C" __global__ void k(float* x) { x[threadIdx.x] = __shfl_sync(0xffffffff, x[0], 1); }',
        plan).decode()
    assert ".version 6.5" in ptx
    cuda._ptxas(ptx, "sm_53")  # shfl.sync exists since ISA 6.0: accepted
    with pytest.raises(Internal, match="ptxas rejects"):
        cuda._ptxas(ptx.replace(".version 6.5", ".version 5.0"), "sm_53")


def test_nvrtc_leaves_the_text_encoding_alone():
    """NVRTC 11 switches its thread's locale to "C"; legoc puts it back, or every later open()
    and subprocess text decode in the process would be ASCII (a real failure seen in the suite)."""
    import locale

    from legoc.targets import cuda

    before = locale.getpreferredencoding(False)
    for device_code, arch in (("ptx65:nvrtc11", "sm_53"), ("cubin:nvrtc11", "sm_72"), ("cubin:nvrtc12", "sm_87")):
        cuda.compile_source('extern "C" __global__ void k(float* x) { x[0] = 1.0f; }',
                            cuda.Plan.of(device_code, arch))
        assert locale.getpreferredencoding(False) == before, device_code


def test_custom_cuda_target_default_is_cubin(tmp_path):
    """A custom cuda target without device_code gets an NVRTC 12 cubin for its arch."""
    from legoc.targets import cuda
    from legoc.targets.build import build_module
    from legoc.targets.table import target_from_dict

    spec = target_from_dict(json.loads(json.dumps(TARGETS_NANO_JSON)))
    assert spec.device_code == "cubin:nvrtc12"
    gm, inputs = _convnet()
    built = build_module(gm, inputs, spec, tmp_path / "nano.so")
    verified = cuda.verify(built.path.read_bytes(), cuda.Plan.of(spec.device_code, "sm_53"))
    assert (verified.fmt, verified.arch) == ("cubin", "sm_53") and "sm=53, toolkit=122" in verified.tool


def test_errors_are_one_line(tmp_path):
    from legoc.targets import get_target
    from legoc.targets.build import build_module

    gm, inputs = _convnet()
    bad_inputs = (torch.randn(1, 5, 8, 8),)  # wrong channel count: torch.export fails
    with pytest.raises(InternalError) as info:
        build_module(gm, bad_inputs, get_target("host"), tmp_path / "bad.so", name="block3")
    message = str(info.value)
    assert message.startswith("torch.export could not export block3 for target host: ")
    assert message.endswith("; this is a legoc bug, please report it")
    assert "\n" not in message and info.value.__cause__ is not None
    assert not (tmp_path / "bad.so").exists()
