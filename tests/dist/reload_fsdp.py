"""Run under `torchrun --nproc_per_node 2`: FSDP2 policy + one vLLM engine per rank, optimizer
step, streamed full-state-dict sync, and vLLM's logprobs == the sharded trainer's on every rank.
Writes `<out>/rank<r>.json` with the measured gaps for the test to assert on."""

import json
import sys

import torch
import torch.distributed as dist

import common
from common.generation import Generator

model_dir, out = sys.argv[1], sys.argv[2]
rank, world, device = common.setup_distributed()
common.seed_everything(0)
tok = common.load_tokenizer(model_dir)
model = common.fsdp_wrap(common.load_model(model_dir, device))
gen = Generator(model_dir, max_model_len=256, gpu_memory_utilization=0.15, dtype=torch.float32, seed=0)

# Each rank its own prompts and sampling seed, as in training.
text = ["What is 3+4?", "Repeat this word: abc"][rank]
prompt = tok(tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                     add_generation_prompt=True), add_special_tokens=False)["input_ids"]


def gap():
    outs = gen.generate([prompt], n=4, temperature=1.0, top_p=1.0, max_tokens=16, seed=100 * rank + 7)[0]
    with torch.no_grad():
        logps, mask, _ = common.completion_logprobs(model, [prompt] * 4, [c.token_ids for c in outs],
                                                    1.0, tok.pad_token_id)
    v = torch.zeros_like(logps)
    for i, c in enumerate(outs):
        v[i, : len(c.logprobs)] = torch.tensor(c.logprobs)
    return ((logps - v).abs() * mask).max().item(), outs


before, outs = gap()
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
logps, mask, _ = common.completion_logprobs(model, [prompt] * 4, [c.token_ids for c in outs], 1.0, tok.pad_token_id)
(-(logps * mask).sum()).backward()  # FSDP2 reduce-scatters the gradients across both ranks
opt.step()
stale, _ = gap()
gen.sync_weights(model)  # every rank streams the full tensors (collectives) into its own engine
after, _ = gap()
dist.barrier()  # the default group still works after vLLM joined it
json.dump({"rank": rank, "world": world, "before": before, "stale": stale, "after": after},
          open(f"{out}/rank{rank}.json", "w"))
gen.shutdown()  # CRUCIAL: before destroy_process_group
if dist.is_initialized():  # vLLM's shutdown may already have torn it down
    dist.destroy_process_group()
