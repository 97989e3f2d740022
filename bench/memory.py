"""Memory of one update and of one logprob pass on a real model's shape, on the CPU: what
activation checkpointing and the chunked logprob pass save, and proof that they change no number.

    python bench/memory.py                      # Qwen2-0.5B shape and a 128k-vocabulary variant, ~5 min

Each measurement runs in its own process (peak resident memory, `ru_maxrss`, is per process) on
a random model of the shape (no download; the embedded tokenizer, ids past it are harmless):
- `update`: the policy in fp32, `completion_logprobs` with gradients on a micro-batch and the
  backward pass, the way the training scripts run it; with and without activation checkpointing;
- `logprobs`: the no-grad pass the reference and the entropy take;
each with this project's `completion_logprobs` ("chunked") and with the implementation it replaced
("full": the whole (B, K, V) fp32 log-softmax and three fp32 entropy tensors), kept below only to
measure against. The figure is the peak resident memory during the pass (sampled every 5 ms)
minus the memory live before it: what the pass adds to the loaded model. The loss, its gradient norm and the entropy are printed to show the
variants compute the same numbers. Writes `bench/results/memory.md`.
- `head`: the logprob head alone on one long row (B = 1, T = 2,300 completion tokens, V = 128,256:
  the paper's 8B math update), logits given, forward with the entropy and backward through both,
  with plain autograd ("full"), the sliced pass this project used before ("sliced": a checkpointed
  slice of rows per chunk, one row = the whole (T, V) here) and `_TokenLogps` ("blockwise"); in
  units of one fp32 (B, T, V) tensor.
Benchmarks, not tests: nothing here asserts. Run on an otherwise idle machine.
"""

import ctypes
import gc
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import date

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import tyro  # noqa: E402

SHAPES = {  # Qwen2-0.5B's exact shape, and the same with Llama-3's 128k vocabulary
    "qwen2-0.5b": {"vocab_size": 151936},
    "qwen2-0.5b-v128k": {"vocab_size": 128256},
}


@dataclass
class Args:
    shapes: tuple[str, ...] = ("qwen2-0.5b", "qwen2-0.5b-v128k")
    head_tokens: int = 2300
    """the `head` case: completion tokens of its one row (0 skips it)"""
    head_vocab: int = 128256
    sequences: int = 4
    """sequences in the micro-batch (4, as the paper's 8B command's --micro-batch-size)"""
    prompt_tokens: int = 64
    completion_tokens: int = 448
    models_dir: str = "runs/bench/models"
    out_dir: str = "bench/results"
    # one measurement, in a child process (set by the parent)
    shape: str = ""
    what: str = ""
    variant: str = ""


def make_model(path: str, vocab_size: int) -> None:
    """A random model of Qwen2-0.5B's shape (494M parameters at the 152k vocabulary)."""
    if os.path.exists(os.path.join(path, "config.json")):
        return
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from embedded.tiny import build_tokenizer

    tok = build_tokenizer()
    config = Qwen2Config(vocab_size=vocab_size, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=True, rope_theta=1e6, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, bos_token_id=None)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)


def full_completion_logprobs(model, prompts, completions, temperature=1.0, pad_id=0, with_entropy=False):
    """The implementation `common.completion_logprobs` replaced (to measure against only)."""
    import torch
    import torch.nn.functional as F

    lens_p, lens_c = [len(p) for p in prompts], [len(c) for c in completions]
    seqs = [p + c for p, c in zip(prompts, completions, strict=True)]
    L, Tc = max(map(len, seqs)), max(lens_c)
    input_ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, : len(s)] = torch.tensor(s)
    K = L - min(lens_p) + 1
    logits = model(input_ids=input_ids, logits_to_keep=K).logits
    offset = L - K
    targets = torch.full((len(seqs), K), pad_id, dtype=torch.long)
    targets[:, :-1] = input_ids[:, offset + 1 :]
    scaled = logits.float() / temperature
    logps_k = scaled.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - scaled.logsumexp(-1)
    idx, mask = torch.zeros(len(seqs), Tc, dtype=torch.long), torch.zeros(len(seqs), Tc)
    for i, (p, c) in enumerate(zip(lens_p, lens_c, strict=True)):
        idx[i, :c] = torch.arange(p - 1, p - 1 + c) - offset
        mask[i, :c] = 1.0
    logps = logps_k.gather(1, idx) * mask
    entropy = None
    if with_entropy:
        with torch.no_grad():
            lp = F.log_softmax(scaled, dim=-1)
            entropy = (-(lp.exp() * lp).sum(-1)).gather(1, idx) * mask
    return logps, mask, entropy


