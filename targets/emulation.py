"""An aarch64 Linux userland run under ``qemu-aarch64`` (Debian ``qemu-user``): the stand-in board.

No Raspberry Pi or Jetson is at hand, so aarch64 artifacts are proven by running them here: an
aarch64 CPython 3.11 (Debian bookworm arm64 .debs unpacked with ``dpkg -x`` into a sysroot: no
multiarch install, the system's dpkg is not touched) plus the aarch64 wheels of the TVM runtime,
numpy and safetensors unzipped into a folder, then::

    qemu-aarch64 -L SYSROOT SYSROOT/usr/bin/python3.11 script.py

``python -m legoc.targets.emulation setup`` builds it once into
``legoc.paths.cache_dir()/emulation/<key>/`` (key: a hash of everything fetched). The folder is
built under a temporary name and renamed into place when complete, so a half-finished setup is
never taken for a finished one; a file lock keeps two setups from racing. ``status`` says whether
it is ready; ``run SCRIPT ARGS`` runs an aarch64 Python with legoc's own package on its path.

Timings measured under emulation mean nothing for a real board: this checks that code runs and
what it computes, not how fast.
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from legoc.errors import UserError
from legoc.paths import cache_dir

QEMU = "qemu-aarch64"
DEBIAN_SUITES = (
    ("http://deb.debian.org/debian", "bookworm"),
    ("http://deb.debian.org/debian-security", "bookworm-security"),
)
DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
# CPython 3.11 and the shared libraries it, numpy's and TVM's wheels load (no perl, no dpkg).
DEBS = (
    "python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib", "media-types",
    "libc6", "libgcc-s1", "gcc-12-base", "libstdc++6", "zlib1g", "libexpat1", "libffi8",
    "libssl3", "libbz2-1.0", "liblzma5", "libuuid1", "libsqlite3-0", "libncursesw6", "libtinfo6",
    "libreadline8", "libnsl2", "libtirpc3", "libtirpc-common", "libgssapi-krb5-2", "libkrb5-3",
    "libk5crypto3", "libkrb5support0", "libkeyutils1", "libcom-err2", "libcrypt1", "libdb5.3",
    "libgdbm6", "libzstd1",
)
PYTHON_VERSION = "3.11"
# The TVM runtime as the boards install it (the same pins as requirements.txt), what legoc's
# runtime imports, and what TVM's RPC server needs.
WHEELS = (
    "apache-tvm==0.27.0.post1", "apache-tvm-ffi==0.1.14.post1", "numpy==2.4.6", "ml_dtypes==0.6.0",
    "safetensors==0.8.0", "typing_extensions==4.16.0", "cloudpickle==3.1.2", "psutil==7.2.2",
)
WHEEL_PLATFORMS = ("manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64")  # glibc 2.36
LAYOUT_VERSION = 1
READY = "ready.json"


def _key() -> str:
    text = json.dumps([LAYOUT_VERSION, DEBIAN_SUITES, DEBS, PYTHON_VERSION, WHEELS, WHEEL_PLATFORMS])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def emulation_root() -> Path:
    """Where the finished setup lives (it may not exist yet)."""
    return cache_dir() / "emulation" / _key()


@dataclass(frozen=True)
class Emulator:
    """A finished aarch64 setup: run aarch64 Python under qemu with :meth:`command`."""

    root: Path

    @property
    def sysroot(self) -> Path:
        return self.root / "sysroot"

    @property
    def site(self) -> Path:
        return self.root / "site"

    @property
    def python(self) -> Path:
        """A host-executable wrapper that runs the aarch64 python3.11 under qemu (what
        ``sys.executable`` is inside, so subprocesses of the emulated Python work too)."""
        return self.root / "bin" / "python3"

    def env(self, extra_path: list[Path] | None = None) -> dict[str, str]:
        """The environment of an emulated run: the TVM runtime library only (no compiler)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
        paths = [str(p) for p in (extra_path or [])] + [str(self.site)]
        env.update(PYTHONPATH=os.pathsep.join(paths), TVM_USE_RUNTIME_LIB="1",
                   PYTHONNOUSERSITE="1", PYTHONDONTWRITEBYTECODE="1")
        return env

    def command(self, *args: str) -> list[str]:
        return [str(self.python), *args]


# ---------------------------------------------------------------------------------------------
# checks


