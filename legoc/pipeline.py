"""The compile pipeline: model.py -> passes (capture, partition, prune) -> TVM build of every
variant of every segment -> artifact. Named pipelines of passes live here."""
from __future__ import annotations

import contextlib
import dataclasses

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from legoc.artifact import check_destination
from legoc.errors import InternalError, LegocError, UserError, describe
from legoc.passes.prune import DEFAULT_RATIOS, IMPORTANCE


@dataclass(frozen=True)
class CompileConfig:
    """All options of one compile (one object instead of a long argument list)."""

    target: str = "host"
    output: Path | None = None
    blocks: int | None = None
    ratios: tuple[float, ...] = DEFAULT_RATIOS
    importance: str = "l1"
    round_to: int | None = None    # pruned channel multiple; None: the target's vector width (1: off)
    progress: bool = True
    calibration_batches: int = 8
    nested: bool = False
    retrain_epochs: int = 10
    retrain_minutes: float = 10.0
    retrain_lr: float = 1e-3
    profile_accuracy: bool = True   # measure every variant's accuracy drop (val_data, else fidelity)
    validate: bool = True           # measure a few combinations end to end (targets that run here)
    tune_trials: int = 0  # MetaSchedule trials per workload new to the tuning database (0: none)
    rpc: object = None  # legoc.targets.rpc.RpcConfig: measure every variant on a board over RPC
    sign_key: Path | None = None    # Ed25519 private key (PEM): sign the manifest (legoc.runtime.signing)
    devices: tuple[str, ...] = ()   # Jetson: ("cpu", "gpu") builds every block variant for both; () its own device

    def __post_init__(self):
        if self.importance not in IMPORTANCE:
            raise UserError(f"unknown importance {self.importance!r}; choose one of: {', '.join(IMPORTANCE)}")
        if self.retrain_epochs < 0 or self.retrain_minutes < 0:
            raise UserError("--retrain-epochs and --retrain-minutes must be 0 (no retraining) or more")
        if self.tune_trials < 0:
            raise UserError(f"--tune-trials must be 0 (no tuning) or more, got {self.tune_trials}")
        if self.round_to is not None and self.round_to < 1:
            raise UserError(f"--round-to must be at least 1, got {self.round_to}")


@dataclass
class CompileReport:
    artifact: Path
    timings: dict[str, float] = field(default_factory=dict)   # stage -> seconds
    compile_seconds: list[tuple[str, str, float]] = field(default_factory=list)  # (segment, variant, s)
    partition: object = None
    manifest: dict = field(default_factory=dict)
    latency_reused: int = 0   # variants whose latency came from the profile cache


def default_pipeline():
    """The named pass pipeline of `legoc compile` (in order)."""
    from legoc.passes.capture import Capture
    from legoc.passes.partition import PartitionPass
    from legoc.passes.prune import Prune
    from legoc.passes.recalibrate import Recalibrate
    from legoc.passes.retrain import Retrain

    from legoc.passes.profile import ProfileAccuracy

    return [Capture(), PartitionPass(), Prune(), Recalibrate(), Retrain(), ProfileAccuracy()]


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True), disable=not enabled, transient=False)


def compile_model(model_path: str | Path, config: CompileConfig) -> CompileReport:
    """Compile ``model_path`` for ``config.target`` into an artifact directory."""
    with warnings.catch_warnings():
        # torch.export inside TVM's frontend trips torch's own deprecation of LeafSpec checks, once
        # per module built: noise that would hide the warnings that matter
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                                category=FutureWarning)
        return _compile_model(model_path, config)


