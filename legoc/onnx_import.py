"""Load an ONNX model (``legoc compile model.onnx``) into the ModelSpec a model.py gives.

Steps, each failing with one line that names the file (and the input or node) and what to do:
read and check the file; the default-domain opset must be one onnx2torch handles; every input
gets a static shape (the graph's, or ``--input-shape NAME=1,3,224,224`` for a dynamic one);
shape arithmetic on static shapes is folded to constants (onnx's reference evaluator), so a
``Reshape`` gets a constant shape; every operator must have a converter; onnx2torch converts the
graph and legoc.onnx_lower turns it into a plain torch.fx GraphModule, whose initializers are
ordinary parameters that the passes prune and retrain. The result is checked against ONNX
Runtime on the example inputs before anything else runs.

Data for BN recalibration, retraining and accuracy is the optional ``--data DIR`` sidecar
(legoc.onnx_data); without it, as for a model.py without data, accuracy is output fidelity.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np

from legoc.errors import InternalError, UserError, describe, first_line

OPSET_MIN, OPSET_MAX = 9, 17     # default-domain opsets at which onnx2torch 1.5.15 converts the common CNN operators
DEFAULT_DOMAINS = ("", "ai.onnx")
FOLD_LIMIT = 1 << 24             # fold constant subgraphs whose results have at most this many values
CONVERT_HINT = ("convert it with onnx.version_converter.convert_version(model, 17) "
                "or export it again at opset 17")


def read(path: Path):
    """The checked ModelProto of ``path``."""
    import onnx
    from google.protobuf.message import DecodeError

    if not path.is_file():
        raise UserError(f"{path}: no such ONNX file; pass the path of a .onnx model")
    try:
        model = onnx.load(str(path))
    except (DecodeError, ValueError, RuntimeError, OSError) as exc:
        raise UserError(f"{path}: not a readable ONNX model (truncated or not ONNX: {first_line(exc) or type(exc).__name__}); "
                        "export it again (torch.onnx.export) or copy it whole") from exc
    if model.ir_version <= 0 or not model.HasField("graph") or not model.graph.node:
        raise UserError(f"{path}: not an ONNX model (no IR version or no graph); pass a model saved with onnx.save "
                        "or torch.onnx.export")
    opset = default_opset(model)
    if opset is None:
        raise UserError(f"{path}: the model imports no opset of the default ONNX domain (truncated?); export it again")
    if not OPSET_MIN <= opset <= OPSET_MAX:
        side = "newer" if opset > OPSET_MAX else "older"
        raise UserError(f"{path}: opset {opset} is {side} than the converter handles ({OPSET_MIN}..{OPSET_MAX}); "
                        f"{CONVERT_HINT}")
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise UserError(f"{path}: not a valid ONNX model ({first_line(exc)}); export it again") from exc
    return model


def default_opset(model) -> int | None:
    versions = [o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS]
    return max(versions) if versions else None


def parse_input_shapes(given) -> dict[str, tuple[int, ...]]:
    """``{"name": (1, 3, 224, 224)}`` from a dict or from ``NAME=1,3,224,224`` strings."""
    if not given:
        return {}
    if isinstance(given, dict):
        return {str(k): tuple(int(d) for d in v) for k, v in given.items()}
    out = {}
    for text in given:
        name, sep, dims = str(text).partition("=")
        try:
            shape = tuple(int(d) for d in dims.split(","))
        except ValueError:
            shape = ()
        if not sep or not name.strip() or not shape or min(shape) < 1:
            raise UserError(f"--input-shape takes NAME=1,3,224,224 (positive sizes), got {text!r}")
        out[name.strip()] = shape
    return out


def _graph_inputs(model) -> list:
    inits = {t.name for t in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in inits]


def _shape_text(value) -> str:
    return "x".join(str(d.dim_value) if d.dim_value > 0 else (d.dim_param or "?") for d in value.type.tensor_type.shape.dim)


def fix_input_shapes(model, path: Path, given: dict[str, tuple[int, ...]]) -> None:
    """Give every graph input a static shape: the graph's own, else ``given`` (checked)."""
    import onnx

    inputs = _graph_inputs(model)
    names = {v.name for v in inputs}
    listing = ", ".join(f"{v.name} ({_shape_text(v)})" for v in inputs)
    for name in given:
        if name not in names:
            raise UserError(f"--input-shape names '{name}', which {path.name} has no input of; its inputs: {listing}")
    for v in inputs:
        t = v.type.tensor_type
        if t.elem_type != onnx.TensorProto.FLOAT:
            raise UserError(f"{path}: input '{v.name}' is {onnx.TensorProto.DataType.Name(t.elem_type)}; legoc compiles "
                            "models with float32 inputs")
        dims = list(t.shape.dim)
        if v.name in given:
            shape = given[v.name]
            if len(shape) != len(dims) or any(d.dim_value > 0 and d.dim_value != s for d, s in zip(dims, shape)):
                raise UserError(f"--input-shape {v.name}={','.join(map(str, shape))} does not fit the input's shape "
                                f"{_shape_text(v)} in {path.name}; give one size per axis, equal where the graph fixes it")
            for d, s in zip(dims, shape):
                d.Clear()
                d.dim_value = s
        elif not t.HasField("shape") or any(d.dim_value <= 0 for d in dims):
            example = ",".join(str(d.dim_value) if d.dim_value > 0 else "1" for d in dims) or "1,3,224,224"
            raise UserError(f"{path}: input '{v.name}' has a dynamic shape ({_shape_text(v)}); give it with "
                            f"--input-shape {v.name}={example}")


