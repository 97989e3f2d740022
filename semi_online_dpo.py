"""Semi-online DPO (sync interval s > 1), as in Lanchantin et al. 2025 (arXiv 2506.21495).

Every step:
1. sync, every s steps only (before steps 1, s + 1, ...; the authors': 1, s, 2s, ...): push the
   trainer's weights into the vLLM generator, and for math the reference (as online_dpo.py);
2. rollout: at a sync, sample the whole window's completions in one vLLM call (the paper's
   efficiency argument); each step takes (and scores) its own prompts' completions;
3. score: each row by its task's function in `REWARDS` (Math-Verify; the reward model for chat);
4. pairs, one per prompt at most: math -> a random correct vs a random incorrect completion;
   chat -> highest vs lowest reward-model score (prompts with all-equal rewards are skipped);
5. update: one optimizer step on Σ_pairs -log σ(β [Δ(y_c) - Δ(y_r)]) / B, with Δ = log π -
   log π_ref *summed* over tokens, B the global number of prompts, + `nll_scale` x the chosen NLL;
6. log one metrics dict, evaluate every `eval_every` steps, checkpoint every `save_every`.

Where the paper is silent: constant learning rate after a linear warm-up; a mixed math + chat
batch scores each prompt by its own task's reward. Not deterministic: vLLM on GPU.

Run:
    python semi_online_dpo.py                                    # embedded default, s = 10
    torchrun --standalone --nproc_per_node=2 semi_online_dpo.py  # 2 processes (gloo / NCCL)
    torchrun --nproc_per_node 8 semi_online_dpo.py --sync-interval 100 \\  # the paper's math run
        --model meta-llama/Llama-3.1-8B-Instruct --chat-template llama3-no-system \\
        --dataset AI-MO/NuminaMath-CoT --paper-math-filter \\
        --eval-dataset HuggingFaceH4/MATH-500 --eval-split test --num-steps 1000 \\
        --prompts-per-step 64 --samples-per-prompt 8 --max-new-tokens 2048 --max-model-len 4096 \\
        --learning-rate 1e-6 --adam-eps 1e-4 --max-grad-norm 0.1 --beta 0.1 \\
        --micro-batch-size 4 --vllm-sleep  # the chat run: docs/gpu.md

Differs from `online_dpo.py` in: the sync interval (s here, 1 there) and so the rollouts of a
whole window generated at its sync. `--sync-interval 1` reproduces online_dpo.py exactly, and a
sync interval past the run's end with `--ref-sync no` reproduces offline_dpo.py (both tested).
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
    beta: float = 0.1
    """DPO β (the paper: 0.1 math, 0.01 chat)"""
    nll_scale: float = 0.0
    """weight of the chosen completion's per-token NLL (the paper's ablation: 1.0, no gain)"""
    nll_length_normalize: bool = True
    """the NLL pooled over the chosen tokens (the authors' default), or per sequence and / B"""
    ref_sync: Literal["auto", "yes", "no", "per-task"] = "auto"
    """re-sync the reference to the policy with the generator. auto (the paper): for math-only data
    (not chat, not its mixed V+NV run); per-task: math rows re-synced, chat rows the fixed seed"""
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
    sync_interval: int = 10
    """s: optimizer steps between generator syncs (the paper: 5, 10, 100; 1 = online DPO)"""

    # filled in after parsing (not flags: logged with the config)
    world_size: tyro.conf.Suppress[int] = 0
    prompts_per_rank: tyro.conf.Suppress[int] = 0
    synced_tasks: tyro.conf.Suppress[tuple[str, ...]] = ()  # --ref-sync resolved


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
def select_pairs(rewards: torch.Tensor, tasks: list[str], seeds: list[int],
                 group: bool = False) -> list[tuple[int, int, int]]:
    """(prompt j, chosen i, rejected i) for each prompt that yields a pair, from (P, n) rewards.
    math: a random correct (> 0.5) vs a random incorrect completion, drawn with the prompt's own
    seed (`group`, GroupDPO: every correct x incorrect pair); chat: the highest vs the lowest
    score (first of ties). A prompt whose completions all score alike gives none."""
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


def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float,
             nll_scale: float, nll: torch.Tensor, num_prompts: int, weights: torch.Tensor):
    """(Σ_pairs w · -log σ(β (Δ_c - Δ_r)) + nll_scale · NLL) / num_prompts, from (K,)
    per-pair log-probs *summed* over tokens (Δ = log π - log π_ref) and (K,) pair weights w
    (GroupDPO: 1 / the prompt's pairs). / the batch's prompts, not its pairs: a step with few
    pairs is not up-weighted. `nll` is pooled by the caller. Returns (loss, Δ_c, Δ_r)."""
    chosen_logratio = chosen_logps - ref_chosen_logps
    rejected_logratio = rejected_logps - ref_rejected_logps
    losses = -F.logsigmoid(beta * (chosen_logratio - rejected_logratio)) * weights
    loss = (losses.sum() + nll_scale * nll) / num_prompts
    return loss, chosen_logratio.detach(), rejected_logratio.detach()


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


