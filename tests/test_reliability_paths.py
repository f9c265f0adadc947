"""Documented paths that no other test ran (issue 17): `legoc run` end to end, a compile with its
progress bars on a terminal together with `--round-to` and `--importance bn` from the command
line, a model file with `concrete_args` compiled and run, and a real `--tune-trials` run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from legoc.cli import main

ROOT = Path(__file__).resolve().parent.parent

# ------------------------------------------------------------------------------- legoc run


def test_run_writes_the_output_of_the_configuration_it_ran(artifact, tmp_path, capsys):
    from legoc.runtime import load

    path = artifact("vgg_chain").artifact
    m = load(path)
    n = len(m.blocks)
    x = np.random.default_rng(0).standard_normal(m.input_shapes[0]).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    y = tmp_path / "y.npy"
    variants = [i % 2 for i in range(n)]
    capsys.readouterr()
    # explicit variants
    assert main(["run", str(path), "--input", str(tmp_path / "x.npy"), "-o", str(y),
                 "--variants", ",".join(map(str, variants))]) == 0
    out = capsys.readouterr().out
    assert f"variants {','.join(map(str, variants))}: ran in " in out and f"wrote {y}" in out
    assert np.array_equal(np.load(y), np.asarray(m.configure(variants=variants)(x)))
    # by budget: what `legoc select` (CP-SAT) picks for the same budget
    budget = 0.5 * (m.profiles.latency_ms([0] * n) + m.profiles.min_latency_ms())
    picked = load(path).select(budget).choice     # a fresh model, as `legoc run` loads it
    assert main(["run", str(path), "--input", str(tmp_path / "x.npy"), "-o", str(y), "--latency-ms", str(budget)]) == 0
    assert f"variants {','.join(map(str, picked))}: ran in " in capsys.readouterr().out
    assert np.array_equal(np.load(y), np.asarray(m.configure(variants=list(picked))(x)))
    # no configuration: full size, the output printed
    assert main(["run", str(path), "--input", str(tmp_path / "x.npy")]) == 0
    printed = capsys.readouterr().out
    assert f"variants {','.join(['0'] * n)}: ran in " in printed and "[[" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npy", "y.npy"]


# ------------------------------------------------- progress bars, --round-to, --importance bn

MODEL_WITH_DATA = """
import torch
from torch import nn


def build_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(),
                         nn.Conv2d(24, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(),
                         nn.Conv2d(24, 24, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(24, 24, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 4)).eval()


def example_inputs():
    return (torch.zeros(1, 3, 12, 12),)


def _batches(seed, n):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 12, 12, generator=g), torch.randint(0, 4, (4,), generator=g)) for _ in range(n)]


def train_data():
    return _batches(1, 8)


def val_data():
    return _batches(2, 4)
