"""Two ranks, the FSDP rules a fork can break: (1) `micro_batches` gives every rank the largest
count (rank 0 holds 5 sequences, rank 1 one); (2) `all_reduce` refuses keys that differ between
ranks, with an error on every rank instead of a hang; (3) `fsdp_wrap` shards the decoder layers of
architectures other than the policy's (Llama, GPT-2: `_no_split_modules`) and one forward /
backward runs in step. Writes rank{r}.json next to argv[1]."""

import datetime
import json
import sys

import torch
import torch.distributed as dist
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import common

out = sys.argv[1]
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
rank = dist.get_rank()
res = {"micro_batches": [(s.start, s.stop) for s in common.micro_batches([5, 1][rank], 2)]}
try:
    common.all_reduce({"loss": 1.0, **({"extra": 1.0} if rank == 1 else {})})
    res["mismatch"] = "no error"
except RuntimeError as e:
    res["mismatch"] = str(e)
res["matched"] = common.all_reduce({"loss": float(rank + 1)})["loss"]
torch.manual_seed(0)
models = {"llama": LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=2, num_attention_heads=4,
                                                num_key_value_heads=2)),
          "gpt2": GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=3, n_head=4))}
for name, model in models.items():
    wrapped = common.fsdp_wrap(model)
    res[name] = sorted({type(m).__name__ for m in wrapped.modules() if type(m).__name__.startswith("FSDP")})
    ids = torch.randint(0, 64, (2, 8))
    wrapped(input_ids=ids, labels=ids).loss.backward()
    res[name + "_sharded_layers"] = sum(type(m).__name__.startswith("FSDP") and m is not wrapped
                                        for m in wrapped.modules())
json.dump(res, open(f"{out}/rank{rank}.json", "w"))
dist.destroy_process_group()
