"""write: commit the artifact: the manifest, its digest and (``--sign``) its signature, then the
temporary directory renamed into place (legoc.artifact.ArtifactWriter). Nothing before this
stage leaves anything that looks like an artifact."""
from __future__ import annotations

from typing import TYPE_CHECKING

from legoc.passes.backend.stage import BackendStage
from legoc.passes.infra import PassResult, ProgramState

if TYPE_CHECKING:
    from legoc.pipeline import CompileConfig


class Write(BackendStage):
    """Writes the manifest and renames the artifact into place; the state is unchanged."""

    name = "write"

    def call(self, state: ProgramState, config: CompileConfig) -> PassResult:
        state.artifact.commit(state.manifest, config.sign_key)
        return PassResult(state, False)
