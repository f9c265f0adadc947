"""Reliability (issue 17): bad inputs end in one clear line (exit code 2, no traceback, nothing
written at the output path)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

def _compile(*args):
    """`legoc compile` in a subprocess: what a user sees on the terminal."""
    return subprocess.run([sys.executable, "-m", "legoc", "compile", *args, "--no-progress"],
                          capture_output=True, text=True, cwd=ROOT)


def _one_line(r) -> str:
    """The one error line (warnings, one line each, may come before it)."""
    lines = [x for x in r.stderr.strip().splitlines() if not x.startswith("legoc: warning: ")]
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and len(lines) == 1, r.stderr
    return lines[0]


def test_example_inputs_that_do_not_fit_the_model_name_torchs_reason(tmp_path, tiny_model_source):
    path = tmp_path / "model.py"
    path.write_text(tiny_model_source(5))
    err = _one_line(_compile(str(path), "-o", str(tmp_path / "o.lego")))
    assert "the model fails on its example_inputs()" in err
    assert "expected input[1, 5, 16, 16] to have 3 channels, but got 5 channels" in err
    assert "ShapeProp" not in err and "nn_module_stack" not in err
    assert not (tmp_path / "o.lego").exists()


@pytest.mark.parametrize("where", ["under-a-file", "is-a-file"])
def test_an_output_that_cannot_be_written_fails_before_any_work(tmp_path, where, tiny_model_source):
    path = tmp_path / "model.py"
    path.write_text(tiny_model_source())
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    out = blocker / "sub" / "o.lego" if where == "under-a-file" else blocker
    err = _one_line(_compile(str(path), "-o", str(out)))
    assert err.startswith("legoc: error: cannot write the artifact at") and "choose another -o" in err
    assert blocker.read_text() == "x"


def test_a_compile_prints_no_deprecation_noise_from_dependencies(tmp_path, tiny_model_source):
    path = tmp_path / "model.py"
    path.write_text(tiny_model_source())
    from legoc.runtime import load
    from legoc.runtime.signing import keygen

    private, public = keygen(tmp_path / "key")     # and the compile signs what it writes
    r = _compile(str(path), "-o", str(tmp_path / "o.lego"), "--ratios", "0,0.5", "--sign", str(private))
    assert r.returncode == 0, r.stderr
    assert "FutureWarning" not in r.stderr and "LeafSpec" not in r.stderr, r.stderr
    assert (tmp_path / "o.lego" / "manifest.sig").is_file()
    assert len(load(tmp_path / "o.lego", public_key=public).blocks) >= 1     # verified, then loaded


def test_the_package_declares_what_compile_and_runtime_need():
    # `pip install legoc[compile]` must give a working `legoc compile`, `legoc[runtime]` a runtime
    from importlib.metadata import requires

    reqs = requires("legoc")
    def names(extra):   # noqa: E306
        return {r.split(";")[0].split("=")[0].split(">")[0].strip() for r in reqs
                if (f'extra == "{extra}"' in r) == (extra is not None)}
    assert {"numpy", "safetensors", "ortools", "cryptography"} <= names(None)
    assert {"apache-tvm", "apache-tvm-ffi"} <= names("runtime")
    assert {"apache-tvm", "torch", "networkx", "onnx", "rich"} <= names("compile")
