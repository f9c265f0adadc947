"""The commands of legoc's command line (legoc.cli parses the arguments and calls them): each
takes the parsed arguments and returns the exit code."""
from __future__ import annotations

import sys

from legoc.errors import UserError


def _select(m, args):
    if (args.set_clocks or args.dry_run) and not args.dvfs:
        raise UserError("--set-clocks and --dry-run set the clocks --dvfs chooses; add --dvfs")
    if args.dry_run and not args.set_clocks:
        raise UserError("--dry-run prints what --set-clocks would write; add --set-clocks")
    return m.select(args.latency_ms, args.memory_mb, args.min_accuracy, time_limit_s=args.time_limit,
                    energy_mj=args.energy_mj, objective=args.objective, dvfs=args.dvfs)


def _set_clocks(m, sel, args) -> None:
    """With --set-clocks: the chosen clocks written (or, --dry-run, printed) and read back."""
    from legoc.runtime import dvfs

    if not (args.set_clocks and sel.levels):
        return
    m.sysfs_root = args.sysfs
    done = m.set_clocks(sel.levels, dry_run=args.dry_run)
    if args.dry_run:
        print("would write:")
        for line in dvfs.commands(done):
            print(f"  {line}")
        return
    for a in done:
        now = "-" if a.current_mhz is None else f"{a.current_mhz:g} MHz"
        note = "" if a.took_effect else " (not in effect: a thermal limit or the power mode caps it)"
        print(f"set {a.device} to {a.wanted_mhz:g} MHz; now {now}{note}")


def cmd_select(args) -> int:
    from legoc.runtime.model import Model

    m = Model(args.artifact)
    sel = _select(m, args)
    e = sel.estimate
    print(f"{args.artifact}: {'optimal' if sel.optimal else 'feasible (time limit hit; may not be optimal)'} "
          f"in {sel.solve_ms:.1f} ms")
    choose_devices = len(m.profiles.devices) > 1
    for b, i, d in zip(m.blocks, sel.choice, sel.devices):
        v = b.variants[i]
        on = f" on {d}" if choose_devices else ""
        print(f"  {b.name}: variant {i} ({v.id}, ratio {v.ratio:.2f}, {v.macs / 1e6:.2f} M MACs){on}")
    lat = "-" if e.latency_ms is None else f"{e.latency_ms:.2f} ms ({', '.join(e.sources['latency'])})"
    energy = "" if e.energy_mj is None else f", energy {e.energy_mj:.3f} mJ ({', '.join(e.sources['energy'])})"
    print(f"estimated accuracy {e.accuracy:.4f} ({e.sources['accuracy']}), latency {lat}, "
          f"memory {e.memory_bytes / 2**20:.2f} MiB{energy}")
    if choose_devices:
        transfer = "-" if e.transfer_ms is None else f"{e.transfer_ms:.3f} ms ({', '.join(e.sources['transfer'])})"
        print(f"  of which CPU<->GPU copies: {transfer}")
    if sel.switch_energy_mj and sel.switch_energy_mj[0] is not None and e.energy_mj is not None:
        print(f"  switching to it from nothing loaded: {sel.switch_energy_mj[0]:.3f} mJ (estimated, bytes loaded)")
    print(f"variants: {','.join(map(str, sel.choice))}")
    if choose_devices:
        print(f"devices: {','.join(sel.devices)}")
    if sel.levels:
        print("clocks: " + ", ".join(f"{d} {mhz:g} MHz" for d, mhz in sel.levels.items()))
    _set_clocks(m, sel, args)
    return 0


def cmd_run(args) -> int:
    import time

    import numpy as np

    from legoc.runtime.model import Model

    xs = []
    for path in args.input:
        try:
            xs.append(np.load(path))
        except (OSError, ValueError) as exc:
            raise UserError(f"{path}: cannot read it as a .npy array ({exc}); save the input with numpy.save") from exc
    if args.cluster or args.tracker:
        return _run_tiled(args, xs)
    if args.device_key or args.cluster_fallback or args.record or args.calls != 1:
        raise UserError("--device-key, --cluster-fallback, --calls and --record go with --cluster or --tracker")
    m = Model(args.artifact, public_key=args.public_key)
    devices = (args.devices[0] if len(args.devices) == 1 else args.devices) if args.devices else None
    if args.variants:
        try:
            variants = [int(v) for v in args.variants.split(",")]
        except ValueError:
            raise UserError(f"--variants takes comma-separated integers like 0,2,1,4, got {args.variants!r}")
        m.configure(variants=variants, devices=devices)
    elif (args.latency_ms is not None or args.memory_mb is not None or args.min_accuracy is not None
          or args.energy_mj is not None or args.objective != "accuracy" or args.dvfs):
        if devices is not None:
            raise UserError("--devices goes with --variants; with a budget the solver chooses the devices")
        sel = _select(m, args)
        _set_clocks(m, sel, args)
        m.configure(variants=sel.choice, devices=sel.devices)
    else:
        m.configure(devices=devices)
    t0 = time.perf_counter()
    out = m(*xs)
    ms = (time.perf_counter() - t0) * 1e3
    on = f" on {','.join(m.devices)}" if len(m.profiles.devices) > 1 else ""
    print(f"variants {','.join(map(str, m.choice))}{on}: ran in {ms:.2f} ms")
    return _write_output(args, out)


