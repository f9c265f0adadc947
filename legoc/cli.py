"""legoc's command line: the arguments of compile, inspect, select, run, evaluate, profile,
targets, keygen and sign, and the exit codes (the commands themselves: legoc.commands).

Exit codes: 0 ok, 2 user error (bad model, target, options, artifact), 1 internal error.
Errors print one line; LEGOC_DEBUG=1 adds the traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback

from legoc import commands
from legoc.errors import InternalError, LegocError, UserError, first_line

COMMANDS = {"compile": commands.cmd_compile, "inspect": commands.cmd_inspect, "targets": commands.cmd_targets,
            "select": commands.cmd_select, "run": commands.cmd_run, "evaluate": commands.cmd_evaluate,
            "profile": commands.cmd_profile, "keygen": commands.cmd_keygen, "sign": commands.cmd_sign,
            "export": commands.cmd_export}


def _ratios(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ratios takes comma-separated numbers like 0,0.2,0.4, got {text!r}")


def _link(text: str) -> tuple[float, float]:
    try:
        rtt, mbit = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tile-link takes MS,MBIT like 0.5,1000, got {text!r}")
    return rtt, mbit


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are legoc's one-line user errors (argparse prints usage and exits)."""

    def error(self, message: str):
        raise UserError(f"{message}; see `{self.prog} --help`")


