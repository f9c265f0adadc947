"""The compile pipeline of ``legoc compile``: its options (:class:`CompileConfig`) and the one list
of passes it runs (after MLC-LLM's compiler_pass/pipeline.py): the front end on the torch.fx graph
(legoc.passes), then the back end that builds, measures, validates and writes every variant of
every segment with TVM (legoc.passes.backend). One PassManager runs them all, so an error names
the pass that failed and the passes before it."""
from __future__ import annotations

import contextlib
import dataclasses
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from legoc.artifact import ArtifactWriter, check_destination
from legoc.errors import LegocError, UserError
from legoc.paths import cache_dir
from legoc.passes.prune import DEFAULT_RATIOS, IMPORTANCE

__all__ = ["CompileConfig", "CompileReport", "backend_pipeline", "build_artifact", "compile_model",
           "compile_pipeline", "default_pipeline", "train_batches", "val_batches", "warn"]


@dataclass(frozen=True)
class CompileConfig:
    """All options of one compile, each default written once; every pass reads the fields it
    needs directly (the pass named after each group)."""

    # where: the target, the artifact, how it is signed, progress on stderr
    target: str = "host"
    output: Path | None = None
    sign_key: Path | None = None    # Ed25519 private key (PEM): sign the manifest (legoc.runtime.signing)
    export_onnx: bool = False       # keep every variant as ONNX in the artifact, for `legoc export`
    # the model: ONNX files only (legoc.onnx_import)
    input_shapes: tuple[str, ...] = ()   # NAME=1,3,224,224 for inputs with dynamic dimensions
    data: Path | None = None        # folder of train/val/test .npz (legoc.onnx_data)
    progress: bool = True
    # partition
    blocks: int | None = None       # None: up to legoc.passes.partition.DEFAULT_BLOCKS
    # prune
    ratios: tuple[float, ...] = DEFAULT_RATIOS
    importance: str = "l1"
    round_to: int | None = None     # pruned channel multiple; None: the target's vector width (1: off)
    nested: bool = False            # nested variants sharing one weight set per block (recalibrate, retrain too)
    # recalibrate
    calibration_batches: int = 8
    # retrain
    retrain_epochs: int = 10
    retrain_minutes: float = 10.0
    retrain_lr: float = 1e-3
    # profile-accuracy
    profile_accuracy: bool = True   # measure every variant's accuracy drop (val_data, else fidelity)
    # build
    tune_trials: int = 0            # MetaSchedule trials per workload new to the tuning database (0: none)
    winograd: bool = True           # 3x3 stride-1 convs as Winograd (prepacked builds): faster, larger weights
    devices: tuple[str, ...] = ()   # Jetson: ("cpu", "gpu") builds every block variant for both; () its own device
    # measure-load, validate
    validate: bool = True           # measure a few combinations end to end (targets that run here)
    # measure-rpc
    rpc: object = None              # legoc.targets.rpc.RpcConfig: measure every variant on a board over RPC
    # tile (issue 19): a plan for running the blocks across `tiles` workers over TVM RPC
    tiles: int | None = None        # None: no plan
    tile_workers: object = None     # legoc.runtime.tiled.Workers to measure now; None: an estimated plan
    tile_link: tuple[float, float] = (0.5, 400.0)   # estimated plans: assumed round trip (ms), Mbit/s
    tile_latency_ms: float | None = None   # choose variants with the placement: least drop within this
    cluster_timeout: float = 60.0   # seconds a worker may take to answer while measuring

    def __post_init__(self):
        if self.importance not in IMPORTANCE:
            raise UserError(f"unknown importance {self.importance!r}; choose one of: {', '.join(IMPORTANCE)}")
        if self.retrain_epochs < 0 or self.retrain_minutes < 0:
            raise UserError("--retrain-epochs and --retrain-minutes must be 0 (no retraining) or more")
        if self.tune_trials < 0:
            raise UserError(f"--tune-trials must be 0 (no tuning) or more, got {self.tune_trials}")
        if self.round_to is not None and self.round_to < 1:
            raise UserError(f"--round-to must be at least 1, got {self.round_to}")
        self._check_tiles()

    def _check_tiles(self) -> None:
        if self.tiles is None:
            if self.tile_latency_ms is not None:
                raise UserError("--tile-latency-ms chooses variants for a tiling plan; add --tiles K")
            if self.tile_workers is not None:
                raise UserError("--cluster/--tracker at compile time measure the workers of a tiling plan; add --tiles K")
            return
        if self.tiles < 1:
            raise UserError(f"--tiles is the number of workers a plan spreads the blocks over: at least 1, got {self.tiles}")
        count = getattr(self.tile_workers, "count", self.tiles)
        if count != self.tiles:
            raise UserError(f"--tiles {self.tiles} but --cluster names {count} workers: give one HOST:PORT per worker")
        if self.tile_latency_ms is not None and not self.tile_latency_ms > 0:
            raise UserError(f"--tile-latency-ms must be a positive budget in ms, got {self.tile_latency_ms:g}")
        rtt, mbit = self.tile_link
        if not (rtt >= 0 and mbit > 0):
            raise UserError(f"--tile-link takes a round trip of 0 ms or more and a positive Mbit/s, got {rtt:g},{mbit:g}")
        if self.cluster_timeout <= 0:
            raise UserError(f"--cluster-timeout must be positive, got {self.cluster_timeout:g}")


