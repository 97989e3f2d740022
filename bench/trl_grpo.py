"""The peer run: TRL's `GRPOTrainer` on the configuration `grpo.py` runs in the benchmark.

Same model, prompts (chat template applied to the same user turn), group size, max new tokens,
prompts per step, optimizer (fused AdamW, TRL's default and grpo.py's; betas (0.9, 0.95), eps, no
weight decay, constant lr after linear warm-up), gradient clipping, KL coefficient (so TRL loads
the same fixed reference), precision (fp32, or with `--bf16` TRL's `bf16=True`: bf16 autocast over
fp32 weights, which is grpo.py's `--compute-dtype bfloat16`) and reward (the same Math-Verify /
reward-model functions from `common`). TRL's own choices are left at what a user gets except
where they would make the work differ: gradient checkpointing as grpo.py's
`--activation-checkpointing auto` decides it on the CPU (on for 100M+ parameters, so the
Qwen2-0.5B shape compares like for like; off for the tiny models, where grpo.py keeps
activations).

Generation: TRL's in-process vLLM ("colocate") cannot reload weights on vLLM's CPU backend
(it fails with `'Parameter' object has no attribute 'weight_loader'`; tests/test_generation.py proves
the reload this project uses instead), so on the CPU this peer
generates with transformers' `generate`, which is what TRL does without `use_vllm`.

Timing: `_generate` (rollout, incl. its tokenisation) and `_calculate_rewards` (score) are
wrapped with timers; the rest of a step (old / reference logprobs, forward, backward,
optimizer) is train. Writes one JSON line per step to `--out`.

    python bench/trl_grpo.py --model embedded/policy --dataset embedded/data/math_train.jsonl --num-steps 5
"""

import json
import os
import resource
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import tyro
from datasets import Dataset
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

import common


@dataclass
class Args:
    # grpo.py's flags of the same names and defaults
    model: str = "embedded/policy"
    reward_model: str = "embedded/reward_model"
    dataset: str = "embedded/data/math_train.jsonl"
    num_steps: int = 20
    prompts_per_step: int = 8
    samples_per_prompt: int = 8
    max_new_tokens: int = 48
    learning_rate: float = 5e-5
    warmup_steps: int = 10
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    kl_coef: float = 0.001
    temperature: float = 1.0
    seed: int = 1
    bf16: bool = False
    """TRL's `bf16=True`: the Trainer's bf16 autocast over fp32 weights (on the CPU too)"""
    out: str = "runs/bench/trl_grpo.jsonl"
    """one JSON line of perf/* per step (the keys grpo.py logs)"""
    output_dir: str = "runs/bench/trl_grpo"
    """TRL's own output folder (nothing is saved: save_strategy="no")"""


def main(args: Args) -> None:
    rows = common.load_prompts(args.dataset)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                               "answer": r["answer"] or "", "task": r["task"]} for r in rows])
    reward_model = None
    if any(r["task"] == "chat" for r in rows):
        reward_model = common.RewardModel(args.reward_model, torch.device("cpu"))
    timers = {"generate_s": 0.0, "score_s": 0.0, "rollout_tokens": 0, "train_tokens": 0}

    def reward(prompts, completions, answer, task, **kwargs) -> list[float]:
        """Each task's rows in one call, as in grpo.py."""
        texts = [c[-1]["content"] for c in completions]
        out = [0.0] * len(texts)
        math_i = [i for i, t in enumerate(task) if t == "math"]
        chat_i = [i for i, t in enumerate(task) if t == "chat"]
        if math_i:
            for i, r in zip(math_i, common.math_rewards([texts[i] for i in math_i], [answer[i] for i in math_i]), strict=True):
                out[i] = r
        if chat_i:
            scores = reward_model.score([prompts[i][-1]["content"] for i in chat_i], [texts[i] for i in chat_i])
            for i, r in zip(chat_i, scores, strict=True):
                out[i] = r
        return out

    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):  # grpo.py's auto rule for activation checkpointing, on the CPU
        big = sum(p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.model)).parameters()) \
            >= common.models.AUTO_CHECKPOINTING_PARAMS
    config = GRPOConfig(
        output_dir=args.output_dir, report_to="none", seed=args.seed, max_steps=args.num_steps,
        per_device_train_batch_size=args.prompts_per_step * args.samples_per_prompt,
        gradient_accumulation_steps=1, num_generations=args.samples_per_prompt,
        max_completion_length=args.max_new_tokens, temperature=args.temperature, top_p=1.0,
        learning_rate=args.learning_rate, lr_scheduler_type="constant_with_warmup", warmup_steps=args.warmup_steps,
        adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=args.adam_eps, weight_decay=0.0,
        max_grad_norm=args.max_grad_norm, beta=args.kl_coef, num_iterations=1,
        bf16=args.bf16, gradient_checkpointing=big, use_vllm=False, use_cpu=not torch.cuda.is_available(),
        logging_steps=1, save_strategy="no", dataloader_num_workers=0, log_completions=False,
    )
    trainer = GRPOTrainer(model=args.model, reward_funcs=reward, args=config, train_dataset=data)

    def timed(name, fn, count=None):
        def wrapper(*a, **kw):
            t0 = time.time()
            out = fn(*a, **kw)
            timers[name] += time.time() - t0
            if count:
                count(a, out)
            return out
        return wrapper

    def count_tokens(a, out):  # _generate returns (prompt_ids, completion_ids, ...)
        prompt_ids, completion_ids = out[0], out[1]
        timers["rollout_tokens"] += sum(len(c) for c in completion_ids)
        timers["train_tokens"] += sum(len(p) + len(c) for p, c in zip(prompt_ids, completion_ids, strict=True))

    trainer._generate = timed("generate_s", trainer._generate, count_tokens)
    trainer._calculate_rewards = timed("score_s", trainer._calculate_rewards)

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **kw):
            self.t0 = time.time()
            for k in timers:
                timers[k] = 0

        def on_step_end(self, _args, state, *a, **kw):
            step_s = time.time() - self.t0
            rec = {"step": state.global_step, "perf/step_s": step_s, "perf/generate_s": timers["generate_s"],
                   "perf/score_s": timers["score_s"], "perf/sync_s": 0.0,
                   "perf/train_s": step_s - timers["generate_s"] - timers["score_s"],
                   "perf/rollout_tokens": timers["rollout_tokens"], "perf/train_tokens": timers["train_tokens"],
                   "perf/train_completion_tokens": timers["rollout_tokens"],  # it trains on every completion
                   "perf/peak_memory_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
            with open(args.out, "a") as f:
                f.write(json.dumps(rec) + "\n")
            print(f"trl step {state.global_step}/{args.num_steps} | {step_s:.2f} s/step", flush=True)

    trainer.add_callback(StepTimer())
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    open(args.out, "w").close()
    trainer.train()


if __name__ == "__main__":
    main(tyro.cli(Args))
