"""Several devices from the command line (issue 19): `legoc compile --tiles K` writes a tiling
plan and its tile modules into the artifact (checksummed like every module), `legoc run
--cluster` runs it on loopback TVM RPC servers started here (legoc.runtime.cluster.LocalWorkers)
with the same output as the single-device run, `legoc inspect` shows the plan with the
recorded measurements, and misuse is one line with exit code 2."""
from __future__ import annotations

import json
import shutil
import textwrap

import numpy as np
import pytest

from legoc.cli import main
from legoc.errors import UserError
from legoc.runtime.artifact import MANIFEST, read_manifest, sha256_file
from legoc.runtime.cluster import LocalWorkers

# three blocks: two conv stacks that tile (and join), and one ending in Linear, which cannot
CHAIN = textwrap.dedent("""
    import torch
    from torch import nn

    def build_model():
        torch.manual_seed(0)
        layers, cin = [], 3
        for v in (8, 8, "M", 16, 16, "M", 32, 32, "M", 32):
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU()]
                cin = v
        return nn.Sequential(*layers, nn.Flatten(), nn.Linear(32 * 4 * 4, 10)).eval()

    def example_inputs():
        torch.manual_seed(1)
        return (torch.randn(1, 3, 32, 32),)
""")
# one block that pools globally: nothing to tile
POOLED = textwrap.dedent("""
    import torch
    from torch import nn

    def build_model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()

    def example_inputs():
        return (torch.zeros(1, 3, 16, 16),)
""")
FAST = ["--ratios", "0", "--retrain-epochs", "0", "--no-progress"]


