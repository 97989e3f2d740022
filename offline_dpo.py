"""Offline DPO (sync interval s = ∞), as in Lanchantin et al. 2025 (arXiv 2506.21495).

The generator never receives the trainer's weights: every rollout comes from the seed model,
generated once before training. Two phases:

Build the pairs, once (skipped with `--pairs`, or on `--resume` when the run's file exists):
1. rollout: sample `samples_per_prompt` completions for every training prompt (or the first
   `max_prompts`) from the seed model with vLLM, prompts sharded over ranks;
2. score: Math-Verify for math prompts, the reward model for chat prompts;
3. pairs, one per prompt at most, with online DPO's rules: math -> a random correct vs a random
   incorrect completion (all-correct / all-wrong prompts are skipped); chat -> highest vs lowest
   reward-model score (skipped when all equal);
4. save them to `<output_dir>/pairs.jsonl`: an ordinary preference dataset (`prompt`, `chosen`,
   `rejected`, their rewards, `task`, `answer`) that `datasets.load_dataset("json", ...)` reads
   and `--pairs` reuses.
Train, no sync ever:
5. each step takes `pairs_per_step` pairs from a seeded per-epoch order, for `epochs` passes;
6. reference logprobs from the fixed seed model (the paper: offline DPO's reference never moves);
7. one optimizer step on  Σ_pairs -log σ(β [(log π(y_c) - log π_ref(y_c)) - (log π(y_r) - log π_ref(y_r))]) / B
   with log-probs *summed* over completion tokens and B = pairs_per_step, plus `nll_scale` × the
   chosen completion's per-token NLL (default 0);
8. log one metrics dict, evaluate every `eval_every` steps, checkpoint every `save_every`.

`--pairs` also trains on any existing preference dataset with chosen / rejected columns (hub or
local; strings or chat messages, see common/data.py), which is what most offline DPO users have.

Choices where the paper is silent: 8 samples per prompt; 1 epoch; constant learning rate after
a linear warm-up; AdamW betas (0.9, 0.95), no weight decay; replies are re-tokenised from the
saved text (the file stays an ordinary text dataset), with the tokenizer's EOS appended to a reply
that ended and not to one cut at max_new_tokens; pairs longer than max_model_len are dropped.
`rollout/entropy` is measured on the chosen and rejected completions the trainer runs on;
`train/kl` is k1, `log π_ref - log π` (the tokens come from the reference, where the online
scripts' k3 blows up). Default lr 2e-5, not the online scripts' 5e-5: on the embedded default
5e-5 over-fits the fixed pairs within one epoch (README). Not deterministic: vLLM on GPU
(batch-dependent kernels) when the pairs are built.

Run:
    python offline_dpo.py                                    # embedded default, CPU, a few minutes
    torchrun --standalone --nproc_per_node=2 offline_dpo.py  # 2 processes (CPU: gloo; GPU: NCCL)
    torchrun --nproc_per_node 8 offline_dpo.py \\            # the paper's math run (Llama-3.1-8B)
        --model meta-llama/Llama-3.1-8B-Instruct --dataset AI-MO/NuminaMath-CoT --max-prompts 64000 \\
        --eval-dataset HuggingFaceH4/MATH-500 --eval-split test --num-steps 1000 \\
        --pairs-per-step 64 --samples-per-prompt 8 --max-new-tokens 2048 --max-model-len 4096 \\
        --learning-rate 1e-6 --adam-eps 1e-4 --max-grad-norm 0.1 --beta 0.1 --micro-batch-size 4
    python offline_dpo.py --pairs runs/offline_dpo__1/pairs.jsonl --output-dir runs/again  # reuse pairs
    python offline_dpo.py --pairs HuggingFaceH4/ultrafeedback_binarized --pairs-split train_prefs \\
        --model Qwen/Qwen2.5-0.5B-Instruct --eval-dataset '' --beta 0.01   # an existing dataset

Differs from `semi_online_dpo.py` / `online_dpo.py` in: the sync interval (∞: all pairs are
built once, from the seed, before training), the reference (fixed, as in the paper for offline
DPO) and the batch unit (a step takes `pairs_per_step` ready pairs instead of prompts).
"""

import contextlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
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
    rm_offload: bool = False
    """keep the reward model in CPU memory between uses, on the device only while it scores"""
    dataset: str = "embedded/data/math_train.jsonl"
    """training prompts: `[math:|chat:]NAME[@CONFIG][:WEIGHT]`, comma-separated to mix: a hub id
    (`openai/gsm8k@main`), a local folder or a .jsonl / .json / .parquet file; rows are math or chat,
    each scored by its own reward; a prefix forces the task (README: Data)"""
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
    num_steps: int = 0
    """optimizer steps (0: `epochs` passes over the pairs)"""
    pairs_per_step: int = 8
    """preference pairs per optimizer step, over all ranks (the paper: 64 math, 32 chat)"""
    samples_per_prompt: int = 8
    """completions per prompt when building the pairs"""
    max_new_tokens: int = 48
    """completion length limit (the paper: 2048 math, 1024 chat)"""
    max_model_len: int = 256
    """prompt + completion limit of the vLLM engine; longer prompts and pairs are dropped at start"""
    temperature: float = 1.0
    """sampling temperature of the rollouts that make the pairs (the paper: 1.0)"""
    top_p: float = 1.0
    """nucleus sampling of the rollouts that make the pairs (the paper: 1.0)"""
    learning_rate: float = 2e-5
    """AdamW learning rate, constant after warm-up (the paper: 1e-6 for an 8B model; the online
    scripts' 5e-5 over-fits the fixed pairs of the embedded default, see README)"""
    warmup_steps: int = 10
    """linear learning-rate warm-up"""
    adam_eps: float = 1e-8
    """AdamW epsilon (the paper: 1e-8 chat; 1e-4 stopped DPO divergence on math)"""
    max_grad_norm: float = 1.0
    """gradient clipping (the paper: 0.1)"""
    micro_batch_size: int = 64
    """sequences per forward/backward pass (gradients accumulate to one step; sorted by length)"""
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
    """memory fraction vLLM reserves (0: 0.3 on GPU; on CPU, of the NUMA node, 0.15)"""

    # Algorithm specific arguments
    beta: float = 0.1
    """DPO β (the paper: 0.1 math, 0.01 chat)"""
    nll_scale: float = 0.0
    """weight of the chosen completion's per-token NLL (the paper's ablation: 1.0, no gain)"""
    epochs: int = 1
    """passes over the pairs (when num_steps is 0)"""
    pairs: str = ""
    """train on this preference dataset (a pairs.jsonl written by this script, or any hub / local
    dataset with chosen / rejected columns) instead of building pairs"""
    pairs_split: str = "train"
    """split of a hub preference dataset"""
    max_prompts: int = 0
    """build pairs from at most this many training prompts (0: all)"""

    # filled in after parsing
    world_size: int = 0
    """number of ranks"""
    pairs_per_rank: int = 0
    """pairs_per_step / world_size"""
    num_pairs: int = 0
    """pairs trained on (after dropping those longer than max_model_len)"""


def select_pairs(rewards: torch.Tensor, tasks: list[str], rng: random.Random) -> list[tuple[int, int, int]]:
    """(prompt j, chosen i, rejected i) for each prompt that yields a pair, from (P, n) rewards.

    math: a random correct (reward 1) vs a random incorrect (reward 0) completion; all-correct or
    all-wrong prompts are skipped. chat: the highest vs the lowest reward-model score (first of
    ties); skipped when every score is equal.
    """
    pairs = []
    for j, (r, task) in enumerate(zip(rewards.tolist(), tasks, strict=True)):
        if task == "math":
            correct = [i for i, x in enumerate(r) if x > 0.5]
            wrong = [i for i, x in enumerate(r) if x <= 0.5]
            if correct and wrong:
                pairs.append((j, rng.choice(correct), rng.choice(wrong)))
        elif max(r) > min(r):
            pairs.append((j, r.index(max(r)), r.index(min(r))))
    return pairs