def _compile_model(model_path: str | Path, config: CompileConfig) -> CompileReport:
    from legoc.modelfile import load_model_file
    from legoc.passes import PassManager, ProgramState
    from legoc.targets.table import device_targets, get_target

    timings: dict[str, float] = {}
    target = get_target(config.target)          # fail fast on a bad target, before any work
    if config.sign_key is not None:             # ... and on a signing key that is not one
        from legoc.runtime.signing import read_key

        read_key(config.sign_key, private=True)
    device_targets(target, config.devices)      # ... and on --devices it cannot have
    if config.round_to is None:                 # pruned channels: multiples of the vector width
        from legoc.targets.table import channel_multiple

        config = dataclasses.replace(config, round_to=channel_multiple(target))
    if config.rpc is not None:                  # ... and on an unreachable device farm
        from legoc.targets.rpc import check_device

        check_device(config.rpc)
    t0 = time.perf_counter()
    spec = load_model_file(model_path)
    timings["load"] = time.perf_counter() - t0
    out = Path(config.output) if config.output else Path(f"{spec.name}-{target.name}.lego")
    check_destination(out)                      # ... and on an output that cannot be written

    pm = PassManager(default_pipeline())
    state = ProgramState(model=spec.model, example_inputs=spec.example_inputs, source=str(spec.path),
                         concrete_args=spec.concrete_args, **train_batches(spec), **val_batches(spec))
    if not state.train_inputs:
        warn(f"{spec.path} has no train_data(): pruned variants are neither retrained nor "
             f"recalibrated (manifest: retrained: false)")
    state = pm(state, config).state
    for t in pm.timings:
        timings[t.name] = t.seconds
    report = CompileReport(artifact=out, partition=state.partition)
    t0 = time.perf_counter()
    with _single_threaded_torch():
        report.manifest = build_artifact(state, target, out, config, report)
    timings["compile+write"] = time.perf_counter() - t0
    report.timings = timings
    return report


@contextlib.contextmanager
def _single_threaded_torch():
    """PyTorch on one thread while TVM modules are built and timed: after a parallel region
    torch's OpenMP workers keep spinning on the cores TVM's thread pool times its modules on
    (measured here: every variant timed ~2x slower than the same module in a torch-free process)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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


def _accuracy_summary(state) -> dict | None:
    acc = state.accuracy
    if acc is None:
        return None
    return {k: acc[k] for k in ("metric", "source", "how", "samples", "baseline", "contexts", "signal", "calibration",
                                "evaluations", "reused")}


def _latency(module, inputs, built, target, macs, report, build: dict) -> dict:
    """One module's latency figure: measured here when the target runs here, else estimated."""
    from legoc.targets import measure
    from legoc.targets.calibration import estimate_latency_ms

    if not target.runs_here:
        return estimate_latency_ms(target.name, target.device, macs)
    key = measure.fingerprint(module, inputs, target.to_json(), build)
    how = (f"TVM time_evaluator in a torch-free worker process (legoc.runtime.bench), median of "
           f"{measure.REPEAT} x {measure.NUMBER} runs in {measure.ROUNDS} rounds interleaved with the other new "
           f"modules, on {measure.threads()} threads, random inputs")
    data = measure.cached(key)
    if data is not None:
        report.latency_reused += 1
        return {"value": data["latency_ms"], "source": "measured-local", "how": how}
    # timed with the other new modules once all are built (_measure_pending)
    return {"value": None, "source": "measured-local", "how": how, "pending": key}


def _measure_pending(manifest: dict, writer) -> None:
    """Time every module whose latency is pending, all in one clean worker process (see
    legoc.runtime.bench for why not here), and cache the results."""
    from legoc.runtime.bench import measure_in_subprocess
    from legoc.targets import measure

    pending = [(seg["name"], i, v["profile"]["latency_ms"]) for seg in manifest["segments"]
               for i, v in enumerate(seg["variants"]) if "pending" in v["profile"]["latency_ms"]]
    if not pending:
        return
    draft = writer.draft(manifest)
    result = measure_in_subprocess(draft, [(name, i) for name, i, _ in pending],
                                   number=measure.NUMBER, repeat=measure.REPEAT, rounds=measure.ROUNDS)
    for (_, _, figure), ms in zip(pending, result["modules"]):
        measure.store(figure.pop("pending"), {"latency_ms": ms})
        figure["value"] = ms


def _variant_profile(state, seg, vid, module, inputs, built, target, macs, report, build: dict) -> dict:
    """Every figure of one variant with its source: static, measured-local, estimated or unmeasured."""
    from legoc.passes.analysis import peak_activation_bytes

    profile = {"peak_activation_bytes": {"value": peak_activation_bytes(module),
                                         "source": "static (shapes and tensor liveness)"}}
    profile["latency_ms"] = _latency(module, inputs, built, target, macs, report, build)
    acc = state.accuracy
    if seg.is_block and acc is not None:
        drop = acc["variants"][(seg.name, vid)]
        profile["accuracy_drop"] = {
            "value": drop["value"], "contexts": drop["contexts"], "metric": acc["metric"],
            "measured": drop["measured"], "measured_ci95": drop["measured_ci95"],
            "signal": drop["signal"], "signal_ci95": drop["signal_ci95"],
            "source": "measured-local",
            "how": acc["how"] + "; estimate from the calibrated signal, mean over contexts (PyTorch)"}
    return profile


