#!/usr/bin/env bash
# Create .venv if missing and install the project into it from its own pyproject.toml.
# Usage: scripts/ensure_venv.sh [EXTRAS]   (e.g. "test"); reinstalls when pyproject.toml is newer.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
venv="${VENV:-.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
stamp="$venv/.installed${extras:+-$extras}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    "$venv/bin/python" -m pip install --quiet --editable ".${extras:+[$extras]}"
    touch "$stamp"
fi
