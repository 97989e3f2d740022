"""The paper's experiment and findings in miniature, like for like, on the embedded math task
(Math-Verify) and instruction task (a length-biased reward model), on a laptop's CPU.

What it runs (one phase per finding of the paper, arXiv 2506.21495; docs/study.md):
- F1: the seed against offline DPO (s = ∞), semi-online DPO (two values of s), online DPO (s = 1)
  and GRPO, on each task; F2 reads the same runs against their number of syncs and wall time;
- F3: online DPO on math and chat prompts mixed in one batch (V+NV), against each task alone,
  every arm evaluated on both tasks;
- F4: rollout entropy and length in every regime, and math online DPO without reference re-sync;
- F5: an NLL term on the chosen answer (online and semi-online DPO);
- A1-A5, the paper's ablations: GroupDPO (and + 0.01 GRPO), an entropy bonus at two of the
  paper's values, GRPO group sizes 4 / 8 / 12, length-normalised GRPO, DPO's Adam ε 1e-8 vs 1e-4.

Like for like, as in the paper (its settings in docs/paper.md):
- every run sees the same prompts in the same order: offline DPO samples, from the seed, the
  rollouts of exactly the steps the others train on (it is s = ∞ of the same run);
- the paper's β / Adam ε / clip / reference per task (math DPO β 0.1, ε 1e-4, clip 0.1, reference
  re-synced with the generator, offline: fixed; chat DPO β 0.01, ε 1e-8, clip 0.1, fixed; the
  V+NV run β 0.01, ε 1e-8, fixed; GRPO KL 0.001, ε 1e-8, clip 0.1);
- the learning rate (the paper's 1e-6 is for an 8B model) picked per regime and task from one
  grid on the validation split with the first seed; a pick at the grid's edge widens the grid
  that way (x3, up to twice), so no pick sits at an edge it could not see past. An ablation arm
  uses its regime's pick (the paper changed one thing at a time);
- test figures are means over `--seeds` with the standard error across seeds. Math: the final
  checkpoint, 300 test problems x `--final-samples` at T = 0.6. Chat: the step with the best
  length-normalised RM reward on the validation split (the paper's choice, kept by the run in
  best-chat/), 200 test prompts x `--final-samples`, scored by the reward model and by the task's
  true quality (edit similarity to the ideal answer: the part the paper's GPT-4 judges play; the
  RM is length-biased on purpose).

The verdict of every row (`VERDICT_RULE`, also above the table in findings.md): d = mean(A) -
mean(B), SE(d) = sqrt(SE(A)^2 + SE(B)^2); the runs show A > B when d > 2 SE(d), A < B when
d < -2 SE(d), else no separable difference. A claim "A > B" is reproduced by A > B, not
reproduced by A < B, not separable otherwise; "A ≈ B" is reproduced by no separable difference
and not reproduced otherwise; "A ≥ B" is reproduced unless the runs show A < B.

Writes `study/results/findings.md` (and the README's copy between its markers), `results.md` (the
F1 tables), `results.json`, and plots: `math.png` / `chat.png` (validation, entropy, length per
regime), `f2_sync.png`, `f3_mixed.png`, `f4_entropy.png`. A finished run or evaluation is not
redone, so an interrupted study continues where it stopped.

    .venv/bin/python study/run_study.py                         # ~2 h on 2 CPU cores
    .venv/bin/python study/run_study.py --phases F1 F5 --steps 20   # a quick subset
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
sys.path.insert(0, ROOT)
from embedded.tiny import chat_quality  # noqa: E402  (the chat task's true quality)

DATA = "embedded/data"
PHASES = ("F1", "F2", "F3", "F4", "F5", "A1", "A2", "A3", "A4", "A5")


@dataclass
class Args:
    steps: int = 40
    """optimizer steps per run (8 prompts each: the same budget and prompts for every run)"""
    eval_every: int = 10
    """validation evaluation during training every N steps (the candidate chat checkpoints)"""
    lr_grid: tuple[float, ...] = (2e-5, 6e-5, 2e-4)
    """learning rates tried for every regime and task (first seed), picked on the validation split;
    a pick at an edge widens the grid that way, x3, up to twice"""
    seeds: tuple[int, ...] = (1, 2, 3)
    """seeds of every compared arm (the first also picks the learning rates)"""
    semi_intervals: tuple[int, int] = (20, 5)
    """the two sync intervals of semi-online DPO (the second is the "moderate" one of F2 / F5)"""
    final_samples: int = 4
    """samples per test prompt in the final evaluation"""
    phases: tuple[str, ...] = PHASES
    """the findings to run (F1..F5, A1..A5); the runs a phase needs from another are run too"""
    jobs: int = 2
    """runs at once, each on cores / jobs threads"""
    runs_dir: str = "runs/study"
    """where the runs go"""
    out_dir: str = "study/results"
    """where the tables, plots and JSON go"""


VERDICT_RULE = (
    "d = mean(A) - mean(B) over seeds, SE(d) = sqrt(SE(A)² + SE(B)²) with each SE the standard "
    "error across seeds. The runs show **A > B** when d > 2 SE(d), **A < B** when d < -2 SE(d), "
    "else **no separable difference**. A claim \"A > B\" is *reproduced* by A > B, *not "
    "reproduced* by A < B, *not separable* otherwise; \"A ≈ B\" is *reproduced* by no separable "
    "difference, *not reproduced* otherwise; \"A ≥ B\" is *reproduced* unless the runs show A < B. "
    "Entropy rows compare a run's first and last fifth of steps (B: the first fifth).")

CLIP = {"--max-grad-norm": "0.1"}
PAPER = {  # the paper's settings per algorithm and training data
    "dpo": {"math": {"--beta": "0.1", "--adam-eps": "1e-4", **CLIP},
            "chat": {"--beta": "0.01", "--adam-eps": "1e-8", **CLIP},
            "mix": {"--beta": "0.01", "--adam-eps": "1e-8", **CLIP}},  # the V+NV run (fixed reference: auto)
    "grpo": {task: {"--kl-coef": "0.001", "--adam-eps": "1e-8", **CLIP} for task in ("math", "chat")},
}
TASKS = {  # training data, validation data (and its size per task), the validation metric
    "math": (f"{DATA}/math_train.jsonl", f"{DATA}/math_val.jsonl", 100, "eval/accuracy"),
    "chat": (f"{DATA}/chat_train.jsonl", f"{DATA}/chat_val.jsonl", 100, "eval/chat/reward_per_token"),
    "mix": (f"{DATA}/mix_train.jsonl", f"{DATA}/math_val.jsonl,{DATA}/chat_val.jsonl", 100, ""),
}


@dataclass(frozen=True)
class Arm:
    """One configuration trained with every seed: a regime (its own learning-rate grid) or a
    variant of one (`lr_of`: the regime and task whose picked learning rate it uses)."""
    key: str
    label: str
    script: str
    task: str  # training data: math, chat or mix
    flags: tuple[tuple[str, str], ...] = ()  # on top of (replacing) the paper's
    lr_of: tuple[str, str] | None = None

    def command(self, lr: float) -> list[str]:
        train, val, limit, _ = TASKS[self.task]
        flags = PAPER["grpo" if self.script == "grpo.py" else "dpo"][self.task] | dict(self.flags)
        return [self.script, "--dataset", train, "--eval-dataset", val, "--eval-limit", str(limit),
                "--learning-rate", f"{lr:g}", *(x for kv in flags.items() for x in kv if x)]  # "": a switch


def arms(args: Args) -> dict[str, Arm]:
    """Every arm of every phase, by id `task/key`."""
    s1, s2 = args.semi_intervals
    out = {}
    for task in ("math", "chat"):
        for key, label, script, flags in (
                ("offline_dpo", "offline DPO (s=∞)", "offline_dpo.py", ()),
                (f"semi_s{s1}", f"semi-online DPO (s={s1})", "semi_online_dpo.py", (("--sync-interval", str(s1)),)),
                (f"semi_s{s2}", f"semi-online DPO (s={s2})", "semi_online_dpo.py", (("--sync-interval", str(s2)),)),
                ("online_dpo", "online DPO (s=1)", "online_dpo.py", ()),
                ("grpo", "GRPO (s=1)", "grpo.py", ())):
            out[f"{task}/{key}"] = Arm(key, label, script, task, flags)

    def variant(base: str, key: str, label: str, *flags: tuple[str, str], task: str = "math",
                lr_task: str = "math") -> None:
        b = out[f"{lr_task}/{base}"]
        out[f"{task}/{key}"] = Arm(key, label, b.script, task, b.flags + flags, (base, lr_task))

    variant("online_dpo", "mix_at_math_lr", "online DPO, math + chat (math's lr)", task="mix")
    variant("online_dpo", "mix_at_chat_lr", "online DPO, math + chat (chat's lr)", task="mix", lr_task="chat")
    variant("online_dpo", "online_dpo_no_ref_sync", "online DPO, fixed reference", ("--ref-sync", "no"))
    variant("online_dpo", "online_dpo_nll", "online DPO + NLL", ("--nll-scale", "1"))
    variant(f"semi_s{s2}", f"semi_s{s2}_nll", f"semi-online DPO (s={s2}) + NLL", ("--nll-scale", "1"))
    variant("online_dpo", "group_dpo", "online GroupDPO", ("--group-dpo", ""))
    variant("online_dpo", "group_dpo_grpo", "online GroupDPO + 0.01 GRPO", ("--group-dpo", ""),
            ("--grpo-coef", "0.01"))
    for c in ("1e-4", "5e-4"):
        variant("online_dpo", f"online_dpo_entropy{c}", f"online DPO + entropy bonus {c}", ("--entropy-coef", c))
    for n in (4, 12):
        variant("grpo", f"grpo_n{n}", f"GRPO, group of {n}", ("--samples-per-prompt", str(n)))
    variant("grpo", "grpo_seqnorm", "GRPO, length-normalised", ("--length-norm", "sequence"))
    variant("online_dpo", "online_dpo_eps1e-8", "online DPO, Adam ε 1e-8", ("--adam-eps", "1e-8"))
    return out


@dataclass(frozen=True)
class Row:
    finding: str
    claim: str  # the paper's, in words
    a: str  # arm id, or "seed"
    b: str  # arm id, "seed", or "" for an entropy row (the same run's first fifth)
    measure: str  # accuracy | quality | entropy | length
    relation: str  # ">", "≈" or "≥": the paper's claim about A against B


def rows(args: Args) -> list[Row]:
    s1, s2 = args.semi_intervals
    strong = "semi-online and online DPO strongly beat offline DPO"
    close = "semi-online DPO with a moderate s is close to online DPO, with 1/s of its syncs"
    joint = "training on math and chat jointly (one batch) does about as well or better than each alone"
    coll = "the rollouts' entropy collapses in every online regime on math"
    out = [Row("F1", "offline DPO beats the seed", "math/offline_dpo", "seed", "accuracy", ">"),
           Row("F1", "offline DPO beats the seed", "chat/offline_dpo", "seed", "quality", ">")]
    for task, measure in (("math", "accuracy"), ("chat", "quality")):
        for key in ("online_dpo", f"semi_s{s2}", f"semi_s{s1}"):
            out.append(Row("F1", strong, f"{task}/{key}", f"{task}/offline_dpo", measure, ">"))
    for task, measure in (("math", "accuracy"), ("chat", "quality")):
        for key in (f"semi_s{s2}", f"semi_s{s1}"):
            out.append(Row("F2", close, f"{task}/{key}", f"{task}/online_dpo", measure, "≈"))
    out += [Row("F3", joint, "mix/mix_at_math_lr", "math/online_dpo", "accuracy", "≥"),
            Row("F3", joint, "mix/mix_at_chat_lr", "chat/online_dpo", "quality", "≥"),
            Row("F3", "joint training learns the task a single-task run never sees", "mix/mix_at_math_lr",
                "chat/online_dpo", "accuracy", ">"),
            Row("F3", "joint training learns the task a single-task run never sees", "mix/mix_at_chat_lr",
                "math/online_dpo", "quality", ">")]
    for key in ("online_dpo", f"semi_s{s2}", f"semi_s{s1}", "grpo"):
        out.append(Row("F4", coll, f"math/{key}", "", "entropy", "<"))
    out += [Row("F4", "... but not offline (its rollouts are the seed's)", "math/offline_dpo", "", "entropy", "≈"),
            Row("F4", "without reference re-sync math DPO collapses to short answers", "math/online_dpo",
                "math/online_dpo_no_ref_sync", "length", ">"),
            Row("F4", "re-syncing the reference keeps math DPO stable", "math/online_dpo",
                "math/online_dpo_no_ref_sync", "accuracy", ">"),
            Row("F5", "an NLL term on the chosen answer does not help", "math/online_dpo",
                "math/online_dpo_nll", "accuracy", "≥"),
            Row("F5", "an NLL term on the chosen answer does not help", f"math/semi_s{s2}",
                f"math/semi_s{s2}_nll", "accuracy", "≥"),
            Row("A1", "GroupDPO changes little against one random pair", "math/group_dpo",
                "math/online_dpo", "accuracy", "≈"),
            Row("A1", "GroupDPO + 0.01 GRPO changes little against one random pair", "math/group_dpo_grpo",
                "math/online_dpo", "accuracy", "≈"),
            Row("A2", "an entropy bonus does not stop the collapse", "math/online_dpo_entropy1e-4", "",
                "entropy", "<"),
            Row("A2", "an entropy bonus does not stop the collapse", "math/online_dpo_entropy5e-4", "",
                "entropy", "<"),
            Row("A3", "GRPO: a group of 8 beats 4", "math/grpo", "math/grpo_n4", "accuracy", ">"),
            Row("A3", "GRPO: a group of 12 adds nothing over 8", "math/grpo_n12", "math/grpo", "accuracy", "≈"),
            Row("A4", "length-normalised GRPO is worse (less stable)", "math/grpo", "math/grpo_seqnorm",
                "accuracy", ">"),
            Row("A5", "Adam ε 1e-4 stops DPO's sudden divergence on math", "math/online_dpo",
                "math/online_dpo_eps1e-8", "accuracy", ">")]
    return [r for r in out if r.finding in args.phases]


# ---------------------------------------------------------------------------------------------
# running and reading runs
# ---------------------------------------------------------------------------------------------
def run(cmd: list[str], tag: str, jobs: int) -> None:
    """Run a script from the repo root on its share of the cores, echoing its progress lines with `tag`."""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // jobs)))
    proc = subprocess.Popen([sys.executable, *cmd], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    tail = []
    for line in proc.stdout:
        tail = (tail + [line])[-30:]
        if line.startswith(("wrote ", "math ", "chat ", "done")) or line.startswith("step ") and "eval" in line:
            print(f"[{tag}] {line.rstrip()[:150]}", flush=True)
    if proc.wait() != 0:
        sys.exit(f"study: {' '.join(cmd)} failed:\n{''.join(tail)}")


def finished(run_dir: str, steps: int) -> bool:
    path = os.path.join(run_dir, "checkpoint", "step.json")
    return os.path.exists(path) and json.load(open(path))["step"] == steps


def metrics_of(run_dir: str) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def train(args: Args, arm: Arm, lr: float, seed: int) -> str:
    """One training run, unless already finished; returns its folder."""
    run_dir = os.path.join(args.runs_dir, f"{arm.task}_{arm.key}_lr{lr:g}_seed{seed}")
    if not finished(run_dir, args.steps):
        shutil.rmtree(run_dir, ignore_errors=True)  # a half-done run starts over (same seeds, same result)
        run([*arm.command(lr), "--num-steps", str(args.steps), "--eval-every", str(args.eval_every),
             "--seed", str(seed), "--output-dir", run_dir, "--save-every", str(args.steps),
             "--log-samples-every", "0"], os.path.basename(run_dir), args.jobs)
    return run_dir


def tested_checkpoint(run_dir: str, what: str) -> tuple[str, int]:
    """(folder, step) of the checkpoint a task's test evaluates. Chat: the paper's, the evaluated step
    with the best validation reward / length, which the run kept in best-chat/ (a run never
    evaluated on chat: its final step); math: the final checkpoint."""
    best = os.path.join(run_dir, "best-chat")
    if what == "chat" and os.path.isdir(best):
        return best, json.load(open(os.path.join(best, "best.json")))["step"]
    return os.path.join(run_dir, "checkpoint"), json.load(open(os.path.join(run_dir, "checkpoint", "step.json")))["step"]


def test_eval(args: Args, what: str, model: str, out: str, seed: int) -> dict[str, float]:
    """The test figures of one checkpoint on one task (evaluate.py, not redone once written)."""
    if not os.path.exists(out):
        skip = ["--chat-dataset", ""] if what == "math" else ["--math-datasets", "", "--save-samples"]
        run(["evaluate.py", "--model", model, "--samples", str(args.final_samples), "--seed", str(seed),
             "--output", out, *skip], f"eval {out}", args.jobs)
    r = json.load(open(out))
    if what == "math":
        m = r["math"][f"{DATA}/math_test.jsonl"]
        return {"accuracy": m["accuracy"], "greedy": m["greedy_accuracy"]}
    c = r["chat"]
    quality = [chat_quality(x["prompt"], t) for x in c["responses"] for t in x["responses"]]
    return {"quality": sum(quality) / len(quality), "reward": c["reward_mean"], "test_length": c["length_mean"],
            "reward_per_token": c["reward_per_token"], "win_rate": c["win_rate"]}


def curve_figures(metrics: list[dict]) -> dict[str, float]:
    """Rollout entropy and length over the first and the last fifth of a run's steps."""
    steps = [m for m in metrics if m["step"] > 0 and "rollout/entropy" in m]
    k = max(1, len(steps) // 5)

    def mean(ms, key):
        return sum(m[key] for m in ms) / len(ms)

    return {"entropy_first": mean(steps[:k], "rollout/entropy"), "entropy": mean(steps[-k:], "rollout/entropy"),
            "length": mean(steps[-k:], "rollout/length_mean"),
            "syncs": sum(m.get("perf/sync_s", 0) > 0 for m in steps),
            "wall_s": sum(m["perf/step_s"] for m in steps)}


def mean_se(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs)) if len(xs) > 1 else float("nan"))


