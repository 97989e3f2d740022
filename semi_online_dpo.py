"""Semi-online DPO (sync interval s > 1), as in Lanchantin et al. 2025 (arXiv 2506.21495).

Every step:
1. sync, every s steps only (before steps 1, s + 1, ...; the authors': 1, s, 2s, ...): push the
   trainer's weights into the vLLM generator; for verifiable (math) data the reference model is
   re-synced to the policy at the same time (the paper: without it, math DPO collapsed to very
   short answers);
2. rollout: at a sync, sample the whole window's completions in one vLLM call (the paper's
   efficiency argument); each step takes its own prompts' `samples_per_prompt` completions;
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
DPO: 8 samples per prompt; `train/kl` is k1 (log π - log π_ref per sampled token); a mixed batch
pairs each prompt by its task's rule against one fixed reference (the paper's V+NV run), or with
`--ref-sync per-task` the math rows against a re-synced one (both references run on every
micro-batch, so FSDP ranks stay in step).
Each step's completions are scored at that step (generation is what gains from one large call).

Run:
    python semi_online_dpo.py                                    # embedded default, s = 10
    torchrun --standalone --nproc_per_node=2 semi_online_dpo.py  # 2 processes (CPU: gloo; GPU: NCCL)
    torchrun --nproc_per_node 8 semi_online_dpo.py --sync-interval 100 \\  # the paper's math run
        --model meta-llama/Llama-3.1-8B-Instruct --dataset AI-MO/NuminaMath-CoT --paper-math-filter \\
        --eval-dataset HuggingFaceH4/MATH-500 --eval-split test --num-steps 1000 \\
        --prompts-per-step 64 --samples-per-prompt 8 --max-new-tokens 2048 --max-model-len 4096 \\
        --learning-rate 1e-6 --adam-eps 1e-4 --max-grad-norm 0.1 --beta 0.1 \\
        --micro-batch-size 4 --vllm-sleep
    # the paper's chat run: --dataset allenai/WildChat-1M --reward-model Nexusflow/Athene-RM-8B
    #   --prompts-per-step 32 --max-new-tokens 1024 --beta 0.01 --adam-eps 1e-8 (reference fixed)

Differs from `online_dpo.py` in: the sync interval (s here, 1 there) and so the rollouts of a
whole window generated at its sync. `--sync-interval 1` reproduces online_dpo.py exactly, and a
sync interval past the run's end with `--ref-sync no` reproduces offline_dpo.py (both tested).
"""

