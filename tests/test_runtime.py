"""The runtime end to end: compile for host, load, configure, run; checksums; no torch needed."""
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from legoc.errors import UserError
from legoc.runtime import load

EXAMPLES = ["vgg_chain", "cifar_resnet", "mobilenetv2"]


def _rel_err(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


@pytest.mark.parametrize("name", EXAMPLES)
def test_full_size_equals_pytorch(name, artifact, load_example):
    rep = artifact(name)
    spec = load_example(name)
    m = load(rep.artifact).configure()
    x = np.random.RandomState(1).randn(*m.input_shapes[0]).astype(np.float32)
    with torch.no_grad():
        ref = spec.model(torch.from_numpy(x)).numpy()
    assert _rel_err(m(x), ref) <= 1e-4


def test_outputs_are_the_callers_own_across_calls(artifact, load_example):
    """The runtime copies inputs into buffers it keeps and reuses: every output stays as it was
    after later calls, and changing an input array after a call changes nothing."""
    spec = load_example("vgg_chain")
    m = load(artifact("vgg_chain").artifact).configure()
    rng = np.random.RandomState(3)
    xs = [rng.randn(*m.input_shapes[0]).astype(np.float32) for _ in range(3)]
    with torch.no_grad():
        refs = [spec.model(torch.from_numpy(x)).numpy() for x in xs]
    outs = [m(x) for x in xs]
    for x in xs:
        x[...] = 0.0
    m(rng.randn(*m.input_shapes[0]).astype(np.float32))
    for out, ref in zip(outs, refs):
        assert _rel_err(out, ref) <= 1e-4
        assert out.flags.writeable and out.flags.owndata


def test_every_variant_equals_its_pytorch_block(artifact, compiled_state):
    rep = artifact("cifar_resnet")
    state = compiled_state("cifar_resnet", ratios=(0.0, 0.5))
    m = load(rep.artifact)
    x = np.random.RandomState(2).randn(*m.input_shapes[0]).astype(np.float32)
    part = state.partition
    for bi, block in enumerate(part.blocks):
        for vi, variant in enumerate(state.variants[block.name]):
            choice = [0] * len(part.blocks)
            choice[bi] = vi
            got = m.configure(variants=choice)(x)
            with torch.no_grad():
                ref = part.run(torch.from_numpy(x), replace={block.name: variant.gm}).numpy()
            assert _rel_err(got, ref) <= 1e-4, (block.name, variant.id)


def test_switching_loads_only_the_blocks_that_change(artifact):
    m = load(artifact("vgg_chain").artifact)
    n = len(m.blocks)
    m.configure(variants=[0] * n)
    before = set(m.loaded)
    m.configure(variants=[1] + [0] * (n - 1))
    added = set(m.loaded) - before
    assert added == {(m.blocks[0].name, m.blocks[0].variants[1].id)}


def test_configure_rejects_bad_choices(artifact):
    m = load(artifact("vgg_chain").artifact)
    with pytest.raises(UserError, match="needs one index per block"):
        m.configure(variants=[0])
    with pytest.raises(UserError, match=r"block0 has variants 0\.\.1, got 7"):
        m.configure(variants=[7] + [0] * (len(m.blocks) - 1))
    with pytest.raises(UserError, match=r"input x must have shape \(1, 3, 32, 32\)"):
        m(np.zeros((1, 3, 8, 8), np.float32))


def test_inputs_that_are_not_floating_point_are_refused(artifact):
    m = load(artifact("vgg_chain").artifact)
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32))
    ref = np.asarray(m(x.astype(np.float32)))
    assert np.array_equal(np.asarray(m(x)), ref)          # float64 is cast
    for bad in (x.astype(np.uint8), x.astype(np.int64), x > 0, x.astype(np.complex64), x.astype(str)):
        with pytest.raises(UserError, match=f"input x must be a floating-point array .*got dtype {bad.dtype}"):
            m(bad)


def _copy(rep, tmp_path):
    dst = tmp_path / "copy.lego"
    shutil.copytree(rep.artifact, dst)
    return dst


def test_a_tampered_module_is_refused(artifact, tmp_path):
    dst = _copy(artifact("vgg_chain"), tmp_path)
    so = sorted((dst / "modules" / "block0").glob("*.so"))[0]
    data = bytearray(so.read_bytes())
    data[len(data) // 2] ^= 0xFF
    so.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"checksum mismatch for block0 variant r0\.00 .*refusing to load it"):
        load(dst).configure()


