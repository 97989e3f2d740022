"""The paper's experiment in miniature, like for like: the seed against offline DPO (s = ∞),
semi-online DPO (two values of s), online DPO (s = 1) and GRPO, on the embedded math task
(Math-Verify) and the embedded instruction task (reward model).

Like for like, as in the paper (arXiv 2506.21495; its settings in docs/paper.md):
- every regime sees the same prompts in the same order: offline DPO samples, from the seed, the
  rollouts of exactly the steps the others train on (it is s = ∞ of the same run);
- the paper's settings where they transfer: math DPO β 0.1, Adam ε 1e-4, grad clip 0.1 and a
  reference re-synced with the generator (offline: fixed); chat DPO β 0.01, ε 1e-8, clip 0.1, fixed
  reference; GRPO KL 0.001, ε 1e-8, clip 0.1;
- the learning rate (the paper's 1e-6 is for an 8B model) picked per regime and task from one
  grid, the same for all, on the validation split (`math_val`, `chat_val`) with seed 1;
- chat checkpoints picked the paper's way: the step with the best length-normalised reward-model
  score (mean reward / mean length) on the validation split; math: the final checkpoint;
- `--seeds` seeds per regime at its picked learning rate; the test metrics are reported as the
  mean over seeds with the standard error across seeds.

Test evaluation with evaluate.py: math 300 test problems x `--final-samples` samples at T = 0.6 plus
greedy; chat 200 test prompts x `--final-samples` samples scored by the reward model, their length,
and the win rate against the seed's samples. Writes `study/results/results.md` (tables),
`study/results/{math,chat}.png` (validation metric, rollout entropy and length vs step, mean over
seeds) and `study/results/results.json`. A finished run or evaluation is not redone, so an
interrupted study continues where it stopped.

    .venv/bin/python study/run_study.py          # hours on 2 CPU cores (docs/study.md)
"""

import json
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = "embedded/data"


@dataclass
class Args:
    steps: int = 100
    """optimizer steps per run (8 prompts each: the same budget and prompts for every regime)"""
    eval_every: int = 20
    """validation evaluation during training every N steps (the candidate chat checkpoints)"""
    lr_grid: tuple[float, ...] = (2e-5, 5e-5, 1e-4)
    """learning rates tried for every regime and task (seed 1), picked on the validation split"""
    seeds: tuple[int, ...] = (1, 2, 3)
    """seeds per regime at its picked learning rate"""
    semi_intervals: tuple[int, int] = (20, 5)
    """the two sync intervals of semi-online DPO"""
    final_samples: int = 8
    """samples per test prompt in the final evaluation"""
    jobs: int = 2
    """runs at once, each on cores / jobs threads"""
    runs_dir: str = "runs/study"
    """where the runs go"""
    out_dir: str = "study/results"
    """where the tables, plots and JSON go"""


DPO = {"math": ["--beta", "0.1", "--adam-eps", "1e-4", "--max-grad-norm", "0.1"],
       "chat": ["--beta", "0.01", "--adam-eps", "1e-8", "--max-grad-norm", "0.1"]}
GRPO = ["--kl-coef", "0.001", "--adam-eps", "1e-8", "--max-grad-norm", "0.1"]
TASKS = {
    "math": {"train": f"{DATA}/math_train.jsonl", "val": f"{DATA}/math_val.jsonl", "val_limit": 100,
             "test": ["--chat-dataset", ""], "metric": "eval/accuracy", "label": "validation accuracy"},
    "chat": {"train": f"{DATA}/chat_train.jsonl", "val": f"{DATA}/chat_val.jsonl", "val_limit": 200,
             "test": ["--math-datasets", ""], "metric": "eval/chat/reward_per_token",
             "label": "validation RM reward / length"},
}


def regimes(args: Args) -> list[tuple[str, str, str, dict[str, list[str]]]]:
    """(key, label, script, the paper's flags per task), offline to online."""
    s1, s2 = args.semi_intervals
    return [("offline_dpo", "offline DPO (s=∞)", "offline_dpo.py", DPO),
            (f"semi_s{s1}", f"semi-online DPO (s={s1})", "semi_online_dpo.py", DPO),
            (f"semi_s{s2}", f"semi-online DPO (s={s2})", "semi_online_dpo.py", DPO),
            ("online_dpo", "online DPO (s=1)", "online_dpo.py", DPO),
            ("grpo", "GRPO (s=1)", "grpo.py", {"math": GRPO, "chat": GRPO})]


