"""The generator: one in-process vLLM engine per rank, with in-process weight reload.

This file holds every call into vLLM internals, so that a vLLM upgrade breaks one small, tested
place (tests/test_generation.py) and not the training scripts.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from common.models import full_state_dict

# In-process engine: the engine core runs in this process, so `collective_rpc` reaches the model
# runner directly and the trainer's tensors are handed over without serialization.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
# A quiet console: vLLM logs ~50 lines at start-up and 3 per weight sync at INFO / WARNING, none of
# which a training run acts on. `VLLM_LOGGING_LEVEL=INFO python grpo.py ...` shows them again.
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
warnings.filterwarnings("ignore", category=FutureWarning, module=r"vllm\.")


class _RotaryReloadFilter(logging.Filter):
    """Drops vLLM's "RotaryEmbedding: Failed to load weights", logged at every weight sync: a rotary
    embedding's only tensor is its cos/sin cache, computed from the config and never in a
    checkpoint, so a reload has nothing to put there and vLLM keeps the cache it built at start-up.
    Harmless; `rollout/logprob_gap_max` ~1e-6 right after every sync (and
    tests/test_generation.py) is the proof that the reload is complete."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.msg == "%s: Failed to load weights" and record.args == ("RotaryEmbedding",)
        )


logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(
    _RotaryReloadFilter()
)


@contextlib.contextmanager
def _start_up_output_shown_only_on_failure():
    """Hold back what the engine's start-up prints on stderr (C++ warnings and progress bars that no
    log level reaches), and show it only if the start-up fails, or when `VLLM_LOGGING_LEVEL` asks
    for more than errors."""
    if os.environ.get("VLLM_LOGGING_LEVEL") != "ERROR":
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            sys.stderr.flush()
            os.dup2(saved, 2)
            held.seek(0)
            sys.stderr.write(held.read().decode(errors="replace"))
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


# Seconds a phase runs before it reports progress (and between two reports): short calls say
# nothing.
PROGRESS_EVERY_S = float(os.environ.get("BRIDGING_PROGRESS_S", "15"))


class _ProgressLines:
    """What vLLM's `generate` feeds its tqdm bar (`use_tqdm=` this), told as a line every
    PROGRESS_EVERY_S seconds and one at the end, once a call has run that long: a log file reads as
    lines (tqdm's carriage returns do not), and a short call prints nothing."""

    def __init__(self, iterable=None, *, label: str, sequences: int, **tqdm_kwargs):
        self.iterable, self.label, self.total, self.n, self.postfix = (
            iterable,
            label,
            sequences,
            0,
            "",
        )
        self.t0 = self.said = time.time()

    def __iter__(self):  # vLLM also wraps its prompt rendering (quick): passed through unreported
        return iter(self.iterable)

    @property
    def format_dict(self) -> dict:
        return {"elapsed": max(time.time() - self.t0, 1e-9)}

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.time() - self.said >= PROGRESS_EVERY_S and self.n < self.total:
            elapsed = time.time() - self.t0
            left = elapsed / self.n * (self.total - self.n)
            print(
                f"{self.label}: {self.n:,}/{self.total:,} sequences, {elapsed:.0f} s, "
                f"~{left:.0f} s left",
                flush=True,
            )
            self.said = time.time()

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        if time.time() - self.t0 >= PROGRESS_EVERY_S:  # a call long enough to have reported
            print(
                f"{self.label}: {self.n:,} sequences in {time.time() - self.t0:.0f} s", flush=True
            )


