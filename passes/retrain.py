"""retrain: recover the accuracy of pruned variants by distilling each original block.

For every training batch, one pass of the original model (the teacher) records the input and
output of every block; every pruned variant of every block is then trained to reproduce its
block's output from its block's input (MSE, Adam), independently of the rest of the network
(LegoDNN's block retraining). BatchNorm statistics stay as the recalibrate pass set them (the
variant trains in eval mode; BN scale and shift still learn). The last tenth of the training batches is held out: a variant
keeps the weights of its best held-out epoch and stops after ``patience`` epochs without
improvement. ``config.retrain_epochs`` and ``config.retrain_minutes`` bound the work.

Retrained weights are cached (``<cache>/retrain/<fingerprint>.safetensors``) under a fingerprint
of the original block (code and weights), the variant, the training settings and the training
data, so compiling the same model for another target, or after changing one block, retrains only
what changed.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
import random
import tempfile
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from legoc.errors import InternalError
from legoc.passes.fingerprint import data_digest, digest_module
from legoc.passes.infra import Pass, PassResult, ProgramState, progress_bar
from legoc.runtime.nesting import leading

if TYPE_CHECKING:
    from legoc.pipeline import CompileConfig

PATIENCE = 2
CACHE_VERSION = "retrain/1"


def fingerprint(block_gm, variant_gm, settings: tuple, data: str) -> str:
    """The cache key of one retrained variant (see the module docstring)."""
    h = hashlib.sha256(CACHE_VERSION.encode())
    digest_module(h, block_gm)
    digest_module(h, variant_gm)
    h.update(repr(settings).encode())
    h.update(data.encode())
    return h.hexdigest()[:32]


def _cache_path(key: str):
    from legoc.paths import cache_dir

    return cache_dir() / "retrain" / f"{key}.safetensors"


def _load_cached(key: str, gm: torch.nn.Module) -> dict | None:
    path = _cache_path(key)
    if not path.is_file():
        return None
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        gm.load_state_dict(load_file(str(path)))
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return {"epochs": int(meta.get("epochs", 0)), "held_mse_before": float(meta.get("held_mse_before", "nan")),
                "held_mse_after": float(meta.get("held_mse_after", "nan")), "cached": True, "stopped": "done"}
    except Exception:  # a damaged cache entry is retrained, not trusted
        return None


def _save_cached(key: str, gm: torch.nn.Module, info: dict) -> None:
    from safetensors.torch import save_file

    path = _cache_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous() for k, v in gm.state_dict().items()}, tmp,
                  metadata={k: str(v) for k, v in info.items()})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@dataclass
class _Job:
    block: str
    index: int
    gm: torch.nn.Module
    opt: torch.optim.Optimizer
    best: float
    best_state: dict
    before: float
    stale: int = 0
    epochs: int = 0
    cut: bool = False      # stopped by the time limit before its epochs or patience ran out
    masks: list = dataclasses.field(default_factory=list)  # (param, 0/1 mask): frozen entries get 0

    @classmethod
    def start(cls, block: str, index: int, gm: torch.nn.Module, lr: float, held) -> "_Job":
        for p in gm.parameters():
            p.requires_grad_(True)
        before = _held_mse(gm, held)
        return cls(block, index, gm, torch.optim.Adam(gm.parameters(), lr=lr), before,
                   copy.deepcopy(gm.state_dict()), before)

    def finish(self) -> dict:
        self.gm.load_state_dict(self.best_state)
        self.gm.eval()
        for p in self.gm.parameters():
            p.requires_grad_(False)
        return {"epochs": self.epochs, "held_mse_before": self.before, "held_mse_after": self.best,
                "stopped": "time limit" if self.cut else "done"}

    @property
    def done(self) -> bool:
        return self.stale >= PATIENCE


def _held_mse(gm: torch.nn.Module, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    gm.eval()
    with torch.no_grad():
        return sum(float(F.mse_loss(gm(x), y)) for x, y in pairs) / max(1, len(pairs))


def _split(batches: list) -> tuple[list, list]:
    if len(batches) < 2:
        return batches, batches
    hold = max(1, len(batches) // 10)
    return batches[:-hold], batches[-hold:]


@dataclass(frozen=True)
class _Session:
    """What every retraining job of one compile shares."""

    part: Any                 # legoc.passes.segment.Partition (the teacher)
    train: list               # training batches (input tuples)
    held_pairs: dict          # block -> [(block input, block output)] of the held-out batches
    settings: tuple           # training settings, part of every cache key
    data: str                 # digest of the training data, part of every cache key
    epochs: int
    lr: float
    bar: Any                  # rich progress


def _train(session: _Session, jobs: list[_Job], deadline: float, label: str) -> None:
    """Train ``jobs`` together: one teacher pass per batch feeds every job."""
    part, train, epochs, bar = session.part, session.train, session.epochs, session.bar
    blocks = {b.name: b for b in part.blocks}
    order = list(range(len(train)))
    rng = random.Random(0)
    task = bar.add_task(label, total=epochs * len(train))
    out_of_time = False
    for epoch in range(epochs):
        live = [j for j in jobs if not j.done]
        if not live:
            break
        if time.monotonic() > deadline:
            out_of_time = True
            break
        rng.shuffle(order)
        total, count = 0.0, 0
        for k in order:
            env = part.trace_env(*train[k])
            for job in live:
                b = blocks[job.block]
                job.gm.eval()   # fixed BN statistics; gradients still flow
                loss = F.mse_loss(job.gm(env[b.inputs[0]]), env[b.outputs[0]])
                job.opt.zero_grad(set_to_none=True)
                loss.backward()
                for param, mask in job.masks:
                    param.grad.mul_(mask)
                job.opt.step()
                total, count = total + loss.item(), count + 1
            bar.update(task, advance=1, description=f"{label}: {len(live)} variants, epoch {epoch + 1}/{epochs}, "
                                                    f"mse {total / max(1, count):.4g}")
            if time.monotonic() > deadline:
                out_of_time = True
                break
        for job in live:
            job.epochs += 1
            mse = _held_mse(job.gm, session.held_pairs[job.block])
            if mse < job.best:
                job.best, job.best_state, job.stale = mse, copy.deepcopy(job.gm.state_dict()), 0
            else:
                job.stale += 1
    if out_of_time:
        for job in jobs:
            job.cut = job.cut or (not job.done and job.epochs < epochs)


def _frozen_masks(gm: torch.nn.Module, previous: torch.nn.Module | None) -> list:
    """Masks that freeze the entries a nested variant shares with the next smaller one."""
    if previous is None:
        return []
    small = dict(previous.named_parameters())
    masks = []
    for n, p in gm.named_parameters():
        m = torch.ones_like(p)
        m[leading(small[n].shape)] = 0.0
        masks.append((p, m))
    return masks


class Retrain(Pass):
    """Block distillation of every variant with ratio > 0 (skipped, unmodified, without data).

    Nested variants are trained incrementally (Xun et al. 2019): smallest first; each larger
    variant trains only the weights the smaller ones do not have, so every variant stays a prefix
    of one shared weight set (the full-size variant, which is trained last, on its new channels)."""

    name = "retrain"

    def requires(self, state: ProgramState) -> None:
        if state.variants is None:
            raise InternalError("retrain needs variants (run prune first)")

    def call(self, state: ProgramState, config: CompileConfig) -> PassResult:
        epochs, minutes = int(config.retrain_epochs), float(config.retrain_minutes)
        lr, nested = float(config.retrain_lr), bool(config.nested)
        batches = state.train_inputs or []
        if not batches or epochs <= 0 or minutes <= 0:
            return PassResult(state, modified=False)
        part = state.partition
        train, held = _split(batches)
        held_envs = [part.trace_env(*b) for b in held]
        held_pairs = {b.name: [(e[b.inputs[0]], e[b.outputs[0]]) for e in held_envs] for b in part.blocks}
        torch.manual_seed(0)
        settings = (epochs, minutes, lr, PATIENCE, len(train), len(held), nested)
        data = data_digest(batches)
        deadline = time.monotonic() + 60.0 * minutes
        variants = {name: [dataclasses.replace(v, gm=copy.deepcopy(v.gm)) for v in vs]
                    for name, vs in state.variants.items()}
        with progress_bar(config.progress) as bar:
            session = _Session(part, train, held_pairs, settings, data, epochs, lr, bar)
            report = (self._nested if nested else self._flat)(session, variants, deadline)
        for name, vs in variants.items():  # untouched variants keep their identity
            variants[name] = [old if old.ratio == 0 and not nested else new
                              for old, new in zip(state.variants[name], vs)]
        return PassResult(state.replace(variants=variants, retrained=True, retrain_report=report),
                          modified=bool(report))

    @staticmethod
    def _flat(session: _Session, variants: dict, deadline: float) -> dict:
        report, jobs, keys = {}, [], {}
        for block in session.part.blocks:
            for i, v in enumerate(variants[block.name]):
                if v.ratio <= 0:
                    continue
                key = fingerprint(block.gm, v.gm, session.settings, session.data)
                cached = _load_cached(key, v.gm)
                if cached is not None:
                    v.gm.eval()
                    report[(block.name, v.id)] = cached
                    continue
                keys[(block.name, i)] = key
                jobs.append(_Job.start(block.name, i, v.gm, session.lr, session.held_pairs[block.name]))
        _train(session, jobs, deadline, "retraining")
        for job in jobs:
            info = job.finish()
            if not job.cut:   # a result the time limit cut short depends on this machine's speed now
                _save_cached(keys[(job.block, job.index)], job.gm, info)
            report[(job.block, variants[job.block][job.index].id)] = {**info, "cached": False}
        return report

    @staticmethod
    def _nested(session: _Session, variants: dict, deadline: float) -> dict:
        from legoc.passes.prune import copy_leading

        part = session.part
        report, todo, keys = {}, [], {}
        for block in part.blocks:
            vs = variants[block.name]
            full = next(v for v in vs if v.ratio == 0)
            key = fingerprint(block.gm, full.gm, session.settings + (tuple(v.ratio for v in vs),), session.data)
            cached = _load_cached(key, full.gm)
            if cached is None:
                todo.append(block.name)
                keys[block.name] = key
            for v in vs:
                if v is not full:
                    copy_leading(full.gm, v.gm)
                if cached is not None:
                    report[(block.name, v.id)] = cached
        levels = sorted(range(len(variants[part.blocks[0].name])),
                        key=lambda i: -variants[part.blocks[0].name][i].ratio)   # smallest first
        for step, level in enumerate(levels):
            jobs = []
            for name in todo:
                vs = variants[name]
                full = next(v for v in vs if v.ratio == 0)
                v = vs[level]
                if v is not full:
                    copy_leading(full.gm, v.gm)      # earlier levels' trained weights
                job = _Job.start(name, level, v.gm, session.lr, session.held_pairs[name])
                job.masks = _frozen_masks(v.gm, vs[levels[step - 1]].gm if step else None)
                jobs.append(job)
            share = (deadline - time.monotonic()) / (len(levels) - step)
            _train(session, jobs, time.monotonic() + max(0.0, share), f"nested level {step + 1}/{len(levels)}")
            for job in jobs:
                vs = variants[job.block]
                full = next(v for v in vs if v.ratio == 0)
                info = job.finish()
                if job.gm is not full.gm:
                    copy_leading(full.gm, job.gm, into_src=True)
                report[(job.block, vs[job.index].id)] = {**info, "cached": False}
        for name in todo:
            vs = variants[name]
            full = next(v for v in vs if v.ratio == 0)
            for v in vs:
                if v is not full:
                    copy_leading(full.gm, v.gm)
            if any(report[(name, v.id)]["stopped"] != "done" for v in vs):
                continue      # cut short by the time limit: used now, never cached
            _save_cached(keys[name], full.gm, {"epochs": max(report[(name, v.id)]["epochs"] for v in vs),
                                               "held_mse_before": float("nan"), "held_mse_after": float("nan")})
        return report
