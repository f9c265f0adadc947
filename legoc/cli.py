"""legoc's command line: compile, inspect, select, run, evaluate, profile, targets.

Exit codes: 0 ok, 2 user error (bad model, target, options, artifact), 1 internal error.
Errors print one line; LEGOC_DEBUG=1 adds the traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback

from legoc.errors import InternalError, LegocError, UserError, first_line


def _ratios(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ratios takes comma-separated numbers like 0,0.2,0.4, got {text!r}")


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are legoc's one-line user errors (argparse prints usage and exits)."""

    def error(self, message: str):
        raise UserError(f"{message}; see `{self.prog} --help`")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="legoc", description="Compile a PyTorch CNN into a runtime-scalable artifact of swappable blocks.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compile", help="compile model.py for a target into NAME.lego/")
    c.add_argument("model", help="path of a model.py (build_model(), example_inputs(); see README)")
    c.add_argument("--target", "-t", default="host", help="target name (see `legoc targets`) or a target .json (default: host)")
    c.add_argument("-o", "--output", help="artifact directory (default: MODEL-TARGET.lego)")
    c.add_argument("--blocks", type=int, help="number of blocks (default: up to 4, balanced by MACs)")
    c.add_argument("--ratios", type=_ratios, default=None, help="pruning ratios per block, e.g. 0,0.2,0.4,0.6,0.8 (default)")
    c.add_argument("--importance", default="l1", help="channel importance: l1 (default), bn (BN scale) or taylor (first-order Taylor on train_data)")
    c.add_argument("--round-to", type=int, default=None,
                   help="keep pruned channel counts multiples of N (default: the target's vector width; 1: off)")
    c.add_argument("--retrain-epochs", type=int, default=10, help="block-distillation epochs (0: no retraining; default 10)")
    c.add_argument("--retrain-minutes", type=float, default=10.0, help="time limit of retraining (default 10)")
    c.add_argument("--tune-trials", type=int, default=0,
                   help="MetaSchedule trials per workload not yet in the tuning database (default 0: no tuning)")
    c.add_argument("--nested", action="store_true",
                   help="nested variants sharing one weight set per block (trained incrementally, smallest first)")
    c.add_argument("--devices", type=_names, default=(), metavar="cpu,gpu",
                   help="Jetson targets: build every block variant for the CPU and the GPU, so the runtime "
                        "chooses the device per block (default: the target's own device)")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.add_argument("--sign", metavar="KEY.pem", help="sign the artifact's manifest with this Ed25519 private key")
    _rpc_options(c, required=False)

    i = sub.add_parser("inspect", help="print an artifact's blocks and variants")
    i.add_argument("artifact")
    i.add_argument("--plot", metavar="FILE", help="draw estimated accuracy vs latency (Pareto front, same-ratio baseline, "
                                                  "validated points) to FILE (.png/.svg)")
    i.add_argument("--graph", metavar="FILE", help="draw the segment graph (blocks coloured, frame grey) to FILE (.svg/.png)")

    sel = sub.add_parser("select", help="choose the most accurate variants within a budget (CP-SAT) and print them")
    sel.add_argument("artifact")
    _budget_args(sel)

    r = sub.add_parser("run", help="run an artifact on an input .npy (configured by variants or by budget)")
    r.add_argument("artifact")
    r.add_argument("--input", "-i", required=True, action="append", help="input .npy (repeat for several inputs)")
    r.add_argument("--output", "-o", help="write the output here (.npy; .npz for a tuple/dict output)")
    r.add_argument("--variants", help="one variant index per block, comma-separated (instead of a budget)")
    r.add_argument("--public-key", metavar="KEY.pub.pem",
                   help="refuse the artifact unless its manifest is signed by this Ed25519 key's private half")
    r.add_argument("--devices", type=_names, default=None,
                   help="with --variants: one device per block (cpu or gpu), comma-separated, or one for all "
                        "(artifacts compiled with --devices; default: the target's own device)")
    _budget_args(r)

    e = sub.add_parser("evaluate", help="accuracy of an artifact's configurations on model.py's test_data() "
                                        "(never used by compile), run by the runtime")
    e.add_argument("artifact")
    e.add_argument("model", help="the model.py the artifact was compiled from (its test_data() and evaluate())")
    e.add_argument("--variants", action="append", default=[], metavar="I,J,...",
                   help="a configuration: one variant index per block (repeatable)")
    e.add_argument("--latency-ms", action="append", type=float, default=[], metavar="MS",
                   help="the configuration CP-SAT picks under this latency budget (repeatable)")
    e.add_argument("--uniform", action="store_true",
                   help="every uniform configuration (the same variant in every block); the default when "
                        "no configuration is given")
    e.add_argument("--split", choices=("test", "val"), default="test",
                   help="test_data() (default) or val_data(), the split compile measured on")
    e.add_argument("--record", action="store_true",
                   help="also store the results in the artifact's manifest, where `legoc inspect` shows them")

    k = sub.add_parser("keygen", help="make an Ed25519 key pair for signing artifacts: STEM.pem and STEM.pub.pem")
    k.add_argument("stem", help="path and name of the key files, without .pem")
    s = sub.add_parser("sign", help="sign an artifact's manifest (which lists every file's sha256) with a private key")
    s.add_argument("artifact")
    s.add_argument("--key", required=True, metavar="KEY.pem", help="Ed25519 private key (PEM, from `legoc keygen`)")

    tg = sub.add_parser("targets", help="list the known targets")
    tg.add_argument("--names", action="store_true", help="only the names, one a line (for scripts)")

    r = sub.add_parser("profile", help="measure an artifact's variants on a board over TVM RPC")
    r.add_argument("artifact")
    _rpc_options(r, required=True)
    return p