@dataclass
class CompileReport:
    artifact: Path
    timings: dict[str, float] = field(default_factory=dict)   # stage -> seconds
    compile_seconds: list[tuple[str, str, float]] = field(default_factory=list)  # (segment, variant, s)
    partition: object = None
    manifest: dict = field(default_factory=dict)
    latency_reused: int = 0   # variants whose latency came from the profile cache


def default_pipeline() -> list:
    """The front end of `legoc compile`, in order: passes on the model's torch.fx graph."""
    from legoc.passes.backend import CheckTiles
    from legoc.passes.capture import Capture
    from legoc.passes.partition import PartitionPass
    from legoc.passes.profile import ProfileAccuracy
    from legoc.passes.prune import Prune
    from legoc.passes.recalibrate import Recalibrate
    from legoc.passes.retrain import Retrain

    return [
        # Phase 0. Capture: trace the model with torch.fx, annotate every node's shape
        Capture(),
        # Phase 1. Cut the graph into blocks and frame; prune every block into its variants
        PartitionPass(),
        Prune(),
        CheckTiles(),   # with --tiles: fail now, before retraining and building, if no block can be tiled
        # Phase 2. Recover the pruned variants' accuracy: BN statistics, then block distillation
        Recalibrate(),
        Retrain(),
        # Phase 3. Measure every variant's accuracy drop on val_data()
        ProfileAccuracy(),
    ]


def backend_pipeline() -> list:
    """The back end of `legoc compile`, in order: stages that write the artifact (legoc.passes.backend)."""
    from legoc.export import ExportOnnx
    from legoc.passes.backend import (Build, MeasureEnergy, MeasureLatency, MeasureLoad, MeasureRpc, Tile, Validate,
                                      Write)

    return [
        # Phase 4. Build every variant of every segment with TVM; write modules, weights, manifest
        Build(),
        # Phase 5. Measure each module: latency, then switch-in time
        MeasureLatency(),
        MeasureLoad(),
        # Phase 6. Calibrate and validate the combination estimators on configurations run end to end
        Validate(),
        # Phase 7. With --rpc: time every module on a board of the device farm
        MeasureRpc(),
        # Phase 8. Energy: measured here where RAPL can (else estimated at load time from the power model)
        MeasureEnergy(),
        # Phase 9. With --tiles: a plan across workers over TVM RPC, its tile modules
        Tile(),
        # Phase 10. With --onnx: every variant's module as ONNX too, for `legoc export`
        ExportOnnx(),
        # Phase 11. Commit: manifest, digest, signature; rename the artifact into place
        Write(),
    ]


def compile_pipeline() -> list:
    """The whole compile: front end, then back end."""
    return default_pipeline() + backend_pipeline()


def compile_model(model_path: str | Path, config: CompileConfig) -> CompileReport:
    """Compile ``model_path`` for ``config.target`` into an artifact directory."""
    with _quiet_dependencies():
        return _compile_model(model_path, config)


