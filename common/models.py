"""Model plumbing: tokenizer / policy / reference loading, FSDP2 wrapping, the full-state-dict
stream that feeds the generator, and trainer-side per-token logprobs."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import time
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub
import torch
import torch.distributed as dist
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from common.utils import UserError

# No "Loading weights" / "Writing model shards" bars at every load and save (a reference, each
# checkpoint); a hub download keeps its bars, on one rank (minutes for an 8B model, silent
# otherwise).
transformers.utils.logging.disable_progress_bar()
if os.environ.get("RANK", "0") == "0":
    huggingface_hub.utils.enable_progress_bars()


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).exists()


class _HubRetries(logging.Filter):
    """huggingface_hub logs two lines per retry of an unreachable request (11 over ~26 s): one line
    instead, at the first, saying what is retried; the rest are dropped."""

    def __init__(self, what: str):
        super().__init__()
        self.what, self.said = what, False

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.said and os.environ.get("RANK", "0") == "0":
            print(f"{self.what}: the hub does not answer; retrying for up to ~25 s ...", flush=True)
        self.said = True
        return False


@contextlib.contextmanager
def _one_line_for_hub_retries(what: str):
    hub_http = logging.getLogger("huggingface_hub.utils._http")
    retries = _HubRetries(what)
    hub_http.addFilter(retries)
    try:
        yield
    finally:
        hub_http.removeFilter(retries)


def check_model_path(name: str, what: str = "model") -> None:
    """A name that looks like a local path must be an existing folder (not a hub id to try), and
    its safetensors files whole: a truncated or corrupt file is named now, not deep in a load."""
    if not _looks_local(
        name
    ):  # a hub id: its config (a small file) must be reachable now, not after a long load
        from transformers import AutoConfig

        t0 = time.time()
        try:
            with _one_line_for_hub_retries(f"{what} '{name}'"):
                AutoConfig.from_pretrained(name)
        except (OSError, ValueError) as e:
            raise UserError(
                f"{what} '{name}' is not a local folder and not a reachable hub id "
                f"({str(e).splitlines()[0].rstrip('.')}; after {time.time() - t0:.0f} s)"
            ) from None
        return
    path = Path(name).expanduser()
    if not path.is_dir():
        raise UserError(f"{what} folder '{name}' does not exist")
    for f in sorted(path.glob("*.safetensors")):
        check_safetensors(str(f), f"{what} weights file")


def check_safetensors(path: str, what: str) -> None:
    """A safetensors file is whole (its header and the sizes it declares), or one `UserError` line
    naming it: a copy cut short fails here, not in a traceback deep in a load."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, "pt"):
            pass
    except (SafetensorError, OSError) as e:
        raise UserError(f"{what} {path} is unreadable ({e}); copy it again") from None


# `--compute-dtype auto` on a CPU with bf16 matmul units (AMX, AVX512-BF16): bf16 from this many
# parameters. Measured on 2 cores with AMX (bench/cpu_bf16.py), one update of 8 x 128 tokens in bf16
# against fp32: 0.76x fp32's speed at 0.2M parameters, 1.4x at 4M, 1.6x at 27M, 1.8x at 128M, 1.9x
# at 494M (a reference pass 1.0x to 3.4x); below this the exact fp32 path (the embedded models, the
# tests) costs next to nothing.
AUTO_BF16_PARAMS = 10_000_000


def cpu_has_bf16_units() -> bool:
    """The CPU has AMX or AVX512-BF16 (Linux's CPU flags): bf16 matmuls outrun fp32 there
    (measured); elsewhere (no such units, not Linux) bf16 is unmeasured and auto keeps fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return re.search(r"\b(amx_bf16|avx512_bf16)\b", flags) is not None


@functools.lru_cache(maxsize=8)
def parameter_count(name: str, trust_remote_code: bool = False) -> int:
    """A causal LM's parameters, from its config alone (the model built on the meta device: no
    weights read, no memory)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 -- a size `auto` cannot read (its own code): unknown, 0 (fp32)
        return 0
    return sum(p.numel() for p in model.parameters())