def _budget_args(p) -> None:
    p.add_argument("--latency-ms", type=float, help="latency budget per inference (ms)")
    p.add_argument("--memory-mb", type=float, help="memory budget (MiB of resident memory the runtime adds)")
    p.add_argument("--min-accuracy", type=float, help="lowest acceptable estimated accuracy (metric units, e.g. 0.97)")
    p.add_argument("--time-limit", type=float, default=1.0, help="solver time limit in seconds (default 1)")


def _select(m, args):
    return m.select(args.latency_ms, args.memory_mb, args.min_accuracy, time_limit_s=args.time_limit)


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
    print(f"estimated accuracy {e.accuracy:.4f} ({e.sources['accuracy']}), latency {lat}, "
          f"memory {e.memory_bytes / 2**20:.2f} MiB")
    if choose_devices:
        transfer = "-" if e.transfer_ms is None else f"{e.transfer_ms:.3f} ms ({', '.join(e.sources['transfer'])})"
        print(f"  of which CPU<->GPU copies: {transfer}")
    print(f"variants: {','.join(map(str, sel.choice))}")
    if choose_devices:
        print(f"devices: {','.join(sel.devices)}")
    return 0


def cmd_run(args) -> int:
    import time

    import numpy as np

    from legoc.runtime.model import Model

    m = Model(args.artifact, public_key=args.public_key)
    xs = []
    for path in args.input:
        try:
            xs.append(np.load(path))
        except (OSError, ValueError) as exc:
            raise UserError(f"{path}: cannot read it as a .npy array ({exc}); save the input with numpy.save") from exc
    devices = (args.devices[0] if len(args.devices) == 1 else args.devices) if args.devices else None
    if args.variants:
        try:
            variants = [int(v) for v in args.variants.split(",")]
        except ValueError:
            raise UserError(f"--variants takes comma-separated integers like 0,2,1,4, got {args.variants!r}")
        m.configure(variants=variants, devices=devices)
    elif args.latency_ms is not None or args.memory_mb is not None or args.min_accuracy is not None:
        if devices is not None:
            raise UserError("--devices goes with --variants; with a budget the solver chooses the devices")
        sel = _select(m, args)
        m.configure(variants=sel.choice, devices=sel.devices)
    else:
        m.configure(devices=devices)
    t0 = time.perf_counter()
    out = m(*xs)
    ms = (time.perf_counter() - t0) * 1e3
    on = f" on {','.join(m.devices)}" if len(m.profiles.devices) > 1 else ""
    print(f"variants {','.join(map(str, m.choice))}{on}: ran in {ms:.2f} ms")
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


