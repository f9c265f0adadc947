"""The bad-input catalog (issue 17): every case ends in one line that says what is wrong and what
to do — exit code 2 from the CLI, a UserError from the Python API — with no traceback, and
nothing written or changed at the output path."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from legoc.cli import main
from legoc.errors import UserError

ROOT = Path(__file__).resolve().parent.parent

# -------------------------------------------------------------------------------- compile

def compile_cases(good: str) -> dict:
    return {
    # name: (model source or None for a missing file, extra CLI args, expected text)
    "missing model file": (None, [], "no such model file"),
    "syntax error": ("def build_model(:\n", [], "SyntaxError"),
    "no factory": ("x = 1\n", [], "defines no build_model()"),
    "factory raising": ("def build_model():\n    raise ValueError('no weights')\ndef example_inputs():\n    return ()\n",
                        [], "build_model() raised ValueError: no weights"),
    "example_inputs not tensors": (good.replace("return (torch.zeros(1, 3, 16, 16),)", "return ([1, 2, 3],)"), [],
                                   "example_inputs"),
    "inputs not matching the model": (good.replace("zeros(1, 3,", "zeros(1, 5,"), [],
                                      "expected input[1, 5, 16, 16] to have 3 channels"),
    "untraceable control flow": (good.replace("def build_model():", '''class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, padding=1)
    def forward(self, x):
        if x.sum() > 0:
            return self.c(x)
        return self.c(-x)

def build_model():
    return Branchy().eval()

def unused():'''), [], "cannot trace Branchy with torch.fx"),
    "nothing to prune": ('''import torch
from torch import nn
def build_model():
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 4)).eval()
def example_inputs():
    return (torch.zeros(1, 12),)
''', [], "nothing"),
    "unknown target": (good, ["--target", "pi-zero"], "unknown target 'pi-zero'; valid targets: host,"),
    "malformed target json": (good, ["--target", "BADJSON"], "target"),
    "ratio 1": (good, ["--ratios", "0,1"], "ratio"),
    "negative ratio": (good, ["--ratios", "0,-0.5"], "ratio"),
    "non-numeric ratio": (good, ["--ratios", "0,half"], "--ratios takes comma-separated numbers"),
    "zero blocks": (good, ["--blocks", "0"], "blocks"),
    "negative retrain epochs": (good, ["--retrain-epochs", "-1"], "--retrain-epochs"),
    "round-to zero": (good, ["--round-to", "0"], "--round-to"),
    "sign key missing": (good, ["--sign", "NOKEY"], "no such private key file"),
}


@pytest.mark.parametrize("case", list(compile_cases("")))
def test_compile(case, tmp_path, capsys, tiny_model_source):
    source, extra, expected = compile_cases(tiny_model_source())[case]
    model = tmp_path / "model.py"
    if source is not None:
        model.write_text(source)
    (tmp_path / "BADJSON.json").write_text("{not json")
    extra = [str(tmp_path / "BADJSON.json") if a == "BADJSON" else str(tmp_path / a) if a == "NOKEY" else a
             for a in extra]
    out = tmp_path / "out.lego"
    _one_line(capsys, ["compile", str(model), "-o", str(out), "--no-progress", "--retrain-epochs", "0", *extra],
              expected)
    assert not out.exists() and not list(tmp_path.glob(".out.lego*"))


# ------------------------------------------------------------------- artifacts on the CLI


def _artifact_cases(art: Path, tmp: Path, good: str = "") -> dict:
    """name: (function that damages a copy of the artifact or writes inputs, CLI args, expected)."""
    def manifest_edit(fn):
        def damage(a):
            from legoc.targets.rpc import write_manifest

            m = json.loads((a / "manifest.json").read_text())
            fn(m)
            write_manifest(a, m)
        return damage

    x = tmp / "x.npy"
    return {
        "not an artifact directory": (lambda a: shutil.rmtree(a), ["inspect", "A"], "no such artifact directory"),
        "a file, not an artifact": (lambda a: (shutil.rmtree(a), a.write_text("x")), ["select", "A"],
                                    "no such artifact directory"),
        "truncated manifest": (lambda a: (a / "manifest.json").write_text('{"schema": "legoc.artifact/1", "segm'),
                               ["inspect", "A"], "manifest"),
        "future schema": (manifest_edit(lambda m: m.update(schema="legoc.artifact/9")), ["inspect", "A"],
                          "is not 'legoc.artifact/1'; compile it again"),
        "missing module": (lambda a: [p.unlink() for p in (a / "modules").rglob("r0.00.so")],
                           ["run", "A", "--input", str(x)], "missing file"),
        "tampered weights": (lambda a: [_flip(p) for p in (a / "weights").rglob("r0.00.safetensors")],
                             ["run", "A", "--input", str(x)], "checksum mismatch"),
        "input of wrong shape": (lambda a: np.save(x, np.zeros((1, 3, 8, 8), np.float32)),
                                 ["run", "A", "--input", str(x)], "must have shape"),
        "input of wrong dtype": (lambda a: np.save(x, np.zeros((1, 3, 32, 32), np.uint8)),
                                 ["run", "A", "--input", str(x)], "must be a floating-point array"),
        "two inputs for one": (lambda a: None, ["run", "A", "--input", str(x), "--input", str(x)], "inputs"),
        "input not npy": (lambda a: x.write_text("hello"), ["run", "A", "--input", str(x)],
                          "cannot read it as a .npy array"),
        "variants of wrong length": (lambda a: None, ["run", "A", "--input", str(x), "--variants", "0"],
                                     "needs one index per block"),
        "variant out of range": (lambda a: None, ["run", "A", "--input", str(x), "--variants", "9,0,0,0"],
                                 "has variants 0..1, got 9"),
        "variants not numbers": (lambda a: None, ["run", "A", "--input", str(x), "--variants", "a,b"], "variants"),
        "negative budget": (lambda a: None, ["select", "A", "--latency-ms", "-1"], "latency_ms must be a positive"),
        "nan budget": (lambda a: None, ["select", "A", "--latency-ms", "nan"], "latency_ms must be a positive"),
        "infeasible budget": (lambda a: None, ["select", "A", "--latency-ms", "0.000001"],
                              "no configuration meets the budget"),
        "memory budget zero": (lambda a: None, ["select", "A", "--memory-mb", "0"], "memory_mb must be a positive"),
        "artifact for another machine": (manifest_edit(lambda m: m["target"].update(triple="aarch64-linux-gnu",
                                                                                    name="raspberry-pi-4")),
                                         ["run", "A", "--input", str(x)], "aarch64"),
        "evaluate without test_data": (lambda a: (tmp / "m.py").write_text(good), ["evaluate", "A", str(tmp / "m.py")],
                                       "test_data"),
        "profile with no tracker": (lambda a: None, ["profile", "A", "--rpc", "127.0.0.1:9", "--device-key", "pi"],
                                    "127.0.0.1:9"),
        "public key of the wrong kind": (lambda a: None, ["run", "A", "--input", str(x), "--public-key", str(x)],
                                         "not a PEM public key"),
        "export without ONNX modules": (lambda a: None, ["export", "A", "--onnx", str(tmp / "m.onnx")],
                                        "has no ONNX module (the artifact was compiled without them)"),
        "export variant out of range": (lambda a: None, ["export", "A", "--onnx", str(tmp / "m.onnx"),
                                                         "--variants", "9,0,0,0"], "has variants 0..1, not 9"),
        "export into a missing folder": (lambda a: None, ["export", "A", "--onnx", str(tmp / "no" / "m.onnx")],
                                         "does not exist; create it or choose another output"),
    }


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


CLI_ARTIFACT_CASES = list(_artifact_cases(Path("A"), Path("T")))


@pytest.mark.parametrize("case", CLI_ARTIFACT_CASES)
def test_artifact_cli(case, artifact, tmp_path, capsys, tiny_model_source):
    art = tmp_path / "a.lego"
    shutil.copytree(artifact("vgg_chain").artifact, art)
    np.save(tmp_path / "x.npy", np.zeros((1, 3, 32, 32), np.float32))
    damage, args, expected = _artifact_cases(art, tmp_path, tiny_model_source())[case]
    damage(art)
    before = _snapshot(art)
    _one_line(capsys, [str(art) if a == "A" else a for a in args], expected)
    assert _snapshot(art) == before     # nothing written or changed
    assert not [p.name for p in tmp_path.iterdir() if p.name not in ("a.lego", "x.npy", "m.py")]


def _snapshot(path: Path) -> dict:
    if not path.is_dir():
        return {"file": path.read_bytes()} if path.exists() else {}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------ Python API


def test_python_api(artifact, tmp_path):
    from legoc.runtime import Scheduler, load

    m = load(artifact("vgg_chain").artifact)
    n = len(m.blocks)
    x = np.zeros(m.input_shapes[0], np.float32)
    cases = [
        (lambda: load(tmp_path / "none.lego"), "no such artifact directory"),
        (lambda: load(artifact("vgg_chain").artifact, num_threads=0), "num_threads must be a positive integer"),
        (lambda: m.configure(variants=[0] * (n + 1)), "needs one index per block"),
        (lambda: m.configure(variants=[-1] + [0] * (n - 1)), "has variants 0..1, got -1"),
        (lambda: m.configure(latency_ms=float("nan")), "latency_ms must be a positive number"),
        (lambda: m.configure(latency_ms=-3), "latency_ms must be a positive number"),
        (lambda: m.configure(memory_mb=math.inf), "memory_mb must be a positive number"),
        (lambda: m.configure(latency_ms=1e-6), "no configuration meets the budget"),
        (lambda: m(x, x), "the model takes 1 inputs"),
        (lambda: m(x[:, :2]), "must have shape"),
        (lambda: m(x.astype(np.int32)), "must be a floating-point array"),
        (lambda: m("an image"), "must be a floating-point array"),
        (lambda: Scheduler([]), "Scheduler needs at least one model"),
        (lambda: Scheduler([m], weights=[1, 2]), "1 models but 2 weights"),
        (lambda: Scheduler([m]).configure(latency_ms=[1.0], period_ms=1.0), "either per-model latency_ms or one"),
        (lambda: Scheduler([m]).configure(latency_ms=[1.0, 2.0]), "one value per model"),
    ]
    for call, expected in cases:
        with pytest.raises(UserError) as info:
            call()
        msg = str(info.value)
        assert expected in msg and "\n" not in msg, (expected, msg)


# ---------------------------------------------------------------------------------- helper


def _one_line(capsys, argv: list[str], expected: str) -> str:
    capsys.readouterr()
    code = main(argv)
    captured = capsys.readouterr()
    errors = [x for x in captured.err.strip().splitlines() if not x.startswith("legoc: warning: ")]
    assert code == 2, (code, captured.err)
    assert len(errors) == 1 and errors[0].startswith("legoc: error: "), captured.err
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    assert expected in errors[0], (expected, errors[0])
    return errors[0]
