"""Where legoc's time goes against ONNX Runtime's, stage by stage, without an instrument.

    .venv/bin/python benchmarks/stages_vs_ort.py [--model resnet18-224|mobilenetv2-224]
                                                 [--threads 2] [--runs 400] [--rounds 20]

The model (``benchmarks/inference.py``'s ImageNet layouts, random seeded weights) is cut after
each stage into prefixes (ResNet-18: the stem, then each pair of basic blocks, then the head;
MobileNetV2: the stem, each group of inverted residuals with one row of the paper's table 2,
the head). Every prefix is built twice: exported to ONNX for ONNX Runtime (all graph
optimizations) and compiled as one TVM module by ``legoc.targets.build.build_module`` with
prepacked weights (``inference.py``'s "tvm monolithic" runner: legoc's schedules, no block
boundaries). Each of the 2 x prefixes runners lives in a process of its own and answers
``inference.py``'s interleaved rounds; a stage's time is the difference between the round
medians of its prefix and the prefix before it, in the same runner and round, and its ratio is
the median over rounds of legoc's stage time over ORT's (paired, as ``inference.py``'s
"× ORT paired").

Unlike ``layers_vs_ort.py`` nothing is instrumented: both sides run exactly as in inference, so
the figures add up to the end-to-end times. What a call does besides the model cancels in a
difference only where consecutive prefixes end in outputs of the same size: each runner copies
its output out (ORT after reordering it from its blocked layout), so a stage whose output is
larger or smaller than the one before carries that difference, and the first stage carries
each runner's whole fixed cost of a call. MobileNetV2's stem (32 x 112 x 112 out, against 16 x
112 x 112 after the next stage) is such a case: compare it with the stem alone before reading
it as kernel time. Prefixes cost compile time: ResNet-18's six modules take a few minutes.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import inference  # noqa: E402 - benchmarks/inference.py: its zoo models, runners and rounds


def prefixes(model, arch: str) -> list[tuple[str, object]]:
    """(stage name, the model up to and including that stage) for each stage, in order."""
    from torch import nn  # noqa: PLC0415

    if arch == "resnet18":
        cuts = [("stem", [model.stem])]
        for i, width in enumerate((64, 128, 256, 512)):
            cuts.append((f"layer{i + 1} ({width})", [model.stem, *model.layers[:2 * i + 2]]))
        stages = [(name, nn.Sequential(*mods)) for name, mods in cuts]
    else:
        feats = model.features
        end, cuts = 1, [("stem", 1)]
        for t, c, n, s in model.SETTINGS:
            end += n
            cuts.append((f"{n} x IR t{t} c{c} s{s}", end))
        cuts.append(("head conv", len(feats)))
        stages = [(name, nn.Sequential(*feats[:k])) for name, k in cuts]
    return stages + [("pool + fc", model)]


def build(stages, x, folder: Path, threads: int) -> dict:
    """Runner specs (inference.py's "ort" and "tvm" kinds), keyed (kind, stage index): the
    ONNX file and the TVM module of every prefix, built here; each worker saves its first
    output to its spec's ``output`` for :func:`main` to check against PyTorch."""
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415

    from legoc.targets.build import build_module  # noqa: PLC0415
    from legoc.targets.table import get_target  # noqa: PLC0415

    np.save(folder / "x.npy", x.numpy())
    base = {"threads": threads, "input": str(folder / "x.npy"), "warmup": 5, "clock": "wall"}
    specs = {}
    for i, (name, module) in enumerate(stages):
        module = module.eval()
        onnx_path = folder / f"p{i}.onnx"
        torch.onnx.export(module, (x,), str(onnx_path), input_names=["x"], dynamo=False)
        built = build_module(module, (x,), get_target("host"), folder / f"p{i}.so", name=f"prefix {i}",
                             prepack=True)
        np.savez(folder / f"p{i}-params.npz", *[np.asarray(p) for p in built.params])
        for kind, extra in (("ort", {"onnx": str(onnx_path)}),
                            ("tvm", {"library": str(built.path), "params": str(folder / f"p{i}-params.npz")})):
            specs[(kind, i)] = {**base, "kind": kind, **extra, "output": str(folder / f"p{i}-{kind}-out.npy")}
        print(f"built prefix {i + 1}/{len(stages)}: up to {name}", file=sys.stderr, flush=True)
    return specs


def stage_table(stages, medians: dict) -> list[dict]:
    """Per stage: the median over rounds of each side's stage time and of their ratio."""
    rounds = len(medians[("ort", 0)])
    rows = []
    for i, (name, _) in enumerate(stages):
        per = {}
        for kind in ("ort", "tvm"):
            now = medians[(kind, i)]
            before = medians[(kind, i - 1)] if i else [0.0] * rounds
            per[kind] = [a - b for a, b in zip(now, before)]
        ratios = [t / o for t, o in zip(per["tvm"], per["ort"]) if o > 0]
        rows.append({"stage": name, "ort": statistics.median(per["ort"]), "legoc": statistics.median(per["tvm"]),
                     "paired": statistics.median(ratios) if ratios else float("nan"),
                     "ort_range": (min(per["ort"]), max(per["ort"])),
                     "legoc_range": (min(per["tvm"]), max(per["tvm"]))})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18-224", choices=("resnet18-224", "mobilenetv2-224"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=400, help="timed calls per runner, over all rounds")
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    for var in ("TVM_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    # the TorchScript ONNX exporter's deprecation notice, once per prefix (inference.py's export too)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)

    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415
    from rich.console import Console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    from legoc.modelfile import load_model_file  # noqa: PLC0415

    arch = args.model.split("-")[0]
    console = Console(width=120)
    with tempfile.TemporaryDirectory(prefix="legoc-stages-") as tmp:
        folder = Path(tmp)
        spec = load_model_file(inference.model_file(args.model, folder))
        model = spec.model.eval()
        x = spec.example_inputs[0]
        stages = prefixes(model, arch)
        specs = build(stages, x, folder, args.threads)
        with torch.no_grad():
            refs = [module(x).numpy() for _, module in stages]
        procs = {}
        try:
            for (kind, i), wspec in specs.items():
                procs[(kind, i)] = [inference.Runner(wspec, folder / f"{kind}-{i}.log")]
                inference._check(args.model, f"{kind} prefix {i}", np.load(wspec["output"]), refs[i])
            medians, _ = inference.interleaved_rounds(procs, args.rounds, max(1, args.runs // args.rounds),
                                                      args.model)
        finally:
            for (proc,) in procs.values():
                proc.close()
    rows = stage_table(stages, medians)
    table = Table(title=f"{args.model}, {args.threads} thread(s), ms per inference: stage = prefix - prefix before "
                        f"(medians over {args.rounds} rounds)")
    for col in ("stage", "ORT", "legoc", "legoc - ORT", "legoc / ORT paired", "ORT range", "legoc range"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for r in rows:
        table.add_row(r["stage"], f"{r['ort']:.3f}", f"{r['legoc']:.3f}", f"{r['legoc'] - r['ort']:+.3f}",
                      f"{r['paired']:.2f}×", "{:.3f}–{:.3f}".format(*r["ort_range"]),
                      "{:.3f}–{:.3f}".format(*r["legoc_range"]))
    end = len(stages) - 1
    ort_total, tvm_total = statistics.median(medians[("ort", end)]), statistics.median(medians[("tvm", end)])
    pair = inference.paired_ratio(medians[("tvm", end)], medians[("ort", end)])
    table.add_row("end to end", f"{ort_total:.3f}", f"{tvm_total:.3f}", f"{tvm_total - ort_total:+.3f}",
                  f"{pair:.2f}×", "", "")
    console.print(table)


if __name__ == "__main__":
    main()
