"""Default schedules for CPU PrimFuncs (no tuning), as rules in dlight's ``ScheduleRule`` form.

TVM 0.27's CPU pipeline legalizes and fuses but schedules nothing: every fused PrimFunc runs as
one thread of naive loops. These rules recognise the PrimFuncs legoc's models produce and give
them parallel outer loops, vectorized inner loops sized to the target's vector width (AVX-512:
16 floats, AVX2: 8, NEON: 4), register blocking and, for ordinary convolutions, a packed weight
layout.

A rule gets a PrimFunc and returns a scheduled ``s_tir.Schedule``, or None when it does not
apply. :class:`ApplyCPUSchedules` tries them in order (:func:`default_rules`); the first that
returns a schedule wins. TVM checks every primitive used for legality, so a rule either produces
an equivalent program or raises, and a raising rule counts as "does not apply". A PrimFunc no
rule takes is left as TVM made it (correct, slow). One TVM 0.27 primitive is not safe on its
own: reverse_compute_inline accepts a consumer that reads a slice of its producer and then
writes out of bounds, so consumers are inlined only when they cover the producer element for
element (:func:`analysis.same_domain`).

The files, as in ``tvm.s_tir.dlight``:

* rules, one per file, in the order tried: ``conv2d_winograd`` (:class:`Conv2dWinograd`, the
  Winograd conv that ``winograd`` below makes); ``conv2d_blocked`` (:class:`Conv2dBlocked`) and
  ``depthwise_blocked`` (:class:`DepthwiseBlocked`), the three convs of a channel-blocked
  inverted residual (``block_layout`` below); ``conv2d_pixels`` (:class:`Conv2dPixels`, a conv
  with too few filters for whole channel vectors, over vectors of output pixels); ``conv2d_pointwise`` (:class:`Conv2dPointwise`,
  1x1 stride-1 conv2d over a plane of whole vectors), ``conv2d_packed``
  (:class:`Conv2dNCHWPacked`, other groups=1 conv2d), ``depthwise`` (:class:`DepthwiseConv2d`),
  ``pool2d_rows`` (:class:`MaxPool2dRows`: a max pool as rows then columns, read in place),
  ``pool2d`` (:class:`Pool2d`: other windowed max and average pooling, scheduled as the
  depthwise conv), ``reduction`` (:class:`ReductionVectorized`: grouped conv2d, dense/matmul, global
  pooling, mean), ``injective``
  (:class:`Injective`: elementwise, broadcast, pad, reshape, transpose), ``fallback``
  (:class:`Fallback`: outer data-parallel loops in parallel, nothing more);
* what they share: ``base`` (:class:`CPURule`), ``analysis`` (blocks and loops),
  ``isa`` (vector lanes and registers, the register tile), ``common_schedules``;
* ``transform``: the :class:`ApplyCPUSchedules` pass;
* Relax rewrites before legalization, sharing ``rewrite`` (:func:`match_conv2d`):
  ``block_layout`` (:class:`BlockInvertedResidual`, ``build_module(prepack=True)``: an
  expansion, depthwise conv and projection run with the expanded activations channel-blocked,
  ``[N, C/B, H, W, B]``, B the vector width),
  ``split_expand`` (:class:`SplitExpandDepthwise`: a large expansion and the strided depthwise
  conv it feeds, run as L2-sized channel groups),
  ``subsample`` (:class:`SubsampleStridedPointwise`: a strided 1x1 conv as a subsampling copy
  and the conv at stride 1),
  ``pixel_conv`` (:class:`PixelVectorConv`: a stride-1 conv with too few filters for whole
  channel vectors as a conv over the padded plane flattened, for ``Conv2dPixels``),
  ``pool_rows`` (:class:`MaxPoolByRows`: a max pool2d as a max over rows, then over columns,
  edges clamped instead of padded, for ``MaxPool2dRows``),
  ``winograd`` (:class:`WinogradConv3x3`, ``build_module(prepack=True)``: a 3x3 stride-1 conv
  as Winograd F(4x4, 3x3) or F(2x2, 3x3), its filters transformed at build time),
  ``pack_weights`` (:class:`PackConvWeights`, ``build_module(prepack=True)``: weights packed
  ``[O/B, I, KH, KW, B]`` once, at build time, kernel taps that only meet padding dropped) and
  ``pad_channels`` (:class:`PadConvChannels`, otherwise: output channels padded to the vector
  width, weights packed per call inside the conv's PrimFunc);
* ``pipeline``: TVM's CPU pipeline with all of the above in place.
"""
from legoc.targets.schedules.base import CPURule
from legoc.targets.schedules.block_layout import BlockInvertedResidual
from legoc.targets.schedules.conv2d_blocked import Conv2dBlocked
from legoc.targets.schedules.conv2d_packed import Conv2dNCHWPacked
from legoc.targets.schedules.conv2d_pixels import Conv2dPixels
from legoc.targets.schedules.conv2d_pointwise import Conv2dPointwise
from legoc.targets.schedules.conv2d_winograd import Conv2dWinograd
from legoc.targets.schedules.depthwise import DepthwiseConv2d
from legoc.targets.schedules.depthwise_blocked import DepthwiseBlocked
from legoc.targets.schedules.fallback import Fallback
from legoc.targets.schedules.injective import Injective
from legoc.targets.schedules.isa import pointwise_tile, vector_isa, vector_lanes, vector_registers
from legoc.targets.schedules.pack_weights import TRANSFORM_PARAMS, PackConvWeights, prepack_weights
from legoc.targets.schedules.pad_channels import PadConvChannels
from legoc.targets.schedules.pixel_conv import PixelVectorConv
from legoc.targets.schedules.pool2d import Pool2d
from legoc.targets.schedules.pool2d_rows import MaxPool2dRows
from legoc.targets.schedules.pool_rows import MaxPoolByRows
from legoc.targets.schedules.pipeline import cpu_pass_context, cpu_pipeline, lowering_passes, scheduling_passes
from legoc.targets.schedules.reduction import ReductionVectorized
from legoc.targets.schedules.rewrite import match_conv2d
from legoc.targets.schedules.split_expand import SplitExpandDepthwise
from legoc.targets.schedules.subsample import SubsampleStridedPointwise
from legoc.targets.schedules.winograd import WinogradConv3x3, takes_winograd
from legoc.targets.schedules.transform import RULE_ATTR, ApplyCPUSchedules, default_rules, scheduled_by

__all__ = [
    "ApplyCPUSchedules",
    "BlockInvertedResidual",
    "CPURule",
    "Conv2dBlocked",
    "Conv2dNCHWPacked",
    "Conv2dPixels",
    "Conv2dPointwise",
    "Conv2dWinograd",
    "DepthwiseBlocked",
    "DepthwiseConv2d",
    "Fallback",
    "Injective",
    "MaxPool2dRows",
    "MaxPoolByRows",
    "PackConvWeights",
    "PadConvChannels",
    "PixelVectorConv",
    "Pool2d",
    "RULE_ATTR",
    "ReductionVectorized",
    "SplitExpandDepthwise",
    "SubsampleStridedPointwise",
    "TRANSFORM_PARAMS",
    "WinogradConv3x3",
    "cpu_pass_context",
    "cpu_pipeline",
    "default_rules",
    "lowering_passes",
    "match_conv2d",
    "pointwise_tile",
    "prepack_weights",
    "scheduled_by",
    "scheduling_passes",
    "takes_winograd",
    "vector_isa",
    "vector_lanes",
    "vector_registers",
]
