"""Online DPO (sync interval s = 1), as in Lanchantin et al. 2025 (arXiv 2506.21495).

Every step:
1. sync: push the trainer's weights into the vLLM generator, before every generation (s = 1);
   for verifiable (math) data the reference model is re-synced to the policy at the same time
   (the paper: without it, math DPO collapsed to very short answers);
2. rollout: sample `samples_per_prompt` completions for each of this rank's prompts;
3. score: each row by its task's function in `REWARDS` (Math-Verify; the reward model for chat);
4. pairs, one per prompt at most: math -> a random correct vs a random incorrect completion;
   chat -> highest vs lowest reward-model score (prompts with all-equal rewards are skipped);
5. update: one optimizer step on `dpo_loss`, whose first line is the objective;
6. log one metrics dict, evaluate every `eval_every` steps, checkpoint every `save_every`.

Shapes: P prompts per rank and step (B = P x ranks: / P on each rank, FSDP averages), n samples
per prompt, K pairs, micro-batches of 2k rows (chosen, rejected, ...) padded to T tokens.

Where the paper is silent: constant learning rate after a linear warm-up; a mixed math + chat
batch scores each prompt by its own task's reward. Not deterministic: vLLM on GPU.

Run:
    python online_dpo.py                                    # embedded default, CPU, a few minutes
    torchrun --standalone --nproc_per_node=2 online_dpo.py  # 2 processes (CPU: gloo; GPU: NCCL)
    torchrun --nproc_per_node 8 online_dpo.py \\            # the paper's math run (Llama-3.1-8B)
        --model meta-llama/Llama-3.1-8B-Instruct --chat-template llama3-no-system \\
        --dataset AI-MO/NuminaMath-CoT --paper-math-filter \\
        --eval-dataset HuggingFaceH4/MATH-500 --eval-split test --num-steps 1000 \\
        --prompts-per-step 64 --samples-per-prompt 8 --max-new-tokens 2048 --max-model-len 4096 \\
        --learning-rate 1e-6 --adam-eps 1e-4 --max-grad-norm 0.1 --beta 0.1 \\
        --micro-batch-size 4 --vllm-sleep  # the chat run: docs/gpu.md

Differs from `grpo.py` in: the objective (one chosen/rejected pair per prompt and the DPO loss
instead of group advantages on every sample) and the reference (re-synced with the generator
for math). Differs from `semi_online_dpo.py` in: the sync interval (1 here).
"""

import functools
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
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
    beta: float = 0.1
    """DPO β (the paper: 0.1 math, 0.01 chat)"""
    nll_scale: float = 0.0
    """weight of the chosen completion's per-token NLL (the paper's ablation: 1.0, no gain)"""
    nll_length_normalize: bool = True
    """the NLL pooled over the chosen tokens (the authors' default), or per sequence and / B"""
    ref_sync: Literal["auto", "yes", "no"] = "auto"
    """re-sync the reference to the policy with the generator. auto (the paper): on math-only
    data, not with chat rows (its mixed run too; per task: a fork, docs/fork.md)"""
    ref_sync_interval: int = 0
    """re-sync that reference every K steps instead of with the generator (the authors'
    sync_ref_model_every_n_steps; 0: with the generator)"""
    length_norm: Literal["none", "sequence"] = "none"
    """log-probs summed over tokens (the paper), or each sequence's mean (its ablation: worse)"""
    entropy_coef: float = 0.0
    """entropy bonus: loss -= C Σ mean_t H_t / B (the paper's ablation: 1e-4 to 5e-4)"""
    group_dpo: bool = False
    """GroupDPO (the paper's ablation): every correct x incorrect pair of a math prompt, averaged"""
    grpo_coef: float = 0.0
    """with --group-dpo: + A x GRPO's objective on the same groups (the paper's ablation: 0.01)"""

    # filled in after parsing (not flags: logged with the config)
    world_size: tyro.conf.Suppress[int] = 0
    prompts_per_rank: tyro.conf.Suppress[int] = 0
    ref_synced: tyro.conf.Suppress[bool] = False  # --ref-sync resolved


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
def select_pairs(rewards: torch.Tensor, tasks: list[str], seeds: list[int],
                 group: bool = False) -> list[tuple[int, int, int]]:
    """(prompt j, chosen i, rejected i) per prompt with a pair, from (P, n) rewards. math: a random
    correct (> 0.5) vs a random wrong completion, drawn with the prompt's own seed (`group`,
    GroupDPO: every correct x wrong pair); chat: the highest vs the lowest score (first of ties)."""
    pairs = []
    for j, (r, task, seed) in enumerate(zip(rewards.tolist(), tasks, seeds, strict=True)):
        if task == "math":
            correct = [i for i, x in enumerate(r) if x > 0.5]
            wrong = [i for i, x in enumerate(r) if x <= 0.5]
            if correct and wrong and group:  # ALGO LOGIC (--group-dpo)
                pairs += [(j, c, w) for c in correct for w in wrong]
            elif correct and wrong:
                rng = random.Random(seed)
                pairs.append((j, rng.choice(correct), rng.choice(wrong)))
        elif max(r) > min(r):
            pairs.append((j, r.index(max(r)), r.index(min(r))))
    return pairs


