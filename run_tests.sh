#!/usr/bin/env bash
# Set up .venv with the test extras and run the test suite: ./run_tests.sh [PYTEST ARGS...]
set -euo pipefail
cd "$(dirname "$0")"
scripts/ensure_venv.sh test
exec .venv/bin/python -m pytest -q "$@"
