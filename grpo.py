"""GRPO, the on-policy end of the spectrum (sync interval s = 1), as in Lanchantin et al. 2025.

Every step:
1. sync: push the trainer's weights into the vLLM generator, before every generation (s = 1);
2. rollout: sample `samples_per_prompt` completions for each of this rank's prompts;
3. score: Math-Verify for math prompts, the reward model for chat prompts;
4. advantages: A_i = r_i - mean(group), divided by std(group) + eps (the authors' code; the
   paper's formula is mean-only: `--no-std-normalize`); groups with equal rewards get A = 0;
5. reference logprobs from the fixed seed model (only when `kl_coef` > 0; not even loaded else);
6. one optimizer step on  -(1/B) Σ_prompts (1/n) Σ_i Σ_t [ρ_t A_i - β KL_t]  with per-sequence
   token *sums* (no length normalisation: the paper found it biased), B the global number of
   prompts, ρ_t = exp(logp - logp.detach()) ≡ 1 (purely on-policy: one update per batch of
   generations, so PPO's clipping would never trigger and is left out), and KL_t the k3
   estimator exp(ref - logp) - (ref - logp) - 1;
7. log one metrics dict, evaluate every `eval_every` steps, checkpoint every `save_every`.

Choices where the paper is silent: constant learning rate after a linear warm-up; AdamW betas
(0.9, 0.95), no weight decay; `rollout/entropy` and the logprob gap are measured on the
completions the trainer runs on; a mixed math + chat batch follows each prompt's task (its own
reward). Not deterministic: vLLM on GPU (batch-dependent kernels).
GRPO: advantages within each prompt's group, so the verifier's 0 / 1 and a reward model's scale
never meet in one normalisation.

Run:
    python grpo.py                                          # embedded default, CPU, a few minutes
    torchrun --standalone --nproc_per_node=2 grpo.py        # 2 processes (CPU: gloo; GPU: NCCL)
    torchrun --nproc_per_node 8 grpo.py \\                  # the paper's math run (Llama-3.1-8B)
        --model meta-llama/Llama-3.1-8B-Instruct --dataset AI-MO/NuminaMath-CoT --paper-math-filter \\
        --eval-dataset HuggingFaceH4/MATH-500 --eval-split test --num-steps 1000 \\
        --prompts-per-step 64 --samples-per-prompt 8 --max-new-tokens 2048 --max-model-len 4096 \\
        --learning-rate 1e-6 --adam-eps 1e-8 --max-grad-norm 0.1 --kl-coef 0.001 \\
        --micro-batch-size 4 --vllm-sleep --reward-model Nexusflow/Athene-RM-8B

Differs from `online_dpo.py` in: the objective (group advantages and a policy-gradient loss on
every sample instead of one chosen/rejected pair per prompt) and the fixed reference.
"""

import contextlib
import os
import time
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import tyro

import common