def train_metrics(s: dict[str, float], args: Args) -> dict[str, float]:
    """train/* from the step's sums over ranks (each rank's loss is already / its prompts)."""
    pairs = max(s["pairs"], 1)
    m = {"train/loss": s["loss"] / args.world_size, "train/kl": s["kl_sum"] / max(s["tokens"], 1),
         "train/nll": s["nll_sum"] / max(s["chosen_tokens"], 1), "train/pairs": s["pairs"]}
    m |= {f"train/{key}": s[key] / pairs
          for key in ("reward_margin", "pair_accuracy", "chosen_logratio", "rejected_logratio")}
    m |= {f"train/{task}/pairs": s[f"{task}_pairs"] for task in ("math", "chat")
          if s[f"{task}_samples"]}
    if args.entropy_coef:
        m["train/entropy_bonus"] = s["entropy_bonus"] / args.world_size
    if args.grpo_coef:
        m["train/grpo_term"] = s["grpo_term"] / args.world_size
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
    # ALGO LOGIC: the paper re-syncs the reference for math only, and not in a mixed math + chat run
    math_only = all(r["task"] == "math" for r in rows)
    args.synced_tasks = {"auto": ("math",) if math_only else (), "yes": ("math", "chat"),
                         "no": (), "per-task": ("math",)}[args.ref_sync]

    # ---- models & optimizer ---------------------------------------------------------------------
    load = functools.partial(common.load_model, args.model, device, dtype,
                             trust_remote_code=run.trust_remote_code)
    policy = common.fsdp_wrap(load(activation_checkpointing=run.activation_checkpointing), dtype)
    # one frozen reference per kind the data needs: "synced" (moves with the generator), "fixed"
    kinds = sorted({"synced" if r["task"] in args.synced_tasks else "fixed" for r in rows})
    references = {kind: common.fsdp_wrap(load(trainable=False), dtype) for kind in kinds}
    reward_model = common.reward_model_for(args, device, rows + eval_rows, verbose=rank == 0)
    # fused: one pass over each tensor (on a CPU several times faster than the default; bench/)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, betas=args.adam_betas,
                                  eps=args.adam_eps, weight_decay=args.weight_decay, fused=True)
    start_step = common.load_checkpoint(ckpt_dir, policy, optimizer) if run.resume else 0

    # ---- generation engine ----------------------------------------------------------------------
    seqs = args.prompts_per_rank * args.samples_per_prompt * min(args.sync_interval, args.num_steps)
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
        # ---- sync: ALGO LOGIC: every s steps the generator gets the weights being trained.
        # CRUCIAL: also the first step after a start or a resume, before any generation.
        window_tokens = 0
        if (step - 1) % args.sync_interval == 0 or step == start_step + 1:
            with timer("sync"):
                generator.sync_weights(policy)
            last_sync = step - 1  # the generator holds the weights of `last_sync` optimizer steps
            # ALGO LOGIC: the rollouts of each step to the next sync in one call, with its own seeds
            window = range(step, min(last_sync // args.sync_interval * args.sync_interval
                                     + args.sync_interval, args.num_steps) + 1)
            with timer("generate"):
                flat = generator.generate([prompt_ids[i] for i in order.indices(*window)], n=n,
                                          temperature=args.temperature, top_p=args.top_p,
                                          max_tokens=args.max_new_tokens, seed=order.seeds(*window))
                generator.sleep()
            window_outs = dict(zip(window, common.chunks(flat, args.prompts_per_rank), strict=True))
            window_tokens = sum(len(c.token_ids) for o in flat for c in o)  # counted at the sync
        ref_every = args.ref_sync_interval or args.sync_interval  # ALGO LOGIC: the (math) reference
        if "synced" in references and ((step - 1) % ref_every == 0 or step == start_step + 1):
            with timer("sync"):
                common.copy_weights(policy, references["synced"])

        # ---- rollout
        with timer("generate"):
            idx = order.indices(step)
            batch, prompts = [rows[i] for i in idx], [prompt_ids[i] for i in idx]
            outs = window_outs.pop(step)  # sampled by weights `step - 1 - last_sync` steps old

        # ---- score: each row by its task's reward (REWARDS)
        with timer("score"):
            rewards, nonfinite = common.score(REWARDS, batch, outs, reward_model)  # (P, n), (P,)

        # ---- pairs: ALGO LOGIC: one (chosen, rejected) pair per prompt at most (--group-dpo: all)
        tasks = [r["task"] for r in batch]
        pairs = select_pairs(rewards, tasks, order.seeds(step), args.group_dpo)
        # Speed: pairs sorted by length, so a micro-batch pads little (a pair stays in one)
        pairs.sort(key=lambda p: len(prompts[p[0]]) + max(len(outs[p[0]][i].token_ids)
                                                          for i in p[1:]))
        pair_weights, flat_advantages = group_terms(pairs, rewards)  # (K,), (2K,) --grpo-coef
        samples = [(j, i) for j, c, r in pairs for i in (c, r)]  # chosen, rejected, chosen, ...
        flat_prompts = [prompts[j] for j, _ in samples]
        flat_completions = [outs[j][i] for j, i in samples]
        flat_refs = ["synced" if tasks[j] in args.synced_tasks else "fixed"
                     for j, _, _ in pairs for _ in (0, 1)]
        chosen_tokens = sum(len(c.token_ids) for c in flat_completions[0::2])
        nll_pooling = len(pairs) / max(chosen_tokens, 1) if args.nll_length_normalize else 1.0

        # ---- update: reference logprobs, one optimizer step over micro-batches (a pair in one)
        lr = args.learning_rate * min(1.0, step / max(args.warmup_steps, 1))  # warm-up, constant
        common.set_lr(optimizer, lr)
        kept = []  # what each micro-batch measured, for the metrics after the update
        with timer("train"):
            size = 2 * max(run.micro_batch_size // 2, 1)
            for mb in common.micro_batches(len(flat_completions), size):  # same count on all ranks
                mb_prompts, mb_completions, weight = flat_prompts[mb], flat_completions[mb], 1.0
                mb_refs, mb_weights = flat_refs[mb], pair_weights[mb.start // 2 : mb.stop // 2]
                mb_advantages = flat_advantages[mb]
                if not mb_completions:  # a padding pass: same collectives, no gradient, no stats
                    mb_prompts, mb_completions, weight = [prompts[0]] * 2, [outs[0][0]] * 2, 0.0
                    mb_refs, mb_weights, mb_advantages = [kinds[0]] * 2, [1.0], [0.0, 0.0]
                mb_tokens = [c.token_ids for c in mb_completions]
                # CRUCIAL: every reference runs on every rank (FSDP); each row keeps its task's
                with torch.no_grad(), common.autocast(device, dtype):
                    ref_logps_by_kind = {kind: common.completion_logprobs(
                        ref, mb_prompts, mb_tokens, args.temperature, tokenizer.pad_token_id)[0]
                        for kind, ref in references.items()}
                ref_logps = torch.stack([ref_logps_by_kind[kind][i]
                                         for i, kind in enumerate(mb_refs)])  # (2K, T)
                with common.autocast(device, dtype):
                    logps, mask, entropy = common.completion_logprobs(
                        policy, mb_prompts, mb_tokens, args.temperature, tokenizer.pad_token_id,
                        with_entropy=True)
                seq_sum, ref_sum = (logps * mask).sum(-1), (ref_logps * mask).sum(-1)  # (2K,)
                tokens, seq, ref_seq = mask.sum(-1).clamp(min=1), seq_sum, ref_sum
                if args.length_norm == "sequence":  # ALGO LOGIC: token means, reference alike
                    seq, ref_seq = seq_sum / tokens, ref_sum / tokens
                mb_weights = torch.tensor(mb_weights, device=device)
                loss, chosen_logratio, rejected_logratio = dpo_loss(
                    seq[0::2], seq[1::2], ref_seq[0::2], ref_seq[1::2], args.beta, args.nll_scale,
                    -seq_sum[0::2].sum() * nll_pooling, args.prompts_per_rank, mb_weights)
                bonus, grpo = torch.zeros((), device=device), torch.zeros((), device=device)
                if args.entropy_coef:  # ALGO LOGIC: the authors' entropy bonus on the chosen
                    chosen_entropy = (entropy * mask).sum(-1)[0::2]  # (K,) summed over tokens
                    bonus = args.entropy_coef * (mb_weights * chosen_entropy / tokens[0::2]).sum()
                if args.grpo_coef:  # ALGO LOGIC: + A x GRPO's objective on the groups (ρ = 1)
                    advantages = torch.tensor(mb_advantages, device=device)
                    grpo = args.grpo_coef * (advantages * seq_sum).sum() / n
                loss = loss - (bonus + grpo) / args.prompts_per_rank
                (loss * weight).backward()
                if weight:  # what the metrics need; a padding pass keeps nothing
                    kept.append({
                        **common.update_stats(logps, mask, entropy, mb_prompts, mb_completions),
                        "loss": loss.item(),
                        "kl_sum": seq_sum.sum().item() - ref_sum.sum().item(),  # k1 per token
                        "chosen_logratio": chosen_logratio.sum().item(),
                        "rejected_logratio": rejected_logratio.sum().item(),
                        "nll_sum": -seq_sum[0::2].sum().item(),
                        "chosen_tokens": mask[0::2].sum().item(),
                        "pair_accuracy": (chosen_logratio > rejected_logratio).sum().item(),
                        "entropy_bonus": bonus.item() / args.prompts_per_rank,
                        "grpo_term": grpo.item() / args.prompts_per_rank})
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        # ---- log: this rank's sums, summed over ranks, then ratios (ranks hold different rows)
        sums = common.add_up(kept, "gap_sum", "kl_sum", "chosen_logratio", "rejected_logratio",
                             "nll_sum", "chosen_tokens", "pair_accuracy", "entropy_bonus",
                             "grpo_term")
        sums |= common.rollout_sums(batch, outs, rewards, nonfinite, reward_model)
        sums["rollout_tokens"] = window_tokens
        sums["pairs"] = len(pairs)
        sums["reward_margin"] = float(sum(rewards[j, c] - rewards[j, r] for j, c, r in pairs))
        sums |= {f"{task}_pairs": sum(tasks[j] == task for j, _, _ in pairs)
                 for task in ("math", "chat")}
        s, s_max = common.reduce_step(sums, kept, device)
        metrics = {"step": step, **train_metrics(s, args), "train/grad_norm": float(grad_norm),
                   "train/lr": lr, "rollout/policy_lag": step - 1 - last_sync,
                   **common.rollout_metrics(s), **common.trainer_metrics(s, s_max, timer)}
        if eval_rows and (step % run.eval_every == 0 or step == args.num_steps):
            metrics.update(evaluate())
        progress.step(metrics, batch, outs, rewards, pairs=pairs)  # all ranks (a gather)

        # ---- checkpoints: the trainer state to resume; the best model by validation (to keep)
        if step % run.save_every == 0 or step == args.num_steps:
            common.save_checkpoint(ckpt_dir, step, policy, optimizer, tokenizer, dtype)
        common.save_best(run.output_dir, metrics, policy, tokenizer, dtype)  # on evaluation steps

    # ---- final save -----------------------------------------------------------------------------
    common.finish(logger, generator, run.output_dir, t_start)


if __name__ == "__main__":
    common.run(main, tyro.cli(Args))
