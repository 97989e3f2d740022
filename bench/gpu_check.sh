#!/usr/bin/env bash
# The first run on a GPU machine (docs/gpu.md has the expected output): the CUDA build, the
# GPU-only tests, the engine and end-to-end tests on the GPU under vLLM's V2 model runner (its GPU
# default) and again under the V1 runner (the one the CPU tests prove), then the trainer's MFU.
# Every step runs whatever an earlier one did; a summary line per step ends the output, so one
# run tells everything that works and everything that does not.
#   bash bench/gpu_check.sh                 # ~10 minutes on one GPU
cd "$(dirname "$0")/.."
PY=.venv/bin/python
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -rs)
summary=()

step() {  # step NAME COMMAND...: run it, record ok / failed (exit status) / skipped (no environment)
  local name=$1
  shift
  echo "== gpu_check: $name"
  if [ "${setup_ok:-1}" = 0 ] && [ "$name" != setup ]; then
    summary+=("skipped  $name (setup failed)")
    return
  fi
  "$@"
  local rc=$?
  if [ $rc = 0 ]; then summary+=("ok       $name"); else summary+=("failed   $name (exit $rc)"); fi
  [ "$name" = setup ] && [ $rc != 0 ] && setup_ok=0
  return 0
}

step setup env EXTRA=gpu bash setup.sh
step device "$PY" -c "import torch, vllm; assert torch.cuda.is_available(), 'no CUDA GPU visible'; print('gpu_check:', torch.cuda.get_device_name(0), 'x', torch.cuda.device_count(), '| torch', torch.__version__, '| vllm', vllm.__version__)"
step "gpu tests (V2 runner)" "${PYTEST[@]}" -m gpu tests/test_gpu.py
step "engine and end-to-end (V2 runner)" "${PYTEST[@]}" tests/test_generation.py tests/test_grpo.py tests/test_dpo.py tests/test_reward_model.py tests/test_logprobs.py
step "sync and sleep (V1 runner)" env VLLM_USE_V2_MODEL_RUNNER=0 "${PYTEST[@]}" tests/test_generation.py tests/test_gpu.py
step "trainer MFU" "$PY" bench/fsdp_mfu.py
step "logprob head memory" "$PY" bench/memory.py --shapes

echo
echo "== gpu_check summary"
printf '%s\n' "${summary[@]}"