VALIDATE_POINTS = 6


LOAD_REPEAT = 3


def _measure_loads(manifest: dict, draft: Path) -> None:
    """Each variant's switch-in time, as legoc.runtime does it: verify checksums, read the
    weights, load the library, create the VM, copy the weights (median of LOAD_REPEAT)."""
    import statistics

    import tvm

    from legoc.runtime.model import Model, _Executable, _WeightFiles

    model = Model(draft)
    dev = tvm.cpu()
    for seg in model.segments:
        for var in seg.variants:
            times = []
            for _ in range(LOAD_REPEAT):
                t0 = time.perf_counter()
                exe = _Executable(draft, seg, var, dev, _WeightFiles(draft))
                times.append((time.perf_counter() - t0) * 1e3)
                del exe
            entry = next(s for s in manifest["segments"] if s["name"] == seg.name)["variants"][var.index]
            entry["profile"]["load_ms"] = {"value": statistics.median(times), "source": "measured-local",
                                           "how": "legoc.runtime switch-in: checksums, read weights, load library, "
                                                  f"create VM, copy weights; median of {LOAD_REPEAT}"}


def _combination(state, target, manifest: dict, draft: Path, config, bar) -> dict:
    """Combination-level figures: the per-call overhead and, where the target runs here, a few
    configurations (the estimated Pareto front and the uniform ones) measured end to end."""
    from legoc.runtime.estimate import DEFAULT_CALL_OVERHEAD_MS, MODULE_OVERHEAD_BYTES

    out = {"call_overhead_ms": {"value": DEFAULT_CALL_OVERHEAD_MS, "source": "estimated",
                                "how": "default (not measured: no validation)"},
           "module_overhead_bytes": MODULE_OVERHEAD_BYTES, "validation": []}
    if not target.runs_here:
        _estimate_board_figures(manifest, target, out)
        return out
    if not config.validate:
        return out
    from legoc.runtime.estimate import Profiles

    _measure_loads(manifest, draft)
    profiles = Profiles(manifest)
    x = [t.numpy() for t in state.example_inputs]
    # calibration: the uniform configurations (same variant in every block) end to end, fitted by
    # least squares as  measured = scale * (sum of the modules' latencies) + segments * overhead;
    # timed in one worker, in interleaved rounds, with the validation points (the estimated Pareto
    # front: a positive scale and a constant overhead do not change it, so it is known before the fit)
    n = min(len(vs) for vs in profiles.blocks)
    picks = _validation_choices(profiles)   # the n uniform configurations first
    task = bar.add_task(f"validating {len(picks)} combinations", total=len(picks) + 1)
    latencies = _runtime_latency(draft, picks, x)
    bar.advance(task)
    uniform, measured_uniform = picks[:n], latencies[:n]
    sums = [sum(v.latency_ms for v in profiles.chosen(c) + profiles.frame) for c in uniform]
    scale, overhead = _fit_latency(sums, measured_uniform, profiles.num_segments)
    out["call_overhead_ms"] = {"value": overhead, "source": "measured-local",
                               "how": f"least-squares fit of the {n} uniform configurations measured end to end: "
                                      "runtime latency = scale x sum of module latencies + segments x overhead"}
    out["latency_scale"] = {"value": scale, "source": "measured-local",
                            "how": "the same fit: isolated module timings (time evaluator) vs modules run in sequence "
                                   "by the runtime"}
    manifest["combination"] = out
    profiles = Profiles(manifest)
    prof = state.accuracy["profiler"] if state.accuracy else None   # reuses its cached block inputs
    for k, (choice, latency_ms) in enumerate(zip(picks, latencies)):
        est = profiles.estimate(choice)
        measured = {"latency_ms": latency_ms}
        if prof is not None:
            measured["accuracy"] = prof.metric(dict(zip(profiles.block_names, choice)))
        out["validation"].append({"choice": list(choice),
                                  "fitted": k < n,   # the estimators were calibrated on it: in-sample
                                  "estimated": {"accuracy": est.accuracy, "latency_ms": est.latency_ms,
                                                "memory_bytes": est.memory_bytes},
                                  "measured": measured})
        bar.advance(task)
    out["validation_how"] = (f"latency: legoc.runtime end to end in a torch-free worker process, median of "
                             f"{VALIDATE_CALLS} calls in {VALIDATE_ROUNDS} interleaved rounds after {VALIDATE_WARMUP} "
                             "warm-up; fitted: true marks the uniform configurations, the calibration points of the latency fit "
                             "and of the accuracy-drop calibration (in-sample), fitted: false the held-out Pareto points; "
                             "accuracy: the same metric as the profiles, whole model in PyTorch")
    return out


