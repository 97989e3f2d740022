"""The trainer's per-token logprobs and entropies (`common.completion_logprobs`): computed a block of
positions at a time, forward and backward, and equal to plain autograd on the whole tensor."""

import pytest
import torch
import torch.nn.functional as F

import common
from common.models import _TokenLogps


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("block", [1, 7, 1000])
@pytest.mark.parametrize("T", [0.7, 1.0])  # 1.0 skips the division
def test_blockwise_logps_entropy_and_gradients_equal_autograd(dtype, tol, block, T):
    torch.manual_seed(0)
    N, V = 23, 50
    base = (torch.randn(N, V) * 3).to(dtype)
    targets = torch.randint(0, V, (N,))
    g_lp, g_h = torch.randn(N), torch.randn(N)  # arbitrary upstream gradients (a loss and an entropy bonus)

    ref_logits = base.clone().requires_grad_()
    lp = F.log_softmax(ref_logits.float() / T, dim=-1)
    ref_logps = lp.gather(-1, targets[:, None]).squeeze(-1)
    ref_entropy = -(lp.exp() * lp).sum(-1)
    ((ref_logps * g_lp).sum() + (ref_entropy * g_h).sum()).backward()

    logits = base.clone().requires_grad_()
    logps, entropy = _TokenLogps.apply(logits, targets, T, block, True)
    ((logps * g_lp).sum() + (entropy * g_h).sum()).backward()
    assert torch.allclose(logps, ref_logps.detach(), atol=1e-5) and torch.allclose(entropy, ref_entropy.detach(), atol=1e-5)
    assert logits.grad.dtype == dtype
    assert torch.allclose(logits.grad.float(), ref_logits.grad.float(), atol=tol, rtol=tol)
    # without the entropy: the logprob gradient alone
    logits.grad = None
    logps, _ = _TokenLogps.apply(logits, targets, T, block, False)
    (logps * g_lp).sum().backward()
    ref_logits.grad = None
    lp = F.log_softmax(ref_logits.float() / T, dim=-1)
    (lp.gather(-1, targets[:, None]).squeeze(-1) * g_lp).sum().backward()
    assert torch.allclose(logits.grad.float(), ref_logits.grad.float(), atol=tol, rtol=tol)


def test_completion_logprobs_on_a_model(tiny_model_dir):
    """Through a real model: the same logprobs and gradients as one plain full-size pass."""
    model = common.load_model(tiny_model_dir, torch.device("cpu"))
    prompts, completions = [[1, 2, 3, 4], [5, 6]], [[7, 8, 9], [10, 11, 12, 13, 14]]
    logps, mask, entropy = common.completion_logprobs(model, prompts, completions, 0.8, 0, with_entropy=True)
    (logps.sum() + 0.1 * entropy.sum()).backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    want_lp, want_h = [], []
    for p, c in zip(prompts, completions):  # one sequence at a time, no padding, plain autograd
        logits = model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1 : -1].float() / 0.8
        lp = F.log_softmax(logits, -1)
        want_lp.append(lp.gather(-1, torch.tensor(c)[:, None]).squeeze(-1))
        want_h.append(-(lp.exp() * lp).sum(-1))
    (sum(x.sum() for x in want_lp) + 0.1 * sum(x.sum() for x in want_h)).backward()
    for i, c in enumerate(completions):
        assert torch.allclose(logps[i, : len(c)], want_lp[i], atol=1e-5)
        assert torch.allclose(entropy[i, : len(c)], want_h[i], atol=1e-5)
        assert mask[i].sum() == len(c) and logps[i, len(c):].abs().sum() == 0
    for n, p in model.named_parameters():
        assert torch.allclose(got[n], p.grad, atol=1e-5), n
