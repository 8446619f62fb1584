#!/usr/bin/env bash
# Set up .venv and run the main job on the DirectRunner's engine (FnApiRunner) in this process, one worker
# thread per core sharing one copy of each model (WORKERS=N to change the count; WORKERS=1: one worker;
# MODE=multi_processing: one worker process per core instead, each loading the models). The threads run
# in Beam's in_memory mode, not multi_threading, whose gRPC data plane can lose records (docs/RUNNERS.md).
#   ./run_local.sh                        the demo profile (configs/demo.yaml) over the embedded demo pictures:
#                                         Lite0 -> Lite2 under a compute budget, its agreement with Lite2 measured
#   ./run_local.sh PROFILE [ARGS...]      a profile of configs/ (e.g. lite_cascade, video_frames), then arguments
#   ./run_local.sh --input 'imgs/*.jpg' --output out/mine stages.0.threshold=0.5   (lite_cascade on your images)
# Without --output the run writes to out/<profile>/, replacing that folder's previous demo outputs.
set -euo pipefail
cd "$(dirname "$0")"
scripts/ensure_venv.sh
profile=lite_cascade
[[ " $* " == *" --input"* ]] || profile=demo  # no input: the embedded demo, with the profile made for it
if [ $# -gt 0 ] && [[ "$1" != -* ]] && [[ "$1" != *=* ]]; then profile="$1"; shift; fi
extra=()
[[ " $* " == *" --output"* ]] || extra=(--output "out/$profile" --overwrite)
workers=${WORKERS:-$(nproc)}
runner=(--runner=FnApiRunner)
[ "$workers" -gt 1 ] && runner+=("--direct_running_mode=${MODE:-in_memory}" "--direct_num_workers=$workers")
exec .venv/bin/python -m pipelines.cascade "${runner[@]}" --config "$profile" "${extra[@]}" "$@"