def test_tampered_weights_and_missing_files_are_refused(artifact, tmp_path):
    dst = _copy(artifact("vgg_chain"), tmp_path)
    w = sorted((dst / "weights" / "block1").glob("*.safetensors"))[0]
    w.write_bytes(w.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(UserError, match="checksum mismatch for block1 variant r0.00 weights"):
        load(dst).configure()
    (dst / "modules" / "block2" / "r0.00.so").unlink()
    with pytest.raises(UserError, match="missing file of block2 variant r0.00"):
        load(dst).configure(variants=[1, 1, 0, 1][: len(load(dst).blocks)])


def test_not_an_artifact(tmp_path):
    with pytest.raises(UserError, match="no such artifact directory"):
        load(tmp_path / "nope.lego")
    (tmp_path / "half.lego").mkdir()
    with pytest.raises(UserError, match="not a legoc artifact"):
        load(tmp_path / "half.lego")


def test_the_runtime_runs_with_torch_unavailable(artifact):
    """On the device there is no torch: block it and run the artifact in a fresh interpreter."""
    rep = artifact("vgg_chain")
    code = (
        "import sys; sys.modules['torch'] = None\n"   # any `import torch` now raises ImportError
        "import numpy as np\n"
        "from legoc.runtime import load\n"
        f"m = load({str(rep.artifact)!r}).configure(variants=[1] * 4)\n"
        "y = m(np.ones(m.input_shapes[0], np.float32))\n"
        "assert y.shape == (1, 10) and np.isfinite(y).all()\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_thread_count_is_a_runtime_option():
    import tvm

    from legoc.errors import UserError
    from legoc.runtime import set_num_threads

    num_threads = tvm.get_global_func("runtime.NumThreads")
    before = int(num_threads())
    try:
        set_num_threads(1)
        assert int(num_threads()) == 1
    finally:
        set_num_threads(before)
    assert int(num_threads()) == before
    with pytest.raises(UserError, match="num_threads must be a positive integer, got 0"):
        set_num_threads(0)


def test_a_chain_of_segments_runs_without_the_tensor_dictionary(artifact):
    """A plan whose steps each take the previous step's one tensor runs as a chain of one-tensor
    calls; it gives the same outputs as the general path (tensors looked up by name) for every
    block at every variant."""
    m = load(artifact("vgg_chain").artifact)
    ex = m._executor
    x = np.random.RandomState(4).randn(*m.input_shapes[0]).astype(np.float32)
    n = len(m.blocks)
    for variant in range(len(m.blocks[0].variants)):
        m.configure(variants=[min(variant, len(b.variants) - 1) for b in m.blocks])
        chain = ex._chain
        assert chain is not None and len(chain) == len(m.steps) >= n
        fast = m(x)
        ex._chain = None
        try:
            general = m(x)
        finally:
            ex._chain = chain
        np.testing.assert_array_equal(fast, general)


def test_chain_only_when_each_step_takes_the_previous_steps_tensor():
    from types import SimpleNamespace

    from legoc.runtime.executor import _chain

    class Step:
        def one(self, tensor):
            return tensor

    a, b, c = Step(), Step(), Step()
    view = SimpleNamespace(input_names=["x"], outputs=["y"])
    chain = ((a, (("x", "cpu"),), (("h", "cpu"),)), (b, (("h", "cpu"),), (("h", "gpu"),)),
             (c, (("h", "gpu"),), (("y", "cpu"),)))
    assert _chain(view, chain) == (a.one, b.one, c.one)
    assert _chain(view, ()) is None                                   # the output is not the input
    assert _chain(SimpleNamespace(input_names=["x", "z"], outputs=["y"]), chain) is None
    assert _chain(SimpleNamespace(input_names=["x"], outputs=["y", "h"]), chain) is None
    skip = (chain[0], (c, (("x", "cpu"),), (("y", "cpu"),)))          # reads the input, not h
    assert _chain(view, skip) is None
    two_in = (chain[0], (b, (("h", "cpu"), ("x", "cpu")), (("y", "cpu"),)))
    assert _chain(view, two_in) is None
    two_out = ((a, (("x", "cpu"),), (("y", "cpu"), ("h", "cpu"))),)
    assert _chain(view, two_out) is None
    plain = ((lambda t: (t,), (("x", "cpu"),), (("y", "cpu"),)),)   # no one-tensor call
    assert _chain(view, plain) is None
