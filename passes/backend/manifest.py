"""The artifact's manifest as the build stage first writes it: the model, the target, the options,
and every segment with its variants' modules, weights and static figures. The stages after build
fill in what they measure (latency, switch-in time, the combination figures)."""
from __future__ import annotations

from legoc.passes.backend.stage import VariantJob
from legoc.passes.infra import ProgramState

ACCURACY_KEYS = ("metric", "source", "how", "samples", "baseline", "contexts", "signal", "calibration",
                 "evaluations", "reused")


def variant_entry(state: ProgramState, job: VariantJob, module: dict, weights: dict) -> dict:
    """The manifest entry of one variant built for the target's own device."""
    from legoc.passes.analysis import peak_activation_bytes

    profile = {"peak_activation_bytes": {"value": peak_activation_bytes(job.module),
                                         "source": "static (shapes and tensor liveness)"},
               "latency_ms": None}   # filled by measure-latency
    acc = state.accuracy
    if job.segment.is_block and acc is not None:
        drop = acc["variants"][(job.segment.name, job.id)]
        profile["accuracy_drop"] = {
            "value": drop["value"], "contexts": drop["contexts"], "metric": acc["metric"],
            "measured": drop["measured"], "measured_ci95": drop["measured_ci95"],
            "signal": drop["signal"], "signal_ci95": drop["signal_ci95"],
            "source": "measured-local",
            "how": acc["how"] + "; estimate from the calibrated signal, mean over contexts (PyTorch)"}
    return {
        "id": job.id, "ratio": job.ratio, "macs": int(job.macs), "param_bytes": int(job.param_bytes),
        "channels": {k: list(v) for k, v in job.channels.items()},
        # the criterion that ranked each pruned group: options.importance, or "l1" where "bn" found no BN scale
        "importance": dict(job.importance),
        "module": module,
        "weights": weights,
        "retrain": (state.retrain_report or {}).get((job.segment.name, job.id)),
        "profile": profile,
    }


def device_entry(target_name: str, module: dict, weights: dict) -> dict:
    """The ``devices[name]`` entry of a block variant built for another device of the board."""
    return {"target": target_name, "module": module, "weights": weights,
            "profile": {"latency_ms": None}}   # filled by measure-latency


def manifest_of(state: ProgramState, config, variants_of: dict[str, list[dict]], devices: dict,
                nested: bool) -> dict:
    """The whole manifest: ``variants_of`` segment name -> its variants' entries; ``devices``
    device name -> target (the default device first)."""
    part, target = state.partition, state.target
    acc = state.accuracy
    manifest = {
        "accuracy": None if acc is None else {k: acc[k] for k in ACCURACY_KEYS},
        "combination": {"call_overhead_ms": None, "module_overhead_bytes": None, "validation": []},
        "model": {"name": type(state.model).__name__, "source": state.source, "total_macs": part.total_macs,
                  "scalable_macs": part.scalable_macs, "scalable_share": part.scalable_share,
                  "max_blocks": part.max_blocks},
        "target": target.to_json(),
        "inputs": [{"name": n, **part.tensor_meta[n]} for n in part.graph_inputs],
        "output": part.output_spec,
        "retrained": state.retrained,
        "nested": nested,
        "bn_recalibrated": state.recalibrated,
        "options": {"blocks": len(part.blocks), "ratios": list(config.ratios), "importance": config.importance,
                    "round_to": config.round_to, "winograd": bool(config.winograd and not nested)},
        "segments": [
            {"name": s.name, "kind": s.kind, "inputs": s.inputs, "outputs": s.outputs, "macs": s.macs,
             "tensors": {n: part.tensor_meta[n] for n in [*s.inputs, *s.outputs]},
             "variants": variants_of[s.name]}
            for s in part.segments
        ],
    }
    if len(devices) > 1:
        manifest["devices"] = devices_summary(part, target, devices)
    return manifest


def devices_summary(part, target, devices: dict) -> dict:
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