def _onnx_input_options(p) -> None:
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME=1,3,224,224",
                   help="ONNX models: the static shape of an input with dynamic dimensions (repeatable)")
    p.add_argument("--data", metavar="DIR", help="ONNX models: a folder of train.npz / val.npz / test.npz (arrays x, y)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="legoc", description="Compile a PyTorch CNN into a runtime-scalable artifact of swappable blocks.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compile", help="compile model.py for a target into NAME.lego/")
    c.add_argument("model", help="path of a model.py (build_model(), example_inputs(); see README) or a model.onnx")
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
    c.add_argument("--no-winograd", dest="winograd", action="store_false",
                   help="keep 3x3 convs direct: Winograd (the default) makes them faster and their "
                        "weights larger (ResNet-18: 46.7 -> 59.3 MB)")
    c.add_argument("--nested", action="store_true",
                   help="nested variants sharing one weight set per block (trained incrementally, smallest first)")
    c.add_argument("--devices", type=_names, default=(), metavar="cpu,gpu",
                   help="Jetson targets: build every block variant for the CPU and the GPU, so the runtime "
                        "chooses the device per block (default: the target's own device)")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.add_argument("--sign", metavar="KEY.pem", help="sign the artifact's manifest with this Ed25519 private key")
    c.add_argument("--onnx", action="store_true",
                   help="also keep every variant as ONNX in the artifact (about +50%% size), for `legoc export`")
    _onnx_input_options(c)
    _rpc_options(c, required=False)
    t = c.add_argument_group("several devices (spatial tiles over TVM RPC workers)")
    t.add_argument("--tiles", type=int, metavar="K",
                   help="also plan running the blocks across K workers (tiled rows, the rest here) and compile the "
                        "tiles; the plan is measured with --cluster/--tracker, else estimated from this machine's "
                        "timings and --tile-link")
    t.add_argument("--cluster", metavar="HOST:PORT,...",
                   help="with --tiles: measure these TVM RPC servers (in worker order; K defaults to their number)")
    t.add_argument("--tracker", metavar="HOST:PORT",
                   help="with --tiles: measure K boards of --device-key from this TVM RPC tracker")
    t.add_argument("--tile-link", type=_link, default=(0.5, 400.0), metavar="MS,MBIT",
                   help="estimated plans: the workers' assumed round trip (ms) and bandwidth (Mbit/s) "
                        "(default 0.5,400: TVM RPC over this machine's loopback)")
    t.add_argument("--tile-latency-ms", type=float, metavar="MS",
                   help="with --tiles: choose each block's variant together with where it runs: the smallest "
                        "estimated accuracy drop whose plan fits MS (default: the fastest plan at full size)")
    t.add_argument("--cluster-timeout", type=float, default=60.0, metavar="S",
                   help="seconds a worker may take to answer while measuring (default 60)")

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
    g = r.add_argument_group("several devices (an artifact compiled with --tiles)")
    g.add_argument("--cluster", metavar="HOST:PORT,...",
                   help="run the tiling plan: tiled steps on these TVM RPC servers (in the plan's worker order)")
    g.add_argument("--tracker", metavar="HOST:PORT", help="... or on boards of --device-key from this TVM RPC tracker")
    g.add_argument("--device-key", metavar="KEY", help="with --tracker: the workers' key")
    g.add_argument("--cluster-timeout", type=float, default=30.0, metavar="S",
                   help="seconds a worker may take per call before the call fails (default 30)")
    g.add_argument("--cluster-fallback", choices=("local",),
                   help="local: a tiled step whose worker is lost runs here for that call instead of failing")
    g.add_argument("--calls", type=int, default=1, metavar="N",
                   help="with --cluster/--tracker: N timed calls after one warm-up, medians reported (default 1: "
                        "one call)")
    g.add_argument("--record", action="store_true",
                   help="with --cluster/--tracker: keep the measured times in ART/tiling-measured.json (beside the "
                        "manifest, which stays untouched) for `legoc inspect`")

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
    _onnx_input_options(e)
    e.add_argument("--record", action="store_true",
                   help="also store the results in the artifact's manifest, where `legoc inspect` shows them")

    x = sub.add_parser("export", help="write an artifact's configurations as ONNX models (for ONNX Runtime); "
                                      "the artifact must be compiled with --onnx")
    x.add_argument("artifact")
    x.add_argument("--onnx", required=True, metavar="OUT", help="the .onnx file, or with --all a folder")
    x.add_argument("--variants", help="one variant index per block, comma-separated (default: all full size)")
    x.add_argument("--all", action="store_true", help="every segment variant as its own file, plus segments.json")

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
    p.add_argument("--energy-mj", type=float,
                   help="energy budget per inference (mJ; estimated from the target's power model, or measured)")
    p.add_argument("--objective", choices=("accuracy", "energy"), default="accuracy",
                   help="accuracy: the most accurate within the budgets (default); energy: the least energy within "
                        "latency, memory and --min-accuracy")
    p.add_argument("--dvfs", action="store_true",
                   help="also choose the board's clock (DVFS level) per CPU/GPU from the target's power model")
    p.add_argument("--set-clocks", action="store_true",
                   help="with --dvfs: set the chosen clocks through cpufreq/devfreq (on the board; needs root)")
    p.add_argument("--dry-run", action="store_true",
                   help="with --set-clocks: print the sysfs writes instead of doing them")
    p.add_argument("--sysfs", default="/", metavar="ROOT", help=argparse.SUPPRESS)   # tests: a fake sysfs tree
    p.add_argument("--time-limit", type=float, default=1.0, help="solver time limit in seconds (default 1)")


def _rpc_options(parser: argparse.ArgumentParser, required: bool) -> None:
    g = parser.add_argument_group("device farm (TVM RPC tracker)")
    g.add_argument("--rpc", metavar="HOST:PORT", required=required,
                   help="TVM RPC tracker; every variant is timed on a board registered with it")
    g.add_argument("--device-key", metavar="KEY", required=required, help="the board's key at the tracker")
    g.add_argument("--rpc-timeout", type=float, default=None, metavar="S",
                   help="seconds to reach the tracker and to get a free board (default 60)")
    g.add_argument("--rpc-number", type=int, default=None, metavar="N", help="runs per timing (default 10)")
    g.add_argument("--rpc-repeat", type=int, default=None, metavar="R", help="timings, median kept (default 3)")


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except UserError as exc:
        print(f"legoc: error: {exc}", file=sys.stderr)
        return exc.exit_code
    handler = COMMANDS[args.command]
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
