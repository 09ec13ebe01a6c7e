#!/usr/bin/env bash
# Install, then run the whole test suite (about 6 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
PY=${PYTHON:-python3}
exec "$PY" -m pytest tests -p no:cacheprovider "$@"
