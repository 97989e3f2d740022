"""GRPO, the on-policy end of the spectrum (sync interval s = 1), as in Lanchantin et al. 2025.

Every step:
1. sync: push the trainer's weights into the vLLM generator, before every generation (s = 1);
2. rollout: sample `samples_per_prompt` completions for each of this rank's prompts;
3. score: each row by its task's function in `REWARDS` (Math-Verify; the reward model for chat);
4. advantages: A_i = (r_i - mean(group)) / (std(group) + eps) within each prompt's group (the
   authors' code; the paper's formula is mean-only: `--no-std-normalize`);
5. update: one optimizer step on `grpo_loss`, whose first line is the objective (ρ_t = 1
   on-policy: PPO's clipping would never trigger);
6. log one metrics dict, evaluate every `eval_every` steps, checkpoint every `save_every`.

Shapes: P prompts per rank and step (B = P x ranks: / P on each rank, FSDP averages), n samples
per prompt, micro-batches of S rows (prompt, completion) padded to T tokens.

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


# ---- Args
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
    """held-out prompts ('' to skip), as for `dataset` (math: eval/accuracy; chat: eval/chat/*)"""
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


# ---- rewards: REWARDS[row's task](rows, (P, n) completions, reward model) -> (P, n) (fork here)
def math_reward(rows: list[dict], completions, reward_model) -> torch.Tensor:
    """1 if Math-Verify finds the completion's last \\boxed{} equal to the row's answer, else 0."""
    texts = [c.text for group in completions for c in group]
    answers = [r["answer"] for r in rows for _ in completions[0]]
    return torch.tensor(common.math_rewards(texts, answers)).view(len(rows), -1)


def chat_reward(rows: list[dict], completions, reward_model) -> torch.Tensor:
    """The reward model's scalar score of (prompt, completion) (the paper: Athene-RM-8B)."""
    texts = [c.text for group in completions for c in group]
    prompts = [r["prompt"] for r in rows for _ in completions[0]]
    return torch.tensor(reward_model.score(prompts, texts)).view(len(rows), -1)


REWARDS = {"math": math_reward, "chat": chat_reward}


# ---- the algorithm: pure functions, tested on their own
def group_advantages(rewards: torch.Tensor, std_normalize: bool, eps: float) -> torch.Tensor:
    """(P, n) rewards -> (P, n) advantages: minus the group's mean, optionally / (std + eps)."""
    adv = rewards - rewards.mean(dim=1, keepdim=True)
    if std_normalize:
        adv = adv / (rewards.std(dim=1, keepdim=True) + eps)
    return adv


def grpo_loss(*, logps, ref_logps, mask, token_entropy, advantages, tis_weights, kl_coef: float,
              entropy_coef: float, length_norm: str, num_prompts: int, group_size: int,
              num_tokens: float):
    """loss = -pg + kl_coef·kl - entropy_coef·entropy, on S rows (prompt, completion): (S, T)
    log-probs of π and π_ref (None: no KL term), mask, entropies and TIS weights w (1: off); (S,)
    advantages A. With ρ_t = π_θ / sg(π_θ) ≡ 1 (its gradient ∇log π: on-policy) and the k3
    estimator KL_t = e^δ - δ - 1, δ = log π_ref - log π (unbiased, >= 0):
        pg = Σ_i Σ_t w_t ρ_t A_i / N;   kl = Σ_i Σ_t KL_t / N;   entropy = Σ_i mean_t H_t / P,
    N = P x group_size, P = num_prompts (the paper's token sums); --length-norm sequence: each
    Σ_t a mean over its sequence's tokens; token: N = num_tokens. Returns (loss, sums)."""
    tokens = mask.sum(-1).clamp(min=1)  # (rows,)
    seq_norm = tokens if length_norm == "sequence" else 1.0
    batch_norm = num_tokens if length_norm == "token" else num_prompts * group_size
    ratio = torch.exp(logps - logps.detach())  # ≡ 1; its gradient is ∇log π
    delta = ref_logps - logps if ref_logps is not None else torch.zeros_like(logps)
    kl_t = torch.exp(delta) - delta - 1  # (S, T), 0 without a reference
    if not entropy_coef:  # no bonus: its gradient (a pass over the vocabulary) is not needed
        token_entropy = token_entropy.detach()
    pg = ((tis_weights * ratio * advantages[:, None] * mask).sum(-1) / seq_norm).sum() / batch_norm
    kl = ((kl_t * mask).sum(-1) / seq_norm).sum() / batch_norm
    entropy = ((token_entropy * mask).sum(-1) / tokens).sum() / num_prompts
    loss = -pg + kl_coef * kl - entropy_coef * entropy
    stats = {"loss": loss.item(), "kl_k3_sum": (kl_t * mask).sum().item(),
             "entropy_bonus": (entropy_coef * entropy).item()}
    return loss, stats


def check(args: Args) -> None:
    """This algorithm's flags, against each other, before any model loads."""
    if 0 < args.tis_cap < 1:
        raise common.UserError(f"--tis-cap {args.tis_cap}: a cap below 1 would shrink on-policy "
                               "tokens (weight 1); use >= 1")


def train_metrics(sums: dict[str, float], args: Args) -> dict[str, float]:
    """train/* from the step's sums over ranks (each rank's loss is already / its prompts)."""
    tokens = max(sums["tokens"], 1)
    m = {"train/loss": sums["loss"] / args.world_size, "train/kl_k3": sums["kl_k3_sum"] / tokens}
    if args.entropy_coef:
        m["train/entropy_bonus"] = sums["entropy_bonus"] / args.world_size
    if args.tis_cap:
        m["train/tis_weight_mean"] = sums["tis_sum"] / tokens
        m["train/tis_capped_frac"] = sums["tis_capped"] / tokens
    return m


def main(args: Args) -> None:
    # ---- distributed setup & seeding
    rank, world_size, device = common.setup_distributed()
    common.check_args(args, world_size, positive=["adv_eps"])
    check(args)
    args.world_size = world_size
    args.prompts_per_rank = args.prompts_per_step // world_size
    run = args.run  # the plumbing flags (common.RunArgs)
    run.output_dir = run.output_dir or f"runs/{args.exp_name}__{args.seed}"
    common.claim_output_dir(args, world_size, rank)
    ckpt_dir = os.path.join(run.output_dir, "checkpoint")
    common.seed_everything(args.seed)  # CRUCIAL: the same on every rank
    dtype = common.compute_dtype(run.compute_dtype, device, args.model)

    # ---- data
    tokenizer = common.load_tokenizer(args.model, run.trust_remote_code, run.chat_template)
    rows, prompt_ids, eval_rows = common.load_data(args, tokenizer, verbose=rank == 0)
    order = common.StepOrder(len(rows), args.seed, args.prompts_per_step, rank, world_size)

    # ---- models & optimizer
    load = functools.partial(common.load_model, args.model, device, dtype,
                             trust_remote_code=run.trust_remote_code)
    checkpointing = run.activation_checkpointing
    policy = common.fsdp_wrap(load(activation_checkpointing=checkpointing), dtype)
    reference = None  # ALGO LOGIC: the fixed seed, not even loaded without a KL term
    if args.kl_coef > 0:
        reference = common.fsdp_wrap(load(trainable=False), dtype)
    reward_model = common.reward_model_for(args, device, rows + eval_rows, verbose=rank == 0)
    # fused: one pass over each tensor (several times faster on a CPU)
    optimizer = torch.optim.AdamW(
        policy.parameters(), lr=args.learning_rate, betas=args.adam_betas,
        eps=args.adam_eps, weight_decay=args.weight_decay, fused=True)
    start_step = common.load_checkpoint(ckpt_dir, policy, optimizer) if run.resume else 0

    # ---- generation engine
    seqs = args.prompts_per_rank * args.samples_per_prompt  # per call
    generator = common.generator_for(args, device, seqs)
    summary = f"{len(rows)} prompts, {len(eval_rows)} held out"
    logger = common.logger_for(args, rank, start_step, summary)
    evaluate = functools.partial(  # eval/* of the weights being trained
        common.evaluate_policy, generator, policy, tokenizer, reward_model, eval_rows, args)

    # ---- training loop
    n = args.samples_per_prompt
    t_start = time.time()
    progress = common.Progress(args, logger)  # metrics.jsonl and the console
    if eval_rows and start_step == 0:
        progress.step_zero(evaluate())
    for step in range(start_step + 1, args.num_steps + 1):
        timer = common.PhaseTimer()
        # ---- sync: ALGO LOGIC: s = 1, the generator gets the trained weights every step
        with timer("sync"):
            generator.sync_weights(policy)
        last_sync = step - 1  # the optimizer steps behind the generator's weights

        # ---- rollout
        with timer("generate"):
            idx = order.indices(step)
            batch = [rows[i] for i in idx]
            prompts = [prompt_ids[i] for i in idx]
            completions = generator.generate(  # (P, n)
                prompts, n=n, temperature=args.temperature, top_p=args.top_p,
                max_tokens=args.max_new_tokens, seed=order.seeds(step))
            generator.sleep()

        # ---- score: each row by its task's reward (REWARDS)
        with timer("score"):
            # (P, n) rewards; (P,) groups with a NaN / inf reward (set to 0)
            rewards, nonfinite = common.score(
                REWARDS, batch, completions, reward_model)

        # ---- advantages: ALGO LOGIC: group-relative, one per completion
        advantages = group_advantages(rewards, args.std_normalize, args.adv_eps)  # (P, n)
        # Speed: sorted by length, a micro-batch pads little (the loss is a sum: order is free)
        rows_of_samples = sorted(
            ((j, i) for j in range(len(prompts)) for i in range(n)),
            key=lambda r: len(prompts[r[0]]) + len(completions[r[0]][r[1]].token_ids))
        update_prompts = [prompts[j] for j, _ in rows_of_samples]
        update_completions = [completions[j][i] for j, i in rows_of_samples]
        update_advantages = advantages[[j for j, _ in rows_of_samples],
                                       [i for _, i in rows_of_samples]]  # (P n,)
        num_tokens = 0.0  # --length-norm token: the step's tokens over ranks, / ranks (FSDP
        if args.length_norm == "token":  # averages the ranks' gradients)
            counted = sum(len(c.token_ids) for c in update_completions)
            num_tokens = common.all_reduce({"t": counted})["t"] / world_size

        # ---- update: one optimizer step over micro-batches
        lr = args.learning_rate * min(1.0, step / max(args.warmup_steps, 1))  # warm-up
        common.set_lr(optimizer, lr)
        mb_stats = []  # each micro-batch's sums, for the metrics
        with timer("train"):
            # the same number of passes on every rank (FSDP): the extra ones are empty
            for mb in common.micro_batches(len(update_completions), run.micro_batch_size):
                mb_prompts = update_prompts[mb]
                mb_completions = update_completions[mb]
                mb_advantages = update_advantages[mb]
                padding = not mb_completions
                if padding:  # any row, for the collectives; no gradient
                    mb_prompts = [prompts[0]] * 2
                    mb_completions = [completions[0][0]] * 2
                    mb_advantages = torch.zeros(2)
                mb_tokens = [c.token_ids for c in mb_completions]
                ref_logps = None
                if reference is not None:
                    with torch.no_grad(), common.autocast(device, dtype):
                        ref_logps, _, _ = common.completion_logprobs(  # (S, T)
                            reference, mb_prompts, mb_tokens, args.temperature,
                            tokenizer.pad_token_id)
                with common.autocast(device, dtype):
                    logps, mask, entropy = common.completion_logprobs(  # (S, T) each
                        policy, mb_prompts, mb_tokens, args.temperature, tokenizer.pad_token_id,
                        with_entropy=True)
                tis = 1.0  # importance weights: 1 without --tis-cap
                if args.tis_cap:  # ALGO LOGIC: the engine sampled these tokens, not π_θ
                    engine_logps = common.engine_logprobs(mb_completions, logps)  # (S, T)
                    tis, capped = common.tis_weights(
                        logps, engine_logps, mask, args.tis_cap, args.tis_level, args.tis_mode)
                loss, stats = grpo_loss(
                    logps=logps, ref_logps=ref_logps, mask=mask, token_entropy=entropy,
                    advantages=mb_advantages.to(device), tis_weights=tis,
                    kl_coef=args.kl_coef, entropy_coef=args.entropy_coef,
                    length_norm=args.length_norm, num_prompts=args.prompts_per_rank,
                    group_size=n, num_tokens=num_tokens)
                (loss * (0.0 if padding else 1.0)).backward()
                stats |= common.update_stats(
                    logps, mask, entropy, mb_prompts, mb_completions)
                if args.tis_cap:
                    stats |= {"tis_sum": tis.sum().item(), "tis_capped": capped.sum().item()}
                mb_stats.append(dict.fromkeys(stats, 0.0) if padding else stats)
            grad_norm = torch.nn.utils.clip_grad_norm_(
                policy.parameters(), args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        # ---- log: each rank's sums, summed over ranks, then ratios
        sums = common.add_up(mb_stats)
        sums |= common.rollout_sums(
            batch, completions, rewards, nonfinite, reward_model)
        sums, maxima = common.reduce_step(sums, mb_stats, device)
        metrics = {"step": step, **train_metrics(sums, args),
                   "train/grad_norm": float(grad_norm), "train/lr": lr,
                   "rollout/policy_lag": step - 1 - last_sync,
                   **common.rollout_metrics(sums),
                   **common.trainer_metrics(sums, maxima, timer)}
        if eval_rows and (step % run.eval_every == 0 or step == args.num_steps):
            metrics.update(evaluate())
        progress.step(metrics, batch, completions, rewards, advantages=advantages)  # every rank

        # ---- checkpoints: the state to resume; the best model by validation
        if step % run.save_every == 0 or step == args.num_steps:
            common.save_checkpoint(ckpt_dir, step, policy, optimizer, tokenizer, dtype)
        common.save_best(run.output_dir, metrics, policy, tokenizer, dtype)

    common.finish(logger, generator, run.output_dir, t_start)


if __name__ == "__main__":
    common.run(main, tyro.cli(Args))
