"""A one-minute tour of the plumbing on the embedded default (no GPU, no network):

    python -m common.demo

It samples from the shipped seed policy with the in-process vLLM engine, scores the samples
with both rewards (Math-Verify for math prompts, the shipped reward model for chat prompts),
takes one policy-gradient step on the trainer, and shows the generator's logprobs drifting
from the trainer's until `sync_weights` pushes the new weights: the step every RL regime in
this project repeats, every s steps.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

import common
from common.generation import Generator

ROOT = Path(__file__).resolve().parent.parent
EMBEDDED = ROOT / "embedded"


def logprob_gap(model, tok, prompt_ids, outs, temperature):
    """max |vLLM logprob - trainer logprob| over every sampled token."""
    flat_p = [p for p, o in zip(prompt_ids, outs, strict=True) for _ in o]
    flat_c = [c for o in outs for c in o]
    with torch.no_grad():
        logps, mask, _ = common.completion_logprobs(model, flat_p, [c.token_ids for c in flat_c],
                                                    temperature, tok.pad_token_id)
    vllm = torch.zeros_like(logps)
    for i, c in enumerate(flat_c):
        vllm[i, : len(c.logprobs)] = torch.tensor(c.logprobs)
    return ((logps - vllm).abs() * mask).max().item()


def main():
    torch.manual_seed(0)
    device = torch.device("cpu")
    policy = str(EMBEDDED / "policy")
    tok = common.load_tokenizer(policy)
    model = common.load_model(policy, device)
    rm = common.RewardModel(str(EMBEDDED / "reward_model"), device)
    rows = (common.load_prompts(str(EMBEDDED / "data" / "math_test.jsonl"))[:6]
            + common.load_prompts(str(EMBEDDED / "data" / "chat_test.jsonl"))[:2])
    print(f"loaded {policy} ({sum(p.numel() for p in model.parameters()):,} parameters); "
          "starting the vLLM engine (first start compiles: ~20 s)...", flush=True)
    gen = Generator(policy, max_model_len=256, gpu_memory_utilization=0.15, dtype=torch.float32, seed=0)

    prompt_ids = common.encode_prompts(tok, [r["prompt"] for r in rows])
    outs = gen.generate(prompt_ids, n=4, temperature=1.0, top_p=1.0, max_tokens=48, seed=0)
    rewards = []
    for row, completions in zip(rows, outs, strict=True):
        texts = [c.text for c in completions]
        if row["task"] == "math":
            r = common.math_rewards(texts, [row["answer"]] * len(texts))
        else:
            r = rm.score([row["prompt"]] * len(texts), texts)
        rewards.append(r)
        print(f"\n[{row['task']}] {row['prompt']}" + (f"  (gold {row['answer']})" if row["answer"] else ""))
        for c, ri in zip(completions, r, strict=True):
            print(f"   reward {ri:+.2f}  {c.text!r}")

    print(f"\nlogprob gap vLLM vs trainer, same weights: {logprob_gap(model, tok, prompt_ids, outs, 1.0):.1e}")
    # One REINFORCE step with a per-prompt mean baseline (just to move the weights).
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    flat_p = [p for p, o in zip(prompt_ids, outs, strict=True) for _ in o]
    flat_c = [c.token_ids for o in outs for c in o]
    adv = torch.tensor([ri - sum(r) / len(r) for r in rewards for ri in r])
    logps, mask, _ = common.completion_logprobs(model, flat_p, flat_c, 1.0, tok.pad_token_id)
    (-(adv * (logps * mask).sum(-1)).mean()).backward()
    opt.step()
    outs = gen.generate(prompt_ids, n=4, temperature=1.0, top_p=1.0, max_tokens=48, seed=1)
    print(f"after one optimizer step, before sync:      {logprob_gap(model, tok, prompt_ids, outs, 1.0):.1e}  (stale generator)")
    gen.sync_weights(model)
    outs = gen.generate(prompt_ids, n=4, temperature=1.0, top_p=1.0, max_tokens=48, seed=1)
    print(f"after sync_weights:                         {logprob_gap(model, tok, prompt_ids, outs, 1.0):.1e}  (generator == trainer)")
    gen.shutdown()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
