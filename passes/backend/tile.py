"""tile (``--tiles K``): the plan for running the model's blocks across K workers over TVM RPC,
and its tile modules, written into the artifact (issue 19).

1. **Runs.** Every block alone, and every run of consecutive blocks that can be joined (each
   block's output is the next block's only input, nothing else reads it, no frame segment
   between them), on the blocks' full-size variants (variant 0). Each run's row profile
   (legoc.passes.tiling.row_profile) says what a tile of any output rows reads and computes; a
   block that mixes rows stays whole, and the manifest says why.
2. **Seconds.** A block on the master: its latency figure in the manifest (with that figure's
   source). On the workers: with ``--cluster``/``--tracker``, measured now over TVM RPC (each
   worker's link and each block's module on each worker; source ``measured-rpc``); otherwise the
   master's figure for every worker and the assumed link ``--tile-link`` (source ``estimated``).
3. **Plan.** legoc.runtime.cluster_plan.plan_chain (exact) over the runs: each local, or tiled
   with the rows it gives each worker.
4. **Modules.** Each tiled step's tiles compiled for the target (one module per distinct tile,
   legoc.passes.tiling.compile_tiles), written under ``tiles/`` with their weights, sha256 in
   the manifest like every module, so loading, verification and signing cover them.

The manifest's ``tiling`` section records the steps, the measurements and the untileable
blocks; ``legoc run --cluster`` runs it (legoc.runtime.tiled), ``legoc inspect`` shows it.
"""
from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING

import numpy as np

from legoc.errors import InternalError, UserError
from legoc.passes.backend.stage import BackendStage
from legoc.passes.infra import Pass, PassResult, ProgramState, progress_bar

if TYPE_CHECKING:
    from legoc.pipeline import CompileConfig

PLANNED_VARIANT = 0   # the tiles are cut from every block's first variant (full size by default)


class CheckTiles(Pass):
    """With ``config.tiles``, right after partition (before the long build): fail at once when
    no block can be tiled, naming each block's reason. Changes nothing."""

    name = "check-tiles"

    def call(self, state: ProgramState, config: CompileConfig) -> PassResult:
        if config.tiles is not None:
            reasons = untileable_blocks(state)
            if len(reasons) == len(state.partition.blocks):
                why = "; ".join(f"{b}: {r}" for b, r in reasons.items())
                raise UserError(f"--tiles {config.tiles}: no block of {state.source} can be tiled ({why}); "
                                "compile without --tiles")
        return PassResult(state, False)


def untileable_blocks(state: ProgramState) -> dict[str, str]:
    """Block name -> why it cannot be tiled, for the blocks as partitioned (full size)."""
    import torch

    from legoc.passes.tiling import Untileable, tile_plan

    env = state.partition.trace_env(*state.example_inputs)
    out = {}
    with torch.no_grad():
        for b in state.partition.blocks:
            found = tile_plan(b.gm, env[b.inputs[0]], (1,))
            if isinstance(found, Untileable):
                out[b.name] = found.reason
    return out


class Tile(BackendStage):
    """With ``config.tiles``: sets the manifest's ``tiling`` and writes the tile modules."""

    name = "tile"

    def call(self, state: ProgramState, config: CompileConfig) -> PassResult:
        if config.tiles is None:
            return PassResult(state, False)
        if state.target.device != "cpu":
            raise UserError(f"--tiles: tiles run on the workers' CPUs, and target {state.target.name} builds for "
                            f"{state.target.device}; use a CPU target")
        manifest = copy.deepcopy(state.manifest)
        with progress_bar(config.progress) as bar:
            bar.add_task(f"planning tiles over {config.tiles} workers", total=None)
            manifest["tiling"] = _plan(state, config, manifest)
        return PassResult(state.replace(manifest=manifest), True)


def _chain(state: ProgramState):
    """The blocks in order (segments), their full-size modules, their inputs on the example
    inputs, and per block whether it joins onto the block before it."""
    part = state.partition
    env = part.trace_env(*state.example_inputs)
    blocks = part.blocks
    gms = [state.variants[b.name][PLANNED_VARIANT].gm for b in blocks]
    inputs = [env[b.inputs[0]] for b in blocks]
    position = {s.name: i for i, s in enumerate(part.segments)}
    readers: dict[str, int] = {}
    for s in part.segments:
        for n in s.inputs:
            readers[n] = readers.get(n, 0) + 1
    from legoc.runtime.artifact import output_names

    for n in output_names(part.output_spec):
        readers[n] = readers.get(n, 0) + 1
    joins = [False] + [position[b.name] == position[a.name] + 1 and b.inputs == a.outputs and readers[a.outputs[0]] == 1
                       for a, b in zip(blocks, blocks[1:])]
    return blocks, gms, inputs, joins


