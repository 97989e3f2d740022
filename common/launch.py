"""Starting and ending a run the way a person reads it: every flag checked before a model loads,
an output folder owned by one run at a time, one line for a user error or a Ctrl-C.

Explicit here rather than a `sys.excepthook`: torchrun's elastic error handler and vLLM replace or
wrap hooks, and a message printed by a hook was lost under both (seen: only exit status 2 showed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import re
import signal
import sys
import time
from collections.abc import Sequence

from common.args import flat
from common.utils import UserError

# Every numeric flag must be >= 0 (a new flag, a fork's too, is checked by default, never forgotten),
# and these shared ones > 0; a script names its own in `check_args(..., positive=...)`.
_POSITIVE = ("adam_eps", "eval_limit", "eval_samples", "eval_top_p", "kl_samples", "learning_rate", "max_grad_norm",
             "max_model_len", "max_new_tokens", "micro_batch_size", "num_steps", "prompts_per_step", "rm_batch_size",
             "rm_max_length", "samples", "samples_per_prompt", "save_every", "temperature", "top_p")
# Flags a resumed run may change: how long it runs, where and how often it logs, evaluates, saves
# and prints, and memory settings (micro-batch sizes change float rounding only). Every other flag
# (data, seed, step shape, sync interval, objective, precision, prompts) is what the run trains on:
# changed, the resumed run would not replay the one it continues, and `--resume` refuses it.
_RESUME_FREE = {"exp_name", "num_steps", "output_dir", "resume", "track", "wandb_project_name", "eval_dataset",
                "eval_split", "eval_every", "eval_samples", "eval_temperature", "eval_top_p", "eval_limit",
                "save_every", "log_samples_every", "completions_every", "micro_batch_size", "activation_checkpointing",
                "rm_batch_size", "rm_offload", "gpu_memory_utilization", "vllm_sleep"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the project's folder


def check_args(args, world_size: int, positive: Sequence[str] = (), windows: dict[str, int] | None = None) -> None:
    """Every shared flag and local path a user can get wrong, before any model loads: one `UserError`
    line naming the fix. The script names its own flags that must be > 0 (`positive`; every numeric
    flag must be >= 0) and the intervals a run resumes exactly at multiples of (`windows`, flag ->
    steps: `resume_window`); its algorithm's other rules are its own `check`."""
    from common.models import check_model_path

    project_paths(args)
    derived = derived_fields(args)  # filled in after parsing, not flags
    args = flat(args)  # the script's own flags and its plumbing (`args.run`) alike
    for name, what in (("model", "model"), ("reward_model", "reward model"), ("baseline", "baseline model"),
                       ("kl_to", "--kl-to model")):
        if getattr(args, name, ""):
            check_model_path(getattr(args, name), what)
            check_model_folder(getattr(args, name), what, tokenizer=name not in ("baseline", "kl_to"))
    configs = {}
    for name in ("model", "baseline"):
        if getattr(args, name, ""):
            config = configs[name] = check_generative(getattr(args, name), _flag(name),
                                                      getattr(args, "trust_remote_code", False))
            longest = getattr(config, "max_position_embeddings", None)
            if name == "model" and longest and getattr(args, "max_model_len", 0) > longest:
                raise UserError(f"--max-model-len {args.max_model_len} is longer than {args.model} was built for "
                                f"({longest} positions, its config's max_position_embeddings); use at most {longest}")
    if len(configs) == 2 and getattr(args, "chat_dataset", "") and _shape(configs["model"]) != _shape(configs["baseline"]):
        raise UserError(f"--baseline {args.baseline} ({', '.join(map(str, _shape(configs['baseline'])[:3]))}) is not "
                        f"shaped as --model {args.model} ({', '.join(map(str, _shape(configs['model'])[:3]))}): the "
                        "baseline's weights are loaded into the model's engine; pass a baseline of the same "
                        "architecture and size, or --baseline '' for no win rate")
    if getattr(args, "reward_model", ""):  # a checkpoint without a trained reward head is refused now
        from common.rewards import reward_model_layout

        reward_model_layout(args.reward_model, getattr(args, "trust_remote_code", False))
    if getattr(args, "vllm_sleep", False):
        import torch

        if not torch.cuda.is_available():
            raise UserError("--vllm-sleep frees GPU memory while the trainer updates; this machine has no GPU "
                            "(drop the flag)")
    for name, value in vars(args).items():
        if name in derived or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        strict = name in _POSITIVE or name in positive
        if not (value > 0 if strict else value >= 0):
            raise UserError(f"{_flag(name)} must be {'> 0' if strict else '>= 0'} (got {value})")
    if not all(0 <= b < 1 for b in getattr(args, "adam_betas", ())):
        raise UserError(f"--adam-betas must each be in [0, 1) (got {args.adam_betas})")
    for name in ("top_p", "eval_top_p"):
        if getattr(args, name, 1.0) > 1:
            raise UserError(f"{_flag(name)} must be at most 1 (got {getattr(args, name)})")
    if getattr(args, "gpu_memory_utilization", 0.0) >= 1:
        raise UserError(f"--gpu-memory-utilization is a fraction below 1 (got {args.gpu_memory_utilization})")
    from common.generation import SEED_STRIDE

    for name in ("samples_per_prompt", "eval_samples", "samples"):
        if getattr(args, name, 1) > SEED_STRIDE:
            raise UserError(f"{_flag(name)} {getattr(args, name)}: at most {SEED_STRIDE} samples per prompt "
                            "(each prompt's sampling streams are kept apart from every other's)")
    if getattr(args, "samples_per_prompt", 2) < 2:
        raise UserError("--samples-per-prompt must be >= 2: one sample per prompt gives nothing to compare")
    s, what = resume_window(windows)
    if hasattr(args, "save_every") and args.save_every % s and args.save_every < args.num_steps:
        raise UserError(f"--save-every {args.save_every} is not a multiple of {what}: a checkpoint inside a sync "
                        f"window cannot resume exactly (the rest of the window was sampled from, or scored against, the "
                        f"window's first weights); use a multiple of {s} ({s}, {2 * s}, ...)")
    # vLLM's logprob of a token sampled with top-p < 1 is renormalised over the nucleus, the trainer's
    # is not: the logprob gap (each sync's proof) and importance weights (~0.9 on on-policy tokens at
    # top-p 0.9) would compare two distributions. Training rollouts only: evaluation may use top-p.
    if getattr(args, "top_p", 1.0) < 1 and hasattr(args, "samples_per_prompt"):
        raise UserError(f"--top-p {args.top_p}: the engine's logprobs of a nucleus sample are renormalised over the "
                        "nucleus and the trainer's are not, so the logprob gap (each sync's proof) and --tis-cap "
                        "would compare two distributions; train with --top-p 1 (the paper's rollouts; offline DPO's pairs are "
                        "sampled as the online regimes sample)")
    template = getattr(args, "chat_template", "auto")
    if template not in ("auto", "llama3-no-system") and not os.path.isfile(os.path.expanduser(template)):
        raise UserError(f"--chat-template {template}: neither auto, llama3-no-system nor a Jinja file")
    if hasattr(args, "prompts_per_step") and args.prompts_per_step % world_size:
        raise UserError(f"--prompts-per-step {args.prompts_per_step} must divide by the number of ranks ({world_size})")
    if hasattr(args, "max_new_tokens") and args.max_new_tokens >= args.max_model_len:
        raise UserError(f"--max-new-tokens ({args.max_new_tokens}) must be below --max-model-len ({args.max_model_len}): "
                        "the prompt needs room too")
    for temperature, samples in (("eval_temperature", "eval_samples"), ("temperature", "samples")):
        if getattr(args, temperature, 1.0) == 0 and getattr(args, samples, 1) > 1:
            raise UserError(f"{_flag(temperature)} 0 is greedy: one sample per prompt; set {_flag(samples)} 1 "
                            "or a temperature above 0")


