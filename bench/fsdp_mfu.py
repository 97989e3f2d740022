"""Training-step throughput and model-FLOPs utilisation (MFU) of the trainer alone, on GPUs.

The training scripts' update is `common.fsdp_wrap` (FSDP2: bf16 parameters and fp32 gradient
reduction on GPUs; one GPU: bf16 autocast) plus `common.completion_logprobs` over prompt +
completion rows, a loss on the summed completion logprobs and an AdamW step. This runs exactly
those pieces on a randomly initialised model of Qwen2-0.5B's shape (hidden 896, 24 layers,
14 heads / 2 KV heads, MLP 4864, vocab 151936, tied embeddings: 494M parameters), with no vLLM
and no data: it needs only torch and transformers.

    python bench/fsdp_mfu.py                                              # one H100 / H200 (bf16 autocast)
    torchrun --standalone --nproc_per_node 8 bench/fsdp_mfu.py            # FSDP2 over 8 GPUs
    python bench/fsdp_mfu.py --tiny --steps 3                             # CPU smoke run

MFU = achieved model FLOPs / peak: 6 x (parameters - LM head) x tokens (forward + backward of
every matmul; the tied embedding's lookup is free) + 6 x LM head x the positions that reach it
(only completion positions: `logits_to_keep`) + 12 x layers x hidden x sequence x tokens
(attention scores and values, forward + backward), over `--peak-tflops` per GPU (dense bf16:
989 for the H100 SXM and the H200).
"""

import os
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.distributed as dist
import tyro
from transformers import Qwen2Config, Qwen2ForCausalLM

import common


@dataclass
class Args:
    batch_size: int = 16
    """sequences per rank per step (one micro-batch)"""
    prompt_len: int = 256
    """prompt tokens per sequence"""
    completion_len: int = 768
    """completion tokens per sequence (prompt + completion: 1024)"""
    steps: int = 12
    """optimizer steps; the first `warmup` are not timed"""
    warmup: int = 3
    """untimed first steps (allocator growth, kernel selection)"""
    peak_tflops: float = 989.0
    """dense bf16 peak per GPU, TFLOP/s (H100 SXM / H200: 989)"""
    tiny: bool = False
    """a 2-layer toy of the same family, for a CPU smoke run"""


def main(args: Args) -> None:
    rank, world, device = common.setup_distributed()
    shape = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=151936)
    if args.tiny:
        shape = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                     intermediate_size=512, vocab_size=1024)
    seq_len = args.prompt_len + args.completion_len
    config = Qwen2Config(**shape, tie_word_embeddings=True, max_position_embeddings=max(seq_len, 4096))
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config)  # fp32 master weights, as common.load_model keeps them
    n_params = sum(p.numel() for p in model.parameters())
    dtype = common.compute_dtype("auto", device)  # bf16 on a GPU, as the scripts
    model = common.fsdp_wrap(model, dtype)
    autocast = common.autocast(device, dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, fused=True)
    g = torch.Generator().manual_seed(rank)
    prompts = torch.randint(0, config.vocab_size, (args.batch_size, args.prompt_len), generator=g).tolist()
    completions = torch.randint(0, config.vocab_size, (args.batch_size, args.completion_len), generator=g).tolist()

    def step() -> None:
        with autocast:
            logps, mask, _ = common.completion_logprobs(model, prompts, completions)
        (-(logps * mask).sum() / args.batch_size).backward()  # the scripts' shape: summed logprobs per sequence
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        step()
    sync()
    t0 = time.time()
    for _ in range(args.steps - args.warmup):
        step()
    sync()
    dt = (time.time() - t0) / (args.steps - args.warmup)
    tokens = args.batch_size * seq_len  # per rank
    head = config.vocab_size * config.hidden_size
    flops = (6 * (n_params - head) * tokens + 6 * head * args.batch_size * (args.completion_len + 1)
             + 12 * config.num_hidden_layers * config.hidden_size * seq_len * tokens)
    if rank == 0:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        print(f"{name} x {world}: {n_params / 1e6:.0f}M params, {args.batch_size} x {seq_len} tokens per rank | "
              f"{dt:.3f} s/step | {tokens * world / dt:,.0f} tokens/s | {flops / dt / 1e12:.1f} TFLOP/s per GPU | "
              f"MFU {flops / dt / 1e12 / args.peak_tflops:.1%} | peak memory {mem:.1f} GiB")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(tyro.cli(Args))
