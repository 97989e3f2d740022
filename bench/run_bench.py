"""Where every second of a step goes, for each regime, next to TRL's GRPOTrainer on the same work.

    python bench/run_bench.py                   # all sizes and TRL, ~80 min on 2 CPU cores
    python bench/run_bench.py --sizes small     # the embedded default only, ~12 min
    python bench/run_bench.py --no-trl          # this project's four scripts only

Each regime script runs `--steps` steps as a subprocess (no eval, no intermediate checkpoint) and
the steps from `--measure-from` on are read back from its metrics.jsonl (`perf/*`: the script's
own timers around sync / generate / score / train; "other" is the rest of the step). The first
steps are left out: they hold one-time costs (allocator growth, the first optimizer state).
Semi-online runs at s = 10, so the measured steps 11-20 are exactly one sync window.
Each size runs its five configurations in `rounds` interleaved rounds (small: 3, large: 1) and
reports each configuration's fastest round (best of N, as `timeit` does: on a shared machine
the same run varied by up to 30% from one minute to the next), with the range over rounds.
`bench/trl_grpo.py` runs TRL's GRPOTrainer on grpo.py's configuration in the same invocation.

Sizes:
- small: the embedded default (0.9M-parameter policy, math, 48 new tokens);
- qwen2-0.5b: a random model of Qwen2-0.5B's exact shape (494M parameters, vocabulary 151,936,
  the embedded tokenizer), chat, 4 prompts x 4 samples of 32 tokens per step, online DPO and GRPO
  on one process, and TRL: what a user trying Qwen2.5-0.5B-Instruct on a laptop meets; with the
  machine's peak memory for all the run's processes together (two processes of this shape need
  ~11 GB each and do not fit in 24 GB: docs/benchmarks.md);
- qwen2-0.5b-bf16: the same shape with the engine in bf16 (`--generator-dtype bfloat16`) against
  the fp32 trainer, as on a GPU: GRPO without and with `--tis-cap 2`, on one process and two, and
  TRL; the logprob gap column shows the mismatch TIS corrects;
- qwen2-0.5b-bf16-compute: the same shape at the CPU's fast setting, bf16 compute over fp32 masters
  and a bf16 engine (`--compute-dtype bfloat16`), online DPO and GRPO on one process and two, and TRL
  with `bf16=True`; with issue 34's targets (per step against TRL, the update's share of the bf16
  GEMM peak, memory, the room two ranks leave);
- large: a random 3.2M-parameter Qwen2 (hidden 256, 4 layers, the embedded tokenizer) on the chat
  task, scored by the embedded reward model (a random policy never solves math, so DPO would get
  no pairs), 256 new tokens: long rollouts.

Every row also gives its update's achieved FLOP/s (`update_flops`: the model's matmul FLOPs, as
MFU counts them) against the GEMM peak of its compute dtype, measured at the start of the same
invocation. Each run's checkpoint is deleted once its metrics are read (6.7 GB at the 0.5B shape).

Writes `bench/results/results.md` and `results.json`, and the tables into docs/benchmarks.md between its
markers; prints the table.
Benchmarks, not tests: nothing here asserts a time. Run on an otherwise idle machine.
"""

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import date

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import tyro  # noqa: E402

from bench.cpu_bf16 import gemm_peak, matmul_weights, update_flops  # noqa: E402

