"""Where bf16 compute pays on this CPU: one update and one reference pass at five model sizes, fp32
against bf16, the way the training scripts run them. What `--compute-dtype auto` decides from
(`common.models.AUTO_BF16_PARAMS`, `cpu_has_bf16_units`), and the yardsticks of the update's speed.

    python bench/cpu_bf16.py              # ~6 min on 2 cores

- update: the policy held in fp32 (the master weights), `completion_logprobs` with its entropy
  under `common.autocast` (nothing in fp32, bf16 matmuls in bf16), the summed log-probs' backward
  and a fused AdamW step (the scripts' optimizer);
- reference: a frozen copy held in the compute dtype (`load_model(trainable=False)`), no-grad;
- the AdamW step alone, fused (one pass over each tensor) against the default (`foreach`);
- the update's achieved FLOP/s (`update_flops`: the model's matmul FLOPs, counted as MFU is)
  against this machine's GEMM peak in bf16 and fp32 (`gemm_peak`, the best square matmul);
- a profile of the bf16 update at Qwen2-0.5B's shape: which ops take its time;
on random Qwen2-family models from 0.2M to 494M parameters (Qwen2-0.5B's exact shape), 8 rows of
64 prompt + 64 completion tokens, the best of the timed repeats. Writes
`bench/results/cpu_bf16.md`. A benchmark, not a test: run on an otherwise idle machine.
"""

import os
import sys
import tempfile
import time
from datetime import date

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402

import common  # noqa: E402
from common.models import cpu_has_bf16_units  # noqa: E402

SHAPES = {
    "0.2M": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                 intermediate_size=256, vocab_size=1000),
    "4M": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=1024, vocab_size=1000),
    "27M": dict(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=2,
                intermediate_size=2048, vocab_size=8000),
    "128M": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                 intermediate_size=3072, vocab_size=32000),
    "494M": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=151936),  # Qwen2-0.5B
}
CPU = torch.device("cpu")


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up: allocator growth, the first optimizer state
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def gemm_peak(dtype: torch.dtype) -> float:
    """This machine's matmul rate in FLOP/s at `dtype`: the best square product of 1024-4096."""
    rates = []
    for n in (1024, 2048, 4096):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        rates.append(2 * n**3 / best_of(lambda: a @ b, 3))  # noqa: B023 (called before the next n)
    return max(rates)


def matmul_weights(config) -> tuple[int, int]:
    """(the decoder's matmul weights, the LM head's) of a model config, counted on the meta device.
    A token costs 2 FLOPs per weight forward and 4 more backward; embedding lookups and norms are
    no matmuls, and attention's own products (4 x layers x context x hidden per token, < 1% at
    these lengths) are left out."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    body = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head)
    return body, head.weight.numel()


def update_flops(weights: tuple[int, int], tokens: float, completion_tokens: float, reference: bool) -> float:
    """Model FLOPs of one update, as MFU counts them: the policy's forward and backward (6 per
    weight per token) and the reference's forward (2); the head runs on completion tokens alone;
    activation checkpointing's second forward is not counted (it is overhead, not work)."""
    body, head = weights
    return (6 + 2 * reference) * (body * tokens + head * completion_tokens)