def qemu_path() -> str:
    path = shutil.which(QEMU)
    if path is None:
        raise UserError(
            f"{QEMU} is not installed: run `apt-get install qemu-user` (Debian) or "
            "`make emulation`, which installs it"
        )
    return path


def find() -> Emulator | None:
    """The finished setup, or None."""
    root = emulation_root()
    return Emulator(root) if (root / READY).is_file() else None


def require() -> Emulator:
    """The finished setup and qemu, or a UserError saying how to make them."""
    qemu_path()
    emu = find()
    if emu is None:
        raise UserError(
            f"the aarch64 emulation is not set up in {emulation_root()}: run "
            "`python -m legoc.targets.emulation setup` (or `make emulation`)"
        )
    return emu


# ---------------------------------------------------------------------------------------------
# setup


def _run(cmd: list[str], what: str, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise UserError(f"{what} failed ({' '.join(cmd[:3])} …): {' | '.join(tail)}")
    return proc


def install_qemu() -> str:
    """qemu-aarch64, installed with apt-get when missing and we are root."""
    if shutil.which(QEMU):
        return shutil.which(QEMU)
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        qemu_path()  # raises with the instruction
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    _run(["apt-get", "update", "-q"], "apt-get update", env=env)
    _run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "qemu-user"],
         "apt-get install qemu-user", env=env)
    return qemu_path()


def _fetch_debs(work: Path, log) -> list[Path]:
    """Download the arm64 .debs with a private apt state (the system's apt is not changed)."""
    apt = work / "apt"
    for sub in ("state/lists/partial", "cache/archives/partial", "debs"):
        (apt / sub).mkdir(parents=True, exist_ok=True)
    (apt / "state" / "status").touch()
    sources = "".join(f"deb [arch=arm64 signed-by={DEBIAN_KEYRING}] {url} {suite} main\n"
                      for url, suite in DEBIAN_SUITES)
    (apt / "sources.list").write_text(sources)
    opts = [f"-oDir::State={apt / 'state'}", f"-oDir::State::status={apt / 'state' / 'status'}",
            f"-oDir::Cache={apt / 'cache'}", f"-oDir::Etc::SourceList={apt / 'sources.list'}",
            "-oDir::Etc::SourceParts=/dev/null", "-oAPT::Architecture=arm64",
            "-oAPT::Architectures=arm64", "-oDebug::NoLocking=1", "-q"]
    log("fetching the Debian arm64 package lists")
    _run(["apt-get", *opts, "update"], "apt-get update (arm64 lists)")
    log(f"downloading {len(DEBS)} arm64 .debs")
    _run(["apt-get", *opts, "download", *DEBS], "apt-get download (arm64)", cwd=apt / "debs")
    debs = sorted((apt / "debs").glob("*.deb"))
    if len(debs) != len(DEBS):
        raise UserError(f"expected {len(DEBS)} arm64 .debs, got {len(debs)}")
    return debs


def _fetch_wheels(work: Path, log) -> list[Path]:
    dest = work / "wheels"
    dest.mkdir()
    log(f"downloading {len(WHEELS)} aarch64 wheels")
    _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
          *(f"--platform={p}" for p in WHEEL_PLATFORMS), "--python-version", PYTHON_VERSION,
          "--implementation", "cp", "-d", str(dest), *WHEELS], "pip download (aarch64 wheels)")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != len(WHEELS):
        raise UserError(f"expected {len(WHEELS)} aarch64 wheels, got {[w.name for w in wheels]}")
    return wheels


def _write_wrapper(root: Path, final_root: Path) -> None:
    """bin/python3: runs the sysroot's python3.11 under qemu; its argv[0] (``-0``) is the wrapper
    itself, so the emulated ``sys.executable`` can start more emulated Pythons."""
    sysroot, wrapper = final_root / "sysroot", final_root / "bin" / "python3"
    script = (
        "#!/bin/sh\n"
        "# made by legoc.targets.emulation: aarch64 CPython under qemu-user\n"
        f'PYTHONHOME="{sysroot}/usr" exec {QEMU} -L "{sysroot}" -0 "{wrapper}" '
        f'"{sysroot}/usr/bin/python{PYTHON_VERSION}" "$@"\n'
    )
    (root / "bin").mkdir()
    path = root / "bin" / "python3"
    path.write_text(script)
    path.chmod(0o755)