def run(cmd: list[str], tag: str, jobs: int) -> None:
    """Run a script from the repo root on its share of the cores, echoing its progress lines with `tag`."""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // jobs)))
    proc = subprocess.Popen([sys.executable, *cmd], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    tail = []
    for line in proc.stdout:
        tail = (tail + [line])[-30:]
        if line.startswith(("step ", "wrote ", "math ", "chat ", "done")) and ("eval" in line or not line.startswith("step ")):
            print(f"[{tag}] {line.rstrip()[:150]}", flush=True)
    if proc.wait() != 0:
        sys.exit(f"study: {' '.join(cmd)} failed:\n{''.join(tail)}")


def finished(run_dir: str, steps: int) -> bool:
    path = os.path.join(run_dir, "checkpoint", "step.json")
    return os.path.exists(path) and json.load(open(path))["step"] == steps


def metrics_of(run_dir: str) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def train(args: Args, task: str, regime: tuple, lr: float, seed: int, steps: int | None = None,
          pairs: str = "") -> str:
    """One training run (validation every `eval_every` steps), unless already finished; returns its folder."""
    key, _, script, flags = regime
    steps = steps or args.steps
    name = f"{task}_{key}_lr{lr:g}_seed{seed}" + (f"_to{steps}" if steps != args.steps else "")
    run_dir = os.path.join(args.runs_dir, name)
    if finished(run_dir, steps):
        return run_dir
    shutil.rmtree(run_dir, ignore_errors=True)  # a half-done run starts over (same seeds, same result)
    spec = TASKS[task]
    cmd = [script, "--dataset", spec["train"], "--eval-dataset", spec["val"], "--eval-limit", str(spec["val_limit"]),
           "--num-steps", str(steps), "--eval-every", str(args.eval_every), "--learning-rate", f"{lr:g}",
           "--seed", str(seed), "--output-dir", run_dir, "--save-every", str(steps), "--log-samples-every", "0",
           *flags[task]]
    if key.startswith("semi_s"):
        cmd += ["--sync-interval", key.removeprefix("semi_s")]
    if pairs:
        cmd += ["--pairs", pairs]
    run(cmd, name, args.jobs)
    return run_dir


def val_score(task: str, metrics: list[dict]) -> tuple[float, int]:
    """(validation score, step): math -> the final step's accuracy; chat -> the best step by length-
    normalised reward (the paper's checkpoint choice), among the steps evaluated during training."""
    evals = [(m[TASKS[task]["metric"]], m["step"]) for m in metrics if TASKS[task]["metric"] in m and m["step"] > 0]
    return evals[-1] if task == "math" else max(evals)


def evaluate(args: Args, task: str, model: str, out: str, seed: int) -> dict:
    if not os.path.exists(out):
        run(["evaluate.py", "--model", model, "--samples", str(args.final_samples), "--seed", str(seed),
             "--output", out, *TASKS[task]["test"], *(["--baseline", "embedded/policy"] if task == "chat" else [])],
            f"eval {out}", args.jobs)
    return json.load(open(out))


def mean_se(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs)) if len(xs) > 1 else float("nan"))


