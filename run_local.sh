#!/usr/bin/env bash
# Set up .venv and run the main job on the DirectRunner's engine (FnApiRunner) in this process, one worker
# thread per core sharing one copy of each model (WORKERS=N to change the count; WORKERS=1: one worker;
# MODE=multi_processing: one worker process per core instead, each loading the models). The threads run
# in Beam's in_memory mode, not multi_threading, whose gRPC data plane can lose records (docs/RUNNERS.md).
#   ./run_local.sh                        the Lite0 -> Lite1 -> Lite2 cascade over the embedded demo photos
#   ./run_local.sh PROFILE [ARGS...]      a profile of configs/ (e.g. video_frames), then pipeline arguments
#   ./run_local.sh --input 'imgs/*.jpg' --output out/mine stages.0.threshold=0.5
# Without --output the run writes to out/<profile>/, replacing that folder's previous demo outputs.
set -euo pipefail
cd "$(dirname "$0")"
scripts/ensure_venv.sh
profile=lite_cascade
if [ $# -gt 0 ] && [[ "$1" != -* ]] && [[ "$1" != *=* ]]; then profile="$1"; shift; fi
extra=()
[[ " $* " == *" --output"* ]] || extra=(--output "out/$profile" --overwrite)
workers=${WORKERS:-$(nproc)}
runner=(--runner=FnApiRunner)
[ "$workers" -gt 1 ] && runner+=("--direct_running_mode=${MODE:-in_memory}" "--direct_num_workers=$workers")
exec .venv/bin/python -m pipelines.cascade "${runner[@]}" --config "$profile" "${extra[@]}" "$@"
