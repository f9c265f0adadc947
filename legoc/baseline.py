"""The model-grained baseline: what an engineer does without legoc.

Prune the *whole* model once per size, fine-tune each size end to end, deploy one model file per
size and reload a whole model when the budget changes. ``benchmarks/scaling.py`` compares
legoc's block-grained scaling against it.

How a size is made, so that the comparison isolates block-grained selection and training:

* **Pruning** reuses legoc's own passes (capture, partition, prune) at one ratio ``r``: every
  block at its ratio-``r`` variant, chosen by the same importance criterion. The architecture is
  therefore exactly legoc's *uniform* configuration at ``r``. (A whole-model pruning that also
  cut the residual stream is not something legoc's channel analysis can do: a block boundary is
  never pruned, so the stream between blocks stays at full width in both.)
* **Training**: the pruned model is fine-tuned *end to end* (every segment, frame included, BN in
  training mode) on the training batches with labels plus knowledge distillation from the
  original model: ``(1 - kd_weight) x cross-entropy + kd_weight x T^2 x KL(teacher_T || student_T)``,
  AdamW with a cosine learning-rate decay over a **wall-clock budget** (the benchmark gives it
  legoc's block-retraining time), keeping the epoch with the best validation accuracy.
* **Compiling** goes through legoc's own back end (``legoc.pipeline.build_artifact``: the same
  TVM schedules, the same runtime) as an artifact with one variant per block, so its latency is
  measured the way legoc's is; ``export_onnx`` writes the same network for ONNX Runtime.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from legoc.errors import UserError


@dataclass(frozen=True)
class BaselineConfig:
    """One model-grained size and how it is trained."""

    ratio: float                       # pruning ratio of every block (0: the original model)
    seconds: float = 60.0              # wall-clock budget of the end-to-end fine-tuning
    blocks: int | None = None          # partition: as legoc compile --blocks
    importance: str = "l1"             # as legoc compile --importance
    round_to: int = 1                  # as legoc compile --round-to
    lr: float = 1e-3
    weight_decay: float = 5e-4
    kd_weight: float = 0.5             # share of the distillation term in the loss
    temperature: float = 4.0
    max_epochs: int = 50
    seed: int = 0
    num_threads: int = 2

    def __post_init__(self):
        if not 0.0 <= self.ratio < 1.0:
            raise UserError(f"baseline ratio must be in [0, 1), got {self.ratio}")
        if self.seconds < 0:
            raise UserError(f"baseline fine-tuning budget must be 0 s or more, got {self.seconds}")
        if not 0.0 <= self.kd_weight <= 1.0:
            raise UserError(f"kd_weight must be in [0, 1], got {self.kd_weight}")


class Composed(nn.Module):
    """A partition's segments run in order as one trainable, exportable module (the model's
    outputs as the original returns them)."""

    def __init__(self, partition, modules: dict[str, nn.Module]):
        super().__init__()
        self.parts = nn.ModuleDict(modules)
        self.order = [(s.name, list(s.inputs), list(s.outputs)) for s in partition.segments]
        self.graph_inputs = list(partition.graph_inputs)
        self.output_spec = partition.output_spec

    def forward(self, *inputs):
        from legoc.runtime.artifact import build_output

        env = dict(zip(self.graph_inputs, inputs))
        for name, ins, outs in self.order:
            out = self.parts[name](*[env[n] for n in ins])
            if len(outs) == 1 and not isinstance(out, (tuple, list)):
                out = (out,)
            env.update(zip(outs, out))
        return build_output(self.output_spec, env)


@dataclass
class Pruned:
    """The whole model pruned at one ratio: legoc's partition and the composed network."""

    ratio: float
    partition: Any                     # legoc.passes.segment.Partition of the original model
    model: Composed                    # segments: frame copies and every block's ratio variant
    channels: dict                     # block -> {group: (original, kept)}
    macs: int
    param_bytes: int
    source: str


def prune_uniform(model: nn.Module, example_inputs: tuple, config: BaselineConfig, *, source: str = "<model>",
                  concrete_args: dict | None = None, train_inputs: list | None = None,
                  train_targets: list | None = None) -> Pruned:
    """Every block of ``model`` at its ``config.ratio`` variant (legoc's capture, partition and
    prune passes, so the architecture is legoc's uniform configuration at that ratio)."""
    from legoc.passes import PassManager, ProgramState
    from legoc.passes.analysis import graph_macs, param_bytes
    from legoc.passes.capture import Capture
    from legoc.passes.partition import PartitionPass
    from legoc.passes.prune import Prune
    from legoc.pipeline import CompileConfig

    ratios = (0.0,) if config.ratio == 0 else (0.0, config.ratio)
    cc = CompileConfig(blocks=config.blocks, ratios=ratios, importance=config.importance,
                       round_to=config.round_to, progress=False)
    state = ProgramState(model=model.eval(), example_inputs=tuple(example_inputs), source=source,
                         concrete_args=concrete_args, train_inputs=train_inputs or [],
                         train_targets=train_targets or [])
    state = PassManager([Capture(), PartitionPass(), Prune()])(state, cc).state
    part = state.partition
    modules, channels = {}, {}
    for seg in part.segments:
        if seg.is_block:
            v = state.variants[seg.name][-1]   # ratios are sorted: the last is config.ratio
            modules[seg.name] = copy.deepcopy(v.gm)
            channels[seg.name] = dict(v.channels)
        else:
            modules[seg.name] = copy.deepcopy(seg.gm)
    composed = Composed(part, modules).eval()
    macs = sum(graph_macs(m) if seg.is_block else seg.macs for seg, m in zip(part.segments, modules.values()))
    pbytes = sum(param_bytes(m) for m in modules.values())
    return Pruned(config.ratio, part, composed, channels, int(macs), int(pbytes), source)


