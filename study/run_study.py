"""The paper's experiment in miniature: the seed against offline DPO (s = ∞), semi-online DPO
(two values of s), online DPO (s = 1) and GRPO, on the embedded math task (Math-Verify) and on
the embedded instruction task (reward model), with equal budgets and the same seeds.

Every regime trains for `--steps` optimizer steps of 8 prompts (offline DPO: 8 pairs, built once
from the seed) with its script's default hyperparameters, evaluates on held-out prompts every
`--eval-every` steps, and its final checkpoint is evaluated with evaluate.py (math: 300 test
problems x 8 samples at T = 0.6 plus greedy; chat: 200 test prompts, reward-model score, length,
length-normalised score and win rate against the seed). Writes `study/results/results.md`
(table), `study/results/{math,chat}.png` (held-out metric, rollout entropy and response length
vs step per regime) and `study/results/results.json`. A finished run is not trained again, so an
interrupted study picks up where it stopped.

    .venv/bin/python study/run_study.py          # ~40 minutes on 2 CPU cores
"""

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Args:
    steps: int = 100
    """optimizer steps per regime (the same budget for all)"""
    eval_every: int = 20
    """held-out evaluation during training every N steps"""
    eval_limit: int = 100
    """held-out prompts per evaluation during training"""
    final_samples: int = 8
    """samples per prompt in the final evaluation"""
    seed: int = 1
    """the same seed for every run"""
    runs_dir: str = "runs/study"
    """where the runs go"""
    out_dir: str = "study/results"
    """where the table, plots and JSON go"""
    semi_intervals: tuple[int, int] = (20, 5)
    """the two sync intervals of semi-online DPO"""


TASKS = {
    "math": {"train": ["--dataset", "embedded/data/math_train.jsonl", "--eval-dataset", "embedded/data/math_test.jsonl"],
             "offline": [], "eval": ["--chat-dataset", ""], "metric": "eval/accuracy", "label": "held-out accuracy"},
    "chat": {"train": ["--dataset", "embedded/data/chat_train.jsonl", "--eval-dataset", "embedded/data/chat_test.jsonl"],
             "offline": ["--max-prompts", "800"], "eval": ["--math-datasets", ""],
             "metric": "eval/chat/reward_mean", "label": "held-out RM reward"},
}


def regimes(args: Args) -> list[tuple[str, str, str, list[str]]]:
    """(key, label, script, extra flags), offline to online."""
    s1, s2 = args.semi_intervals
    return [("offline_dpo", "offline DPO (s=∞)", "offline_dpo.py", []),
            (f"semi_s{s1}", f"semi-online DPO (s={s1})", "semi_online_dpo.py", ["--sync-interval", str(s1)]),
            (f"semi_s{s2}", f"semi-online DPO (s={s2})", "semi_online_dpo.py", ["--sync-interval", str(s2)]),
            ("online_dpo", "online DPO (s=1)", "online_dpo.py", []),
            ("grpo", "GRPO (s=1)", "grpo.py", [])]


def run(cmd: list[str], tag: str) -> float:
    """Run a script from the repo root, echoing its progress lines with `tag`; returns seconds."""
    t0 = time.time()
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, *cmd], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    tail = []
    for line in proc.stdout:
        tail = (tail + [line])[-30:]
        if line.startswith(("step ", "building pairs", "wrote ", "math ", "chat ", "done")):
            print(f"[{tag}] {line.rstrip()[:160]}", flush=True)
    if proc.wait() != 0:
        sys.exit(f"study: {' '.join(cmd)} failed:\n{''.join(tail)}")
    return time.time() - t0


def finished(run_dir: str, steps: int) -> bool:
    path = os.path.join(run_dir, "checkpoint", "step.json")
    return os.path.exists(path) and json.load(open(path))["step"] == steps


