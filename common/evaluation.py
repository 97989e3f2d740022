"""Held-out evaluation through the generator (vLLM), shared by the scripts and the builder."""

from __future__ import annotations

import math
import random

import torch
import torch.distributed as dist

from common.data import last_boxed
from common.generation import request_seed
from common.models import encode_prompts
from common.rewards import math_rewards
from common.utils import all_reduce


def mean_and_se(xs: list[float]) -> tuple[float, float]:
    """Mean and its standard error (sample std / sqrt(n))."""
    n = len(xs)
    mean = sum(xs) / n
    var = sum((a - mean) ** 2 for a in xs) / max(n - 1, 1)
    return mean, math.sqrt(var / n)


def mean_se_from_sums(n: float, total: float, sq: float) -> tuple[float, float]:
    """Mean and its standard error from a count, a sum and a sum of squares (what ranks reduce)."""
    mean = total / n
    var = max(sq / n - mean**2, 0.0) * n / max(n - 1, 1)
    return mean, math.sqrt(var / n)


def eval_seeds(run_seed: int, stream: int, indices) -> list[int]:
    """One vLLM seed per held-out problem, from its index in the whole held-out set (the same on one
    rank or eight) and a `stream` per use (0 math, 1 chat, 2 a baseline's chat). Keys are odd, the
    training ones even: no two problems, uses or training requests share a sampling stream, so the
    problems are independent, as the standard error assumes."""
    return [request_seed(2 * ((run_seed * 1_000_003 + stream) * 1_000_000 + i) + 1) for i in indices]


def eval_subset(n: int, limit: int) -> list[int]:
    """The indices of the held-out rows an in-training evaluation uses: all of them, or a fixed
    random sample of `limit` (the same for every run and seed, so runs compare; a file's first rows
    are not a random sample of it), in file order."""
    return list(range(n)) if n <= limit else sorted(random.Random(0).sample(range(n), limit))


def eval_math(generator, tokenizer, rows: list[dict], *, k: int, temperature: float, top_p: float,
              max_tokens: int, seed: int | list[int], label: str = "eval") -> list[float]:
    """Per-problem accuracy, each the mean over `k` samples (the paper: T=0.6, top-p 0.9, 50
    samples). `mean_and_se` of the result is the figure to report; under torchrun each rank
    evaluates a shard and the scripts reduce (sum, sum of squares, count)."""
    scores, _ = math_samples(generator, tokenizer, rows, k=k, temperature=temperature, top_p=top_p,
                             max_tokens=max_tokens, seed=seed, label=label)
    return [sum(s) / len(s) for s in scores]


