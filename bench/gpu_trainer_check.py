"""The trainer's half of the GPU check: what a machine with a CUDA torch and transformers, and no
vLLM, can prove of the GPU path. One step at a time, each `ok`, `failed` or `skipped` with its
reason, the figures after it, all written to one summary (docs/gpu.md says what each step should
show and what a failure would mean).

    bash bench/gpu_check.sh --trainer-only        # on the GPU machine: installs the wheels, runs this
    python bench/gpu_trainer_check.py --smoke     # every step at toy sizes on this machine (the CPU: the logic)

Steps (the GPU-numerics invariants of the training scripts, on the GPU):
- device: the GPU, its memory, torch / transformers / CUDA versions;
- gemm-peak: the measured bf16 (and fp32) GEMM rate, the yardstick of the update's MFU below;
- references: a policy computing in bf16 over fp32 masters (autocast), its bf16 reference and a
  reference re-synced after an update compute one function, at long positions too: per 300-token
  segment within 2x of bf16's own rounding (fp32 vs autocast), no growth with position (a model
  with Llama-3.1's rope: θ 5e5, llama3 scaling, head_dim 128);
- fsdp2-mixed-precision: `common.fsdp_wrap` on a one-rank group: fp32 masters, the forward in bf16,
  fp32 gradients, the same log-probs as autocast within bf16 rounding, an AdamW step;
- logprob-head: `_TokenLogps` (the blockwise head) against plain autograd in bf16 (log-probs,
  entropies, gradients), and the memory it adds at T = 2,300, V = 128,256 against autograd's;
- bf16-checkpoint: `save_checkpoint` in bf16, the folder reloaded by transformers (bf16, equal
  weights), and `load_checkpoint` restoring fp32 masters and AdamW state exactly;
- update-mfu: the update (`completion_logprobs`, summed log-probs, AdamW) at Llama-3.1-8B's layer
  shape with as many layers as fit the GPU, activation checkpointing on, 4 rows of 256 + 2,048
  tokens (the paper's micro-batch): tokens/s, TFLOP/s and the share of the measured bf16 peak;
- engine: skipped here (vLLM is not installed): sampling, weight sync, sleep mode and the end-to-end
  runs need `bash bench/gpu_check.sh`.
"""

import json
import math
import os
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import tyro  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import common  # noqa: E402

BF16 = torch.bfloat16


@dataclass
class Args:
    smoke: bool = False
    """every step at toy sizes on whatever device is here (on a CPU: proves the logic, not the GPU)"""
    out: str = "bench/results/gpu_trainer_check.md"
    """the summary (and a .json beside it)"""
    steps: tuple[str, ...] = ()
    """run only these steps (default: all)"""


class Skip(Exception):
    """A step this machine cannot run; the message says why."""


def llama_rope_config(**shape) -> LlamaConfig:
    """Llama-3.1's rope (θ 5e5, llama3 scaling) on a shape of our choosing."""
    return LlamaConfig(max_position_embeddings=131072, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}, **shape)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_device(device, smoke):
    info = {"torch": torch.__version__, "transformers": __import__("transformers").__version__}
    if device.type != "cuda":
        return info | {"device": "CPU (smoke: the logic only)"}
    props = torch.cuda.get_device_properties(device)
    return info | {"device": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                   "cuda": torch.version.cuda, "gpus": torch.cuda.device_count()}


def step_gemm_peak(device, smoke):
    """TFLOP/s of an n x n x n matmul, best of the timed repeats (2 n^3 FLOPs each)."""
    n, repeats = (512, 3) if smoke else (8192, 20)
    out = {}
    for dtype in (BF16, torch.float32):
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        best = math.inf
        for _ in range(repeats + 2):
            sync(device)
            t0 = time.perf_counter()
            a @ b
            sync(device)
            best = min(best, time.perf_counter() - t0)
        out[f"{str(dtype)[6:]}_tflops"] = round(2 * n**3 / best / 1e12, 2)
    return out


