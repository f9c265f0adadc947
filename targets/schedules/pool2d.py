"""Pool2d: average pooling, and the max pools MaxPoolByRows leaves, over an NCHW input, as the
depthwise conv is scheduled."""
from __future__ import annotations

from tvm import s_tir

from legoc.targets.schedules.depthwise import DepthwiseConv2d


class Pool2d(DepthwiseConv2d):
    """2-D max or average pooling (+ fused epilogue: the average's division): a window per
    channel, which is a depthwise conv without weights, so :class:`DepthwiseConv2d`'s schedule
    applies as it is (the padded plane per channel, at stride 2 its even and odd columns stored
    apart; rows in register chunks). ReductionVectorized's generic form read the padding in
    place and, at stride 2, gathered every other column: ResNet-18's 3x3/2 max pool ran at
    ~2 G comparisons/s."""

    def matches(self, sch: s_tir.Schedule, block) -> bool:
        """The reduction reads one ``[N, C, H, W]`` input for its ``[N, C, OH, OW]`` output, and
        nothing else; a global pool (a 1x1 output) stays with ReductionVectorized, which
        vectorizes across channels."""
        stmt = sch.get(block)
        out = stmt.writes[0].source
        if len(out.shape) != 4 or int(out.shape[2]) * int(out.shape[3]) == 1:
            return False
        inputs = [r.source for r in stmt.reads if not r.source.same_as(out)]
        return (len(inputs) == 1 and len(inputs[0].shape) == 4
                and [int(d) for d in inputs[0].shape[:2]] == [int(d) for d in out.shape[:2]])