def _rpc_options(parser: argparse.ArgumentParser, required: bool) -> None:
    g = parser.add_argument_group("device farm (TVM RPC tracker)")
    g.add_argument("--rpc", metavar="HOST:PORT", required=required,
                   help="TVM RPC tracker; every variant is timed on a board registered with it")
    g.add_argument("--device-key", metavar="KEY", required=required, help="the board's key at the tracker")
    g.add_argument("--rpc-timeout", type=float, default=None, metavar="S",
                   help="seconds to reach the tracker and to get a free board (default 60)")
    g.add_argument("--rpc-number", type=int, default=None, metavar="N", help="runs per timing (default 10)")
    g.add_argument("--rpc-repeat", type=int, default=None, metavar="R", help="timings, median kept (default 3)")


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

    m = Model(args.artifact)
    variants = []
    for text in args.variants:
        try:
            variants.append([int(v) for v in text.split(",")])
        except ValueError:
            raise UserError(f"--variants takes comma-separated integers like 0,2,1,4, got {text!r}")
    picks = configurations(m, variants, args.latency_ms, args.uniform)
    spec = load_model_file(args.model)
    batches = split_batches(spec, args.split)
    results = evaluate_artifact(m, batches, picks, spec.evaluate, str(spec.path))
    metric = "evaluate() of model.py" if spec.evaluate is not None else "top-1"
    n = sum(len(b[1]) if len(b) > 1 and hasattr(b[1], "__len__") else 1 for b in batches)
    t = Table(title=f"{args.artifact} on {n} samples of {spec.path.name}'s {args.split}_data() "
                    f"({metric}, run by legoc.runtime)")
    for col in ("configuration", "variants", "ratios", "MMACs", "est. acc. (val)", f"{args.split} acc.",
                "est. latency (ms)"):
        t.add_column(col, justify="left" if col in ("configuration", "variants", "ratios") else "right")
    fmt = lambda x, f: "-" if x is None else format(x, f)  # noqa: E731
    for r in results:
        ratios = (f"all {r.ratios[0]:.2f}" if len(set(r.ratios)) == 1 else " ".join(f"{x:.2f}" for x in r.ratios))
        t.add_row(r.label, ",".join(map(str, r.choice)), ratios, f"{r.macs / 1e6:.2f}",
                  fmt(r.est_accuracy, ".4f"), f"{r.accuracy:.4f}", fmt(r.est_latency_ms, ".3f"))
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

    cfg = CompileConfig(target=args.target, output=args.output, blocks=args.blocks,
                        ratios=args.ratios or DEFAULT_RATIOS, importance=args.importance,
                        round_to=args.round_to, progress=not args.no_progress,
                        retrain_epochs=args.retrain_epochs, retrain_minutes=args.retrain_minutes,
                        nested=args.nested, tune_trials=args.tune_trials, rpc=_rpc_config(args),
                        devices=args.devices, sign_key=args.sign)
    report = compile_model(args.model, cfg)
    part = report.partition
    print(f"wrote {report.artifact}: {len(part.blocks)} blocks × {len(cfg.ratios)} variants, "
          f"{len(part.segments) - len(part.blocks)} frame segments, {part.scalable_share:.1%} of "
          f"{part.total_macs / 1e6:.1f} M MACs scalable")
    print("stage seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in report.timings.items()))
    return 0


def cmd_inspect(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from legoc.runtime.artifact import read_manifest

    m = read_manifest(args.artifact)
    con = Console(width=max(170, Console().width))
    model, tgt = m["model"], m["target"]
    con.print(f"[bold]{args.artifact}[/]: model {model['name']} ({model['source']}), target {tgt['name']} "
              f"({tgt['triple']}, {tgt['device']}); {model['scalable_share']:.1%} of "
              f"{model['total_macs'] / 1e6:.2f} M MACs in blocks; retrained: {m['retrained']}")
    t = Table(title="segments (in execution order)")
    for col in ("segment", "kind", "in → out", "variant", "ratio", "MACs (M)", "params (KiB)", "peak act. (KiB)",
                "latency (ms)", "acc. drop", "module (KiB)"):
        t.add_column(col, justify="right" if col not in ("segment", "kind", "in → out", "variant") else "left")
    for s in m["segments"]:
        shapes = " → ".join(",".join("×".join(map(str, s["tensors"][n]["shape"])) for n in names)
                            for names in (s["inputs"], s["outputs"]))
        for k, v in enumerate(s["variants"]):
            t.add_row(s["name"] if k == 0 else "", s["kind"] if k == 0 else "", shapes if k == 0 else "",
                      v["id"], f"{v['ratio']:.2f}", f"{v['macs'] / 1e6:.2f}", f"{v['param_bytes'] / 1024:.1f}",
                      _profile(v, "peak_activation_bytes", 1 / 1024, ".1f"), _latencies(v, m),
                      _drop(v),
                      f"{v['module']['bytes'] / 1024:.0f}")
        t.add_section()
    con.print(t)
    con.print("structure: " + "  ".join(
        f"{s['name']}({','.join(s['inputs'])} → {','.join(s['outputs'])})" for s in m["segments"]))
    _print_estimates(con, m)
    if args.graph:
        from legoc.plot import plot_blocks

        con.print(f"wrote {plot_blocks(m, args.graph)}")
    if args.plot:
        from legoc.plot import plot_pareto

        con.print(f"wrote {plot_pareto(m, args.plot)}")
    return 0


def _print_estimates(con, m: dict) -> None:
    """Accuracy source, and the compile-time validation of the combination estimators."""
    acc = m.get("accuracy")
    if acc:
        con.print(f"accuracy: {acc['metric']} = {acc['baseline']:.4f} at full size; drops per variant from "
                  f"{acc['how']}")
        cal = acc.get("calibration")
        if cal:
            alpha = "none" if cal.get("alpha") is None else f"{cal['alpha']:.4g} per unit of signal"
            con.print(f"acc. drop column: the estimate the solver uses (measured drop ±95% interval); signal: "
                      f"{acc.get('signal')}; calibration: alpha {alpha}; {cal.get('how')}")
    val = (m.get("combination") or {}).get("validation") or []
    if val:
        _print_validation(con, val)
    _print_evaluation(con, m.get("evaluation"))


def _print_validation(con, val: list[dict]) -> None:
    """The compile-time measured combinations, the latency fit's calibration points (in-sample)
    apart from the held-out ones, with the mean latency error of each group."""
    from rich.table import Table

    fmt = lambda x, f: "-" if x is None else format(x, f)  # noqa: E731
    groups = [("held out", [v for v in val if v.get("fitted") is False]),
              ("fitted (in-sample: the estimators' calibration points)", [v for v in val if v.get("fitted") is True]),
              ("fit status not recorded (older artifact)", [v for v in val if "fitted" not in v])]
    t = Table(title="combinations measured at compile time (val split): estimate vs measurement")
    for col in ("points", "variants", "acc. est.", "acc. meas.", "latency est. (ms)", "latency meas. (ms)",
                "latency error", "memory est. (MiB)"):
        t.add_column(col, justify="left" if col in ("points", "variants") else "right")
    summary = []
    for name, rows in groups:
        if not rows:
            continue
        errors = []
        for k, v in enumerate(rows):
            e, me = v["estimated"], v["measured"]
            err = None
            if e["latency_ms"] is not None and me.get("latency_ms"):
                err = (e["latency_ms"] - me["latency_ms"]) / me["latency_ms"]
                errors.append(abs(err))
            t.add_row(name if k == 0 else "", " ".join(map(str, v["choice"])), fmt(e["accuracy"], ".4f"),
                      fmt(me.get("accuracy"), ".4f"), fmt(e["latency_ms"], ".2f"), fmt(me.get("latency_ms"), ".2f"),
                      fmt(err, "+.1%"), f"{e['memory_bytes'] / 2**20:.2f}")
        t.add_section()
        if errors:
            summary.append(f"{name.split(' (')[0]} {sum(errors) / len(errors):.1%} over {len(errors)}")
    con.print(t)
    if summary:
        con.print("mean |latency error|: " + "; ".join(summary))


def _print_evaluation(con, ev: dict | None) -> None:
    """Accuracy on the model file's test split recorded by `legoc evaluate --record`."""
    if not ev:
        con.print("test-split accuracy: not recorded; run `legoc evaluate ART model.py --record` "
                  "(compile never reads test_data())")
        return
    from rich.table import Table

    t = Table(title=f"accuracy on {ev['samples']} samples of {ev['model_file']}'s {ev['split']}_data() "
                    f"({ev['metric']}; legoc evaluate, {ev['created']})")
    for col in ("configuration", "variants", "est. acc. (val)", f"{ev['split']} acc.", "est. latency (ms)"):
        t.add_column(col, justify="left" if col in ("configuration", "variants") else "right")
    for r in ev["results"]:
        t.add_row(r["label"], ",".join(map(str, r["choice"])),
                  "-" if r["est_accuracy"] is None else f"{r['est_accuracy']:.4f}", f"{r['accuracy']:.4f}",
                  "-" if r["est_latency_ms"] is None else f"{r['est_latency_ms']:.3f}")
    con.print(t)


def _drop(variant: dict) -> str:
    """The accuracy-drop cell: the estimate, then the measured drop with its 95% interval."""
    fig = (variant.get("profile") or {}).get("accuracy_drop")
    if not fig or fig.get("value") is None:
        return "-"
    ci = fig.get("measured_ci95")
    if not fig.get("measured") or ci is None:
        return f"{fig['value']:+.4f}"
    measured = sum(fig["measured"].values()) / len(fig["measured"])
    return f"{fig['value']:+.4f} ({measured:+.4f} ±{(ci[1] - ci[0]) / 2:.4f})"


def _latencies(variant: dict, manifest: dict) -> str:
    """The latency cell: the default device's, then every other device's (``--devices``)."""
    own = _profile(variant, "latency_ms", 1, ".2f")
    others = variant.get("devices") or {}
    if not others:
        return own
    default = (manifest.get("devices") or {}).get("default", "")
    return " ".join([f"{default} {own}"] + [f"{d} {_profile(e, 'latency_ms', 1, '.2f')}" for d, e in others.items()])


def _profile(variant: dict, key: str, scale: float, fmt: str) -> str:
    """A profile figure with its source marked: ~ estimated, * measured over RPC, - none."""
    fig = variant.get("profile", {}).get(key)
    if not fig or fig.get("value") is None:
        return "-"
    mark = {"estimated": "~", "measured-rpc": "*"}.get(fig.get("source"), "")
    return f"{mark}{fig['value'] * scale:{fmt}}"


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


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except UserError as exc:
        print(f"legoc: error: {exc}", file=sys.stderr)
        return exc.exit_code
    handler = {"compile": cmd_compile, "inspect": cmd_inspect, "targets": cmd_targets, "select": cmd_select,
               "run": cmd_run, "evaluate": cmd_evaluate, "profile": cmd_profile, "keygen": cmd_keygen,
               "sign": cmd_sign}[args.command]
    try:
        return handler(args)
    except UserError as exc:
        print(f"legoc: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("legoc: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as exc:  # InternalError or a bug we did not anticipate
        if os.environ.get("LEGOC_DEBUG"):
            traceback.print_exc()
        msg = first_line(exc) or type(exc).__name__
        kind = "" if isinstance(exc, LegocError) else f"{type(exc).__name__}: "
        print(f"legoc: internal error: {kind}{msg} (LEGOC_DEBUG=1 shows the traceback; please report it)", file=sys.stderr)
        return InternalError.exit_code


if __name__ == "__main__":
    sys.exit(main())
