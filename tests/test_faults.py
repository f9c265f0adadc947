"""Faults injected during compile and inference (issue 17): a compile killed with SIGKILL at
several points, a disk that fills during the write, corrupted caches, and a runtime under
concurrent inference and reconfiguration."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent

# A small model file with data, so that a compile recalibrates, retrains and profiles accuracy
# (every cache legoc keeps). train_data() leaves a marker: retraining starts soon after.
MODEL_WITH_DATA = """
import os
from pathlib import Path

import torch
from torch import nn


def build_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)).eval()


def example_inputs():
    return (torch.zeros(1, 3, 16, 16),)


def _batches(seed, n):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(1, 3, 16, 16, generator=g), torch.randint(0, 4, (1,), generator=g)) for _ in range(n)]


def train_data():
    marker = os.environ.get("LEGOC_TEST_MARKER")
    if marker:
        Path(marker).write_text("train_data")
    return _batches(1, 64)


def val_data():
    return _batches(2, 16)
"""


def _env(cache: Path, marker: Path | None = None) -> dict:
    env = dict(os.environ, LEGOC_CACHE=str(cache))
    if marker is not None:
        env["LEGOC_TEST_MARKER"] = str(marker)
    return env


def _compile_cmd(model: Path, out: Path, epochs: int = 3) -> list[str]:
    return [sys.executable, "-m", "legoc", "compile", str(model), "-o", str(out), "--ratios", "0,0.5",
            "--retrain-epochs", str(epochs), "--no-progress"]


def _manifest_core(path: Path) -> dict:
    """The manifest without what legitimately differs between two compiles (times, dates)."""
    m = json.loads((path / "manifest.json").read_text())

    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items()
                    if k not in ("created", "timings", "latency_ms", "load_ms", "combination", "validation",
                                 "measured_at", "date", "seconds", "calibration")}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x

    return strip(m)


def _kill_when(cmd, env, ready, timeout: float = 600.0) -> bool:
    """Start ``cmd``, SIGKILL it as soon as ``ready()`` holds; True if it was killed (False: it
    finished first)."""
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.monotonic()
    try:
        while proc.poll() is None:
            if ready():
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return True
            if time.monotonic() - t0 > timeout:
                raise AssertionError("the compile neither reached the fault point nor finished")
            time.sleep(0.02)
        return False
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _drafts(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.tmp-*"))


def test_a_compile_killed_at_any_point_leaves_no_broken_artifact_and_resumes_from_caches(tmp_path):
    from legoc.runtime import load

    model = tmp_path / "model.py"
    model.write_text(MODEL_WITH_DATA)
    cache, out, marker = tmp_path / "cache", tmp_path / "out.lego", tmp_path / "marker"
    # the previous valid artifact at the path, compiled with other options (no shared caches)
    first = subprocess.run(_compile_cmd(model, out, epochs=1), env=_env(tmp_path / "cache0"), cwd=ROOT,
                           capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    previous = _manifest_core(out)

    points = {
        # retraining: train_data() was read, nothing of the artifact written yet
        "retraining": lambda: marker.exists() and time.sleep(1.0) is None and not _drafts(out),
        # module builds: the draft folder holds a built module, no manifest yet
        "module builds": lambda: any(any(d.rglob("*.so")) and not (d / "manifest.json").exists()
                                     for d in _drafts(out)),
        # the final measurements and write: the draft manifest is there
        "final write": lambda: any((d / "manifest.json").exists() for d in _drafts(out)),
    }
    killed = []
    for name, ready in points.items():
        marker.unlink(missing_ok=True)
        if _kill_when(_compile_cmd(model, out), _env(cache, marker), ready):
            killed.append(name)
        # whatever happened, the path holds the previous artifact or the new one, complete
        assert out.is_dir() and not list(out.parent.glob(f".{out.name}.old-*")), name
        m = load(out)   # checksums and digest verified on load
        m(np.zeros((1, 3, 16, 16), np.float32))
    assert "module builds" in killed and "final write" in killed, killed
    # a rerun completes, from the caches the killed runs left
    t0 = time.perf_counter()
    rerun = subprocess.run(_compile_cmd(model, out), env=_env(cache), cwd=ROOT, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    resumed = time.perf_counter() - t0
    assert _manifest_core(out) != previous   # the new compile replaced the previous artifact
    assert any((cache / "retrain").glob("*.safetensors")) and any((cache / "profile").rglob("*.json"))
    print(f"rerun after the kills: {resumed:.1f} s")


def test_corrupt_caches_are_detected_and_recomputed_never_trusted(tmp_path):
    model = tmp_path / "model.py"
    model.write_text(MODEL_WITH_DATA)
    cache = tmp_path / "cache"
    a, b = tmp_path / "a.lego", tmp_path / "b.lego"
    r = subprocess.run(_compile_cmd(model, a), env=_env(cache), cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    files = [f for f in cache.rglob("*") if f.is_file() and f.parent.name in ("retrain", "accuracy", "latency")]
    assert {f.parent.name for f in files} == {"retrain", "accuracy", "latency"}, files
    for i, f in enumerate(sorted(files)):   # truncated, emptied or overwritten with garbage
        data = f.read_bytes()
        f.write_bytes([data[: len(data) // 2], b"", b"\x00garbage{" * 7][i % 3])
    r = subprocess.run(_compile_cmd(model, b), env=_env(cache), cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert _manifest_core(a) == _manifest_core(b)
    for f in files:   # recomputed and rewritten whole
        assert f.stat().st_size > 0
        if f.suffix == ".json":
            json.loads(f.read_text())
        else:
            from safetensors.numpy import load_file

            load_file(str(f))


@pytest.mark.skipif(os.geteuid() != 0 or sys.platform != "linux", reason="mounting a tmpfs needs root on Linux")
def test_a_disk_that_fills_during_the_write_leaves_the_previous_artifact(tmp_path, tiny_model_source):
    from legoc.runtime import load

    model = tmp_path / "model.py"
    model.write_text(tiny_model_source())
    prev = tmp_path / "prev.lego"
    r = subprocess.run([sys.executable, "-m", "legoc", "compile", str(model), "-o", str(prev), "--ratios", "0",
                        "--no-progress"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    size = sum(f.stat().st_size for f in prev.rglob("*") if f.is_file())
    disk = tmp_path / "disk"
    disk.mkdir()
    # room for the previous artifact and a third of another: the new one cannot be finished
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size + size // 3 + 64 * 1024}", "tmpfs", str(disk)],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
    try:
        out = disk / "model.lego"
        subprocess.run(["cp", "-r", str(prev), str(out)], check=True)
        before = (out / "manifest.json").read_bytes()
        r = subprocess.run([sys.executable, "-m", "legoc", "compile", str(model), "-o", str(out), "--ratios", "0,0.5",
                            "--no-progress"], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 2, r.stderr
        lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip() and not ln.startswith("legoc: warning:")]
        assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
        assert "space" in lines[0] and str(out) in lines[0], lines[0]
        assert (out / "manifest.json").read_bytes() == before
        assert sorted(p.name for p in disk.iterdir()) == ["model.lego"]   # no draft left behind
        load(out)(np.zeros((1, 3, 16, 16), np.float32))
    finally:   # lazily if something still holds it: never leave the tmpfs mounted
        if subprocess.run(["umount", str(disk)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)


# ---------------------------------------------------------------------- runtime under load

def test_concurrent_inference_during_reconfiguration_is_never_torn(artifact):
    """8 threads x 2,000 inferences while another thread makes 500 switches (explicit and by
    budget): every output is the output of one configuration that was switched to."""
    from legoc.runtime import load

    path = artifact("mnist_resnet", "host", ratios=(0.0, 0.4, 0.8)).artifact
    m = load(path)
    n, k = len(m.blocks), len(m.blocks[0].variants)
    x = np.random.default_rng(0).standard_normal((1, 1, 28, 28)).astype(np.float32)
    full = np.asarray(m.configure(variants=[0] * n)(x))
    m(x)
    lat = m.profiles.latency_ms([0] * n)
    rng = np.random.default_rng(1)
    switched = {(0,) * n}
    outputs: list[list[np.ndarray]] = [[] for _ in range(8)]
    errors: list[BaseException] = []
    stop = threading.Event()

    def infer(i):
        try:
            for _ in range(2000):
                outputs[i].append(np.asarray(m(x)).copy())
        except BaseException as exc:   # noqa: BLE001 - reported below
            errors.append(exc)

    def switch():
        try:
            for s in range(500):
                if s % 2:
                    m.configure(latency_ms=float(lat * rng.uniform(0.5, 1.2)), best_effort=True)
                else:
                    m.configure(variants=[int(v) for v in rng.integers(0, k, n)])
                switched.add(tuple(m.choice))
                if stop.is_set():
                    break
        except BaseException as exc:   # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=infer, args=(i,)) for i in range(8)] + [threading.Thread(target=switch)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    stop.set()
    assert not any(t.is_alive() for t in threads), "deadlock: a thread did not finish"
    assert not errors, errors
    refs = {c: np.asarray(m.configure(variants=list(c))(x)).copy() for c in switched}
    assert np.allclose(refs[(0,) * n], full)
    torn = 0
    for out in outputs:
        assert len(out) == 2000
        for y in out:
            torn += not any(np.array_equal(y, r) for r in refs.values())
    assert torn == 0, f"{torn} of 16000 outputs match no configuration that was switched to"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads resident memory from /proc")
def test_ten_thousand_switches_keep_resident_memory_bounded(artifact):
    """10,000 switches among configurations whose modules are loaded: resident memory grows by at
    most 5 MiB after a warm-up of 500 switches."""
    from legoc.runtime import load

    path = artifact("mnist_resnet", "host", ratios=(0.0, 0.4, 0.8)).artifact
    m = load(path)
    n, k = len(m.blocks), len(m.blocks[0].variants)
    x = np.zeros((1, 1, 28, 28), np.float32)
    rng = np.random.default_rng(2)
    configs = [[int(v) for v in rng.integers(0, k, n)] for _ in range(50)]

    def run(count: int, start: int) -> None:
        for s in range(start, start + count):
            m.configure(variants=configs[s % len(configs)])
            if s % 10 == 0:
                m(x)

    run(500, 0)
    before = _rss_bytes()
    run(10_000, 500)
    growth = _rss_bytes() - before
    assert growth <= 5 * 2**20, f"resident memory grew {growth / 2**20:.2f} MiB over 10,000 switches"
