"""legoc: a compiler-style model transformer for runtime-adaptive DNNs.

The top-level folders passes/, targets/ and runtime/ install as legoc.passes,
legoc.targets and legoc.runtime (package_dir mapping), so site-packages only
ever gains the one top-level name `legoc`.
"""
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
ROOTS = {"legoc": "legoc", "legoc.passes": "passes", "legoc.targets": "targets", "legoc.runtime": "runtime"}


def _packages() -> dict[str, str]:
    """Every package under the mapped folders (subpackages such as legoc.targets.schedules too)."""
    out = {}
    for name, folder in ROOTS.items():
        for init in sorted((HERE / folder).rglob("__init__.py")):
            rel = init.parent.relative_to(HERE / folder).parts
            if name == "legoc" and rel and rel[0] in ("passes", "targets", "runtime"):
                continue   # links to the top-level folders in some checkouts; mapped above
            out[".".join((name, *rel))] = "/".join((folder, *rel))
    return out


PACKAGES = _packages()

setup(
    name="legoc",
    version="0.1.0",
    description="Compile PyTorch CNNs into block-swappable, runtime-scalable TVM artifacts",
    python_requires=">=3.11",
    packages=list(PACKAGES),
    package_dir=PACKAGES,
    package_data={"legoc.targets": ["*.json"]},
    install_requires=[
        # legoc.runtime's own needs (selection, weights, signatures); it runs modules with TVM's
        # runtime: `legoc[runtime]`. `legoc[compile]` is everything `legoc compile` needs. The
        # pinned versions are in requirements.txt, which `make` installs first.
        "numpy",
        "safetensors",
        "ortools",
        "cryptography",
    ],
    extras_require={
        "runtime": ["apache-tvm==0.27.0.post1", "apache-tvm-ffi==0.1.14.post1"],
        # ONNX input also needs onnx2torch, installed without its dependencies (requirements-nodeps.txt)
        "compile": ["apache-tvm==0.27.0.post1", "apache-tvm-ffi==0.1.14.post1", "torch==2.13.0", "networkx>=3.2",
                    "onnx>=1.16", "rich>=13", "matplotlib>=3.7", "ziglang>=0.11"],
    },
    entry_points={"console_scripts": ["legoc=legoc.cli:main"]},
)
