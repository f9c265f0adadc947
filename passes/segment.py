"""Segments: pieces of a traced graph with named tensor inputs and outputs, and the Partition
that joins them (blocks, which have variants, and the frame around them, which does not)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from legoc.errors import InternalError
from legoc.runtime.artifact import build_output


@dataclass
class Segment:
    """A connected piece of the model graph.

    kind: "block" (one tensor in, one tensor out, scalable) or "frame" (fixed, any number of
    tensors in and out). inputs/outputs: names of the tensors it reads and writes (fx node names).
    gm: a GraphModule taking ``inputs`` in order and returning one tensor (a block, or a frame with
    one output) or a tuple of tensors in ``outputs`` order.
    """

    name: str
    kind: str
    nodes: list[str]
    inputs: list[str]
    outputs: list[str]
    gm: torch.fx.GraphModule
    macs: int = 0

    @property
    def is_block(self) -> bool:
        return self.kind == "block"


@dataclass
class Partition:
    """The whole model as segments in topological order, plus how to assemble its output."""

    segments: list[Segment]
    graph_inputs: list[str]
    output_spec: Any            # JSON-able tree: {"tensor": name} | {"tuple": [...]} | {"list": [...]} | {"dict": {k: ...}}
    total_macs: int
    max_blocks: int = 0
    tensor_meta: dict[str, dict] = field(default_factory=dict)  # name -> {"shape": [...], "dtype": "float32"}

    @property
    def blocks(self) -> list[Segment]:
        return [s for s in self.segments if s.is_block]

    @property
    def scalable_macs(self) -> int:
        return sum(s.macs for s in self.blocks)

    @property
    def scalable_share(self) -> float:
        return self.scalable_macs / self.total_macs if self.total_macs else 0.0

    def run(self, *inputs: torch.Tensor, replace: dict[str, torch.nn.Module] | None = None):
        """Recompose: run every segment in order on named tensors (``replace`` swaps a segment's
        module, e.g. a pruned variant of a block). Returns the model's output structure."""
        return build_output(self.output_spec, self.trace_env(*inputs, replace=replace))

    @torch.no_grad()
    def trace_env(self, *inputs: torch.Tensor, replace: dict[str, torch.nn.Module] | None = None) -> dict:
        """Every named tensor that crosses a segment boundary, for these inputs."""
        if len(inputs) != len(self.graph_inputs):
            raise InternalError(f"partition expects {len(self.graph_inputs)} inputs, got {len(inputs)}")
        env = dict(zip(self.graph_inputs, inputs))
        replace = replace or {}
        for seg in self.segments:
            mod = replace.get(seg.name, seg.gm)
            out = mod(*[env[n] for n in seg.inputs])
            if len(seg.outputs) == 1 and not isinstance(out, (tuple, list)):
                out = (out,)
            env.update(zip(seg.outputs, out))
        return env


def output_spec_of(arg) -> Any:
    """JSON-able description of an fx output argument (a tree of nodes)."""
    if isinstance(arg, torch.fx.Node):
        return {"tensor": arg.name}
    if isinstance(arg, tuple):
        return {"tuple": [output_spec_of(a) for a in arg]}
    if isinstance(arg, list):
        return {"list": [output_spec_of(a) for a in arg]}
    if isinstance(arg, dict):
        return {"dict": {str(k): output_spec_of(v) for k, v in arg.items()}}
    if arg is None:
        return {"none": None}
    raise InternalError(f"model output contains a {type(arg).__name__}, which legoc cannot carry")


def extract(gm: torch.fx.GraphModule, node_names: list[str], inputs: list[str], outputs: list[str],
            class_name: str = "Segment") -> torch.fx.GraphModule:
    """A GraphModule of the given nodes of gm, reading ``inputs`` and returning ``outputs``.
    Constants (get_attr) the nodes use are copied in. One output returns a bare tensor."""
    by_name = {n.name: n for n in gm.graph.nodes}
    graph = torch.fx.Graph()
    env: dict[str, torch.fx.Node] = {}
    for name in inputs:
        ph = graph.placeholder(name)
        ph.meta = dict(by_name[name].meta)
        env[name] = ph
    wanted = set(node_names)

    def lookup(n: torch.fx.Node) -> torch.fx.Node:
        if n.name not in env:
            if n.op == "get_attr" or (n.op == "call_function" and not n.all_input_nodes and n.name not in wanted):
                env[n.name] = graph.node_copy(n, lookup)
            else:
                raise InternalError(f"segment {class_name} reads {n.name}, which is neither an input nor inside it")
        return env[n.name]

    for n in gm.graph.nodes:
        if n.name in wanted and n.name not in env:
            env[n.name] = graph.node_copy(n, lookup)
    outs = [env[o] for o in outputs]
    graph.output(outs[0] if len(outs) == 1 else tuple(outs))
    seg = torch.fx.GraphModule(gm, graph, class_name=class_name)
    seg.graph.eliminate_dead_code()
    seg.recompile()
    return seg
