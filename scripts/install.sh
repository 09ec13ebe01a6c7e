#!/usr/bin/env bash
# Install lwcompile and its pinned stack. torch==2.13.0 is pinned so pip takes the local CPU wheel and never
# pulls a CUDA build; onnxruntime-training-cpu provides `onnxruntime` itself (never install plain onnxruntime).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if "$PY" -m pip show onnxruntime >/dev/null 2>&1 && ! "$PY" -m pip show onnxruntime-training-cpu >/dev/null 2>&1; then
  echo "plain onnxruntime is installed; it conflicts with onnxruntime-training-cpu: uninstalling it" >&2
  "$PY" -m pip uninstall -y onnxruntime
fi
"$PY" -m pip install -q "torch==2.13.0"
"$PY" -m pip install -q -e ".[test]"