def sliced_token_logps(logits, targets, temperature):
    """The pass `_TokenLogps` replaced (to measure against only): checkpointed slices of rows."""
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    def logps(lg, tg):
        scaled = lg.float() / temperature
        return scaled.gather(-1, tg.unsqueeze(-1)).squeeze(-1) - scaled.logsumexp(-1)

    rows = max(1, 2**25 // (logits.shape[1] * logits.shape[2]))
    chunks = [(logits[i : i + rows], targets[i : i + rows]) for i in range(0, logits.shape[0], rows)]
    out = torch.cat([checkpoint(logps, lg, tg, use_reentrant=False) for lg, tg in chunks])
    with torch.no_grad():  # as it was: no gradient through the entropy
        entropy = torch.cat([-(F.log_softmax(lg.float() / temperature, -1).exp()
                               * F.log_softmax(lg.float() / temperature, -1)).sum(-1) for lg, _ in chunks])
    return out, entropy


def measure_head(args: Args) -> dict:
    """The logprob head alone on (1, head_tokens, head_vocab) fp32 logits: peak memory the pass adds."""
    import psutil
    import torch
    import torch.nn.functional as F

    from common.models import _LOGITS_CHUNK, _TokenLogps

    T, V = args.head_tokens, args.head_vocab
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, T, V, generator=gen).requires_grad_()
    targets = torch.randint(0, V, (1, T), generator=gen)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    proc, peak, done = psutil.Process(), [0], threading.Event()
    base = proc.memory_info().rss

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.time()
    if args.variant == "full":
        lp = F.log_softmax(logits.float(), -1)
        logps, entropy = lp.gather(-1, targets[..., None]).squeeze(-1), -(lp.exp() * lp).sum(-1)
    elif args.variant == "sliced":
        logps, entropy = sliced_token_logps(logits, targets, 1.0)
    else:
        logps, entropy = _TokenLogps.apply(logits.view(T, V), targets.view(T), 1.0, _LOGITS_CHUNK // V, True)
    loss = logps.sum() + (entropy.sum() if entropy.requires_grad else 0.0)
    loss.backward()
    seconds = time.time() - t0
    done.set()
    sampler.join()
    one = logits.numel() * 4 / 2**30
    added = (max(peak[0], proc.memory_info().rss) - base) / 2**30
    return {"added_gib": added, "one_tensor_gib": one, "added_x": added / one, "seconds": seconds,
            "loss": loss.item(), "grad_norm": logits.grad.norm().item(), "entropy": entropy.sum().item()}


def measure(args: Args) -> dict:
    """One measurement in this process: peak resident memory added by the pass, and its numbers."""
    import psutil
    import torch

    import common

    torch.manual_seed(0)
    checkpointing = "on" if args.variant.endswith("+ac") else "off"
    model = common.load_model(os.path.join(ROOT, args.models_dir, args.shape), torch.device("cpu"),
                              trainable=args.what == "update", activation_checkpointing=checkpointing)
    vocab = 250  # ids the tokenizer knows: the same batch for every variant
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, vocab, (args.prompt_tokens,), generator=gen).tolist() for _ in range(args.sequences)]
    completions = [torch.randint(1, vocab, (args.completion_tokens - 7 * i,), generator=gen).tolist()
                   for i in range(args.sequences)]
    fn = full_completion_logprobs if args.variant.startswith("full") else common.completion_logprobs
    with torch.no_grad():  # page the weights in (safetensors are memory-mapped): the baseline holds them
        sum(p.sum() for p in model.parameters())
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed load buffers back to the OS: the baseline is what is live
    proc, peak, done = psutil.Process(), [0], threading.Event()
    base = proc.memory_info().rss

    def sample():  # the pass's peak resident memory (ru_maxrss would include the load's own peak)
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out = {}
    if args.what == "update":
        logps, mask, entropy = fn(model, prompts, completions, 1.0, 0, with_entropy=True)
        loss = -(logps * mask).sum() / mask.sum()
        loss.backward()
        grad_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None))
        out |= {"loss": loss.item(), "grad_norm": grad_norm.item(), "entropy": entropy.sum().item()}
    else:
        with torch.no_grad():
            logps, mask, entropy = fn(model, prompts, completions, 1.0, 0, with_entropy=True)
        out |= {"logps_sum": (logps * mask).sum().item(), "entropy": entropy.sum().item()}
    done.set()
    sampler.join()
    out["added_gib"] = (max(peak[0], proc.memory_info().rss) - base) / 2**30
    out["base_gib"] = base / 2**30
    return out


