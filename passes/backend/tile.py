"""tile (``--tiles K``): the plan for running the model's blocks across K workers over TVM RPC,
and its tile modules, written into the artifact (issue 19).

1. **Runs.** Every block alone, and every run of consecutive blocks that can be joined (each
   block's output is the next block's only input, nothing else reads it, no frame segment
   between them), on the blocks' full-size variants (variant 0); with ``--tile-latency-ms``, in
   every combination of the blocks' variants (runs of at most TILE_VARIANT_RUN blocks), each
   with its accuracy drop from the manifest. Each run's row profile
   (legoc.passes.tiling.row_profile) says what a tile of any output rows reads and computes; a
   block that mixes rows stays whole, and the manifest says why.
2. **Seconds.** A block on the master: its latency figure in the manifest (with that figure's
   source). On the workers: with ``--cluster``/``--tracker``, measured now over TVM RPC (each
   worker's link and each block's module on each worker; source ``measured-rpc``); otherwise the
   master's figure for every worker and the assumed link ``--tile-link`` (source ``estimated``).
3. **Plan.** legoc.runtime.cluster_plan.plan_chain (exact) over the runs: each local, or tiled
   with the rows it gives each worker; the fastest plan, or with ``--tile-latency-ms`` the
   smallest accuracy drop whose estimate is within the budget (variants chosen with placement:
   a pruned variant computes less and moves fewer bytes).
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

PLANNED_VARIANT = 0   # without a budget the tiles are cut from every block's first variant (full size by default)
TILE_VARIANT_RUN = 2  # with --tile-latency-ms, runs of at most this many blocks (variants^run candidates each)


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
    gms = [[v.gm for v in state.variants[b.name]] for b in blocks]   # per block, per variant
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
    import itertools

    import torch

    from legoc.passes.tiling import Untileable, join, row_profile
    from legoc.runtime.cluster_plan import Candidate, Link, plan_chain

    blocks, gms, inputs, joins = _chain(state)
    n, k = len(blocks), config.tiles
    entries = {s["name"]: s for s in manifest["segments"]}
    budget = config.tile_latency_ms
    choices = [range(len(g)) if budget is not None else [PLANNED_VARIANT] for g in gms]
    max_run = TILE_VARIANT_RUN if budget is not None else n

    # 1. which runs tile (in which variants), and how
    untileable = {}
    with torch.no_grad():
        for i, b in enumerate(blocks):
            found = row_profile(gms[i][PLANNED_VARIANT], inputs[i], b.name)
            if isinstance(found, Untileable):
                untileable[b.name] = found.reason
    if len(untileable) == n:
        why = "; ".join(f"{b}: {r}" for b, r in untileable.items())
        raise UserError(f"--tiles {k}: no block of {state.source} can be tiled ({why}); compile without --tiles")
    runs = []   # (i, j, variants of blocks i..j-1, profile or None)
    with torch.no_grad():
        for i in range(n):
            for j in range(i + 1, min(n, i + max_run) + 1):
                if j - i > 1 and not joins[j - 1]:
                    break
                tileable = not any(b.name in untileable for b in blocks[i:j])
                for combo in itertools.product(*choices[i:j]):
                    prof = None
                    if tileable:
                        parts = [gms[b][v] for b, v in zip(range(i, j), combo)]
                        run = parts[0] if j - i == 1 else join(parts, inputs[i])
                        name = blocks[i].name if j - i == 1 else f"{blocks[i].name}-{blocks[j - 1].name}"
                        found = row_profile(run, inputs[i], name)
                        prof = None if isinstance(found, Untileable) else found
                    runs.append((i, j, combo, prof))

    # 2. seconds (and drops): the master's from the manifest; the workers' measured, or the master's
    # per block, per variant (None for variants the plan does not consider)
    local = [[_figure(entries[b.name], v, "latency_ms", b.name) / 1e3 if v in choices[i] else None
              for v in range(len(gms[i]))] for i, b in enumerate(blocks)]
    local_sources = [entries[b.name]["variants"][PLANNED_VARIANT]["profile"]["latency_ms"].get("source")
                     for b in blocks]
    # drops below zero (an estimate inside its noise) count as none: the plan adds drops up
    drops = [[max(0.0, _figure(entries[b.name], v, "accuracy_drop", b.name)) if budget is not None else 0.0
              for v in range(len(gms[i]))] for i, b in enumerate(blocks)]
    workers = config.tile_workers
    per_block = [[[None] * k for _ in g] for g in gms]   # [block][variant][worker]
    if workers is not None:
        todo = [(i, v) for i, x in enumerate(inputs) if x.dim() == 4 for v in choices[i]]   # what a worker can take
        modules, arrays = _whole_modules(state, [(blocks[i], v) for i, v in todo], entries, [inputs[i] for i, _ in todo])
        links, measured = workers.measure(modules, arrays, config.cluster_timeout)
        for (i, v), seconds in zip(todo, measured):
            per_block[i][v] = list(seconds)
        source = "measured-rpc"
    else:
        rtt_ms, mbit = config.tile_link
        links = [Link(rtt=rtt_ms / 1e3, bandwidth=mbit * 1e6 / 8)] * k
        per_block = [[[s] * k for s in row] for row in local]
        source = "estimated"

    # 3. the plan
    def on_worker(i: int, combo, w: int) -> float | None:
        seconds = [per_block[b][v][w] for b, v in zip(range(i, i + len(combo)), combo)]
        return None if None in seconds else sum(seconds)

    cands = [Candidate(i, j, sum(local[b][v] for b, v in zip(range(i, j), combo)),
                       tuple(on_worker(i, combo, w) for w in range(k)), prof, _label(combo),
                       sum(drops[b][v] for b, v in zip(range(i, j), combo)))
             for i, j, combo, prof in runs]
    plan = plan_chain(n, cands, links, budget=None if budget is None else budget / 1e3)
    profiles = {(i, j, _label(combo)): prof for i, j, combo, prof in runs}

    # 4. the tiled steps' modules, into the artifact
    steps = [_step(state, blocks, gms, inputs, profiles, links, cands, s, config.winograd) for s in plan.steps]
    chosen = [v for s in steps for v in s["variants"]]
    return {
        "workers": k, "variant": PLANNED_VARIANT if budget is None else None, "variants": chosen,
        "budget_ms": budget, "drop": plan.drop if budget is not None else None, "source": source,
        "how": _how(source, config),
        "addresses": list(workers.addresses) if workers is not None and workers.tracker is None else None,
        "tracker": None if workers is None or workers.tracker is None else {"address": workers.tracker,
                                                                             "device_key": workers.device_key},
        "links": [{"rtt_ms": link.rtt * 1e3, "mbit_s": _mbit(link.bandwidth),
                   "own_mbit_s": _mbit(getattr(link, "own_bandwidth", math.inf)),
                   "source": source if workers is not None else "assumed (--tile-link)"} for link in links],
        "blocks": [{"name": b.name, "local_ms": local[i][chosen[i]] * 1e3, "local_source": local_sources[i],
                    "worker_ms": [None if s is None else s * 1e3 for s in per_block[i][chosen[i]]],
                    "worker_source": source if workers is not None else "estimated (the master's figure)"}
                   for i, b in enumerate(blocks)],
        "steps": steps,
        "estimate_ms": plan.seconds * 1e3,
        "all_local_ms": sum(row[PLANNED_VARIANT] for row in local) * 1e3,
        "untileable": [{"block": b, "reason": r} for b, r in untileable.items()],
    }


def _label(combo) -> str:
    """A run's variants as the plan names them: the variant indices, "+"-joined."""
    return "+".join(str(v) for v in combo)


