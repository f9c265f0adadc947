"""Packaging promises: one top-level name in the wheel; the runtime imports no torch."""
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_has_only_the_legoc_top_level(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("legoc-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"legoc"}
    for sub in ("passes", "targets", "runtime"):
        assert f"legoc/{sub}/__init__.py" in names
    for init in ROOT.glob("*/*/__init__.py"):   # every subpackage of the mapped folders ships too
        top, sub = init.parent.parent.name, init.parent.name
        if top in ("passes", "targets", "runtime") and sub != "__pycache__":
            assert f"legoc/{top}/{sub}/__init__.py" in names


def test_runtime_import_pulls_no_torch_and_no_compiler_passes():
    code = ("import sys, legoc.runtime; "
            "bad = [m for m in ('torch', 'legoc.passes', 'legoc.pipeline', 'tvm.relax') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_no_bare_package_is_importable():
    r = subprocess.run([sys.executable, "-c", "import passes"], capture_output=True, text=True, cwd="/")
    assert r.returncode != 0
