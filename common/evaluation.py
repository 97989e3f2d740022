"""Held-out evaluation through the generator (vLLM), shared by the scripts and the builder."""

from __future__ import annotations

import math

from common.models import encode_prompts
from common.rewards import math_rewards


def mean_and_se(xs: list[float]) -> tuple[float, float]:
    """Mean and its standard error (sample std / sqrt(n))."""
    n = len(xs)
    mean = sum(xs) / n
    var = sum((a - mean) ** 2 for a in xs) / max(n - 1, 1)
    return mean, math.sqrt(var / n)


def eval_math(generator, tokenizer, rows: list[dict], *, k: int, temperature: float, top_p: float,
              max_tokens: int, seed: int) -> list[float]:
    """Per-problem accuracy, each the mean over `k` samples (the paper: T=0.6, top-p 0.9, 50
    samples). `mean_and_se` of the result is the figure to report; under torchrun each rank
    evaluates a shard and the scripts reduce (sum, sum of squares, count)."""
    outs = generator.generate(encode_prompts(tokenizer, [r["prompt"] for r in rows]), n=k,
                              temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed)
    per_problem = []
    for row, completions in zip(rows, outs, strict=True):
        scores = math_rewards([c.text for c in completions], [row["answer"]] * len(completions))
        per_problem.append(sum(scores) / len(scores))
    return per_problem
