"""legoc: a compiler-style model transformer for runtime-adaptive DNNs.

The top-level folders passes/, targets/ and runtime/ install as legoc.passes,
legoc.targets and legoc.runtime (package_dir mapping), so site-packages only
ever gains the one top-level name `legoc`.
"""
from setuptools import setup

PACKAGES = {
    "legoc": "legoc",
    "legoc.passes": "passes",
    "legoc.targets": "targets",
    "legoc.runtime": "runtime",
}

setup(
    name="legoc",
    version="0.1.0",
    description="Compile PyTorch CNNs into block-swappable, runtime-scalable TVM artifacts",
    python_requires=">=3.11",
    packages=list(PACKAGES),
    package_dir=PACKAGES,
    package_data={"legoc.targets": ["*.json"]},
    install_requires=[
        # The runtime needs only these; the compiler side also needs torch, apache-tvm, networkx
        # (pinned in requirements.txt, which `make` installs first).
        "numpy",
        "safetensors",
        "ortools",
    ],
    entry_points={"console_scripts": ["legoc=legoc.cli:main"]},
)
