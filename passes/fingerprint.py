"""Digests of torch modules and data: the cache keys of retraining, accuracy profiling and
latency measurement are built from them, so a change to a module's code or weights, or to the
data, misses the cache."""
from __future__ import annotations

import hashlib

import torch


def digest_module(h, gm: torch.nn.Module) -> None:
    """Feed ``gm``'s code (a torch.fx GraphModule's) and every state tensor into the hash ``h``."""
    h.update(gm.code.encode())
    for k, v in sorted(gm.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().cpu().numpy().tobytes())


def module_digest(gm: torch.nn.Module) -> str:
    """The sha256 hex digest of :func:`digest_module` alone."""
    h = hashlib.sha256()
    digest_module(h, gm)
    return h.hexdigest()


def data_digest(batches: list) -> str:
    """The sha256 hex digest of batches of tensors (shapes and values)."""
    h = hashlib.sha256()
    for b in batches:
        for t in b:
            h.update(str(tuple(t.shape)).encode())
            h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()
