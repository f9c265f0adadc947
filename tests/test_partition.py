"""partition: dominator cuts, blocks single-in/single-out, recomposition equals the model."""
import networkx as nx
import pytest
import torch
import torch.nn as nn

from legoc.errors import UserError
from legoc.passes import PassManager, ProgramState
from legoc.passes.capture import Capture
from legoc.passes.partition import PartitionPass, cut_points, dataflow_graph, partition
from legoc.pipeline import CompileConfig

EXAMPLES = ["vgg_chain", "cifar_resnet", "mobilenetv2"]


def _traced(model, x):
    return Capture()(ProgramState(model=model.eval(), example_inputs=(x,)), None).state


@pytest.mark.parametrize("name", EXAMPLES)
def test_blocks_recompose_the_model(name, load_example):
    spec = load_example(name)
    state = _traced(spec.model, spec.example_inputs[0])
    part = PartitionPass()(state, CompileConfig()).state.partition
    with torch.no_grad():
        ref = spec.model(*spec.example_inputs)
        got = part.run(*spec.example_inputs)
    assert float((ref - got).abs().max()) <= 1e-5
    assert 1 <= len(part.blocks) <= 4
    for b in part.blocks:
        assert len(b.inputs) == 1 and len(b.outputs) == 1
        placeholders = [n for n in b.gm.graph.nodes if n.op == "placeholder"]
        assert len(placeholders) == 1
    print(f"{name}: {len(part.blocks)} blocks, scalable MACs {part.scalable_share:.1%} of {part.total_macs / 1e6:.1f} M")


@pytest.mark.parametrize("name", EXAMPLES)
def test_cuts_are_dominators_and_never_split_conv_from_bn(name, load_example):
    spec = load_example(name)
    gm = _traced(spec.model, spec.example_inputs[0]).gm
    g = dataflow_graph(gm)
    out = next(n.name for n in gm.graph.nodes if n.op == "output")
    by_name = {n.name: n for n in gm.graph.nodes}
    for c in cut_points(gm):
        # removing a cut disconnects the inputs from the output: every path passes through it
        h = g.copy()
        h.remove_node(c)
        assert not nx.has_path(h, "__legoc_source__", out), c
        users = list(by_name[c].users)
        if len(users) == 1 and users[0].op == "call_module":
            assert not isinstance(gm.get_submodule(users[0].target), (nn.BatchNorm2d, nn.ReLU, nn.ReLU6)), c


@pytest.mark.parametrize("name", EXAMPLES)
def test_partition_is_deterministic(name, load_example):
    spec = load_example(name)
    a = partition(_traced(spec.model, spec.example_inputs[0]).gm)
    b = partition(_traced(spec.model, spec.example_inputs[0]).gm)
    assert [(s.name, s.nodes, s.inputs, s.outputs) for s in a.segments] == [
        (s.name, s.nodes, s.inputs, s.outputs) for s in b.segments
    ]


def test_blocks_are_balanced_by_macs(load_example):
    spec = load_example("vgg_chain")
    part = partition(_traced(spec.model, spec.example_inputs[0]).gm, blocks=4)
    macs = [b.macs for b in part.blocks]
    assert len(macs) == 4
    assert max(macs) <= 2.0 * min(macs), macs


def test_too_many_blocks_says_the_maximum(load_example):
    spec = load_example("vgg_chain")
    gm = _traced(spec.model, spec.example_inputs[0]).gm
    limit = partition(gm).max_blocks
    with pytest.raises(UserError, match=rf"^--blocks {limit + 1} is more than .* allows: at most {limit} blocks"):
        partition(gm, blocks=limit + 1, source="vgg_chain")


def test_no_prunable_layer_is_a_user_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    gm = _traced(model, torch.randn(1, 3, 8, 8)).gm
    with pytest.raises(UserError, match="has no block to scale"):
        partition(gm, source="tiny.py")


def test_pass_manager_names_the_failing_pass():
    from legoc.errors import InternalError
    from legoc.passes.prune import Prune

    state = ProgramState(model=nn.Identity(), example_inputs=(torch.randn(1),))
    with pytest.raises(InternalError, match=r"pass 'prune' failed \(after no passes\)"):
        PassManager([Prune()])(state, CompileConfig())
