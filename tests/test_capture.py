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
