#!/usr/bin/env bash
# Cross-compile a model for every target in legoc's table (or the ones given) and verify what
# was built: the recipe of a CI job that makes artifacts for boards nobody has in the CI room.
#
#   scripts/cross_compile.sh [MODEL.py] [OUTDIR] [TARGET...]
#
# Each artifact is compiled by `legoc compile` (one process per target; a failure stops the job).
# Jetson artifacts then have their GPU code checked with CUDA's own tools
# (`python -m legoc.targets.cuda`: cuobjdump for cubins, ptxas at the declared ISA for PTX).
# Running aarch64 artifacts is tests/test_emulation.py (qemu); timing them on boards is
# `legoc profile ART --rpc TRACKER:PORT --device-key KEY`.
set -euo pipefail
cd "$(dirname "$0")/.."
LEGOC=${LEGOC:-.venv/bin/legoc}
PY=${PY:-.venv/bin/python}
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore::FutureWarning}  # torch.export chatter, once per module
MODEL=${1:-examples/mnist_resnet.py}
OUT=${2:-out/cross}
shift $(( $# > 2 ? 2 : $# ))
TARGETS=("$@")
if [ ${#TARGETS[@]} -eq 0 ]; then
  mapfile -t TARGETS < <("$LEGOC" targets --names)
fi
mkdir -p "$OUT"
name=$(basename "$MODEL" .py)
jetsons=()
for t in "${TARGETS[@]}"; do
  start=$(date +%s)
  "$LEGOC" compile "$MODEL" --target "$t" -o "$OUT/$name-$t.lego" --no-progress
  echo "cross_compile: $t done in $(( $(date +%s) - start )) s"
  case "$t" in jetson-*) jetsons+=("$OUT/$name-$t.lego");; esac
done
if [ ${#jetsons[@]} -gt 0 ]; then
  "$PY" -m legoc.targets.cuda "${jetsons[@]}"
fi
du -sh "$OUT"/"$name"-*.lego