def _plan(state: ProgramState, config: CompileConfig, manifest: dict) -> dict:
    import torch

    from legoc.passes.tiling import Untileable, join, row_profile
    from legoc.runtime.cluster_plan import Candidate, Link, plan_chain

    blocks, gms, inputs, joins = _chain(state)
    n, k = len(blocks), config.tiles
    entries = {s["name"]: s for s in manifest["segments"]}

    # 1. which runs tile, and how
    profiles, untileable = {}, {}
    with torch.no_grad():
        for i in range(n):
            for j in range(i + 1, n + 1):
                if j - i > 1 and not joins[j - 1]:
                    break
                if any(b.name in untileable for b in blocks[i:j]):
                    profiles[i, j] = None
                    continue
                run = gms[i] if j - i == 1 else join(gms[i:j], inputs[i])
                found = row_profile(run, inputs[i], blocks[i].name if j - i == 1 else f"{blocks[i].name}-{blocks[j - 1].name}")
                if isinstance(found, Untileable):
                    if j - i == 1:
                        untileable[blocks[i].name] = found.reason
                    found = None
                profiles[i, j] = found
    if len(untileable) == n:
        why = "; ".join(f"{b}: {r}" for b, r in untileable.items())
        raise UserError(f"--tiles {k}: no block of {state.source} can be tiled ({why}); compile without --tiles")

    # 2. seconds: the master's from the manifest; the workers' measured, or the master's
    local, local_sources = [], []
    for b in blocks:
        fig = entries[b.name]["variants"][PLANNED_VARIANT]["profile"].get("latency_ms") or {}
        if fig.get("value") is None:
            raise UserError(f"--tiles: {b.name} has no latency figure to plan with; compile with measurements on")
        local.append(fig["value"] / 1e3)
        local_sources.append(fig.get("source"))
    workers = config.tile_workers
    if workers is not None:
        rowwise = [i for i, x in enumerate(inputs) if x.dim() == 4]   # what a worker can be given
        modules, arrays = _whole_modules(state, [blocks[i] for i in rowwise], entries, [inputs[i] for i in rowwise])
        links, measured = workers.measure(modules, arrays, config.cluster_timeout)
        per_block = [[None] * k for _ in blocks]
        for i, seconds in zip(rowwise, measured):
            per_block[i] = list(seconds)
        source = "measured-rpc"
    else:
        rtt_ms, mbit = config.tile_link
        links = [Link(rtt=rtt_ms / 1e3, bandwidth=mbit * 1e6 / 8)] * k
        per_block = [[s] * k for s in local]
        source = "estimated"

    # 3. the plan
    def on_worker(i: int, j: int, w: int) -> float | None:
        seconds = [per_block[b][w] for b in range(i, j)]
        return None if None in seconds else sum(seconds)

    cands = [Candidate(i, j, sum(local[i:j]), tuple(on_worker(i, j, w) for w in range(k)), prof)
             for (i, j), prof in profiles.items()]
    plan = plan_chain(n, cands, links)

    # 4. the tiled steps' modules, into the artifact
    steps = [_step(state, config, blocks, gms, inputs, profiles, links, cands, s) for s in plan.steps]
    return {
        "workers": k, "variant": PLANNED_VARIANT, "source": source,
        "how": _how(source, config),
        "addresses": list(workers.addresses) if workers is not None and workers.tracker is None else None,
        "tracker": None if workers is None or workers.tracker is None else {"address": workers.tracker,
                                                                             "device_key": workers.device_key},
        "links": [{"rtt_ms": link.rtt * 1e3, "mbit_s": _mbit(link.bandwidth),
                   "own_mbit_s": _mbit(getattr(link, "own_bandwidth", math.inf)),
                   "source": source if workers is not None else "assumed (--tile-link)"} for link in links],
        "blocks": [{"name": b.name, "local_ms": local[i] * 1e3, "local_source": local_sources[i],
                    "worker_ms": [None if s is None else s * 1e3 for s in per_block[i]],
                    "worker_source": source if workers is not None else "estimated (the master's figure)"}
                   for i, b in enumerate(blocks)],
        "steps": steps,
        "estimate_ms": plan.seconds * 1e3,
        "all_local_ms": sum(local) * 1e3,
        "untileable": [{"block": b, "reason": r} for b, r in untileable.items()],
    }


def _mbit(bytes_per_second: float) -> float | None:
    """Mbit/s, None for a link without that limit (JSON has no infinity)."""
    return None if math.isinf(bytes_per_second) else bytes_per_second * 8 / 1e6