def main(args: Args) -> None:
    if args.shape:  # a child: one measurement, printed as JSON
        print("RESULT " + json.dumps(measure_head(args) if args.what == "head" else measure(args)), flush=True)
        return
    head = []
    for variant in ("full", "sliced", "blockwise") if args.head_tokens else ():
        cmd = [sys.executable, __file__, "--shape", "head", "--what", "head", "--variant", variant,
               "--head-tokens", str(args.head_tokens), "--head-vocab", str(args.head_vocab)]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
        if r.returncode or not line:
            raise SystemExit(f"memory bench failed: {' '.join(cmd)}\n{r.stderr[-3000:]}")
        head.append({"variant": variant, **json.loads(line[0][len("RESULT "):])})
        print("head", head[-1], flush=True)
    rows = []
    for shape in args.shapes:
        make_model(os.path.join(ROOT, args.models_dir, shape), SHAPES[shape]["vocab_size"])
        for what, variants in (("update", ("full", "chunked", "chunked+ac")), ("logprobs", ("full", "chunked"))):
            for variant in variants:
                cmd = [sys.executable, __file__, "--shape", shape, "--what", what, "--variant", variant,
                       "--sequences", str(args.sequences), "--prompt-tokens", str(args.prompt_tokens),
                       "--completion-tokens", str(args.completion_tokens), "--models-dir", args.models_dir]
                r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
                line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
                if r.returncode or not line:
                    raise SystemExit(f"memory bench failed: {' '.join(cmd)}\n{r.stderr[-3000:]}")
                res = json.loads(line[0][len("RESULT "):])
                rows.append({"shape": shape, "what": what, "variant": variant, **res})
                print(shape, what, variant, res, flush=True)
    from bench.run_bench import machine

    md = [f"Measured {date.today().isoformat()} by `python bench/memory.py` on {machine()}: a micro-batch of {args.sequences} sequences of "
          f"{args.prompt_tokens} prompt + ~{args.completion_tokens} completion tokens; peak resident memory the pass "
          "adds to the loaded model (GiB), and the numbers it computes (identical across variants = no arithmetic "
          "changed).", "", "| shape | pass | variant | added GiB | loss / logp sum | grad norm | entropy sum |",
          "|---|---|---|---|---|---|---|"]
    for r in rows:
        value = r.get("loss", r.get("logps_sum"))
        md.append(f"| {r['shape']} | {r['what']} | {r['variant']} | {r['added_gib']:.2f} | {value:.6f} | "
                  f"{r.get('grad_norm', float('nan')):.6f} | {r['entropy']:.3f} |")
    if head:
        md += ["", f"The logprob head alone: one row of {args.head_tokens} completion tokens at a {args.head_vocab:,} "
               f"vocabulary, fp32 logits given (one such tensor: {head[0]['one_tensor_gib']:.2f} GiB), forward with "
               "the entropy and backward; the peak it adds, in GiB and in units of that tensor (the gradient of the "
               "logits is one of them). \"sliced\" computes the entropy without gradient, as it did.", "",
               "| variant | added GiB | x one (B, T, V) fp32 tensor | seconds | logp sum + entropy sum | grad norm |",
               "|---|---|---|---|---|---|"]
        md += [f"| {h['variant']} | {h['added_gib']:.2f} | {h['added_x']:.2f} | {h['seconds']:.1f} | {h['loss']:.2f} | "
               f"{h['grad_norm']:.4f} |" for h in head]
    os.makedirs(os.path.join(ROOT, args.out_dir), exist_ok=True)
    with open(os.path.join(ROOT, args.out_dir, "memory.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main(tyro.cli(Args))
