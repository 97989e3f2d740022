"""Step bookkeeping that is the same in all four scripts and is not the algorithm: phase timers,
the `rollout/*` and `perf/*` metrics, and the vLLM-vs-trainer logprob gap. The `train/*` metrics
are each regime's own and stay in its script.

Every metric is reduced over ranks as sums (or maxima) first and turned into ratios after, so
ranks holding different numbers of math rows, tokens or pairs are weighted correctly.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch
import torch.distributed as dist

from common.evaluation import eval_line
from common.utils import all_reduce, peak_memory_gb


class PhaseTimer:
    """Seconds per phase of one step: `with timer("generate"): ...`; `timer.s["generate"]`. The
    four phases of the spectrum start at 0, so a step that skips one (semi-online between syncs,
    offline DPO) still logs it."""

    def __init__(self):
        self.start, self.s = time.time(), dict.fromkeys(("sync", "generate", "score", "train"), 0.0)

    @contextmanager
    def __call__(self, phase: str):
        t0 = time.time()
        yield
        self.s[phase] = self.s.get(phase, 0.0) + time.time() - t0

    def total(self) -> float:
        return time.time() - self.start


def engine_logprobs(completions, like: torch.Tensor) -> torch.Tensor:
    """(B, T) the engine's (vLLM's) logprob of each sampled token, laid out like the trainer's
    `completion_logprobs` (0 on padding)."""
    out = torch.zeros(like.shape, dtype=torch.float32)
    for i, c in enumerate(completions):
        out[i, : len(c.logprobs)] = torch.tensor(c.logprobs)
    return out.to(like.device)


def tis_weights(
    logps, engine_logps, mask, cap: float, level: str, mode: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, T) importance weights w = exp(log π_θ - log π_vLLM) of the sampled tokens, per token or
    per sequence (summed log-ratio), truncated (min(w, cap)) or masked (0 above cap); detached (a
    correction of the sampling distribution). Returns (weights, the mask of the tokens capped)."""
    log_w = (logps.detach() - engine_logps) * mask  # (S, T)
    if level == "sequence":
        log_w = log_w.sum(-1, keepdim=True).expand_as(log_w)
    w = log_w.exp()
    capped = w.clamp(max=cap) if mode == "truncate" else torch.where(w <= cap, w, 0.0)
    return capped * mask, (w > cap) * mask


def logprob_gap(logps: torch.Tensor, mask: torch.Tensor, completions) -> tuple[float, float]:
    """(sum, max) over tokens of |trainer logprob - vLLM's logprob| of each sampled token, for a
    (B, T) micro-batch. ~0 right after a sync: the proof that the sync worked; between syncs it
    grows with the policy lag (how stale the generator's samples are)."""
    gap = (logps.detach() - engine_logprobs(completions, logps)).abs() * mask
    return gap.sum().item(), gap.max().item() if gap.numel() else 0.0


def update_stats(
    logps: torch.Tensor,
    mask: torch.Tensor,
    entropy: torch.Tensor,
    prompts: list[list[int]],
    completions,
) -> dict[str, float]:
    """What every regime keeps from one micro-batch of its update for the metrics (besides its
    loss): its completion tokens and their entropy, the tokens it ran on (prompts too) and, when
    the completions carry the engine's logprobs, the logprob gap to the engine that sampled them
    (offline_dpo.py's pairs do not)."""
    stats = {
        "tokens": mask.sum().item(),
        "entropy_sum": entropy.sum().item(),
        "train_tokens": sum(
            len(p) + len(c.token_ids) for p, c in zip(prompts, completions, strict=True)
        ),
    }
    if any(
        c.logprobs for c in completions
    ):  # ~0 right after a sync, then growing with the policy lag
        stats["gap_sum"], stats["gap_max"] = logprob_gap(logps, mask, completions)
    return stats


def add_up(stats: list[dict[str, float]]) -> dict[str, float]:
    """This rank's sums over its update's micro-batches (in their order) of every key they hold
    (the loss and `update_stats`' keys even with none). Every rank runs as many micro-batches
    (`micro_batches`; a padding pass keeps zeros), so every rank sums the same keys."""
    keys = dict.fromkeys(
        ["loss", "tokens", "entropy_sum", "train_tokens"] + [k for s in stats for k in s]
    )
    return {key: sum((s[key] for s in stats), 0.0) for key in keys}


