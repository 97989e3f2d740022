"""Can the study's regimes improve in this world? The answer-blind criteria of study/DESIGN.md,
measured on a seed policy and a reward model over the validation prompts (never the test split).

Math: the seed's validation accuracy at the evaluation's sampling (T = 0.6, top-p 0.9) in
[0.2, 0.6], and its rollout entropy at T = 1 (the trainer's `rollout/entropy`) at least 0.2 nats
per token. Chat:

- headroom: the seed's true quality at the evaluation's sampling (T = 0.6, top-p 0.9);
- the reward model agrees with true quality: over pairs of the seed's own samples (T = 1, the
  distribution RL asks about) of one prompt whose true quality differs by at least 0.05, the share
  the reward model orders the same way;
- it still rewards length at equal quality, as Athene-RM-8B does: the slope of its score on the
  response's length in characters, with true quality held fixed (least squares within prompts),
  its standard error, and what a character is worth to it in units of true quality (the length
  slope over the quality slope): above 0, but small enough that improving an answer pays more
  than growing it.

    python study/world_check.py                                   # the embedded world
    python study/world_check.py --policy P --reward-model R       # a candidate world
"""

import json
import os
import sys
from dataclasses import dataclass
from itertools import combinations

import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
from embedded.build import rollout_figures  # noqa: E402
from embedded.tiny import chat_quality  # noqa: E402


@dataclass
class Args:
    policy: str = "embedded/policy"
    reward_model: str = "embedded/reward_model"
    prompts: str = "embedded/data/chat_val.jsonl"
    math_prompts: str = "embedded/data/math_val.jsonl"
    samples: int = 8
    """the seed's samples per prompt at T = 1 (the pairs), and at T = 0.6 (the headroom)"""
    max_new_tokens: int = 48
    min_gap: float = 0.05
    """the true-quality difference from which a pair counts"""
    seed: int = 7
    out: str = ""
    """also write the figures here as JSON"""


def slopes(scores: torch.Tensor, quality: torch.Tensor, length: torch.Tensor) -> tuple[float, float, float]:
    """(slope on quality, slope on length, the length slope's standard error) of score, over (P, n)
    tensors: least squares of the within-prompt deviations of score on those of quality and length."""
    y, q, n = (t - t.mean(dim=1, keepdim=True) for t in (scores, quality, length))
    x = torch.stack([q.flatten(), n.flatten()], dim=1).double()
    y = y.flatten().double()
    beta = torch.linalg.lstsq(x, y[:, None]).solution[:, 0]
    resid = y - x @ beta
    dof = y.numel() - scores.shape[0] - 2  # one mean per prompt, two slopes
    cov = torch.linalg.pinv(x.T @ x) * (resid @ resid / max(dof, 1))  # pinv: a degenerate world still reports
    return beta[0].item(), beta[1].item(), cov[1, 1].sqrt().item()


def measure(gen, policy: str, reward_model: str, chat_rows: list[dict], math_rows: list[dict], samples: int = 8,
            seed: int = 7, min_gap: float = 0.05, max_new_tokens: int = 48) -> dict:
    """The world's figures and the design's criteria, with `gen` an engine holding `policy`'s weights."""
    tok = common.load_tokenizer(policy)
    prompts = [r["prompt"] for r in chat_rows]
    ids = common.encode_prompts(tok, prompts)
    evaluation = gen.generate(ids, n=samples, temperature=0.6, top_p=0.9, max_tokens=max_new_tokens, seed=seed)
    own = gen.generate(ids, n=samples, temperature=1.0, top_p=1.0, max_tokens=max_new_tokens, seed=seed + 10**6)
    accuracy, _ = common.mean_and_se(common.eval_math(gen, tok, math_rows, k=16, seed=seed, temperature=0.6,
                                                      top_p=0.9, max_tokens=max_new_tokens))
    model = common.load_model(policy, torch.device("cpu"), trainable=False)
    rollouts = rollout_figures(gen, tok, math_rows, model, seed=seed, n=samples)
    headroom = [chat_quality(p, c.text) for p, o in zip(prompts, evaluation, strict=True) for c in o]
    texts = [[c.text for c in o] for o in own]
    quality = torch.tensor([[chat_quality(p, t) for t in ts] for p, ts in zip(prompts, texts, strict=True)])
    rm = common.RewardModel(reward_model, torch.device("cpu"))
    scores = torch.tensor(rm.score([p for p, ts in zip(prompts, texts, strict=True) for _ in ts],
                                   [t for ts in texts for t in ts])).view(len(prompts), -1)
    agree = pairs = 0
    for i in range(len(prompts)):
        for a, b in combinations(range(samples), 2):
            dq = quality[i, a] - quality[i, b]
            if abs(dq) >= min_gap:
                pairs += 1
                agree += bool((scores[i, a] - scores[i, b]) * dq > 0)
    length = torch.tensor([[float(len(t)) for t in ts] for ts in texts])
    per_quality, slope, se = slopes(scores, quality, length)
    figures = {"seed_true_quality": sum(headroom) / len(headroom), "pairs": pairs,
               "rm_agreement": agree / max(pairs, 1), "rm_length_slope_per_char": slope,
               "rm_length_slope_se": se, "rm_quality_slope": per_quality,
               # what a character of length is worth to the RM, in units of true quality
               "rm_char_in_quality_units": slope / per_quality if per_quality else float("nan"), "rm_quality_correlation":
                   torch.corrcoef(torch.stack([quality.flatten(), scores.flatten()]))[0, 1].item(),
               "math_val_accuracy": accuracy, "math_val_entropy": rollouts["math_rollout_entropy"],
               "math_val_length": rollouts["math_rollout_length"]}
    figures["criteria"] = {  # study/DESIGN.md's, each True when met
        "math accuracy in [0.2, 0.6]": 0.2 <= accuracy <= 0.6,
        "math entropy >= 0.2": rollouts["math_rollout_entropy"] >= 0.2,
        "chat seed quality <= 0.7": figures["seed_true_quality"] <= 0.7,
        "RM agreement >= 0.75": figures["rm_agreement"] >= 0.75,
        "RM length slope > 2 SE": slope > 2 * se,
        "a character worth <= 0.03 quality": 0 < figures["rm_char_in_quality_units"] <= 0.03}
    return figures


def main(args: Args) -> dict:
    gen = common.Generator(args.policy, max_model_len=256, dtype=torch.float32, seed=args.seed)
    figures = {"policy": args.policy, "reward_model": args.reward_model, "prompts": args.prompts} | measure(
        gen, args.policy, args.reward_model, common.load_prompts(args.prompts, task="chat"),
        common.load_prompts(args.math_prompts), args.samples, args.seed, args.min_gap, args.max_new_tokens)
    gen.shutdown()
    print(json.dumps(figures, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(figures, f, indent=1)
    return figures


if __name__ == "__main__":
    main(tyro.cli(Args))