def verdict(a: list[float], b: list[float], relation: str) -> tuple[float, float, str, str]:
    """(d, SE(d), what the runs show, the verdict) by VERDICT_RULE. An entropy row passes the
    same run's first fifth as `b` and relation "<": the last fifth below the first."""
    (ma, sa), (mb, sb) = mean_se(a), mean_se(b)
    d, se = ma - mb, math.sqrt(sa**2 + sb**2)
    shown = ">" if d > 2 * se else "<" if d < -2 * se else "≈"
    if relation == "≈":
        return d, se, shown, "reproduced" if shown == "≈" else "not reproduced"
    if relation == "≥":
        return d, se, shown, "not reproduced" if shown == "<" else "reproduced"
    opposite = {">": "<", "<": ">"}[relation]
    return d, se, shown, {relation: "reproduced", opposite: "not reproduced"}.get(shown, "not separable")


# ---------------------------------------------------------------------------------------------
# the study
# ---------------------------------------------------------------------------------------------
def main(args: Args) -> None:
    os.makedirs(args.out_dir, exist_ok=True)
    os.makedirs(args.runs_dir, exist_ok=True)
    # the study's wall time counts from its first run's start (each run claims its folder with a
    # .lock at start-up), so a study resumed after an interruption reports the whole of it
    locks = [os.path.join(args.runs_dir, d, ".lock") for d in os.listdir(args.runs_dir)]
    t_study = min([os.path.getmtime(p) for p in locks if os.path.exists(p)] + [time.time()])
    # Runs are independent processes: `--jobs` of them at once, each on its share of the cores (a
    # tiny model's step is mostly single-threaded Python and scheduling, so two at once nearly
    # double the throughput on 2 cores). Every run is seeded: the order they finish in changes nothing.
    pool = ThreadPoolExecutor(args.jobs)

    def each(fn, items: list) -> list:
        return list(pool.map(lambda item: fn(*item), items))

    all_arms, table = arms(args), rows(args)
    if "F1" in args.phases or "F2" in args.phases:  # the F1 tables show every regime on both tasks
        table_arms = [i for i, a in all_arms.items() if a.lr_of is None]
    else:
        table_arms = []
    needed = sorted({i for r in table for i in (r.a, r.b) if i not in ("", "seed")} | set(table_arms))
    # each arm's tests: math accuracy from the final checkpoint, chat quality from the paper's pick
    tests = {(i, "math" if r.measure == "accuracy" else "chat") for r in table for i in (r.a, r.b)
             if r.measure in ("accuracy", "quality") and i not in ("", "seed")}
    tests |= {(i, all_arms[i].task) for i in table_arms}

    # ---- the learning rate of each regime and task, on the validation split with the first seed
    def grid_of(i: str) -> str:  # the regime whose grid picks arm i's learning rate
        return i if all_arms[i].lr_of is None else "{1}/{0}".format(*all_arms[i].lr_of)

    regimes = sorted({grid_of(i) for i in needed})
    grids: dict[str, dict[float, float]] = {i: {} for i in regimes}
    todo = {i: list(args.lr_grid) for i in regimes}
    for _ in range(3):  # the grid, then up to two widenings at an edge
        runs = [(i, lr) for i in regimes for lr in todo[i]]
        for (i, lr), run_dir in zip(runs, each(lambda i, lr: train(args, all_arms[i], lr, args.seeds[0]), runs), strict=True):
            metrics = metrics_of(run_dir)
            key = TASKS[all_arms[i].task][3]
            grids[i][lr] = max(m[key] for m in metrics if key in m and m["step"] > 0) if i.startswith("chat") \
                else [m[key] for m in metrics if key in m][-1]
        todo = {}
        for i, g in grids.items():
            lrs, best = sorted(g), max(g, key=g.get)
            todo[i] = [] if len(lrs) < 2 else [best / 3] if best == lrs[0] else [best * 3] if best == lrs[-1] else []
        if not any(todo.values()):
            break
    lr = {i: max(g, key=g.get) for i, g in grids.items()}
    lr_of = {i: lr[grid_of(i)] for i in needed}

    # ---- every seed of every arm (deduplicated: two arms can be the same run)
    jobs = sorted({(i, s) for i in needed for s in args.seeds}, key=lambda x: (x[1], x[0]))
    dirs = dict(zip(jobs, each(lambda i, s: train(args, all_arms[i], lr_of[i], s), jobs), strict=True))

    # ---- the test evaluations (chat: the best validation checkpoint the run kept)
    def test(i: str, what: str, seed: int) -> dict:
        ckpt, step = tested_checkpoint(dirs[i, seed], what)
        out = os.path.join(dirs[i, seed], f"test_{what}_step{step}.json")
        return test_eval(args, what, ckpt, out, seed) | {"step": step}

    test_jobs = sorted((i, what, s) for i, what in tests for s in args.seeds)
    seed_jobs = [(what, s) for what in ("math", "chat") for s in args.seeds]
    seed_tests = each(lambda what, s: test_eval(args, what, "embedded/policy",
                                                os.path.join(args.runs_dir, f"seed_test_{what}_{s}.json"), s), seed_jobs)
    results = {"seed": {f"{what}/{s}": r for (what, s), r in zip(seed_jobs, seed_tests, strict=True)},
               "tests": {f"{i}|{what}|{s}": r for (i, what, s), r in zip(test_jobs, each(test, test_jobs), strict=True)},
               "curves": {f"{i}|{s}": curve_figures(metrics_of(d)) for (i, s), d in dirs.items()},
               "lr": lr_of, "grids": {i: {f"{k:g}": v for k, v in g.items()} for i, g in grids.items()}}
    pool.shutdown()
    results["wall_min"] = (time.time() - t_study) / 60
    results["rows"] = [row_result(args, r, all_arms, results) for r in table]
    with open(os.path.join(args.out_dir, "results.json"), "w") as f:
        json.dump({"args": vars(args), **results}, f, indent=1)
    write_findings(args, results, all_arms)
    if table_arms:
        write_table(args, results, all_arms)
    plot(args, results, all_arms, dirs)
    print(f"study: done in {results['wall_min']:.0f} min -> {args.out_dir}/findings.md")