def project_paths(args) -> None:
    """The embedded defaults (`embedded/...`) are the project's files, wherever it is run from: from
    a folder without its own `embedded/`, such a path is read from the project (it would otherwise be
    tried as a hub id: seconds of retries, then an error)."""
    if os.path.isdir("embedded"):
        return

    def moved(value):  # a path, a spec (`math:a.jsonl,chat:b.jsonl`) or a tuple of them
        if isinstance(value, tuple):
            return tuple(moved(v) for v in value)
        if isinstance(value, str):
            return re.sub(r"(?<![\w./~-])embedded/", os.path.join(ROOT, "embedded", ""), value)
        return value

    for obj in (args, getattr(args, "run", None)):
        for f in dataclasses.fields(obj) if dataclasses.is_dataclass(obj) else ():
            setattr(obj, f.name, moved(getattr(obj, f.name)))


def check_model_folder(name: str, what: str, tokenizer: bool) -> None:
    """A local model folder holds what loading it needs: config.json, weights and (for a model whose
    tokenizer is used) tokenizer files; one line naming what is missing, not a traceback from deep in
    transformers (an empty folder) or a wrong cause ("no chat template" for a folder without a
    tokenizer)."""
    from pathlib import Path

    path = Path(name).expanduser()
    if not path.is_dir():  # a hub id: check_model_path has fetched its config
        return
    files = [p.name for p in path.iterdir()]
    missing = []
    if "config.json" not in files:
        missing.append("config.json")
    if not any(f.endswith((".safetensors", ".bin")) for f in files):  # .index.json: a sharded one's shards
        missing.append("weights (*.safetensors)")
    if tokenizer and not {"tokenizer.json", "tokenizer_config.json", "tokenizer.model"} & set(files):
        missing.append("tokenizer files (tokenizer.json, tokenizer_config.json)")
    if missing:
        raise UserError(f"{what} folder '{name}' has no {' and no '.join(missing)}: not a whole Hugging Face model "
                        "folder (what save_pretrained writes for the model and its tokenizer)")


