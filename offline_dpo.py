"""Offline DPO (sync interval s = ∞), as in Lanchantin et al. 2025 (arXiv 2506.21495).

Every step:
1. sync: none (s = ∞: the generator never gets the trainer's weights); the reference is the fixed
   seed model, as in the paper's offline DPO;
2. rollout: the step's completions, sampled from the frozen seed before training, for the prompts,
   in the order and with the sampling seeds of the online scripts;
3. score: Math-Verify for math prompts, the reward model for chat prompts;
4. pairs, one per prompt at most: math -> a random correct vs a random incorrect completion
   (prompts with all-correct or all-wrong completions are skipped); chat -> highest vs lowest
   reward-model score (skipped when all equal);
5. reference logprobs of the chosen and rejected completions;
6. one optimizer step on  Σ_pairs -log σ(β [(log π(y_c) - log π_ref(y_c)) - (log π(y_r) - log π_ref(y_r))]) / B
   with log-probs *summed* over completion tokens and B the global number of prompts (skipped
   prompts still count), plus `nll_scale` × the chosen completions' NLL pooled over tokens as in
   the authors' code (default 0);
7. log one metrics dict, evaluate every `eval_every` steps, checkpoint every `save_every`.

Choices where the paper is silent: constant learning rate after a linear warm-up; AdamW betas
(0.9, 0.95), no weight decay; `rollout/entropy` and the logprob gap are measured on the
completions the trainer runs on; a mixed math + chat batch follows each prompt's task (its own
reward). Not deterministic: vLLM on GPU (batch-dependent kernels).
DPO: 8 samples per prompt; `train/kl` is k1 (log π - log π_ref per sampled token). The sampled
pairs go to `<output_dir>/pairs.jsonl`, an ordinary preference dataset that `--pairs` reuses (a
resumed run trains on it), and each step's rollout metrics to `rollouts.jsonl`; no logprob gap (the
sampler's logprobs are not kept). `--pairs` also trains on any existing preference dataset
(docs/data.md): `prompts_per_step` pairs per step, seeded per-epoch order, `--epochs` passes.

Run:
    python offline_dpo.py                                    # embedded default, CPU, a few minutes
    torchrun --standalone --nproc_per_node=2 offline_dpo.py  # 2 processes (CPU: gloo; GPU: NCCL)
    torchrun --nproc_per_node 8 offline_dpo.py \\            # the paper's math run (Llama-3.1-8B)
        --model meta-llama/Llama-3.1-8B-Instruct --dataset AI-MO/NuminaMath-CoT --paper-math-filter \\
        --eval-dataset HuggingFaceH4/MATH-500 --eval-split test --num-steps 1000 \\
        --prompts-per-step 64 --samples-per-prompt 8 --max-new-tokens 2048 --max-model-len 4096 \\
        --learning-rate 1e-6 --adam-eps 1e-4 --max-grad-norm 0.1 --beta 0.1 \\
        --micro-batch-size 4
    python offline_dpo.py --pairs runs/offline_dpo__1/pairs.jsonl --output-dir runs/again  # reuse pairs
    python offline_dpo.py --pairs HuggingFaceH4/ultrafeedback_binarized --pairs-split train_prefs \\
        --model Qwen/Qwen2.5-0.5B-Instruct --eval-dataset '' --beta 0.01 --epochs 1  # an existing dataset

Differs from `online_dpo.py` in: the sync interval (∞: the run's rollouts sampled from the seed
before training, never a sync) and the reference (always the fixed seed).
`semi_online_dpo.py --sync-interval <past the end> --ref-sync no` reproduces it step for step (tested).
"""

import contextlib
import math
import os
import random
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from typing import Literal