def step_references(device, smoke):
    """The test of tests/test_numerics.py on this device, at the paper's completion length."""
    tokens, size = (600, 300) if smoke else (2400, 300)
    config = llama_rope_config(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
                               num_key_value_heads=2, vocab_size=300, initializer_range=0.2)
    with tempfile.TemporaryDirectory() as path:
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(path)
        policy = common.load_model(path, device)
        reference = common.load_model(path, device, BF16, trainable=False)
    exact = all(b.dtype == torch.float32 and torch.equal(b, dict(policy.named_buffers())[n])
                for n, b in reference.named_buffers())
    if not exact:
        raise AssertionError("the bf16 reference's buffers (RoPE frequencies) are not the policy's fp32 ones")
    g = torch.Generator().manual_seed(0)
    prompt, completion = [torch.randint(0, 300, (8,), generator=g).tolist()], [torch.randint(0, 300, (tokens,), generator=g).tolist()]

    def logps(model, dtype):
        with torch.no_grad(), common.autocast(device, dtype):
            return common.completion_logprobs(model, prompt, completion)[0][0].float()

    def segments(x):
        return torch.stack([x[i : i + size].abs().mean() for i in range(0, len(x), size)])

    out = {"tokens": tokens}
    for name in ("initial", "re-synced"):
        if name == "re-synced":  # an update moves the policy; the reference re-syncs, as online DPO's does
            with torch.no_grad():
                for p in policy.parameters():
                    p.add_(torch.randn(p.shape, generator=g).to(device) * 0.01)
            common.copy_weights(policy, reference)
        trainer = logps(policy, BF16)
        yardstick, error = segments(logps(policy, torch.float32) - trainer), segments(logps(reference, BF16) - trainer)
        ratio = (error / yardstick).tolist()
        out[f"{name}_ratio_per_segment"] = [round(r, 2) for r in ratio]
        if max(ratio) > 2 or error[-1] > 2 * error[0]:
            raise AssertionError(f"{name} reference: error / bf16 rounding per {size}-token segment {ratio} "
                                 "(want <= 2, not growing with position)")
    return out


def _one_rank_group(device) -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def step_fsdp2_mixed_precision(device, smoke):
    """FSDP2 as the scripts wrap on several ranks, on one rank (`min_ranks=1`)."""
    import copy

    _one_rank_group(device)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=512, initializer_range=0.05)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    plain = copy.deepcopy(model)
    model = common.fsdp_wrap(model, BF16, min_ranks=1)
    seen = []
    layer = model.model.layers[0].mlp.down_proj
    handle = layer.register_forward_pre_hook(lambda m, a: seen.append((m.weight.dtype, a[0].dtype)))
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, 512, (4, 16), generator=g).tolist()
    completions = torch.randint(0, 512, (4, 64), generator=g).tolist()
    logps, mask, _ = common.completion_logprobs(model, prompts, completions)
    (-(logps * mask).sum()).backward()
    handle.remove()
    with torch.no_grad(), common.autocast(device, BF16):
        want = common.completion_logprobs(plain, prompts, completions)[0]
    masters = {p.dtype for p in model.parameters()}
    grads = {p.grad.dtype for p in model.parameters() if p.grad is not None}
    if masters != {torch.float32} or grads != {torch.float32} or seen[0] != (BF16, BF16):
        raise AssertionError(f"masters {masters}, gradients {grads}, a layer's forward (weight, input) {seen[0]}: "
                             "want fp32 masters and gradients, bf16 compute")
    diff = ((logps - want).abs() * mask).sum().item() / mask.sum().item()
    if diff > 0.05:
        raise AssertionError(f"FSDP2 bf16 log-probs differ from autocast's by {diff:.3f} nats per token")
    before = next(model.parameters()).detach().full_tensor().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)  # the scripts' optimizer, on DTensors
    optimizer.step()
    if torch.equal(before, next(model.parameters()).detach().full_tensor()):
        raise AssertionError("an AdamW step left the fp32 master unchanged")
    return {"masters": "float32", "compute": "bfloat16", "gradients": "float32",
            "logp_vs_autocast_per_token": round(diff, 5)}


