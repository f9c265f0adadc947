"""ONNX graph -> a plain torch.fx GraphModule that legoc's passes understand.

onnx2torch converts every ONNX node into one module: Conv, BatchNormalization, Gemm and the
common activations become torch.nn modules holding the initializers as parameters (so they
prune), the rest become onnx2torch modules whose forward calls torch functions. :func:`lower`
traces through the latter so the graph holds only torch.nn modules and torch functions (what
legoc.passes.analysis reasons about), then rewrites a few spellings to the ones the channel
analysis knows (torch.mean -> Tensor.mean, nn.Flatten -> torch.flatten, torch.clip -> clamp, and a
reshape to a constant (batch, -1) -> torch.flatten, so the model takes any batch size again).

Every proxy of the lowering trace carries its value on the example inputs, so a converter module
that asks its input for ``dim()``, ``shape`` or ``tolist()`` gets numbers: the shapes are fixed
when legoc compiles, and ONNX initializers are real tensors while tracing.
"""
from __future__ import annotations

import importlib
import operator
import sys
import types

import numpy as np
import torch
import torch.fx
from torch import nn
from torch.fx.node import map_aggregate

from legoc.errors import UserError

# ONNX operators whose onnx2torch converter calls torchvision (not needed by CNN classifiers)
NEEDS_TORCHVISION = {"NonMaxSuppression", "RoiAlign"}


def _torchvision_usable() -> bool:
    before = set(sys.modules)
    try:
        importlib.import_module("torchvision.ops")
        return True
    except Exception:   # absent, or a build for another torch (RuntimeError at import)
        for name in set(sys.modules) - before:
            if name == "torchvision" or name.startswith("torchvision."):
                del sys.modules[name]
        return False


def converter():
    """The onnx2torch module and whether its torchvision operators work.

    onnx2torch imports torchvision at import time for two detection operators only. Where
    torchvision is missing or does not load with this torch (its PyPI wheel is built for CUDA
    torch), a placeholder stands in while onnx2torch imports, and those two operators are
    reported as unsupported."""
    if "onnx2torch" in sys.modules:
        return sys.modules["onnx2torch"], "torchvision" in sys.modules and not getattr(
            sys.modules["torchvision"], "_legoc_placeholder", False)
    usable = _torchvision_usable()
    added = []
    if not usable:
        def missing(*args, **kwargs):
            raise UserError("this ONNX operator needs torchvision, which does not load here; "
                            "install the torchvision build that matches torch")
        stub, ops = types.ModuleType("torchvision"), types.ModuleType("torchvision.ops")
        ops.nms = ops.roi_align = ops.box_convert = missing
        stub.ops, stub._legoc_placeholder = ops, True
        for name, mod in (("torchvision", stub), ("torchvision.ops", ops)):
            if name not in sys.modules:
                sys.modules[name] = mod
                added.append(name)
    try:
        import onnx2torch
    except ImportError as exc:
        raise UserError(f"compiling an ONNX model needs onnx2torch ({exc}); install it with "
                        "`pip install --no-deps onnx2torch==1.5.15`") from exc
    finally:
        for name in added:
            sys.modules.pop(name, None)
    return onnx2torch, usable


def get_node_converter(domain: str, op_type: str, opset: int):
    """onnx2torch's converter of one operator at one opset, or None."""
    from onnx2torch.node_converters import get_converter

    try:
        return get_converter(domain=domain, operation_type=op_type, version=opset)
    except NotImplementedError:
        return None


class _ValueProxy(torch.fx.Proxy):
    """A proxy that knows its value on the example inputs: shape queries answer with numbers."""

    def __len__(self):
        return len(self.node.meta["legoc_value"])


for _name in ("shape", "ndim", "dtype", "device"):
    setattr(_ValueProxy, _name, property(lambda self, a=_name: getattr(self.node.meta["legoc_value"], a)))
for _name in ("dim", "size", "numel", "nelement"):
    setattr(_ValueProxy, _name, lambda self, *args, m=_name: getattr(self.node.meta["legoc_value"], m)(*args))


class _Lowering(torch.fx.Tracer):
    """Keeps torch.nn modules as leaves and traces through everything else (onnx2torch's
    modules), running every traced op on the example values alongside."""

    def __init__(self, values: dict[str, torch.Tensor]):
        super().__init__()
        self.values = values
        self.evaluating = False   # computing a value: modules and their attributes are real

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        return attr_val if self.evaluating else super().getattr(attr, attr_val, parameter_proxy_cache)

    def call_module(self, m, forward, args, kwargs):
        return forward(*args, **kwargs) if self.evaluating else super().call_module(m, forward, args, kwargs)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return type(m).__module__.startswith("torch.nn") and not isinstance(m, nn.Sequential)

    def proxy(self, node: torch.fx.Node) -> torch.fx.Proxy:
        return _ValueProxy(node, self)

    def create_arg(self, a):
        # ONNX keeps scalars (and slice bounds) as 0-d tensors, onnx2torch some as numpy numbers:
        # as Python numbers they are the literals a PyTorch model would have
        if (isinstance(a, torch.Tensor) and not isinstance(a, nn.Parameter) and a.ndim == 0) or isinstance(a, np.generic):
            return a.item()
        return super().create_arg(a)

    def create_proxy(self, kind, target, args, kwargs, *rest, **kw):
        proxy = super().create_proxy(kind, target, args, kwargs, *rest, **kw)
        if kind == "placeholder":
            value = self.values[target]
        else:
            real = map_aggregate((args, kwargs), lambda a: a.node.meta["legoc_value"]
                                 if isinstance(a, torch.fx.Proxy) else a)
            a, k = real
            before, self.evaluating = self.evaluating, True
            try:
                value = self._evaluate(kind, target, a, k)
            finally:
                self.evaluating = before
        proxy.node.meta["legoc_value"] = value
        return proxy

    def _evaluate(self, kind, target, a, k):
        with torch.no_grad():
            if kind == "call_function":
                return target(*a, **k)
            if kind == "call_method":
                return getattr(a[0], target)(*a[1:], **k)
            if kind == "call_module":
                return self.root.get_submodule(target)(*a, **k)
            value = self.root   # get_attr
            for part in target.split("."):
                value = getattr(value, part)
            return value


_METHODS = {torch.mean: "mean", torch.sum: "sum", torch.amax: "amax"}
_FUNCTIONS = {torch.clip: torch.clamp}


def _hardsigmoid(m: nn.Module) -> bool:
    return type(m).__name__ == "OnnxHardSigmoid" and abs(m.alpha - 1 / 6) < 1e-6 and abs(m.beta - 0.5) < 1e-6


def _batch_flatten(n: torch.fx.Node) -> bool:
    """Whether ``n`` reshapes a tensor to (its batch size, everything else): the ``x.view(
    x.size(0), -1)`` that exporters write as Shape -> Gather -> Concat -> Reshape and constant
    folding turned into a fixed batch size. ``torch.flatten(x, 1)`` is the same at that batch size
    and keeps other batch sizes working (``--data`` batches)."""
    if not ((n.op == "call_function" and n.target is torch.reshape)
            or (n.op == "call_method" and n.target in ("reshape", "view"))) or len(n.args) < 2 or n.kwargs:
        return False
    src = n.args[0]
    shape = n.args[1] if len(n.args) == 2 else n.args[1:]
    value = src.meta.get("legoc_value") if isinstance(src, torch.fx.Node) else None
    if not isinstance(value, torch.Tensor) or value.ndim < 3 or not isinstance(shape, (tuple, list)) or len(shape) != 2:
        return False
    if not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        return False
    return shape[0] == value.shape[0] and shape[1] in (-1, int(np.prod(value.shape[1:])))


def lower(gm: torch.fx.GraphModule, example_inputs: tuple, class_name: str) -> torch.fx.GraphModule:
    """onnx2torch's GraphModule as one of torch.nn modules and torch functions only."""
    gm.eval()   # the trace runs every module on the example inputs: BN must not update its statistics
    for name, m in list(gm.named_modules()):
        if _hardsigmoid(m):   # ONNX HardSigmoid with torch's constants: nn.Hardsigmoid
            parent, _, attr = name.rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, attr, nn.Hardsigmoid())
    names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    tracer = _Lowering(dict(zip(names, example_inputs)))
    graph = tracer.trace(gm)
    for n in list(graph.nodes):
        if n.op == "call_function" and n.target in _METHODS:
            with graph.inserting_before(n):
                new = graph.call_method(_METHODS[n.target], n.args, n.kwargs)
            n.replace_all_uses_with(new)
            graph.erase_node(n)
        elif n.op == "call_function" and n.target in _FUNCTIONS:
            n.target = _FUNCTIONS[n.target]
        elif _batch_flatten(n):   # batch-independent again, as the original graph was
            with graph.inserting_before(n):
                new = graph.call_function(torch.flatten, (n.args[0], 1))
            new.meta["legoc_value"] = n.meta["legoc_value"]
            n.replace_all_uses_with(new)
            graph.erase_node(n)
        elif n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Flatten):
            m = gm.get_submodule(n.target)
            with graph.inserting_before(n):
                new = graph.call_function(torch.flatten, (n.args[0], m.start_dim, m.end_dim))
            n.replace_all_uses_with(new)
            graph.erase_node(n)
        elif n.op == "call_function" and n.target is operator.getitem and isinstance(n.args[1], list):
            n.args = (n.args[0], tuple(n.args[1]))   # onnx2torch indexes with a list of slices
        elif n.op == "output" and isinstance(n.args[0], list):
            n.args = (tuple(n.args[0]),)
    for n in graph.nodes:
        n.meta.pop("legoc_value", None)
    out = torch.fx.GraphModule(gm, graph, class_name=class_name)
    out.graph.eliminate_dead_code()
    out.delete_all_unused_submodules()
    out.recompile()
    return out.eval()
