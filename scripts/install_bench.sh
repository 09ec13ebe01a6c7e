#!/usr/bin/env bash
# The benchmark extra: pytorch-optimizer (SOAP, Shampoo, Muon) for benchmarks/workloads.py's second-order peers.
# --no-deps: it needs only torch >= 2.1 and numpy, which the pinned stack has; pip must never pull another torch.
set -euo pipefail
PY=${PYTHON:-python3}
"$PY" -m pip install -q --no-deps "pytorch-optimizer==4.1.0"
