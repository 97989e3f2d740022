#!/usr/bin/env bash
# The first run on a GPU machine (docs/gpu.md has the expected output): the CUDA build, the
# GPU-only tests, the engine and end-to-end tests on the GPU under vLLM's V2 model runner (its GPU
# default) and again under the V1 runner (the one the CPU tests prove), then the trainer's MFU.
# Every step runs whatever an earlier one did; a summary line per step ends the output, so one
# run tells everything that works and everything that does not; it exits 1 if any step failed.
#   bash bench/gpu_check.sh                 # ~10 minutes on one GPU
#   bash bench/gpu_check.sh --trainer-only  # a machine with CUDA torch and transformers alone (no vLLM,
#                                           # no network): the trainer's half, bench/gpu_trainer_check.py
cd "$(dirname "$0")/.."
GIVEN_PY=${PY:-}  # --trainer-only: the machine's own interpreter, PY=... or python3
PY=.venv/bin/python
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -rs)
summary=()
SUMMARY=${GPU_CHECK_SUMMARY:-bench/results/gpu_check_summary.txt}  # the summary lines, also written here

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

finish() {  # the exit status: 1 when a step failed (a skipped step is not a failure), else 0
  for line in "${summary[@]}"; do [[ $line == failed* ]] && exit 1; done
  exit 0
}

if [ "${1:-}" = --trainer-only ]; then
  # The interpreter that has torch and transformers (the machine's own); the pure-Python rest from
  # bench/wheels/ (bash bench/fetch_trainer_wheels.sh, where there is network) into build/trainer_deps.
  PY=${GIVEN_PY:-python3}
  PYTEST=("$PY" -m pytest -q -p no:cacheprovider -rs)
  export PYTHONPATH="$PWD/build/trainer_deps${PYTHONPATH:+:$PYTHONPATH}"
  wheels() {
    if "$PY" -c "import tyro, math_verify" 2>/dev/null; then echo "the trainer's packages import already"; return 0; fi
    [ -d bench/wheels ] || { echo "no bench/wheels/: run bash bench/fetch_trainer_wheels.sh where there is network"; return 3; }
    "$PY" -m pip install --quiet --no-index --no-deps --find-links bench/wheels --target build/trainer_deps \
      -r bench/trainer_wheels.txt
  }
  step setup wheels
  step device "$PY" -c "import torch, transformers; print('gpu_check:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA GPU', '| torch', torch.__version__, '| transformers', transformers.__version__)"
  # the tests that need no engine: the blockwise head, frozen models' exact buffers, long positions
  step "tests without an engine" "${PYTEST[@]}" tests/test_logprobs.py tests/test_numerics.py \
    -k "blockwise or exact_buffers or long_positions or renders"
  step "trainer check" "$PY" bench/gpu_trainer_check.py "${@:2}"
  summary+=("skipped  engine, sync, sleep mode, end-to-end (vLLM not installed: the full check, without --trainer-only)")
  echo
  echo "== gpu_check summary (figures: bench/results/gpu_trainer_check.md)"
  printf '%s\n' "${summary[@]}" | tee "$SUMMARY"
  finish
fi

step setup env EXTRA=gpu bash setup.sh
step device "$PY" -c "import torch, vllm; assert torch.cuda.is_available(), 'no CUDA GPU visible'; print('gpu_check:', torch.cuda.get_device_name(0), 'x', torch.cuda.device_count(), '| torch', torch.__version__, '| vllm', vllm.__version__)"
step "gpu tests (V2 runner)" "${PYTEST[@]}" -m gpu tests/test_gpu.py
step "engine and end-to-end (V2 runner)" "${PYTEST[@]}" tests/test_generation.py tests/test_grpo.py tests/test_dpo.py tests/test_reward_model.py tests/test_logprobs.py
step "sync and sleep (V1 runner)" env VLLM_USE_V2_MODEL_RUNNER=0 "${PYTEST[@]}" tests/test_generation.py tests/test_gpu.py
step "trainer MFU" "$PY" bench/fsdp_mfu.py
step "logprob head memory" "$PY" bench/memory.py --shapes

echo
echo "== gpu_check summary"
printf '%s\n' "${summary[@]}" | tee "$SUMMARY"
finish
