"""Every zoo model partitions into single-entry/single-exit blocks plus a frame, recomposes
exactly, partitions deterministically, and compiles for host to run equal to PyTorch."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from legoc.errors import UserError
from legoc.passes import ProgramState
from legoc.passes.capture import Capture
from legoc.passes.partition import partition

_spec = importlib.util.spec_from_file_location("legoc_test_zoo", Path(__file__).with_name("zoo.py"))
zoo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(zoo)


def _partition(model, inputs, **kw):
    gm = Capture()(ProgramState(model=model, example_inputs=inputs), None).state.gm
    return gm, partition(gm, **kw)


def _leaves(out):
    return torch.utils._pytree.tree_leaves(out)


@pytest.mark.parametrize("name", sorted(zoo.MODELS))
def test_every_block_count_up_to_the_limit_is_given_exactly(name):
    # --blocks K asks for K blocks: fewer, larger blocks may cover more MACs, but are not what was asked
    model, inputs = zoo.MODELS[name]()
    gm, part = _partition(model, inputs)
    for k in range(1, part.max_blocks + 1):
        got = partition(gm, blocks=k)
        assert len(got.blocks) == k, (name, k)


@pytest.mark.parametrize("name", sorted(zoo.MODELS))
def test_zoo_partitions_and_recomposes(name):
    model, inputs = zoo.MODELS[name]()
    gm, part = _partition(model, inputs)
    with torch.no_grad():
        ref, got = _leaves(model(*inputs)), _leaves(part.run(*inputs))
    assert len(ref) == len(got)
    assert max(float((a - b).abs().max()) for a, b in zip(ref, got)) <= 1e-5
    assert part.blocks, name
    for b in part.blocks:
        assert len(b.inputs) == 1 and len(b.outputs) == 1
    again = partition(gm)
    assert [(s.kind, s.nodes) for s in again.segments] == [(s.kind, s.nodes) for s in part.segments]
    print(f"{name}: {len(part.blocks)} blocks, {len(part.segments) - len(part.blocks)} frame segments, "
          f"scalable MACs {part.scalable_share:.1%} of {part.total_macs / 1e6:.2f} M")


def test_unet_keeps_the_long_skips_in_the_frame():
    model, inputs = zoo.MODELS["unet"]()
    _, part = _partition(model, inputs)
    assert len(part.blocks) >= 2
    frame = [s for s in part.segments if not s.is_block]
    # the outermost skip is joined in the frame: a frame segment with a concat reads two tensors,
    # one of them the output of the first encoder block
    joins = [s for s in frame if len(s.inputs) >= 2 and any(n.startswith("cat") for n in s.nodes)]
    assert joins and part.blocks[0].outputs[0] in joins[0].inputs
    # a block's input tensor may feed the frame too (a skip), but nothing inside a block leaks out
    for b in part.blocks:
        used_outside = {n for s in part.segments if s is not b for n in s.inputs}
        assert used_outside & set(b.nodes) <= set(b.outputs)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), n_layers=st.integers(3, 30))
def test_random_dags_partition_and_recompose(seed, n_layers):
    model, inputs = zoo.random_dag(seed, n_layers)
    try:
        _, part = _partition(model, inputs)
    except UserError as exc:  # a DAG may have nothing to prune: that must be said, not crash
        assert "has no block to scale" in str(exc)
        return
    with torch.no_grad():
        assert float((model(*inputs) - part.run(*inputs)).abs().max()) <= 1e-5


@pytest.fixture(scope="module")
def zoo_artifact(tmp_path_factory):
    """A zoo model compiled for host with ratios 0 and 0.5, once per module: (state, manifest, artifact)."""
    from legoc.passes import PassManager
    from legoc.pipeline import CompileConfig, CompileReport, build_artifact, default_pipeline
    from legoc.targets.table import get_target

    cache = {}

    def get(name: str):
        if name not in cache:
            model, inputs = zoo.MODELS[name]()
            cfg = CompileConfig(ratios=(0.0, 0.5), progress=False)
            state = PassManager(default_pipeline())(ProgramState(model=model, example_inputs=inputs, source=name),
                                                    cfg).state
            out = tmp_path_factory.mktemp("zoo") / f"{name}.lego"
            manifest = build_artifact(state, get_target("host"), out, cfg, CompileReport(artifact=out))
            cache[name] = (state, manifest, out)
        return cache[name]

    return get


@pytest.mark.parametrize("name", sorted(zoo.MODELS))
def test_zoo_compiles_for_host_and_runs_equal(name, zoo_artifact):
    from legoc.runtime import load

    _, inputs = zoo.MODELS[name]()
    state, _, out = zoo_artifact(name)
    m = load(out)
    xs = [x.numpy() for x in inputs]
    for choice in ([0] * len(m.blocks), [1] * len(m.blocks)):
        got = _leaves_np(m.configure(variants=choice)(*xs))
        replace = {b.name: state.variants[b.name][i].gm for b, i in zip(state.partition.blocks, choice)}
        with torch.no_grad():
            ref = [t.numpy() for t in _leaves(state.partition.run(*inputs, replace=replace))]
        assert len(got) == len(ref)
        for g, r in zip(got, ref):
            assert np.abs(g - r).max() <= 1e-4 * max(np.abs(r).max(), 1e-6), name


def _leaves_np(out):
    if isinstance(out, dict):
        return [v for k in out for v in _leaves_np(out[k])]
    if isinstance(out, (tuple, list)):
        return [v for o in out for v in _leaves_np(o)]
    return [out]


def test_unet_artifact_plot_shows_blocks_and_frame(zoo_artifact, tmp_path):
    from legoc.plot import plot_blocks, segment_graph
    import networkx as nx

    state, manifest, _ = zoo_artifact("unet")     # the artifact test_zoo_compiles_for_host_and_runs_equal runs
    g = segment_graph(manifest)
    kinds = [g.nodes[n]["kind"] for n in g.nodes]
    assert nx.is_directed_acyclic_graph(g)
    assert kinds.count("block") == len(state.partition.blocks) >= 2 and kinds.count("frame") >= 1
    svg = plot_blocks(manifest, tmp_path / "blocks.svg")
    text = svg.read_text()
    assert text.startswith("<?xml") and "block0" in text