def step_logprob_head(device, smoke):
    import torch.nn.functional as F

    from common.models import _LOGITS_CHUNK, _TokenLogps

    torch.manual_seed(0)
    n, v = (64, 1024) if smoke else (512, 128256)
    base = (torch.randn(n, v, device=device) * 3).to(BF16)
    targets = torch.randint(0, v, (n,), device=device)
    ref = base.clone().requires_grad_()
    lp = F.log_softmax(ref.float(), dim=-1)
    ref_logps, ref_entropy = lp.gather(-1, targets[:, None]).squeeze(-1), -(lp.exp() * lp).sum(-1)
    (ref_logps.sum() + ref_entropy.sum()).backward()
    logits = base.clone().requires_grad_()
    logps, entropy = _TokenLogps.apply(logits, targets, 1.0, max(_LOGITS_CHUNK // v, 1), True)
    (logps.sum() + entropy.sum()).backward()
    errors = {"logps": (logps - ref_logps).abs().max().item(), "entropy": (entropy - ref_entropy).abs().max().item(),
              "grad": (logits.grad.float() - ref.grad.float()).abs().max().item()}
    if errors["logps"] > 1e-3 or errors["entropy"] > 1e-3 or errors["grad"] > 2e-2:
        raise AssertionError(f"blockwise head vs autograd in bf16: max errors {errors}")
    out = {f"max_error_{k}": float(f"{e:.2e}") for k, e in errors.items()}
    if device.type != "cuda":
        return out | {"memory": "not measured (the CPU's allocator keeps no peak)"}
    t, v = (2300, 128256)
    for variant in ("autograd", "blockwise"):
        logits = torch.randn(t, v, device=device, dtype=BF16).requires_grad_()
        targets = torch.randint(0, v, (t,), device=device)
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base_mem = torch.cuda.memory_allocated(device)
        if variant == "autograd":
            lp = F.log_softmax(logits.float(), dim=-1)
            logps, entropy = lp.gather(-1, targets[:, None]).squeeze(-1), -(lp.exp() * lp).sum(-1)
        else:
            logps, entropy = _TokenLogps.apply(logits, targets, 1.0, _LOGITS_CHUNK // v, True)
        (logps.sum() + entropy.sum()).backward()
        sync(device)
        added = (torch.cuda.max_memory_allocated(device) - base_mem) / 2**30
        out[f"{variant}_added_gib"] = round(added, 2)
        out[f"{variant}_added_x_bf16_logits"] = round(added / (t * v * 2 / 2**30), 2)
        del logits, targets, logps, entropy
    return out


def step_bf16_checkpoint(device, smoke):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(os.path.join(ROOT, "embedded", "policy"))
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=len(tokenizer))

    def trainer():
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM(config)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)  # the scripts' optimizer

    policy, optimizer = trainer()
    (-common.completion_logprobs(policy, [[1, 2, 3]], [[4, 5, 6, 7]])[0].sum()).backward()
    optimizer.step()
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "checkpoint")
        common.save_checkpoint(folder, 1, policy, optimizer, tokenizer, BF16)
        saved = json.load(open(os.path.join(folder, "config.json")))["dtype"]
        tensors = load_file(os.path.join(folder, "model.safetensors"))
        reloaded = AutoModelForCausalLM.from_pretrained(folder)
        fresh, fresh_optimizer = trainer()
        step = common.load_checkpoint(folder, fresh, fresh_optimizer)
    bf16_equal = all(t.dtype == BF16 and torch.equal(t.to(device), p.detach().to(BF16))
                     for (name, p) in policy.named_parameters() for t in [tensors.get(name)] if t is not None)
    masters_equal = all(torch.equal(a, b) for a, b in zip(policy.parameters(), fresh.parameters(), strict=True))
    adam_equal = all(torch.equal(optimizer.state[a]["exp_avg_sq"], fresh_optimizer.state[b]["exp_avg_sq"].to(device))
                     for a, b in zip(policy.parameters(), fresh.parameters(), strict=True))
    (-common.completion_logprobs(fresh, [[1, 2, 3]], [[4, 5, 6, 7]])[0].sum()).backward()
    fresh_optimizer.step()  # fused AdamW takes the restored state (its `step` on the device)
    result = {"config_dtype": saved, "reloaded_dtype": str(reloaded.dtype)[6:], "weights_bf16_equal": bf16_equal,
              "masters_restored": masters_equal, "adam_restored": adam_equal, "step": step}
    if saved != "bfloat16" or not (bf16_equal and masters_equal and adam_equal and step == 1):
        raise AssertionError(f"bf16 checkpoint: {result}")
    return result