SIZES = {
    "small": {"model": "embedded/policy", "dataset": "embedded/data/math_train.jsonl", "max_new_tokens": 48,
              "max_model_len": 256, "rounds": 3},
    "large": {"model": "runs/bench/models/qwen2-3m", "dataset": "embedded/data/chat_train.jsonl",
              "max_new_tokens": 256, "max_model_len": 512, "rounds": 1},
    # a real model's shape on a laptop: online DPO and GRPO on one process, and TRL
    "qwen2-0.5b": {"model": "runs/bench/models/qwen2-0.5b", "dataset": "embedded/data/chat_train.jsonl",
                   "max_new_tokens": 32, "max_model_len": 256, "rounds": 1, "steps": 6, "measure_from": 3,
                   "flags": ["--prompts-per-step", "4", "--samples-per-prompt", "4"],
                   "ours": ["--compute-dtype", "float32"],  # the fp32 rows (auto is bf16 here: bench/cpu_bf16.py)
                   "regimes": ["online DPO (s = 1)", "GRPO (s = 1)"], "nprocs": (1,)},
    # two processes of this shape do not fit in 24 GB (docs/benchmarks.md: where each rank's memory goes)
    # the same shape with a bf16 engine (the GPU's trainer-engine mismatch, on the CPU), GRPO without and
    # with truncated importance sampling, on one process and two, and TRL
    "qwen2-0.5b-bf16": {"model": "runs/bench/models/qwen2-0.5b", "dataset": "embedded/data/chat_train.jsonl",
                        "max_new_tokens": 32, "max_model_len": 256, "rounds": 1, "steps": 5, "measure_from": 3,
                        "flags": ["--prompts-per-step", "4", "--samples-per-prompt", "4"],
                        "ours": ["--compute-dtype", "float32", "--generator-dtype", "bfloat16"],
                        "regimes": ["GRPO (s = 1)", "GRPO (s = 1), --tis-cap 2"], "nprocs": (1, 2)},
    # the same shape at the CPU's fastest correct setting: bf16 compute over fp32 masters and a bf16
    # engine (what --compute-dtype auto picks on a CPU with bf16 units), on one process and two, and TRL
    # in bf16 (its bf16=True: autocast over fp32 weights)
    "qwen2-0.5b-bf16-compute": {"model": "runs/bench/models/qwen2-0.5b", "dataset": "embedded/data/chat_train.jsonl",
                                "max_new_tokens": 32, "max_model_len": 256, "rounds": 1, "steps": 6, "measure_from": 3,
                                "flags": ["--prompts-per-step", "4", "--samples-per-prompt", "4"],
                                "ours": ["--compute-dtype", "bfloat16"], "trl": ["--bf16"],
                                "regimes": ["online DPO (s = 1)", "GRPO (s = 1)"], "nprocs": (1, 2)},
}
REGIMES = [  # (name, script, extra flags)
    ("offline DPO (s = ∞)", "offline_dpo.py", []),
    ("semi-online DPO (s = 10)", "semi_online_dpo.py", ["--sync-interval", "10"]),
    ("online DPO (s = 1)", "online_dpo.py", []),
    ("GRPO (s = 1)", "grpo.py", []),
]
# long rollouts: the update with length-sorted micro-batches of 16 instead of one pass of 64
EXTRA = {"large": [("GRPO (s = 1), --micro-batch-size 16", "grpo.py", ["--micro-batch-size", "16"])],
         "qwen2-0.5b-bf16": [("GRPO (s = 1), --tis-cap 2", "grpo.py", ["--tis-cap", "2"])]}
PHASES = ["sync", "generate", "score", "train"]


@dataclass
class Args:
    sizes: tuple[str, ...] = ("small", "large", "qwen2-0.5b", "qwen2-0.5b-bf16", "qwen2-0.5b-bf16-compute")
    """which configurations to run (small: the embedded default; large: a random 3.2M model, long rollouts;
    qwen2-0.5b: a real model's shape, one process)"""
    steps: int = 20
    """optimizer steps per run"""
    measure_from: int = 11
    """first step measured (earlier steps are warm-up; with s = 10, 11..20 is one sync window)"""
    rounds: int = 0
    """interleaved rounds per size, the fastest reported (0: the size's default, small 3, large 1)"""
    trl: bool = True
    """also run TRL's GRPOTrainer on grpo.py's configuration"""
    runs_dir: str = "runs/bench"
    """where the runs and their logs go"""
    out_dir: str = "bench/results"
    """where results.md and results.json go"""


def make_model(size: str, path: str) -> None:
    if size == "large":
        make_large_model(path)
    elif size.startswith("qwen2-0.5b"):
        from bench.memory import make_model as make_qwen2_05b

        make_qwen2_05b(path, 151936)


def make_large_model(path: str) -> None:
    """A random Qwen2 from a config, saved with the embedded tokenizer (same seed: same weights)."""
    if os.path.exists(os.path.join(path, "config.json")):
        return
    import torch
    from transformers import Qwen2ForCausalLM

    from embedded.tiny import build_tokenizer, tiny_config

    tok = build_tokenizer()
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(tiny_config(tok, hidden=256, layers=4, heads=4, intermediate=1024, max_len=1024))
    model.save_pretrained(path)
    tok.save_pretrained(path)