def compute_dtype(name: str, device: torch.device, model: str = "") -> torch.dtype:
    """The dtype the trainer computes in (`--compute-dtype`): "auto" is bf16 on a GPU (the paper's
    setting), and on the CPU bf16 for a `model` of AUTO_BF16_PARAMS parameters or more where the
    CPU has bf16 units (the fastest correct path: measured 1.8-2.5x), fp32 otherwise (the embedded
    models: exact logprob checks at no cost). bfloat16 on the CPU takes the GPU's numeric path in
    everything but the kernels."""
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16
    big = bool(model) and parameter_count(model) >= AUTO_BF16_PARAMS
    return torch.bfloat16 if big and cpu_has_bf16_units() else torch.float32


def engine_dtype(name: str, compute: torch.dtype) -> torch.dtype:
    """The generator's precision for `--generator-dtype`: "auto" follows the trainer's compute dtype
    (bfloat16 with an fp32 trainer reproduces the GPU's trainer-engine logprob mismatch)."""
    return compute if name == "auto" else getattr(torch, name)


# `--chat-template llama3-no-system`: the authors' prompt format (fairseq2's Llama-3 format, the
# paper's "Llama-3 chat template, with no system prompt"): one <|begin_of_text|>, then the turns.
# Llama-3.1-Instruct's own template inserts a dated system turn ("Cutting Knowledge Date: ...")
# into every prompt, even with no system message.
LLAMA3_NO_SYSTEM = (
    "<|begin_of_text|>{% for m in messages %}"
    "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


def load_tokenizer(
    name: str, trust_remote_code: bool = False, chat_template: str = "auto"
) -> PreTrainedTokenizerBase:
    """Tokenizer of a hub id or local folder, rendering prompts with `chat_template`: "auto" the
    tokenizer's own, "llama3-no-system" the authors' format (`LLAMA3_NO_SYSTEM`), else a Jinja
    file. Every prompt in this project is a chat turn, and guessing a template silently changes
    what the model sees: a tokenizer without one is refused."""
    check_model_path(name)
    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise UserError(
            f"cannot load tokenizer '{name}': not a local folder and not a reachable "
            f"hub id ({str(e).splitlines()[0]})"
        ) from None
    if chat_template == "llama3-no-system":
        missing = [t for t in LLAMA3_SPECIALS if t not in tok.get_vocab()]
        if missing:
            raise UserError(
                f"--chat-template llama3-no-system: the tokenizer of '{name}' lacks Llama-3's "
                f"special tokens ({', '.join(missing)}); it is the format of Llama-3 models only"
            )
        tok.chat_template = LLAMA3_NO_SYSTEM
    elif chat_template != "auto":
        tok.chat_template = Path(chat_template).expanduser().read_text()
    if not tok.chat_template:
        raise UserError(
            f"tokenizer of '{name}' has no chat template; use an instruct/chat model, "
            "pass --chat-template, or add `chat_template` to its tokenizer_config.json"
        )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # only used for padding; never masks EOS out of a loss
    # no "longer than the specified maximum ... indexing errors" line: the limit here is
    # --max-model-len, and `data.fit_prompts` drops (and counts) the prompts over it
    tok.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True
    return tok


def describe_template(tokenizer: PreTrainedTokenizerBase, chat_template: str) -> str:
    """One line for a run's start: which template renders the prompts, and the frame it puts
    around a user turn (a system turn the template adds shows here)."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "{prompt}"}], tokenize=False, add_generation_prompt=True
    )
    what = {
        "auto": "the tokenizer's own chat template",
        "llama3-no-system": "llama3-no-system (the authors' format)",
    }.get(chat_template, chat_template)
    return f"prompts: {what}: {text[:300]!r}"


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str | list[dict]]
) -> list[list[int]]:
    """Token ids of each prompt, chat template applied, ready for the assistant's reply. A prompt
    is a single user turn (str) or a list of messages. The template already holds any BOS token,
    so none is added again."""
    texts = render_prompts(tokenizer, prompts)
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def render_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str | list[dict]]
) -> list[str]:
    """Each prompt's text with the chat template applied (a generation prompt added). Speed: a
    single user turn is framed by concatenation when the template frames every user turn the same
    way (`_user_frame`), not by a Jinja render (~0.2 ms each: minutes for a 860k-row dataset)."""
    frame = _user_frame(tokenizer)
    texts = []
    for p in prompts:
        if frame is not None and isinstance(p, str):
            before, after, trim = frame
            texts.append(before + (p.strip() if trim else p) + after)
        else:
            texts.append(
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}] if isinstance(p, str) else p,
                    tokenize=False,
                    add_generation_prompt=True,
                )
            )
    return texts


_FRAMES: dict = {}


def _user_frame(tokenizer) -> tuple[str, str, bool] | None:
    """(before, after, trim): the template renders one user turn `c` as before + c + after
    (c.strip() with `trim`, as Jinja's `trim` filter strips), or None when it does anything else
    with a turn's text. Found by rendering sentinel turns (with whitespace, braces and non-ASCII
    text) and proven on each: a template that looks at the content, beyond trimming it, takes the
    Jinja path."""
    key = (
        tokenizer.chat_template,
        tokenizer.bos_token,
        tokenizer.eos_token,
    )  # what a template reads
    if key not in _FRAMES:

        def render(content):
            return tokenizer.apply_chat_template(
                [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
            )

        frame, probe = None, "\x01probe\x02"
        parts = render(probe).split(probe)
        if len(parts) == 2:
            before, after = parts
            sentinels = ["\x01B{{ x }}{% if %}\x02", " \n\x01é 漢 $\\boxed{1}$\x02\t ", "\x01\x02"]
            for trim in (False, True):
                if all(render(c) == before + (c.strip() if trim else c) + after for c in sentinels):
                    frame = (before, after, trim)
                    break
        _FRAMES[key] = frame
    return _FRAMES[key]


def prompt_token_bounds(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str | list[dict]]
) -> list[int]:
    """An upper bound on the number of tokens of each prompt with the chat template applied, without
    tokenizing it: the UTF-8 bytes of its text as the tokenizer normalises it, plus one (a prefix
    space or "▁" that a pre-tokenizer may add). Every token of a BPE, Unigram or WordPiece
    vocabulary spans at least one byte of that text (a byte-fallback token exactly one; a special
    token its whole text). `data.fit_prompts` checks the bound against real counts before relying
    on it. A framed prompt (`_user_frame`) is measured without being rendered."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    normalizer = backend.normalizer if backend is not None else None
    form = type(normalizer).__name__

    def size(text: str) -> int:
        if form in (
            "NFC",
            "NFD",
            "NFKC",
            "NFKD",
        ):  # Python's own; ASCII is left as it is: ~50x faster
            text = text if text.isascii() else unicodedata.normalize(form, text)
        elif normalizer is not None:
            text = normalizer.normalize_str(text)
        return len(text) if text.isascii() else len(text.encode("utf-8"))

    frame = _user_frame(tokenizer)
    framed = size(frame[0]) + size(frame[1]) + 1 if frame is not None else 0
    return [
        framed + size(p.strip() if frame[2] else p)
        if frame is not None and isinstance(p, str)
        else size(render_prompts(tokenizer, [p])[0]) + 1
        for p in prompts
    ]


class PromptIds:
    """Token ids of `prompts`, encoded when read (`ids[i]`: the same list `encode_prompts` gives):
    a step encodes its own prompts, and a 860k-row dataset holds no ids it never uses (a Python list
    of ids costs ~8 bytes a token, ~5 GB per rank for the paper's math set at a 128k vocabulary)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompts: list[str | list[dict]]):
        self.tokenizer, self.prompts = tokenizer, prompts

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> list[int]:
        return encode_prompts(self.tokenizer, [self.prompts[i]])[0]


AUTO_CHECKPOINTING_PARAMS = (
    100_000_000  # `--activation-checkpointing auto` on the CPU: this many parameters or more
)


def load_model(
    name: str,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    trainable: bool = True,
    activation_checkpointing: str = "off",
) -> torch.nn.Module:
    """A causal LM from a hub id or local folder, on `device`; `dtype` is the compute dtype.

    `trainable=True` (the policy) keeps fp32 master weights: at the paper's lr of 1e-6, Adam
    updates vanish in bf16 weights. It computes in `dtype` all the same (autocast, or FSDP2's
    mixed precision). `trainable=False` gives a frozen eval-mode copy (a reference model) held in
    `dtype`.

    CRUCIAL: only the parameters take `dtype`; buffers keep the precision transformers gives them
    (fp32 for the rotary `inv_freq`). A `model.to(bfloat16)` would round RoPE's frequencies, whose
    phase error grows with position (Llama-3.1's: ~0.9 rad at position 500): the reference would be
    another function than the policy it copies, and KL / log-ratios not 0 at the start.

    Memory: on a GPU the checkpoint's own (bf16) weights go straight to the device and the fp32
    master is made there (loading fp32 on the CPU first would take 32 GB of host memory per rank for
    an 8B model, ~256 GB on an 8-GPU node). `activation_checkpointing` ("on", "off", or "auto": on a
    GPU or for 100M+ parameters) recomputes each decoder layer's activations in the backward pass
    (non-reentrant, per layer, before FSDP2 shards the layers): the same arithmetic, a fraction of
    the memory (Llama-3.1-8B at 4 x 2,300 tokens: ~57 GiB of activations -> ~4 GiB per GPU)."""
    check_model_path(name)
    hold = torch.float32 if trainable else dtype
    try:  # from_pretrained makes the rotary buffers in fp32 whatever `dtype` it is given
        model = AutoModelForCausalLM.from_pretrained(
            name,
            dtype="auto" if device.type == "cuda" else hold,
            trust_remote_code=trust_remote_code,
            device_map={"": device} if device.type == "cuda" else None,
        )
    except OSError as e:
        raise UserError(
            f"cannot load model '{name}': not a local folder and not a reachable hub "
            f"id ({str(e).splitlines()[0]})"
        ) from None
    model.to(device)
    for p in model.parameters():  # parameters only: buffers stay exact (see CRUCIAL above)
        p.data = p.data.to(hold)
    # Speed (CPU, a model held in bf16): transformers feeds the LM head a strided slice (the last
    # `logits_to_keep` positions), and a bf16 linear on a strided 3-D input takes a batched-matmul
    # path that copies the head's weight once per row: 11 of a reference pass's 13 s at Qwen2-0.5B's
    # shape (an fp32 model under autocast gets a contiguous bf16 copy anyway). One small copy first.
    head = model.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(lambda module, args: (args[0].contiguous(), *args[1:]))
    if not trainable:
        model.config.use_cache = (
            False  # frozen, never decodes: a KV cache per forward would only cost memory
        )
        model.eval().requires_grad_(False)
    else:
        # Dropout off: the generator (vLLM) never uses it, so a trainer with dropout would compute
        # logprobs of a different policy than the one that sampled.
        model.train()
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        # auto: on a GPU (an 8B update needs it), and on the CPU for a real-size model (two ranks
        # of Qwen2-0.5B do not fit in 24 GB without it); the tiny embedded models keep their speed
        big = sum(p.numel() for p in model.parameters()) >= AUTO_CHECKPOINTING_PARAMS
        if activation_checkpointing == "on" or (
            activation_checkpointing == "auto" and (device.type == "cuda" or big)
        ):
            # the trainer never decodes; saying so keeps transformers' warning off the console
            model.config.use_cache = False
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
    return model


def autocast(device: torch.device, dtype: torch.dtype):
    """The trainer's forward passes in `dtype` over fp32 master weights (bf16: matmuls in bf16,
    reductions and norms in fp32, as on a GPU); nothing to do in fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def fsdp_wrap(
    model: torch.nn.Module, dtype: torch.dtype = torch.float32, min_ranks: int = 2
) -> torch.nn.Module:
    """FSDP2: shard every decoder layer, then the root (embeddings, final norm, lm_head).
    Parameters are all-gathered in the compute `dtype` and gradients reduced in fp32 (FSDP2's
    mixed precision; on the CPU too with --compute-dtype bfloat16). A no-op without a process group
    of `min_ranks` ranks (one rank computes under autocast instead; bench/gpu_trainer_check.py
    wraps one rank to check FSDP2's mixed precision on one GPU)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < min_ranks:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy()
    if dtype != torch.float32:
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    # the decoder layer classes the model declares unsplittable (`_no_split_modules`, what
    # transformers' own device_map and FSDP auto-wrap use), so any architecture shards per layer
    layer_classes = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
    if not layers:
        raise UserError(
            f"{type(model).__name__} declares no decoder layer class (_no_split_modules): "
            "FSDP cannot shard it layer by layer"
        )
    for layer in layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


@torch.no_grad()
def copy_weights(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    """dst <- src, parameter by parameter (same architecture; under FSDP2 the same sharding, so
    each rank copies its own shard; a bf16 reference takes the fp32 policy's values rounded).
    Buffers are never copied: they must already be equal (RoPE's fp32 frequencies, which
    `load_model` keeps exact in both), or dst would compute another function: checked here."""
    for m in (src, dst):
        if hasattr(m, "reshard"):  # CRUCIAL: FSDP2 leaves a root unsharded after a no-grad forward
            m.reshard()
    for p_dst, p_src in zip(dst.parameters(), src.parameters(), strict=True):
        p_dst.copy_(p_src)
    for (name, b_dst), b_src in zip(dst.named_buffers(), src.buffers(), strict=True):
        if not torch.equal(b_dst, b_src):
            raise RuntimeError(
                f"copy_weights: buffer {name} differs ({b_dst.dtype} vs {b_src.dtype}): "
                "a model cast with .to(dtype) rounds what load_model keeps exact"
            )


# Prefixes that wrappers add to parameter names; vLLM knows the bare Hugging Face names.
_WRAPPER_PREFIXES = (
    "_orig_mod.",
    "_checkpoint_wrapped_module.",
    "_fsdp_wrapped_module.",
    "module.",
)


def full_state_dict(
    model: torch.nn.Module, dtype: torch.dtype | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (hf_name, full tensor) one parameter at a time, in `dtype` if given.

    Under FSDP2 each parameter is a sharded DTensor; `full_tensor()` all-gathers just that one,
    so peak extra memory is one parameter, not the whole model (what matters at 8B). The cast to
    `dtype` comes before the gather: the bf16 engine and saved model take half the bytes of the
    fp32 masters. Every rank must consume the iterator completely and in the same order: each
    item is a collective.
    """
    for name, tensor in model.state_dict().items():
        for prefix in _WRAPPER_PREFIXES:
            name = name.replace(prefix, "")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        if hasattr(tensor, "full_tensor"):
            tensor = tensor.full_tensor()
        yield name, tensor.detach()


def completion_logprobs(
    model: torch.nn.Module,
    prompts: list[list[int]],
    completions: list[list[int]],
    temperature: float = 1.0,
    pad_id: int = 0,
    with_entropy: bool = False,
):
    """Per-token logprobs of each completion given its prompt, as the trainer sees them.

    Returns `(logps, mask, entropy)`, each (B, Tc) with Tc the longest completion; `mask` is 1
    on real completion tokens (EOS included: it is a token the policy chose) and 0 on padding;
    `entropy` is the per-token entropy of the sampling distribution (with its gradient when grad is
    enabled: the entropy bonus) or None.

    CRUCIAL: logits are divided by the sampling temperature, so these are the logprobs of the
    distribution vLLM sampled from; otherwise the vLLM/trainer comparison and any ratio is off.
    Sequences are right-padded so positions are 0..L-1 exactly as in generation, and only the
    positions that predict completion tokens go through the LM head (`logits_to_keep`), which
    is most of the memory at a 128k vocabulary.
    """
    device = next(model.parameters()).device
    lens_p = [len(p) for p in prompts]
    lens_c = [len(c) for c in completions]
    seqs = [p + c for p, c in zip(prompts, completions, strict=True)]
    L, Tc = max(map(len, seqs)), max(lens_c)
    input_ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, : len(s)] = torch.tensor(s)
    input_ids = input_ids.to(device)
    # Logits at position t predict token t+1; the earliest completion token of any row sits at
    # min(lens_p), so the last K = L - min(lens_p) + 1 positions cover every one of them.
    K = L - min(lens_p) + 1
    logits = model(
        input_ids=input_ids, logits_to_keep=K, use_cache=False
    ).logits  # (B, K, V), the model's dtype
    offset = L - K  # absolute position of logits[:, 0]
    # Next-token targets for every kept position (B, K); pad where a position predicts nothing.
    targets = torch.full((len(seqs), K), pad_id, dtype=torch.long, device=device)
    targets[:, :-1] = input_ids[:, offset + 1 :]
    # Memory: the fp32 log-softmax of a (B, K, V) block is the largest tensor of an update at a
    # 128k vocabulary; `_TokenLogps` never makes it, forward or backward (a few positions at a time)
    B, V = len(seqs), logits.shape[-1]
    out = _TokenLogps.apply(
        logits.reshape(B * K, V),
        targets.reshape(B * K),
        temperature,
        max(1, _LOGITS_CHUNK // V),
        with_entropy,
    )
    logps_k, entropy_k = out[0].view(B, K), out[1].view(B, K) if with_entropy else None  # (B, K)
    # Re-index to completion coordinates: column j of row i is completion token j.
    idx = torch.zeros(len(seqs), Tc, dtype=torch.long)
    mask = torch.zeros(len(seqs), Tc)
    for i, (p, c) in enumerate(zip(lens_p, lens_c, strict=True)):
        idx[i, :c] = torch.arange(p - 1, p - 1 + c) - offset
        mask[i, :c] = 1.0
    idx, mask = idx.to(device), mask.to(device)
    logps = logps_k.gather(1, idx) * mask  # (B, Tc)
    entropy = entropy_k.gather(1, idx) * mask if with_entropy else None  # (B, Tc)
    if not torch.is_grad_enabled() and hasattr(model, "reshard"):
        # FSDP2 keeps a root unsharded after a no-grad forward (embeddings + LM head)
        model.reshard()
    return logps, mask, entropy


# Elements of one fp32 block of logits in `_TokenLogps` (2^25: 128 MiB). Memory only: the results
# do not depend on it.
_LOGITS_CHUNK = 2**25


class _Buffers:
    """Two fp32 (block, V) buffers that every block of a pass reuses: each new tensor that size
    is fresh memory the kernel must map page by page, which on a CPU took longer than the
    arithmetic."""

    def __init__(self, logits: torch.Tensor, block: int):
        shape = (min(block, logits.shape[0]), logits.shape[1])
        self.a = logits.new_empty(shape, dtype=torch.float32)
        self.b = logits.new_empty(shape, dtype=torch.float32)

    def scaled(self, logits: torch.Tensor, temperature: float) -> torch.Tensor:
        """logits / T in fp32, in the first buffer."""
        s = self.a[: logits.shape[0]].copy_(logits)
        return s if temperature == 1.0 else s.div_(temperature)

    def exp(self, x: torch.Tensor) -> torch.Tensor:
        """exp(x) in the second buffer."""
        return torch.exp(x, out=self.b[: x.shape[0]])


class _TokenLogps(torch.autograd.Function):
    """(N,) log-probabilities of `targets` under softmax(logits / T), and (N,) entropies of that
    distribution (when asked), from (N, V) logits: a block of positions at a time, forward and
    backward. Memory: no fp32 copy of the whole (N, V) block is ever made (autograd's log-softmax
    keeps one, and a sliced pass makes a zero-filled (N, V) gradient per slice); the backward writes
    the gradient block by block into one buffer the size of the logits, so the pass adds about one
    logits-sized tensor (the gradient) to the logits themselves. The arithmetic is the same:
    d log p_y / d z = (onehot(y) - p) / T, d H / d z = -p (log p + H) / T."""

    @staticmethod
    def forward(ctx, logits, targets, temperature, block, with_entropy):
        ctx.set_materialize_grads(
            False
        )  # an unused entropy gets None in the backward: no work for it
        n = logits.shape[0]
        logps, lse = (
            logits.new_empty(n, dtype=torch.float32),
            logits.new_empty(n, dtype=torch.float32),
        )
        entropy = logits.new_empty(n if with_entropy else 0, dtype=torch.float32)
        bufs = _Buffers(logits, block)
        for i in range(0, n, block):
            b = slice(i, i + block)
            s = bufs.scaled(logits[b], temperature)  # (b, V) logits / T
            lse[b] = s.logsumexp(-1)
            logps[b] = s.gather(-1, targets[b, None]).squeeze(-1) - lse[b]
            if with_entropy:
                lp = s.sub_(lse[b, None])  # log p
                entropy[b] = -bufs.exp(lp).mul_(lp).sum(-1)
        ctx.save_for_backward(logits, targets, lse, entropy)
        ctx.temperature, ctx.block = temperature, block
        return logps, entropy

    @staticmethod
    def backward(ctx, g_logps, g_entropy):
        logits, targets, lse, entropy = ctx.saved_tensors
        grad = torch.empty_like(logits)
        bufs = _Buffers(logits, ctx.block)
        for i in range(0, logits.shape[0], ctx.block):
            b = slice(i, i + ctx.block)
            lp = bufs.scaled(logits[b], ctx.temperature).sub_(lse[b, None])  # (b, V) log p
            p = bufs.exp(lp)
            with_entropy = g_entropy is not None and entropy.numel()
            if with_entropy:  # lp becomes the entropy's term (before p turns into the gradient)
                lp.add_(entropy[b, None]).mul_(p).mul_(g_entropy[b, None])
            if g_logps is not None:
                g = p.mul_(-g_logps[b, None])
                g.scatter_add_(-1, targets[b, None], g_logps[b, None])
            else:
                g = p.zero_()
            if with_entropy:
                g.sub_(lp)
            grad[b] = g if ctx.temperature == 1.0 else g.div_(ctx.temperature)
        return grad, None, None, None, None
