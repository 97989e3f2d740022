"""Checkpoints: a Hugging Face model folder that transformers and vLLM load as it is, plus the
trainer state that `--resume` needs, all in safetensors and JSON: nothing is unpickled on resume.

Layout of `<output_dir>/checkpoint/`:
- `model.safetensors`, `config.json`, tokenizer files: the full policy (rank 0 writes it), in
  bf16 on GPUs (fp32 on the CPU);
- `trainer_state/rank<r>.safetensors`: rank r's own shards of the weights (fp32 master copy)
  and of the AdamW state, by parameter name (each rank writes its own: no gather of the
  optimizer state, which is twice the model);
- `step.json`: the optimizer steps done and the number of ranks that wrote the shards.

Crash safety: everything is written into `checkpoint.tmp/`, then the previous checkpoint is
moved aside and `checkpoint.tmp/` renamed into place; a crash at any point leaves a whole
checkpoint under `checkpoint/` or, between the two renames, under `checkpoint.old/`, which
`find_checkpoint` puts back. Under torchrun on several nodes, `output_dir` must be a shared
filesystem (every rank writes its shard there).
"""

from __future__ import annotations

import json
import os
import shutil

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from common.models import check_safetensors, full_state_dict
from common.utils import UserError


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 DTensor; a plain tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


def find_checkpoint(ckpt_dir: str) -> bool:
    """True if `ckpt_dir` holds a whole checkpoint; puts back the previous one if a crash came
    between the two renames of `save_checkpoint`."""
    rank, _ = _rank_world()
    if rank == 0 and not os.path.isdir(ckpt_dir) and os.path.isfile(os.path.join(ckpt_dir + ".old", "step.json")):
        os.rename(ckpt_dir + ".old", ckpt_dir)
    # CRUCIAL: every rank takes the barrier; a rank that looked only after rank 0's rename would
    # otherwise skip it and leave the others waiting forever
    _barrier()
    return os.path.isfile(os.path.join(ckpt_dir, "step.json"))


def check_checkpoint(ckpt_dir: str, world_size: int) -> None:
    """Every file `--resume` reads is there and whole (safetensors headers and sizes), checked before
    any model loads: a copy cut short is named in one line, not in a traceback after the load."""
    files = [os.path.join(ckpt_dir, "trainer_state", f"rank{r}.safetensors") for r in range(world_size)]
    for f in files + [os.path.join(ckpt_dir, "model.safetensors")]:
        if not os.path.isfile(f):
            raise UserError(f"--resume: {f} is missing; the checkpoint is incomplete (copy it again)")
        check_safetensors(f, "--resume: checkpoint file")


def save_checkpoint(ckpt_dir: str, step: int, policy: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    tokenizer, dtype: torch.dtype = torch.float32) -> None:
    """Write the checkpoint of `step` (collective: call it on every rank): the model in the compute
    `dtype` (what it runs in; bf16 is half the bytes), the trainer state (fp32 masters, AdamW) apart."""
    rank, world = _rank_world()
    tmp = ckpt_dir + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.join(tmp, "trainer_state"))
    _barrier()
    if hasattr(policy, "reshard"):  # CRUCIAL: FSDP2 leaves a root unsharded after a no-grad forward
        policy.reshard()
    # collective on every rank; only rank 0 keeps the gathered copy (it alone writes the HF folder),
    # in the compute dtype (the trainer state keeps fp32)
    full = {name: t.cpu() for name, t in full_state_dict(policy, dtype) if rank == 0}
    shard = {}
    for name, p in policy.named_parameters():
        shard[f"model/{name}"] = _local(p.detach()).cpu().contiguous()
        for key, value in optimizer.state.get(p, {}).items():  # AdamW: step, exp_avg, exp_avg_sq
            shard[f"optim/{name}/{key}"] = _local(value).cpu().contiguous()
    save_file(shard, os.path.join(tmp, "trainer_state", f"rank{rank}.safetensors"))
    if rank == 0:
        model = getattr(policy, "module", policy)
        model.save_pretrained(tmp, state_dict=full)
        # CRUCIAL: config.json must say what the file holds (bf16 on GPUs), or transformers and vLLM
        # (dtype auto) load the model in fp32, at twice the memory; `save_pretrained` writes the fp32
        # master's dtype whatever the config said, so the config is written again
        master_dtype, model.config.dtype = model.config.dtype, dtype
        model.config.save_pretrained(tmp)
        model.config.dtype = master_dtype
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "step.json"), "w") as f:
            json.dump({"step": step, "world_size": world}, f)
    _barrier()  # CRUCIAL: every rank's shard is on disk before the rename makes it the checkpoint
    if rank == 0:
        umask = os.umask(0)
        os.umask(umask)
        for d, _, files in os.walk(tmp):  # normal modes: safetensors writes its files 0600
            for f in files:
                os.chmod(os.path.join(d, f), 0o666 & ~umask)
        shutil.rmtree(ckpt_dir + ".old", ignore_errors=True)
        if os.path.exists(ckpt_dir):
            os.rename(ckpt_dir, ckpt_dir + ".old")
        os.rename(tmp, ckpt_dir)
        shutil.rmtree(ckpt_dir + ".old", ignore_errors=True)
    _barrier()


@torch.no_grad()
def load_checkpoint(ckpt_dir: str, policy: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Restore this rank's weights and AdamW state in place; returns the step to continue after.
    The policy must be wrapped as when it was saved (same model, same number of ranks)."""
    rank, world = _rank_world()
    with open(os.path.join(ckpt_dir, "step.json")) as f:
        meta = json.load(f)
    if meta["world_size"] != world:
        raise UserError(f"--resume: {ckpt_dir} was written by {meta['world_size']} rank(s); "
                        f"resume with the same number (this run has {world})")
    shard = load_file(os.path.join(ckpt_dir, "trainer_state", f"rank{rank}.safetensors"))
    for name, p in policy.named_parameters():
        local = _local(p)
        local.copy_(shard[f"model/{name}"])
        state = {}
        for key in [k for k in shard if k.startswith(f"optim/{name}/")]:
            t = shard[key]
            if t.shape == local.shape and t.dim() > 0:  # moments: on the parameter's device, sharded like it
                t = t.to(local.device)
                if hasattr(p, "device_mesh"):
                    from torch.distributed.tensor import DTensor

                    t = DTensor.from_local(t, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
            state[key.rsplit("/", 1)[1]] = t  # `step` stays a CPU scalar, as AdamW keeps it
        if state:
            optimizer.state[p] = state
    return meta["step"]