def _figure(entry: dict, variant: int, what: str, block: str) -> float:
    """A variant's profile figure (latency_ms or accuracy_drop), or a UserError saying it is missing."""
    fig = (entry["variants"][variant].get("profile") or {}).get(what) or {}
    if fig.get("value") is None:
        need = ("compile with measurements on" if what == "latency_ms"
                else "give the model file val_data() so that compile measures each variant's accuracy drop")
        raise UserError(f"--tiles: {block} variant {variant} has no {what.replace('_', ' ')} figure to plan with; {need}")
    return float(fig["value"])


def _mbit(bytes_per_second: float) -> float | None:
    """Mbit/s, None for a link without that limit (JSON has no infinity)."""
    return None if math.isinf(bytes_per_second) else bytes_per_second * 8 / 1e6


def _how(source: str, config) -> str:
    model = ("step = max over its workers of (rtt + worker seconds x the tile's share of the work) + the bands' "
             "bytes over each link's bandwidth; the plan is the exact optimum (legoc.runtime.cluster_plan)")
    if config.tile_latency_ms is not None:
        model += (f": the smallest accuracy drop (variants chosen with placement) within "
                  f"{config.tile_latency_ms:g} ms (--tile-latency-ms)")
    if source == "measured-rpc":
        return f"links and workers measured over TVM RPC at compile time; {model}"
    rtt, mbit = config.tile_link
    return (f"estimated: every worker as fast as the master's latency figures, links assumed {rtt:g} ms round "
            f"trip and {mbit:g} Mbit/s (--tile-link); {model}")


