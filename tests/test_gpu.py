"""What only a GPU can check (skipped without one): bf16 engine and trainer, sleep mode, activation
checkpointing on by default, the bf16 model folder, and two ranks on NCCL when two GPUs are there.
`bash bench/gpu_check.sh` runs these and the GPU benchmarks; docs/gpu.md has the expected output."""

import json

import pytest
import torch

from tests.conftest import GAP, SMALL, metrics, run_script

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("script", ["grpo.py", "online_dpo.py"])
def test_bf16_sleep_mode_and_activation_checkpointing(tmp_path, script):
    out = tmp_path / "run"
    run_script(script, ["--num-steps", "3", "--eval-every", "3", "--vllm-sleep", "--output-dir", str(out), *SMALL])
    m = metrics(out)
    for x in m[1:]:
        assert x["rollout/logprob_gap_max"] < GAP, x  # the sync reached the woken engine, every step
        assert x["perf/peak_memory_gb"] > 0
    config = json.load(open(out / "checkpoint" / "config.json"))
    assert config["dtype"] == "bfloat16"  # the model folder in bf16; the trainer state keeps fp32


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_ranks_on_nccl(tmp_path):
    out = tmp_path / "run"
    run_script("grpo.py", ["--num-steps", "2", "--eval-every", "2", "--output-dir", str(out), *SMALL], nproc=2)
    assert [x["step"] for x in metrics(out)] == [0, 1, 2]
