"""Code quality of the CPU builds, statically: multiply-adds per instruction in the innermost
loops of every kernel, for an aarch64 board and for this x86 host.

    .venv/bin/python benchmarks/codegen.py [--models mobilenetv2-224,resnet18-224]
                                           [--targets raspberry-pi-4,host] [--top 6]

Each model is built as one module (``legoc.targets.build.build_module``, prepacked weights, legoc's
CPU schedules) for each target and disassembled with ``llvm-objdump``. In every function, a
backward branch closes a loop; a loop that contains no other loop is innermost. For each
innermost loop that holds vector FMAs (``fmla vN.4s`` on aarch64; ``vfmadd…ps`` on x86, 4, 8 or
16 lanes by register), it counts instructions, FMAs and memory operands. The figure of merit is
MACs per instruction = FMAs x lanes / instructions: the share of issue slots doing useful
arithmetic, independent of clock and machine load. A register-tiled micro-kernel approaches
lanes x (FMAs / (FMAs + loads + loop overhead)); a loop that spills or reloads accumulators,
or uses no by-element/broadcast form, shows up as a low figure or many memory operands per FMA.

The counts are static (every instruction of the loop body once): a loop's run time also depends
on its trip count and on the latency chains the counts cannot see.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

AARCH64_BRANCH = re.compile(r"^(b|b\.\w+|cbn?z|tbn?z)$")
X86_BRANCH = re.compile(r"^j\w+$")


@dataclass
class Loop:
    function: str
    start: int
    end: int
    instructions: int
    fmas: int
    lanes: int
    memory: int

    @property
    def macs_per_instruction(self) -> float:
        return self.fmas * self.lanes / self.instructions


def _disassemble(path: Path) -> dict[str, list[tuple[int, str, str]]]:
    """function -> [(address, mnemonic, operands)] from ``llvm-objdump -d``."""
    objdump = shutil.which("llvm-objdump")
    if objdump is None:
        raise SystemExit("llvm-objdump not found (Debian: apt-get install llvm)")
    text = subprocess.run([objdump, "-d", "--no-show-raw-insn", str(path)], check=True,
                          capture_output=True, text=True).stdout
    functions: dict[str, list] = {}
    current = None
    for line in text.splitlines():
        head = re.match(r"^([0-9a-f]+) <(.+)>:$", line)
        if head:
            current = functions.setdefault(head.group(2), [])
            continue
        ins = re.match(r"^\s+([0-9a-f]+):\s+(\S+)\s*(.*)$", line)
        if ins and current is not None:
            current.append((int(ins.group(1), 16), ins.group(2), ins.group(3)))
    return functions


def _fma_lanes(mnemonic: str, operands: str, aarch64: bool) -> int:
    """Lanes of a vector fp32 FMA instruction, 0 for anything else."""
    if aarch64:
        return 4 if mnemonic == "fmla" and ".4s" in operands else 0
    if mnemonic.startswith("vfmadd") and mnemonic.endswith("ps"):
        return 16 if "zmm" in operands else 8 if "ymm" in operands else 4
    return 0


def innermost_fma_loops(path: Path, aarch64: bool) -> list[Loop]:
    branch = AARCH64_BRANCH if aarch64 else X86_BRANCH
    loops = []
    for function, body in _disassemble(path).items():
        index = {addr: i for i, (addr, _, _) in enumerate(body)}
        spans = []
        for i, (addr, mnemonic, operands) in enumerate(body):
            if not branch.match(mnemonic):
                continue
            target = re.search(r"0x([0-9a-f]+)|\b([0-9a-f]{3,})\b", operands)
            if not target:
                continue
            dest = int(target.group(1) or target.group(2), 16)
            if dest <= addr and dest in index:
                spans.append((index[dest], i))
        for lo, hi in spans:
            if any(lo <= a and b <= hi and (a, b) != (lo, hi) for a, b in spans):
                continue   # holds another loop: not innermost
            inner = body[lo:hi + 1]
            lanes = [_fma_lanes(m, o, aarch64) for _, m, o in inner]
            fmas = sum(1 for n in lanes if n)
            if not fmas:
                continue
            memory = sum(1 for _, m, o in inner if "[" in o or (not aarch64 and "(" in o))
            loops.append(Loop(function, body[lo][0], body[hi][0], len(inner), fmas, max(lanes), memory))
    return loops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mobilenetv2-224,resnet18-224")
    ap.add_argument("--targets", default="raspberry-pi-4,host")
    ap.add_argument("--top", type=int, default=6)
    args = ap.parse_args()

    from kernels import _model_file  # noqa: PLC0415 - benchmarks/kernels.py

    from legoc.modelfile import load_model_file
    from legoc.targets.build import build_module
    from legoc.targets.table import get_target

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        for name in args.models.split(","):
            spec = load_model_file(_model_file(name, work))
            for target_name in args.targets.split(","):
                target = get_target(target_name)
                aarch64 = str(target.triple).startswith("aarch64")
                built = build_module(spec.model.eval(), tuple(spec.example_inputs), target,
                                     work / f"{name}-{target.name}.so", name=name, prepack=True)
                loops = innermost_fma_loops(built.path, aarch64)
                if not loops:
                    print(f"{name} on {target.name}: no vector FMA loop found")
                    continue
                ins = sum(lp.instructions for lp in loops)
                macs = sum(lp.fmas * lp.lanes for lp in loops)
                mem = sum(lp.memory for lp in loops)
                fmas = sum(lp.fmas for lp in loops)
                print(f"{name} on {target.name} ({target.target.get('mcpu', 'native')}): {len(loops)} innermost FMA loops, "
                      f"{macs / ins:.2f} MACs/instruction overall, {fmas / ins:.0%} of instructions are FMAs, "
                      f"{mem / fmas:.2f} memory operands per FMA, lanes {sorted({lp.lanes for lp in loops})}")
                for lp in sorted(loops, key=lambda lp: -lp.fmas)[:args.top]:
                    print(f"    {lp.macs_per_instruction:5.2f} MACs/ins  {lp.fmas:3d} FMA x{lp.lanes:<2d} "
                          f"{lp.instructions:4d} ins  {lp.memory:3d} mem  {lp.function}")


if __name__ == "__main__":
    main()