def _available() -> int:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def run(cmd: list[str], log: str, env: dict | None = None) -> tuple[float, float]:
    """Run one benchmark process (or torchrun and its ranks) to completion, its output in `log`;
    returns the machine's peak memory use during the run in GiB (MemAvailable sampled every
    0.2 s against its value at the start: what all of the run's processes took together) and the
    room that was left at that peak (the lowest MemAvailable)."""
    start = low = _available()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        while proc.poll() is None:
            low = min(low, _available())
            time.sleep(0.2)
    if proc.returncode != 0:
        tail = open(log).read().splitlines()[-15:]
        raise SystemExit(f"benchmark run failed: {' '.join(cmd)}\n" + "\n".join(tail) + f"\n(full log: {log})")
    return (start - low) / 2**30, low / 2**30


def summarize(records: list[dict], first: int, weights: tuple[int, int]) -> dict:
    """Mean seconds per step of each phase over the measured steps, token rates from sums, and the
    update's achieved FLOP/s (`update_flops` of the model's matmul `weights`: every run here
    has a reference)."""
    steps = [r for r in records if r.get("step", 0) >= first and "perf/step_s" in r]
    n = len(steps)
    total = lambda k: sum(r.get(k, 0.0) for r in steps)  # noqa: E731
    out = {"steps": n, "step_s": total("perf/step_s") / n}
    for p in PHASES:
        out[f"{p}_s"] = total(f"perf/{p}_s") / n
    out["other_s"] = out["step_s"] - sum(out[f"{p}_s"] for p in PHASES)
    gen = total("perf/generate_s")
    out["rollout_tok_s"] = total("perf/rollout_tokens") / gen if gen > 0 else float("nan")
    out["train_tok_s"] = total("perf/train_tokens") / total("perf/train_s")
    flops = update_flops(weights, total("perf/train_tokens"), total("perf/train_completion_tokens"), reference=True)
    out["update_flop_s"] = flops / total("perf/train_s")
    out["peak_gb"] = max(r.get("perf/peak_memory_gb", 0.0) for r in records)
    out["gap_max"] = max((r["rollout/logprob_gap_max"] for r in steps if "rollout/logprob_gap_max" in r), default=float("nan"))
    out["tis_capped"] = max((r["train/tis_capped_frac"] for r in steps if "train/tis_capped_frac" in r), default=float("nan"))
    out["sync_share"] = out["sync_s"] / out["step_s"]
    out["other_share"] = out["other_s"] / out["step_s"]
    return out


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {len(os.sched_getaffinity(0))} cores, {gpu}, torch {torch.__version__}"


def fmt(x: float, digits: int = 2) -> str:
    return "—" if x != x else f"{x:.{digits}f}"