import torch
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
    beta: float = 0.1
    """DPO β (the paper: 0.1 math, 0.01 chat)"""
    nll_scale: float = 0.0
    """weight of the chosen completion's per-token NLL (the paper's ablation: 1.0, no gain)"""
    nll_length_normalize: bool = True
    """the NLL pooled over the chosen tokens (the authors' default), or summed per sequence and / B"""
    pairs: str = ""
    """train on this preference dataset (a pairs.jsonl written by this script, or any hub / local
    dataset with chosen / rejected columns) instead of sampling pairs from the seed"""
    pairs_split: str = "train"
    """split of a hub preference dataset"""
    epochs: float = 0.0
    """passes over an existing `--pairs` dataset (0: `num_steps` steps)"""
    length_norm: Literal["none", "sequence"] = "none"
    """none: log-probs summed over tokens (the paper's main runs); sequence: each sequence's token mean,
    policy and reference alike (the paper's ablation: biased toward short answers)"""
    entropy_coef: float = 0.0
    """entropy bonus: loss -= C Σ_chosen mean_t H_t / B (the paper's ablation: 1e-4 to 5e-4; it did
    not reliably stop the entropy collapse)"""
    group_dpo: bool = False
    """GroupDPO (the paper's ablation: no gain): every correct x incorrect pair of a math prompt, the
    loss averaged over a prompt's pairs (math data only: chat has no correct / incorrect split)"""
    grpo_coef: float = 0.0
    """with --group-dpo: + A x GRPO's objective on the same groups (the paper's ablation: 0.01)"""

    # filled in after parsing (not flags: logged with the config)
    world_size: tyro.conf.Suppress[int] = 0
    """number of ranks"""
    prompts_per_rank: tyro.conf.Suppress[int] = 0
    """prompts_per_step / world_size"""


def select_pairs(rewards: torch.Tensor, tasks: list[str], seeds: list[int],
                 group: bool = False) -> list[tuple[int, int, int]]:
    """(prompt j, chosen i, rejected i) for each prompt that yields a pair, from (P, n) rewards.

    math: a random correct (reward 1) vs a random incorrect (reward 0) completion, drawn with the
    prompt's own seed (`group`, GroupDPO: every correct x incorrect pair); all-correct or all-wrong
    prompts are skipped. chat: the highest vs the
    lowest reward-model score (first of ties); skipped when every score is equal.
    """
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
    """(Σ_pairs w_p · -log σ(β (Δ_chosen - Δ_rejected)) + nll_scale · NLL) / num_prompts.

    Inputs are (K,) per-pair log-probs, *summed* over completion tokens (Δ = log π - log π_ref), and
    (K,) pair weights w (1; GroupDPO: 1 / the prompt's pairs, so a prompt's pairs are averaged).
    Dividing by the whole batch's prompts, not the pairs, keeps a step with few valid pairs from
    being up-weighted. `nll`: the chosen completions' negative log-likelihood, pooled by the caller
    as in the authors' code. Returns (loss, chosen Δ, rejected Δ).
    """
    chosen_logratio = chosen_logps - ref_chosen_logps
    rejected_logratio = rejected_logps - ref_rejected_logps
    losses = -F.logsigmoid(beta * (chosen_logratio - rejected_logratio)) * weights
    loss = (losses.sum() + nll_scale * nll) / num_prompts
    return loss, chosen_logratio.detach(), rejected_logratio.detach()