def _legoc(capsys, *args) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of the command line (warnings left out of stderr)."""
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, "\n".join(line for line in err.strip().splitlines() if not line.startswith("legoc: warning:"))


@pytest.fixture(scope="module")
def tiled(tmp_path_factory):
    """The chain compiled with --tiles 2 and an ideal assumed link (so that the estimated plan
    tiles), an input and the single-device output: (artifact, input .npy, reference output)."""
    folder = tmp_path_factory.mktemp("tiles")
    (folder / "chain.py").write_text(CHAIN)
    art = folder / "chain.lego"
    assert main(["compile", str(folder / "chain.py"), "-o", str(art), "--tiles", "2", "--tile-link", "0,1e6", *FAST]) == 0
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    np.save(folder / "x.npy", x)
    assert main(["run", str(art), "-i", str(folder / "x.npy"), "-o", str(folder / "ref.npy")]) == 0
    return art, folder / "x.npy", np.load(folder / "ref.npy")


@pytest.fixture
def workers(tmp_path):
    with LocalWorkers(2, log_dir=tmp_path) as w:
        yield w


def test_compile_writes_the_plan_and_checksummed_tiles(tiled):
    art, _, _ = tiled
    m = read_manifest(art)
    tiling = m["tiling"]
    assert tiling["workers"] == 2 and tiling["source"] == "estimated"
    assert [lk["rtt_ms"] for lk in tiling["links"]] == [0.0, 0.0]
    # the steps cover the blocks in order; the Linear block stays whole, with its reason
    names = [s["name"] for s in m["segments"] if s["kind"] == "block"]
    assert [b for s in tiling["steps"] for b in s["blocks"]] == names
    assert [u["block"] for u in tiling["untileable"]] == [names[-1]]
    assert "not row-local" in tiling["untileable"][0]["reason"]
    tiled_steps = [s for s in tiling["steps"] if s["tiles"]]
    assert tiled_steps and names[-1] not in tiled_steps[0]["blocks"]
    for step in tiled_steps:
        assert sorted(t["worker"] for t in step["tiles"]) == [0, 1]
        assert step["tiles"][0]["rows_out"][0] == 0
        assert all(p["rows_out"][1] == q["rows_out"][0] for p, q in zip(step["tiles"], step["tiles"][1:]))
        assert sum(t["halo_rows"] for t in step["tiles"]) > 0   # neighbours' rows read twice
        for t in step["tiles"]:
            for entry in (t["module"], t["weights"]):
                assert entry["file"].startswith("tiles/") and sha256_file(art / entry["file"]) == entry["sha256"]
            assert t["bytes_in"] > 0 and t["bytes_out"] > 0 and t["estimate_ms"] > 0
        assert step["estimate_ms"] == pytest.approx(step["compute_ms"] + step["transfer_ms"])


def test_cluster_run_equals_the_single_device_run_and_inspect_shows_it(tiled, workers, capsys):
    art, x, ref = tiled
    before = (art / MANIFEST).read_bytes()
    out = art.parent / "out.npy"
    code, stdout, err = _legoc(capsys, "run", art, "-i", x, "-o", out, "--cluster", ",".join(workers.addresses),
                               "--calls", "2", "--record")
    assert code == 0, err
    assert np.abs(np.load(out) - ref).max() <= 1e-4
    assert f"over {', '.join(workers.addresses)}" in stdout and "median of 2 calls" in stdout
    assert "worker 0 rows 0-" in stdout and "worker 1 rows" in stdout and "local" in stdout
    # the measurement is kept beside the manifest, which is untouched
    assert (art / MANIFEST).read_bytes() == before
    recorded = json.loads((art / "tiling-measured.json").read_text())
    tiled_rows = [r for r in recorded["steps"] if r.get("tiles_ms")]
    assert tiled_rows and all(len(r["tiles_ms"]) == 2 and min(r["tiles_ms"]) > 0 for r in tiled_rows)
    code, stdout, _ = _legoc(capsys, "inspect", art)
    assert code == 0
    assert "tiling plan over 2 workers (estimated)" in stdout and "halo rows" in stdout
    assert "stays whole: " in stdout
    assert "measured ms: `legoc run --cluster --record`" in stdout
    # signed: the signature covers the tiles (their sha256 are in the manifest) and the run checks it
    key = art.parent / "key"
    assert _legoc(capsys, "keygen", key)[0] == 0 and _legoc(capsys, "sign", art, "--key", f"{key}.pem")[0] == 0
    code, _, err = _legoc(capsys, "run", art, "-i", x, "-o", out, "--cluster", ",".join(workers.addresses),
                          "--public-key", f"{key}.pub.pem")
    assert code == 0 and np.abs(np.load(out) - ref).max() <= 1e-4, err
    # a worker that is down when the run starts: one line naming it (a fallback is per call, once connected)
    workers.kill(1)
    for fallback in ([], ["--cluster-fallback", "local"]):
        code, _, err = _legoc(capsys, "run", art, "-i", x, "--cluster", ",".join(workers.addresses), *fallback)
        assert code == 2 and "\n" not in err and f"cannot reach cluster worker {workers.addresses[1]}" in err


def test_fallback_runs_a_lost_workers_step_here(tiled, workers):
    from legoc.runtime.tiled import TiledModel, Workers

    art, x, ref = tiled
    with TiledModel(art, Workers.of(",".join(workers.addresses), None, None, None), timeout=20, fallback=True) as m:
        assert np.abs(m(np.load(x)) - ref).max() <= 1e-4
        workers.kill(0)
        assert np.abs(m(np.load(x)) - ref).max() <= 1e-4   # the same answer, computed here
        assert any(r["fallbacks"] for r in m.report())


def test_user_errors_are_one_line_exit_2(tiled, tmp_path, capsys):
    art, x, _ = tiled
    (tmp_path / "pooled.py").write_text(POOLED)
    (tmp_path / "chain.py").write_text(CHAIN)
    cases = [
        (["compile", tmp_path / "chain.py", "--tiles", "0", *FAST], "--tiles is the number of workers"),
        (["compile", tmp_path / "pooled.py", "--tiles", "2", "-o", tmp_path / "p.lego", *FAST],
         "no block of"),
        (["compile", tmp_path / "chain.py", "--tiles", "3", "--cluster", "127.0.0.1:9,127.0.0.1:10", *FAST],
         "--tiles 3 but --cluster names 2 workers"),
        (["compile", tmp_path / "chain.py", "--cluster", "127.0.0.1:9", *FAST], "cannot reach cluster worker 127.0.0.1:9"),
        (["run", art, "-i", x, "--cluster", "127.0.0.1:9"], "plan tiles over 2 workers"),
        (["run", art, "-i", x, "--cluster", "127.0.0.1:9,127.0.0.1:10", "--cluster-timeout", "5"],
         "cannot reach cluster worker 127.0.0.1:9: connection refused"),
        (["run", art, "-i", x, "--tracker", "127.0.0.1:9"], "--tracker needs --device-key"),
        (["run", art, "-i", x, "--cluster-fallback", "local"], "go with --cluster or --tracker"),
        (["run", art, "-i", x, "--cluster", "127.0.0.1:9,127.0.0.1:10", "--latency-ms", "5"], "budgets"),
    ]
    for args, expected in cases:
        code, _, err = _legoc(capsys, *args)
        assert code == 2 and expected in err and "\n" not in err, (args, err)
    assert not (tmp_path / "p.lego").exists()


def test_artifact_without_tiling_loads_unchanged_and_refuses_a_cluster(tiled, tmp_path, capsys):
    from legoc.runtime.model import load
    from legoc.targets.rpc import write_manifest

    art, x, ref = tiled
    old = tmp_path / "old.lego"
    shutil.copytree(art, old)
    m = read_manifest(old)
    del m["tiling"]
    write_manifest(old, m)   # as an artifact of a legoc before tiling: no section
    assert np.abs(load(old)(np.load(x)) - ref).max() <= 1e-4
    code, stdout, _ = _legoc(capsys, "inspect", old)
    assert code == 0 and "tiling plan" not in stdout
    code, _, err = _legoc(capsys, "run", old, "-i", x, "--cluster", "127.0.0.1:9,127.0.0.1:10")
    assert code == 2 and "compiled without tiles" in err
    # a tile module changed on disk is refused before anything connects
    tile = next(s for s in read_manifest(art)["tiling"]["steps"] if s["tiles"])["tiles"][0]["module"]["file"]
    bad = tmp_path / "bad.lego"
    shutil.copytree(art, bad)
    with open(bad / tile, "ab") as f:
        f.write(b"\0")
    from legoc.runtime.tiled import TiledModel, Workers

    with pytest.raises(UserError, match="checksum mismatch"):
        TiledModel(bad, Workers.of("127.0.0.1:9,127.0.0.1:10", None, None, None))


def test_measured_plan_and_runs_through_a_tracker(tiled, tmp_path, capsys):
    """Boards of one device key at a tracker: the plan measured on them at compile time, and
    both artifacts (measured plan, estimated plan that tiles) run on them."""
    from legoc.runtime.cluster import LocalTracker

    art, x, ref = tiled
    (tmp_path / "chain.py").write_text(CHAIN)
    measured, out = tmp_path / "measured.lego", tmp_path / "out.npy"
    with LocalTracker(tmp_path) as tracker, LocalWorkers(2, log_dir=tmp_path, tracker=tracker, key="tiles"):
        board = ["--tracker", tracker.address, "--device-key", "tiles"]
        code, stdout, err = _legoc(capsys, "compile", tmp_path / "chain.py", "--tiles", "2", *board, "-o", measured, *FAST)
        assert code == 0, err
        tiling = read_manifest(measured)["tiling"]
        assert tiling["source"] == "measured-rpc" and tiling["tracker"]["device_key"] == "tiles"
        assert all(lk["rtt_ms"] > 0 and lk["source"] == "measured-rpc" for lk in tiling["links"])
        tileable = [b for b in tiling["blocks"] if b["name"] not in {u["block"] for u in tiling["untileable"]}]
        assert all(len(b["worker_ms"]) == 2 and min(b["worker_ms"]) > 0 for b in tileable)
        assert "tiling plan over 2 workers (measured-rpc" in stdout
        for artifact in (measured, art):
            code, stdout, err = _legoc(capsys, "run", artifact, "-i", x, "-o", out, *board)
            assert code == 0, err
            assert f"over 2 x 'tiles' via tracker {tracker.address}" in stdout
            assert np.abs(np.load(out) - ref).max() <= 1e-4


def test_variants_chosen_with_the_placement_under_a_budget(tmp_path, workers, capsys):
    """--tile-latency-ms: each block's variant is chosen with where it runs (the smallest
    estimated accuracy drop within the budget); the plan records them, the cluster run uses them
    and equals the single-device run of the same variants; a budget nothing meets is one line."""
    val = textwrap.dedent("""
        def val_data():
            g = torch.Generator().manual_seed(2)
            x = torch.randn(64, 3, 32, 32, generator=g)
            with torch.no_grad():
                y = build_model()(x).argmax(1)
            return [(x[i:i + 32], y[i:i + 32]) for i in range(0, 64, 32)]
    """)
    (tmp_path / "chain.py").write_text(CHAIN + val)
    art = tmp_path / "budget.lego"
    options = ["--ratios", "0,0.5", "--retrain-epochs", "0", "--no-progress", "--tiles", "2", "--tile-link", "0,1e6"]
    code, _, err = _legoc(capsys, "compile", tmp_path / "chain.py", *options, "--tile-latency-ms", "1000", "-o", art)
    assert code == 0, err
    m = read_manifest(art)
    tiling = m["tiling"]
    blocks = [s for s in m["segments"] if s["kind"] == "block"]
    assert tiling["budget_ms"] == 1000 and tiling["estimate_ms"] <= 1000
    assert len(tiling["variants"]) == len(blocks) and all(v in (0, 1) for v in tiling["variants"])
    assert [v for s in tiling["steps"] for v in s["variants"]] == tiling["variants"]
    drops = [max(0.0, b["variants"][v]["profile"]["accuracy_drop"]["value"]) for b, v in zip(blocks, tiling["variants"])]
    assert tiling["drop"] == pytest.approx(sum(drops))
    # the cluster run uses the plan's variants: equal to the single-device run of the same ones
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    chosen = ",".join(str(v) for v in tiling["variants"])
    assert main(["run", str(art), "-i", str(tmp_path / "x.npy"), "-o", str(tmp_path / "ref.npy"), "--variants", chosen]) == 0
    code, _, err = _legoc(capsys, "run", art, "-i", tmp_path / "x.npy", "-o", tmp_path / "out.npy",
                          "--cluster", ",".join(workers.addresses))
    assert code == 0, err
    assert np.abs(np.load(tmp_path / "out.npy") - np.load(tmp_path / "ref.npy")).max() <= 1e-4
    code, stdout, _ = _legoc(capsys, "inspect", art)
    assert code == 0 and "variants chosen with the placement within 1000 ms" in stdout
    # a budget no plan meets, and a budget without --tiles: one line each, nothing written
    for args, expected in ((["--tile-latency-ms", "0.0001"], "no plan meets the latency budget of 0.0 ms"),
                           (["--tile-latency-ms", "-1"], "--tile-latency-ms must be a positive budget")):
        code, _, err = _legoc(capsys, "compile", tmp_path / "chain.py", *options, *args, "-o", tmp_path / "no.lego")
        assert code == 2 and expected in err and "\n" not in err, err
    code, _, err = _legoc(capsys, "compile", tmp_path / "chain.py", "--tile-latency-ms", "5", *FAST)
    assert code == 2 and "add --tiles K" in err
    assert not (tmp_path / "no.lego").exists()
