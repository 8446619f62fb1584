#!/usr/bin/env bash
# Set up .venv and run the main job on the DirectRunner.
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
exec .venv/bin/python -m pipelines.cascade --runner=DirectRunner --config "$profile" "${extra[@]}" "$@"