def group_terms(pairs: list[tuple[int, int, int]], rewards: torch.Tensor) -> tuple[list[float], list[float]]:
    """For each pair, its weight in the loss: 1 / its prompt's number of pairs (GroupDPO averages a
    prompt's pairs; 1 with one pair per prompt). For each of the pairs' completions (chosen,
    rejected, chosen, ...), its GRPO advantage (r - mean) / (std + 1e-6) in its prompt's (P, n)
    group, divided by the pairs it appears in: `--grpo-coef` then counts every completion once."""
    per_prompt = Counter(j for j, _, _ in pairs)
    appears = Counter((j, i) for j, c, r in pairs for i in (c, r))
    adv = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-6)).tolist()  # (P, n)
    return [1 / per_prompt[j] for j, _, _ in pairs], [adv[j][i] / appears[j, i] for j, c, r in pairs for i in (c, r)]


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
    pairs_path = args.pairs or os.path.join(args.output_dir, "pairs.jsonl")
    build = not args.pairs and not args.resume  # ALGO LOGIC: sample once, before training; a resumed run reuses them
    rows, prompt_ids, dropped = [], [], 0
    if build:
        rows = common.load_prompts(args.dataset, args.dataset_split, args.math_template,
                                   paper_math_filter=args.paper_math_filter, verbose=rank == 0, seed=args.seed)
        rows, prompt_ids, dropped = common.fit_prompts(tokenizer, rows, max_prompt, args.prompts_per_step, "--dataset")
    else:  # read before any model loads, so a bad file fails in seconds
        data = common.load_pairs(pairs_path, args.pairs_split, verbose=rank == 0)
    eval_rows, eval_dropped = [], 0
    if args.eval_dataset and args.eval_every > 0:
        eval_rows = common.load_prompts(args.eval_dataset, args.eval_split, args.math_template, verbose=rank == 0)
        eval_rows, _, eval_dropped = common.fit_prompts(tokenizer, eval_rows, max_prompt, 1, "--eval-dataset")
    order = common.StepOrder(len(rows), args.seed, args.prompts_per_step, rank, world_size)  # each step's prompts, seeds
    if args.group_dpo and (args.pairs or any(r["task"] == "chat" for r in rows)):
        raise common.UserError("--group-dpo pairs correct with incorrect completions of the math prompts it samples: "
                               "not with --pairs or chat rows")

    # -----------------------------------------------------------------------------------------
    # models & optimizer
    # -----------------------------------------------------------------------------------------
    policy = common.fsdp_wrap(common.load_model(args.model, device, trust_remote_code=args.trust_remote_code,
                                                 activation_checkpointing=args.activation_checkpointing))
    # ALGO LOGIC: the fixed seed is the reference of offline DPO
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
    # generation engine: ALGO LOGIC: it holds the seed's weights for every rollout of the run (none
    # is started for an existing --pairs file without evaluation)
    # -----------------------------------------------------------------------------------------
    generator = common.Generator(args.model, max_model_len=args.max_model_len,
                                 max_num_seqs=args.prompts_per_rank * args.samples_per_prompt * args.num_steps,
                                 gpu_memory_utilization=args.gpu_memory_utilization,
                                 dtype=common.engine_dtype(args.generator_dtype, device), seed=args.seed,
                                 enable_sleep_mode=args.vllm_sleep, trust_remote_code=args.trust_remote_code) if build or eval_rows else None
    n, P, build_metrics = args.samples_per_prompt, args.prompts_per_rank, {}
    if build:  # ALGO LOGIC: s = ∞, every step's rollouts from the seed, before training; each step keeps its own pairs
        timer, built, step_sums = common.PhaseTimer(), [], {}
        steps_per_call = max(1, 256 // P)  # bounds memory and shows progress; the samples do not depend on it
        for first in range(1, args.num_steps + 1, steps_per_call):
            window = range(first, min(first + steps_per_call, args.num_steps + 1))
            with timer("generate"):
                flat = generator.generate([prompt_ids[i] for t in window for i in order.indices(t)], n=n,
                                          temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_new_tokens,
                                          seed=[x for t in window for x in order.seeds(t)])
            for k, step in enumerate(window):
                batch, outs = [rows[i] for i in order.indices(step)], flat[k * P : (k + 1) * P]
                with timer("score"):
                    rewards, nonfinite = common.score(reward_model, batch, outs)  # (P, n), (P,)
                pairs = select_pairs(rewards, [r["task"] for r in batch], order.seeds(step), args.group_dpo)
                _, advantages = group_terms(pairs, rewards)  # --grpo-coef: each completion once per group
                for k, (j, c, r) in enumerate(pairs):
                    chosen, rejected = outs[j][c], outs[j][r]
                    built.append({"step": step, "position": rank * P + j, **batch[j],
                                  "chosen": chosen.text, "rejected": rejected.text,
                                  "chosen_reward": rewards[j, c].item(), "rejected_reward": rewards[j, r].item(),
                                  "chosen_eos": chosen.finish_reason == "stop", "rejected_eos": rejected.finish_reason == "stop",
                                  "chosen_ids": chosen.token_ids, "rejected_ids": rejected.token_ids,
                                  "chosen_advantage": advantages[2 * k], "rejected_advantage": advantages[2 * k + 1]})
                step_sums[step] = common.rollout_sums(batch, outs, rewards, nonfinite)
            if rank == 0:
                print(f"sampling from the seed: step {window[-1]}/{args.num_steps}, {timer.total():.0f} s", flush=True)
        generator.sleep()  # until the evaluations
        rollout_tokens = common.save_pairs(built, step_sums, pairs_path)
        build_metrics = {"perf/generate_s": timer.s["generate"], "perf/score_s": timer.s["score"],
                         "perf/rollout_tokens": rollout_tokens, "perf/rollout_tokens_per_s": rollout_tokens / timer.s["generate"]}
        data = common.load_pairs(pairs_path)  # train on exactly what was saved: a rerun with --pairs trains the same
    # each pair's token ids (the sampled ones, from a file built here); each step's pairs
    data, pair_prompt_ids, pair_completions, dropped_pairs = common.encode_pairs(tokenizer, data, args.max_model_len)
    rollout_log, data_tasks, by_step = {}, {p["task"] for p in data}, None
    if "step" in data[0]:  # sampled for the run's steps
        rollout_log, by_step = common.load_rollout_log(pairs_path), defaultdict(list)
        for i, p in enumerate(data):
            if p["position"] // P == rank:  # CRUCIAL: each rank trains on the pairs of its own prompts
                by_step[p["step"]].append(i)
        if args.num_steps > max([p["step"] for p in data] + list(rollout_log)):
            raise common.UserError(f"{pairs_path} holds the pairs of {max(p['step'] for p in data)} steps, fewer than "
                                   f"--num-steps {args.num_steps}; train fewer steps, or start a run that samples more")
    elif args.epochs:  # an existing preference dataset: prompts_per_step pairs per step
        args.num_steps = math.ceil(args.epochs * len(data) / args.prompts_per_step)
    pair_order = common.StepOrder(len(data), args.seed, args.prompts_per_step, rank, world_size)
    logger = common.MetricsLogger(args.output_dir, asdict(args), args.track, args.wandb_project_name,
                                  f"{args.exp_name}__{args.seed}", resume_step=start_step) if rank == 0 else None
    if rank == 0:
        print(f"{args.exp_name}: {len(data)} pairs from {pairs_path} ({dropped_pairs} too long, dropped), {len(eval_rows)} "
              f"held out ({eval_dropped} too long, dropped), {world_size} rank(s), "
              f"{args.num_steps} steps of {args.prompts_per_step} prompts -> {args.output_dir}")

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
    eval_metrics = evaluate(0) if eval_rows and start_step == 0 else {}
    if (eval_metrics or build_metrics) and rank == 0:
        logger.log({"step": 0, **build_metrics, **eval_metrics})
        if eval_metrics:
            print("step 0 | " + common.eval_line(eval_metrics), flush=True)
    progress = common.Progress(args.num_steps, args.log_samples_every)
    for step in range(start_step + 1, args.num_steps + 1):
        timer = common.PhaseTimer()
        # ---- rollout: ALGO LOGIC: s = ∞, no sync: the step's pairs were sampled from the seed before training
        last_sync = 0  # the generator held the seed's weights (0 optimizer steps) for every rollout
        idx = by_step.get(step, []) if by_step is not None else pair_order.indices(step)
        batch, prompts = [data[i] for i in idx], [pair_prompt_ids[i] for i in idx]
        outs = [pair_completions[i] for i in idx]  # (chosen, rejected) of this rank's prompts that have a pair
        rewards = torch.tensor([[p.get("chosen_reward", math.nan), p.get("rejected_reward", math.nan)] for p in batch])

        # ---- build batch: ALGO LOGIC: the step's (chosen, rejected) pairs (--group-dpo: all of a prompt's)
        pairs = [(j, 0, 1) for j in range(len(batch))]
        # Speed: pairs sorted by length, so a micro-batch pads little (a pair stays in one micro-batch)
        pairs.sort(key=lambda p: len(prompts[p[0]]) + max(len(outs[p[0]][i].token_ids) for i in p[1:]))
        per_prompt = Counter(batch[j].get("position", j) for j, _, _ in pairs)  # GroupDPO: a prompt's pairs averaged
        pair_weights = [1 / per_prompt[batch[j].get("position", j)] for j, _, _ in pairs]
        flat_advantages = [batch[j].get(f"{k}_advantage", 0.0) for j, _, _ in pairs for k in ("chosen", "rejected")]
        flat_prompts = [prompts[j] for j, _, _ in pairs for _ in (0, 1)]  # chosen, rejected, chosen, ...
        flat_completions = [outs[j][i] for j, c, r in pairs for i in (c, r)]
        # CRUCIAL: FSDP needs every rank to run the same number of passes; a rank with fewer pairs
        # (or none) runs padding passes whose loss is multiplied by 0.
        pairs_per_mb = max(args.micro_batch_size // 2, 1)
        n_mb = int(common.all_reduce({"n": math.ceil(len(pairs) / pairs_per_mb)}, op="max")["n"])
        micro_batches = [slice(2 * k * pairs_per_mb, 2 * (k + 1) * pairs_per_mb) for k in range(n_mb)]
        chosen_tokens = sum(len(c.token_ids) for c in flat_completions[0::2])
        nll_pooling = len(pairs) / max(chosen_tokens, 1) if args.nll_length_normalize else 1.0  # the authors' default

        # ---- reference logprobs, update: one optimizer step, gradients accumulated over micro-batches
        lr = common.set_lr(optimizer, args.learning_rate * min(1.0, step / max(args.warmup_steps, 1)))  # warm-up, then constant
        # CRUCIAL: every key on every rank, even with no pair (the reduction over ranks is by key)
        sums = dict.fromkeys(("loss", "kl_sum", "tokens", "entropy_sum", "chosen_logratio", "rejected_logratio", "nll_sum",
                              "chosen_tokens", "pair_correct", "entropy_bonus", "grpo_term"), 0.0)
        with timer("train"):
            for mb in micro_batches:
                mb_prompts, mb_completions, weight = flat_prompts[mb], flat_completions[mb], 1.0
                mb_weights, mb_advantages = pair_weights[mb.start // 2 : mb.stop // 2], flat_advantages[mb]
                if not mb_completions:  # padding pass: same collectives, no gradient, no stats
                    mb_prompts, mb_completions, weight = [pair_prompt_ids[0]] * 2, [pair_completions[0][0]] * 2, 0.0
                    mb_weights, mb_advantages = [1.0], [0.0, 0.0]
                mb_tokens = [c.token_ids for c in mb_completions]
                with torch.no_grad(), autocast:
                    ref_logps = common.completion_logprobs(reference, mb_prompts, mb_tokens, args.temperature,
                                                           tokenizer.pad_token_id)[0]
                with autocast:
                    logps, mask, entropy = common.completion_logprobs(policy, mb_prompts, mb_tokens, args.temperature,
                                                                      tokenizer.pad_token_id, with_entropy=True)
                seq_sum, ref_sum, tokens = (logps * mask).sum(-1), (ref_logps * mask).sum(-1), mask.sum(-1).clamp(min=1)
                seq, ref_seq = seq_sum, ref_sum  # (2K,) summed over tokens
                if args.length_norm == "sequence":  # ALGO LOGIC (--length-norm): token means, reference alike
                    seq, ref_seq = seq_sum / tokens, ref_sum / tokens
                mb_weights = torch.tensor(mb_weights, device=device)
                loss, chosen_logratio, rejected_logratio = dpo_loss(
                    seq[0::2], seq[1::2], ref_seq[0::2], ref_seq[1::2], args.beta, args.nll_scale,
                    -seq_sum[0::2].sum() * nll_pooling, args.prompts_per_rank, mb_weights)
                bonus, grpo = torch.zeros((), device=device), torch.zeros((), device=device)
                if args.entropy_coef:  # ALGO LOGIC: the authors' entropy bonus on the chosen completions
                    bonus = args.entropy_coef * (mb_weights * (entropy * mask).sum(-1)[0::2] / tokens[0::2]).sum()
                if args.grpo_coef:  # ALGO LOGIC: + A x GRPO's objective on the groups (ρ ≡ 1: A_i ∇ Σ_t log π)
                    grpo = args.grpo_coef * (torch.tensor(mb_advantages, device=device) * seq_sum).sum() / n
                loss = loss - (bonus + grpo) / args.prompts_per_rank
                (loss * weight).backward()
                if not weight:
                    continue
                sums["loss"] += loss.item()
                sums["kl_sum"] += seq_sum.sum().item() - ref_sum.sum().item()  # k1: log π - log π_ref per sampled token
                sums["tokens"] += mask.sum().item()
                sums["entropy_sum"] += entropy.sum().item()
                sums["chosen_logratio"] += chosen_logratio.sum().item()
                sums["rejected_logratio"] += rejected_logratio.sum().item()
                sums["nll_sum"] -= seq_sum[0::2].sum().item()
                sums["chosen_tokens"] += mask[0::2].sum().item()
                sums["pair_correct"] += (chosen_logratio > rejected_logratio).sum().item()
                sums["entropy_bonus"] += bonus.item() / args.prompts_per_rank
                sums["grpo_term"] += grpo.item() / args.prompts_per_rank
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        # ---- log: sums over ranks, then ratios (ranks may hold different numbers of math rows)
        sums["train_tokens"] = sum(len(p) + len(c.token_ids) for p, c in zip(flat_prompts, flat_completions, strict=True))
        sums |= {"pairs": len(pairs), "reward_margin": sum(rewards[j, c] - rewards[j, r] for j, c, r in pairs).item() if pairs else 0.0}
        sums |= {f"{task}_pairs": sum(batch[j]["task"] == task for j, _, _ in pairs) for task in ("math", "chat")}
        s, s_max = common.reduce_step(sums, {}, device)
        metrics = {
            "step": step,
            "train/loss": s["loss"] / world_size,  # each rank's loss is already / its prompts
            "train/kl": s["kl_sum"] / max(s["tokens"], 1),
            "train/grad_norm": grad_norm.item() if hasattr(grad_norm, "item") else float(grad_norm),
            "train/lr": lr,
            "train/pairs": s["pairs"],
            "train/reward_margin": s["reward_margin"] / max(s["pairs"], 1),
            "train/pair_accuracy": s["pair_correct"] / max(s["pairs"], 1),
            "train/chosen_logratio": s["chosen_logratio"] / max(s["pairs"], 1),
            "train/rejected_logratio": s["rejected_logratio"] / max(s["pairs"], 1),
            "train/nll": s["nll_sum"] / max(s["chosen_tokens"], 1),
            **{f"train/{task}/pairs": s[f"{task}_pairs"] for task in ("math", "chat") if task in data_tasks},
            **({"train/entropy_bonus": s["entropy_bonus"] / world_size} if args.entropy_coef else {}),
            **({"train/grpo_term": s["grpo_term"] / world_size} if args.grpo_coef else {}),
            "rollout/policy_lag": step - 1 - last_sync,
            **rollout_log.get(step, {}), **common.trainer_metrics(s, s_max, timer),
        }
        if by_step is None:
            metrics["train/epoch"] = step * args.prompts_per_step / len(data)
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
