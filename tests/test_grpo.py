"""grpo.py: the advantage and loss against hand-computed values; end-to-end runs on the embedded
default (one process and torchrun with two); checkpoints that load; resume that loses nothing."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from grpo import group_advantages, grpo_loss
from tests.conftest import DETERMINISTIC, GAP, KEYS, KL_TOL, ROOT, SMALL, metrics, run_script


def test_group_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 3.0]])
    mean_only = group_advantages(r, std_normalize=False, eps=1e-4)
    assert torch.allclose(mean_only, torch.tensor([[0.5, -0.5, -0.5, 0.5], [0, 0, 0, 0], [-0.75, -0.75, -0.75, 2.25]]))
    normed = group_advantages(r, std_normalize=True, eps=1e-4)
    std0 = math.sqrt((4 * 0.25) / 3)  # unbiased std of [1, 0, 0, 1]
    assert normed[0, 0].item() == pytest.approx(0.5 / (std0 + 1e-4))
    assert torch.equal(normed[1], torch.zeros(4))  # all-equal group: no advantage


def test_grpo_loss_by_hand():
    logps = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0, 0.0], [-0.5, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    adv = torch.tensor([2.0, -1.0])
    beta, B, n = 0.1, 1, 2
    loss, kl_sum = grpo_loss(logps, ref, mask, adv, beta, B, n)
    k3 = lambda d: math.exp(d) - d - 1  # d = ref - logp
    kl = [[k3(-0.5), k3(1.0)], [k3(0.0)]]
    expected = -((2.0 * 2 - beta * sum(kl[0])) + (-1.0 * 1 - beta * sum(kl[1]))) / (B * n)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert kl_sum.item() == pytest.approx(sum(kl[0]) + sum(kl[1]), rel=1e-6)
    loss.backward()
    # d/dlogp of -(A - β (e^{ref-logp} - (ref-logp) - 1)) / (B n) = -(A + β (e^{ref-logp} - 1)) / (B n)
    g = -(2.0 + beta * (math.exp(-0.5) - 1)) / 2
    assert logps.grad[0, 0].item() == pytest.approx(g, rel=1e-6)
    assert logps.grad[0, 2].item() == 0.0  # padding gets no gradient


def test_all_equal_group_leaves_only_kl():
    logps = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.2, -2.0]])
    adv = group_advantages(torch.tensor([[1.0, 1.0]]), True, 1e-4)[:, :1].flatten()
    loss, _ = grpo_loss(logps, ref, torch.ones(1, 2), adv, 0.5, 1, 1)
    assert loss.item() == pytest.approx(0.5 * (math.exp(-0.2) + 0.2 - 1), rel=1e-6)
    without_ref, _ = grpo_loss(logps, None, torch.ones(1, 2), adv, 0.5, 1, 1)
    assert without_ref.item() == 0.0


def check_run(out_dir, steps, world):
    m = metrics(out_dir)
    assert [x["step"] for x in m] == list(range(0, steps + 1))
    assert "eval/accuracy" in m[0] and "eval/accuracy_se" in m[-1]
    for x in m[1:]:
        assert set(KEYS) <= set(x), set(KEYS) - set(x)
        # the generator has exactly the weights being trained (fp32 CPU): the sync is real
        assert x["rollout/logprob_gap_max"] < GAP, x
        assert 0 <= x["rollout/accuracy"] <= 1 and x["rollout/length_mean"] > 0
        assert x["train/kl"] >= 0 and math.isfinite(x["train/loss"])
        # throughput counters: every completion generated, trained on with its prompt
        assert x["perf/rollout_tokens"] == pytest.approx(64 * x["rollout/length_mean"])
        assert x["perf/train_tokens"] > x["perf/rollout_tokens"] and x["perf/peak_memory_gb"] > 0.1
    assert abs(m[1]["train/kl"]) <= KL_TOL  # policy == reference before the first update
    assert m[-1]["train/kl"] > 0.0  # ...and not after


@pytest.mark.slow
def test_end_to_end_one_process(tmp_path, generator):
    out = tmp_path / "run"
    r = run_script("grpo.py", ["--num-steps", "3", "--eval-every", "3", "--save-every", "2", "--output-dir", str(out), *SMALL])
    check_run(out, 3, 1)
    assert "eta" in r.stdout and "completion:" in r.stdout
    # the checkpoint is a Hugging Face folder that transformers and vLLM load as they are
    from transformers import AutoModelForCausalLM

    import common

    ckpt = str(out / "checkpoint")
    assert json.load(open(os.path.join(ckpt, "step.json")))["step"] == 3
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    generator.sync_weights(model)
    tok = common.load_tokenizer(ckpt)
    assert generator.generate(common.encode_prompts(tok, ["What is 1+2?"]), n=1, temperature=1.0,
                              top_p=1.0, max_tokens=8, seed=0)[0][0].token_ids
    # a second run into the same folder is refused unless it resumes
    bad = subprocess.run([sys.executable, "grpo.py", "--output-dir", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "holds a run with a checkpoint" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_end_to_end_torchrun_two_processes(tmp_path):
    """Two FSDP2 ranks; with activation checkpointing (recompute per decoder layer) the same
    numbers as without; and the first step's rollouts the same as one process's (sampling seeds
    follow the prompt's place in the step, not the rank)."""
    args = ["--num-steps", "2", "--eval-every", "2", *SMALL]
    run_script("grpo.py", [*args, "--output-dir", str(tmp_path / "run")], nproc=2)
    check_run(tmp_path / "run", 2, 2)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(tmp_path / "run" / "checkpoint"))
    run_script("grpo.py", [*args, "--activation-checkpointing", "on", "--output-dir", str(tmp_path / "ac")], nproc=2)
    if not DETERMINISTIC:
        return  # the runs ran; their numbers cannot be compared on a GPU
    for x, y in zip(metrics(tmp_path / "run")[1:], metrics(tmp_path / "ac")[1:], strict=True):
        for k in ("train/loss", "train/grad_norm", "train/kl", "rollout/reward_mean", "rollout/entropy"):
            assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-7), k
    run_script("grpo.py", [*args, "--output-dir", str(tmp_path / "one")])
    one, two = metrics(tmp_path / "one")[1], metrics(tmp_path / "run")[1]
    assert (one["rollout/reward_mean"], one["rollout/length_mean"]) == (two["rollout/reward_mean"], two["rollout/length_mean"])
