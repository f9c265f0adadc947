"""The CLI: exit codes 0/2/1, one-line errors, atomic artifacts, cross targets never skipped."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from legoc.cli import main

ROOT = Path(__file__).resolve().parent.parent


def _run(*args):
    return subprocess.run([sys.executable, "-m", "legoc", *args], capture_output=True, text=True, cwd=ROOT)


def test_targets_lists_the_table():
    r = _run("targets")
    assert r.returncode == 0
    for name in ("host", "raspberry-pi-4", "jetson-nano", "jetson-orin-nano"):
        assert name in r.stdout


def test_unknown_target_is_a_user_error(capsys):
    code = main(["compile", str(ROOT / "examples" / "vgg_chain.py"), "--target", "pi-zero"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("legoc: error: unknown target 'pi-zero'; valid targets: host,") and "\n" not in err


@pytest.mark.parametrize("source,expected", [
    (None, "no such model file"),
    ("x = 1\n", "defines no build_model()"),
    ("def build_model():\n    raise RuntimeError('boom')\ndef example_inputs():\n    return ()\n",
     "build_model() raised RuntimeError: boom"),
    ("import nonexistent_module_xyz\n", "importing it raised ModuleNotFoundError"),
    ("import torch\ndef build_model():\n    return 3\ndef example_inputs():\n    return (torch.zeros(1),)\n",
     "build_model() returned int, not a torch.nn.Module"),
])
def test_bad_model_files_are_one_line_user_errors(tmp_path, capsys, source, expected):
    path = tmp_path / "model.py"
    if source is not None:
        path.write_text(source)
    code = main(["compile", str(path), "-o", str(tmp_path / "o.lego"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and expected in err and "\n" not in err, err
    assert not (tmp_path / "o.lego").exists()


def test_untraceable_model_names_file_and_line(tmp_path, capsys):
    path = tmp_path / "model.py"
    path.write_text(
        "import torch\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.c = torch.nn.Conv2d(3, 3, 3)\n"
        "    def forward(self, x):\n"
        "        if x.mean() > 0:\n"
        "            x = x * 2\n"
        "        return self.c(x)\n"
        "def build_model():\n    return Net()\n"
        "def example_inputs():\n    return (torch.randn(1, 3, 8, 8),)\n")
    code = main(["compile", str(path), "-o", str(tmp_path / "o.lego"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert f"cannot trace Net with torch.fx at {path}:7 (`if x.mean() > 0:`)" in err


def test_interrupted_compile_leaves_nothing(tmp_path, monkeypatch, capsys):
    import legoc.targets.build as build

    real, calls = build.build_module, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash in the middle of a compile")
        return real(*a, **k)

    monkeypatch.setattr(build, "build_module", flaky)
    out = tmp_path / "o.lego"
    code = main(["compile", str(ROOT / "examples" / "vgg_chain.py"), "-o", str(out), "--ratios", "0,0.5", "--no-progress"])
    assert code == 1
    assert "internal error" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_compile_and_inspect(tmp_path):
    out = tmp_path / "vgg.lego"
    r = _run("compile", "examples/vgg_chain.py", "-o", str(out), "--ratios", "0,0.5", "--blocks", "2", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "2 blocks × 2 variants" in r.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["schema"] == "legoc.artifact/1" and manifest["target"]["name"] == "host"
    blocks = [s for s in manifest["segments"] if s["kind"] == "block"]
    assert len(blocks) == 2
    for s in blocks:
        assert [v["ratio"] for v in s["variants"]] == [0.0, 0.5]
        for v in s["variants"]:
            assert len(v["module"]["sha256"]) == 64 and v["macs"] > 0 and v["param_bytes"] > 0
            assert (out / v["module"]["file"]).is_file() and (out / v["weights"]["file"]).is_file()
    for s in manifest["segments"]:
        for v in s["variants"]:
            assert v["profile"]["latency_ms"]["source"] == "measured-local" and v["profile"]["latency_ms"]["value"] > 0
            assert v["profile"]["peak_activation_bytes"]["value"] >= 4 * 3 * 32 * 32   # at least the input
    r = _run("inspect", str(out))
    assert r.returncode == 0 and "block1" in r.stdout and "r0.50" in r.stdout and "latency (ms)" in r.stdout
    assert not list(out.rglob("*.pkl")) and not list(out.rglob("*.pt"))


@pytest.mark.parametrize("target", ["raspberry-pi-4", "jetson-nano"])
def test_cross_targets_build_aarch64_libraries(target, artifact):
    from legoc.runtime import load
    from legoc.errors import UserError

    rep = artifact("vgg_chain", target=target, ratios=(0.0, 0.5))
    manifest = json.loads((rep.artifact / "manifest.json").read_text())
    assert manifest["target"]["name"] == target and manifest["target"]["triple"] == "aarch64-linux-gnu"
    for seg in manifest["segments"]:
        for v in seg["variants"]:
            head = (rep.artifact / v["module"]["file"]).read_bytes()[:20]
            assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == 183  # EM_AARCH64
    assert all(v["profile"]["latency_ms"]["source"] == "estimated" and v["profile"]["latency_ms"]["value"] > 0
               for s in manifest["segments"] for v in s["variants"])
    with pytest.raises(UserError, match=f"compiled for target '{target}'.*cannot run"):
        load(rep.artifact).configure()


def test_evaluate_errors_are_one_line(tmp_path, capsys):
    code = main(["evaluate", str(tmp_path / "missing.lego"), str(ROOT / "examples" / "mnist_resnet.py")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "no such artifact directory" in err and "\n" not in err
    r = _run("evaluate", "--help")
    assert r.returncode == 0 and "test_data()" in r.stdout and "--record" in r.stdout