def setup(log=print) -> Emulator:
    """Make the emulation setup if it is not there yet (idempotent; 14 s measured the first time
    here, plus installing qemu-user; a few milliseconds once made). Returns it."""
    install_qemu()
    final = emulation_root()
    if (final / READY).is_file():
        return Emulator(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another setup may be running: wait for it
        if (final / READY).is_file():
            return Emulator(final)
        if final.exists():  # no ready.json: a broken leftover; start again
            shutil.rmtree(final)
        t0 = time.perf_counter()
        work = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            debs = _fetch_debs(work, log)
            wheels = _fetch_wheels(work, log)
            log("unpacking into the sysroot")
            for deb in debs:
                _run(["dpkg-deb", "-x", str(deb), str(work / "sysroot")], f"dpkg-deb -x {deb.name}")
            for wheel in wheels:
                with zipfile.ZipFile(wheel) as z:
                    z.extractall(work / "site")
            for leftover in ("apt", "wheels"):
                shutil.rmtree(work / leftover)
            _write_wrapper(work, final)
            os.rename(work, final)
            _smoke_test(Emulator(final), log)
            info = {"debs": [d.name for d in debs], "wheels": [w.name for w in wheels],
                    "seconds": round(time.perf_counter() - t0, 1), "qemu": qemu_version()}
            tmp = final / (READY + ".tmp")
            tmp.write_text(json.dumps(info, indent=1))
            os.replace(tmp, final / READY)  # the setup counts as finished from here on
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            shutil.rmtree(final, ignore_errors=True)
            raise
        log(f"aarch64 emulation ready in {final} ({info['seconds']:.0f} s)")
        return Emulator(final)


def _smoke_test(emu: Emulator, log) -> None:
    log("checking: aarch64 python imports the TVM runtime under qemu")
    code = ("import platform, numpy, tvm, safetensors; from tvm.runtime.vm import VirtualMachine; "
            "print(platform.machine(), tvm.__version__)")
    proc = subprocess.run(emu.command("-c", code), env=emu.env(), capture_output=True,
                          text=True, timeout=600)
    if proc.returncode != 0 or not proc.stdout.startswith("aarch64"):
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        raise UserError(f"the emulated aarch64 python does not start: {tail}")


def qemu_version() -> str:
    out = subprocess.run([qemu_path(), "--version"], capture_output=True, text=True).stdout
    return out.splitlines()[0] if out else "unknown"


# ---------------------------------------------------------------------------------------------
# legoc's own package for the emulated Python


def stage_legoc(dest: Path) -> Path:
    """Copy the installed legoc package (legoc, legoc.runtime, ...: only .py files, laid out as
    imported) under ``dest``; returns the folder to put on the emulated PYTHONPATH."""
    import importlib  # noqa: PLC0415

    for name in ("legoc", "legoc.runtime", "legoc.targets"):
        src = Path(list(importlib.import_module(name).__path__)[0])
        out = dest / "legoc" / Path(*name.split(".")[1:])
        out.mkdir(parents=True, exist_ok=True)
        for py in src.glob("*.py"):
            shutil.copy2(py, out / py.name)
    return dest


def run(script_args: list[str], *, stage: Path | None = None, timeout: float = 1800,
        **kw) -> subprocess.CompletedProcess:
    """Run ``python3.11 *script_args`` under qemu with legoc on the path (staged into ``stage``
    or a temporary folder)."""
    emu = require()
    with tempfile.TemporaryDirectory(prefix="legoc-aarch64-") as tmp:
        staged = stage_legoc(Path(stage or tmp))
        return subprocess.run(emu.command(*script_args), env=emu.env([staged]), timeout=timeout, **kw)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m legoc.targets.emulation", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("setup", help="install qemu-user if missing and build the aarch64 userland (cached)")
    sub.add_parser("status", help="say whether the setup is ready, and where")
    r = sub.add_parser("run", help="run an aarch64 python3.11 under qemu with legoc on its path")
    r.add_argument("args", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    try:
        if args.command == "setup":
            emu = setup(log=lambda m: print(f"emulation: {m}", flush=True))
            print(f"ready: {emu.root}")
        elif args.command == "status":
            emu = find()
            print(f"ready: {emu.root}" if emu else f"not set up (would be {emulation_root()})")
            return 0 if emu else 1
        else:
            return run(args.args).returncode
    except UserError as exc:
        print(f"legoc: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