def math_samples(generator, tokenizer, rows: list[dict], *, k: int, temperature: float, top_p: float,
                 max_tokens: int, seed: int | list[int], label: str = "eval"):
    """`k` samples per problem: (each problem's k scores, each problem's k final answers: the
    text of the completion's last `\\boxed{}`, whitespace removed, or None)."""
    outs = generator.generate(encode_prompts(tokenizer, [r["prompt"] for r in rows]), n=k,
                              temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed,
                              label=label)
    scores = math_rewards([c.text for o in outs for c in o], [r["answer"] for r in rows for _ in range(k)])
    answers = [[None if (b := last_boxed(c.text)) is None else "".join(b.split()) for c in o] for o in outs]
    return [scores[i * k : (i + 1) * k] for i in range(len(rows))], answers


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of a problem with `c` correct of `n` samples: the chance that k samples
    drawn without replacement hold a correct one, 1 - C(n - c, k) / C(n, k) (Chen et al. 2021)."""
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_correct(scores: list[float], answers: list[str | None]) -> float:
    """maj@k of one problem: the score of the most frequent final answer among its samples (ties:
    the one seen first; samples without a final answer do not vote; none: 0)."""
    votes = [a for a in answers if a is not None]
    if not votes:
        return 0.0
    top = max(votes, key=lambda a: (votes.count(a), -votes.index(a)))
    return scores[answers.index(top)]


def eval_chat(generator, tokenizer, reward_model, rows: list[dict], *, k: int, temperature: float,
              top_p: float, max_tokens: int, seed: int | list[int], label: str = "eval"):
    """(P, k) reward-model scores, (P, k) lengths in tokens and the P lists of k texts of `k`
    samples per chat prompt, scored in one batched reward-model call."""
    outs = generator.generate(encode_prompts(tokenizer, [r["prompt"] for r in rows]), n=k,
                              temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed,
                              label=label)
    generator.sleep()  # CRUCIAL with --vllm-sleep (and --rm-offload): the reward model needs that memory
    scores = reward_model.score([r["prompt"] for r in rows for _ in range(k)], [c.text for o in outs for c in o])
    lengths = [len(c.token_ids) for o in outs for c in o]
    texts = [[c.text for c in o] for o in outs]
    return torch.tensor(scores).view(-1, k), torch.tensor(lengths, dtype=torch.float).view(-1, k), texts


def evaluate_policy(generator, policy, tokenizer, reward_model, rows: list[dict], args) -> dict:
    """A training script's `eval/*` (`evaluate`, with its flags' settings) of the weights being
    trained: synced into the generator first (never a stale one), the engine asleep again after
    (CRUCIAL with --vllm-sleep: the update needs that memory)."""
    run = args.run
    generator.sync_weights(policy)
    metrics = evaluate(generator, tokenizer, reward_model, rows, k=run.eval_samples,
                       temperature=run.eval_temperature, top_p=run.eval_top_p,
                       max_tokens=args.max_new_tokens, seed=args.seed, limit=run.eval_limit)
    generator.sleep()
    return metrics


def evaluate(generator, tokenizer, reward_model, rows: list[dict], *, k: int, temperature: float,
             top_p: float, max_tokens: int, seed: int, limit: int) -> dict[str, float]:
    """The `eval/*` metrics of held-out rows (per task, all of them or a fixed random `limit` of
    them: `eval_subset`), sharded over ranks and reduced, from `k` samples per prompt with the
    generator's current weights, each problem with its own sampling seeds (`eval_seeds`):
    math -> `eval/accuracy` (mean per-problem accuracy), `eval/accuracy_se`, `eval/problems`;
    chat -> `eval/chat/reward_mean` (reward-model score) with `_se`, `eval/chat/length_mean`
    (tokens) and `eval/chat/reward_per_token` (mean reward / mean length: the paper picked chat
    checkpoints by it, because the RM rewards length)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    by_task = {task: [r for r in rows if r["task"] == task] for task in ("math", "chat")}
    mine = {task: eval_subset(len(rs), limit)[rank::world] for task, rs in by_task.items()}  # indices
    math_rows, chat_rows = ([by_task[t][i] for i in mine[t]] for t in ("math", "chat"))
    sampling = {"k": k, "temperature": temperature, "top_p": top_p, "max_tokens": max_tokens}
    accs = eval_math(generator, tokenizer, math_rows, seed=eval_seeds(seed, 0, mine["math"]), **sampling) \
        if math_rows else []
    chat_rewards, chat_lengths = torch.zeros(0), torch.zeros(0)
    if chat_rows:
        scores, lengths, _ = eval_chat(generator, tokenizer, reward_model, chat_rows, seed=eval_seeds(seed, 1, mine["chat"]),
                                       **sampling)
        chat_rewards, chat_lengths = scores.mean(dim=1), lengths.mean(dim=1)  # (P,) per prompt
    s = all_reduce({"n": len(accs), "sum": sum(accs), "sq": sum(a * a for a in accs),
                    "chat_n": len(chat_rewards), "chat_sum": chat_rewards.sum().item(),
                    "chat_sq": (chat_rewards**2).sum().item(), "chat_tokens": chat_lengths.sum().item()})
    out = {"eval/samples": k} if s["n"] or s["chat_n"] else {}
    if s["n"]:
        out["eval/accuracy"], out["eval/accuracy_se"] = mean_se_from_sums(s["n"], s["sum"], s["sq"])
        out["eval/problems"] = int(s["n"])
    if s["chat_n"]:
        out["eval/chat/reward_mean"], out["eval/chat/reward_mean_se"] = mean_se_from_sums(s["chat_n"], s["chat_sum"], s["chat_sq"])
        out["eval/chat/length_mean"] = s["chat_tokens"] / s["chat_n"]
        out["eval/chat/prompts"] = int(s["chat_n"])
        out["eval/chat/reward_per_token"] = out["eval/chat/reward_mean"] / max(out["eval/chat/length_mean"], 1)
    return out


def eval_line(m: dict) -> str:
    """The human-readable part of a step line for the `eval/*` keys in `m`."""
    parts = []
    if "eval/accuracy" in m:
        parts.append(f"eval accuracy {m['eval/accuracy']:.3f} ± {m['eval/accuracy_se']:.3f} "
                     f"({m['eval/problems']} problems x {m['eval/samples']})")
    if "eval/chat/reward_mean" in m:
        parts.append(f"eval chat reward {m['eval/chat/reward_mean']:.3f} (len {m['eval/chat/length_mean']:.1f}, "
                     f"{m['eval/chat/prompts']} prompts x {m['eval/samples']})")
    return " | ".join(parts)