def _estimate_board_figures(manifest: dict, target, out: dict) -> None:
    """A board's per-segment call overhead and every variant's switch-in time, estimated (each
    module's latency figure is compute only, so the overhead is counted once, here)."""
    from legoc.runtime.estimate import ASSUMED_LOAD_BYTES_PER_S, variant_cost
    from legoc.targets.calibration import call_overhead_ms

    out["call_overhead_ms"] = call_overhead_ms()
    for seg in manifest["segments"]:
        for v in seg["variants"]:
            ms = variant_cost(v).load_bytes / ASSUMED_LOAD_BYTES_PER_S * 1e3
            v["profile"]["load_ms"] = {"value": ms, "source": "estimated",
                                       "how": f"module and weight bytes read at an assumed "
                                              f"{ASSUMED_LOAD_BYTES_PER_S / 1e6:.0f} MB/s (board storage)"}


def _fit_latency(sums: list[float], measured: list[float], segments: int) -> tuple[float, float]:
    """(scale, per-segment overhead ms) fitting ``measured = scale * sums + segments * overhead``
    by least squares; scale kept within [0.5, 1.5] and overhead >= 0 (noise on a few points)."""
    import numpy as np

    a, b = np.asarray(sums, float), np.asarray(measured, float)
    if len(a) >= 2 and np.ptp(a) > 1e-9:
        scale, intercept = np.polyfit(a, b, 1)
    else:
        scale, intercept = 1.0, float(np.mean(b - a))
    scale = float(min(1.5, max(0.5, scale)))
    intercept = max(0.0, float(np.mean(b - scale * a)))   # refit the intercept after clamping
    return scale, intercept / max(1, segments)


