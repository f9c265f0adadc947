"""How nested variants share weights: a variant's tensor is the leading sub-tensor of the
full-size one (the first ``shape[i]`` indices along every axis)."""
from __future__ import annotations


def leading(shape) -> tuple[slice, ...]:
    """The index of a tensor's leading sub-tensor of ``shape``: ``full[leading(small.shape)]``."""
    return tuple(slice(0, int(s)) for s in shape)
