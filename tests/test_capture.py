import pytest
import torch
import torch.nn as nn

from legoc.errors import UserError
from legoc.passes import ProgramState
from legoc.passes.capture import Capture


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: not traceable
            return self.conv(x)
        return -self.conv(x)


class PythonInForward(nn.Module):
    def forward(self, x):
        return x * int(x.shape[1] * torch.rand(1).item())


def test_capture_recomposes_the_model():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(1, 3, 8, 8)
    result = Capture()(ProgramState(model=model, example_inputs=(x,)), None)
    assert result.modified
    assert torch.allclose(result.state.gm(x), model(x), atol=1e-6)
    shapes = {n.name: tuple(n.meta["tensor_meta"].shape) for n in result.state.gm.graph.nodes if "tensor_meta" in n.meta}
    assert shapes["x" if "x" in shapes else "input_1"] == (1, 3, 8, 8)


def test_trace_error_names_class_file_line_and_what_to_try():
    with pytest.raises(UserError) as err:
        Capture()(ProgramState(model=Branchy(), example_inputs=(torch.randn(1, 3, 8, 8),)), None)
    msg = str(err.value)
    assert msg.startswith("cannot trace Branchy with torch.fx at ")
    assert __file__ in msg and "`if x.sum() > 0:" in msg
    assert "concrete_args" in msg and "leaf module" in msg
    assert "\n" not in msg


def test_non_tensor_python_is_a_user_error():
    with pytest.raises(UserError, match=r"cannot trace PythonInForward with torch.fx at .*test_capture.py:\d+"):
        Capture()(ProgramState(model=PythonInForward(), example_inputs=(torch.randn(1, 3, 8, 8),)), None)


def test_bad_example_inputs_is_a_user_error():
    model = nn.Sequential(nn.Conv2d(3, 8, 3)).eval()
    with pytest.raises(UserError, match="fails on its example_inputs"):
        Capture()(ProgramState(model=model, example_inputs=(torch.randn(1, 5, 8, 8),)), None)


class WithFlag(nn.Module):
    """forward(x, return_features=False): a keyword flag that drives Python control flow."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                               nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    def forward(self, x, return_features=False, scale=None):
        y = self.a(x)
        if scale is not None:
            y = y * scale
        if return_features:
            return y
        return self.head(y)


@pytest.mark.parametrize("flag", [False, True])
def test_concrete_args_are_baked_into_a_graph_of_the_tensor_inputs_only(flag):
    # torch.fx keeps a placeholder (and an assert) for every concrete argument; the graph must
    # take only the tensor inputs that example_inputs() gives, and compute forward(x, **concrete_args)
    torch.manual_seed(0)
    model, x = WithFlag().eval(), torch.randn(1, 3, 8, 8)
    concrete = {"return_features": flag, "scale": None}
    state = Capture()(ProgramState(model=model, example_inputs=(x,), concrete_args=concrete), None).state
    assert [n.name for n in state.gm.graph.nodes if n.op == "placeholder"] == ["x"]
    with torch.no_grad():
        assert torch.allclose(state.gm(x), model(x, **concrete), atol=1e-6)


def test_concrete_args_model_file_compiles_through_partition(tmp_path, flag_model_source):
    # the README's `concrete_args` for a model whose forward has a keyword flag: capture then
    # partition (this used to fail with "partition expects 2 inputs, got 1")
    from legoc.modelfile import load_model_file
    from legoc.passes import PassManager
    from legoc.passes.partition import PartitionPass
    from legoc.pipeline import CompileConfig

    path = tmp_path / "model.py"
    path.write_text(flag_model_source(True))
    spec = load_model_file(path)
    state = ProgramState(model=spec.model, example_inputs=spec.example_inputs, concrete_args=spec.concrete_args,
                         source=str(path))
    state = PassManager([Capture(), PartitionPass()])(state, CompileConfig()).state
    assert state.partition.blocks
    with torch.no_grad():
        ref = spec.model(*spec.example_inputs, return_features=True)
        assert torch.allclose(state.partition.run(*spec.example_inputs), ref, atol=1e-5)
