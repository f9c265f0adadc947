"""measure-rpc: with ``--rpc``, every module timed on a board of a TVM RPC device farm before the
artifact is committed (legoc.targets.rpc); the latency figures become ``measured-rpc``."""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING

from legoc.passes.backend.stage import BackendStage
from legoc.passes.infra import PassResult, ProgramState, progress_bar

if TYPE_CHECKING:
    from legoc.pipeline import CompileConfig


class MeasureRpc(BackendStage):
    """Replaces every variant's latency figure by the board's (only with ``config.rpc``)."""

    name = "measure-rpc"

    def call(self, state: ProgramState, config: CompileConfig) -> PassResult:
        if config.rpc is None:
            return PassResult(state, False)
        from legoc.targets.rpc import measure_into

        manifest = copy.deepcopy(state.manifest)
        with progress_bar(config.progress) as bar:
            bar.add_task(f"measuring on '{config.rpc.key}' over RPC", total=None)
            measure_into(state.artifact.tmp, manifest, config.rpc)
        return PassResult(state.replace(manifest=manifest), True)