def step_update_mfu(device, smoke, peak_tflops=None):
    """Llama-3.1-8B's layer shape, as many layers as fit; FLOPs counted as bench/fsdp_mfu.py counts
    them (6 x matmul parameters x tokens, 6 x LM head x completion positions, 12 x layers x hidden x
    sequence x tokens for attention; activation checkpointing's recompute not counted: model FLOPs)."""
    rows, prompt_len, completion_len = (2, 16, 32) if smoke else (4, 256, 2048)
    if smoke:
        shape = dict(hidden_size=128, intermediate_size=448, num_attention_heads=4, num_key_value_heads=2,
                     vocab_size=2048, num_hidden_layers=2)
    else:
        shape = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                     vocab_size=128256)
        layer = 4096 * (4096 + 2 * 1024 + 4096) + 3 * 4096 * 14336  # attention + MLP parameters
        root = 2 * 128256 * 4096  # embeddings and LM head (untied)
        free = torch.cuda.get_device_properties(device).total_memory * 0.85 - 16 * root - 14 * 2**30  # activations, logits
        shape["num_hidden_layers"] = max(1, min(32, int(free // (16 * layer))))  # fp32 master + grad + 2 Adam states
    config = llama_rope_config(**shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)  # fp32 masters, as common.load_model keeps a policy
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # load_model's
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, betas=(0.9, 0.95), eps=1e-8, fused=True)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, config.vocab_size, (rows, prompt_len), generator=g).tolist()
    completions = torch.randint(0, config.vocab_size, (rows, completion_len), generator=g).tolist()

    def update():
        with common.autocast(device, BF16):
            logps, mask, _ = common.completion_logprobs(model, prompts, completions)
        (-(logps * mask).sum() / rows).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    warmup, timed = (1, 1) if smoke else (2, 5)
    for _ in range(warmup):
        update()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(timed):
        update()
    sync(device)
    seconds = (time.perf_counter() - t0) / timed
    params = sum(p.numel() for p in model.parameters())
    head = embed = config.vocab_size * config.hidden_size
    seq, tokens = prompt_len + completion_len, rows * (prompt_len + completion_len)
    flops = (6 * (params - head - embed) * tokens + 6 * head * rows * (completion_len + 1)
             + 12 * config.num_hidden_layers * config.hidden_size * seq * tokens)
    out = {"layers": config.num_hidden_layers, "params_b": round(params / 1e9, 2), "tokens_per_step": tokens,
           "s_per_step": round(seconds, 3), "tokens_per_s": round(tokens / seconds), "tflops": round(flops / seconds / 1e12, 1)}
    if peak_tflops:
        out["share_of_measured_bf16_peak"] = round(flops / seconds / 1e12 / peak_tflops, 3)
    if device.type == "cuda":
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 1)
    return out


def step_engine(device, smoke):
    import importlib.util

    why = "vLLM is not installed here" if importlib.util.find_spec("vllm") is None else "not part of this check"
    raise Skip(f"{why}: sampling, weight sync, sleep mode and the end-to-end runs are the full check's "
               "(bash bench/gpu_check.sh)")


STEPS = {"device": step_device, "gemm-peak": step_gemm_peak, "references": step_references,
         "fsdp2-mixed-precision": step_fsdp2_mixed_precision, "logprob-head": step_logprob_head,
         "bf16-checkpoint": step_bf16_checkpoint, "update-mfu": step_update_mfu, "engine": step_engine}


def main(args: Args) -> None:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    results = []
    for name, fn in STEPS.items():
        if args.steps and name not in args.steps:
            continue
        print(f"== gpu_trainer_check: {name}", flush=True)
        t0 = time.time()
        try:
            if name == "engine":
                fn(device, args.smoke)
            if not (cuda or args.smoke):
                raise Skip("no CUDA GPU on this machine (--smoke runs every step's logic at toy sizes)")
            peak = next((r["figures"].get("bfloat16_tflops") for r in results if r["step"] == "gemm-peak"), None)
            figures = fn(device, args.smoke, peak) if name == "update-mfu" else fn(device, args.smoke)
            status, why = "ok", ""
        except Skip as e:
            status, why, figures = "skipped", str(e), {}
        except Exception as e:  # noqa: BLE001 -- a failed step is reported, and the next one runs
            traceback.print_exc()
            status, why, figures = "failed", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", {}
        if cuda:
            torch.cuda.empty_cache()
        results.append({"step": name, "status": status, "why": why, "figures": figures,
                        "seconds": round(time.time() - t0, 1)})
        print(f"{status:8} {name}" + (f" ({why})" if why else "") + (f" {json.dumps(figures)}" if figures else ""),
              flush=True)
    device_name = next((r["figures"].get("device") for r in results if r["step"] == "device"), "?")
    lines = [f"# GPU trainer check: {device_name}", "",
             f"`python bench/gpu_trainer_check.py{' --smoke' if args.smoke else ''}` on "
             f"{time.strftime('%Y-%m-%d')}; docs/gpu.md says what each step should show.", "",
             "| step | status | figures or reason | s |", "|---|---|---|---|"]
    lines += [f"| {r['step']} | {r['status']} | {r['why'] or json.dumps(r['figures'])} | {r['seconds']} |" for r in results]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump({"device": device_name, "smoke": args.smoke, "steps": results}, f, indent=1)
    print("\n== gpu_trainer_check summary (" + args.out + ")")
    for r in results:
        print(f"{r['status']:8} {r['step']}" + (f" ({r['why']})" if r["why"] else ""))
    sys.exit(1 if any(r["status"] == "failed" for r in results) else 0)


if __name__ == "__main__":
    main(tyro.cli(Args))