def per_seed(args: Args, arm_id: str, measure: str, results: dict) -> list[float]:
    """An arm's figure for each seed: a test figure, or a rollout figure of its training run."""
    if measure in ("entropy", "entropy_first", "length", "syncs", "wall_s"):
        return [results["curves"][f"{arm_id}|{s}"][measure] for s in args.seeds]
    what = "math" if measure in ("accuracy", "greedy") else "chat"
    if arm_id == "seed":
        return [results["seed"][f"{what}/{s}"][measure] for s in args.seeds]
    return [results["tests"][f"{arm_id}|{what}|{s}"][measure] for s in args.seeds]


def row_result(args: Args, r: Row, all_arms: dict, results: dict) -> dict:
    a = per_seed(args, r.a, r.measure, results)
    b = per_seed(args, r.a, "entropy_first", results) if r.b == "" else per_seed(args, r.b, r.measure, results)
    d, se, shown, v = verdict(a, b, r.relation)
    label = lambda i: "seed" if i == "seed" else all_arms[i].label + ("" if all_arms[i].task != "chat" else " [chat]")
    return {"finding": r.finding, "claim": r.claim, "measure": r.measure, "relation": r.relation,
            "a": label(r.a), "b": "its first fifth" if r.b == "" else label(r.b), "a_mean_se": mean_se(a),
            "b_mean_se": mean_se(b), "d": d, "se_d": se, "shown": shown, "verdict": v}