def _identifier(name: str, taken: set) -> str:
    ident = re.sub(r"\W", "_", name) or "x"
    if ident[0].isdigit():
        ident = "x_" + ident
    base, k = ident, 1
    while ident in taken:
        ident, k = f"{base}_{k}", k + 1
    taken.add(ident)
    return ident


def rename_inputs(model) -> dict[str, str]:
    """Rename graph inputs to Python identifiers (fx placeholder names); returns old -> new."""
    taken: set = set()
    mapping = {v.name: _identifier(v.name, taken) for v in _graph_inputs(model)}
    for v in model.graph.input:
        v.name = mapping.get(v.name, v.name)
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in mapping:
                node.input[i] = mapping[name]
    for v in model.graph.output:
        v.name = mapping.get(v.name, v.name)
    return mapping


def fold_constants(model):
    """Replace every node whose inputs are all constants (or, for Shape, a tensor of static
    shape) by an initializer of its value, so shape arithmetic becomes constants."""
    import onnx
    from onnx import numpy_helper, shape_inference
    from onnx.reference import ReferenceEvaluator

    model = shape_inference.infer_shapes(model)
    static = {}
    for v in [*model.graph.value_info, *model.graph.input, *model.graph.output]:
        dims = v.type.tensor_type.shape.dim
        if v.type.tensor_type.HasField("shape") and all(d.dim_value > 0 for d in dims):
            static[v.name] = [d.dim_value for d in dims]
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    outputs = {v.name for v in model.graph.output}
    opsets = list(model.opset_import)
    kept, folded = [], []
    for node in model.graph.node:
        values = None
        if node.op_type == "Shape" and node.input[0] in static and node.domain in DEFAULT_DOMAINS:
            shape = static[node.input[0]]
            attrs = {a.name: a.i for a in node.attribute}
            values = [np.array(shape[attrs.get("start", 0):attrs.get("end", len(shape))], dtype=np.int64)]
        elif (node.domain in DEFAULT_DOMAINS and not any(a.type == onnx.AttributeProto.GRAPH for a in node.attribute)
              and node.op_type not in ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike")
              and all(i == "" or i in consts for i in node.input)):
            one = onnx.helper.make_model(onnx.helper.make_graph([node], "fold", [], [
                onnx.helper.make_empty_tensor_value_info(o) for o in node.output],
                [numpy_helper.from_array(consts[i], i) for i in node.input if i]), opset_imports=opsets,
                ir_version=model.ir_version)
            try:
                values = ReferenceEvaluator(one).run(None, {})
            except Exception:
                values = None
        if values is None or any(o in outputs for o in node.output) or sum(np.size(v) for v in values) > FOLD_LIMIT:
            kept.append(onnx.NodeProto())
            kept[-1].CopyFrom(node)
            continue
        for name, value in zip(node.output, values):
            consts[name] = np.asarray(value)
            folded.append(numpy_helper.from_array(np.asarray(value), name))
    del model.graph.node[:]
    model.graph.node.extend(kept)
    model.graph.initializer.extend(folded)
    return shape_inference.infer_shapes(model)


