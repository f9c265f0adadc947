"""capture: trace the user's model with torch.fx and annotate every node with its shape.

A torch.fx TraceError ("symbolically traced variables cannot be used as inputs to control
flow") becomes a one-line UserError naming the model class, the file and line, and what to try.
"""
from __future__ import annotations

import operator
import os
import traceback

import torch
import torch.fx
from torch.fx.passes.shape_prop import ShapeProp

from legoc.errors import InternalError, UserError, describe, first_line
from legoc.passes.infra import Pass, PassResult, ProgramState

_TORCH_DIR = os.path.dirname(torch.__file__)


def _user_frame(exc: BaseException) -> traceback.FrameSummary | None:
    """The innermost traceback frame that is not inside torch: the user's offending line."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(_TORCH_DIR)]
    frames = [f for f in frames if os.sep + "passes" + os.sep + "capture.py" not in f.filename]
    return frames[-1] if frames else None


def trace_error_message(model: torch.nn.Module, exc: BaseException) -> str:
    cls = type(model).__name__
    frame = _user_frame(exc)
    where = f"{frame.filename}:{frame.lineno} (`{(frame.line or '').strip()}`)" if frame else "unknown line"
    reason = first_line(exc) or type(exc).__name__
    return (
        f"cannot trace {cls} with torch.fx at {where}: {reason}; try: give the value that drives "
        f"this branch in `concrete_args` in model.py, make the submodule a leaf module, or replace "
        f"the Python branch with tensor ops (torch.where)"
    )


def trace(model: torch.nn.Module, concrete_args: dict | None = None) -> torch.fx.GraphModule:
    """The torch.fx graph of ``model``; its inputs are the tensors example_inputs() gives, the
    ``concrete_args`` (model.py's optional dict) baked in."""
    try:
        gm = torch.fx.symbolic_trace(model, concrete_args=concrete_args)
    except Exception as exc:  # TraceError, TypeError on Proxy, ...: the model is not traceable
        raise UserError(trace_error_message(model, exc)) from exc
    _drop_specialized_inputs(gm, concrete_args or {})
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


# what torch.fx puts on the placeholder of a concrete argument: a check that the caller passes
# the value the graph was specialized to
_GUARDS = {torch._assert, getattr(torch.fx._symbolic_trace, "_assert_is_none", torch._assert), operator.eq}


def _drop_specialized_inputs(gm: torch.fx.GraphModule, concrete_args: dict) -> None:
    """torch.fx keeps a placeholder for every concrete argument, read only by a guard (``x == v``
    then ``torch._assert``): the graph would take inputs example_inputs() does not give, and every
    later pass expects one graph input per tensor. The value is baked into the graph; drop the
    placeholder and its guard."""
    names = [k for k, v in concrete_args.items() if v is not torch.fx.PH]
    for ph in [n for n in gm.graph.nodes if n.op == "placeholder"]:
        if not any(str(ph.target).startswith(k) for k in names):
            continue
        guard, todo = [], [ph]
        while todo:
            n = todo.pop()
            for user in n.users:
                if user.op == "call_function" and user.target in _GUARDS and user not in guard:
                    guard.append(user)
                    todo.append(user)
        if not all(u in guard for n in [ph, *guard] for u in n.users):
            continue   # read by the model itself: keep it
        position = {n: i for i, n in enumerate(gm.graph.nodes)}
        for n in sorted(guard, key=position.get, reverse=True):   # users first
            gm.graph.erase_node(n)
        gm.graph.erase_node(ph)


def call_model(model: torch.nn.Module, inputs: tuple, concrete_args: dict | None):
    """``model(*inputs)`` as the traced graph computes it: with the concrete arguments that are
    values (not placeholders) passed by keyword."""
    baked = {k: v for k, v in (concrete_args or {}).items() if v is not torch.fx.PH}
    return model(*inputs, **baked)


def annotate_shapes(gm: torch.fx.GraphModule, example_inputs: tuple) -> None:
    """Fill node.meta['tensor_meta'] (shape, dtype) by running the example inputs through gm.

    ShapeProp prints the traceback of a failing node to stderr and re-raises it wrapped in a
    message of fx node metadata; the user gets one line with torch's own reason instead."""
    import contextlib
    import io

    try:
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            ShapeProp(gm).propagate(*example_inputs)
    except Exception as exc:
        cause = exc
        while cause.__cause__ is not None:
            cause = cause.__cause__
        raise UserError(
            f"the model fails on its example_inputs(): {describe(cause)}; check that "
            f"example_inputs() returns tensors of the shape build_model() expects"
        ) from exc


class Capture(Pass):
    """torch.fx trace + shape propagation. Post-condition: the traced module equals the model."""

    name = "capture"

    def call(self, state: ProgramState, config) -> PassResult:
        model = state.model.eval()
        gm = trace(model, state.concrete_args)
        annotate_shapes(gm, state.example_inputs)
        return PassResult(state.replace(gm=gm), modified=True)

    def ensures(self, state: ProgramState) -> None:
        with torch.no_grad():
            ref = call_model(state.model, state.example_inputs, state.concrete_args)
            got = state.gm(*state.example_inputs)
        ref_leaves, got_leaves = torch.utils._pytree.tree_leaves(ref), torch.utils._pytree.tree_leaves(got)
        if len(ref_leaves) != len(got_leaves) or any(
            not torch.allclose(a, b, atol=1e-5, rtol=1e-5) for a, b in zip(ref_leaves, got_leaves)
        ):
            raise InternalError("the traced graph does not reproduce the model's output")
