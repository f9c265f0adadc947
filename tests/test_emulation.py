"""aarch64 artifacts proven by running them: legoc's own runtime, under qemu-aarch64, with an
aarch64 CPython and the aarch64 TVM runtime wheels (``legoc.targets.emulation``), must give the
host build's outputs within 1e-4.

The emulation setup is made once and cached (``python -m legoc.targets.emulation setup``, which
``make setup`` runs). In CI (``CI`` set) a missing emulator fails the test; locally,
``LEGOC_SKIP_EMULATION=1`` skips it.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

from legoc.errors import UserError

TARGETS = ("raspberry-pi-4", "jetson-nano:cpu")
MODEL = "cifar_resnet"
RATIOS = (0.0, 0.5)

# Run inside the emulated aarch64 Python: legoc.runtime only (no torch, no TVM compiler).
DEVICE_SCRIPT = r"""
import json, platform, sys, time
import numpy as np
t0 = time.perf_counter()
from legoc.runtime import load
assert "torch" not in sys.modules and "tvm.relax" not in sys.modules
art, x_path, out_path, choices = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
m = load(art)
x = np.load(x_path)
outs = {}
for k, choice in enumerate(choices):
    outs[f"y{k}"] = np.asarray(m.configure(variants=choice)(x))
np.savez(out_path, **outs)
print(json.dumps({"machine": platform.machine(), "target": m.target["name"],
                  "seconds": round(time.perf_counter() - t0, 1)}))
"""


@pytest.fixture(scope="session")
def emulator():
    from legoc.targets import emulation

    if os.environ.get("LEGOC_SKIP_EMULATION") == "1" and not os.environ.get("CI"):
        pytest.skip("LEGOC_SKIP_EMULATION=1 (never honoured in CI)")
    t0 = time.perf_counter()
    emu = emulation.setup(log=lambda m: print(f"emulation: {m}"))
    print(f"emulation ready after {time.perf_counter() - t0:.1f} s")
    return emu


def test_setup_is_cached_and_complete(emulator):
    from legoc.targets import emulation

    assert emulation.find() == emulator
    info = json.loads((emulator.root / emulation.READY).read_text())
    assert len(info["debs"]) == len(emulation.DEBS) and len(info["wheels"]) == len(emulation.WHEELS)
    assert any(w.startswith("apache_tvm-0.27.0.post1-") and "aarch64" in w for w in info["wheels"])
    # the Python in the sysroot really is an aarch64 ELF, run by qemu (x86 hosts)
    head = (emulator.sysroot / "usr" / "bin" / "python3.11").read_bytes()[:20]
    assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == 183  # EM_AARCH64
    # a second setup returns at once without touching anything
    t0 = time.perf_counter()
    assert emulation.setup(log=lambda m: None) == emulator
    assert time.perf_counter() - t0 < 5


def test_half_finished_setup_is_not_ready(tmp_path, monkeypatch):
    from legoc.targets import emulation

    monkeypatch.setenv("LEGOC_CACHE", str(tmp_path))
    root = emulation.emulation_root()
    (root / "sysroot").mkdir(parents=True)  # e.g. a setup killed after renaming
    assert emulation.find() is None
    with pytest.raises(UserError, match="emulation is not set up"):
        emulation.require()


@pytest.mark.parametrize("target", TARGETS)
def test_aarch64_artifact_runs_under_qemu_like_host(emulator, artifact, target, tmp_path):
    from legoc.runtime import load

    host = artifact(MODEL, target="host", ratios=RATIOS)
    cross = artifact(MODEL, target=target, ratios=RATIOS)
    manifest = json.loads((cross.artifact / "manifest.json").read_text())
    assert manifest["target"]["name"] == target and manifest["target"]["triple"] == "aarch64-linux-gnu"
    blocks = len(cross.partition.blocks)
    choices = [[0] * blocks, [1] * blocks, [k % 2 for k in range(blocks)]]

    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "device.py").write_text(DEVICE_SCRIPT)
    from legoc.targets import emulation

    t0 = time.perf_counter()
    proc = emulation.run([str(tmp_path / "device.py"), str(cross.artifact), str(tmp_path / "x.npy"),
                          str(tmp_path / "y.npz"), json.dumps(choices)],
                         stage=tmp_path / "stage", capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{target} under qemu: {report} (wall {time.perf_counter() - t0:.1f} s)")
    assert report["machine"] == "aarch64" and report["target"] == target

    got = np.load(tmp_path / "y.npz")
    m = load(host.artifact)
    worst = 0.0
    for k, choice in enumerate(choices):
        want = np.asarray(m.configure(variants=choice)(x))
        assert got[f"y{k}"].shape == want.shape
        diff = float(np.abs(got[f"y{k}"] - want).max())
        worst = max(worst, diff)
        assert diff <= 1e-4 * max(1.0, float(np.abs(want).max())), (choice, diff)
    # the variants differ from each other, so the comparison above could catch a wrong swap
    assert float(np.abs(got["y0"] - got["y1"]).max()) > 1e-3
    print(f"{target}: max |aarch64 - host| = {worst:.2e}")
