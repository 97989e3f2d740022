"""Plumbing shared by the four training scripts. The algorithms live in the scripts, not here.

- utils:      one-line user errors, torchrun setup, seeding, metric reduction (`all_reduce`) and logging
- models:     tokenizer / policy / reference loading, FSDP2, full-state-dict stream, logprobs
- generation: the in-process vLLM engine with weight reload (`Generator`)
- rewards:    `math_reward` (Math-Verify, the paper's set-up: `verifier`), `RewardModel` (a scalar
                reward model), and `score` (each row of a step by its own task's reward)
- metrics:    the step bookkeeping shared by the four scripts: phase timers, rollout/* and perf/*,
                the vLLM-vs-trainer logprob gap
- data:       prompt datasets (local files or hub) normalised to {task, prompt, answer}, and
                preference datasets (chosen / rejected) for offline DPO
- checkpoint: save / resume (HF model folder + per-rank safetensors trainer state, atomic), and
                the best model by validation (`save_best`)
- evaluation: held-out math accuracy and chat reward with standard errors, over ranks

- args:       `RunArgs`, the plumbing flags every script's `Args` holds as `args.run`
- launch:     flag and path checks before any model loads, the output folder's lock, and `run`:
                one line for a user error or a Ctrl-C, under python and torchrun
"""

from common.args import RunArgs
from common.checkpoint import BEST_BY, find_checkpoint, load_checkpoint, save_best, save_checkpoint
from common.data import (
    PAPER_MATH_TEMPLATE,
    StepOrder,
    encode_pairs,
    fit_prompts,
    last_boxed,
    load_data,
    load_pairs,
    load_prompts,
    load_rollout_log,
    pair_record,
    pair_rewards,
    pair_terms,
    pairs_by_step,
    save_pairs,
    shuffled_indices,
)
from common.evaluation import (
    eval_chat,
    eval_line,
    eval_math,
    eval_seeds,
    eval_subset,
    evaluate,
    evaluate_policy,
    majority_correct,
    math_samples,
    mean_and_se,
    mean_se_from_sums,
    pass_at_k,
)
from common.generation import Completion, Generator, request_seed, sample_steps
from common.launch import (
    check_args,
    claim_output_dir,
    finish,
    generator_for,
    logger_for,
    reward_model_for,
    run,
)
from common.metrics import (
    PhaseTimer,
    Progress,
    add_up,
    completion_records,
    engine_logprobs,
    logprob_gap,
    pair_sums,
    reduce_step,
    rollout_metrics,
    rollout_sums,
    tis_weights,
    trainer_metrics,
    update_stats,
)
from common.models import (
    autocast,
    completion_logprobs,
    compute_dtype,
    copy_weights,
    describe_template,
    encode_prompts,
    engine_dtype,
    fsdp_wrap,
    full_state_dict,
    load_model,
    load_tokenizer,
)
from common.rewards import RewardModel, math_reward, math_rewards, score
from common.utils import (
    MetricsLogger,
    UserError,
    all_reduce,
    chunks,
    micro_batches,
    peak_memory_gb,
    seed_everything,
    set_lr,
    setup_distributed,
)

__all__ = [
    "RunArgs", "load_data", "generator_for", "logger_for", "reward_model_for",
    "autocast", "micro_batches", "add_up", "pair_sums", "update_stats", "chunks",
    "evaluate_policy", "sample_steps", "tis_weights", "pair_record", "pair_rewards", "pair_terms", "pairs_by_step",
    "BEST_BY", "find_checkpoint", "load_checkpoint", "save_best", "save_checkpoint",
    "eval_chat", "eval_line", "eval_math", "majority_correct", "math_samples", "pass_at_k", "eval_seeds", "eval_subset", "evaluate", "mean_and_se", "mean_se_from_sums", "PAPER_MATH_TEMPLATE", "encode_pairs", "fit_prompts", "last_boxed", "load_pairs", "load_prompts", "load_rollout_log", "save_pairs", "shuffled_indices",
    "Completion", "Generator", "request_seed", "completion_logprobs", "copy_weights", "compute_dtype", "describe_template", "engine_dtype", "encode_prompts", "fsdp_wrap", "full_state_dict", "load_model",
    "load_tokenizer", "RewardModel", "math_reward", "math_rewards", "MetricsLogger", "UserError",
    "all_reduce", "peak_memory_gb", "seed_everything", "setup_distributed", "score", "PhaseTimer", "engine_logprobs", "logprob_gap",
    "reduce_step", "StepOrder", "Progress", "completion_records", "rollout_metrics", "rollout_sums", "trainer_metrics", "check_args", "claim_output_dir", "finish", "run", "set_lr",
]
