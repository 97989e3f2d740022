#!/usr/bin/env bash
# The first run on a GPU machine with vLLM (docs/gpu.md has the expected output): the CUDA build,
# the GPU-only tests, the CPU suite's engine and end-to-end tests on the GPU, the trainer's MFU.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRA=gpu bash setup.sh
.venv/bin/python -c "import torch, vllm; print('gpu_check:', torch.cuda.get_device_name(0), 'x', torch.cuda.device_count(), '| torch', torch.__version__, '| vllm', vllm.__version__)"
.venv/bin/python -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py
.venv/bin/python -m pytest -q -p no:cacheprovider tests/test_generation.py tests/test_grpo.py tests/test_dpo.py
.venv/bin/python bench/fsdp_mfu.py