def _validation_choices(profiles) -> list[tuple[int, ...]]:
    """Up to VALIDATE_POINTS configurations spread along the estimated Pareto front, plus the
    uniform ones (the same variant index in every block)."""
    n = min(len(vs) for vs in profiles.blocks)
    picks = [tuple([i] * len(profiles.blocks)) for i in range(n)]
    front = [c for c, _ in profiles.pareto_front()]
    if front:
        step = max(1, len(front) // VALIDATE_POINTS)
        picks += [c for c in front[::step] if c not in picks]
    return picks


VALIDATE_WARMUP, VALIDATE_CALLS, VALIDATE_ROUNDS = 3, 30, 3


def _runtime_latency(draft: Path, choices: list, x: list) -> list[float]:
    """End-to-end runtime latency (ms) of each configuration in ``choices``, in a worker process."""
    from legoc.runtime.bench import measure_in_subprocess

    return measure_in_subprocess(draft, [], choices, x, warmup=VALIDATE_WARMUP, calls=VALIDATE_CALLS,
                                 rounds=VALIDATE_ROUNDS)["combinations"]


def _shared_weights(writer, shared: dict, block: str, ratio: float, built) -> dict:
    """Weights of a nested variant: the full-size variant's weights are written once per block;
    every variant lists its parameters as leading sub-tensors of them (checked here)."""
    import numpy as np

    from legoc.passes.prune import leading

    if block not in shared:
        if ratio != 0:
            raise InternalError(f"nested block {block}: the full-size variant must be built first")
        entry = writer.write_weights(f"weights/{block}/shared.safetensors", built.param_names, built.params)
        shared[block] = ({k: entry[k] for k in ("file", "sha256", "bytes")}, dict(zip(built.param_names, built.params)))
    file_entry, values = shared[block]
    for name, value in zip(built.param_names, built.params):
        if name not in values or not np.array_equal(values[name][leading(value.shape)], value):
            raise InternalError(f"nested block {block}: weight {name} of variant r{ratio:.2f} is not a "
                                f"leading sub-tensor of the shared weights")
    return {"shared": file_entry, "names": list(built.param_names), "shapes": [list(v.shape) for v in built.params]}


def _device_entry(writer, state, seg, vid, ratio, module, inputs, spec, device, default_built, default_weights,
                  shared, macs, report, options: dict, nested: bool) -> dict:
    """One block variant built for another device of the board (``--devices``): its module, its
    weights (the default device's entry when they are the same arrays; prepacked CPU weights are
    not), its latency figure."""
    import numpy as np

    from legoc.targets.build import build_module, build_signature

    rel = f"modules/{seg.name}/{vid}.{device}.so"
    t0 = time.perf_counter()
    try:
        built = build_module(module, inputs, spec, writer.path_for(rel), name=f"{seg.name}/{vid} ({device})", **options)
    except LegocError:
        raise
    except Exception as exc:
        raise InternalError(f"building {seg.name}/{vid} for {spec.name} failed: {describe(exc)}") from exc
    report.compile_seconds.append((seg.name, f"{vid}@{device}", time.perf_counter() - t0))
    if built.num_outputs != default_built.num_outputs:
        raise InternalError(f"{seg.name}/{vid} has {built.num_outputs} outputs on {device}, "
                            f"{default_built.num_outputs} on the default device")
    same = built.param_names == default_built.param_names and all(
        a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b)
        for a, b in zip(built.params, default_built.params))
    if nested:
        weights = _shared_weights(writer, shared, seg.name, ratio, built)
    elif same:
        weights = default_weights
    else:
        weights = writer.write_weights(f"weights/{seg.name}/{vid}.{device}.safetensors", built.param_names, built.params)
    latency = _latency(module, inputs, built, spec, macs, report, build_signature(**options))
    return {"target": spec.name, "module": writer.file_entry(rel), "weights": weights,
            "profile": {"latency_ms": latency}}


def _devices_summary(part, target, devices: dict) -> dict:
    """The manifest's ``devices``: which devices there are, where the frame runs, and every tensor
    that crosses a segment boundary (model inputs and outputs included: they live in host
    memory) with its bytes and its estimated copy time between CPU and GPU."""
    from legoc.runtime.artifact import output_names, tensor_bytes
    from legoc.targets.calibration import estimate_transfer, transfer_ms

    default = next(iter(devices))
    model = estimate_transfer(target.name)
    tensors: dict[str, dict] = {}
    for name in part.graph_inputs:
        tensors[name] = {"from": "input", "to": []}
    for seg in part.segments:
        for name in seg.inputs:
            tensors[name]["to"].append(seg.name)
        for name in seg.outputs:
            tensors[name] = {"from": seg.name, "to": []}
    for name in output_names(part.output_spec):
        tensors[name]["to"].append("output")
    for name, t in tensors.items():
        t["bytes"] = tensor_bytes(part.tensor_meta[name])
        t["ms"] = transfer_ms(model, t["bytes"])
    return {
        "default": default,
        "choices": list(devices),
        "frame": default,
        "targets": {name: spec.to_json() for name, spec in devices.items() if name != default},
        "transfer": {**model, "tensors": tensors},
    }


