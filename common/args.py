"""The plumbing flags, defined once and flattened into every script's command line: where a run
writes, what it logs, how often it evaluates and saves, and the memory and engine settings. None of
them is the algorithm (the regime's own knobs are in its script's `Args`); the evaluation settings
change what is measured, never what is trained.

A script holds them as `args.run` and tyro lists them in `--help` under "run options", without a
prefix: `--output-dir`, `--vllm-sleep`, ... keep their names.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Literal

from common.data import PAPER_MATH_TEMPLATE


@dataclass
class RunArgs:
    """plumbing: output, logging, reading the data, evaluation and checkpoint cadence, memory, the
    vLLM engine"""

    output_dir: str = ""
    """where checkpoints and metrics.jsonl go (default: runs/<exp_name>__<seed>)"""
    resume: bool = False
    """continue the run in output_dir from its last checkpoint"""
    track: bool = False
    """log to Weights & Biases (metrics.jsonl is always written)"""
    wandb_project_name: str = "bridging-rl"
    """the wandb project"""
    max_model_len: int = 256
    """prompt + completion limit of the vLLM engine; longer prompts are dropped at start"""
    dataset_split: str = "train"
    """split of a hub dataset"""
    pairs_split: str = "train"
    """split of a hub preference dataset (offline_dpo.py's --pairs)"""
    eval_split: str = "test"
    """split of a hub eval dataset"""
    math_template: str = PAPER_MATH_TEMPLATE
    """user turn for rows that give a `problem` (rows with a `prompt` are used verbatim)"""
    rm_max_length: int = 4096
    """reward model: (prompt, response) truncated to this many of its tokens (the paper: 4096)"""
    trust_remote_code: bool = False
    """allow model repos to run their own code"""
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
    completions_every: int = 10
    """write every N steps' prompts, completions, rewards and pairs / advantages (all ranks') to
    completions.jsonl, and a W&B table with --track (0: never; docs/metrics.md: how big it grows)"""
    micro_batch_size: int = 64
    """sequences per forward/backward pass (gradients accumulate to one step; sorted by length)"""
    activation_checkpointing: Literal["auto", "on", "off"] = "auto"
    """recompute each decoder layer's activations in the backward pass instead of keeping them
    (auto: on a GPU, and on the CPU for 100M+ parameters; tiny models only lose time)"""
    rm_batch_size: int = 8
    """reward model: sequences per forward pass (memory only)"""
    rm_offload: bool = False
    """keep the reward model in CPU memory between uses, on the device only while it scores"""
    gpu_memory_utilization: float = 0.0
    """GPU memory fraction vLLM takes (0: 0.3, 0.5 with --vllm-sleep); on the CPU, 0 sizes its KV
    cache to one step's sequences"""
    vllm_sleep: bool = False
    """GPU: free vLLM's memory while the trainer updates (sleep mode)"""
    compute_dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """what the trainer computes in (over fp32 master weights) and the references and reward model
    are held in (auto: bf16 on a GPU, the paper's; on the CPU bf16 for 10M+ parameters where it has
    AMX / AVX512-BF16, fp32 otherwise: docs/benchmarks.md); bfloat16 on the CPU takes the
    GPU's numeric path in everything but the kernels"""
    generator_dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """the engine's precision (auto: --compute-dtype's); bfloat16 with an fp32 trainer reproduces a
    GPU's trainer-engine logprob gap on a laptop (what grpo.py's --tis-cap corrects)"""
    chat_template: str = "auto"
    """what renders the prompts: auto (the tokenizer's own), llama3-no-system (the authors' format:
    Llama-3's turns, no system turn; Llama-3.1-Instruct's own adds a dated one), or a Jinja file"""


def flat(args) -> SimpleNamespace:
    """Every field of a script's `Args` and of its `args.run`, by flag name, for the checks that
    read them all (`check_args`, `claim_output_dir`)."""
    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.name != "run"}
    run = getattr(args, "run", None)
    return SimpleNamespace(**({} if run is None else vars(run)), **fields)