def check_operators(model, path: Path, opset: int, torchvision_ok: bool) -> None:
    """Every node has an onnx2torch converter that accepts it (one line naming the first that
    does not)."""
    from onnx2torch.onnx_graph import OnnxGraph

    from legoc.onnx_lower import NEEDS_TORCHVISION, get_node_converter

    graph = OnnxGraph(model.graph)
    opsets = {o.domain: o.version for o in model.opset_import}
    for name, node in graph.nodes.items():
        proto = node.proto
        domain = proto.domain or ""
        v = opsets.get(domain, opset if domain in DEFAULT_DOMAINS else 1)
        op = proto.op_type + (f" (domain {domain})" if domain else "")
        where = f"{path}: ONNX operator {op} at node '{proto.name or name}' (opset {v})"
        conv = get_node_converter(domain, proto.op_type, v)
        if conv is None or (proto.op_type in NEEDS_TORCHVISION and not torchvision_ok):
            raise UserError(f"{where} is not supported by the converter (onnx2torch); write that part of the model with "
                            "supported operators (convolutions, pooling, elementwise, Concat, Reshape, Gemm...) and "
                            "export it again")
        try:
            conv(node, graph)
        except Exception as exc:
            raise UserError(f"{where} cannot be converted: {first_line(exc) or type(exc).__name__}; write that part "
                            "of the model differently and export it again") from exc


def example_inputs(model) -> tuple:
    """Seeded normal inputs of every graph input's (now static) shape."""
    import torch

    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn([d.dim_value for d in v.type.tensor_type.shape.dim], generator=gen)
                 for v in _graph_inputs(model))


def check_against_onnxruntime(model, gm, inputs: tuple, path: Path) -> None:
    """The converted module must compute what ONNX Runtime computes from the same graph."""
    import onnxruntime as ort
    import torch

    options = ort.SessionOptions()
    options.log_severity_level = 3   # errors only
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds = {v.name: x.numpy() for v, x in zip(_graph_inputs(model), inputs)}
    want = sess.run(None, feeds)
    with torch.no_grad():
        got = [t.numpy() for t in torch.utils._pytree.tree_leaves(gm(*inputs))]
    if len(got) != len(want):
        raise InternalError(f"{path}: the converted model has {len(got)} outputs, ONNX Runtime {len(want)}")
    for k, (g, w) in enumerate(zip(got, want)):
        err = float(np.abs(g - w).max()) / max(float(np.abs(w).max()), 1e-6) if w.size else 0.0
        if g.shape != w.shape or err > 1e-4:   # an attribute PyTorch has no exact equivalent of
            raise UserError(f"{path}: output {model.graph.output[k].name} of the converted model differs from ONNX "
                            f"Runtime (shape {g.shape} vs {w.shape}, relative error {err:.2e}); an operator uses a mode "
                            "PyTorch lacks (e.g. Resize coordinate modes): export the model with PyTorch's defaults")


def load_onnx(path: str | Path, input_shapes=None, data=None):
    """The ModelSpec of an ONNX file (see the module docstring)."""
    import types

    from legoc.modelfile import ModelSpec
    from legoc.onnx_data import data_hooks
    from legoc.onnx_lower import converter, lower

    path = Path(path)
    model = read(path)
    opset = default_opset(model)
    fix_input_shapes(model, path, parse_input_shapes(input_shapes))
    renamed = rename_inputs(model)
    try:
        model = fold_constants(model)
    except Exception as exc:   # shape inference rejects the graph
        raise UserError(f"{path}: ONNX shape inference fails on the model ({describe(exc)}); check it with "
                        "onnx.checker.check_model(model, full_check=True)") from exc
    inputs = example_inputs(model)
    name = re.sub(r"\W", "_", path.stem) or "onnx_model"
    with warnings.catch_warnings():   # onnx2torch warns of attribute values it may convert inexactly:
        warnings.simplefilter("ignore")   # the comparison with ONNX Runtime below decides
        onnx2torch, torchvision_ok = converter()
        check_operators(model, path, opset, torchvision_ok)
        try:
            gm = lower(onnx2torch.convert(model, save_input_names=True), inputs, class_name=name)
        except UserError:
            raise
        except Exception as exc:
            raise UserError(f"{path}: onnx2torch's conversion fails ({describe(exc)}); export the model at opset 17 "
                            "and try again") from exc
    check_against_onnxruntime(model, gm, inputs, path)
    hooks = data_hooks(data, gm, inputs, renamed) if data is not None else {}
    module = types.ModuleType(f"legoc_onnx_{name}")
    module.__file__ = str(path)
    module.onnx_model = model
    return ModelSpec(path=path, module=module, model=gm, example_inputs=inputs, **hooks)
