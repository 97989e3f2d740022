"""GRPO, the on-policy end of the spectrum (sync interval s = 1), as in Lanchantin et al. 2025.

Every step:
1. sync: push the trainer's weights into the vLLM generator, before every generation (s = 1);
2. rollout: sample `samples_per_prompt` completions for each of this rank's prompts;
3. score: each row by its task's function in `REWARDS` (Math-Verify; the reward model for chat);
4. advantages: A_i = (r_i - mean(group)) / (std(group) + eps) within each prompt's group (the
   authors' code; the paper's formula is mean-only: `--no-std-normalize`);
5. update: one optimizer step on -(1/B) Σ_prompts (1/n) Σ_i Σ_t [ρ_t A_i - β KL_t] (token sums;
   ρ_t = 1 on-policy: PPO's clipping would never trigger; KL_t the k3 estimator to the seed);
6. log one metrics dict, evaluate every `eval_every` steps, checkpoint every `save_every`.

Where the paper is silent: constant learning rate after a linear warm-up; a mixed math + chat
batch scores each prompt by its own task's reward. Not deterministic: vLLM on GPU.

Run:
    python grpo.py                                          # embedded default, CPU, a few minutes
    torchrun --standalone --nproc_per_node=2 grpo.py        # 2 processes (CPU: gloo; GPU: NCCL)
    torchrun --nproc_per_node 8 grpo.py \\                  # the paper's math run (Llama-3.1-8B)
        --model meta-llama/Llama-3.1-8B-Instruct --chat-template llama3-no-system \\
        --dataset AI-MO/NuminaMath-CoT --paper-math-filter \\
        --eval-dataset HuggingFaceH4/MATH-500 --eval-split test --num-steps 1000 \\
        --prompts-per-step 64 --samples-per-prompt 8 --max-new-tokens 2048 --max-model-len 4096 \\
        --learning-rate 1e-6 --adam-eps 1e-8 --max-grad-norm 0.1 --kl-coef 0.001 \\
        --micro-batch-size 4 --vllm-sleep  # the chat run: docs/gpu.md

Differs from `online_dpo.py` in: the objective (group advantages and a policy-gradient loss on
every sample instead of one chosen/rejected pair per prompt) and the fixed reference.
"""

import functools
import os
import time
from dataclasses import dataclass, field
from typing import Literal

import torch
import tyro

import common


