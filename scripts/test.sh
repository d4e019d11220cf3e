#!/usr/bin/env bash
# Set up the environment and run the whole test suite (what CI runs). Extra arguments go to pytest.
# VENV and MCORE_VERSION choose the environment (see scripts/setup_env.sh; default: .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
EXTRAS="${EXTRAS:-test}" VENV="$VENV" bash scripts/setup_env.sh
"$VENV/bin/ruff" check tiedlora_megatron tests examples benchmarks
exec "$VENV/bin/python" -m pytest -q "$@"