def _kd_loss(logits: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, kd_weight: float,
             temperature: float) -> torch.Tensor:
    ce = F.cross_entropy(logits, labels)
    if kd_weight == 0:
        return ce
    t = temperature
    kd = F.kl_div(F.log_softmax(logits / t, 1), F.log_softmax(teacher / t, 1), reduction="batchmean",
                  log_target=True) * (t * t)
    return (1 - kd_weight) * ce + kd_weight * kd


def finetune(pruned: Pruned, teacher: nn.Module, train: list, config: BaselineConfig, *, val: list | None = None,
             evaluate: Callable | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Fine-tune ``pruned.model`` end to end within ``config.seconds`` of wall clock (the teacher's
    logits, every epoch and every validation count against it). ``train``: (x, labels)
    batches with class-index labels. With ``val`` (and ``evaluate(model, val)``, else top-1) the
    weights of the best validation epoch are kept. Returns what happened (epochs, seconds,
    validation accuracy before/after)."""
    if not train or any(len(b) < 2 or b[1] is None for b in train):
        raise UserError("the model-grained baseline needs train_data() batches of (input, class label)")
    score = evaluate or _top1
    student = pruned.model
    t0 = time.monotonic()
    deadline = t0 + config.seconds
    old_threads = torch.get_num_threads()
    torch.set_num_threads(config.num_threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            teacher.eval()
            with torch.no_grad():
                targets = [teacher(_as_tuple(b[0])[0]) for b in train] if config.kd_weight > 0 else [None] * len(train)
            before = score(student, val) if val else None
            best, best_state = before, copy.deepcopy(student.state_dict())
            for p in student.parameters():
                p.requires_grad_(True)
            opt = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=config.weight_decay)
            gen = torch.Generator().manual_seed(config.seed)
            epochs = steps = 0
            while epochs < config.max_epochs and time.monotonic() < deadline:
                student.train()
                partial = True
                for k in torch.randperm(len(train), generator=gen).tolist():
                    elapsed = time.monotonic() - t0
                    if elapsed >= config.seconds:
                        break
                    for group in opt.param_groups:   # cosine decay over the wall-clock budget
                        group["lr"] = 0.5 * config.lr * (1 + math.cos(math.pi * elapsed / max(config.seconds, 1e-9)))
                    x, y = _as_tuple(train[k][0])[0], train[k][1]
                    with torch.enable_grad():
                        loss = _kd_loss(student(x), targets[k], y, config.kd_weight, config.temperature)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    steps += 1
                else:
                    epochs, partial = epochs + 1, False
                student.eval()
                if val:
                    acc = score(student, val)
                    if best is None or acc >= best:
                        best, best_state = acc, copy.deepcopy(student.state_dict())
                    if log:
                        done = f"{epochs} epochs" + (" and part of the next (budget spent)" if partial else "")
                        log(f"r{config.ratio:.2f}: {done}, val {acc:.4f} ({time.monotonic() - t0:.0f}s)")
                else:
                    best_state = copy.deepcopy(student.state_dict())
        student.load_state_dict(best_state)
    finally:
        torch.set_num_threads(old_threads)
    student.eval()
    for p in student.parameters():
        p.requires_grad_(False)
    return {"ratio": config.ratio, "epochs": epochs, "steps": steps, "seconds": time.monotonic() - t0,
            "budget_seconds": config.seconds, "val_before": before, "val_after": best,
            "loss": f"(1 - {config.kd_weight}) x CE + {config.kd_weight} x T^2 x KL, T = {config.temperature}",
            "optimizer": f"AdamW lr {config.lr} cosine over the budget, weight decay {config.weight_decay}"}


def _as_tuple(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _top1(model: nn.Module, data: list) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in data:
            correct += int((model(*_as_tuple(x)).argmax(1) == y).sum())
            total += int(y.numel())
    return correct / max(1, total)


def compile_pruned(pruned: Pruned, example_inputs: tuple, out: Path, *, target: str = "host",
                   progress: bool = False) -> dict:
    """Compile ``pruned.model`` with legoc's back end into an artifact with one variant per block
    (the same TVM schedules and runtime as legoc's artifacts). Returns the manifest."""
    from legoc.passes import ProgramState
    from legoc.passes.analysis import graph_macs, param_bytes
    from legoc.passes.prune import Variant
    from legoc.pipeline import CompileConfig, CompileReport, build_artifact
    from legoc.targets.table import get_target

    part = pruned.partition
    segments, variants = [], {}
    for seg in part.segments:
        gm = pruned.model.parts[seg.name].eval()
        if seg.is_block:
            variants[seg.name] = [Variant(block=seg.name, ratio=pruned.ratio, gm=gm, macs=graph_macs(gm),
                                          param_bytes=param_bytes(gm), channels=pruned.channels[seg.name])]
            segments.append(seg)
        else:
            segments.append(dataclasses.replace(seg, gm=gm))
    state = ProgramState(model=pruned.model, example_inputs=tuple(example_inputs), source=pruned.source,
                         partition=dataclasses.replace(part, segments=segments), variants=variants)
    config = CompileConfig(target=target, output=Path(out), ratios=(0.0,), progress=progress, validate=False,
                           profile_accuracy=False)
    return build_artifact(state, get_target(target), Path(out), config, CompileReport(artifact=Path(out)))


def export_onnx(pruned: Pruned, example_inputs: tuple, path: Path) -> Path:
    """The same network as ONNX (opset 17, torch.onnx's TorchScript exporter), for ONNX Runtime."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = [f"input{i}" for i in range(len(example_inputs))]
    torch.onnx.export(pruned.model.eval(), tuple(example_inputs), str(path), input_names=names, opset_version=17,
                      dynamo=False)
    return path