def resume_window(windows: dict[str, int] | None) -> tuple[int, str]:
    """(steps, what) a run resumes exactly at multiples of: the least common multiple of a script's
    sync intervals (flag -> steps: semi-online DPO's generator and a reference on its own schedule),
    named by the flag that sets it, or as the lcm when none does alone."""
    windows = windows or {}
    steps = math.lcm(*windows.values()) if windows else 1
    alone = [f"{flag} {k}" for flag, k in windows.items() if k == steps]
    return steps, alone[0] if alone else f"lcm({', '.join(f'{f} {k}' for f, k in windows.items())}) = {steps}"


def _shape(config) -> tuple:
    """What two checkpoints must share for one's weights to load into an engine built for the other."""
    c = getattr(config, "text_config", config)
    return ("/".join(config.architectures or ["?"]), f"{c.num_hidden_layers} layers", f"hidden {c.hidden_size}",
            c.vocab_size, c.num_attention_heads, getattr(c, "num_key_value_heads", None),
            getattr(c, "intermediate_size", None), getattr(c, "head_dim", None))


def check_generative(name: str, flag: str, trust_remote_code: bool = False):
    """`name` must be a generative (causal) language model: vLLM samples from it and the trainer
    computes its next-token log-probs. A reward or classification model is refused by its config,
    which is returned."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    archs = config.architectures or []
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if archs and not any(a in causal or a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration"))
                         for a in archs):
        raise UserError(f"{flag} {name} is a {', '.join(archs)}, not a generative language model "
                        "(a *ForCausalLM); a reward model goes to --reward-model")
    return config


def claim_output_dir(args, world_size: int, rank: int, windows: dict[str, int] | None = None) -> None:
    """Make `output_dir` this run's, before any model loads: created and proven writable, locked
    for the run's lifetime (an OS lock, released when the process dies, so a killed run never
    leaves a stale one), and consistent with `--resume` (which finds the checkpoint, repairing one a
    crash left half-renamed). A folder whose run stopped before its first checkpoint is simply
    started over. Semi-online DPO resumes only at a sync-window boundary (`resume_window`).
    Collective under torchrun."""
    full, args = args, flat(args)
    output_dir, resume = args.output_dir, args.resume
    step_json = os.path.join(output_dir, "checkpoint", "step.json")
    if rank == 0:
        try:
            os.makedirs(output_dir, exist_ok=True)
            probe = os.path.join(output_dir, ".write_test")
            with open(probe, "w") as f:
                f.write("ok")
            os.remove(probe)
        except OSError as e:
            raise UserError(f"--output-dir {output_dir} is not writable ({e.strerror})") from None
        lock = open(os.path.join(output_dir, ".lock"), "a+")  # noqa: SIM115 -- held until the process ends
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.seek(0)
            raise UserError(f"{output_dir} is in use by another run (pid {lock.read().strip() or '?'}); "
                            "wait for it or pass another --output-dir") from None
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        claim_output_dir.lock = lock  # keep the file (and so the lock) open for the run
    if resume:
        from common.checkpoint import find_checkpoint

        find_checkpoint(os.path.join(output_dir, "checkpoint"))  # puts back a checkpoint a crash left half-renamed
    has_checkpoint = os.path.exists(step_json)
    if resume and not has_checkpoint:
        raise UserError(f"--resume: no checkpoint in {output_dir} (run without --resume to start over)")
    if not resume and has_checkpoint:
        raise UserError(f"{output_dir} holds a run with a checkpoint; pass --resume to continue it, or another --output-dir")
    if resume and os.path.exists(step_json):
        written_by = json.load(open(step_json))["world_size"]
        if written_by != world_size:
            raise UserError(f"--resume: {output_dir} was written by {written_by} rank(s); resume with the same "
                            f"number (this run has {world_size})")
        from common.checkpoint import check_checkpoint

        check_checkpoint(os.path.join(output_dir, "checkpoint"), world_size)
        step, (s, what) = json.load(open(step_json))["step"], resume_window(windows)
        if step % s and step < args.num_steps:  # only a run's last step can end inside a window
            raise UserError(f"--resume: the checkpoint of step {step} is inside a sync window ({what}): "
                            f"the run it came from stopped there, and this one would sample steps {step + 1}-"
                            f"{min((step // s + 1) * s, args.num_steps)} from newer weights than one uninterrupted run "
                            f"(cut at step {step // s * s} instead); resume with --num-steps {step}, or start a new "
                            f"run with --model {output_dir}/checkpoint")
        check_resumed_flags(full, output_dir, rank)


def derived_fields(args) -> set[str]:
    """The fields of a script's `Args` (and its `run`) filled in after parsing: those marked
    `tyro.conf.Suppress` (not flags; a fork's own derived field is found the same way)."""
    import typing

    import tyro

    return {name for cls in (type(args), type(getattr(args, "run", None))) if dataclasses.is_dataclass(cls)
            for name, hint in typing.get_type_hints(cls, include_extras=True).items()
            if tyro.conf.Suppress in getattr(hint, "__metadata__", ())}


def flags_record(args) -> dict:
    """A script's flags (its own and its plumbing, not the values derived after parsing), as the JSON
    the run folder keeps in `args.json`."""
    derived = derived_fields(args)
    return json.loads(json.dumps({k: v for k, v in vars(flat(args)).items() if k not in derived}))


def check_resumed_flags(args, output_dir: str, rank: int) -> None:
    """`--resume` with the flags the run started with (`args.json`): one line naming each changed flag
    the replay depends on; the others (`_RESUME_FREE`) said in one line and accepted."""
    path = os.path.join(output_dir, "args.json")
    if not os.path.exists(path):  # a folder written before the record was kept
        if rank == 0:
            print(f"resume: {path} is missing: the flags cannot be compared with the run's", flush=True)
        return
    old, new = json.load(open(path)), flags_record(args)
    changed = {k: (old[k], new[k]) for k in sorted(old.keys() & new.keys()) if old[k] != new[k] and k != "resume"}
    say = lambda names: ", ".join(f"{_flag(k)} {changed[k][0]} -> {changed[k][1]}" for k in names)  # noqa: E731
    breaking = [k for k in changed if k not in _RESUME_FREE]
    if breaking:
        raise UserError(f"--resume: {say(breaking)} changed since the run started: the resumed run would not replay "
                        f"it; resume with the flags in {path}, or start a new run with --model {output_dir}/checkpoint")
    if changed and rank == 0:
        print(f"resume: changed since the run started (the replay does not depend on them): {say(changed)}", flush=True)


def run(main, args) -> None:
    """`main(args)`, with the endings a person can read: a `UserError` prints one line (`error: ...`,
    prefixed with the rank under torchrun) and exits 2; Ctrl-C (or torchrun's SIGTERM) prints one
    line saying what was saved and how to continue, and exits 130; any other exception keeps its
    traceback. The process then ends at once: vLLM's exit-time teardown would only add noise."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # torchrun stops workers with SIGTERM
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
    try:
        main(args)
        return
    except UserError as e:
        message, code = f"{prefix}error: {e}", 2
        if os.environ.get("TORCHELASTIC_ERROR_FILE"):  # torchrun's failure summary then names the cause
            with contextlib.suppress(OSError), open(os.environ["TORCHELASTIC_ERROR_FILE"], "w") as f:
                json.dump({"message": {"message": f"UserError: {e}", "extraInfo": {
                    "py_callstack": f"UserError: {e}", "timestamp": str(int(time.time()))}}}, f)
    except KeyboardInterrupt:
        message, code = f"{prefix}interrupted", 130
        output_dir = getattr(flat(args), "output_dir", "")
        step_json = os.path.join(output_dir, "checkpoint", "step.json")
        if not os.path.exists(step_json):  # stopped between a save's two renames: --resume puts it back
            step_json = os.path.join(output_dir, "checkpoint.old", "step.json")
        if output_dir and os.path.exists(step_json):
            message += (f": {output_dir}/checkpoint holds step {json.load(open(step_json))['step']}; continue with the "
                        "same command and --resume")
        elif output_dir:
            message += f" before the first checkpoint: nothing to resume; the same command starts over in {output_dir}"
    sys.stdout.flush()
    # the whole line in one write: two ranks failing at once share the pipe (atomic below 4 KiB),
    # where print's two writes (text, then newline) interleave
    sys.stderr.write(message + "\n")
    sys.stderr.flush()
    os._exit(code)


def finish(logger, generator, output_dir: str, t_start: float) -> None:
    """The end of a run: the metrics closed, the engine shut down, the process group left."""
    import torch.distributed as dist

    if logger is not None:
        logger.finish()
        print(f"done: {output_dir}/checkpoint holds the final model ({(time.time() - t_start) / 60:.1f} min)", flush=True)
    if generator is not None:
        generator.shutdown()  # CRUCIAL: before destroy_process_group (vLLM's exit-time cleanup uses the group)
    if dist.is_initialized():
        dist.destroy_process_group()


# What every script builds the same way from its flags; the scripts call these so their own lines
# stay the regime's.
def reward_model_for(args, device, rows: list[dict], verbose: bool):
    """The reward model (`--reward-model`), or None when no row is a chat row (math is verified)."""
    if not any(r["task"] == "chat" for r in rows):
        return None
    from common.models import compute_dtype
    from common.rewards import RewardModel

    return RewardModel(args.reward_model, device, compute_dtype(args.run.compute_dtype, device, args.model),
                       max_length=args.run.rm_max_length,
                       batch_size=args.run.rm_batch_size, offload=args.run.rm_offload,
                       trust_remote_code=args.run.trust_remote_code, verbose=verbose)


def generator_for(args, device, max_num_seqs: int):
    """The in-process vLLM engine of `--model`, with room for `max_num_seqs` sequences at once."""
    from common.generation import Generator
    from common.models import compute_dtype, engine_dtype

    run = args.run
    return Generator(args.model, max_model_len=run.max_model_len, max_num_seqs=max_num_seqs,
                     gpu_memory_utilization=run.gpu_memory_utilization,
                     dtype=engine_dtype(run.generator_dtype, compute_dtype(run.compute_dtype, device, args.model)),
                     seed=args.seed,
                     enable_sleep_mode=run.vllm_sleep, trust_remote_code=run.trust_remote_code)


def logger_for(args, rank: int, start_step: int, data: str):
    """Rank 0's `MetricsLogger` (metrics.jsonl, and wandb with --track; the config after
    derivation), after a line saying what the run is (`data`: what it trains on) and in which
    precision; None on the other ranks."""
    import torch

    from common.models import compute_dtype, engine_dtype
    from common.utils import MetricsLogger

    if rank != 0:
        return None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # setup_distributed's
    dtype = compute_dtype(args.run.compute_dtype, device, args.model)
    engine = engine_dtype(args.run.generator_dtype, dtype)
    print(f"{args.exp_name}: {data}, {args.world_size} rank(s), {args.num_steps} steps of "
          f"{args.prompts_per_step}x{args.samples_per_prompt}, {str(dtype)[6:]} compute over fp32 masters, "
          f"{str(engine)[6:]} engine -> {args.run.output_dir}", flush=True)
    with open(os.path.join(args.run.output_dir, "args.json"), "w") as f:  # the run's record; --resume reads it
        json.dump(flags_record(args), f, indent=1)
    return MetricsLogger(args.run.output_dir, dataclasses.asdict(args), args.run.track,
                         args.run.wandb_project_name, f"{args.exp_name}__{args.seed}",
                         resume_step=start_step)
