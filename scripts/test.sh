#!/usr/bin/env bash
# Set up the environment and run the whole test suite (what CI runs). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${EXTRAS:-test}" bash scripts/setup_env.sh
.venv/bin/ruff check tiedlora_megatron tests examples benchmarks
exec .venv/bin/python -m pytest -q "$@"
