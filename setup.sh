#!/usr/bin/env bash
# Set up .venv in the repository root with dtvg_scale and everything it needs.
#
#   bash setup.sh
#
# torch comes first and pinned: 2.13.0 (on a machine without CUDA pip takes the local CPU build).
# On a GPU machine, install the CUDA build of torch 2.13.0 matching your driver into .venv first
# (PyTorch's install instructions); this script keeps a torch that is already there.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/python -m pip install -q "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
fi
.venv/bin/python -m pip install -q -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
# DeepSpeed's CPU all-reduce op is compiled once here (~30 s), not by the first launch's ranks.
.venv/bin/python -c "from dtvg_scale.runtime.distributed import build_cpu_ops; build_cpu_ops()"
.venv/bin/python -c "import torch, deepspeed, transformers, dtvg_scale; print('dtvg_scale ready: torch', torch.__version__, '| deepspeed', deepspeed.__version__, '| transformers', transformers.__version__)"