def main(args: Args) -> None:
    os.makedirs(args.out_dir, exist_ok=True)
    results = {"seed": {}, "runs": {}, "args": vars(args)}
    todo = [(task, *r) for task in TASKS for r in regimes(args)]
    t_study = time.time()

    # ---- the seed: one evaluation on both tasks
    seed_eval = os.path.join(args.runs_dir, "seed_eval.json")
    if not os.path.exists(seed_eval):
        run(["evaluate.py", "--model", "embedded/policy", "--samples", str(args.final_samples), "--seed", str(args.seed),
             "--output", seed_eval], "seed eval")
    results["seed"] = json.load(open(seed_eval))

    # ---- train and evaluate every regime on every task
    for i, (task, key, label, script, extra) in enumerate(todo, 1):
        tag = f"{i}/{len(todo)} {task} {key}"
        run_dir = os.path.join(args.runs_dir, f"{task}_{key}")
        train_s = None
        if not finished(run_dir, args.steps):
            shutil.rmtree(run_dir, ignore_errors=True)  # a half-done run starts over (same seeds)
            cmd = [script, "--num-steps", str(args.steps), "--eval-every", str(args.eval_every),
                   "--eval-limit", str(args.eval_limit), "--seed", str(args.seed), "--output-dir", run_dir,
                   "--save-every", str(args.steps), "--log-samples-every", "0", *TASKS[task]["train"], *extra]
            if script == "offline_dpo.py":
                cmd += TASKS[task]["offline"]
            train_s = run(cmd, tag)
        eval_path = os.path.join(run_dir, "final_eval.json")
        if not os.path.exists(eval_path):
            run(["evaluate.py", "--model", os.path.join(run_dir, "checkpoint"), "--samples", str(args.final_samples),
                 "--seed", str(args.seed), "--output", eval_path, *TASKS[task]["eval"]], tag + " eval")
        metrics = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
        results["runs"][f"{task}/{key}"] = {"task": task, "key": key, "label": label, "train_s": train_s,
                                            "final": json.load(open(eval_path)), "metrics": metrics}
        print(f"study: {tag} done ({(time.time() - t_study) / 60:.1f} min so far)", flush=True)

    with open(os.path.join(args.out_dir, "results.json"), "w") as f:
        json.dump({k: v for k, v in results.items() if k != "runs"} |
                  {"runs": {k: {**v, "metrics": None} for k, v in results["runs"].items()}}, f, indent=2)
    write_table(args, results)
    plot(args, results)
    print(f"study: done in {(time.time() - t_study) / 60:.1f} min -> {args.out_dir}/results.md")


def write_table(args: Args, results: dict) -> None:
    seed = results["seed"]
    math_key = "embedded/data/math_test.jsonl"
    lines = ["| regime | math accuracy | math greedy | chat RM reward | chat length | chat reward / length | chat win rate vs seed |",
             "|---|---|---|---|---|---|---|"]

    def row(label, m, c):
        acc = f"{m['accuracy']:.3f} ± {m['accuracy_se']:.3f}" if m else "-"
        greedy = f"{m['greedy_accuracy']:.3f}" if m else "-"
        if c:
            chat = (f"{c['reward_mean']:.3f} ± {c['reward_se']:.3f} | {c['length_mean']:.1f} | "
                    f"{c['reward_per_token']:.3f} | {c.get('win_rate', float('nan')):.3f}")
        else:
            chat = "- | - | - | -"
        return f"| {label} | {acc} | {greedy} | {chat} |"

    lines.append(row("seed", seed["math"].get(math_key), seed["chat"]))
    for key, label, *_ in regimes(args):
        m = results["runs"].get(f"math/{key}", {}).get("final", {}).get("math", {}).get(math_key)
        c = results["runs"].get(f"chat/{key}", {}).get("final", {}).get("chat")
        lines.append(row(label, m, c))
    a = args
    header = (f"Embedded default, {a.steps} steps of 8 prompts per regime (offline DPO: 8 pairs), seed {a.seed}, "
              f"each script's default hyperparameters. Final evaluation: math 300 test problems x "
              f"{a.final_samples} samples (T = 0.6, top-p 0.9) with standard errors, and greedy; chat 200 test "
              f"prompts x {a.final_samples} samples, scored by the embedded reward model; win rate against the "
              f"seed's samples (ties count half).\n")
    times = ["", "| run | training wall time (s) |", "|---|---|"]
    for k, v in results["runs"].items():
        if v["train_s"] is not None:
            times.append(f"| {k} | {v['train_s']:.0f} |")
    with open(os.path.join(args.out_dir, "results.md"), "w") as f:
        f.write(header + "\n" + "\n".join(lines) + "\n" + "\n".join(times) + "\n")


def plot(args: Args, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for task, spec in TASKS.items():
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        length_key = "rollout/length_mean" if task == "math" else "rollout/chat/length_mean"
        for key, label, *_ in regimes(args):
            run = results["runs"].get(f"{task}/{key}")
            if not run:
                continue
            for ax, metric in zip(axes, [spec["metric"], "rollout/entropy", length_key], strict=True):
                pts = [(m["step"], m[metric]) for m in run["metrics"] if metric in m]
                if len(pts) == 1:  # offline DPO's one-time generation: a constant over the run
                    ax.axhline(pts[0][1], linestyle="--", color=f"C{[r[0] for r in regimes(args)].index(key)}",
                               label=label)
                elif pts:
                    ax.plot(*zip(*pts, strict=True), marker="o" if metric.startswith("eval") else None,
                            markersize=3, label=label, color=f"C{[r[0] for r in regimes(args)].index(key)}")
        for ax, title in zip(axes, [spec["label"], "rollout entropy (policy, per token)", "response length (tokens)"], strict=True):
            ax.set_title(f"{task}: {title}")
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(args.out_dir, f"{task}.png"), dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    main(tyro.cli(Args))