import contextlib
import math
import os
import random
import time
from collections import Counter
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
    ref_sync: Literal["auto", "yes", "no", "per-task"] = "auto"
    """re-sync the reference to the policy with the generator. auto (the paper): yes for math-only data,
    no for chat and for mixed math + chat (its V+NV run); per-task: math rows against a re-synced
    reference, chat rows against the fixed seed"""
    ref_sync_interval: int = 0
    """re-sync that reference every K steps on its own schedule instead of with the generator (the
    authors' sync_ref_model_every_n_steps; 0: with the generator)"""
    sync_interval: int = 10
    """s: optimizer steps between generator syncs (the paper: 5, 10, 100; 1 = online DPO)"""
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
    synced_tasks: tyro.conf.Suppress[tuple[str, ...]] = ()
    """tasks whose reference re-syncs with the generator (ref_sync resolved)"""


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
    rows = common.load_prompts(args.dataset, args.dataset_split, args.math_template,
                               paper_math_filter=args.paper_math_filter, verbose=rank == 0, seed=args.seed)
    rows, prompt_ids, dropped = common.fit_prompts(tokenizer, rows, max_prompt, args.prompts_per_step, "--dataset")
    eval_rows, eval_dropped = [], 0
    if args.eval_dataset and args.eval_every > 0:
        eval_rows = common.load_prompts(args.eval_dataset, args.eval_split, args.math_template, verbose=rank == 0)
        eval_rows, _, eval_dropped = common.fit_prompts(tokenizer, eval_rows, max_prompt, 1, "--eval-dataset")
    order = common.StepOrder(len(rows), args.seed, args.prompts_per_step, rank, world_size)  # each step's prompts, seeds
    # ALGO LOGIC: the paper re-syncs the reference for verifiable rewards only, and keeps one fixed
    # reference for a mixed math + chat run
    math_only = all(r["task"] == "math" for r in rows)
    args.synced_tasks = {"auto": ("math",) if math_only else (), "yes": ("math", "chat"), "no": (),
                         "per-task": ("math",)}[args.ref_sync]
    if args.group_dpo and not math_only:
        raise common.UserError("--group-dpo pairs correct with incorrect completions: math data only (this has chat rows)")

    # -----------------------------------------------------------------------------------------
    # models & optimizer
    # -----------------------------------------------------------------------------------------
    policy = common.fsdp_wrap(common.load_model(args.model, device, trust_remote_code=args.trust_remote_code,
                                                 activation_checkpointing=args.activation_checkpointing))
    # one frozen reference per kind the data needs: "synced" (moves with the generator), "fixed" (the seed)
    references = {kind: common.fsdp_wrap(common.load_model(args.model, device, trainable=False,
                                                            trust_remote_code=args.trust_remote_code))
                  for kind in sorted({"synced" if r["task"] in args.synced_tasks else "fixed" for r in rows})}
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
                                 max_num_seqs=args.prompts_per_rank * args.samples_per_prompt * min(args.sync_interval, args.num_steps),
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
        # ---- sync: ALGO LOGIC: every s steps the generator gets the weights being trained.
        # CRUCIAL: also the first step after a start or a resume, before any generation.
        window_tokens = 0
        if (step - 1) % args.sync_interval == 0 or step == start_step + 1:
            with timer("sync"):
                generator.sync_weights(policy)
            last_sync = step - 1  # the generator holds the weights of `last_sync` optimizer steps
            # ALGO LOGIC: the rollouts of every step up to the next sync, in one vLLM call, with each
            # step's own seeds (so s = 1 is exactly online_dpo.py)
            next_sync = ((step - 1) // args.sync_interval + 1) * args.sync_interval + 1  # the step that syncs next
            window = range(step, min(next_sync, args.num_steps + 1))
            with timer("generate"):
                flat = generator.generate([prompt_ids[i] for t in window for i in order.indices(t)], n=n,
                                          temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_new_tokens,
                                          seed=[x for t in window for x in order.seeds(t)])
                generator.sleep()
            window_outs = {t: flat[k * args.prompts_per_rank : (k + 1) * args.prompts_per_rank] for k, t in enumerate(window)}
            window_tokens = sum(len(c.token_ids) for o in flat for c in o)  # counted at the step that generates
        # ALGO LOGIC: the (math) reference moves with the generator, or every --ref-sync-interval steps
        if "synced" in references and ((step - 1) % (args.ref_sync_interval or args.sync_interval) == 0
                                       or step == start_step + 1):
            with timer("sync"):
                common.copy_weights(policy, references["synced"])

        # ---- rollout
        with timer("generate"):
            idx = order.indices(step)
            batch, prompts = [rows[i] for i in idx], [prompt_ids[i] for i in idx]
            outs = window_outs.pop(step)  # sampled at the last sync, by weights `step - 1 - last_sync` steps old

        # ---- score: Math-Verify for math rows, the reward model for chat rows
        with timer("score"):
            rewards, nonfinite = common.score(reward_model, batch, outs)  # (P, n), (P,)

        # ---- build batch: ALGO LOGIC: one (chosen, rejected) pair per prompt at most (--group-dpo: all)
        pairs = select_pairs(rewards, [r["task"] for r in batch], order.seeds(step), args.group_dpo)
        # Speed: pairs sorted by length, so a micro-batch pads little (a pair stays in one micro-batch)
        pairs.sort(key=lambda p: len(prompts[p[0]]) + max(len(outs[p[0]][i].token_ids) for i in p[1:]))
        pair_weights, flat_advantages = group_terms(pairs, rewards)  # (K,) loss weights, (2K,) for --grpo-coef
        flat_prompts = [prompts[j] for j, _, _ in pairs for _ in (0, 1)]  # chosen, rejected, chosen, ...
        flat_completions = [outs[j][i] for j, c, r in pairs for i in (c, r)]
        flat_refs = ["synced" if batch[j]["task"] in args.synced_tasks else "fixed" for j, _, _ in pairs for _ in (0, 1)]
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
        sums, gap_max = dict.fromkeys(("loss", "kl_sum", "tokens", "entropy_sum", "gap_sum", "chosen_logratio", "rejected_logratio", "nll_sum", "chosen_tokens", "pair_correct", "entropy_bonus", "grpo_term"), 0.0), 0.0
        with timer("train"):
            for mb in micro_batches:
                mb_prompts, mb_completions, mb_refs, weight = flat_prompts[mb], flat_completions[mb], flat_refs[mb], 1.0
                mb_weights, mb_advantages = pair_weights[mb.start // 2 : mb.stop // 2], flat_advantages[mb]
                if not mb_completions:  # padding pass: same collectives (any reference), no gradient, no stats
                    mb_prompts, mb_completions, mb_refs, weight = [prompts[0]] * 2, [outs[0][0]] * 2, [next(iter(references))] * 2, 0.0
                    mb_weights, mb_advantages = [1.0], [0.0, 0.0]
                mb_tokens = [c.token_ids for c in mb_completions]
                with torch.no_grad(), autocast:  # CRUCIAL: every reference runs on every rank (FSDP); each row keeps its task's
                    ref_logps_by_kind = {kind: common.completion_logprobs(ref, mb_prompts, mb_tokens, args.temperature,
                                                                          tokenizer.pad_token_id)[0] for kind, ref in references.items()}
                ref_logps = torch.stack([ref_logps_by_kind[kind][i] for i, kind in enumerate(mb_refs)])  # (2K, T)
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
                # ~0 right after a sync, then growing with the policy lag: how stale the generator's samples are
                gap_sum, mb_gap_max = common.logprob_gap(logps, mask, mb_completions)
                gap_max = max(gap_max, mb_gap_max)
                sums["loss"] += loss.item()
                sums["kl_sum"] += seq_sum.sum().item() - ref_sum.sum().item()  # k1: log π - log π_ref per sampled token
                sums["tokens"] += mask.sum().item()
                sums["entropy_sum"] += entropy.sum().item()
                sums["gap_sum"] += gap_sum
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
        sums |= common.rollout_sums(batch, outs, rewards, nonfinite)
        sums["rollout_tokens"] = window_tokens
        sums["train_tokens"] = sum(len(p) + len(c.token_ids) for p, c in zip(flat_prompts, flat_completions, strict=True))
        sums |= {"pairs": len(pairs), "reward_margin": sum(rewards[j, c] - rewards[j, r] for j, c, r in pairs).item() if pairs else 0.0}
        sums |= {f"{task}_pairs": sum(batch[j]["task"] == task for j, _, _ in pairs) for task in ("math", "chat")}
        s, s_max = common.reduce_step(sums, {"gap_max": gap_max}, device)
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
            **{f"train/{task}/pairs": s[f"{task}_pairs"] for task in ("math", "chat") if s[f"{task}_samples"]},
            **({"train/entropy_bonus": s["entropy_bonus"] / world_size} if args.entropy_coef else {}),
            **({"train/grpo_term": s["grpo_term"] / world_size} if args.grpo_coef else {}),
            "rollout/policy_lag": step - 1 - last_sync,
            **common.rollout_metrics(s), **common.trainer_metrics(s, s_max, timer),
        }
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