MEASURES = {"accuracy": "math test accuracy", "quality": "chat test true quality",
            "entropy": "math rollout entropy (nats/token), last fifth", "length": "math rollout length (tokens), last fifth"}


def write_findings(args: Args, results: dict, all_arms: dict) -> None:
    s1, s2 = args.semi_intervals
    out = [f"The paper's findings in miniature: {args.steps} steps of 8 prompts per run, seeds {list(args.seeds)} per "
           f"arm, each regime's learning rate picked on the validation split (seed {args.seeds[0]}); test: math 300 "
           f"problems x {args.final_samples} samples at T = 0.6 (final checkpoint), chat 200 prompts x "
           f"{args.final_samples} samples scored by their true quality (checkpoint: best validation RM reward / length). "
           f"Wall time {results['wall_min']:.0f} min (from the first run's start, resumes included) on "
           f"{os.cpu_count()} CPU cores, {args.jobs} runs at once. "
           f"Generated by `study/run_study.py`.\n", f"**Verdict rule.** {VERDICT_RULE}\n",
           "| # | the paper says | measure | A | B | A (mean ± SE) | B (mean ± SE) | d ± SE(d) | runs show | verdict |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for x in results["rows"]:
        (ma, sa), (mb, sb) = x["a_mean_se"], x["b_mean_se"]
        out.append(f"| {x['finding']} | {x['claim']} (A {x['relation']} B) | {MEASURES[x['measure']]} | {x['a']} | "
                   f"{x['b']} | {ma:.3f} ± {sa:.3f} | {mb:.3f} ± {sb:.3f} | {x['d']:+.3f} ± {x['se_d']:.3f} | "
                   f"A {x['shown']} B | **{x['verdict']}** |")
    if "F2" in args.phases:
        out += ["", f"F2's cost: syncs and wall time per run (mean over seeds, {args.steps} steps)", "",
                "| run | s | generator syncs | wall time (s) | math accuracy | chat quality |", "|---|---|---|---|---|---|"]
        for key, s in (("offline_dpo", "∞"), (f"semi_s{s1}", s1), (f"semi_s{s2}", s2), ("online_dpo", 1)):
            cells = []
            for task, measure in (("math", "accuracy"), ("chat", "quality")):
                m, se = mean_se(per_seed(args, f"{task}/{key}", measure, results))
                cells.append(f"{m:.3f} ± {se:.3f}")
            syncs = mean_se(per_seed(args, f"math/{key}", "syncs", results))[0]
            wall = mean_se(per_seed(args, f"math/{key}", "wall_s", results))[0]
            out.append(f"| {all_arms[f'math/{key}'].label} | {s} | {syncs:.0f} | {wall:.0f} | {' | '.join(cells)} |")
    text = "\n".join(out) + "\n"
    with open(os.path.join(args.out_dir, "findings.md"), "w") as f:
        f.write(text)
    replace_block("<!-- findings:begin -->\n", "<!-- findings:end -->", text)


def replace_block(begin: str, end: str, block: str) -> None:
    """The README's copy of a generated table, between its markers (never edited by hand)."""
    readme = os.path.join(ROOT, "README.md")
    text = open(readme).read()
    if begin in text and end in text:
        text = text[: text.index(begin) + len(begin)] + block + text[text.index(end):]
        with open(readme, "w") as f:
            f.write(text)


def write_table(args: Args, results: dict, all_arms: dict) -> None:
    """The F1 tables: every regime on its own task, against the seed."""
    cols = {"math": ["accuracy", "greedy"], "chat": ["quality", "reward", "test_length", "reward_per_token", "win_rate"]}
    head = {"math": "| regime | lr | test accuracy | test greedy accuracy |",
            "chat": "| regime | lr | true quality | RM reward | length | RM reward / length | RM win rate vs seed "
                    "| checkpoint (step) |"}
    out = [f"Embedded default: {args.steps} steps of 8 prompts per run, the same prompts for every regime; the paper's "
           f"β / Adam ε / clip / reference per task; learning rate picked per regime on the validation split (seed "
           f"{args.seeds[0]}); mean ± standard error over seeds {list(args.seeds)}. Test: math 300 problems x "
           f"{args.final_samples} samples (T = 0.6, top-p 0.9) and greedy, final checkpoint; chat 200 prompts x "
           f"{args.final_samples} samples, checkpoint with the best validation RM reward / length, scored by true "
           f"quality and by the (length-biased) reward model, RM win rate against the seed's samples (ties half).\n"]
    for task in ("math", "chat"):
        out += [f"\n**{task}**\n", head[task], "|" + "---|" * (head[task].count("|") - 1)]
        cells = [f"{m:.3f} ± {se:.3f}" for m, se in (mean_se(per_seed(args, "seed", c, results)) for c in cols[task])]
        out.append(f"| seed | - | {' | '.join(cells)} |" + (" - |" if task == "chat" else ""))
        for i, arm in all_arms.items():
            if arm.task == task and arm.lr_of is None:
                cells = [f"{m:.3f} ± {se:.3f}" for m, se in (mean_se(per_seed(args, i, c, results)) for c in cols[task])]
                if task == "chat":
                    cells.append(", ".join(str(results["tests"][f"{i}|chat|{s}"]["step"]) for s in args.seeds))
                out.append(f"| {arm.label} | {results['lr'][i]:g} | {' | '.join(cells)} |")
    out += ["", "Validation score per learning rate (first seed): " + "; ".join(
        f"{all_arms[i].label} [{all_arms[i].task}]: " + ", ".join(f"{k} -> {v:.3f}" for k, v in sorted(
            g.items(), key=lambda kv: float(kv[0]))) for i, g in results["grids"].items())]
    text = "\n".join(out) + "\n"
    with open(os.path.join(args.out_dir, "results.md"), "w") as f:
        f.write(text)
    replace_block("<!-- study:begin -->\n", "<!-- study:end -->", text)


def plot(args: Args, results: dict, all_arms: dict, dirs: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def curve(i: str, key: str) -> tuple[list[int], list[float]]:
        per_step: dict[int, list[float]] = {}
        for s in args.seeds:
            for m in metrics_of(dirs[i, s]):
                if key in m and (m["step"] > 0 or key.startswith("eval/")):
                    per_step.setdefault(m["step"], []).append(m[key])
        steps = sorted(per_step)
        return steps, [sum(per_step[t]) / len(per_step[t]) for t in steps]

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(os.path.join(args.out_dir, name), dpi=110)
        plt.close(fig)

    regimes = [i for i, a in all_arms.items() if a.lr_of is None and (i, args.seeds[0]) in dirs]
    for task in ("math", "chat"):  # every regime: validation metric, entropy, length (mean over seeds)
        mine = [i for i in regimes if all_arms[i].task == task]
        if not mine:
            continue
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        for n, i in enumerate(mine):
            for ax, key in zip(axes, [TASKS[task][3], "rollout/entropy", "rollout/length_mean"], strict=True):
                ax.plot(*curve(i, key), label=f"{all_arms[i].label}, lr {results['lr'][i]:g}", color=f"C{n}",
                        marker="o" if key.startswith("eval/") else None, markersize=3)
        for ax, title in zip(axes, ["validation accuracy" if task == "math" else "validation RM reward / length",
                                    "rollout entropy (nats / token)", "rollout length (tokens)"], strict=True):
            ax.set(title=f"{task}: {title}", xlabel="step")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        save(fig, f"{task}.png")
    s1, s2 = args.semi_intervals
    if "F2" in args.phases:  # accuracy / quality against the number of syncs
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, (task, measure) in zip(axes, (("math", "accuracy"), ("chat", "quality")), strict=True):
            for n, (key, s) in enumerate((("offline_dpo", "∞"), (f"semi_s{s1}", s1), (f"semi_s{s2}", s2), ("online_dpo", 1))):
                syncs = mean_se(per_seed(args, f"math/{key}", "syncs", results))[0]
                m, se = mean_se(per_seed(args, f"{task}/{key}", measure, results))
                ax.errorbar([max(syncs, 0.5)], [m], yerr=[se], fmt="o", color=f"C{n}", capsize=3, label=f"s = {s}")
            m, se = mean_se(per_seed(args, "seed", measure, results))
            ax.axhline(m, color="gray", ls="--", label="seed")
            ax.set(xscale="log", xlabel="generator syncs per run (log; offline: none)", title=f"F2 {task}: {MEASURES[measure]}")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        save(fig, "f2_sync.png")
    if "F3" in args.phases:  # every arm on both tasks
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        arms_f3 = [("seed", "seed"), ("math/online_dpo", "math only"), ("chat/online_dpo", "chat only"),
                   ("mix/mix_at_math_lr", "math + chat\n(math's lr)"), ("mix/mix_at_chat_lr", "math + chat\n(chat's lr)")]
        for ax, measure in zip(axes, ("accuracy", "quality"), strict=True):
            what = "math" if measure == "accuracy" else "chat"
            shown = [(i, lab) for i, lab in arms_f3 if i == "seed" or f"{i}|{what}|{args.seeds[0]}" in results["tests"]]
            stats = [mean_se(per_seed(args, i, measure, results)) for i, _ in shown]
            ax.bar(range(len(shown)), [m for m, _ in stats], yerr=[se for _, se in stats], capsize=3,
                   color=[f"C{n}" for n in range(len(shown))])
            ax.set_xticks(range(len(shown)), [lab for _, lab in shown], fontsize=8)
            ax.set(title=f"F3: {MEASURES[measure]}", ylim=(min(m for m, _ in stats) * 0.9, None))
            ax.grid(alpha=0.3, axis="y")
        save(fig, "f3_mixed.png")
    if "F4" in args.phases:  # entropy and length per regime, and without reference re-sync
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        f4 = [i for i in regimes if all_arms[i].task == "math"] + ["math/online_dpo_no_ref_sync"]
        for n, i in enumerate(f4):
            for ax, key in zip(axes, ["rollout/entropy", "rollout/length_mean", "eval/accuracy"], strict=True):
                ax.plot(*curve(i, key), label=all_arms[i].label, color=f"C{n}", ls="--" if "no_ref" in i else "-")
        for ax, title in zip(axes, ["rollout entropy (nats / token)", "rollout length (tokens)",
                                    "validation accuracy"], strict=True):
            ax.set(title=f"F4 math: {title} (mean over seeds)", xlabel="step")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        save(fig, "f4_entropy.png")


if __name__ == "__main__":
    main(tyro.cli(Args))