def main(args: Args) -> None:
    os.makedirs(args.out_dir, exist_ok=True)
    os.makedirs(args.runs_dir, exist_ok=True)
    t_study = time.time()
    results = {"args": vars(args), "seed": {}, "runs": {}}
    # Runs are independent processes: `--jobs` of them at once, each on its share of the cores (a
    # tiny model's step is mostly single-threaded Python and scheduling, so two at once nearly
    # double the throughput on 2 cores). Every run is seeded, so the order they finish in changes
    # nothing.
    pool = ThreadPoolExecutor(args.jobs)

    def each(fn, items: list[tuple]) -> list:
        return list(pool.map(lambda item: fn(*item), items))

    # the seed model, evaluated with each sampling seed
    seed_evals = [(seed, task) for seed in args.seeds for task in TASKS]
    evals = each(lambda seed, task: evaluate(args, task, "embedded/policy",
                                             os.path.join(args.runs_dir, f"seed_{task}_{seed}.json"), seed), seed_evals)
    for (seed, task), e in zip(seed_evals, evals, strict=True):
        results["seed"].setdefault(seed, {})[task] = e
    pairs = [(task, regime) for task in TASKS for regime in regimes(args)]
    # ---- the learning rate of each regime and task, on the validation split with the first seed
    grid_runs = [(task, regime, lr) for task, regime in pairs for lr in args.lr_grid]
    grid_dirs = each(lambda task, regime, lr: train(args, task, regime, lr, args.seeds[0]), grid_runs)
    grids: dict[tuple, dict[float, float]] = {}
    for (task, regime, lr), run_dir in zip(grid_runs, grid_dirs, strict=True):
        grids.setdefault((task, regime[0]), {})[lr] = val_score(task, metrics_of(run_dir))[0]
    best = {k: max(g, key=g.get) for k, g in grids.items()}
    # ---- every seed at that learning rate
    seed_runs = [(task, regime, seed) for task, regime in pairs for seed in args.seeds]
    seed_dirs = each(lambda task, regime, seed: train(args, task, regime, best[task, regime[0]], seed), seed_runs)
    # ---- the checkpoint the paper's way (chat: retrain to the chosen step; the runs replay exactly)
    def checkpoint(task, regime, seed, run_dir):
        score, step = val_score(task, metrics_of(run_dir))
        ckpt_dir = run_dir
        if step != args.steps:
            pairs_file = os.path.join(run_dir, "pairs.jsonl") if regime[0] == "offline_dpo" else ""
            ckpt_dir = train(args, task, regime, best[task, regime[0]], seed, steps=step, pairs=pairs_file)
        return score, step, ckpt_dir

    ckpts = each(checkpoint, [(*x, d) for x, d in zip(seed_runs, seed_dirs, strict=True)])
    # ---- the test evaluation
    finals = each(lambda task, seed, ckpt_dir: evaluate(args, task, os.path.join(ckpt_dir, "checkpoint"),
                                                        os.path.join(ckpt_dir, "test_eval.json"), seed),
                  [(task, seed, c[2]) for (task, _, seed), c in zip(seed_runs, ckpts, strict=True)])
    for (task, regime, seed), run_dir, (score, step, _), final in zip(seed_runs, seed_dirs, ckpts, finals, strict=True):
        key = regime[0]
        r = results["runs"].setdefault(f"{task}/{key}", {"task": task, "key": key, "label": regime[1],
                                                         "lr": best[task, key], "grid": grids[task, key], "seeds": {}})
        r["seeds"][seed] = {"val": score, "step": step, "test": final, "metrics": metrics_of(run_dir)}
    pool.shutdown()
    results["wall_min"] = (time.time() - t_study) / 60
    with open(os.path.join(args.out_dir, "results.json"), "w") as f:
        slim = {k: {**v, "seeds": {s: {kk: vv for kk, vv in x.items() if kk != "metrics"} for s, x in v["seeds"].items()}}
                for k, v in results["runs"].items()}
        json.dump({**results, "runs": slim}, f, indent=2)
    write_table(args, results)
    plot(args, results)
    print(f"study: done in {results['wall_min']:.0f} min -> {args.out_dir}/results.md")


def test_numbers(task: str, final: dict) -> dict[str, float]:
    if task == "math":
        m = final["math"][f"{DATA}/math_test.jsonl"]
        return {"accuracy": m["accuracy"], "greedy": m["greedy_accuracy"]}
    c = final["chat"]
    return {"reward": c["reward_mean"], "length": c["length_mean"], "reward_per_token": c["reward_per_token"],
            "win_rate": c.get("win_rate", 0.5)}