def table(size: str, rows: dict[str, dict], notes: dict[str, str], peaks: dict[str, float]) -> str:
    out = [f"**{size}** ({describe(size)})", "",
           "| run | s/step | sync | generate | score | train | other | rollout tok/s | train tok/s | update GFLOP/s (of its dtype's GEMM peak) | peak RSS GiB (a rank) | machine peak GiB (all) | sync share | other share | logprob gap max |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        spread = r.get("step_s_rounds", [r["step_s"]])
        step = f"{r['step_s']:.2f}" + (f" [{min(spread):.2f}–{max(spread):.2f}]" if len(spread) > 1 else "")
        out.append(f"| {name} | {step} | {r['sync_s']:.3f} | {r['generate_s']:.2f} | {r['score_s']:.2f} | "
                   f"{r['train_s']:.2f} | {r['other_s']:.3f} | {fmt(r['rollout_tok_s'], 0)} | {r['train_tok_s']:.0f} | "
                   f"{flop_s(r, peaks)} | "
                   f"{r['peak_gb']:.2f} | {fmt(r.get('system_gb', float('nan')))} | {r['sync_share']:.1%} | {r['other_share']:.1%} | "
                   f"{fmt(r.get('gap_max', float('nan')), 4)}" + (f" (TIS capped {r['tis_capped']:.2%})"
                                                                  if r.get("tis_capped", float("nan")) == r.get("tis_capped") else "") + " |")
    out += [""] + [f"- {n}" for n in notes.values()]
    return "\n".join(out)


def flop_s(r: dict, peaks: dict[str, float]) -> str:
    """The update's achieved GFLOP/s and its share of the GEMM peak of the dtype it computes in."""
    if "update_flop_s" not in r:
        return "—"
    dtype = r.get("compute", "float32")
    peak, label = peaks.get(dtype), {"bfloat16": "bf16", "float32": "fp32"}[dtype]
    return f"{r['update_flop_s'] / 1e9:.0f}" + (f" ({r['update_flop_s'] / peak:.0%} of {label})" if peak else "")


def describe(size: str) -> str:
    c = SIZES[size]
    model = {"small": "embedded 0.9M policy", "large": "random 3.2M Qwen2",
             "qwen2-0.5b": "random Qwen2-0.5B shape (494M, vocabulary 151,936)",
             "qwen2-0.5b-bf16": "random Qwen2-0.5B shape, bf16 engine (--generator-dtype bfloat16), fp32 trainer",
             "qwen2-0.5b-bf16-compute": "random Qwen2-0.5B shape, bf16 compute over fp32 masters and a bf16 engine "
                                        "(--compute-dtype bfloat16); TRL with bf16=True"}[size]
    task = "math (Math-Verify)" if "math" in c["dataset"] else "chat (reward model)"
    batch = "4 prompts x 4 samples" if size.startswith("qwen2-0.5b") else "8 prompts x 8 samples"
    return f"{model}, {task}, {batch} per step, {c['max_new_tokens']} new tokens, no memory flag"


def targets(rows: dict[str, dict]) -> list[str]:
    """The issue's targets as measured ratios, each with a pass mark."""
    g, o, s = rows["GRPO (s = 1)"], rows["online DPO (s = 1)"], rows["semi-online DPO (s = 10)"]
    out = []
    t = rows.get("TRL GRPOTrainer")
    if t:
        speed = t["step_s"] / g["step_s"]
        out.append(f"grpo.py steps/s vs TRL: {speed:.2f}x (target >= 2) {'✓' if speed >= 2 else '✗'}; "
                   f"rollout tok/s {g['rollout_tok_s'] / t['rollout_tok_s']:.2f}x")
    for name, r in (("GRPO", g), ("online DPO", o)):
        out.append(f"{name} sync share at s = 1: {r['sync_share']:.1%} (target <= 5%) {'✓' if r['sync_share'] <= 0.05 else '✗'}")
    ratio = s["rollout_tok_s"] / o["rollout_tok_s"]
    out.append(f"semi-online s = 10 vs online rollout tok/s: {ratio:.2f}x (target >= 1.5) {'✓' if ratio >= 1.5 else '✗'}")
    worst = max(rows[k]["other_share"] for k in rows if k != "TRL GRPOTrainer")
    out.append(f"largest 'other' share: {worst:.1%} (target <= 5%) {'✓' if worst <= 0.05 else '✗'}")
    return out


def targets_bf16(rows: dict[str, dict], peaks: dict[str, float]) -> list[str]:
    """Issue 34's targets at the Qwen2-0.5B shape in bf16, each measured, with its margin."""
    g, t = rows["GRPO (s = 1)"], rows["TRL GRPOTrainer"]
    two = rows.get("GRPO (s = 1), 2 processes")
    speed, share = t["step_s"] / g["step_s"], g["update_flop_s"] / peaks["bfloat16"]
    out = [f"grpo.py per step vs TRL (bf16): {speed:.2f}x (target >= 2) {'✓' if speed >= 2 else '✗'}",
           f"grpo.py's update at {share:.0%} of the measured bf16 GEMM peak (target >= 40%) {'✓' if share >= 0.4 else '✗'}",
           f"machine peak memory: grpo.py {g['system_gb']:.2f} GiB vs TRL {t['system_gb']:.2f} (target <=) "
           f"{'✓' if g['system_gb'] <= t['system_gb'] else '✗'}"]
    if two:
        out.append(f"two ranks of GRPO: {two['room_gb']:.1f} GiB left at the peak (target > 2) {'✓' if two['room_gb'] > 2 else '✗'}")
    return out


def render(size: str, r: dict) -> str:
    peaks = r.get("gemm_peak", {})
    out = table(size, r["rows"], r.get("notes", {}), peaks) + f"\n\n(measured {r.get('date', '?')}"
    out += (f"; GEMM peak in the same run: bf16 {peaks['bfloat16'] / 1e9:.0f}, fp32 {peaks['float32'] / 1e9:.0f} GFLOP/s)"
            if peaks else ")")
    if r.get("targets"):
        out += "\n\nTargets, measured in this run:\n" + "\n".join(f"- {t}" for t in r["targets"])
    return out


def run_regime(size: str, name: str, script: str, extra: list[str], args: Args, weights: tuple[int, int],
               nproc: int = 1) -> tuple[dict, str | None]:
    """One of this project's scripts for the size's steps; its summary and a note (offline)."""
    cfg = SIZES[size]
    steps, first = cfg.get("steps", args.steps), cfg.get("measure_from", args.measure_from)
    out = os.path.join(ROOT, args.runs_dir, size, re.sub(r"[^a-z0-9]+", "_", f"{name} {nproc}p".lower()).strip("_"))
    shutil.rmtree(out, ignore_errors=True)
    flags = ["--model", cfg["model"], "--dataset", cfg["dataset"], "--max-new-tokens", str(cfg["max_new_tokens"]),
             "--max-model-len", str(cfg["max_model_len"]), "--num-steps", str(steps), "--eval-every", "0",
             "--save-every", str(10**9), "--log-samples-every", "0", "--output-dir", out, *cfg.get("flags", []),
             *cfg.get("ours", []), *extra]
    launch = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  f"--nproc_per_node={nproc}"]
    os.makedirs(out)
    system_gb, room_gb = run([*launch, script, *flags], os.path.join(out, "log.txt"),
                             {"OMP_NUM_THREADS": "1"} if nproc > 1 else None)
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    for folder in ("checkpoint", "best-math", "best-chat"):  # 6.7 GB each at the 0.5B shape: not kept
        shutil.rmtree(os.path.join(out, folder), ignore_errors=True)
    ours = cfg.get("ours", [])  # the compute dtype it was given (auto is fp32 at the small sizes)
    compute = ours[ours.index("--compute-dtype") + 1] if "--compute-dtype" in ours else "float32"
    row = summarize(records, first, weights) | {"system_gb": system_gb, "room_gb": room_gb, "compute": compute}
    note = None
    if script == "offline_dpo.py":  # its only generation: the one-time build at step 0
        build = records[0]
        row["rollout_tok_s"] = build["perf/rollout_tokens_per_s"]
        note = (f"offline DPO samples the whole run's rollouts from the seed before training: {args.steps} steps x 8 "
                f"prompts x 8 samples in {build['perf/generate_s']:.1f} s generate + {build['perf/score_s']:.1f} s score "
                "(its rollout tok/s); its steps only train")
    return row, note