def group_terms(pairs: list[tuple[int, int, int]], rewards: torch.Tensor):
    """Each pair's loss weight, 1 / its prompt's pairs (GroupDPO averages them), and each of the
    pairs' completions' (chosen, rejected, ...) GRPO advantage (r - mean) / (std + 1e-6) in its
    prompt's group, / the pairs it is in: `--grpo-coef` then counts every completion once."""
    per_prompt = Counter(j for j, _, _ in pairs)
    appears = Counter((j, i) for j, c, r in pairs for i in (c, r))
    std = rewards.std(1, keepdim=True) + 1e-6
    adv = ((rewards - rewards.mean(1, keepdim=True)) / std).tolist()  # (P, n)
    return ([1 / per_prompt[j] for j, _, _ in pairs],
            [adv[j][i] / appears[j, i] for j, c, r in pairs for i in (c, r)])


def dpo_loss(*, logps, ref_logps, mask, token_entropy, pair_weights, advantages, beta: float,
             nll_scale: float, nll_pooling: float, entropy_coef: float, grpo_coef: float,
             length_norm: str, num_prompts: int, group_size: int):
    """loss = (dpo + nll_scale·nll - entropy_coef·entropy - grpo_coef·grpo) / num_prompts, on k
    pairs' rows (chosen, rejected, ...): (2k, T) log-probs of π and π_ref, mask, entropies; (k,)
    pair weights w; (2k,) advantages A. With Δ = log π(y) - log π_ref(y), summed over tokens
    (--length-norm sequence: each sequence's token mean):
        dpo = Σ_pairs w -log σ(β (Δ_c - Δ_r));   nll = -Σ_chosen log π(y) x nll_pooling;
        entropy = Σ_pairs w mean_t H_t(y_c);      grpo = Σ_rows A log π(y) / group_size.
    / num_prompts, not the pairs: a step with few pairs is not up-weighted. Returns (loss, sums)."""
    logp = (logps * mask).sum(-1)  # (2k,) log π(y)
    ref_logp = (ref_logps * mask).sum(-1)
    tokens = mask.sum(-1).clamp(min=1)  # (rows,)
    norm = tokens if length_norm == "sequence" else 1.0
    logratio = logp / norm - ref_logp / norm  # (2k,) Δ
    chosen, rejected = logratio[0::2].detach(), logratio[1::2].detach()
    if not entropy_coef:  # no bonus: its gradient (a pass over the vocabulary) is not needed
        token_entropy = token_entropy.detach()
    dpo = -(pair_weights * F.logsigmoid(beta * (logratio[0::2] - logratio[1::2]))).sum()
    nll = -logp[0::2].sum() * nll_pooling
    entropy = (pair_weights * (token_entropy * mask).sum(-1)[0::2] / tokens[0::2]).sum()
    grpo = (advantages * logp).sum() / group_size
    loss = (dpo + nll_scale * nll - entropy_coef * entropy - grpo_coef * grpo) / num_prompts
    stats = {"loss": loss.item(), "kl_k1_sum": logp.sum().item() - ref_logp.sum().item(),
             "chosen_logratio": chosen.sum().item(), "rejected_logratio": rejected.sum().item(),
             "pair_accuracy": (chosen > rejected).sum().item(), "nll_sum": -logp[0::2].sum().item(),
             "chosen_tokens": mask[0::2].sum().item(),
             "entropy_bonus": (entropy_coef * entropy).item() / num_prompts,
             "grpo_term": (grpo_coef * grpo).item() / num_prompts}
    return loss, stats


