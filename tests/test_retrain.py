"""retrain: block distillation lowers each variant's held-out error; results are cached."""
import torch

from legoc.passes import PassManager, ProgramState
from legoc.passes.retrain import Retrain
from legoc.pipeline import CompileConfig, default_pipeline


def _pruned(load_example):
    spec = load_example("cifar_resnet")
    cfg = CompileConfig(ratios=(0.0, 0.6), retrain_epochs=0, progress=False)
    state = PassManager(default_pipeline()[:3])(
        ProgramState(model=spec.model, example_inputs=spec.example_inputs), cfg).state
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 3, 32, 32, generator=gen),) for _ in range(10)]
    return state.replace(train_inputs=data)


def test_retraining_lowers_held_out_error_and_is_cached(load_example, tmp_path, monkeypatch):
    monkeypatch.setenv("LEGOC_CACHE", str(tmp_path))
    state = _pruned(load_example)
    cfg = CompileConfig(ratios=(0.0, 0.6), retrain_epochs=3, retrain_minutes=5, progress=False)
    result = Retrain()(state, cfg)
    assert result.modified and result.state.retrained
    report = result.state.retrain_report
    assert len(report) == len(state.partition.blocks)      # one pruned variant per block
    for (block, vid), info in report.items():
        assert vid == "r0.60" and 1 <= info["epochs"] <= 3 and not info["cached"] and info["stopped"] == "done"
        assert info["held_mse_after"] < info["held_mse_before"], (block, info)
    for name, vs in result.state.variants.items():
        assert vs[0] is state.variants[name][0]             # the full-size variant is untouched
        assert not any(p.requires_grad for p in vs[1].gm.parameters())
    assert len(list((tmp_path / "retrain").glob("*.safetensors"))) == len(report)

    again = Retrain()(state, cfg)                           # same block, data, settings: cached
    assert all(info["cached"] for info in again.state.retrain_report.values())
    for name, vs in again.state.variants.items():
        a, b = vs[1].gm.state_dict(), result.state.variants[name][1].gm.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_result_cut_short_by_the_time_limit_is_recorded_and_never_cached(load_example, tmp_path, monkeypatch):
    monkeypatch.setenv("LEGOC_CACHE", str(tmp_path))
    state = _pruned(load_example)
    cfg = CompileConfig(ratios=(0.0, 0.6), retrain_epochs=50, retrain_minutes=0.002, progress=False)
    report = Retrain()(state, cfg).state.retrain_report
    assert report and all(info["stopped"] == "time limit" and info["epochs"] < 50 for info in report.values())
    assert not list((tmp_path / "retrain").glob("*.safetensors"))   # a later compile retrains


def test_no_data_means_no_retraining(load_example):
    state = _pruned(load_example).replace(train_inputs=None)
    result = Retrain()(state, CompileConfig(retrain_epochs=3))
    assert result.modified is False and result.state.retrained is False


def test_compile_without_train_data_warns_once(tmp_path, capsys):
    from legoc.cli import main

    code = main(["compile", "examples/vgg_chain.py", "-o", str(tmp_path / "v.lego"), "--ratios", "0,0.5",
                 "--blocks", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 0
    assert err.count("legoc: warning:") == 1 and "has no train_data()" in err


MODEL = '''
import torch, torch.nn as nn
def build_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 4, 1)).eval()
def example_inputs():
    return (torch.randn(1, 3, 8, 8),)
def train_data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, 8, 8, generator=g), torch.zeros(4)) for _ in range(5)]
'''


def test_the_manifest_records_retraining(tmp_path, monkeypatch):
    import json

    from legoc.cli import main

    monkeypatch.setenv("LEGOC_CACHE", str(tmp_path / "cache"))
    (tmp_path / "model.py").write_text(MODEL)
    out = tmp_path / "m.lego"
    assert main(["compile", str(tmp_path / "model.py"), "-o", str(out), "--ratios", "0,0.5",
                 "--retrain-epochs", "2", "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["retrained"] is True and manifest["bn_recalibrated"] is True
    block = next(s for s in manifest["segments"] if s["kind"] == "block")
    assert block["variants"][0]["retrain"] is None
    info = block["variants"][1]["retrain"]
    assert 1 <= info["epochs"] <= 2 and info["held_mse_after"] <= info["held_mse_before"]