def run_trl(size: str, args: Args, weights: tuple[int, int]) -> tuple[dict, str]:
    """TRL's GRPOTrainer on grpo.py's configuration (bench/trl_grpo.py)."""
    cfg = SIZES[size]
    steps, first = cfg.get("steps", args.steps), cfg.get("measure_from", args.measure_from)
    out = os.path.join(ROOT, args.runs_dir, size, "trl_grpo")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    system_gb, room_gb = run([sys.executable, "bench/trl_grpo.py", "--model", cfg["model"], "--dataset", cfg["dataset"],
                              "--max-new-tokens", str(cfg["max_new_tokens"]), "--num-steps", str(steps),
                              *cfg.get("flags", []), *cfg.get("trl", []), "--out", os.path.join(out, "metrics.jsonl"),
                              "--output-dir", out], os.path.join(out, "log.txt"))
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    import trl

    compute = "bfloat16" if "--bf16" in cfg.get("trl", []) else "float32"
    note = (f"TRL {trl.__version__} GRPOTrainer, grpo.py's configuration, {'bf16=True (bf16 autocast over fp32 weights)' if compute == 'bfloat16' else 'fp32'}; "
            "on the CPU it generates with transformers' `generate` (its in-process vLLM cannot reload weights on "
            "vLLM's CPU backend), so it has no sync; its 'train' holds everything but generate and score")
    return summarize(records, first, weights) | {"system_gb": system_gb, "room_gb": room_gb, "compute": compute}, note


