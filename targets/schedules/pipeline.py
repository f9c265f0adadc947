"""The CPU pipeline: TVM 0.27's ``relax.backend.cpu_generic`` with legoc's rewrites and rules."""
from __future__ import annotations

import tvm
from tvm import relax
from tvm.target import Target

from legoc.targets.schedules.isa import vector_lanes, vector_registers
from legoc.targets.schedules.pad_channels import PadConvChannels
from legoc.targets.schedules.pixel_conv import PixelVectorConv
from legoc.targets.schedules.pool_rows import MaxPoolByRows
from legoc.targets.schedules.split_expand import SplitExpandDepthwise
from legoc.targets.schedules.subsample import SubsampleStridedPointwise
from legoc.targets.schedules.transform import ApplyCPUSchedules


def cpu_pipeline(target: Target, *, schedule: bool = True,
                 before_schedule: tuple = ()) -> tvm.transform.Pass:
    """TVM 0.27's CPU pipeline (``relax.backend.cpu_generic``) with the CPU rules applied after
    operator fusion. ``before_schedule``: passes run between fusion and the rules (the tuning
    database). ``schedule=False`` gives TVM's own pipeline (no schedules)."""

    @tvm.transform.module_pass(opt_level=0, name="LegocCPUPipeline")
    def _pipeline(mod: tvm.ir.IRModule, _ctx: tvm.transform.PassContext) -> tvm.ir.IRModule:
        with target:
            passes = scheduling_passes(target, schedule=schedule, before_schedule=before_schedule)
            return tvm.transform.Sequential(passes + lowering_passes(target))(mod)

    return _pipeline


# TIR's pass that narrows int64 indices to int32 where they fit (in TVM 0.27's default TIR
# pipeline, after buffer flattening)
NARROW_INDICES = "tirx.NarrowDataType"


def cpu_pass_context() -> tvm.transform.PassContext:
    """The current pass context with TIR's index narrowing off, for CPU builds: a compile that
    runs TVM's TIR pipeline (``tvm.compile``) inside it keeps TVM's int64 buffer indices.

    Narrowed to int32, an index is sign-extended to a 64-bit address after its last add, and an
    int32 add that LLVM has reassociated carries no no-overflow flag, so LLVM can no longer split
    ``base + pixel + step`` into a pointer per pixel hoisted out of the reduction. A conv's
    register tile over the flattened plane then recomputed its pixel offsets at every reduction
    step (timings in 0d07d93). GPU code keeps 32-bit indices: do not use this for it."""
    current = tvm.transform.PassContext.current()
    return tvm.transform.PassContext(opt_level=current.opt_level, config=dict(current.config),
                                     required_pass=list(current.required_pass),
                                     disabled_pass=[*current.disabled_pass, NARROW_INDICES],
                                     instruments=list(current.instruments))


def scheduling_passes(target: Target, *, schedule: bool = True, before_schedule: tuple = (),
                      rules: list | None = None, strict: bool | None = None) -> list:
    """cpu_generic's passes up to fused PrimFuncs, then legoc's: the Relax rewrites before
    legalization (:func:`relax_rewrites`), ``before_schedule``, then the rules (``rules``: default_rules())."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu  # noqa: PLC0415

    padding = relax_rewrites(target) if schedule else []
    scheduled = [ApplyCPUSchedules(rules, strict=strict)] if schedule else []
    return (padding + cpu.library_dispatch_passes(target) + cpu.legalize_passes(target)
            + list(before_schedule) + scheduled)


def relax_rewrites(target: Target) -> list:
    """legoc's Relax rewrites before legalization (also run by the tuner, so that it tunes the
    workloads the compile looks up): strided 1x1 convs subsampled, expansions split into
    L2-sized channel groups, convs of too few filters for whole channel vectors over pixel
    vectors, then conv output channels padded for the packed rule; max pools as rows then columns."""
    lanes, regs = vector_lanes(target), vector_registers(target)
    return [SubsampleStridedPointwise(), SplitExpandDepthwise(), PixelVectorConv(lanes, regs),
            PadConvChannels(lanes, regs), MaxPoolByRows()]


def lowering_passes(target: Target) -> list:
    """cpu_generic's passes after scheduling: dataflow lowering (not exported by TVM 0.27's
    package, copied from its list) and finalization."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu  # noqa: PLC0415

    return [
        relax.transform.RewriteDataflowReshape(),
        relax.transform.ToNonDataflow(),
        relax.transform.RemovePurityChecking(),
        relax.transform.CallTIRRewrite(),
        *cpu.finalize_passes(target),
    ]
