"""What the rules ask of a PrimFunc's blocks and loops (dlight's analysis where it has it)."""
from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import get_root_block, get_sblock_info
from tvm.s_tir.dlight.base import get_extent


def extent(sch: s_tir.Schedule, loop) -> int:
    """A loop's extent as an int; raises TypeError on a symbolic extent, which no rule handles."""
    return int(get_extent(sch, loop))


def root_blocks(sch: s_tir.Schedule) -> list:
    """The blocks directly under the PrimFunc's root block, in order."""
    return list(sch.get_child_blocks(get_root_block(sch)))


def iter_kinds(sch: s_tir.Schedule, block) -> str:
    """The block's iterator kinds, e.g. "SSSSRRR" (S spatial, R reduction, O other)."""
    return get_sblock_info(sch, block).dom_kind()


def is_plain(sch: s_tir.Schedule, block) -> bool:
    """The block sits in its own loop nest, one loop per block iterator, bound 1:1 in order."""
    realize = sch.get_sref(block).stmt
    loops = sch.get_loops(block)
    iters = realize.iter_vars
    if len(loops) != len(iters):
        return False
    for loop, itv in zip(loops, iters):
        if int(sch.get(loop).extent) != int(itv.dom.extent):
            return False
    return True


def float32_only(sch: s_tir.Schedule) -> bool:
    """Every buffer the root blocks read or write is float32 (the rules assume 4-byte lanes)."""
    for block in root_blocks(sch):
        stmt = sch.get(block)
        for region in [*stmt.reads, *stmt.writes]:
            if str(region.source.dtype) != "float32":
                return False
    return True


def same_domain(sch: s_tir.Schedule, block, shape: list[int]) -> bool:
    """The block iterates exactly over ``shape`` and writes one buffer of that shape.

    reverse_compute_inline in TVM 0.27 accepts a consumer that reads only part of its producer
    (a channel slice) and then writes the consumer's buffer over the producer's whole domain, out
    of bounds: consumers are inlined only when this holds."""
    stmt = sch.get(block)
    if len(stmt.writes) != 1:
        return False
    extents = [int(iv.dom.extent) for iv in stmt.iter_vars]
    written = [int(d) for d in stmt.writes[0].source.shape]
    return extents == shape and written == shape


def is_block_split(outer, inner, var, block) -> bool:
    """``outer`` is ``var // block`` and ``inner`` is ``var % block``."""
    block = int(block)
    return (isinstance(outer, tirx.FloorDiv) and isinstance(inner, tirx.FloorMod)
            and outer.a.same_as(var) and inner.a.same_as(var)
            and isinstance(outer.b, tirx.IntImm) and int(outer.b) == block
            and isinstance(inner.b, tirx.IntImm) and int(inner.b) == block)


def split_around_reduction(sch: s_tir.Schedule):
    """(prologue, reduction block, epilogue) of a PrimFunc with exactly one reduction block whose
    iterators are all spatial then all reduction, in a plain loop nest; else None."""
    blocks = root_blocks(sch)
    kinds = [iter_kinds(sch, b) for b in blocks]
    reductions = [i for i, k in enumerate(kinds) if "R" in k]
    if len(reductions) != 1 or any("O" in k for k in kinds):
        return None
    i = reductions[0]
    block = blocks[i]
    kind = kinds[i]
    n_s = len(kind) - len(kind.lstrip("S"))
    if n_s == 0 or kind[n_s:].strip("R") or not is_plain(sch, block):
        return None
    return blocks[:i], block, blocks[i + 1:]


def reduction_named(sch: s_tir.Schedule, prefix: str, kinds: str):
    """(prologue, reduction block, epilogue) when the PrimFunc's one reduction block is a TE
    compute named ``prefix`` (FuseTIR may add a suffix) with iterator kinds ``kinds``."""
    parts = split_around_reduction(sch)
    if parts is None or not sch.get(parts[1]).name_hint.startswith(prefix) \
            or iter_kinds(sch, parts[1]) != kinds:
        return None
    return parts


def product(values) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out


def largest_divisor(n: int, limit: int) -> int:
    """The largest divisor of ``n`` not above ``limit`` (at least 1)."""
    for d in range(min(n, limit), 0, -1):
        if n % d == 0:
            return d
    return 1