"""


def _on_a_terminal(cmd: list[str], env: dict) -> tuple[int, str]:
    """Run ``cmd`` with stderr on a pseudo-terminal (as in a person's shell, so rich draws its live
    progress bars); returns the exit code and what the terminal showed."""
    import pty

    master, slave = pty.openpty()
    chunks: list[bytes] = []

    def read():
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:   # EIO: the other side closed
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        proc = subprocess.run(cmd, env=env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=slave, timeout=600)
    finally:
        os.close(slave)
        reader.join(30)
        os.close(master)
    return proc.returncode, b"".join(chunks).decode(errors="replace") + proc.stdout.decode(errors="replace")


def test_compile_with_progress_bars_round_to_and_bn_importance_from_the_command_line(tmp_path):
    from legoc.runtime import load

    model = tmp_path / "model.py"
    model.write_text(MODEL_WITH_DATA)
    out = tmp_path / "m.lego"
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "TERM", "CI")}
    env.update(TERM="xterm-256color", COLUMNS="100", LEGOC_CACHE=str(tmp_path / "cache"))
    code, screen = _on_a_terminal(
        [sys.executable, "-m", "legoc", "compile", str(model), "-o", str(out), "--ratios", "0,0.5",
         "--round-to", "4", "--importance", "bn", "--retrain-epochs", "1"], env)
    assert code == 0, screen[-3000:]
    assert "Traceback" not in screen
    # the live bars were drawn: their labels, their counts and the terminal's cursor controls
    for label in ("retraining", "compiling", "validating"):
        assert label in screen, (label, screen[-3000:])
    assert "\x1b[" in screen and "/" in screen
    assert f"wrote {out}" in screen
    # --round-to 4: 24 channels at ratio 0.5 keep 12 (the host's default multiple, 8 or 16, keeps 16)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["options"]["round_to"] == 4 and manifest["options"]["importance"] == "bn"
    pruned = [v for s in manifest["segments"] if s["kind"] == "block" for v in s["variants"] if v["ratio"] > 0]
    assert pruned and all(kept % 4 == 0 for v in pruned for _, _, kept in v["channels"].values())
    assert any(kept == 12 for v in pruned for _, _, kept in v["channels"].values())
    # --importance bn: every pruned group says what ranked it; a group without BN fell back to L1
    used = {how for v in pruned for how in v["importance"].values()}
    assert "bn" in used and used <= {"bn", "l1"}
    if "l1" in used:
        assert "legoc: warning: --importance bn: " in screen
    load(out)(np.zeros((1, 3, 12, 12), np.float32))


# ------------------------------------------------------------------------- concrete_args


@pytest.mark.parametrize("flag", [False, True])
def test_a_model_file_with_concrete_args_compiles_and_runs_as_specialized(tmp_path, capsys, flag_model_source, flag):
    # README: `concrete_args = {...}` is passed to torch.fx.symbolic_trace; a keyword flag used to
    # fail with "pass 'partition' failed (after capture): partition expects 2 inputs, got 1"
    import torch

    from legoc.modelfile import load_model_file
    from legoc.runtime import load

    path = tmp_path / "model.py"
    path.write_text(flag_model_source(flag))
    out = tmp_path / "m.lego"
    assert main(["compile", str(path), "-o", str(out), "--ratios", "0,0.5", "--no-progress"]) == 0, \
        capsys.readouterr().err
    spec = load_model_file(path)
    x = spec.example_inputs[0]
    with torch.no_grad():
        ref = spec.model(x, return_features=flag).numpy()
    got = np.asarray(load(out)(x.numpy()))
    assert got.shape == ref.shape == ((1, 16, 12, 12) if flag else (1, 4))
    assert np.abs(got - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


# --------------------------------------------------------------------------- --tune-trials


def test_tune_trials_tunes_a_small_conv_once_and_reuses_the_database(tmp_path, monkeypatch):
    """A real MetaSchedule run: 2 trials per workload of one 3x3 conv + ReLU on a 8x8 map
    (measured on this machine). The records go to the per-CPU database under $LEGOC_CACHE; a
    second build of the same module tunes nothing (every workload found), and both builds
    compute what PyTorch does."""
    import torch
    import tvm
    from torch import nn

    from legoc.targets import tune
    from legoc.targets.build import build_module
    from legoc.targets.table import get_target

    monkeypatch.setenv("LEGOC_CACHE", str(tmp_path / "cache"))
    host = get_target("host")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU()).eval()
    x = torch.randn(1, 4, 8, 8)
    reports = []
    real = tune.tune_module

    def recording(*args, **kwargs):
        reports.append(real(*args, **kwargs))
        return reports[-1]

    monkeypatch.setattr(tune, "tune_module", recording)
    outs = []
    for k in range(2):
        built = build_module(model, (x,), host, tmp_path / f"m{k}.so", tune_trials=2)
        vm = tvm.runtime.vm.VirtualMachine(tvm.runtime.load_module(str(built.path)), tvm.cpu())
        outs.append(vm["main"](*[tvm.runtime.tensor(a) for a in [x.numpy(), *built.params]]).numpy())
    first, second = reports
    assert first.workloads >= 1 and first.tuned >= 1 and first.reused == 0 and first.trials == 2
    assert second.workloads == first.workloads and second.tuned == 0 and second.reused == second.workloads
    assert first.database == tune.database_dir(host) and any(first.database.glob("*.json"))
    with torch.no_grad():
        ref = model(x).numpy()
    for out in outs:
        assert np.abs(out - ref).max() <= 1e-4 * max(1.0, float(np.abs(ref).max()))
