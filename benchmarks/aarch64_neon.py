"""Build a model for a Raspberry Pi 4 with legoc's CPU schedules and show its NEON code.

    .venv/bin/python benchmarks/aarch64_neon.py [--model examples/cifar_resnet.py]
                                                [--target raspberry-pi-4] [--out out/neon]

Writes ``model.so`` (aarch64 for the target's mcpu, prepacked weights), ``x.npy``,
``params.npz`` (the module's weights, in order: arr_0, arr_1, ...) and ``ref.npy`` (PyTorch's
output) to ``--out``, then counts NEON fused multiply-adds (``fmla vN.4s``) per function in the
library's disassembly (``llvm-objdump``). To run it under emulation (issue #7): load the .so with
the TVM runtime, ``vm = VirtualMachine(lib, cpu()); out = vm["main"](x, *params)`` (every array
wrapped in ``tvm.runtime.tensor``) and compare with ref.npy.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=ROOT / "examples" / "cifar_resnet.py")
    ap.add_argument("--target", default="raspberry-pi-4")
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "neon")
    args = ap.parse_args()

    import numpy as np
    import torch

    from legoc.modelfile import load_model_file
    from legoc.targets.build import build_module
    from legoc.targets.table import get_target

    spec = load_model_file(args.model)
    model = spec.model.eval()
    inputs = tuple(spec.example_inputs)
    target = get_target(args.target)
    args.out.mkdir(parents=True, exist_ok=True)
    built = build_module(model, inputs, target, args.out / "model.so", name=spec.name, prepack=True)
    np.save(args.out / "x.npy", inputs[0].numpy())
    np.savez(args.out / "params.npz", *built.params)
    with torch.no_grad():
        np.save(args.out / "ref.npy", model(*inputs).numpy())
    print(f"wrote {built.path} ({target.name}, {target.target.get('mcpu')}), x.npy, params.npz "
          f"({len(built.params)} arrays), ref.npy in {args.out}")

    objdump = shutil.which("llvm-objdump") or shutil.which("aarch64-linux-gnu-objdump")
    if objdump is None:
        raise SystemExit("no llvm-objdump or aarch64-linux-gnu-objdump to disassemble with")
    text = subprocess.run([objdump, "-d", str(built.path)], check=True, capture_output=True,
                          text=True).stdout
    per_function: Counter[str] = Counter()
    function = "?"
    for line in text.splitlines():
        head = re.match(r"^[0-9a-f]+ <(.+)>:$", line)
        if head:
            function = head.group(1)
        elif re.search(r"\bfmla\s+v\d+\.4s", line):
            per_function[function] += 1
    print(f"NEON fmla (4 x float32) instructions: {sum(per_function.values())}")
    for name, count in per_function.most_common(8):
        print(f"  {count:5d}  {name}")
    if not per_function:
        raise SystemExit("no NEON fmla found: the schedules did not vectorize for this target")


if __name__ == "__main__":
    main()