# ---------------------------------------------------------------------------------------------
# Args
# ---------------------------------------------------------------------------------------------
@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (run folder and wandb run name)"""
    seed: int = 1
    """seed of the run: model init order, data order and every vLLM sampling seed derive from it"""
    track: bool = False
    """log to Weights & Biases (metrics.jsonl is always written)"""
    wandb_project_name: str = "bridging-rl"
    """the wandb project"""
    model: str = "embedded/policy"
    """seed policy (and reference): a hub id or a local Hugging Face folder"""
    reward_model: str = "embedded/reward_model"
    """scalar reward model for chat prompts (loaded only if the data has chat rows)"""
    rm_max_length: int = 4096
    """reward model: (prompt, response) truncated to this many of its tokens (the paper: 4096)"""
    rm_batch_size: int = 8
    """reward model: sequences per forward pass (memory only)"""
    rm_offload: bool = False
    """keep the reward model in CPU memory between uses, on the device only while it scores"""
    dataset: str = "embedded/data/math_train.jsonl"
    """training prompts: `[math:|chat:]NAME[@CONFIG][:WEIGHT]`, comma-separated to mix: a hub id
    (`openai/gsm8k@main`), a local folder or a .jsonl / .json / .parquet file; rows are math or chat,
    each scored by its own reward; a prefix forces the task (docs/data.md)"""
    dataset_split: str = "train"
    """split of a hub dataset"""
    eval_dataset: str = "embedded/data/math_test.jsonl"
    """held-out prompts ('' to skip): math rows give eval/accuracy, chat rows eval/chat/* (mix as
    for `dataset`, e.g. `embedded/data/math_test.jsonl,embedded/data/chat_test.jsonl`)"""
    eval_split: str = "test"
    """split of a hub eval dataset"""
    math_template: str = common.PAPER_MATH_TEMPLATE
    """user turn for rows that give a `problem` (rows with a `prompt` are used verbatim)"""
    paper_math_filter: bool = False
    """drop proofs, multiple choice and NuminaMath's synthetic subsets from the training prompts (the
    paper's NuminaMath-CoT filter)"""
    output_dir: str = ""
    """where checkpoints and metrics.jsonl go (default: runs/<exp_name>__<seed>)"""
    resume: bool = False
    """continue the run in output_dir from its last checkpoint"""
    trust_remote_code: bool = False
    """allow model repos to run their own code"""
    num_steps: int = 200
    """optimizer steps"""
    prompts_per_step: int = 8
    """prompts per optimizer step, over all ranks (the paper: 64 math, 32 chat)"""
    samples_per_prompt: int = 8
    """completions per prompt (the paper's GRPO group size: 8)"""
    max_new_tokens: int = 48
    """completion length limit (the paper: 2048 math, 1024 chat)"""
    max_model_len: int = 256
    """prompt + completion limit of the vLLM engine; longer prompts are dropped at start"""
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
    micro_batch_size: int = 64
    """sequences per forward/backward pass (gradients accumulate to one step; sorted by length)"""
    activation_checkpointing: Literal["auto", "on", "off"] = "auto"
    """recompute each decoder layer's activations in the backward pass instead of keeping them
    (auto: on a GPU, and on the CPU for 100M+ parameters; for the tiny embedded models it only costs time)"""
    eval_every: int = 25
    """evaluate every N steps (and at the start and the end; 0 disables)"""
    eval_samples: int = 4
    """samples per held-out problem (the paper: 50)"""
    eval_temperature: float = 0.6
    """eval sampling temperature (the paper: 0.6)"""
    eval_top_p: float = 0.9
    """eval nucleus sampling (the paper: 0.9)"""
    eval_limit: int = 300
    """evaluate on at most this many held-out prompts per task"""
    save_every: int = 100
    """checkpoint every N steps (and at the end)"""
    log_samples_every: int = 25
    """print a few prompt / completion / reward samples every N steps"""
    gpu_memory_utilization: float = 0.0
    """GPU memory fraction vLLM takes (0: 0.3, 0.5 with --vllm-sleep); on the CPU, 0 sizes its KV
    cache to one step's sequences"""
    vllm_sleep: bool = False
    """GPU: free vLLM's memory while the trainer updates (sleep mode)"""
    generator_dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """the engine's precision (auto: bf16 on a GPU, fp32 on the CPU); bfloat16 on the CPU reproduces a
    GPU's trainer-engine logprob gap on a laptop (what --tis-cap corrects)"""

    # Algorithm specific arguments
    kl_coef: float = 0.001
    """β of the k3 KL penalty to the fixed seed reference (the paper: 0.001; 0 skips the reference)"""
    std_normalize: bool = True
    """divide group advantages by std + eps (the authors' code) rather than mean-only (the paper's formula)"""
    adv_eps: float = 1e-6
    """eps of the std normalisation (the authors' code: 1e-6)"""
    entropy_coef: float = 0.0
    """entropy bonus: loss -= C Σ_i mean_t H_t / B over every rollout (the paper's ablation: 1e-4 to
    5e-4; it did not reliably stop the entropy collapse)"""
    length_norm: Literal["none", "sequence", "token"] = "none"
    """none: per-sequence token sums (the paper's main runs); sequence: each sequence's token mean (the
    authors' code default; the paper: biased toward short answers, less stable); token: / the step's
    completion tokens"""
    tis_cap: float = 0.0
    """importance sampling against the engine's logprobs of the sampled tokens, weights w = π_θ / π_vLLM
    capped at C (0: off, the paper; the authors' code later: 2 at token level; TRL: a sequence mask at 3)"""
    tis_level: Literal["token", "sequence"] = "token"
    """--tis-cap: one weight per token, or per sequence (the exp of its summed log-ratio)"""
    tis_mode: Literal["truncate", "mask"] = "truncate"
    """--tis-cap: truncate: min(w, C); mask: w where w <= C, else 0"""

    # filled in after parsing (not flags: logged with the config)
    world_size: tyro.conf.Suppress[int] = 0
    """number of ranks"""
    prompts_per_rank: tyro.conf.Suppress[int] = 0
    """prompts_per_step / world_size"""


def group_advantages(rewards: torch.Tensor, std_normalize: bool, eps: float) -> torch.Tensor:
    """(P, n) rewards -> (P, n) advantages: reward minus its group's mean, optionally / (std + eps)."""
    adv = rewards - rewards.mean(dim=1, keepdim=True)
    if std_normalize:
        adv = adv / (rewards.std(dim=1, keepdim=True) + eps)
    return adv


def tis_weights(logps, engine_logps, mask, cap: float, level: str, mode: str) -> torch.Tensor:
    """(S, T) importance weights of each sampled token for the trainer's policy against the engine's
    sampling distribution, w = exp(log π_θ - log π_vLLM), per token or per sequence (the exp of the
    summed log-ratio), truncated (min(w, cap)) or masked (w where w <= cap, else 0). Detached, as in
    the TIS paper and TRL: a correction of the sampling distribution, not a term to optimise.
    Returns (weights, the (S, T) mask of tokens whose weight was truncated or masked)."""
    log_w = (logps.detach() - engine_logps) * mask  # (S, T)
    if level == "sequence":
        log_w = log_w.sum(-1, keepdim=True).expand_as(log_w)
    w = log_w.exp()
    return (w.clamp(max=cap) if mode == "truncate" else torch.where(w <= cap, w, 0.0)) * mask, (w > cap) * mask


def grpo_loss(logps, ref_logps, mask, advantages, kl_coef: float, num_prompts: int, group_size: int,
              length_norm: str = "none", num_tokens: float = 0.0, weights=None, entropy=None,
              entropy_coef: float = 0.0):
    """-(1/B) Σ_prompts (1/n) Σ_i Σ_t [w_t ρ_t A_i - β KL_t] - C Σ_i mean_t H_t / B over the
    sequences given (a micro-batch).

    logps, ref_logps, mask, weights (TIS, or None: 1), entropy: (S, T) per token; advantages: (S,).
    ref_logps may be None (β = 0). B = `num_prompts`, n = `group_size`: normalise by the whole batch,
    not the micro-batch, so accumulated micro-batches sum to the loss of the step. `length_norm`:
    "none" sums each sequence's tokens, "sequence" averages them, "token" divides the whole sum by
    `num_tokens` (this rank's share of the step's completion tokens) instead of B n.
    Returns (loss, kl_sum over tokens, the entropy bonus subtracted).
    """
    ratio = torch.exp(logps - logps.detach())  # ≡ 1; its gradient is ∇logp (on-policy)
    per_token = ratio * advantages[:, None]  # (S, T)
    if weights is not None:  # ALGO LOGIC (--tis-cap): the engine sampled these tokens, not π_θ exactly
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


def main(args: Args) -> None:
    # -----------------------------------------------------------------------------------------
    # distributed setup & seeding
    # -----------------------------------------------------------------------------------------
    rank, world_size, device = common.setup_distributed()
    common.check_args(args, world_size)  # every flag and local path, before any model loads
    args.world_size, args.prompts_per_rank = world_size, args.prompts_per_step // world_size
    args.output_dir = args.output_dir or f"runs/{args.exp_name}__{args.seed}"
    common.claim_output_dir(args, world_size, rank)  # this run's alone, while it runs
    ckpt_dir = os.path.join(args.output_dir, "checkpoint")
    common.seed_everything(args.seed)  # CRUCIAL: the same seed on every rank (identical init)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    # -----------------------------------------------------------------------------------------
    # data
    # -----------------------------------------------------------------------------------------
    tokenizer = common.load_tokenizer(args.model, args.trust_remote_code)
    max_prompt = args.max_model_len - args.max_new_tokens  # room to answer in full, held-out prompts too
    rows = common.load_prompts(args.dataset, args.dataset_split, args.math_template,
                               paper_math_filter=args.paper_math_filter, verbose=rank == 0, seed=args.seed)
    rows, prompt_ids, dropped = common.fit_prompts(tokenizer, rows, max_prompt, args.prompts_per_step, "--dataset")
    eval_rows, eval_dropped = [], 0
    if args.eval_dataset and args.eval_every > 0:
        eval_rows = common.load_prompts(args.eval_dataset, args.eval_split, args.math_template, verbose=rank == 0)
        eval_rows, _, eval_dropped = common.fit_prompts(tokenizer, eval_rows, max_prompt, 1, "--eval-dataset")
    order = common.StepOrder(len(rows), args.seed, args.prompts_per_step, rank, world_size)  # each step's prompts, seeds

    # -----------------------------------------------------------------------------------------
    # models & optimizer
    # -----------------------------------------------------------------------------------------
    policy = common.fsdp_wrap(common.load_model(args.model, device, trust_remote_code=args.trust_remote_code,
                                                 activation_checkpointing=args.activation_checkpointing))
    reference = None
    if args.kl_coef > 0:  # ALGO LOGIC: GRPO's KL is to the fixed seed model
        reference = common.fsdp_wrap(common.load_model(args.model, device, trainable=False,
                                                        trust_remote_code=args.trust_remote_code))
    reward_model = None
    if any(r["task"] == "chat" for r in rows + eval_rows):
        reward_model = common.RewardModel(args.reward_model, device, max_length=args.rm_max_length,
                                          batch_size=args.rm_batch_size, offload=args.rm_offload,
                                          trust_remote_code=args.trust_remote_code, verbose=rank == 0)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, betas=args.adam_betas,
                                  eps=args.adam_eps, weight_decay=args.weight_decay)
    start_step = common.load_checkpoint(ckpt_dir, policy, optimizer) if args.resume else 0

    # -----------------------------------------------------------------------------------------
    # generation engine
    # -----------------------------------------------------------------------------------------
    generator = common.Generator(args.model, max_model_len=args.max_model_len,
                                 max_num_seqs=args.prompts_per_rank * args.samples_per_prompt,
                                 gpu_memory_utilization=args.gpu_memory_utilization,
                                 dtype=common.engine_dtype(args.generator_dtype, device), seed=args.seed,
                                 enable_sleep_mode=args.vllm_sleep, trust_remote_code=args.trust_remote_code)
    logger = common.MetricsLogger(args.output_dir, asdict(args), args.track, args.wandb_project_name,
                                  f"{args.exp_name}__{args.seed}", resume_step=start_step) if rank == 0 else None
    if rank == 0:
        print(f"{args.exp_name}: {len(rows)} prompts ({dropped} too long, dropped), {len(eval_rows)} held out "
              f"({eval_dropped} too long, dropped), {world_size} rank(s), "
              f"{args.num_steps} steps of {args.prompts_per_step}x{args.samples_per_prompt} -> {args.output_dir}")

    def evaluate(step: int) -> dict:
        """eval/* on the held-out prompts (math accuracy, chat reward), sharded over ranks, reduced."""
        generator.sync_weights(policy)  # evaluate the weights being trained, not a stale generator
        eval_metrics = common.evaluate(generator, tokenizer, reward_model, eval_rows, k=args.eval_samples,
                                       temperature=args.eval_temperature, top_p=args.eval_top_p,
                                       max_tokens=args.max_new_tokens, seed=args.seed, limit=args.eval_limit)
        generator.sleep()  # CRUCIAL (--vllm-sleep): the engine asleep again before the update
        return eval_metrics

    # -----------------------------------------------------------------------------------------
    # training loop
    # -----------------------------------------------------------------------------------------
    n, t_start = args.samples_per_prompt, time.time()
    if eval_rows and start_step == 0:
        eval_metrics = evaluate(0)
        if rank == 0:
            logger.log({"step": 0, **eval_metrics})
            print("step 0 | " + common.eval_line(eval_metrics), flush=True)
    progress = common.Progress(args.num_steps, args.log_samples_every)
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
            outs = generator.generate(prompts, n=n, temperature=args.temperature, top_p=args.top_p,
                                      max_tokens=args.max_new_tokens, seed=order.seeds(step))
            generator.sleep()

        # ---- score: Math-Verify for math rows, the reward model for chat rows
        with timer("score"):
            rewards, nonfinite = common.score(reward_model, batch, outs)  # (P, n), (P,)

        # ---- build batch: ALGO LOGIC: group-relative advantages, one per completion
        advantages = group_advantages(rewards, args.std_normalize, args.adv_eps).flatten()  # (P*n,)
        # Speed: sequences sorted by length, so a micro-batch pads little (with smaller micro-batches
        # and long, uneven rollouts); the loss is a sum over sequences, so their order is free
        by_length = sorted(range(len(prompts) * n), key=lambda i: len(prompts[i // n]) + len(outs[i // n][i % n].token_ids))
        flat_prompts = [prompts[i // n] for i in by_length]
        flat_completions = [outs[i // n][i % n] for i in by_length]
        advantages = advantages[by_length]
        micro_batches = [slice(i, i + args.micro_batch_size) for i in range(0, len(flat_completions), args.micro_batch_size)]
        num_tokens = 0.0  # --length-norm token: the loss / the step's completion tokens (this rank's share:
        if args.length_norm == "token":  # FSDP averages over ranks), one collective for the count
            num_tokens = common.all_reduce({"t": sum(len(c.token_ids) for c in flat_completions)})["t"] / world_size

        # ---- reference logprobs, update: one optimizer step, gradients accumulated over micro-batches
        lr = common.set_lr(optimizer, args.learning_rate * min(1.0, step / max(args.warmup_steps, 1)))  # warm-up, then constant
        sums, gap_max = dict.fromkeys(("loss", "kl_sum", "tokens", "entropy_sum", "gap_sum", "entropy_bonus", "tis_sum",
                                       "tis_capped"), 0.0), 0.0
        with timer("train"):
            for mb in micro_batches:
                mb_prompts, mb_completions = flat_prompts[mb], flat_completions[mb]
                mb_tokens = [c.token_ids for c in mb_completions]
                ref_logps = None
                if reference is not None:
                    with torch.no_grad(), autocast:
                        ref_logps = common.completion_logprobs(reference, mb_prompts, mb_tokens, args.temperature,
                                                               tokenizer.pad_token_id)[0]
                with autocast:
                    logps, mask, entropy = common.completion_logprobs(policy, mb_prompts, mb_tokens, args.temperature,
                                                                      tokenizer.pad_token_id, with_entropy=True)
                weights, capped = None, torch.zeros(())
                if args.tis_cap:  # ALGO LOGIC: importance weights against the engine's own logprobs
                    weights, capped = tis_weights(logps, common.engine_logprobs(mb_completions, logps), mask,
                                                  args.tis_cap, args.tis_level, args.tis_mode)
                loss, kl_sum, bonus = grpo_loss(logps, ref_logps, mask, advantages[mb].to(device), args.kl_coef,
                                                args.prompts_per_rank, n, args.length_norm, num_tokens, weights,
                                                entropy, args.entropy_coef)
                loss.backward()
                # ~0 right after a sync, then growing with the policy lag: how stale the generator's samples are
                gap_sum, mb_gap_max = common.logprob_gap(logps, mask, mb_completions)
                gap_max = max(gap_max, mb_gap_max)
                sums["loss"] += loss.item()
                sums["kl_sum"] += kl_sum.item()
                sums["tokens"] += mask.sum().item()
                sums["entropy_sum"] += entropy.sum().item()
                sums["gap_sum"] += gap_sum
                sums["entropy_bonus"] += bonus.item()
                sums["tis_sum"] += weights.sum().item() if weights is not None else 0.0
                sums["tis_capped"] += capped.sum().item()
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        # ---- log: sums over ranks, then ratios (ranks may hold different numbers of math rows)
        sums |= common.rollout_sums(batch, outs, rewards, nonfinite)
        sums["rollout_tokens"] = sums["completion_tokens"]
        sums["train_tokens"] = sum(len(p) + len(c.token_ids) for p, c in zip(flat_prompts, flat_completions, strict=True))
        s, s_max = common.reduce_step(sums, {"gap_max": gap_max}, device)
        metrics = {
            "step": step,
            "train/loss": s["loss"] / world_size,  # each rank's loss is already / its prompts
            "train/kl": s["kl_sum"] / max(s["tokens"], 1),
            "train/grad_norm": grad_norm.item() if hasattr(grad_norm, "item") else float(grad_norm),
            "train/lr": lr,
            "rollout/policy_lag": step - 1 - last_sync,
            **common.rollout_metrics(s), **common.trainer_metrics(s, s_max, timer),
        }
        if args.entropy_coef:
            metrics["train/entropy_bonus"] = s["entropy_bonus"] / world_size
        if args.tis_cap:
            metrics |= {"train/tis_weight_mean": s["tis_sum"] / max(s["tokens"], 1),
                        "train/tis_capped_frac": s["tis_capped"] / max(s["tokens"], 1)}
        if eval_rows and (step % args.eval_every == 0 or step == args.num_steps):
            metrics.update(evaluate(step))
        if rank == 0:
            logger.log(metrics)
            progress.step(metrics, batch, outs, rewards)

        # ---- checkpoint
        if step % args.save_every == 0 or step == args.num_steps:
            common.save_checkpoint(ckpt_dir, step, policy, optimizer, tokenizer)

    # -----------------------------------------------------------------------------------------
    # final save
    # -----------------------------------------------------------------------------------------
    common.finish(logger, generator, args.output_dir, t_start)


if __name__ == "__main__":
    common.run(main, tyro.cli(Args))
