"""This machine's architecture as legoc's targets and artifacts name it (no heavy imports)."""
from __future__ import annotations

import platform

_ARCH = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}


def machine_arch() -> str:
    """This machine's architecture as library triples name it ("x86_64", "aarch64")."""
    machine = platform.machine().lower()
    return _ARCH.get(machine, machine)


def machine_triple() -> str:
    """The library triple of this machine ("x86_64-linux-gnu" or "aarch64-linux-gnu")."""
    return f"{machine_arch()}-linux-gnu"