def _whole_modules(state: ProgramState, block_variants, entries: dict, inputs):
    """Each (block, variant)'s module as the build stage wrote it (a TileModule run whole), and
    its input, for timing on the workers."""
    from safetensors.numpy import load_file

    from legoc.runtime.cluster import TileModule
    from legoc.runtime.nesting import leading

    tmp = state.artifact.tmp
    modules, arrays = [], []
    for (b, index), x in zip(block_variants, inputs):
        v = entries[b.name]["variants"][index]
        w = v["weights"]
        if "shared" in w:   # nested: leading sub-tensors of the block's shared weights
            values = load_file(str(tmp / w["shared"]["file"]))
            weights = tuple(np.ascontiguousarray(values[nm][leading(shape)]) for nm, shape in zip(w["names"], w["shapes"]))
        else:
            values = load_file(str(tmp / w["file"]))
            weights = tuple(values[nm] for nm in w["names"])
        out_rows = entries[b.name]["tensors"][b.outputs[0]]["shape"]
        modules.append(TileModule(tmp / v["module"]["file"], weights,
                                  (0, int(x.shape[2])), (0, int(out_rows[2]) if len(out_rows) == 4 else 1)))
        arrays.append(np.ascontiguousarray(x.numpy()))
    return modules, arrays


def _step(state, blocks, gms, inputs, profiles, links, cands, step, winograd: bool) -> dict:
    """The manifest entry of one plan step; a tiled step's modules are compiled and written."""
    from legoc.runtime.cluster_plan import step_seconds

    names = [b.name for b in blocks[step.first:step.last]]
    variants = [int(v) for v in step.variant.split("+")] if step.variant else [PLANNED_VARIANT] * len(names)
    entry = {"blocks": names, "variants": variants, "first": step.first, "last": step.last,
             "input": blocks[step.first].inputs[0], "output": blocks[step.last - 1].outputs[0],
             "estimate_ms": step.seconds * 1e3, "drop": step.drop, "tiles": []}
    if step.local:
        return entry
    entry.update(compute_ms=step.compute * 1e3, transfer_ms=step.transfer * 1e3)
    prof = profiles[step.first, step.last, step.variant]
    cand = next(c for c in cands if (c.first, c.last, c.variant) == (step.first, step.last, step.variant))
    parts = [gms[b][v] for b, v in zip(range(step.first, step.last), variants)]
    files = _compile_step(state, parts, inputs[step.first], step, names, winograd)
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


def _compile_step(state, parts, x, step, names, winograd: bool) -> list[tuple[dict, dict]]:
    """Compile the step's tiles (one module per distinct tile) of ``parts`` (its blocks' modules
    in the planned variants; ``x`` their input) into ``tiles/``: per tile its module and weights
    entries."""
    import torch

    from legoc.passes.tiling import Untileable, compile_tiles, join, tile_plan

    run = parts[0] if len(parts) == 1 else join(parts, x)
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
    modules = compile_tiles(tiled, x, state.target, folder, prepack=True, winograd=winograd, name=stem)
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
