#!/usr/bin/env bash
# `make demo`: QDIT against a random selection of the same K, trained and evaluated the same way.
#   1. configs/demo.yaml -> runs/demo: ingest, embed, score, QDIT select (alpha sweep), LoRA
#      training, evaluation of the base and the trained model;
#   2. the same config with select.method=random -> runs/demo-random. Its ingest/embed/score
#      directories start as copies of runs/demo's: same config and inputs, so the stage runner
#      skips them (it checks the recorded hashes; change a data setting and they recompute).
#      Its base model is not evaluated again (evaluate.base=false): the report takes the base
#      model's numbers from runs/demo;
#   3. mixray report runs/demo runs/demo-random -> runs/demo-report/report.html (+ report.md),
#      printing the comparison table and the report's path.
# Extra arguments are overrides for both runs (the e2e test shrinks the demo with them).
# MIXRAY (default .venv/bin/mixray) and RUNS (default runs) can be set in the environment.
set -euo pipefail
MIXRAY=${MIXRAY:-.venv/bin/mixray}
RUNS=${RUNS:-runs}
CONFIG="$(dirname "$0")/../configs/demo.yaml"

$MIXRAY run "$CONFIG" run_dir="$RUNS/demo" "$@"
mkdir -p "$RUNS/demo-random"
for stage in ingest embed score; do
  rm -rf "$RUNS/demo-random/$stage"
  cp -r "$RUNS/demo/$stage" "$RUNS/demo-random/$stage"
done
$MIXRAY run "$CONFIG" run_dir="$RUNS/demo-random" select.method=random select.alpha=0.7 \
  evaluate.base=false "$@"
$MIXRAY report "$RUNS/demo" "$RUNS/demo-random" --out "$RUNS/demo-report"