def check(args: Args, rows: list[dict]) -> None:
    """This algorithm's flags, against each other and the data, before any model loads."""
    if args.grpo_coef and not args.group_dpo:
        raise common.UserError("--grpo-coef adds GRPO's objective to --group-dpo: pass both")
    if args.group_dpo and args.nll_scale:
        raise common.UserError("--group-dpo has no NLL term (the authors'): drop --nll-scale")
    if args.group_dpo and any(r["task"] == "chat" for r in rows):
        raise common.UserError("--group-dpo pairs right with wrong answers: math data only")


def train_metrics(sums: dict[str, float], args: Args) -> dict[str, float]:
    """train/* from the step's sums over ranks (each rank's loss is already / its prompts)."""
    pairs = max(sums["pairs"], 1)
    m = {"train/loss": sums["loss"] / args.world_size,
         "train/kl_k1": sums["kl_k1_sum"] / max(sums["tokens"], 1),
         "train/nll": sums["nll_sum"] / max(sums["chosen_tokens"], 1),
         "train/pairs": sums["pairs"]}
    for key in ("reward_margin", "pair_accuracy", "chosen_logratio", "rejected_logratio"):
        m[f"train/{key}"] = sums[key] / pairs
    m |= {f"train/{t}/pairs": sums[f"{t}_pairs"] for t in ("math", "chat") if sums[f"{t}_samples"]}
    if args.entropy_coef:
        m["train/entropy_bonus"] = sums["entropy_bonus"] / args.world_size
    if args.grpo_coef:
        m["train/grpo_term"] = sums["grpo_term"] / args.world_size
    return m


