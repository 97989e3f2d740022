"""grpo.py: the advantage and loss against hand-computed values; end-to-end runs on the embedded
default (one process and torchrun with two); checkpoints that load; resume that loses nothing."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from common import tis_weights
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


def loss_of(logps, ref, mask, adv, kl_coef, B, n, length_norm="none", num_tokens=0.0, tis=1.0, entropy=None,
            entropy_coef=0.0):
    """`grpo_loss` called by keyword, the test's positional shorthand."""
    entropy = torch.zeros_like(logps) if entropy is None else entropy
    return grpo_loss(logps=logps, ref_logps=ref, mask=mask, token_entropy=entropy, advantages=adv, tis_weights=tis,
                     kl_coef=kl_coef, entropy_coef=entropy_coef, length_norm=length_norm, num_prompts=B,
                     group_size=n, num_tokens=num_tokens)


def test_grpo_loss_by_hand():
    logps = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0, 0.0], [-0.5, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    adv = torch.tensor([2.0, -1.0])
    beta, B, n = 0.1, 1, 2
    loss, stats = loss_of(logps, ref, mask, adv, beta, B, n)
    k3 = lambda d: math.exp(d) - d - 1  # d = ref - logp
    kl = [[k3(-0.5), k3(1.0)], [k3(0.0)]]
    expected = -((2.0 * 2 - beta * sum(kl[0])) + (-1.0 * 1 - beta * sum(kl[1]))) / (B * n)
    assert loss.item() == pytest.approx(expected, rel=1e-6) and stats["loss"] == loss.item()
    assert stats["kl_k3_sum"] == pytest.approx(sum(kl[0]) + sum(kl[1]), rel=1e-6)
    loss.backward()
    # d/dlogp of -(A - β (e^{ref-logp} - (ref-logp) - 1)) / (B n) = -(A + β (e^{ref-logp} - 1)) / (B n)
    g = -(2.0 + beta * (math.exp(-0.5) - 1)) / 2
    assert logps.grad[0, 0].item() == pytest.approx(g, rel=1e-6)
    assert logps.grad[0, 2].item() == 0.0  # padding gets no gradient


def test_length_norms_and_entropy_bonus_by_hand():
    """--length-norm sequence: each sequence's token mean; token: / the step's tokens; --entropy-coef:
    - C Σ_i mean_t H_t / B, with the entropy's gradient."""
    logps = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    adv, B, n = torch.tensor([2.0, -1.0]), 1, 2
    seq, _ = loss_of(logps, None, mask, adv, 0.0, B, n, "sequence")
    assert seq.item() == pytest.approx(-(2.0 * 2 / 2 + -1.0 * 1 / 1) / (B * n))
    tok, _ = loss_of(logps, None, mask, adv, 0.0, B, n, "token", num_tokens=3.0)
    assert tok.item() == pytest.approx(-(2.0 * 2 + -1.0 * 1) / 3)
    entropy = torch.tensor([[0.5, 1.5, 9.0], [2.0, 9.0, 9.0]], requires_grad=True)  # padding must not count
    loss, stats = loss_of(logps, None, mask, adv, 0.0, B, n, entropy=entropy, entropy_coef=0.1)
    bonus = 0.1 * ((0.5 + 1.5) / 2 + 2.0) / B
    assert stats["entropy_bonus"] == pytest.approx(bonus)
    assert loss.item() == pytest.approx(-(2.0 * 2 - 1.0) / 2 - bonus)
    loss.backward()
    assert torch.allclose(entropy.grad, torch.tensor([[-0.05, -0.05, 0.0], [-0.1, 0.0, 0.0]]))


def test_tis_weights_by_hand():
    """Truncated / masked importance sampling against the engine's logprobs, per token or per
    sequence; detached (no gradient through the weight), 0 on padding."""
    logps = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -1.0, 0.0]], requires_grad=True)
    engine = torch.tensor([[-2.0, -1.9, 0.0], [-0.5, -0.2, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    w, capped = tis_weights(logps, engine, mask, 2.0, "token", "truncate")
    e = math.exp
    assert torch.allclose(w, torch.tensor([[2.0, e(-0.1), 0.0], [1.0, e(-0.8), 0.0]])) and capped.sum() == 1
    assert not w.requires_grad
    w, _ = tis_weights(logps, engine, mask, 2.0, "token", "mask")
    assert torch.allclose(w, torch.tensor([[0.0, e(-0.1), 0.0], [1.0, e(-0.8), 0.0]]))
    w, capped = tis_weights(logps, engine, mask, 2.0, "sequence", "truncate")  # exp(0.9) = 2.46 > 2; exp(-0.8)
    assert torch.allclose(w, torch.tensor([[2.0, 2.0, 0.0], [e(-0.8), e(-0.8), 0.0]])) and capped.sum() == 2
    w, _ = tis_weights(logps, engine, mask, 3.0, "sequence", "mask")
    assert torch.allclose(w, torch.tensor([[e(0.9), e(0.9), 0.0], [e(-0.8), e(-0.8), 0.0]]))
    # the weight multiplies the advantage term only; the gradient is w A ∇logp
    loss, _ = loss_of(logps, None, mask, torch.tensor([1.0, 1.0]), 0.0, 1, 1, tis=w)
    loss.backward()
    assert torch.allclose(logps.grad, -w)


def test_all_equal_group_leaves_only_kl():
    logps = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.2, -2.0]])
    adv = group_advantages(torch.tensor([[1.0, 1.0]]), True, 1e-4)[:, :1].flatten()
    loss, _ = loss_of(logps, ref, torch.ones(1, 2), adv, 0.5, 1, 1)
    assert loss.item() == pytest.approx(0.5 * (math.exp(-0.2) + 0.2 - 1), rel=1e-6)
    without_ref, _ = loss_of(logps, None, torch.ones(1, 2), adv, 0.5, 1, 1)
    assert without_ref.item() == 0.0