def write_table(args: Args, results: dict) -> None:
    cols = {"math": ["accuracy", "greedy"], "chat": ["reward", "length", "reward_per_token", "win_rate"]}
    head = {"math": "| regime | lr | test accuracy | test greedy accuracy | checkpoint |",
            "chat": "| regime | lr | test RM reward | length | reward / length | win rate vs seed | checkpoint (step) |"}
    out = [f"Embedded default: {args.steps} steps of 8 prompts per run, the same prompts for every regime; the "
           f"paper's β / Adam ε / clip / reference per task; learning rate picked per regime from {list(args.lr_grid)} on "
           f"the validation split (seed {args.seeds[0]}); mean ± standard error over seeds {list(args.seeds)}. Test: math 300 "
           f"problems x {args.final_samples} samples (T = 0.6, top-p 0.9) and greedy; chat 200 prompts x {args.final_samples} "
           f"samples scored by the embedded reward model, win rate against the seed's samples (ties half). Chat "
           f"checkpoints: the step with the best validation reward / length. Wall time {results['wall_min']:.0f} min "
           f"on {os.cpu_count()} CPU cores, {args.jobs} runs at once.\n"]
    for task in TASKS:
        out += [f"\n**{task}**\n", head[task], "|" + "---|" * (head[task].count("|") - 1)]
        seed_vals = [test_numbers(task, results["seed"][s][task]) for s in args.seeds]
        cells = [f"{m:.3f} ± {se:.3f}" for m, se in (mean_se([v[c] for v in seed_vals]) for c in cols[task])]
        out.append(f"| seed | - | {' | '.join(cells)} | - |")
        for key, label, *_ in regimes(args):
            r = results["runs"].get(f"{task}/{key}")
            if not r:
                continue
            vals = [test_numbers(task, x["test"]) for x in r["seeds"].values()]
            cells = [f"{m:.3f} ± {se:.3f}" for m, se in (mean_se([v[c] for v in vals]) for c in cols[task])]
            steps = ", ".join(str(x["step"]) for x in r["seeds"].values())
            out.append(f"| {label} | {r['lr']:g} | {' | '.join(cells)} | {'final' if task == 'math' else steps} |")
        out += ["", "Validation score per learning rate (seed 1): " + "; ".join(
            f"{results['runs'][f'{task}/{key}']['label']}: " + ", ".join(f"{lr:g} -> {v:.3f}" for lr, v in
                                                                         results["runs"][f"{task}/{key}"]["grid"].items())
            for key, *_ in regimes(args) if f"{task}/{key}" in results["runs"])]
    with open(os.path.join(args.out_dir, "results.md"), "w") as f:
        f.write("\n".join(out) + "\n")
    # the README's copy of the two tables, between its markers (generated: never edited by hand)
    readme = os.path.join(ROOT, "README.md")
    text = open(readme).read()
    begin, end = "<!-- study:begin -->\n", "<!-- study:end -->"
    if begin in text and end in text:
        block = "\n".join([out[0]] + [line for line in out[1:] if line.strip().startswith(("|", "**")) or not line]) + "\n"
        text = text[: text.index(begin) + len(begin)] + block + text[text.index(end):]
        with open(readme, "w") as f:
            f.write(text)


def plot(args: Args, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for task, spec in TASKS.items():
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        length_key = "rollout/length_mean"
        for i, (key, label, *_) in enumerate(regimes(args)):
            r = results["runs"].get(f"{task}/{key}")
            if not r:
                continue
            for ax, metric in zip(axes, [spec["metric"], "rollout/entropy", length_key], strict=True):
                per_step: dict[int, list[float]] = {}
                for x in r["seeds"].values():
                    for m in x["metrics"]:
                        if metric in m and m["step"] > 0 or (metric == spec["metric"] and metric in m):
                            per_step.setdefault(m["step"], []).append(m[metric])
                if per_step:
                    steps = sorted(per_step)
                    ax.plot(steps, [sum(per_step[s]) / len(per_step[s]) for s in steps], label=f"{label}, lr {r['lr']:g}",
                            color=f"C{i}", marker="o" if metric == spec["metric"] else None, markersize=3)
        for ax, title in zip(axes, [spec["label"], "rollout entropy (per token)", "rollout length (tokens)"], strict=True):
            ax.set_title(f"{task}: {title} (mean over seeds)")
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(args.out_dir, f"{task}.png"), dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    main(tyro.cli(Args))
