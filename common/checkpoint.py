"""Checkpoints: a Hugging Face model folder that transformers and vLLM load as it is, plus the
trainer state that `--resume` needs, all in safetensors and JSON: nothing is unpickled on resume.

Layout of `<output_dir>/checkpoint/`:
- `model.safetensors`, `config.json`, tokenizer files: the full policy (rank 0 writes it), in
  the compute dtype (bf16 on GPUs; fp32 for the embedded models on the CPU);
- `trainer_state/rank<r>.safetensors`: rank r's own shards of the weights (fp32 master copy)
  and of the AdamW state, by parameter name (each rank writes its own: no gather of the
  optimizer state, which is twice the model);
- `step.json`: the optimizer steps done and the number of ranks that wrote the shards.

`<output_dir>/best-math/`, `best-chat/` (`save_best`): the model alone, of the step whose validation
score was the best so far by the paper's rule, with `best.json`; what a user evaluates or uploads.

Crash safety: everything is written into `checkpoint.tmp/`, then the previous checkpoint is
moved aside and `checkpoint.tmp/` renamed into place; a crash at any point leaves a whole
checkpoint under `checkpoint/` or, between the two renames, under `checkpoint.old/`, which
`find_checkpoint` puts back. Under torchrun on several nodes, `output_dir` must be a shared
filesystem (every rank writes its shard there).
"""

from __future__ import annotations

import json
import math
import os
import shutil

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from common.models import check_safetensors, full_state_dict
from common.utils import UserError, all_reduce


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
    tmp = _fresh(ckpt_dir + ".tmp", rank)
    if rank == 0:
        os.makedirs(os.path.join(tmp, "trainer_state"))
    _barrier()
    _save_model(tmp, policy, tokenizer, dtype, rank)  # collective (the gather); rank 0 writes
    shard = {}
    for name, p in policy.named_parameters():
        shard[f"model/{name}"] = _local(p.detach()).cpu().contiguous()
        for key, value in optimizer.state.get(p, {}).items():  # AdamW: step, exp_avg, exp_avg_sq
            shard[f"optim/{name}/{key}"] = _local(value).cpu().contiguous()
    save_file(shard, os.path.join(tmp, "trainer_state", f"rank{rank}.safetensors"))
    if rank == 0:
        with open(os.path.join(tmp, "step.json"), "w") as f:
            json.dump({"step": step, "world_size": world}, f)
    _barrier()  # CRUCIAL: every rank's shard is on disk before the rename makes it the checkpoint
    if rank == 0:
        _put_in_place(tmp, ckpt_dir)
    _barrier()


# The paper's rule for the checkpoint a task keeps: math by validation accuracy; chat by the
# length-normalised reward-model score (mean reward / mean length), because the RM rewards length.
BEST_BY = {"math": "eval/accuracy", "chat": "eval/chat/reward_per_token"}


def save_best(output_dir: str, metrics: dict, policy: torch.nn.Module, tokenizer,
              dtype: torch.dtype = torch.float32) -> None:
    """After a training step's evaluation (collective: every rank; the scripts call it for steps
    >= 1, never with the seed's step-0 evaluation), for each task whose validation
    score (`BEST_BY`) beats the best of the run so far, the model alone (no trainer state) in
    `<output_dir>/best-<task>/`: a Hugging Face folder for evaluate.py or a hub upload, with
    `best.json` (step, score, the evaluation). Strictly better only: a tie keeps the earlier step."""
    rank, _ = _rank_world()
    for task, key in BEST_BY.items():
        if key not in metrics:  # no evaluation of this task at this step
            continue
        folder = os.path.join(output_dir, f"best-{task}")
        record = os.path.join(folder, "best.json")
        if rank == 0 and not os.path.isdir(folder) and os.path.isdir(folder + ".old"):  # a crash mid-rename
            os.rename(folder + ".old", folder)
        best = json.load(open(record))["score"] if rank == 0 and os.path.exists(record) else -math.inf
        # rank 0 decides for all: every rank must take the same branch (the gather is collective)
        if not all_reduce({"better": float(rank == 0 and metrics[key] > best)}, op="max")["better"]:
            continue
        tmp = _fresh(folder + ".tmp", rank)
        _barrier()
        _save_model(tmp, policy, tokenizer, dtype, rank)
        if rank == 0:
            with open(os.path.join(tmp, "best.json"), "w") as f:
                json.dump({"step": metrics["step"], "task": task, "metric": key, "score": metrics[key],
                           "eval": {k: v for k, v in metrics.items() if k.startswith("eval/")}}, f, indent=1)
            _put_in_place(tmp, folder)
        _barrier()


def _fresh(folder: str, rank: int) -> str:
    """`folder` emptied (rank 0) for a save to write into."""
    if rank == 0:
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
    return folder


def _save_model(folder: str, policy: torch.nn.Module, tokenizer, dtype: torch.dtype, rank: int) -> None:
    """The full policy as a Hugging Face folder, in `dtype` (collective: the weights are gathered on
    every rank; rank 0 alone keeps them and writes)."""
    if hasattr(policy, "reshard"):  # CRUCIAL: FSDP2 leaves a root unsharded after a no-grad forward
        policy.reshard()
    full = {name: t.cpu() for name, t in full_state_dict(policy, dtype) if rank == 0}
    if rank != 0:
        return
    model = getattr(policy, "module", policy)
    model.save_pretrained(folder, state_dict=full)
    # CRUCIAL: config.json must say what the file holds (bf16 on GPUs), or transformers and vLLM
    # (dtype auto) load the model in fp32, at twice the memory; `save_pretrained` writes the fp32
    # master's dtype whatever the config said, so the config is written again
    master_dtype, model.config.dtype = model.config.dtype, dtype
    model.config.save_pretrained(folder)
    model.config.dtype = master_dtype
    tokenizer.save_pretrained(folder)


def _put_in_place(tmp: str, folder: str) -> None:
    """`tmp` becomes `folder` (rank 0): the previous one moved aside first and removed last, so a
    crash leaves a whole folder under `folder` or `folder.old` (which the next use puts back)."""
    umask = os.umask(0)
    os.umask(umask)
    for d, _, files in os.walk(tmp):  # normal modes: safetensors writes its files 0600
        for f in files:
            os.chmod(os.path.join(d, f), 0o666 & ~umask)
    shutil.rmtree(folder + ".old", ignore_errors=True)
    if os.path.exists(folder):
        os.rename(folder, folder + ".old")
    os.rename(tmp, folder)
    shutil.rmtree(folder + ".old", ignore_errors=True)


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
            elif optimizer.defaults.get("fused"):  # fused AdamW keeps `step` on the device
                t = t.to(local.device)
            state[key.rsplit("/", 1)[1]] = t  # otherwise `step` stays a CPU scalar, as AdamW keeps it
        if state:
            optimizer.state[p] = state
    return meta["step"]