def kv_cache_bytes(
    model: str, tokens: int, dtype: torch.dtype, trust_remote_code: bool = False
) -> int:
    """Bytes of KV cache for `tokens` tokens of `model`: keys and values of every layer's KV
    heads."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    c = getattr(c, "text_config", c)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    return 2 * c.num_hidden_layers * kv_heads * head_dim * dtype.itemsize * tokens


# CRUCIAL: vLLM seeds sample i of an n-sample request with `seed + i` (vllm/v1/engine/
# parallel_sampling.py), so two requests whose seeds are closer than n share random streams (seen:
# one prompt twice with consecutive seeds gave the same samples shifted by one). Every request seed
# here is a distinct multiple of SEED_STRIDE: up to SEED_STRIDE samples per request, none shared.
SEED_STRIDE = 4096


def request_seed(key: int) -> int:
    """The vLLM seed of the request with this `key` (keys unique within a run: StepOrder's for
    training, `common.eval_seeds` for evaluation)."""
    return key * SEED_STRIDE % 2**63


@dataclass
class Completion:
    token_ids: list[int]  # sampled tokens, EOS included when the model stopped on it
    text: str
    logprobs: list[float]  # vLLM's logprob of each sampled token (temperature applied)
    finish_reason: str  # "stop" (EOS / stop string) or "length" (hit max_tokens: truncated)


class Generator:
    """A vLLM `LLM` living in this process, on this rank's device.

    Under torchrun every rank owns a full copy (tensor parallel 1) and generates for its own
    prompt shard; `distributed_executor_backend="external_launcher"` makes vLLM join the process
    group torchrun already set up instead of spawning workers.
    """

    def __init__(
        self,
        model: str,
        *,
        max_model_len: int,
        max_num_seqs: int = 256,
        gpu_memory_utilization: float = 0.0,
        dtype: torch.dtype,
        seed: int = 0,
        enable_sleep_mode: bool = False,
        trust_remote_code: bool = False,
    ):
        """`max_num_seqs`: the sequences one call generates (a step's prompts x samples on this
        rank; semi-online: a whole window's): the engine runs that many at once, at most 1024 on a
        GPU (vLLM's own default there) and 256 on the CPU, whose KV cache is sized to them (more at
        once buys a CPU nothing; the rest wait their turn). `gpu_memory_utilization`: on a GPU the
        fraction of its memory vLLM takes (0: 0.3); on the CPU 0 sizes the KV cache to exactly
        those sequences at full length (vLLM's own CPU sizing counts the trainer's memory against
        the fraction, so a real-size policy left it no room), a fraction > 0 is vLLM's CPU meaning
        (of the NUMA node)."""
        on_gpu = torch.cuda.is_available()
        max_num_seqs = min(max_num_seqs, 1024 if on_gpu else 256)
        kwargs = {"max_num_seqs": max_num_seqs}
        if (
            on_gpu
        ):  # asleep during the update, the engine can take more while it generates (docs/gpu.md)
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization or (
                0.5 if enable_sleep_mode else 0.3
            )
        else:
            # CRUCIAL (CPU backend): a seeded request whose prompt is split across scheduler steps
            # (chunked prefill) makes vLLM rewind its torch.Generator, which CPU generators do not
            # support ("CPU Generator does not use offset"). Whole-prompt scheduling avoids it.
            kwargs["enable_chunked_prefill"] = False
            # vLLM drops this process's torch threads to 1 "for serving" unless OMP_NUM_THREADS
            # is set; in-process, that would also halve the trainer's speed on a 2-core machine.
            os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
            if gpu_memory_utilization:
                kwargs["gpu_memory_utilization"] = gpu_memory_utilization
            else:
                kwargs["kv_cache_memory_bytes"] = kv_cache_bytes(
                    model, max_num_seqs * max_model_len, dtype, trust_remote_code
                )
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            kwargs["distributed_executor_backend"] = "external_launcher"
        self.enable_sleep_mode, self.sleeping, self.dtype = enable_sleep_mode, False, dtype
        t0 = time.time()
        if _rank() == 0:  # minutes at 8B, and vLLM's own start-up lines are held back
            print(
                f"generator: starting vLLM on {model} ({str(dtype)[6:]}, up to {max_num_seqs} "
                f"sequences of <= {max_model_len} tokens at once) ...",
                flush=True,
            )
        with _start_up_output_shown_only_on_failure():
            from vllm import LLM

            self.llm = LLM(
                model=model,
                dtype=dtype,
                seed=seed,  # engine-level seed; each request also carries its own (see generate)
                max_model_len=max_model_len,
                enable_prefix_caching=True,
                enable_sleep_mode=enable_sleep_mode,
                trust_remote_code=trust_remote_code,
                # Logprobs after temperature scaling: the distribution tokens were sampled from,
                # which is what the trainer recomputes (common.completion_logprobs divides by T).
                logprobs_mode="processed_logprobs",
                tensor_parallel_size=1,
                use_tqdm_on_load=False,
                **kwargs,
            )
        self.tokenizer = self.llm.get_tokenizer()
        if _rank() == 0:
            print(f"generator: ready in {time.time() - t0:.0f} s", flush=True)
        cache = self.llm.llm_engine.vllm_config.cache_config
        # (unknown, 0, if the engine core runs in another process: then the capacity is not checked)
        self.kv_tokens, self.max_num_seqs = (
            (cache.num_gpu_blocks or 0) * cache.block_size,
            max_num_seqs,
        )
        self.kv_warned = False
        self.memory_flag = "--gpu-memory-utilization" + (
            f" (now {kwargs['gpu_memory_utilization']})"
            if "gpu_memory_utilization" in kwargs
            else ""
        )

    def check_kv_capacity(self, prompts: list[list[int]], n: int, max_tokens: int) -> None:
        """Say once, in one line, when the KV cache cannot hold the sequences a call runs at once at
        full length: vLLM then preempts and recomputes them, silently slower. Every call is checked
        (the first, a step-0 evaluation, may be smaller than a semi-online window)."""
        if self.kv_warned or not self.kv_tokens or not prompts:
            return
        seqs = min(len(prompts) * n, self.max_num_seqs)
        need = seqs * (sum(map(len, prompts)) // len(prompts) + max_tokens)
        self.kv_warned = need > self.kv_tokens
        if self.kv_warned and _rank() == 0:
            print(
                f"generator: the KV cache holds {self.kv_tokens:,} tokens per rank; the {seqs} "
                f"sequences it runs at once need up to {need:,} (prompt + --max-new-tokens): vLLM "
                "will preempt and recompute them, "
                f"slower. Raise {self.memory_flag}, or give each rank fewer sequences",
                flush=True,
            )

    def generate(
        self,
        prompts: list[list[int]],
        *,
        n: int,
        temperature: float,
        top_p: float,
        max_tokens: int,
        seed: int | list[int],
        label: str = "rollout",
    ) -> list[list[Completion]]:
        """`n` completions for each prompt (token ids, chat template already applied).

        `seed`: one vLLM sampling seed per prompt (from `request_seed`: see SEED_STRIDE), or an
        int s meaning keys s, s + 1, ...; training and evaluation give each (prompt, step, rank)
        and each held-out problem its own key, so no two requests share a random stream and two
        runs differ. A prompt's samples depend only on its seed and the weights, not on what else
        is in the batch. A call longer than PROGRESS_EVERY_S says how far it is, as `label`.
        """
        if n > SEED_STRIDE:
            raise ValueError(
                f"{n} samples per request: at most {SEED_STRIDE} keep their streams apart"
            )
        seeds = (
            seed
            if isinstance(seed, list)
            else [request_seed(seed + i) for i in range(len(prompts))]
        )
        self.check_kv_capacity(prompts, n, max_tokens)
        self.wake_up()
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        # Speed (CPU, small models: per-token Python work bounds vLLM): `detokenize=False` skips
        # the engine's incremental detokenizer and its per-token decode of logprob entries; the
        # texts are decoded here in one batched call instead. `flat_logprobs` keeps the logprobs
        # in flat lists, not one dict and one object per token. logprobs=0: the sampled token's
        # own logprob.
        params = [
            SamplingParams(
                n=n,
                temperature=temperature,
                top_p=top_p,
                max_tokens=max_tokens,
                logprobs=0,
                seed=s,
                detokenize=False,
                flat_logprobs=True,
            )
            for s in seeds
        ]
        # a long call (a semi-online window, an evaluation) reports its progress as `label`, on
        # rank 0
        lines = functools.partial(_ProgressLines, label=label, sequences=len(prompts) * n)
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in prompts],
            params,
            use_tqdm=lines if _rank() == 0 else False,
        )
        token_ids = [list(o.token_ids) for out in outputs for o in out.outputs]
        texts = iter(self.tokenizer.batch_decode(token_ids, skip_special_tokens=True))
        ids = iter(token_ids)
        return [
            [
                Completion(
                    token_ids=next(ids),
                    text=next(texts),
                    logprobs=list(o.logprobs.logprobs),
                    finish_reason=o.finish_reason or "length",
                )
                for o in out.outputs
            ]
            for out in outputs
        ]

    @torch.no_grad()
    def sync_weights(self, model: torch.nn.Module) -> None:
        """Overwrite the engine's weights with the trainer's current ones, in place.

        Uses the model runner's `reload_weights(weights_iterator=...)`, which loads checkpoint-
        format tensors through the model's own `load_weights` (it handles vLLM's fused qkv /
        gate_up layouts and the CPU backend's repacked linears). The per-parameter
        `load_weights` path that TRL's colocate mode uses fails on the CPU backend.
        CRUCIAL: the prefix cache holds KV computed with the old weights; reset it.
        """
        self.wake_up()  # CRUCIAL: wake first, then push the weights, then generate
        self.llm.collective_rpc(
            "reload_weights", kwargs={"weights_iterator": full_state_dict(model, self.dtype)}
        )
        self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        """Free the engine's GPU memory (weights and KV cache) during the trainer's update.
        Level 1 parks the weights in CPU memory; level 2 would drop them (and, depending on the
        vLLM version, non-parameter buffers such as rotary caches that a reload does not restore).
        `sync_weights` wakes the engine before it pushes the new weights."""
        if self.enable_sleep_mode and not self.sleeping:
            self.llm.sleep(level=1)
            self.sleeping = True

    def wake_up(self) -> None:
        if self.sleeping:
            self.llm.wake_up()
            self.sleeping = False

    def shutdown(self) -> None:
        """Shut the engine down; call before `destroy_process_group` (vLLM's exit-time cleanup
        otherwise touches a destroyed group)."""
        engine = getattr(self.llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        del self.llm


def sample_steps(generator: Generator, prompt_ids: list[list[int]], order, args, timer):
    """Every step's (P, n) rollouts of a run from the generator's present weights, before
    training (offline_dpo.py's s = ∞), yielded as (step, completions): sampled in calls of about
    256 prompts (memory stays bounded; each step keeps its own seeds, so the samples do not depend
    on the call size), each call timed in `timer("generate")`, progress printed on rank 0."""
    from common.utils import chunks

    per_call = max(1, 256 // args.prompts_per_rank)  # steps per call
    for first in range(1, args.num_steps + 1, per_call):
        window = range(first, min(first + per_call, args.num_steps + 1))
        with timer("generate"):
            flat = generator.generate(
                [prompt_ids[i] for i in order.indices(*window)],
                n=args.samples_per_prompt,
                temperature=args.temperature,
                top_p=args.top_p,
                max_tokens=args.max_new_tokens,
                seed=order.seeds(*window),
            )
            generator.sleep()  # the reward model scores in the engine's memory (--vllm-sleep)
        yield from zip(window, chunks(flat, args.prompts_per_rank), strict=True)
        if order.first == 0:  # rank 0
            print(
                f"sampling from the seed: step {window[-1]}/{args.num_steps}, "
                f"{timer.total():.0f} s",
                flush=True,
            )
