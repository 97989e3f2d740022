"""Process plumbing: user errors, torch.distributed setup, seeding, metrics logging."""

from __future__ import annotations

import datetime
import json
import math
import os
import random
import resource
import sys
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


class UserError(Exception):
    """Bad input from the user (a path, a column, a flag). Printed as one line, no traceback."""


def _excepthook(exc_type, exc, tb):
    if issubclass(exc_type, UserError):
        rank = os.environ.get("RANK")
        prefix = f"[rank {rank}] " if rank is not None else ""
        print(f"{prefix}error: {exc}", file=sys.stderr)
        sys.exit(2)  # sys.exit inside the hook still sets the exit status
    sys.__excepthook__(exc_type, exc, tb)


# A UserError that escapes a script ends it with one line on stderr and exit status 2; every
# other exception keeps its full traceback.
sys.excepthook = _excepthook


def setup_distributed() -> tuple[int, int, torch.device]:
    """Join torchrun's process group if there is one. Returns (rank, world_size, device).

    Plain `python script.py` is rank 0 of 1 with no process group. Under torchrun: NCCL on GPUs,
    gloo on CPUs (what the tests use).
    """
    if "RANK" not in os.environ:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if device.type == "cuda":
            torch.cuda.set_device(0)
        return 0, 1, device
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        # Semi-online DPO generates a whole window in one call (s = 100: 6,400 sequences per rank)
        # while the other ranks wait in the next collective; NCCL's default 10 minutes is too short.
        dist.init_process_group("nccl", device_id=device, timeout=datetime.timedelta(hours=2))
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch. Call with the *same* seed on every rank so that model init
    is identical; per-rank randomness (data shards, sampling) is derived explicitly elsewhere."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def all_reduce(values: dict[str, float], op: str = "sum") -> dict[str, float]:
    """Reduce a dict of floats over ranks in one collective: op is "sum" or "max".
    Without a process group it returns the values unchanged. Every rank must pass the same keys:
    a key logged on one rank only (a fork's new metric behind an `if`) would pair other keys'
    values up wrongly, or hang, so they are compared first (a checksum of the key names, two
    numbers) and a mismatch is an error on every rank, naming the keys."""
    if not (dist.is_available() and dist.is_initialized()):
        return dict(values)
    keys = sorted(values)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    code = float(zlib.crc32("\0".join(keys).encode()))
    check = torch.tensor([code, -code], dtype=torch.float64, device=device)
    dist.all_reduce(check, op=dist.ReduceOp.MAX)  # max == own and min == own on every rank iff equal
    if check.tolist() != [code, -code]:
        every = [None] * dist.get_world_size()  # the error path only: which keys differ
        dist.all_gather_object(every, keys)
        diff = {r: sorted(set(k) ^ set(keys)) for r, k in enumerate(every) if k != keys}
        raise RuntimeError(f"all_reduce: ranks hold different keys (rank {dist.get_rank()} vs the keys "
                           f"differing per rank: {diff}); every rank must reduce every key, 0 if it has none")
    if not keys:
        return {}
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return dict(zip(keys, t.tolist(), strict=True))


def micro_batches(n: int, size: int) -> list[slice]:
    """Slices of a rank's `n` sequences, `size` at a time, as many as the rank with the most has:
    the extra ones are empty and the caller runs a padding pass of weight 0 for each.
    CRUCIAL (FSDP): every forward and backward pass all-gathers the parameters and reduce-scatters
    the gradients with every other rank, so all ranks must run the same number of passes, or the
    ones with more wait forever (DPO's prompts without a pair, or a fork that filters samples)."""
    count = int(all_reduce({"micro_batches": math.ceil(n / size)}, op="max")["micro_batches"])
    return [slice(k * size, (k + 1) * size) for k in range(count)]


def chunks(items: list, size: int) -> list[list]:
    """`items` cut into consecutive lists of `size`."""
    return [items[i : i + size] for i in range(0, len(items), size)]


def peak_memory_gb(device: torch.device) -> float:
    """This rank's peak memory so far, in GiB: on a GPU the most the torch allocator held (the
    trainer's and the in-process vLLM engine's tensors), on the CPU the process's peak resident
    set (ru_maxrss, KiB on Linux)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class MetricsLogger:
    """Appends one JSON object per step to `<output_dir>/metrics.jsonl` (and one per logged prompt
    to `completions.jsonl`) and mirrors them to wandb when tracking. Call it on rank 0 only; each
    line is flushed, so a crash loses at most the current step."""

    def __init__(self, output_dir: str | Path, config: dict, track: bool = False,
                 project: str = "bridging-rl", run_name: str | None = None, resume_step: int = 0):
        self.path, self.completions = Path(output_dir) / "metrics.jsonl", Path(output_dir) / "completions.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for path in (self.path, self.completions):  # a resumed run redoes the lines after its checkpoint
            if path.exists():  # (a new run starts them empty)
                lines = path.read_text().splitlines(keepends=True) if resume_step else []
                path.write_text("".join(line for line in lines if line.strip() and json.loads(line)["step"] <= resume_step))
        self.wandb = None
        if track:  # a resumed run continues its W&B run (its id kept in the run folder), not a second one
            import wandb

            id_file = Path(output_dir) / "wandb_id"
            run_id = id_file.read_text().strip() if resume_step and id_file.exists() else None
            self.wandb = wandb.init(project=project, name=run_name, config=config, id=run_id,
                                    resume="allow" if run_id else None)
            id_file.write_text(self.wandb.id)

    def log(self, metrics: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=int(metrics["step"]))

    def log_completions(self, step: int, records: list[dict]) -> None:
        """A step's completion records (`common.metrics.completion_records`), one line per prompt;
        with wandb, a table of one row per completion under the key `completions`."""
        with self.completions.open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        if self.wandb is not None:
            import wandb

            def role(r: dict, i: int) -> str:  # in DPO's pairs: a completion is only ever one of the two
                return next(("chosen" if i == c else "rejected" for c, w in r.get("pairs", []) if i in (c, w)), "")

            columns = ["step", "task", "prompt", "completion", "reward", "length", "role", "advantage"]
            rows = [[step, r["task"], str(r["prompt"]), text, r["rewards"][i], r["lengths"][i], role(r, i),
                     r["advantages"][i] if "advantages" in r else None]
                    for r in records for i, text in enumerate(r["completions"])]
            self.wandb.log({"completions": wandb.Table(columns=columns, data=rows)}, step=step)

    def finish(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> float:
    """Set every parameter group's learning rate for the coming step; returns it (for the log)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr
