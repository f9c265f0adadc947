"""Load a user's model.py (the convention in README), or an ONNX file, into a ModelSpec.

Required: ``build_model() -> nn.Module`` and ``example_inputs() -> tuple of tensors``.
Optional: ``train_data()``, ``val_data()``, ``test_data()``, ``evaluate(model, data) -> float``,
``concrete_args``. ``legoc compile`` trains on train_data and measures on val_data; test_data is
only for reported accuracy (``legoc evaluate``) and compile never calls it.
The model file's folder is on sys.path while it loads (as when running ``python model.py``), so
it may import its neighbours.
"""
from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

from legoc.errors import UserError, first_line


@dataclass
class ModelSpec:
    path: Path
    module: ModuleType
    model: Any
    example_inputs: tuple
    concrete_args: dict | None = None
    train_data: Callable | None = None
    val_data: Callable | None = None
    test_data: Callable | None = None  # reporting only: never called by compile
    evaluate: Callable | None = None

    @property
    def name(self) -> str:
        return self.path.stem


def call_hook(path: Path, fn_name: str, fn: Callable, *args):
    """Call a function of the model file; anything it raises becomes a one-line UserError."""
    try:
        return fn(*args)
    except UserError:
        raise
    except Exception as exc:
        first = first_line(exc)
        raise UserError(f"{path}: {fn_name}() raised {type(exc).__name__}: {first}; fix model.py and try again") from exc


def load_model_file(path: str | Path, input_shapes=None, data=None) -> ModelSpec:
    """The ModelSpec of a model.py, or of an ONNX file (``.onnx``: legoc.onnx_import, with
    ``input_shapes`` for dynamic inputs, ``NAME=1,3,224,224`` strings or a dict, and ``data``, the
    folder of the .npz sidecar)."""
    import torch

    path = Path(path)
    if path.suffix.lower() == ".onnx":
        from legoc.onnx_import import load_onnx

        return load_onnx(path, input_shapes=input_shapes, data=data)
    if input_shapes or data is not None:
        raise UserError(f"{path}: --input-shape and --data are for ONNX models; a model.py gives its shapes in "
                        "example_inputs() and its data in train_data()/val_data()")
    if not path.is_file():
        raise UserError(f"{path}: no such model file; pass the path of a model.py that defines build_model() and example_inputs()")
    folder = str(path.resolve().parent)
    name = f"legoc_user_model_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UserError(f"{path}: not a Python file; pass a model.py")
    module = importlib.util.module_from_spec(spec)
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            first = first_line(exc)
            raise UserError(f"{path}: importing it raised {type(exc).__name__}: {first}; fix model.py and try again") from exc
        for required in ("build_model", "example_inputs"):
            if not callable(getattr(module, required, None)):
                raise UserError(f"{path}: defines no {required}(); a model file needs build_model() -> nn.Module "
                                f"and example_inputs() -> tuple of tensors (see README)")
        model = call_hook(path, "build_model", module.build_model)
        if not isinstance(model, torch.nn.Module):
            raise UserError(f"{path}: build_model() returned {type(model).__name__}, not a torch.nn.Module")
        inputs = call_hook(path, "example_inputs", module.example_inputs)
        if isinstance(inputs, torch.Tensor):
            inputs = (inputs,)
        if not isinstance(inputs, (tuple, list)) or not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
            raise UserError(f"{path}: example_inputs() must return a tuple of tensors, got {type(inputs).__name__}")
        return ModelSpec(
            path=path, module=module, model=model.eval(), example_inputs=tuple(inputs),
            concrete_args=getattr(module, "concrete_args", None),
            train_data=getattr(module, "train_data", None), val_data=getattr(module, "val_data", None),
            test_data=getattr(module, "test_data", None),
            evaluate=getattr(module, "evaluate", None),
        )
    finally:
        if added and folder in sys.path:
            sys.path.remove(folder)
