"""Pass infrastructure: the program state, the pass base class, the pass manager and the
progress bar passes show."""
from __future__ import annotations

import abc
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from legoc.errors import InternalError, LegocError, UserError, describe


@dataclass(frozen=True)
class ProgramState:
    """Everything the pipeline knows about one model. Passes return new states (dataclasses.replace).

    model: the user's nn.Module (eval mode). example_inputs: tuple of tensors.
    gm: the traced torch.fx GraphModule (set by capture). partition: legoc.passes.segment.Partition
    (set by partition). variants: {block name: [legoc.passes.prune.Variant, ...]} (set by prune).
    source: where the model came from (file path or class name), for error messages.

    The back end (legoc.passes.backend) adds: target and artifact (given by the caller), then
    built (set by build), manifest (set by build, completed by the stages after it),
    compile_seconds and latency_reused.
    """

    model: Any
    example_inputs: tuple
    source: str = "<model>"
    concrete_args: dict | None = None
    gm: Any = None
    partition: Any = None
    variants: dict | None = None
    train_inputs: list | None = None  # input tuples of the model file's train_data() batches
    train_targets: list | None = None  # their targets (None where a batch has none)
    recalibrated: bool = False
    retrained: bool = False
    retrain_report: dict | None = None  # (block, variant id) -> epochs, held-out MSE before/after
    val_batches: list | None = None  # the model file's val_data() batches (never test data)
    evaluate: Any = None  # the model file's evaluate(model, data) -> float, if any
    accuracy: dict | None = None  # set by profile-accuracy: metric, baseline, drop per variant
    target: Any = None  # legoc.targets.table.TargetSpec the back end builds for
    artifact: Any = None  # legoc.artifact.ArtifactWriter the back end writes into
    built: tuple = ()  # legoc.passes.backend.stage.BuiltVariant of every module built
    manifest: dict | None = None  # the artifact's manifest, as far as the back end has got
    compile_seconds: tuple = ()  # (segment, variant, seconds) of every TVM build
    latency_reused: int = 0  # modules whose latency came from the measurement cache

    def replace(self, **changes) -> "ProgramState":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class PassResult:
    """What a pass returns: the new state and whether the pass changed anything (computed honestly)."""

    state: ProgramState
    modified: bool


class Pass(abc.ABC):
    """A pass: a named callable ``(state, config) -> PassResult`` with pre- and post-conditions."""

    name: str = ""

    def requires(self, state: ProgramState) -> None:  # noqa: B027 - optional hook
        """Check pre-conditions; raise InternalError if the state is not what this pass needs."""

    def ensures(self, state: ProgramState) -> None:  # noqa: B027 - optional hook
        """Check post-conditions of the state this pass produced."""

    @abc.abstractmethod
    def call(self, state: ProgramState, config: Any) -> PassResult:
        """Do the work."""

    def __call__(self, state: ProgramState, config: Any) -> PassResult:
        self.requires(state)
        result = self.call(state, config)
        if not isinstance(result, PassResult):
            raise InternalError(f"pass {self.name} returned {type(result).__name__}, not a PassResult")
        self.ensures(result.state)
        return result


@dataclass
class PassTiming:
    name: str
    seconds: float
    modified: bool


@dataclass
class PassManager:
    """Runs passes in a declared order; names the failing pass; records the time of each pass."""

    passes: Sequence[Pass]
    on_start: Callable[[str], None] | None = None
    timings: list[PassTiming] = field(default_factory=list)

    def __call__(self, state: ProgramState, config: Any) -> PassResult:
        modified = False
        done: list[str] = []
        for p in self.passes:
            if self.on_start:
                self.on_start(p.name)
            t0 = time.perf_counter()
            try:
                result = p(state, config)
            except UserError:
                raise
            except LegocError as exc:
                raise type(exc)(f"pass '{p.name}' failed (after {', '.join(done) or 'no passes'}): {exc}") from exc
            except Exception as exc:  # an internal bug: name the pass
                raise InternalError(
                    f"pass '{p.name}' failed (after {', '.join(done) or 'no passes'}): "
                    f"{describe(exc)}; this is a legoc bug, please report it"
                ) from exc
            self.timings.append(PassTiming(p.name, time.perf_counter() - t0, result.modified))
            done.append(p.name)
            state = result.state
            modified = modified or result.modified
        return PassResult(state, modified)


def progress_bar(enabled: bool):
    """A rich progress display on stderr (``enabled=False``: a silent one)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True), disable=not enabled)
