import torch
import torch.nn as nn

from legoc.passes import PassManager, ProgramState
from legoc.passes.recalibrate import Recalibrate, recalibrate_bn
from legoc.pipeline import CompileConfig, default_pipeline


def test_recalibrated_stats_are_the_data_statistics():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    xs = [torch.randn(8, 3, 6, 6) * 3 + 1 for _ in range(4)]
    assert recalibrate_bn(m, xs) == 1
    with torch.no_grad():
        feats = torch.cat([m[0](x) for x in xs])
    assert torch.allclose(m[1].running_mean, feats.mean((0, 2, 3)), atol=1e-4)
    assert not m[1].training


def test_pass_touches_only_pruned_variants_and_reports_modified_honestly(load_example):
    spec = load_example("cifar_resnet")
    cfg = CompileConfig(ratios=(0.0, 0.5))
    base = ProgramState(model=spec.model, example_inputs=spec.example_inputs)
    pm = PassManager(default_pipeline()[:3])
    state = pm(base, cfg).state
    assert Recalibrate()(state, cfg).modified is False          # no data: nothing changes
    calib = [(torch.randn(4, 3, 32, 32),) for _ in range(2)]
    result = Recalibrate()(state.replace(train_inputs=calib), cfg)
    assert result.modified and result.state.recalibrated
    for name, vs in result.state.variants.items():
        old = state.variants[name]
        assert vs[0] is old[0]                                   # the full-size variant is untouched
        bn_new = [m for m in vs[1].gm.modules() if isinstance(m, nn.BatchNorm2d)]
        bn_old = [m for m in old[1].gm.modules() if isinstance(m, nn.BatchNorm2d)]
        assert any(not torch.equal(a.running_mean, b.running_mean) for a, b in zip(bn_new, bn_old))