def write(args: Args, path: str, results: dict) -> None:
    """results.md and results.json; a run of some sizes keeps the others' last results."""
    header = (f"Measured on {results['machine']} (each size's date below); seconds per step over the measured steps "
              f"(means; each configuration's fastest of the rounds, the range over rounds in brackets), by "
              f"`python bench/run_bench.py`.\n")
    os.makedirs(os.path.join(ROOT, args.out_dir), exist_ok=True)
    with open(os.path.join(ROOT, args.out_dir, "results.md"), "w") as f:
        f.write(header + "\n" + "\n\n".join(render(size, r) for size, r in results["sizes"].items()) + "\n")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    # docs/benchmarks.md's copy of the tables, between its markers (generated: never edited by hand)
    doc, begin, end = os.path.join(ROOT, "docs", "benchmarks.md"), "<!-- bench:begin -->\n", "<!-- bench:end -->"
    text = open(doc).read() if os.path.exists(doc) else ""
    if begin in text and end in text:
        tables = header + "\n" + "\n\n".join(render(size, r) for size, r in results["sizes"].items()) + "\n"
        with open(doc, "w") as f:
            f.write(text[: text.index(begin) + len(begin)] + tables + text[text.index(end):])


def main(args: Args) -> None:
    for s in args.sizes:
        if s not in SIZES:
            raise SystemExit(f"--sizes: unknown size {s!r} (choose from {', '.join(SIZES)})")
    if args.measure_from > args.steps:
        raise SystemExit("--measure-from must be at most --steps")
    path = os.path.join(ROOT, args.out_dir, "results.json")
    earlier = json.load(open(path)).get("sizes", {}) if os.path.exists(path) else {}
    results = {"machine": machine(), "date": date.today().isoformat(), "steps": args.steps,
               "measure_from": args.measure_from, "sizes": {}}
    print(f"benchmark on {results['machine']}", flush=True)
    import torch
    from transformers import AutoConfig

    peaks = {str(d)[6:]: gemm_peak(d) for d in (torch.bfloat16, torch.float32)}  # the yardstick, in this run
    print(", ".join(f"GEMM peak {k}: {v / 1e9:.0f} GFLOP/s" for k, v in peaks.items()), flush=True)
    for size in args.sizes:
        cfg = SIZES[size]
        make_model(size, os.path.join(ROOT, cfg["model"]))
        weights = matmul_weights(AutoConfig.from_pretrained(os.path.join(ROOT, cfg["model"])))
        rounds = args.rounds or cfg["rounds"]
        runs, notes = {}, {}  # name -> one summary per round
        regimes = [r for r in REGIMES + EXTRA.get(size, []) if r[0] in cfg.get("regimes", [r[0]])]
        configs = [(f"{name}, {n} processes" if n > 1 else name, script, extra, n)
                   for name, script, extra in regimes for n in cfg.get("nprocs", (1,))]
        for r in range(rounds):  # interleaved, so a slow minute on the machine hits one round, not one configuration
            for name, script, extra, nproc in configs + ([("TRL GRPOTrainer", None, [], 1)] if args.trl else []):
                print(f"[{size}, round {r + 1}/{rounds}] {name} ...", flush=True)
                t0 = time.time()
                row, note = (run_trl(size, args, weights) if script is None
                             else run_regime(size, name, script, extra, args, weights, nproc))
                runs.setdefault(name, []).append(row)
                if note:
                    notes[name] = note
                print(f"    {row['step_s']:.2f} s/step ({time.time() - t0:.0f} s wall)", flush=True)
        rows = {name: min(rs, key=lambda x: x["step_s"]) | {"step_s_rounds": [x["step_s"] for x in rs]}
                for name, rs in runs.items()}
        results["sizes"][size] = {"config": cfg, "rows": rows, "notes": notes, "date": results["date"],
                                  "gemm_peak": peaks, "targets": (targets(rows) if not size.startswith("qwen2-0.5b")
                                                                  else targets_bf16(rows, peaks) if "TRL GRPOTrainer" in rows
                                                                  and cfg.get("trl") else [])}
        print("\n" + render(size, results["sizes"][size]) + "\n", flush=True)
        write(args, path, results | {"sizes": {**earlier, **results["sizes"]}})  # after each size: a later failure keeps it
    print(f"wrote {args.out_dir}/results.md and results.json")


if __name__ == "__main__":
    main(tyro.cli(Args))