@contextlib.contextmanager
def _quiet_dependencies():
    """torch.export inside TVM's frontend trips torch's own deprecation of LeafSpec checks, once
    per module built: noise that would hide the warnings that matter."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                                category=FutureWarning)
        yield


def _compile_model(model_path: str | Path, config: CompileConfig) -> CompileReport:
    from legoc.modelfile import load_model_file
    from legoc.passes import PassManager, ProgramState
    from legoc.targets.table import channel_multiple, device_targets, get_target

    target = get_target(config.target)          # fail fast on a bad target, before any work
    if config.sign_key is not None:             # ... and on a signing key that is not one
        from legoc.runtime.signing import read_key

        read_key(config.sign_key, private=True)
    device_targets(target, config.devices)      # ... and on --devices it cannot have
    if config.round_to is None:                 # pruned channels: multiples of the vector width
        config = dataclasses.replace(config, round_to=channel_multiple(target))
    if config.rpc is not None:                  # ... and on an unreachable device farm
        from legoc.targets.rpc import check_device

        check_device(config.rpc)
    if config.tiles is not None and target.device != "cpu":   # ... and on tiles for a GPU
        raise UserError(f"--tiles: tiles run on the workers' CPUs, and target {target.name} builds for "
                        f"{target.device}; use a CPU target")
    if config.tile_workers is not None:         # ... and on a worker that cannot be reached
        config.tile_workers.check()
    t0 = time.perf_counter()
    spec = load_model_file(model_path, input_shapes=config.input_shapes or None, data=config.data)
    timings = {"load": time.perf_counter() - t0}
    out = Path(config.output) if config.output else Path(f"{spec.name}-{target.name}.lego")
    check_destination(out)                      # ... and on an output that cannot be written

    state = ProgramState(model=spec.model, example_inputs=spec.example_inputs, source=str(spec.path),
                         concrete_args=spec.concrete_args, target=target, **train_batches(spec), **val_batches(spec))
    if not state.train_inputs:
        warn(f"{spec.path} has no train_data(): pruned variants are neither retrained nor "
             f"recalibrated (manifest: retrained: false)")
    backend = {p.name for p in backend_pipeline()}
    pm = PassManager(compile_pipeline())
    try:
        with ArtifactWriter(out) as writer:     # removed again unless the write stage commits it
            state = pm(state.replace(artifact=writer), config).state
    except (LegocError, OSError) as exc:
        if _disk_full(exc):
            raise UserError(f"no space left on the device while writing {out} (or legoc's cache, "
                            f"{cache_dir()}): free some space or choose another -o; nothing was written") from None
        raise
    timings.update((t.name, t.seconds) for t in pm.timings)
    timings["compile+write"] = sum(t.seconds for t in pm.timings if t.name in backend)
    return CompileReport(artifact=out, timings=timings, compile_seconds=list(state.compile_seconds),
                         partition=state.partition, manifest=state.manifest, latency_reused=state.latency_reused)


def _disk_full(exc: BaseException) -> bool:
    """Whether a disk that filled up (or a quota) is behind ``exc``, anywhere in its chain."""
    import errno

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(exc):   # third-party errors that carry only the text
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def build_artifact(state, target, out: Path, config: CompileConfig, report: CompileReport) -> dict:
    """Run the back end on ``state`` (the front end's result) for ``target`` into the artifact
    ``out``; returns its manifest."""
    from legoc.passes import PassManager

    with _quiet_dependencies(), ArtifactWriter(out) as writer:
        state = PassManager(backend_pipeline())(state.replace(target=target, artifact=writer), config).state
    report.compile_seconds += state.compile_seconds
    report.latency_reused += state.latency_reused
    return state.manifest


def warn(message: str) -> None:
    """One warning line on stderr."""
    import sys

    print(f"legoc: warning: {message}", file=sys.stderr)


def train_batches(spec) -> dict:
    """``train_inputs`` (input tuples) and ``train_targets`` of the model file's train_data()
    batches. Retraining distills the original blocks and needs no targets; Taylor importance does."""
    if spec.train_data is None:
        return {"train_inputs": [], "train_targets": []}
    from legoc.modelfile import call_hook

    inputs, targets = [], []
    for batch in call_hook(spec.path, "train_data", spec.train_data):
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        inputs.append(tuple(x) if isinstance(x, (tuple, list)) else (x,))
        targets.append(batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None)
    return {"train_inputs": inputs, "train_targets": targets}


def val_batches(spec) -> dict:
    """``val_batches`` (the model file's val_data() batches) and its ``evaluate`` function."""
    if spec.val_data is None:
        return {"val_batches": None, "evaluate": spec.evaluate}
    from legoc.modelfile import call_hook

    batches = [tuple(b) if isinstance(b, (tuple, list)) else (b,) for b in call_hook(spec.path, "val_data", spec.val_data)]
    return {"val_batches": batches or None, "evaluate": spec.evaluate}
