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

import torch
import torch.nn.functional as F

from legoc.errors import InternalError
from legoc.passes.infra import Pass, PassResult, ProgramState

PATIENCE = 2
CACHE_VERSION = "retrain/1"


def _digest_module(h, gm: torch.nn.Module) -> None:
    h.update(gm.code.encode())
    for k, v in sorted(gm.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().cpu().numpy().tobytes())


def data_digest(batches: list) -> str:
    h = hashlib.sha256()
    for b in batches:
        for t in b:
            h.update(str(tuple(t.shape)).encode())
            h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def fingerprint(block_gm, variant_gm, settings: tuple, data: str) -> str:
    h = hashlib.sha256(CACHE_VERSION.encode())
    _digest_module(h, block_gm)
    _digest_module(h, variant_gm)
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
                "held_mse_after": float(meta.get("held_mse_after", "nan")), "cached": True}
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


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True), disable=not enabled)


class Retrain(Pass):
    """Block distillation of every variant with ratio > 0 (skipped, unmodified, without data)."""

    name = "retrain"

    def requires(self, state: ProgramState) -> None:
        if state.variants is None:
            raise InternalError("retrain needs variants (run prune first)")

    def call(self, state: ProgramState, config) -> PassResult:
        epochs = int(getattr(config, "retrain_epochs", 0))
        minutes = float(getattr(config, "retrain_minutes", 0.0))
        lr = float(getattr(config, "retrain_lr", 1e-3))
        batches = state.train_inputs or []
        if not batches or epochs <= 0 or minutes <= 0:
            return PassResult(state, modified=False)
        part = state.partition
        train, held = _split(batches)
        held_envs = [part.trace_env(*b) for b in held]
        held_pairs = {b.name: [(e[b.inputs[0]], e[b.outputs[0]]) for e in held_envs] for b in part.blocks}
        torch.manual_seed(0)
        settings = (epochs, minutes, lr, PATIENCE, len(train), len(held))
        data = data_digest(batches)
        variants = {name: list(vs) for name, vs in state.variants.items()}
        report, jobs, keys = {}, [], {}
        for block in part.blocks:
            for i, v in enumerate(state.variants[block.name]):
                if v.ratio <= 0:
                    continue
                gm = copy.deepcopy(v.gm)
                key = fingerprint(block.gm, v.gm, settings, data)
                cached = _load_cached(key, gm)
                if cached is not None:
                    gm.eval()
                    variants[block.name][i] = dataclasses.replace(v, gm=gm)
                    report[(block.name, v.id)] = cached
                    continue
                keys[(block.name, i)] = key
                for p in gm.parameters():
                    p.requires_grad_(True)
                before = _held_mse(gm, held_pairs[block.name])
                jobs.append(_Job(block.name, i, gm, torch.optim.Adam(gm.parameters(), lr=lr), before,
                                 copy.deepcopy(gm.state_dict()), before))
        blocks = {b.name: b for b in part.blocks}
        order = list(range(len(train)))
        deadline = time.monotonic() + 60.0 * minutes
        rng = random.Random(0)
        with _progress(getattr(config, "progress", False)) as bar:
            task = bar.add_task("retraining", total=epochs * len(train))
            for epoch in range(epochs):
                live = [j for j in jobs if not j.done]
                if not live or time.monotonic() > deadline:
                    break
                rng.shuffle(order)
                total, count = 0.0, 0
                for k in order:
                    env = part.trace_env(*train[k])          # one teacher pass feeds every variant
                    for job in live:
                        b = blocks[job.block]
                        job.gm.eval()   # fixed BN statistics; gradients still flow
                        loss = F.mse_loss(job.gm(env[b.inputs[0]]), env[b.outputs[0]])
                        job.opt.zero_grad(set_to_none=True)
                        loss.backward()
                        job.opt.step()
                        total, count = total + loss.item(), count + 1
                    bar.update(task, advance=1, description=f"retraining {len(live)} variants, epoch {epoch + 1}/{epochs}, "
                                                            f"mse {total / max(1, count):.4g}")
                    if time.monotonic() > deadline:
                        break
                for job in live:
                    job.epochs += 1
                    mse = _held_mse(job.gm, held_pairs[job.block])
                    if mse < job.best:
                        job.best, job.best_state, job.stale = mse, copy.deepcopy(job.gm.state_dict()), 0
                    else:
                        job.stale += 1
        for job in jobs:
            job.gm.load_state_dict(job.best_state)
            job.gm.eval()
            for p in job.gm.parameters():
                p.requires_grad_(False)
            old = variants[job.block][job.index]
            variants[job.block][job.index] = dataclasses.replace(old, gm=job.gm)
            info = {"epochs": job.epochs, "held_mse_before": job.before, "held_mse_after": job.best}
            _save_cached(keys[(job.block, job.index)], job.gm, info)
            report[(job.block, old.id)] = {**info, "cached": False}
        return PassResult(state.replace(variants=variants, retrained=True, retrain_report=report), modified=bool(report))