def rollout_sums(
    batch: list[dict], outs, rewards: torch.Tensor, nonfinite: torch.Tensor, reward_model=None
) -> dict[str, float]:
    """This rank's sums behind the `rollout/*` metrics of a step's (P, n) rollouts (and the
    `perf/rollout_tokens` they took to generate), and the rows its reward model has cut so far."""
    lengths = torch.tensor(
        [[len(c.token_ids) for c in o] for o in outs], dtype=torch.float
    )  # (P, n)
    sums = {
        "reward_sum": rewards.sum().item(),
        "reward_sq": (rewards**2).sum().item(),
        "samples": rewards.numel(),
        "zero_std": (rewards.std(dim=1) == 0).sum().item(),
        "groups": len(batch),
        "nonfinite": nonfinite.sum().item(),
        "truncated": sum(c.finish_reason == "length" for o in outs for c in o),
        "completion_tokens": lengths.sum().item(),
    }
    for task in ("math", "chat"):  # per task: a mixed batch's rewards are on different scales
        rows_t = torch.tensor([r["task"] == task for r in batch], dtype=torch.bool)
        sums |= {
            f"{task}_reward": rewards[rows_t].sum().item(),
            f"{task}_samples": rewards[rows_t].numel(),
            f"{task}_tokens": lengths[rows_t].sum().item(),
        }
    sums["rollout_tokens"] = sums["completion_tokens"]
    sums["rm_truncated"] = (
        reward_model.truncated if reward_model is not None else 0
    )  # since the start
    return sums


def pair_sums(
    pairs: list[tuple[int, int, int]], rewards: torch.Tensor, tasks: list[str]
) -> dict[str, float]:
    """This rank's sums of a DPO step's pairs (prompt j, chosen i, rejected i) for the `train/*`
    metrics: their count, per task, and the reward margins."""
    margins = [rewards[j, c] - rewards[j, r] for j, c, r in pairs]
    sums = {"pairs": len(pairs), "reward_margin": float(sum(margins))}
    return sums | {f"{t}_pairs": sum(tasks[j] == t for j, _, _ in pairs) for t in ("math", "chat")}


def reduce_step(sums: dict[str, float], stats: list[dict[str, float]], device: torch.device):
    """All-reduce a step's sums and maxima over ranks (the largest logprob gap of the update's
    micro-batches, where they measured it, and the peak memory). The sums come back as a
    `defaultdict`: a sum no micro-batch added to (a step without any) reads 0."""
    maxes = {"memory": peak_memory_gb(device)}
    if any("gap_max" in s for s in stats):
        maxes["gap_max"] = max(s["gap_max"] for s in stats if "gap_max" in s)
    return defaultdict(float, all_reduce(sums)), all_reduce(maxes, op="max")


def rollout_metrics(s: dict[str, float]) -> dict[str, float]:
    """`rollout/*` from reduced `rollout_sums` (keys per task only for the tasks in the step)."""
    reward_mean = s["reward_sum"] / s["samples"]
    m = {
        "rollout/reward_mean": reward_mean,
        "rollout/reward_std": max(s["reward_sq"] / s["samples"] - reward_mean**2, 0.0) ** 0.5,
        "rollout/accuracy": s["math_reward"] / s["math_samples"]
        if s["math_samples"]
        else float("nan"),
        "rollout/zero_std_frac": s["zero_std"] / s["groups"],
        "rollout/nonfinite_groups": s["nonfinite"],
        "rollout/length_mean": s["completion_tokens"] / s["samples"],
        "rollout/truncated_frac": s["truncated"] / s["samples"],
    }
    for task, key in (("math", "accuracy"), ("chat", "reward_mean")):
        if s[f"{task}_samples"]:
            m[f"rollout/{task}/{key}"] = s[f"{task}_reward"] / s[f"{task}_samples"]
            m[f"rollout/{task}/length_mean"] = s[f"{task}_tokens"] / s[f"{task}_samples"]
    if s[
        "chat_samples"
    ]:  # the paper picked chat checkpoints by this: its reward model favours length
        m["rollout/chat/reward_per_token"] = m["rollout/chat/reward_mean"] / max(
            m["rollout/chat/length_mean"], 1
        )
        m["rollout/chat/rm_truncated"] = s.get(
            "rm_truncated", 0
        )  # rows cut to --rm-max-length so far
    return m


def trainer_metrics(
    s: dict[str, float], s_max: dict[str, float], timer: PhaseTimer
) -> dict[str, float]:
    """What the update measured on the sampled tokens (`rollout/entropy`, the logprob gap) and
    `perf/*`: seconds per phase, token counts and rates, peak memory."""
    m = {"rollout/entropy": s["entropy_sum"] / max(s["tokens"], 1)}
    if "gap_max" in s_max:
        m |= {
            "rollout/logprob_gap_max": s_max["gap_max"],
            "rollout/logprob_gap_mean": s["gap_sum"] / max(s["tokens"], 1),
        }
    m |= {f"perf/{phase}_s": sec for phase, sec in timer.s.items()}
    m["perf/step_s"] = timer.total()
    for kind, phase in (("rollout", "generate"), ("train", "train")):
        if f"{kind}_tokens" in s:
            m[f"perf/{kind}_tokens"] = s[f"{kind}_tokens"]
            m[f"perf/{kind}_tokens_per_s"] = (
                s[f"{kind}_tokens"] / timer.s[phase] if s[f"{kind}_tokens"] else float("nan")
            )
    m["perf/train_completion_tokens"] = s["tokens"]  # the LM head runs on these alone
    m["perf/peak_memory_gb"] = s_max["memory"]
    return m