def random_rows(vocab: int) -> tuple[list[list[int]], list[list[int]]]:
    """8 random prompts and completions of 64 tokens each (the same every call)."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (8, 64), generator=g).tolist(), torch.randint(0, vocab, (8, 64), generator=g).tolist()


def trainer(path: str, dtype: torch.dtype, prompts, completions):
    """(policy, optimizer, forward_backward, update): the policy (fp32 masters, whatever the
    compute dtype), its fused AdamW, and the update as the scripts run it."""
    policy = common.load_model(path, CPU, dtype)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6, fused=True)

    def forward_backward():
        with common.autocast(CPU, dtype):
            logps, mask, _ = common.completion_logprobs(policy, prompts, completions, with_entropy=True)
        (-(logps * mask).sum()).backward()

    def update():
        forward_backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return policy, optimizer, forward_backward, update


def measure(path: str, vocab: int, repeats: int) -> dict:
    prompts, completions = random_rows(vocab)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        out |= measure_update(path, dtype, prompts, completions, repeats)
        out |= measure_reference(path, dtype, prompts, completions, repeats)
    return out


def measure_update(path: str, dtype: torch.dtype, prompts, completions, repeats: int) -> dict:
    policy, optimizer, forward_backward, update = trainer(path, dtype, prompts, completions)
    out = {f"update_{str(dtype)[6:]}": best_of(update, repeats)}
    if dtype == torch.float32:  # the optimizer alone, on the gradients of one backward
        forward_backward()
        out["adamw_fused"] = best_of(optimizer.step, repeats)
        foreach = torch.optim.AdamW(policy.parameters(), lr=1e-6, foreach=True)
        out["adamw_foreach"] = best_of(foreach.step, repeats)
    return out


def measure_reference(path: str, dtype: torch.dtype, prompts, completions, repeats: int) -> dict:
    reference = common.load_model(path, CPU, dtype, trainable=False)

    def reference_pass():
        with torch.no_grad(), common.autocast(CPU, dtype):
            common.completion_logprobs(reference, prompts, completions)

    return {f"reference_{str(dtype)[6:]}": best_of(reference_pass, repeats)}


def profile_update(path: str, vocab: int) -> list[tuple[str, float]]:
    """(op, seconds) of one bf16 update after a warm-up, by the ops' own time, largest first."""
    from torch.profiler import ProfilerActivity, profile

    *_, update = trainer(path, torch.bfloat16, *random_rows(vocab))
    update()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        update()
    ops = [(e.key, e.self_cpu_time_total / 1e6) for e in prof.key_averages()]
    return sorted(ops, key=lambda x: -x[1])


def main() -> None:
    rows, peaks = [], {d: gemm_peak(d) for d in (torch.bfloat16, torch.float32)}
    print({str(d)[6:]: f"{p / 1e9:.0f} GFLOP/s" for d, p in peaks.items()}, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, shape in SHAPES.items():
            torch.manual_seed(0)
            config = Qwen2Config(**shape, tie_word_embeddings=True)
            model = Qwen2ForCausalLM(config)
            params = sum(p.numel() for p in model.parameters())
            path = os.path.join(tmp, name)
            model.save_pretrained(path)
            del model
            r = measure(path, shape["vocab_size"], repeats=2 if params > 2e8 else 3)
            r["flops"] = update_flops(matmul_weights(config), 8 * 128, 8 * 64, reference=False)
            rows.append((name, params, r))
            print(name, f"{params / 1e6:.1f}M", {k: round(v, 3) for k, v in r.items()}, flush=True)
        ops = profile_update(os.path.join(tmp, "494M"), SHAPES["494M"]["vocab_size"])
    total = sum(t for _, t in ops)
    lines = [f"# bf16 against fp32 compute on this CPU ({date.today()}, {torch.get_num_threads()} threads, "
             f"bf16 units (AMX / AVX512-BF16): {'yes' if cpu_has_bf16_units() else 'no'})", "",
             "`python bench/cpu_bf16.py`: 8 rows x (64 + 64) tokens, best of the timed repeats, seconds. "
             f"GEMM peak measured in the same run: bf16 {peaks[torch.bfloat16] / 1e9:.0f} GFLOP/s, "
             f"fp32 {peaks[torch.float32] / 1e9:.0f} GFLOP/s (the best square matmul of 1024-4096).", "",
             "| model | parameters | update fp32 | update bf16 | speed-up | bf16 update GFLOP/s (of bf16 peak) "
             "| AdamW foreach | AdamW fused | reference fp32 | reference bf16 | speed-up |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, params, r in rows:
        rate = r["flops"] / r["update_bfloat16"]
        lines.append(f"| {name} | {params / 1e6:.1f}M | {r['update_float32']:.3f} | {r['update_bfloat16']:.3f} | "
                     f"{r['update_float32'] / r['update_bfloat16']:.2f}x | {rate / 1e9:.0f} "
                     f"({rate / peaks[torch.bfloat16]:.0%}) | {r['adamw_foreach']:.3f} | {r['adamw_fused']:.3f} | "
                     f"{r['reference_float32']:.3f} | {r['reference_bfloat16']:.3f} | "
                     f"{r['reference_float32'] / r['reference_bfloat16']:.2f}x |")
    lines += ["", f"Where the bf16 update's time goes at 494M (one update, torch.profiler, {total:.2f} s of "
              "ops' own time; the ops over 1%):", "", "| op | seconds | share |", "|---|---|---|"]
    lines += [f"| `{op}` | {t:.3f} | {t / total:.1%} |" for op, t in ops if t / total >= 0.01]
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "bench", "results", "cpu_bf16.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