def check_run(out_dir, steps, world):
    m = metrics(out_dir)
    assert [x["step"] for x in m] == list(range(0, steps + 1))
    assert "eval/accuracy" in m[0] and "eval/accuracy_se" in m[-1]
    for x in m[1:]:
        assert set(KEYS + ["train/kl_k3"]) <= set(x), set(KEYS + ["train/kl_k3"]) - set(x)
        # the generator has exactly the weights being trained (fp32 CPU): the sync is real
        assert x["rollout/logprob_gap_max"] < GAP, x
        assert 0 <= x["rollout/accuracy"] <= 1 and x["rollout/length_mean"] > 0
        assert x["train/kl_k3"] >= 0 and math.isfinite(x["train/loss"])
        # throughput counters: every completion generated, trained on with its prompt
        assert x["perf/rollout_tokens"] == pytest.approx(64 * x["rollout/length_mean"])
        assert x["perf/train_tokens"] > x["perf/rollout_tokens"] and x["perf/peak_memory_gb"] > 0.1
    assert abs(m[1]["train/kl_k3"]) <= KL_TOL  # policy == reference before the first update
    assert m[-1]["train/kl_k3"] > 0.0  # ...and not after


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
        for k in ("train/loss", "train/grad_norm", "train/kl_k3", "rollout/reward_mean", "rollout/entropy"):
            assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-7), k
    run_script("grpo.py", [*args, "--output-dir", str(tmp_path / "one")])
    one, two = metrics(tmp_path / "one")[1], metrics(tmp_path / "run")[1]
    assert (one["rollout/reward_mean"], one["rollout/length_mean"]) == (two["rollout/reward_mean"], two["rollout/length_mean"])


@pytest.mark.slow
def test_tis_with_a_bf16_engine_on_the_cpu(tmp_path):
    """--generator-dtype bfloat16 makes the CPU engine disagree with the fp32 trainer as a GPU does
    (the logprob gap grows from ~1e-6); --tis-cap corrects for it; --length-norm token and the
    entropy bonus log what they add."""
    run_script("grpo.py", ["--num-steps", "2", "--eval-every", "0", "--generator-dtype", "bfloat16", "--tis-cap", "2",
                           "--length-norm", "token", "--entropy-coef", "1e-4", "--output-dir", str(tmp_path / "run"),
                           *SMALL])
    for x in metrics(tmp_path / "run"):
        assert x["rollout/logprob_gap_max"] > 1e-3  # bf16 engine vs fp32 trainer
        assert 0.9 < x["train/tis_weight_mean"] < 1.1 and 0 <= x["train/tis_capped_frac"] < 0.05
        assert x["train/entropy_bonus"] > 0