class Progress:
    """The record and console of a run's steps (`step` on every rank: it gathers the completions):
    rank 0 logs each step's metrics and prints one line with an honest ETA (the rate of the steps
    this process has run, their evaluations included, the step-0 evaluation not), a few prompts,
    completions and rewards every `--log-samples-every` steps, and writes every
    `--completions-every` steps' prompts, completions, rewards and pairs or advantages (every
    rank's) to completions.jsonl (and a W&B table when tracked)."""

    def __init__(self, args, logger):
        self.num_steps, self.logger, self.t0, self.done = args.num_steps, logger, time.time(), 0
        self.samples_every, self.completions_every = (
            args.run.log_samples_every,
            args.run.completions_every,
        )

    def step_zero(self, eval_metrics: dict) -> None:
        """The evaluation before training: logged (rank 0) and printed as step 0."""
        if self.logger is not None:
            self.logger.log({"step": 0, **eval_metrics})
            print("step 0 | " + eval_line(eval_metrics), flush=True)
        self.t0 = time.time()  # the ETA counts the training steps' rate, not this evaluation

    def step(
        self,
        m: dict,
        batch: list[dict],
        outs,
        rewards: torch.Tensor,
        *,
        pairs: list[tuple[int, int, int]] | None = None,
        advantages: torch.Tensor | None = None,
    ) -> None:
        """Log step `m` (rank 0) with its (P, n) rollouts: each rank's `batch` rows, `outs`,
        `rewards`, and DPO's `pairs` (prompt j, chosen i, rejected i) or GRPO's (P, n)
        `advantages`."""
        step = m["step"]
        if self.completions_every and step % self.completions_every == 0:
            records = completion_records(step, batch, outs, rewards, pairs, advantages)
            if (
                dist.is_initialized() and dist.get_world_size() > 1
            ):  # every rank's rows, rank 0 writes
                every = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
                dist.gather_object(records, every, dst=0)
                records = [r for rs in every or [] for r in rs]
            if self.logger is not None:
                self.logger.log_completions(step, records)
        if self.logger is None:
            return
        self.logger.log(m)
        self.done += 1
        eta = (time.time() - self.t0) / self.done * (self.num_steps - step)
        parts = [f"step {step}/{self.num_steps}", f"loss {m['train/loss']:+.4f}"]
        for key, label, fmt in (
            ("rollout/reward_mean", "reward", ".3f"),
            ("train/pairs", "pairs", ".0f"),
            ("train/kl_k1", "kl", ".2e"),
            ("train/kl_k3", "kl", ".2e"),
            ("rollout/length_mean", "len", ".1f"),
            ("rollout/logprob_gap_max", "gap", ".1e"),
        ):
            if key in m:
                parts.append(f"{label} {m[key]:{fmt}}")
        parts += [f"{m['perf/step_s']:.2f} s/step", f"eta {eta / 60:.1f} min"]
        if any(k.startswith("eval/") for k in m):
            parts.append(eval_line(m))
        print(" | ".join(parts), flush=True)
        if self.samples_every and step % self.samples_every == 0:
            for j in range(min(2, len(batch))):
                print(
                    f"    prompt: {str(batch[j]['prompt'])[:200]!r}\n"
                    f"    completion: {outs[j][0].text[:300]!r}"
                    f"\n    reward: {rewards[j, 0].item():.3f}",
                    flush=True,
                )


def completion_records(
    step: int,
    batch: list[dict],
    outs,
    rewards: torch.Tensor,
    pairs=None,
    advantages: torch.Tensor | None = None,
) -> list[dict]:
    """One JSON-ready record per prompt of a step: its task, prompt (and math answer), its n
    completions with their rewards, lengths (tokens) and finish reasons, and what the update made of
    them: DPO's pairs as [chosen, rejected] completion indices, or GRPO's advantages."""
    records = []
    for j, (row, o) in enumerate(zip(batch, outs, strict=True)):
        record = {"step": step, "task": row["task"], "prompt": row["prompt"]}
        if row.get("answer") is not None:
            record["answer"] = row["answer"]
        record |= {
            "completions": [c.text for c in o],
            "rewards": rewards[j].tolist(),
            "lengths": [len(c.token_ids) for c in o],
            "finish_reasons": [c.finish_reason for c in o],
        }
        if pairs is not None:
            record["pairs"] = [[c, r] for k, c, r in pairs if k == j]
        if advantages is not None:
            record["advantages"] = advantages[j].tolist()
        records.append(record)
    return records