def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lengths,
             beta: float, nll_scale: float, num_prompts: int):
    """Σ_pairs [-log σ(β (Δ_chosen - Δ_rejected)) + nll_scale · NLL_chosen] / num_prompts.

    Inputs are (K,) per-pair *summed* log-probs (Δ = log π - log π_ref) and chosen lengths in
    tokens; NLL_chosen is per token. Dividing by the whole batch's prompts, not the pairs, keeps
    a step with few valid pairs from being up-weighted. Returns (loss, chosen Δ, rejected Δ, NLL).
    """
    chosen_logratio = chosen_logps - ref_chosen_logps
    rejected_logratio = rejected_logps - ref_rejected_logps
    losses = -F.logsigmoid(beta * (chosen_logratio - rejected_logratio))
    nll = -chosen_logps / chosen_lengths
    loss = (losses + nll_scale * nll).sum() / num_prompts
    return loss, chosen_logratio.detach(), rejected_logratio.detach(), nll.detach()


def main(args: Args) -> None:
    # -----------------------------------------------------------------------------------------
    # distributed setup & seeding
    # -----------------------------------------------------------------------------------------
    rank, world_size, device = common.setup_distributed()
    args.world_size = world_size
    assert args.pairs_per_step % world_size == 0, "pairs_per_step must divide by the number of ranks"
    args.pairs_per_rank = args.pairs_per_step // world_size
    args.output_dir = args.output_dir or f"runs/{args.exp_name}__{args.seed}"
    args.gpu_memory_utilization = args.gpu_memory_utilization or (0.3 if device.type == "cuda" else 0.15)
    if args.samples_per_prompt < 2:
        raise common.UserError("samples_per_prompt must be >= 2: one sample per prompt gives nothing to compare")
    common.seed_everything(args.seed)  # CRUCIAL: the same seed on every rank (identical init)
    ckpt_dir = os.path.join(args.output_dir, "checkpoint")
    if rank == 0 and not args.resume and os.path.exists(os.path.join(args.output_dir, "metrics.jsonl")):
        raise common.UserError(f"{args.output_dir} already holds a run; pass --resume or another --output-dir")
    if args.resume and not common.find_checkpoint(ckpt_dir):
        raise common.UserError(f"--resume: no checkpoint in {args.output_dir}")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    # -----------------------------------------------------------------------------------------
    # data
    # -----------------------------------------------------------------------------------------
    tokenizer = common.load_tokenizer(args.model, args.trust_remote_code)
    pairs_path = args.pairs or os.path.join(args.output_dir, "pairs.jsonl")
    # ALGO LOGIC: s = ∞, the pairs are built once; a resumed run trains on the file it wrote
    build = not args.pairs and not os.path.exists(pairs_path)
    rows = []
    if build:
        rows = common.load_prompts(args.dataset, args.dataset_split, args.math_template, args.max_prompts or None,
                                   paper_math_filter=args.paper_math_filter, verbose=rank == 0)
        rows, prompt_ids, dropped = common.fit_prompts(tokenizer, rows, args.max_model_len - args.max_new_tokens,
                                                       need=1, what="--dataset")
    else:  # read before any model loads, so a bad file fails in seconds
        pairs = common.load_pairs(pairs_path, args.pairs_split, verbose=rank == 0)
    eval_rows, eval_dropped = [], 0
    if args.eval_dataset and args.eval_every > 0:  # the same length filter: room to answer in full
        eval_rows = common.load_prompts(args.eval_dataset, args.eval_split, args.math_template, verbose=rank == 0)
        eval_rows, _, eval_dropped = common.fit_prompts(tokenizer, eval_rows, args.max_model_len - args.max_new_tokens,
                                                        need=1, what="--eval-dataset")

    def batch_indices(step: int) -> list[int]:
        """This rank's pairs for `step` (1-based): a slice of a seeded per-epoch permutation, so
        a resumed run replays exactly the pairs it had not trained on yet."""
        out = []
        for j in range((step - 1) * args.pairs_per_step, step * args.pairs_per_step):
            epoch, pos = divmod(j, len(pairs))
            out.append(common.shuffled_indices(len(pairs), args.seed, epoch)[pos])
        return out[rank * args.pairs_per_rank : (rank + 1) * args.pairs_per_rank]

    def sampling_seeds(indices: list[int]) -> list[int]:
        """CRUCIAL: one vLLM seed per training prompt, a function of (run seed, prompt) only: the
        pairs do not depend on the number of ranks."""
        return [args.seed * 1_000_003 + i for i in indices]

    # -----------------------------------------------------------------------------------------
    # models & optimizer
    # -----------------------------------------------------------------------------------------
    policy = common.fsdp_wrap(common.load_model(args.model, device, trust_remote_code=args.trust_remote_code))
    reference = common.fsdp_wrap(common.load_model(args.model, device, trainable=False,
                                                    trust_remote_code=args.trust_remote_code))
    reward_model = None
    if any(r["task"] == "chat" for r in rows + eval_rows):
        reward_model = common.RewardModel(args.reward_model, device, offload=args.rm_offload,
                                          trust_remote_code=args.trust_remote_code)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, betas=(0.9, 0.95),
                                  eps=args.adam_eps, weight_decay=0.0)
    start_step = 0
    if args.resume:
        start_step = common.load_checkpoint(ckpt_dir, policy, optimizer)

    # -----------------------------------------------------------------------------------------
    # generation engine: ALGO LOGIC: it holds the seed's weights for every rollout of the run
    # (evaluation pushes the trainer's weights in, after the pairs are built)
    # -----------------------------------------------------------------------------------------
    generator = None
    if build or eval_rows:
        generator = common.Generator(args.model, max_model_len=args.max_model_len,
                                     gpu_memory_utilization=args.gpu_memory_utilization,
                                     dtype=common.default_dtype(device), seed=args.seed,
                                     trust_remote_code=args.trust_remote_code)

    # -----------------------------------------------------------------------------------------
    # build pairs: ALGO LOGIC: the only rollouts of the run, all from the seed model
    # -----------------------------------------------------------------------------------------
    n = args.samples_per_prompt
    build_metrics = {}
    if build:
        t_build, t_generate, t_score = time.time(), 0.0, 0.0
        mine = list(range(rank, len(rows), world_size))  # this rank's prompts
        built = []
        local = {"reward_sum": 0.0, "reward_sq": 0.0, "samples": 0, "zero_std": 0, "groups": 0, "nonfinite": 0, "truncated": 0,
                 "completion_tokens": 0, **{f"{task}_{x}": 0.0 for task in ("math", "chat") for x in ("reward", "samples", "tokens")}}
        chunk = 256  # prompts per vLLM call: bounds memory and shows progress; results do not depend on it
        for k in range(0, len(mine), chunk):
            # ---- rollout
            t0 = time.time()
            idx = mine[k : k + chunk]
            batch = [rows[i] for i in idx]
            prompts = [prompt_ids[i] for i in idx]
            outs = generator.generate(prompts, n=n, temperature=args.temperature, top_p=args.top_p,
                                      max_tokens=args.max_new_tokens, seed=sampling_seeds(idx))
            completions = [c for o in outs for c in o]  # (P*n), grouped by prompt
            t_generate += time.time() - t0

            # ---- score
            t0 = time.time()
            rewards = torch.zeros(len(batch), n)  # (P, n)
            math_idx = [j for j, row in enumerate(batch) if row["task"] == "math"]
            chat_idx = [j for j, row in enumerate(batch) if row["task"] == "chat"]
            if math_idx:  # each task's rows in one call: one batched reward-model pass (one move with --rm-offload)
                rewards[math_idx] = torch.tensor(common.math_rewards(
                    [c.text for j in math_idx for c in outs[j]], [batch[j]["answer"] for j in math_idx for _ in range(n)])).view(-1, n)
            if chat_idx:
                rewards[chat_idx] = torch.tensor(reward_model.score(
                    [batch[j]["prompt"] for j in chat_idx for _ in range(n)], [c.text for j in chat_idx for c in outs[j]])).view(-1, n)
            # CRUCIAL: a NaN / inf from the reward model is counted and never trained on: its group
            # becomes all-equal (no pair)
            nonfinite = ~torch.isfinite(rewards).all(dim=1)  # (P,)
            rewards[nonfinite] = 0.0
            t_score += time.time() - t0

            # ---- pairs: ALGO LOGIC: one (chosen, rejected) pair per prompt at most, online DPO's rules;
            # a per-prompt rng, so the choice does not depend on the chunk or the number of ranks
            for j, (i, row) in enumerate(zip(idx, batch, strict=True)):
                for _, c, r in select_pairs(rewards[j : j + 1], [row["task"]], random.Random(sampling_seeds([i])[0])):
                    built.append({"index": i, "task": row["task"], "prompt": row["prompt"], "answer": row["answer"],
                                  "chosen": outs[j][c].text, "rejected": outs[j][r].text,
                                  "chosen_reward": rewards[j, c].item(), "rejected_reward": rewards[j, r].item(),
                                  "chosen_eos": outs[j][c].finish_reason == "stop",
                                  "rejected_eos": outs[j][r].finish_reason == "stop"})
            lengths = torch.tensor([[len(c.token_ids) for c in o] for o in outs], dtype=torch.float)  # (P, n)
            local["reward_sum"] += rewards.sum().item()
            local["reward_sq"] += (rewards**2).sum().item()
            local["samples"] += rewards.numel()
            for task in ("math", "chat"):  # per task: a mixed batch's rewards are on different scales
                rows_t = torch.tensor([r["task"] == task for r in batch], dtype=torch.bool)
                local[f"{task}_reward"] += rewards[rows_t].sum().item()
                local[f"{task}_samples"] += rewards[rows_t].numel()
                local[f"{task}_tokens"] += lengths[rows_t].sum().item()
            local["zero_std"] += (rewards.std(dim=1) == 0).sum().item()
            local["groups"] += len(batch)
            local["nonfinite"] += nonfinite.sum().item()
            local["truncated"] += sum(c.finish_reason == "length" for c in completions)
            local["completion_tokens"] += lengths.sum().item()
            if rank == 0:
                print(f"building pairs: {min(k + chunk, len(mine)) * world_size}/{len(rows)} prompts, "
                      f"{len(built) * world_size} pairs (rank 0 x {world_size}), {time.time() - t_build:.0f} s", flush=True)
        gathered = [None] * world_size
        if dist.is_initialized():
            dist.all_gather_object(gathered, built)
        else:
            gathered = [built]
        if rank == 0:  # in prompt order, written aside then renamed: a crash never leaves half a file
            built = sorted((p for part in gathered for p in part), key=lambda p: p.pop("index"))
            os.makedirs(args.output_dir, exist_ok=True)
            with open(pairs_path + ".tmp", "w") as f:
                f.writelines(json.dumps(p) + "\n" for p in built)
            os.rename(pairs_path + ".tmp", pairs_path)
            print(f"wrote {len(built)} pairs from {len(rows)} prompts ({dropped} too long, dropped) to {pairs_path}")
        if dist.is_initialized():
            dist.barrier()
        s = common.all_reduce(local)
        reward_mean = s["reward_sum"] / s["samples"]
        build_metrics = {
            "rollout/reward_mean": reward_mean,
            "rollout/reward_std": max(s["reward_sq"] / s["samples"] - reward_mean**2, 0.0) ** 0.5,
            "rollout/accuracy": s["math_reward"] / s["math_samples"] if s["math_samples"] else float("nan"),
            "rollout/zero_std_frac": s["zero_std"] / s["groups"],
            "rollout/nonfinite_groups": s["nonfinite"],
            "rollout/length_mean": s["completion_tokens"] / s["samples"],
            "rollout/truncated_frac": s["truncated"] / s["samples"],
            "rollout/prompts": s["groups"],
            "perf/generate_s": t_generate, "perf/score_s": t_score, "perf/rollout_tokens": s["completion_tokens"],
            "perf/rollout_tokens_per_s": s["completion_tokens"] / max(t_generate, 1e-9),
        }
        for task, key in (("math", "accuracy"), ("chat", "reward_mean")):  # keys only for tasks in the data
            if s[f"{task}_samples"]:
                build_metrics[f"rollout/{task}/{key}"] = s[f"{task}_reward"] / s[f"{task}_samples"]
                build_metrics[f"rollout/{task}/length_mean"] = s[f"{task}_tokens"] / s[f"{task}_samples"]
        if s["chat_samples"]:  # the paper picked chat checkpoints by this: its reward model favours length
            build_metrics["rollout/chat/reward_per_token"] = build_metrics["rollout/chat/reward_mean"] / max(build_metrics["rollout/chat/length_mean"], 1)

    # ---- the training data: prompt and reply token ids of every pair
    if build:  # train on exactly what was saved: a rerun with --pairs trains the same
        pairs = common.load_pairs(pairs_path)
    pair_prompt_ids = common.encode_prompts(tokenizer, [p["prompt"] for p in pairs])
    eos = [tokenizer.eos_token_id]
    # CRUCIAL: EOS only after a reply that ended; a reply cut at max_new_tokens did not stop there
    chosen_ids = [tokenizer(p["chosen"], add_special_tokens=False)["input_ids"] + eos * p["chosen_eos"] for p in pairs]
    rejected_ids = [tokenizer(p["rejected"], add_special_tokens=False)["input_ids"] + eos * p["rejected_eos"] for p in pairs]
    keep = [i for i, p in enumerate(pair_prompt_ids)
            if len(p) + max(len(chosen_ids[i]), len(rejected_ids[i])) <= args.max_model_len]
    if len(keep) < args.pairs_per_step:
        raise common.UserError(f"{pairs_path}: only {len(keep)} of {len(pairs)} pairs fit max_model_len "
                               f"({args.max_model_len}); need at least pairs_per_step ({args.pairs_per_step})")
    dropped_pairs = len(pairs) - len(keep)
    pairs = [pairs[i] for i in keep]
    pair_prompt_ids, chosen_ids, rejected_ids = ([x[i] for i in keep] for x in (pair_prompt_ids, chosen_ids, rejected_ids))
    args.num_pairs = len(pairs)
    args.num_steps = args.num_steps or math.ceil(args.epochs * len(pairs) / args.pairs_per_step)
    logger = common.MetricsLogger(args.output_dir, asdict(args), args.track, args.wandb_project_name,
                                  f"{args.exp_name}__{args.seed}", resume_step=start_step) if rank == 0 else None
    if rank == 0:
        print(f"{args.exp_name}: {len(pairs)} pairs from {pairs_path} ({dropped_pairs} too long, dropped), "
              f"{len(eval_rows)} held out ({eval_dropped} too long, dropped), "
              f"{world_size} rank(s), {args.num_steps} steps of {args.pairs_per_step} pairs "
              f"({args.num_steps * args.pairs_per_step / len(pairs):.1f} epochs) -> {args.output_dir}")

    def evaluate(step: int) -> dict:
        """eval/* on the held-out prompts (math accuracy, chat reward), sharded over ranks, reduced."""
        generator.sync_weights(policy)  # evaluate the weights being trained, not a stale generator
        return common.evaluate(generator, tokenizer, reward_model, eval_rows, k=args.eval_samples,
                               temperature=args.eval_temperature, top_p=args.eval_top_p,
                               max_tokens=args.max_new_tokens, seed=args.seed, limit=args.eval_limit)

    # -----------------------------------------------------------------------------------------
    # training loop
    # -----------------------------------------------------------------------------------------
    t_start, steps_done = time.time(), 0
    eval_metrics = evaluate(start_step) if eval_rows and start_step == 0 else {}
    if (eval_metrics or build_metrics) and rank == 0:
        logger.log({"step": 0, **build_metrics, **eval_metrics})
        if eval_metrics:
            print("step 0 | " + common.eval_line(eval_metrics))
    for step in range(start_step + 1, args.num_steps + 1):
        t_step = time.time()
        # ---- build batch: ALGO LOGIC: ready-made pairs; no sync, no rollout, no scoring
        # Speed: pairs sorted by length, so a micro-batch pads little (a pair stays in one micro-batch)
        idx = sorted(batch_indices(step), key=lambda i: len(pair_prompt_ids[i]) + max(len(chosen_ids[i]), len(rejected_ids[i])))
        batch = [pairs[i] for i in idx]
        flat_prompts = [pair_prompt_ids[i] for i in idx for _ in (0, 1)]  # chosen, rejected, chosen, ...
        flat_completions = [ids[i] for i in idx for ids in (chosen_ids, rejected_ids)]
        pairs_per_mb = max(args.micro_batch_size // 2, 1)
        micro_batches = [slice(2 * k, 2 * (k + pairs_per_mb)) for k in range(0, len(idx), pairs_per_mb)]

        # ---- reference logprobs, update: one optimizer step, gradients accumulated over micro-batches
        t0 = time.time()
        lr = args.learning_rate * min(1.0, step / max(args.warmup_steps, 1))
        for group in optimizer.param_groups:
            group["lr"] = lr
        stats = {"loss": 0.0, "kl_sum": 0.0, "tokens": 0.0, "entropy_sum": 0.0,
                 "chosen_logratio": 0.0, "rejected_logratio": 0.0, "nll": 0.0, "pair_correct": 0.0}
        for mb in micro_batches:
            mb_prompts, mb_tokens = flat_prompts[mb], flat_completions[mb]
            with torch.no_grad(), autocast:
                ref_logps = common.completion_logprobs(reference, mb_prompts, mb_tokens, args.temperature,
                                                       tokenizer.pad_token_id)[0]
            with autocast:
                logps, mask, entropy = common.completion_logprobs(policy, mb_prompts, mb_tokens, args.temperature,
                                                                  tokenizer.pad_token_id, with_entropy=True)
            seq, ref_seq = (logps * mask).sum(-1), (ref_logps * mask).sum(-1)  # (2K,) summed over tokens
            loss, chosen_logratio, rejected_logratio, nll = dpo_loss(
                seq[0::2], seq[1::2], ref_seq[0::2], ref_seq[1::2], mask[0::2].sum(-1), args.beta,
                args.nll_scale, args.pairs_per_rank)
            loss.backward()
            delta = ref_logps - logps.detach()
            stats["loss"] += loss.item()
            # ALGO LOGIC: KL(ref ‖ π) by k1: the tokens were sampled from the seed (= the reference), where
            # the online scripts' k3 (tokens from π) would blow up on a token the policy pushed down
            stats["kl_sum"] += (delta * mask).sum().item()
            stats["tokens"] += mask.sum().item()
            stats["entropy_sum"] += entropy.sum().item()
            stats["chosen_logratio"] += chosen_logratio.sum().item()
            stats["rejected_logratio"] += rejected_logratio.sum().item()
            stats["nll"] += nll.sum().item()
            stats["pair_correct"] += (chosen_logratio > rejected_logratio).sum().item()
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t_train = time.time() - t0

        # ---- log: sums over ranks, then ratios
        local = {
            "loss": stats["loss"], "kl_sum": stats["kl_sum"], "tokens": stats["tokens"],
            "entropy_sum": stats["entropy_sum"], "pairs": len(batch),
            **{f"{task}_pairs": sum(p["task"] == task for p in batch) for task in ("math", "chat")},
            "chosen_logratio": stats["chosen_logratio"], "rejected_logratio": stats["rejected_logratio"],
            "nll": stats["nll"], "pair_correct": stats["pair_correct"],
            "train_tokens": sum(len(p) + len(c) for p, c in zip(flat_prompts, flat_completions, strict=True)),
        }
        s = common.all_reduce(local)
        s_max = common.all_reduce({"memory": common.peak_memory_gb(device)}, op="max")
        step_s = time.time() - t_step
        metrics = {
            "step": step,
            "train/loss": s["loss"] / world_size,  # each rank's loss is already / its pairs
            "train/kl": s["kl_sum"] / max(s["tokens"], 1),
            "train/grad_norm": grad_norm.item() if hasattr(grad_norm, "item") else float(grad_norm),
            "train/lr": lr,
            "train/pairs": s["pairs"],
            "train/math/pairs": s["math_pairs"], "train/chat/pairs": s["chat_pairs"],
            "train/pair_accuracy": s["pair_correct"] / max(s["pairs"], 1),
            "train/chosen_logratio": s["chosen_logratio"] / max(s["pairs"], 1),
            "train/rejected_logratio": s["rejected_logratio"] / max(s["pairs"], 1),
            "train/nll": s["nll"] / max(s["pairs"], 1),
            "train/epoch": step * args.pairs_per_step / len(pairs),
            "rollout/entropy": s["entropy_sum"] / max(s["tokens"], 1),
            "rollout/policy_lag": step - 1,  # ALGO LOGIC: the pairs come from the seed: s = ∞
            "perf/train_s": t_train, "perf/step_s": step_s, "perf/train_tokens": s["train_tokens"],
            "perf/train_tokens_per_s": s["train_tokens"] / t_train if s["train_tokens"] else float("nan"),
            "perf/peak_memory_gb": s_max["memory"],
        }
        if eval_rows and (step % args.eval_every == 0 or step == args.num_steps):
            metrics.update(evaluate(step))
        steps_done += 1
        if rank == 0:
            logger.log(metrics)
            eta = (time.time() - t_start) / steps_done * (args.num_steps - step)
            line = (f"step {step}/{args.num_steps} | loss {metrics['train/loss']:+.4f} | "
                    f"epoch {metrics['train/epoch']:.2f} | pair acc {metrics['train/pair_accuracy']:.2f} | "
                    f"kl {metrics['train/kl']:.2e} | {step_s:.2f} s/step | eta {eta / 60:.1f} min")
            if any(k.startswith("eval/") for k in metrics):
                line += " | " + common.eval_line(metrics)
            print(line, flush=True)
            if args.log_samples_every and step % args.log_samples_every == 0:
                for p in batch[:2]:
                    print(f"    prompt: {str(p['prompt'])[:200]!r}\n    chosen: {p['chosen'][:300]!r}"
                          f"\n    rejected: {p['rejected'][:300]!r}", flush=True)

        # ---- checkpoint
        if step % args.save_every == 0 or step == args.num_steps:
            common.save_checkpoint(ckpt_dir, step, policy, optimizer, tokenizer)

    # -----------------------------------------------------------------------------------------
    # final save
    # -----------------------------------------------------------------------------------------
    if rank == 0:
        logger.finish()
        print(f"done: {args.output_dir}/checkpoint holds the final model ({(time.time() - t_start) / 60:.1f} min)")
    if generator is not None:
        generator.shutdown()  # CRUCIAL: before destroy_process_group
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(tyro.cli(Args))
