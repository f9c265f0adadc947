"""legoc's command line: compile, inspect, targets, profile.

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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="legoc", description="Compile a PyTorch CNN into a runtime-scalable artifact of swappable blocks.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compile", help="compile model.py for a target into NAME.lego/")
    c.add_argument("model", help="path of a model.py (build_model(), example_inputs(); see README)")
    c.add_argument("--target", "-t", default="host", help="target name (see `legoc targets`) or a target .json (default: host)")
    c.add_argument("-o", "--output", help="artifact directory (default: MODEL-TARGET.lego)")
    c.add_argument("--blocks", type=int, help="number of blocks (default: up to 4, balanced by MACs)")
    c.add_argument("--ratios", type=_ratios, default=None, help="pruning ratios per block, e.g. 0,0.2,0.4,0.6,0.8 (default)")
    c.add_argument("--importance", default="l1", help="channel importance: l1 (default), bn (BN scale) or taylor (first-order Taylor on train_data)")
    c.add_argument("--round-to", type=int, default=1, help="keep channel counts multiples of N")
    c.add_argument("--retrain-epochs", type=int, default=10, help="block-distillation epochs (0: no retraining; default 10)")
    c.add_argument("--retrain-minutes", type=float, default=10.0, help="time limit of retraining (default 10)")
    c.add_argument("--nested", action="store_true",
                   help="nested variants sharing one weight set per block (trained incrementally, smallest first)")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    _rpc_options(c, required=False)

    i = sub.add_parser("inspect", help="print an artifact's blocks and variants")
    i.add_argument("artifact")
    i.add_argument("--plot", metavar="FILE", help="draw the segment graph (blocks coloured, frame grey) to FILE (.svg/.png)")

    tg = sub.add_parser("targets", help="list the known targets")
    tg.add_argument("--names", action="store_true", help="only the names, one a line (for scripts)")

    r = sub.add_parser("profile", help="measure an artifact's variants on a board over TVM RPC")
    r.add_argument("artifact")
    _rpc_options(r, required=True)
    return p


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


def cmd_compile(args) -> int:
    from legoc.passes.prune import DEFAULT_RATIOS
    from legoc.pipeline import CompileConfig, compile_model

    cfg = CompileConfig(target=args.target, output=args.output, blocks=args.blocks,
                        ratios=args.ratios or DEFAULT_RATIOS, importance=args.importance,
                        round_to=args.round_to, progress=not args.no_progress,
                        retrain_epochs=args.retrain_epochs, retrain_minutes=args.retrain_minutes,
                        nested=args.nested, rpc=_rpc_config(args))
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
    con = Console(width=max(120, Console().width))
    model, tgt = m["model"], m["target"]
    con.print(f"[bold]{args.artifact}[/]: model {model['name']} ({model['source']}), target {tgt['name']} "
              f"({tgt['triple']}, {tgt['device']}); {model['scalable_share']:.1%} of "
              f"{model['total_macs'] / 1e6:.2f} M MACs in blocks; retrained: {m['retrained']}")
    t = Table(title="segments (in execution order)")
    for col in ("segment", "kind", "in → out", "variant", "ratio", "MACs (M)", "params (KiB)", "peak act. (KiB)",
                "latency (ms)", "module (KiB)"):
        t.add_column(col, justify="right" if col not in ("segment", "kind", "in → out", "variant") else "left")
    for s in m["segments"]:
        shapes = " → ".join(",".join("×".join(map(str, s["tensors"][n]["shape"])) for n in names)
                            for names in (s["inputs"], s["outputs"]))
        for k, v in enumerate(s["variants"]):
            t.add_row(s["name"] if k == 0 else "", s["kind"] if k == 0 else "", shapes if k == 0 else "",
                      v["id"], f"{v['ratio']:.2f}", f"{v['macs'] / 1e6:.2f}", f"{v['param_bytes'] / 1024:.1f}",
                      _profile(v, "peak_activation_bytes", 1 / 1024, ".1f"), _profile(v, "latency_ms", 1, ".2f"),
                      f"{v['module']['bytes'] / 1024:.0f}")
        t.add_section()
    con.print(t)
    con.print("structure: " + "  ".join(
        f"{s['name']}({','.join(s['inputs'])} → {','.join(s['outputs'])})" for s in m["segments"]))
    if args.plot:
        from legoc.plot import plot_blocks

        con.print(f"wrote {plot_blocks(m, args.plot)}")
    return 0


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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler = {"compile": cmd_compile, "inspect": cmd_inspect, "targets": cmd_targets,
               "profile": cmd_profile}[args.command]
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