def _how(source: str, config) -> str:
    model = ("step = max over its workers of (rtt + worker seconds x the tile's share of the work) + the bands' "
             "bytes over each link's bandwidth; the plan is the exact optimum (legoc.runtime.cluster_plan)")
    if source == "measured-rpc":
        return f"links and workers measured over TVM RPC at compile time; {model}"
    rtt, mbit = config.tile_link
    return (f"estimated: every worker as fast as the master's latency figures, links assumed {rtt:g} ms round "
            f"trip and {mbit:g} Mbit/s (--tile-link); {model}")


def _whole_modules(state: ProgramState, blocks, entries: dict, inputs):
    """Each block's full-size module as the build stage wrote it (a TileModule run whole), and
    its input, for timing on the workers."""
    from safetensors.numpy import load_file

    from legoc.runtime.cluster import TileModule

    tmp = state.artifact.tmp
    modules, arrays = [], []
    for b, x in zip(blocks, inputs):
        v = entries[b.name]["variants"][PLANNED_VARIANT]
        w = v["weights"]
        if "shared" in w:   # nested: leading sub-tensors of the shared weights; variant 0 is all of them
            values = load_file(str(tmp / w["shared"]["file"]))
        else:
            values = load_file(str(tmp / w["file"]))
        out_rows = entries[b.name]["tensors"][b.outputs[0]]["shape"]
        modules.append(TileModule(tmp / v["module"]["file"], tuple(values[nm] for nm in w["names"]),
                                  (0, int(x.shape[2])), (0, int(out_rows[2]) if len(out_rows) == 4 else 1)))
        arrays.append(np.ascontiguousarray(x.numpy()))
    return modules, arrays


def _step(state, config, blocks, gms, inputs, profiles, links, cands, step) -> dict:
    """The manifest entry of one plan step; a tiled step's modules are compiled and written."""
    from legoc.runtime.cluster_plan import step_seconds

    names = [b.name for b in blocks[step.first:step.last]]
    entry = {"blocks": names, "first": step.first, "last": step.last,
             "input": blocks[step.first].inputs[0], "output": blocks[step.last - 1].outputs[0],
             "estimate_ms": step.seconds * 1e3, "tiles": []}
    if step.local:
        return entry
    entry.update(compute_ms=step.compute * 1e3, transfer_ms=step.transfer * 1e3)
    prof = profiles[step.first, step.last]
    cand = next(c for c in cands if (c.first, c.last) == (step.first, step.last))
    files = _compile_step(state, gms, inputs, step, names)
    spans = [prof.rows_in[a, b] for _, a, b in step.tiles]
    for t, ((w, a, b), span, (module, weights)) in enumerate(zip(step.tiles, spans, files)):
        others = [s for u, s in enumerate(spans) if u != t]
        halo = sum(1 for r in range(*span) if any(lo <= r < hi for lo, hi in others))
        alone = step_seconds(cand, links, [(w, a, b)])
        entry["tiles"].append({
            "worker": w, "rows_in": list(span), "rows_out": [a, b], "halo_rows": halo,
            "bytes_in": (span[1] - span[0]) * prof.in_row_bytes, "bytes_out": (b - a) * prof.out_row_bytes,
            "estimate_ms": alone.seconds * 1e3, "module": module, "weights": weights})
    return entry


def _compile_step(state, gms, inputs, step, names) -> list[tuple[dict, dict]]:
    """Compile the step's tiles (one module per distinct tile) into ``tiles/``: per tile its
    module and weights entries."""
    import torch

    from legoc.passes.tiling import Untileable, compile_tiles, join, tile_plan

    x = inputs[step.first]
    run = gms[step.first] if step.last - step.first == 1 else join(gms[step.first:step.last], x)
    tiled = tile_plan(run, x, rows=[(a, b) for _, a, b in step.tiles])
    if isinstance(tiled, Untileable):
        raise InternalError(f"the plan tiles {', '.join(names)}, but {tiled.reason}")
    with torch.no_grad():
        diff = float((tiled.run(x) - run(x)).abs().max())
    if diff > 1e-4:
        raise InternalError(f"the tiles of {', '.join(names)} differ from the whole by {diff:.2e}")
    stem = names[0] if len(names) == 1 else f"{names[0]}-{names[-1]}"
    writer = state.artifact
    folder = writer.tmp / "tiles"
    folder.mkdir(exist_ok=True)
    modules = compile_tiles(tiled, x, state.target, folder, prepack=True, name=stem)
    written: dict[str, tuple[dict, dict]] = {}
    out = []
    for m in modules:
        rel = f"tiles/{m.path.name}"
        if rel not in written:
            names_w = [f"p{i}" for i in range(len(m.weights))]
            weights = writer.write_weights(rel.removesuffix(".so") + ".safetensors", names_w, list(m.weights))
            written[rel] = (writer.file_entry(rel), weights)
        out.append(written[rel])
    return out
