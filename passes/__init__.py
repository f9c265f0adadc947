"""legoc.passes: the compiler's passes over a traced model.

Every pass has one signature (after torch/fx/passes/infra): ``pass(state, config) ->
PassResult(state, modified)``. A pass never mutates the state it is given; it returns a new one.
:class:`PassManager` runs a named pipeline of passes in order and, when one fails with anything
but a :class:`~legoc.errors.UserError`, names the failing pass and the passes before it.

The front end (capture, partition, prune, recalibrate, retrain, profile-accuracy: one module each
here) works on the torch.fx graph; the back end (legoc.passes.backend: build, measure-latency,
measure-load, validate, measure-rpc, measure-energy, export-onnx, write) compiles, measures and
writes the artifact. The
pipeline that runs them in order is legoc.pipeline.
"""
from legoc.passes.infra import Pass, PassManager, PassResult, ProgramState

__all__ = ["Pass", "PassManager", "PassResult", "ProgramState"]
