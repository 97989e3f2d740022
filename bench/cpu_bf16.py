"""Where bf16 compute pays on this CPU: one update and one reference pass at five model sizes, fp32
against bf16, the way the training scripts run them. What `--compute-dtype auto` decides from
(`common.models.AUTO_BF16_PARAMS`, `cpu_has_bf16_units`).

    python bench/cpu_bf16.py              # ~4 min on 2 cores

- update: the policy held in fp32 (the master weights), `completion_logprobs` with its entropy
  under `common.autocast` (nothing in fp32, bf16 matmuls in bf16), the summed log-probs' backward
  and an AdamW step;
- reference: a frozen copy held in the compute dtype (`load_model(trainable=False)`), no-grad;
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


def measure(path: str, vocab: int, repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, vocab, (8, 64), generator=g).tolist()
    completions = torch.randint(0, vocab, (8, 64), generator=g).tolist()
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        policy = common.load_model(path, CPU, dtype)  # fp32 masters, whatever the compute dtype
        optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6)

        def update():
            with common.autocast(CPU, dtype):
                logps, mask, _ = common.completion_logprobs(policy, prompts, completions, with_entropy=True)
            (-(logps * mask).sum()).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        out[f"update_{str(dtype)[6:]}"] = best_of(update, repeats)
        del policy, optimizer
        reference = common.load_model(path, CPU, dtype, trainable=False)

        def reference_pass():
            with torch.no_grad(), common.autocast(CPU, dtype):
                common.completion_logprobs(reference, prompts, completions)

        out[f"reference_{str(dtype)[6:]}"] = best_of(reference_pass, repeats)
        del reference
    return out


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, shape in SHAPES.items():
            torch.manual_seed(0)
            model = Qwen2ForCausalLM(Qwen2Config(**shape, tie_word_embeddings=True))
            params = sum(p.numel() for p in model.parameters())
            path = os.path.join(tmp, name)
            model.save_pretrained(path)
            del model
            r = measure(path, shape["vocab_size"], repeats=2 if params > 2e8 else 3)
            rows.append((name, params, r))
            print(name, f"{params / 1e6:.1f}M", {k: round(v, 3) for k, v in r.items()}, flush=True)
    lines = [f"# bf16 against fp32 compute on this CPU ({date.today()}, {torch.get_num_threads()} threads, "
             f"bf16 units (AMX / AVX512-BF16): {'yes' if cpu_has_bf16_units() else 'no'})", "",
             "`python bench/cpu_bf16.py`: 8 rows x (64 + 64) tokens, best of the timed repeats, seconds.", "",
             "| model | parameters | update fp32 | update bf16 | speed-up | reference fp32 | reference bf16 | speed-up |",
             "|---|---|---|---|---|---|---|---|"]
    for name, params, r in rows:
        lines.append(f"| {name} | {params / 1e6:.1f}M | {r['update_float32']:.3f} | {r['update_bfloat16']:.3f} | "
                     f"{r['update_float32'] / r['update_bfloat16']:.2f}x | {r['reference_float32']:.3f} | "
                     f"{r['reference_bfloat16']:.3f} | {r['reference_float32'] / r['reference_bfloat16']:.2f}x |")
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "bench", "results", "cpu_bf16.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
