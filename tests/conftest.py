"""Shared fixtures: tiny randomly initialised models built on the spot (no downloads) and one
vLLM engine for the whole session (engine start-up is the slow part on the CPU)."""

import json
import os
import subprocess
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import Qwen2ForCausalLM  # noqa: E402

from embedded.tiny import build_tokenizer, tiny_config  # noqa: E402

# Keep the engine small on the CPU: this is the fraction of the NUMA node's memory vLLM reserves.
GPU_MEMORY_UTILIZATION = 0.15
# The vLLM-vs-trainer logprob gap right after a sync. The scripts: fp32 on the CPU (~1e-6); bf16
# kernels on both sides on a GPU, which differ by up to ~0.1 on rare tokens. An fp32 engine and
# an fp32 trainer (the fixtures here): ~1e-6 on the CPU, TF32-level on a GPU.
GAP = 1e-3 if not torch.cuda.is_available() else 0.1
FP32_GAP = 1e-4 if not torch.cuda.is_available() else 1e-2
# A summed log-ratio that must be 0 (reference == policy): bf16 rounding on a GPU, over ~40 tokens.
SEQ_TOL = 1e-5 if not torch.cuda.is_available() else 1.0
# GRPO's k3 KL at step 1 (policy == reference): exactly 0 on the CPU; on one GPU the fp32 policy
# under bf16 autocast meets a bf16 reference, which differ by rounding.
KL_TOL = 0.0 if not torch.cuda.is_available() else 1e-2
# Two runs compared number for number: the CPU engine is deterministic; vLLM's GPU kernels depend
# on the batch's composition, so on a GPU such a comparison is skipped (the runs still run).
DETERMINISTIC = not torch.cuda.is_available()


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMBEDDED = os.path.join(ROOT, "embedded")


def run_script(script, args, nproc=1, timeout=900):
    """Run `script` from the repo root, on one process or under `torchrun --nproc_per_node`;
    fail the test with the output's tail unless it exits 0."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    cmd = [sys.executable, script, *args]
    if nproc > 1 and torch.cuda.is_available() and torch.cuda.device_count() < nproc:
        pytest.skip(f"{nproc} processes on a GPU machine need {nproc} GPUs (this one has {torch.cuda.device_count()})")
    if nproc > 1:
        env["OMP_NUM_THREADS"] = "1"  # two ranks on two cores
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script, *args]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    return r


# Small held-out evaluations and frequent samples: what the end-to-end tests run with.
SMALL = ["--eval-limit", "16", "--eval-samples", "2", "--log-samples-every", "2"]
# The metrics every online script logs every step (docs/metrics.md).
KEYS = ["step", "train/loss", "train/grad_norm", "train/lr", "rollout/reward_mean",
        "rollout/reward_std", "rollout/accuracy", "rollout/zero_std_frac", "rollout/length_mean",
        "rollout/truncated_frac", "rollout/entropy", "rollout/logprob_gap_max", "rollout/logprob_gap_mean",
        "rollout/policy_lag", "perf/generate_s", "perf/score_s", "perf/train_s", "perf/sync_s", "perf/step_s",
        "perf/rollout_tokens", "perf/train_tokens", "perf/train_completion_tokens", "perf/rollout_tokens_per_s", "perf/train_tokens_per_s",
        "perf/peak_memory_gb"]


def metrics(out_dir):
    """The run's metrics.jsonl, one dict per line."""
    return [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]


def write_jsonl(path, rows):
    """Write `rows` as a jsonl file at `path`; returns `path` as str."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def make_tiny_model(path, seed=0, layers=4):
    """Save a random tiny Qwen2 policy + its tokenizer to `path` (the shipped seed's shapes by
    default, so its weights can be synced into the shared engine); returns `path` as str."""
    tok = build_tokenizer()
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(tiny_config(tok, layers=layers))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny_policy"))


@pytest.fixture(scope="session")
def generator():
    """One engine for the session, started from the shipped seed policy on disk. Tests that need
    other weights of the same shapes push them with `sync_weights` first."""
    from common.generation import Generator

    gen = Generator(os.path.join(EMBEDDED, "policy"), max_model_len=256, gpu_memory_utilization=GPU_MEMORY_UTILIZATION,
                    dtype=torch.float32, seed=0)
    yield gen
    gen.shutdown()