def _write_output(args, out) -> int:
    import numpy as np

    if args.output:
        if isinstance(out, np.ndarray):
            np.save(args.output, out)
        else:
            leaves = out.items() if isinstance(out, dict) else enumerate(out)
            np.savez(args.output, **{str(k): np.asarray(v) for k, v in leaves})
        print(f"wrote {args.output}")
    else:
        print(np.array2string(np.asarray(out) if isinstance(out, np.ndarray) else np.asarray(out[0]), precision=4,
                              threshold=20))
    return 0


def _run_tiled(args, xs) -> int:
    """`legoc run --cluster/--tracker`: the artifact's tiling plan, what ran where, measured
    against estimated times."""
    import time

    from legoc.runtime.tiled import TiledModel, Workers, record_measured
    from legoc.show import cell

    if (args.latency_ms is not None or args.memory_mb is not None or args.min_accuracy is not None
            or args.energy_mj is not None or args.objective != "accuracy" or args.dvfs or args.devices):
        raise UserError("--cluster/--tracker run the configuration the tiling plan was made for: budgets and "
                        "--devices do not apply (--variants may change the blocks that run here)")
    if args.calls < 1:
        raise UserError(f"--calls must be at least 1, got {args.calls}")
    workers = Workers.of(args.cluster, args.tracker, args.device_key, None)
    variants = None
    if args.variants:
        try:
            variants = [int(v) for v in args.variants.split(",")]
        except ValueError:
            raise UserError(f"--variants takes comma-separated integers like 0,2,1,4, got {args.variants!r}")
    with TiledModel(args.artifact, workers, timeout=args.cluster_timeout, fallback=args.cluster_fallback == "local",
                    public_key=args.public_key, variants=variants) as m:
        if args.calls > 1:
            m(*xs)   # warm-up: first calls allocate on every worker
            m.reset_times()
        times = []
        for _ in range(args.calls):
            t0 = time.perf_counter()
            out = m(*xs)
            times.append((time.perf_counter() - t0) * 1e3)
        total = sorted(times)[len(times) // 2]
        rows = m.report()
        how = "one call" if args.calls == 1 else f"median of {args.calls} calls after a warm-up"
        print(f"{args.artifact} over {m.workers.describe()} (plan: {m.tiling['source']}, "
              f"estimate {m.tiling['estimate_ms']:.2f} ms for the blocks): ran in {total:.2f} ms ({how})")
        width = max(len(r["step"]) for r in rows)
        print(f"  {'step':<{width}}  {'est. ms':>8}  {'meas. ms':>8}  where")
        for r in rows:
            fell = f" (worker lost: ran here {r['fallbacks']}x)" if r["fallbacks"] else ""
            per = "; per worker " + " ".join(f"{x:.2f}" for x in r["tiles_ms"]) + " ms" if r.get("tiles_ms") else ""
            print(f"  {r['step']:<{width}}  {cell(r['estimate_ms'], '.2f'):>8}  {cell(r['measured_ms'], '.2f'):>8}  "
                  f"{r['where']}{per}{fell}")
        if args.record:
            print(f"recorded in {record_measured(args.artifact, m.workers, rows, args.calls, total)}")
    return _write_output(args, out)


def _rpc_config(args):
    from legoc.targets.rpc import make_config

    return make_config(args.rpc, args.device_key, timeout=args.rpc_timeout, number=args.rpc_number,
                       repeat=args.rpc_repeat)


def cmd_profile(args) -> int:
    from legoc.targets.rpc import profile_artifact

    cfg = _rpc_config(args)
    manifest = profile_artifact(args.artifact, cfg, log=lambda m: print(f"  {m}", file=sys.stderr))
    count = sum(len(s["variants"]) for s in manifest["segments"])
    print(f"measured {count} modules of {args.artifact} on '{cfg.key}' via {cfg.address}; "
          f"manifest updated (latency source: measured-rpc)")
    return 0


def cmd_evaluate(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from legoc.evaluate import configurations, evaluate_artifact, record, split_batches
    from legoc.modelfile import load_model_file
    from legoc.runtime.model import Model
    from legoc.show import cell

    m = Model(args.artifact)
    variants = []
    for text in args.variants:
        try:
            variants.append([int(v) for v in text.split(",")])
        except ValueError:
            raise UserError(f"--variants takes comma-separated integers like 0,2,1,4, got {text!r}")
    picks = configurations(m, variants, args.latency_ms, args.uniform)
    spec = load_model_file(args.model, input_shapes=tuple(args.input_shape) or None, data=args.data)
    batches = split_batches(spec, args.split)
    results = evaluate_artifact(m, batches, picks, spec.evaluate, str(spec.path))
    metric = "evaluate() of model.py" if spec.evaluate is not None else "top-1"
    n = sum(len(b[1]) if len(b) > 1 and hasattr(b[1], "__len__") else 1 for b in batches)
    t = Table(title=f"{args.artifact} on {n} samples of {spec.path.name}'s {args.split}_data() "
                    f"({metric}, run by legoc.runtime)")
    for col in ("configuration", "variants", "ratios", "MMACs", "est. acc. (val)", f"{args.split} acc.",
                "est. latency (ms)"):
        t.add_column(col, justify="left" if col in ("configuration", "variants", "ratios") else "right")
    for r in results:
        ratios = (f"all {r.ratios[0]:.2f}" if len(set(r.ratios)) == 1 else " ".join(f"{x:.2f}" for x in r.ratios))
        t.add_row(r.label, ",".join(map(str, r.choice)), ratios, f"{r.macs / 1e6:.2f}",
                  cell(r.est_accuracy, ".4f"), f"{r.accuracy:.4f}", cell(r.est_latency_ms, ".3f"))
    con = Console(width=max(120, Console().width))
    con.print(t)
    if args.record:
        from pathlib import Path

        from legoc.runtime.artifact import read_manifest
        from legoc.targets.rpc import write_manifest

        manifest = read_manifest(args.artifact)
        manifest["evaluation"] = record(results, args.split, metric, n, spec.path.name)
        write_manifest(Path(args.artifact), manifest)
        con.print(f"recorded in {Path(args.artifact) / 'manifest.json'} (shown by `legoc inspect`)")
    return 0


def cmd_compile(args) -> int:
    from legoc.passes.prune import DEFAULT_RATIOS
    from legoc.pipeline import CompileConfig, compile_model
    from legoc.runtime.tiled import Workers

    # --device-key names the boards of --rpc; with --tracker alone, the tiling workers'
    workers = Workers.of(args.cluster, args.tracker, args.device_key, args.tiles)
    tiles = args.tiles if args.tiles is not None or workers is None or args.tracker else workers.count
    cfg = CompileConfig(target=args.target, output=args.output, blocks=args.blocks,
                        ratios=args.ratios or DEFAULT_RATIOS, importance=args.importance,
                        round_to=args.round_to, progress=not args.no_progress,
                        retrain_epochs=args.retrain_epochs, retrain_minutes=args.retrain_minutes,
                        nested=args.nested, tune_trials=args.tune_trials, winograd=args.winograd,
                        rpc=_rpc_config(args) if args.rpc or not args.tracker else None,
                        devices=args.devices, sign_key=args.sign, export_onnx=args.onnx,
                        input_shapes=tuple(args.input_shape), data=args.data, tiles=tiles, tile_workers=workers,
                        tile_link=args.tile_link, tile_latency_ms=args.tile_latency_ms,
                        cluster_timeout=args.cluster_timeout)
    report = compile_model(args.model, cfg)
    part = report.partition
    print(f"wrote {report.artifact}: {len(part.blocks)} blocks × {len(cfg.ratios)} variants, "
          f"{len(part.segments) - len(part.blocks)} frame segments, {part.scalable_share:.1%} of "
          f"{part.total_macs / 1e6:.1f} M MACs scalable")
    tiling = report.manifest.get("tiling")
    if tiling:
        from legoc.show import tiling_lines

        for line in tiling_lines(tiling):
            print(line)
    print("stage seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in report.timings.items()))
    return 0


def cmd_export(args) -> int:
    from legoc.export import export

    files = export(args.artifact, args.onnx, variants=args.variants, all_variants=args.all)
    print(f"wrote {len(files)} files to {args.onnx}" if args.all else f"wrote {files[0]}")
    return 0


def cmd_inspect(args) -> int:
    from rich.console import Console

    from legoc.runtime.artifact import read_manifest
    from legoc.show import print_artifact

    m = read_manifest(args.artifact)
    con = Console(width=max(210, Console().width))
    print_artifact(con, args.artifact, m)
    if args.graph:
        from legoc.plot import plot_blocks

        con.print(f"wrote {plot_blocks(m, args.graph)}")
    if args.plot:
        from legoc.plot import plot_pareto

        con.print(f"wrote {plot_pareto(m, args.plot)}")
    return 0


def cmd_targets(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from legoc.targets.table import TARGETS, list_targets

    if args.names:  # no CPU detection, no rich: for scripts
        print("\n".join(sorted(TARGETS)))
        return 0
    t = Table(title="targets (or --target path/to/target.json)")
    for col in ("name", "device", "library", "description", "board software"):
        t.add_column(col)
    for spec in list_targets():
        t.add_row(spec.name, spec.device, spec.triple, spec.description, spec.board_software)
    Console(width=200).print(t)
    return 0


def cmd_keygen(args) -> int:
    from legoc.runtime.signing import keygen

    private, public = keygen(args.stem)
    print(f"wrote {private} (private: keep it where artifacts are built) and {public} (give it to the apps)")
    return 0


def cmd_sign(args) -> int:
    from legoc.runtime.artifact import read_manifest
    from legoc.runtime.signing import sign

    read_manifest(args.artifact)    # a valid, uncorrupted artifact first
    print(f"wrote {sign(args.artifact, args.key)}")
    return 0