def main(args: Args) -> None:
    # ---- distributed setup & seeding
    rank, world_size, device = common.setup_distributed()
    # a run resumes exactly only at multiples of these intervals
    windows = {"--ref-sync-interval": args.ref_sync_interval or 1}
    common.check_args(args, world_size, positive=["beta"], windows=windows)
    args.world_size = world_size
    args.prompts_per_rank = args.prompts_per_step // world_size
    run = args.run  # the plumbing flags (common.RunArgs)
    run.output_dir = run.output_dir or f"runs/{args.exp_name}__{args.seed}"
    common.claim_output_dir(args, world_size, rank, windows)
    ckpt_dir = os.path.join(run.output_dir, "checkpoint")
    common.seed_everything(args.seed)  # CRUCIAL: the same on every rank
    dtype = common.compute_dtype(run.compute_dtype, device, args.model)

    # ---- data
    tokenizer = common.load_tokenizer(args.model, run.trust_remote_code, run.chat_template)
    rows, prompt_ids, eval_rows = common.load_data(args, tokenizer, verbose=rank == 0)
    check(args, rows)
    order = common.StepOrder(len(rows), args.seed, args.prompts_per_step, rank, world_size)
    math_only = all(r["task"] == "math" for r in rows)  # ALGO LOGIC: --ref-sync auto
    args.ref_synced = args.ref_sync == "yes" or (args.ref_sync == "auto" and math_only)

    # ---- models & optimizer
    load = functools.partial(common.load_model, args.model, device, dtype,
                             trust_remote_code=run.trust_remote_code)
    checkpointing = run.activation_checkpointing
    policy = common.fsdp_wrap(load(activation_checkpointing=checkpointing), dtype)
    reference = common.fsdp_wrap(load(trainable=False), dtype)  # frozen
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
        # ALGO LOGIC: the (math) reference moves with the generator
        ref_every = args.ref_sync_interval or 1
        if args.ref_synced and ((step - 1) % ref_every == 0 or step == start_step + 1):
            with timer("sync"):
                common.copy_weights(policy, reference)

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

        # ---- pairs: ALGO LOGIC: one (chosen, rejected) pair per prompt at most
        tasks = [r["task"] for r in batch]
        pairs = select_pairs(rewards, tasks, order.seeds(step), args.group_dpo)
        # Speed: sorted by length, a micro-batch pads little
        pairs.sort(key=lambda p: len(prompts[p[0]]) + max(
            len(completions[p[0]][i].token_ids) for i in p[1:]))
        pair_weights, advantages = group_terms(pairs, rewards)  # (K,), (2K,)
        # the update's rows: (prompt j, completion i), chosen, rejected, ...
        rows_of_pairs = [(j, i) for j, c, r in pairs for i in (c, r)]
        update_prompts = [prompts[j] for j, _ in rows_of_pairs]
        update_completions = [completions[j][i] for j, i in rows_of_pairs]
        chosen_tokens = sum(len(c.token_ids) for c in update_completions[0::2])
        nll_pooling = 1.0
        if args.nll_length_normalize:  # pooled over the step's chosen tokens
            nll_pooling = len(pairs) / max(chosen_tokens, 1)

        # ---- update: one optimizer step over micro-batches (a pair stays in one)
        lr = args.learning_rate * min(1.0, step / max(args.warmup_steps, 1))  # warm-up
        common.set_lr(optimizer, lr)
        mb_stats = []  # each micro-batch's sums, for the metrics
        with timer("train"):
            size = 2 * max(run.micro_batch_size // 2, 1)
            # the same number of passes on every rank (FSDP): the extra ones are empty
            for mb in common.micro_batches(len(update_completions), size):
                mb_prompts = update_prompts[mb]
                mb_completions = update_completions[mb]
                mb_weights = pair_weights[mb.start // 2 : mb.stop // 2]
                mb_advantages = advantages[mb]
                padding = not mb_completions
                if padding:  # any pair, for the collectives; no gradient
                    mb_prompts = [prompts[0]] * 2
                    mb_completions = [completions[0][0]] * 2
                    mb_weights = [1.0]
                    mb_advantages = [0.0, 0.0]
                mb_tokens = [c.token_ids for c in mb_completions]
                with torch.no_grad(), common.autocast(device, dtype):
                    ref_logps, _, _ = common.completion_logprobs(  # (2k, T)
                        reference, mb_prompts, mb_tokens, args.temperature, tokenizer.pad_token_id)
                with common.autocast(device, dtype):
                    logps, mask, entropy = common.completion_logprobs(  # (2k, T) each
                        policy, mb_prompts, mb_tokens, args.temperature, tokenizer.pad_token_id,
                        with_entropy=True)
                loss, stats = dpo_loss(
                    logps=logps, ref_logps=ref_logps, mask=mask, token_entropy=entropy,
                    pair_weights=torch.tensor(mb_weights, device=device),
                    advantages=torch.tensor(mb_advantages, device=device),
                    beta=args.beta, nll_scale=args.nll_scale, nll_pooling=nll_pooling,
                    entropy_coef=args.entropy_coef, grpo_coef=args.grpo_coef,
                    length_norm=args.length_norm, num_prompts=args.prompts_per_rank,
                    group_size=n)
                (loss * (0.0 if padding else 1.0)).backward()
                stats |= common.update_stats(
                    logps, mask, entropy, mb_prompts, mb_completions)
                mb_stats.append(dict.fromkeys(stats, 0.0) if padding else stats)
            grad_norm = torch.nn.utils.clip_grad_norm_(
                policy.parameters(), args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        # ---- log: each rank's sums, summed over ranks, then ratios
        sums = common.add_up(mb_stats)
        sums |= common.rollout_sums(
            batch, completions, rewards, nonfinite, reward_model)
        sums |= common.pair_sums(pairs, rewards, tasks)
        sums, maxima = common.reduce_step(sums, mb_stats, device)
        metrics = {"step": step, **train_metrics(sums, args),
                   "train/grad_norm": float(grad_norm), "train/lr": lr,
                   "rollout/policy_lag": step - 1 - last_sync,
                   **common.rollout_metrics(sums),
                   **common.trainer_metrics(sums, maxima, timer)}
        if eval_rows and (step % run.eval_every == 0 or step == args.num_steps):
            metrics.update(evaluate())
        progress.step(metrics, batch, completions, rewards, pairs=pairs)  # every rank

        # ---- checkpoints: the state to resume; the best model by validation
        if step % run.save_every == 0 or step == args.num_steps:
            common.save_checkpoint(ckpt_dir, step, policy, optimizer, tokenizer, dtype)
        common.save_best(run.output_dir, metrics, policy, tokenizer, dtype)

    common.finish(logger, generator, run.output_dir, t_start)


if __name__ == "__main__":
    common.run(main, tyro.cli(Args))
