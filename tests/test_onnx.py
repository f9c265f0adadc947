"""ONNX in and out (issue 18).

In: every zoo model exported with torch.onnx.export converts (legoc.onnx_import) to a GraphModule
equal to the PyTorch model, and compiles from its .onnx to an artifact that runs equal to it;
bad ONNX files each give one line and exit code 2 with nothing written.
Out: legoc.export writes one configuration (or every variant) as ONNX that passes onnx.checker
and runs under ONNX Runtime equal to the TVM artifact.

The artifact keeps every variant as ONNX only when compiled with ``--onnx`` (``export_onnx``).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from legoc.cli import main
from legoc.errors import UserError

_spec = importlib.util.spec_from_file_location("legoc_test_zoo", Path(__file__).with_name("zoo.py"))
zoo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(zoo)




def _export(model, inputs, path: Path, dynamic: bool = False, opset: int = 17) -> Path:
    names = [f"image{i}" for i in range(len(inputs))]
    axes = {n: {0: "batch"} for n in names} if dynamic else None
    torch.onnx.export(model.eval(), tuple(inputs), str(path), input_names=names, opset_version=opset,
                      dynamic_axes=axes, dynamo=False)
    return path


def _leaves(out) -> list[np.ndarray]:
    if isinstance(out, dict):
        return [v for k in out for v in _leaves(out[k])]
    if isinstance(out, (tuple, list)):
        return [v for o in out for v in _leaves(o)]
    return [out.detach().numpy() if isinstance(out, torch.Tensor) else np.asarray(out)]


def _close(got, want, tol=1e-4) -> float:
    got, want = _leaves(got), _leaves(want)
    assert len(got) == len(want)
    worst = 0.0
    for g, w in zip(got, want):
        assert g.shape == w.shape
        worst = max(worst, float(np.abs(g - w).max()) / max(float(np.abs(w).max()), 1e-6))
    assert worst <= tol, worst
    return worst


def _build(spec, out: Path, ratios=(0.0, 0.5)):
    """capture -> ... -> TVM build of an ONNX-loaded spec, with the ONNX modules in the artifact."""
    from legoc.passes import PassManager, ProgramState
    from legoc.pipeline import CompileConfig, CompileReport, build_artifact, default_pipeline
    from legoc.targets.table import get_target

    cfg = CompileConfig(ratios=tuple(ratios), progress=False, retrain_epochs=0, validate=False, profile_accuracy=False,
                        export_onnx=True)
    state = PassManager(default_pipeline())(ProgramState(model=spec.model, example_inputs=spec.example_inputs,
                                                         source=str(spec.path)), cfg).state
    build_artifact(state, get_target("host"), out, cfg, CompileReport(artifact=out))
    return state


# ------------------------------------------------------------------------------------------ ONNX in

@pytest.mark.parametrize("name", sorted(zoo.MODELS))
def test_zoo_onnx_converts_equal_to_pytorch(name, tmp_path):
    from legoc.modelfile import load_model_file
    from legoc.passes import ProgramState
    from legoc.passes.capture import Capture
    from legoc.passes.partition import partition

    model, inputs = zoo.MODELS[name]()
    spec = load_model_file(_export(model, inputs, tmp_path / f"{name}.onnx"))
    with torch.no_grad():
        _close(spec.model(*inputs), model(*inputs))
    gm = Capture()(ProgramState(model=spec.model, example_inputs=spec.example_inputs), None).state.gm
    assert partition(gm).blocks, name


@pytest.mark.parametrize("name", sorted(zoo.MODELS))
def test_zoo_onnx_compiles_and_runs_equal(name, tmp_path):
    from legoc.modelfile import load_model_file
    from legoc.runtime import load

    model, inputs = zoo.MODELS[name]()
    spec = load_model_file(_export(model, inputs, tmp_path / f"{name}.onnx"))
    _build(spec, tmp_path / "a.lego", ratios=(0.0,))
    m = load(tmp_path / "a.lego")
    with torch.no_grad():
        _close(m(*[x.numpy() for x in inputs]), model(*inputs))


def test_dynamic_input_needs_and_takes_input_shape(tmp_path):
    from legoc.modelfile import load_model_file

    model, inputs = zoo.MODELS["resnet_basic"]()
    path = _export(model, inputs, tmp_path / "dyn.onnx", dynamic=True)
    with pytest.raises(UserError, match=r"input 'image0' has a dynamic shape \(batchx3x32x32\); give it with "
                                        r"--input-shape image0=1,3,32,32"):
        load_model_file(path)
    with pytest.raises(UserError, match="--input-shape names 'photo', which dyn.onnx has no input of; its inputs: image0"):
        load_model_file(path, input_shapes=["photo=1,3,32,32"])
    with pytest.raises(UserError, match="does not fit"):
        load_model_file(path, input_shapes=["image0=1,3,16"])
    spec = load_model_file(path, input_shapes=["image0=1,3,32,32"])
    with torch.no_grad():
        _close(spec.model(*inputs), model(*inputs))


def test_data_sidecar_gives_the_three_splits(tmp_path):
    from legoc.modelfile import load_model_file

    model, inputs = zoo.MODELS["vgg"]()
    path = _export(model, inputs, tmp_path / "vgg.onnx")
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    np.savez(data / "train.npz", x=rng.standard_normal((40, 3, 32, 32)).astype(np.float32))
    np.savez(data / "val.npz", x=rng.standard_normal((10, 3, 32, 32)).astype(np.float32), y=np.arange(10) % 10)
    np.savez(data / "test.npz", x=rng.standard_normal((10, 3, 32, 32)).astype(np.float32))
    spec = load_model_file(path, data=data)
    train = spec.train_data()
    assert [b[0].shape[0] for b in train] == [32, 8] and all(len(b) == 1 for b in train)
    (x, y), = spec.val_data()
    assert x.shape == (10, 3, 32, 32) and y.tolist() == list(range(10))
    with pytest.raises(UserError, match="test.npz: no 'y'"):
        spec.test_data()
    np.savez(data / "val.npz", x=np.zeros((4, 3, 16, 16), np.float32), y=np.zeros(4))
    with pytest.raises(UserError, match=r"array 'x' has shape \(4, 3, 16, 16\)"):
        spec.val_data()
    with pytest.raises(UserError, match="no such folder"):
        load_model_file(path, data=tmp_path / "nowhere")


def _bad_files(tmp_path: Path) -> dict:
    import onnx
    from onnx import helper

    model, inputs = zoo.MODELS["vgg"]()
    good = _export(model, inputs, tmp_path / "good.onnx")
    raw = good.read_bytes()
    cases = {}
    (tmp_path / "truncated.onnx").write_bytes(raw[: len(raw) // 2])
    cases["truncated file"] = ("truncated.onnx", [], "not a readable ONNX model")
    (tmp_path / "text.onnx").write_text("def build_model():\n    return None\n")
    cases["not ONNX at all"] = ("text.onnx", [], "ONNX model")
    for version, word in ((30, "newer"), (5, "older")):
        m = onnx.load(str(good))
        m.opset_import[0].version = version
        onnx.save(m, str(tmp_path / f"opset{version}.onnx"))
        cases[f"opset {version}"] = (f"opset{version}.onnx", [], f"opset {version} is {word} than the converter handles")
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3, 8, 8])
    unsupported = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["r"], name="relu"),
                                                       helper.make_node("LpNormalization", ["r"], ["y"], name="norm")],
                                                      "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(unsupported, str(tmp_path / "unsupported.onnx"))
    cases["unsupported operator"] = ("unsupported.onnx", [],
                                     "ONNX operator LpNormalization at node 'norm' (opset 17) is not supported")
    _export(model, inputs, tmp_path / "dynamic.onnx", dynamic=True)
    cases["dynamic input without --input-shape"] = ("dynamic.onnx", [], "input 'image0' has a dynamic shape")
    return cases


def test_bad_onnx_files_give_one_line_and_exit_2(tmp_path, capsys):
    for name, (file, args, text) in _bad_files(tmp_path).items():
        out = tmp_path / f"{name.replace(' ', '_')}.lego"
        code = main(["compile", str(tmp_path / file), "-o", str(out), "--no-progress", *args])
        err = capsys.readouterr().err.strip()
        assert code == 2, (name, err)
        assert len(err.splitlines()) == 1 and text in err, (name, err)
        assert not out.exists() and not list(tmp_path.glob(f".{out.name}*")), name


def test_input_shape_naming_a_missing_input_is_exit_2(tmp_path, capsys):
    model, inputs = zoo.MODELS["vgg"]()
    path = _export(model, inputs, tmp_path / "dyn.onnx", dynamic=True)
    out = tmp_path / "x.lego"
    assert main(["compile", str(path), "-o", str(out), "--input-shape", "photo=1,3,32,32"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--input-shape names 'photo'" in err and not out.exists()


def test_cli_compiles_onnx_with_data_and_input_shape(tmp_path):
    from legoc.runtime.artifact import read_manifest

    model, inputs = zoo.MODELS["vgg"]()
    path = _export(model, inputs, tmp_path / "vgg.onnx", dynamic=True)
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 64), ("val", 32)):
        np.savez(data / f"{split}.npz", x=rng.standard_normal((n, 3, 32, 32)).astype(np.float32), y=np.arange(n) % 10)
    out = tmp_path / "vgg.lego"
    assert main(["compile", str(path), "-o", str(out), "--input-shape", "image0=1,3,32,32", "--data", str(data),
                 "--ratios", "0,0.5", "--retrain-epochs", "1", "--no-progress", "--onnx"]) == 0
    manifest = read_manifest(out)
    assert manifest["retrained"] and manifest["accuracy"]["metric"] == "top1"
    assert all("onnx" in v for s in manifest["segments"] for v in s["variants"])


# ----------------------------------------------------------------------------------------- ONNX out

@pytest.fixture(scope="module")
def onnx_artifact(tmp_path_factory):
    from legoc.modelfile import load_model_file

    tmp = tmp_path_factory.mktemp("onnx_out")
    model, inputs = zoo.MODELS["resnet_basic"]()
    spec = load_model_file(_export(model, inputs, tmp / "resnet.onnx"))
    _build(spec, tmp / "resnet.lego", ratios=(0.0, 0.5))
    return tmp / "resnet.lego", inputs


def _ort(path, xs):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {i.name: x for i, x in zip(sess.get_inputs(), xs)})


def test_export_one_configuration_equals_the_artifact(onnx_artifact, tmp_path):
    import onnx

    from legoc.export import export
    from legoc.runtime import load

    art, inputs = onnx_artifact
    m = load(art)
    xs = [np.random.default_rng(1).standard_normal(x.shape).astype(np.float32) for x in inputs]
    for choice in ([0] * len(m.blocks), [1] + [0] * (len(m.blocks) - 1), [1] * len(m.blocks)):
        out = tmp_path / f"{''.join(map(str, choice))}.onnx"
        assert export(art, out, variants=choice) == [out]
        onnx.checker.check_model(onnx.load(str(out)), full_check=True)
        _close(_ort(out, xs), m.configure(variants=choice)(*xs))
    print(f"artifact {sum(f.stat().st_size for f in art.rglob('*') if f.is_file())} bytes, of which ONNX "
          f"{sum(f.stat().st_size for f in (art / 'onnx').rglob('*.onnx'))}")


def test_export_all_assembles_any_configuration(onnx_artifact, tmp_path):
    import json

    import onnx

    from legoc.export import export, merge_segments
    from legoc.runtime import load
    from legoc.runtime.artifact import output_names

    art, inputs = onnx_artifact
    files = export(art, tmp_path / "parts", all_variants=True)
    recipe = json.loads((tmp_path / "parts" / "segments.json").read_text())
    assert {f.name for f in files} == {v["file"] for s in recipe["segments"] for v in s["variants"]} | {"segments.json"}
    m = load(art)
    choice = [i % 2 for i in range(len(m.blocks))]
    picks = iter(choice)
    parts = [(onnx.load(str(tmp_path / "parts" / s["variants"][next(picks) if s["kind"] == "block" else 0]["file"])),
              s["name"]) for s in recipe["segments"]]
    inputs_vi = [onnx.helper.make_tensor_value_info(i["name"], onnx.TensorProto.FLOAT, i["shape"]) for i in recipe["inputs"]]
    model = merge_segments(parts, inputs_vi, output_names(recipe["output"]))
    onnx.checker.check_model(model, full_check=True)
    xs = [x.numpy() for x in inputs]
    _close(_ort_model(model, xs), m.configure(variants=choice)(*xs))


def _blocks(art) -> list:
    from legoc.runtime.artifact import read_manifest

    return [s for s in read_manifest(art)["segments"] if s["kind"] == "block"]


def _ort_model(model, xs):
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {i.name: x for i, x in zip(sess.get_inputs(), xs)})


def test_export_mistakes_are_user_errors_and_write_nothing(onnx_artifact, tmp_path):
    from legoc.export import export

    art, _ = onnx_artifact
    out = tmp_path / "x.onnx"
    blocks = len(_blocks(art))
    for variants, text in (([0] * (blocks + 1), "give one each"), ("0,a", "comma-separated integers"),
                           ([9] * blocks, "has variants 0..1, not 9")):
        with pytest.raises(UserError, match=text):
            export(art, out, variants=variants)
    with pytest.raises(UserError, match="not both"):
        export(art, out, variants=[0], all_variants=True)
    with pytest.raises(UserError, match="no such artifact"):
        export(tmp_path / "missing.lego", out)
    assert not out.exists() and not list(tmp_path.glob(".x.onnx*"))


def test_cli_export(onnx_artifact, tmp_path, capsys):
    art, _ = onnx_artifact
    assert main(["export", str(art), "--variants", ",".join("1" * len(_blocks(art))), "--onnx",
                 str(tmp_path / "m.onnx")]) == 0
    assert main(["export", str(art), "--variants", "7", "--onnx", str(tmp_path / "n.onnx")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1 and not (tmp_path / "n.onnx").exists()
    assert main(["export", str(art), "--all", "--onnx", str(tmp_path / "all")]) == 0
    assert (tmp_path / "all" / "segments.json").is_file()