def build_artifact(state, target, out: Path, config: CompileConfig, report: CompileReport) -> dict:
    """Compile every variant of every segment of ``state`` for ``target`` into the artifact ``out``."""
    from legoc.artifact import ArtifactWriter
    from legoc.passes.analysis import param_bytes
    from legoc.targets.build import build_module, build_signature

    from legoc.targets.table import device_targets

    def build_options(nested: bool) -> dict:
        # nested variants slice one shared weight set: their weights must stay untransformed
        return {"tune_trials": config.tune_trials, "prepack": not nested}

    # the default device (the target's own) first; with --devices, each block variant is also
    # built for the other devices (the frame runs on the default device only)
    devices = device_targets(target, config.devices)
    extra = {name: spec for name, spec in devices.items() if spec is not target}

    part = state.partition
    env = part.trace_env(*state.example_inputs)
    jobs = []   # (segment, variant id, ratio, module, macs, param_bytes, channels)
    retrained = state.retrain_report or {}
    for seg in part.segments:
        if seg.is_block:
            for v in state.variants[seg.name]:
                jobs.append((seg, v.id, v.ratio, v.gm, v.macs, v.param_bytes, v.channels, v.nested))
        else:
            jobs.append((seg, "frame", 0.0, seg.gm, seg.macs, param_bytes(seg.gm), {}, False))
    shared: dict[str, tuple[dict, dict]] = {}   # nested block -> (weights entry, name -> array)
    variants_of: dict[str, list[dict]] = {s.name: [] for s in part.segments}
    with ArtifactWriter(out) as writer, _progress(config.progress) as bar:
        task = bar.add_task(f"compiling for {target.name}", total=len(jobs))
        for seg, vid, ratio, module, macs, pbytes, channels, nested in jobs:
            bar.update(task, description=f"compiling {seg.name}/{vid} for {target.name}")
            rel = f"modules/{seg.name}/{vid}.so"
            inputs = tuple(env[n] for n in seg.inputs)
            t0 = time.perf_counter()
            try:
                built = build_module(module, inputs, target, writer.path_for(rel), name=f"{seg.name}/{vid}",
                                     **build_options(nested))
            except LegocError:
                raise
            except Exception as exc:
                raise InternalError(f"building {seg.name}/{vid} for {target.name} failed: {describe(exc)}") from exc
            report.compile_seconds.append((seg.name, vid, time.perf_counter() - t0))
            if built.num_outputs != len(seg.outputs):
                raise InternalError(f"{seg.name}/{vid} compiled to {built.num_outputs} outputs, expected {len(seg.outputs)}")
            if nested:
                weights = _shared_weights(writer, shared, seg.name, ratio, built)
            else:
                weights = writer.write_weights(f"weights/{seg.name}/{vid}.safetensors", built.param_names, built.params)
            profile = _variant_profile(state, seg, vid, module, inputs, built, target, macs, report,
                                       build_signature(**build_options(nested)))
            entry = {
                "id": vid, "ratio": ratio, "macs": int(macs), "param_bytes": int(pbytes),
                "channels": {k: list(v) for k, v in channels.items()},
                "module": writer.file_entry(rel),
                "weights": weights,
                "retrain": retrained.get((seg.name, vid)),
                "profile": profile,
            }
            if seg.is_block and extra:
                entry["devices"] = {
                    name: _device_entry(writer, state, seg, vid, ratio, module, inputs, spec, name, built, weights,
                                        shared, macs, report, build_options(nested), nested)
                    for name, spec in extra.items()}
            variants_of[seg.name].append(entry)
            bar.advance(task)
        manifest = {
            "accuracy": _accuracy_summary(state),
            "combination": {"call_overhead_ms": None, "module_overhead_bytes": None, "validation": []},
            "model": {"name": type(state.model).__name__, "source": state.source, "total_macs": part.total_macs,
                      "scalable_macs": part.scalable_macs, "scalable_share": part.scalable_share,
                      "max_blocks": part.max_blocks},
            "target": target.to_json(),
            "inputs": [{"name": n, **part.tensor_meta[n]} for n in part.graph_inputs],
            "output": part.output_spec,
            "retrained": state.retrained,
            "nested": bool(shared),
            "bn_recalibrated": state.recalibrated,
            "options": {"blocks": len(part.blocks), "ratios": list(config.ratios), "importance": config.importance,
                        "round_to": config.round_to},
            "segments": [
                {"name": s.name, "kind": s.kind, "inputs": s.inputs, "outputs": s.outputs, "macs": s.macs,
                 "tensors": {n: part.tensor_meta[n] for n in [*s.inputs, *s.outputs]},
                 "variants": variants_of[s.name]}
                for s in part.segments
            ],
        }
        if extra:
            manifest["devices"] = _devices_summary(part, target, devices)
        _measure_pending(manifest, writer)
        manifest["combination"] = _combination(state, target, manifest, writer.draft(manifest), config, bar)
        if config.rpc is not None:  # measured on the board before anything is committed
            from legoc.targets.rpc import measure_into

            bar.update(task, description=f"measuring on '{config.rpc.key}' over RPC")
            measure_into(writer.tmp, manifest, config.rpc)
        writer.commit(manifest, config.sign_key)
    return manifest