# ---- Args -------------------------------------------------------------------------------------
@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (run folder and wandb run name)"""
    seed: int = 1
    """seed of the run: model init order, data order and every vLLM sampling seed derive from it"""
    model: str = "embedded/policy"
    """seed policy (and reference): a hub id or a local Hugging Face folder"""
    reward_model: str = "embedded/reward_model"
    """scalar reward model for chat prompts (loaded only if the data has chat rows)"""
    dataset: str = "embedded/data/math_train.jsonl"
    """training prompts: `[math:|chat:]NAME[@CONFIG][:WEIGHT]`, comma-separated to mix: a hub id,
    a local folder or a .jsonl / .json / .parquet file of math and/or chat rows (docs/data.md)"""
    eval_dataset: str = "embedded/data/math_test.jsonl"
    """held-out prompts ('' to skip), as for `dataset`: math rows give eval/accuracy, chat rows
    eval/chat/*"""
    paper_math_filter: bool = False
    """the paper's NuminaMath-CoT filter: no proofs, multiple choice or synthetic subsets"""
    num_steps: int = 200
    """optimizer steps"""
    prompts_per_step: int = 8
    """prompts per optimizer step, over all ranks (the paper: 64 math, 32 chat)"""
    samples_per_prompt: int = 8
    """completions per prompt (the paper's GRPO group size: 8)"""
    max_new_tokens: int = 48
    """completion length limit (the paper: 2048 math, 1024 chat)"""
    temperature: float = 1.0
    """sampling temperature of training rollouts (the paper: 1.0)"""
    top_p: float = 1.0
    """nucleus sampling of training rollouts (the paper: 1.0)"""
    learning_rate: float = 5e-5
    """AdamW learning rate, constant after warm-up (the paper: 1e-6 for an 8B model)"""
    warmup_steps: int = 10
    """linear learning-rate warm-up"""
    adam_eps: float = 1e-8
    """AdamW epsilon (the paper: 1e-8 chat; 1e-4 stopped DPO divergence on math)"""
    max_grad_norm: float = 1.0
    """gradient clipping (the paper: 0.1)"""
    adam_betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas (the paper does not say; the authors' fairseq2 recipe: 0.9, 0.95)"""
    weight_decay: float = 0.0
    """AdamW weight decay (the paper does not say; the authors' fairseq2 recipe: 0.1)"""
    run: tyro.conf.OmitArgPrefixes[common.RunArgs] = field(default_factory=common.RunArgs)
    """plumbing flags (common/args.py): output, logging, evaluation, memory, the engine"""

    # Algorithm specific arguments
    kl_coef: float = 0.001
    """β of the k3 KL penalty to the fixed seed (the paper: 0.001; 0 skips the reference)"""
    std_normalize: bool = True
    """group advantages / (std + eps) (the authors' code), not mean-only (the paper's formula)"""
    adv_eps: float = 1e-6
    """eps of the std normalisation (the authors' code: 1e-6)"""
    entropy_coef: float = 0.0
    """entropy bonus: loss -= C Σ mean_t H_t / B (the paper's ablation: 1e-4 to 5e-4)"""
    length_norm: Literal["none", "sequence", "token"] = "none"
    """none: per-sequence token sums (the paper's main runs); sequence: each sequence's token mean
    (the authors' code default; the paper: biased to short answers); token: / the step's tokens"""
    tis_cap: float = 0.0
    """importance sampling against the engine's logprobs of the sampled tokens, w = π_θ / π_vLLM
    capped at C (0: off, the paper; the authors' code later: 2, token level; TRL: a mask at 3)"""
    tis_level: Literal["token", "sequence"] = "token"
    """--tis-cap: one weight per token, or per sequence (the exp of its summed log-ratio)"""
    tis_mode: Literal["truncate", "mask"] = "truncate"
    """--tis-cap: truncate: min(w, C); mask: w where w <= C, else 0"""

    # filled in after parsing (not flags: logged with the config)
    world_size: tyro.conf.Suppress[int] = 0
    prompts_per_rank: tyro.conf.Suppress[int] = 0


# ---- rewards: one function per task, (rows, their (n,) completions, reward model) -> (rows, n);
# a row's `task` picks its function in REWARDS (a fork adds or changes a reward here) ----------
def math_reward(rows: list[dict], outs, reward_model) -> torch.Tensor:
    """1 if Math-Verify finds the completion's last \\boxed{} equal to the row's answer, else 0."""
    texts, answers = [c.text for o in outs for c in o], [r["answer"] for r in rows for _ in outs[0]]
    return torch.tensor(common.math_rewards(texts, answers)).view(len(rows), -1)


def chat_reward(rows: list[dict], outs, reward_model) -> torch.Tensor:
    """The reward model's scalar score of (prompt, completion) (the paper: Athene-RM-8B)."""
    texts, prompts = [c.text for o in outs for c in o], [r["prompt"] for r in rows for _ in outs[0]]
    return torch.tensor(reward_model.score(prompts, texts)).view(len(rows), -1)


REWARDS = {"math": math_reward, "chat": chat_reward}


# ---- the algorithm: pure functions, tested on their own ----------------------------------------
def group_advantages(rewards: torch.Tensor, std_normalize: bool, eps: float) -> torch.Tensor:
    """(P, n) rewards -> (P, n) advantages: minus the group's mean, optionally / (std + eps)."""
    adv = rewards - rewards.mean(dim=1, keepdim=True)
    if std_normalize:
        adv = adv / (rewards.std(dim=1, keepdim=True) + eps)
    return adv


def grpo_loss(logps, ref_logps, mask, advantages, kl_coef: float, num_prompts: int, group_size: int,
              length_norm: str = "none", num_tokens: float = 0.0, weights=None, entropy=None,
              entropy_coef: float = 0.0):
    """-(1/B) Σ_prompts (1/n) Σ_i Σ_t [w_t ρ_t A_i - β KL_t] - C Σ_i mean_t H_t / B, from
    (S, T) tensors (ref_logps None: β = 0; weights: TIS) and (S,) advantages; B, n the whole
    batch's (`length_norm` "token": / `num_tokens`). Returns (loss, kl_sum, the entropy bonus)."""
    ratio = torch.exp(logps - logps.detach())  # ≡ 1; its gradient is ∇logp (on-policy)
    per_token = ratio * advantages[:, None]  # (S, T)
    if weights is not None:  # ALGO LOGIC (--tis-cap): the engine sampled these tokens, not π_θ
        per_token = per_token * weights
    kl = torch.zeros_like(logps)
    if ref_logps is not None:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1  # k3: unbiased, always >= 0
        per_token = per_token - kl_coef * kl
    tokens = mask.sum(-1).clamp(min=1)  # (S,)
    if length_norm == "token":  # ALGO LOGIC (--length-norm): the authors' token-mean variant
        loss = -(per_token * mask).sum() / num_tokens
    elif length_norm == "sequence":  # each sequence's token mean (the authors' code default)
        loss = -((per_token * mask).sum(-1) / tokens).sum() / (num_prompts * group_size)
    else:
        loss = -(per_token * mask).sum() / (num_prompts * group_size)  # per-sequence token sums
    bonus = torch.zeros(())
    if entropy_coef:  # ALGO LOGIC (--entropy-coef): the authors' entropy bonus, with its gradient
        bonus = entropy_coef * ((entropy * mask).sum(-1) / tokens).sum() / num_prompts
    return loss - bonus, (kl * mask).sum().detach(), bonus.detach()


def train_metrics(s: dict[str, float], args: Args) -> dict[str, float]:
    """train/* from the step's sums over ranks (each rank's loss is already / its prompts)."""
    m = {"train/loss": s["loss"] / args.world_size, "train/kl": s["kl_sum"] / max(s["tokens"], 1)}
    if args.entropy_coef:
        m["train/entropy_bonus"] = s["entropy_bonus"] / args.world_size
    if args.tis_cap:
        m |= {"train/tis_weight_mean": s["tis_sum"] / max(s["tokens"], 1),
              "train/tis_capped_frac": s["tis_capped"] / max(s["tokens"], 1)}
    return m


def main(args: Args) -> None:
    # ---- distributed setup & seeding ------------------------------------------------------------
    rank, world_size, device = common.setup_distributed()
    common.check_args(args, world_size)  # every flag and local path, before any model loads
    args.world_size, args.prompts_per_rank = world_size, args.prompts_per_step // world_size
    run = args.run  # the plumbing flags (common.RunArgs)
    run.output_dir = run.output_dir or f"runs/{args.exp_name}__{args.seed}"
    common.claim_output_dir(args, world_size, rank)  # this run's alone, while it runs
    ckpt_dir = os.path.join(run.output_dir, "checkpoint")
    common.seed_everything(args.seed)  # CRUCIAL: the same seed on every rank (identical init)
    dtype = common.compute_dtype(run.compute_dtype, device, args.model)  # over fp32 masters

    # ---- data -----------------------------------------------------------------------------------
    tokenizer = common.load_tokenizer(args.model, run.trust_remote_code, run.chat_template)
    rows, prompt_ids, eval_rows = common.load_data(args, tokenizer, verbose=rank == 0)
    order = common.StepOrder(len(rows), args.seed, args.prompts_per_step, rank, world_size)

    # ---- models & optimizer ---------------------------------------------------------------------
    load = functools.partial(common.load_model, args.model, device, dtype,
                             trust_remote_code=run.trust_remote_code)
    policy = common.fsdp_wrap(load(activation_checkpointing=run.activation_checkpointing), dtype)
    # ALGO LOGIC: GRPO's KL is to the fixed seed model, not even loaded without a KL term
    kinds = ["fixed"] if args.kl_coef > 0 else []
    references = {kind: common.fsdp_wrap(load(trainable=False), dtype) for kind in kinds}
    reward_model = common.reward_model_for(args, device, rows + eval_rows, verbose=rank == 0)
    # fused: one pass over each tensor (on a CPU several times faster than the default; bench/)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, betas=args.adam_betas,
                                  eps=args.adam_eps, weight_decay=args.weight_decay, fused=True)
    start_step = common.load_checkpoint(ckpt_dir, policy, optimizer) if run.resume else 0

    # ---- generation engine ----------------------------------------------------------------------
    seqs = args.prompts_per_rank * args.samples_per_prompt  # what one generate call samples
    generator = common.generator_for(args, device, seqs)
    logger = common.logger_for(args, rank, start_step,
                               f"{len(rows)} prompts, {len(eval_rows)} held out")

    evaluate = functools.partial(common.evaluate_policy, generator, policy, tokenizer, reward_model,
                                 eval_rows, args)  # eval/* of the weights being trained

    # ---- training loop --------------------------------------------------------------------------
    n, t_start = args.samples_per_prompt, time.time()
    progress = common.Progress(args, logger)  # the record and the console, step by step
    if eval_rows and start_step == 0:
        progress.step_zero(evaluate())
    for step in range(start_step + 1, args.num_steps + 1):
        timer = common.PhaseTimer()
        # ---- sync: ALGO LOGIC: s = 1, the generator gets the weights being trained every step.
        # CRUCIAL: also the first step after a start or a resume, before any generation.
        with timer("sync"):
            generator.sync_weights(policy)
        last_sync = step - 1  # the generator holds the weights of `last_sync` optimizer steps

        # ---- rollout
        with timer("generate"):
            idx = order.indices(step)
            batch, prompts = [rows[i] for i in idx], [prompt_ids[i] for i in idx]
            outs = generator.generate(prompts, n=n, temperature=args.temperature,
                                      top_p=args.top_p, max_tokens=args.max_new_tokens,
                                      seed=order.seeds(step))
            generator.sleep()

        # ---- score: each row by its task's reward (REWARDS)
        with timer("score"):
            rewards, nonfinite = common.score(REWARDS, batch, outs, reward_model)  # (P, n), (P,)

        # ---- advantages: ALGO LOGIC: group-relative advantages, one per completion
        advantages = group_advantages(rewards, args.std_normalize, args.adv_eps)  # (P, n)
        # Speed: sequences sorted by length, so a micro-batch pads little; the loss is a sum over
        # sequences, so their order is free
        samples = sorted(((j, i) for j in range(len(prompts)) for i in range(n)),
                         key=lambda s: len(prompts[s[0]]) + len(outs[s[0]][s[1]].token_ids))
        flat_prompts = [prompts[j] for j, _ in samples]
        flat_completions = [outs[j][i] for j, i in samples]
        flat_advantages = advantages[[j for j, _ in samples], [i for _, i in samples]]  # (P*n,)
        num_tokens = 0.0  # --length-norm token: / the step's completion tokens (this rank's share:
        if args.length_norm == "token":  # FSDP averages over ranks), one collective for the count
            tokens = common.all_reduce({"t": sum(len(c.token_ids) for c in flat_completions)})
            num_tokens = tokens["t"] / world_size

        # ---- update: reference logprobs, one optimizer step over micro-batches
        lr = args.learning_rate * min(1.0, step / max(args.warmup_steps, 1))  # warm-up, constant
        common.set_lr(optimizer, lr)
        kept = []  # what each micro-batch measured, for the metrics after the update
        with timer("train"):
            size = run.micro_batch_size
            for mb in common.micro_batches(len(flat_completions), size):  # same count on all ranks
                mb_prompts, mb_completions, weight = flat_prompts[mb], flat_completions[mb], 1.0
                mb_advantages = flat_advantages[mb]
                if not mb_completions:  # a padding pass: same collectives, no gradient, no stats
                    mb_prompts, mb_completions, weight = [prompts[0]] * 2, [outs[0][0]] * 2, 0.0
                    mb_advantages = torch.zeros(2)
                mb_tokens = [c.token_ids for c in mb_completions]
                # CRUCIAL: the reference runs on every rank (FSDP)
                with torch.no_grad(), common.autocast(device, dtype):
                    ref_logps_by_kind = {kind: common.completion_logprobs(
                        ref, mb_prompts, mb_tokens, args.temperature, tokenizer.pad_token_id)[0]
                        for kind, ref in references.items()}
                ref_logps = ref_logps_by_kind.get("fixed")  # (S, T), None without a KL term
                with common.autocast(device, dtype):
                    logps, mask, entropy = common.completion_logprobs(
                        policy, mb_prompts, mb_tokens, args.temperature, tokenizer.pad_token_id,
                        with_entropy=True)
                weights, capped = None, torch.zeros(())
                if args.tis_cap:  # ALGO LOGIC: importance weights against the engine's logprobs
                    engine_logps = common.engine_logprobs(mb_completions, logps)  # (S, T)
                    weights, capped = common.tis_weights(logps, engine_logps, mask, args.tis_cap,
                                                         args.tis_level, args.tis_mode)
                loss, kl_sum, bonus = grpo_loss(
                    logps, ref_logps, mask, mb_advantages.to(device), args.kl_coef,
                    args.prompts_per_rank, n, args.length_norm, num_tokens, weights, entropy,
                    args.entropy_coef)
                (loss * weight).backward()
                if weight:  # what the metrics need; a padding pass keeps nothing
                    kept.append({
                        **common.update_stats(logps, mask, entropy, mb_prompts, mb_completions),
                        "loss": loss.item(),
                        "kl_sum": kl_sum.item(),  # k3 per token
                        "entropy_bonus": bonus.item(),
                        "tis_sum": weights.sum().item() if weights is not None else 0.0,
                        "tis_capped": capped.sum().item()})
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        # ---- log: this rank's sums, summed over ranks, then ratios (ranks hold different rows)
        sums = common.add_up(kept, "gap_sum", "kl_sum", "entropy_bonus", "tis_sum", "tis_capped")
        sums |= common.rollout_sums(batch, outs, rewards, nonfinite, reward_model)
        s, s_max = common.reduce_step(sums, kept, device)
        metrics = {"step": step, **train_metrics(s, args), "train/grad_norm": float(grad_norm),
                   "train/lr": lr, "rollout/policy_lag": step - 1 - last_sync,
                   **common.rollout_metrics(s), **common.trainer_metrics(s, s_max, timer)}
        if eval_rows and (step % run.eval_every == 0 or step == args.num_steps):
            metrics.update(evaluate())
        progress.step(metrics, batch, outs, rewards, advantages=advantages)  # all ranks (a gather)

        # ---- checkpoints: the trainer state to resume; the best model by validation (to keep)
        if step % run.save_every == 0 or step == args.num_steps:
            common.save_checkpoint(ckpt_dir, step, policy, optimizer, tokenizer, dtype)
        common.save_best(run.output_dir, metrics, policy, tokenizer, dtype)  # on evaluation steps

    # ---- final save -----------------------------------------------------------------------------
    common.finish(logger, generator, run.output_dir, t_start)


if __name__ == "__main__":
    common.run(main, tyro.cli(Args))
