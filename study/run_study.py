"""The study, version 3: the paper's central question (does the sync interval s matter?) asked by the
paper's protocol, with a design fixed before the runs (study/DESIGN.md) and verdicts that say how
sure they are. Versions 1 and 2 (2026-12-01, 2026-12-02) and why they changed: docs/study.md.

The phases, in order (each resumable: a finished run or evaluation is never redone):
- `select-math`, `select-chat`: one learning rate per task for all five regimes of the central
  block (offline DPO, semi-online DPO s = 20 and s = 5, online DPO, GRPO), the grid point with the
  best mean final validation score over the five regimes and the selection seeds (never tested);
  drift criterion D on online DPO and s = 20 at that rate (200 steps, else 400); the per-seed SD
  of the selection runs sets the number of test seeds (6, up to 10, by the power rule);
- `central-math`, `central-chat`: the five regimes and the seed model over the test seeds at the
  task's rate; test figures (math: 300 problems x 16 samples at T = 0.6, top-p 0.9, per problem
  saved; chat: true quality at the run's best validation RM reward per token, 200 prompts x 16);
  every run's drift (KL from the seed, length and entropy change, the pre-sync logprob gap);
  claims C1-C7 judged by `stats.verdict` (Welch + TOST, margin 0.02), "mechanism inactive" for
  the rows that differ only in s when D fails;
- `secondary`: the paper's other findings and ablations (F3-F5, A1-A5), 3 seeds at their task's
  rate, each row with its realised power.

Writes `study/results/v3/`: `selection_<task>.json`, `central_<task>.json`, `secondary.json`,
`findings.md` (every judged row so far), `time.json` (each phase's wall time, resumes included),
`records/` (what each run and evaluation gave: a phase resumes from them on another machine).

    .venv/bin/python study/run_study.py --phases select-math   # ~30 runs, ~1.5 h on 2 CPU cores
    .venv/bin/python study/run_study.py                        # all of it, ~8-10 h
"""

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import stats  # noqa: E402

from embedded.tiny import chat_quality  # noqa: E402  (the chat task's true quality)

DATA = "embedded/data"
SEED_MODEL = "embedded/policy"
PHASES = ("select-math", "central-math", "select-chat", "central-chat", "secondary")


@dataclass
class Args:
    phases: tuple[str, ...] = PHASES
    """the parts to run, in the design's order (a central phase needs its task's selection)"""
    steps: int = 200
    """optimizer steps per run (8 prompts each); 400 when online DPO fails drift criterion D"""
    long_steps: int = 400
    """the runs' length when D fails at `steps`"""
    eval_every: int = 20
    """validation during training every N steps (the chat checkpoint candidates)"""
    eval_samples: int = 16
    """samples per validation problem / prompt during training"""
    final_samples: int = 16
    """samples per test problem / prompt"""
    lr_grid: tuple[float, ...] = (2e-5, 6e-5, 2e-4)
    """one learning rate per task from this grid; a pick at an edge widens it that way, x3, twice at most"""
    selection_seeds: tuple[int, ...] = (101, 102)
    """the seeds that pick the learning rate, the steps and the number of seeds; never tested"""
    seeds: int = 6
    """test seeds per arm of the central block (seeds 1..N), raised to `max_seeds` by the power rule"""
    max_seeds: int = 10
    secondary_seeds: int = 3
    """test seeds per arm of the secondary findings and ablations"""
    margin: float = 0.02
    """the difference the design must see, and the equivalence margin (math accuracy, chat quality)"""
    jobs: int = 2
    """runs at once, each on cores / jobs threads"""
    runs_dir: str = "runs/study_v3"
    out_dir: str = "study/results/v3"


# Drift criterion D (study/DESIGN.md): online DPO ends >= 0.05 nats/token from the seed and changes
# its length or entropy by >= 10%; s = 20 ends its windows >= 0.01 nats/token off-policy.
D_KL, D_CHANGE, D_GAP = 0.05, 0.10, 0.01
REGIMES = ("offline_dpo", "semi_s20", "semi_s5", "online_dpo", "grpo")

CLIP = {"--max-grad-norm": "0.1"}
PAPER = {  # the paper's settings per algorithm and training data
    "dpo": {"math": {"--beta": "0.1", "--adam-eps": "1e-4", **CLIP},
            "chat": {"--beta": "0.01", "--adam-eps": "1e-8", **CLIP},
            "mix": {"--beta": "0.01", "--adam-eps": "1e-8", **CLIP}},  # the V+NV run (fixed reference: auto)
    "grpo": {task: {"--kl-coef": "0.001", "--adam-eps": "1e-8", **CLIP} for task in ("math", "chat")},
}
TASKS = {  # training data, validation data (and its size), the validation metric
    "math": (f"{DATA}/math_train.jsonl", f"{DATA}/math_val.jsonl", 100, "eval/accuracy"),
    "chat": (f"{DATA}/chat_train.jsonl", f"{DATA}/chat_val.jsonl", 100, "eval/chat/reward_per_token"),
    "mix": (f"{DATA}/mix_train.jsonl", f"{DATA}/math_val.jsonl,{DATA}/chat_val.jsonl", 100, ""),
}


@dataclass(frozen=True)
class Arm:
    """One configuration trained with every seed, at the learning rate of `lr_task`."""
    key: str
    label: str
    script: str
    task: str  # training data: math, chat or mix
    flags: tuple[tuple[str, str], ...] = ()  # on top of (replacing) the paper's
    lr_task: str = ""  # whose learning rate it uses ("": its own task's)

    def command(self, lr: float, args: Args) -> list[str]:
        train, val, limit, _ = TASKS[self.task]
        flags = PAPER["grpo" if self.script == "grpo.py" else "dpo"][self.task] | dict(self.flags)
        return [self.script, "--dataset", train, "--eval-dataset", val, "--eval-limit", str(limit),
                "--eval-samples", str(args.eval_samples), "--learning-rate", f"{lr:g}",
                *(x for kv in flags.items() for x in kv if x)]  # "": a switch


def arms(args: Args) -> dict[str, Arm]:
    """Every arm of every phase, by id `task/key`."""
    out = {}
    for task in ("math", "chat"):
        for key, label, script, flags in (
                ("offline_dpo", "offline DPO (s=∞)", "offline_dpo.py", ()),
                ("semi_s20", "semi-online DPO (s=20)", "semi_online_dpo.py", (("--sync-interval", "20"),)),
                ("semi_s5", "semi-online DPO (s=5)", "semi_online_dpo.py", (("--sync-interval", "5"),)),
                ("online_dpo", "online DPO (s=1)", "online_dpo.py", ()),
                ("grpo", "GRPO (s=1)", "grpo.py", ())):
            out[f"{task}/{key}"] = Arm(key, label, script, task, flags, task)

    def variant(base: str, key: str, label: str, *flags: tuple[str, str], task: str = "math",
                lr_task: str = "math") -> None:
        b = out[f"{lr_task}/{base}"]
        out[f"{task}/{key}"] = Arm(key, label, b.script, task, b.flags + flags, lr_task)

    variant("online_dpo", "mix_at_math_lr", "online DPO, math + chat (math's lr)", task="mix")
    variant("online_dpo", "mix_at_chat_lr", "online DPO, math + chat (chat's lr)", task="mix", lr_task="chat")
    variant("online_dpo", "online_dpo_no_ref_sync", "online DPO, fixed reference", ("--ref-sync", "no"))
    variant("online_dpo", "online_dpo_nll", "online DPO + NLL", ("--nll-scale", "1"))
    variant("semi_s5", "semi_s5_nll", "semi-online DPO (s=5) + NLL", ("--nll-scale", "1"))
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
    id: str
    claim: str  # the paper's, in words
    a: str  # arm id, or "seed"
    b: str  # arm id, "seed", or "" (entropy rows: the same runs' first tenth)
    measure: str  # accuracy | quality | entropy | length
    relation: str  # ">", "≈", "≥" or "<": the paper's claim about A against B
    s_only: bool = False  # A and B differ only in s: "mechanism inactive" when D fails


def central_rows(task: str) -> list[Row]:
    m = "accuracy" if task == "math" else "quality"
    out = [Row("C1", "online DPO beats offline DPO", f"{task}/online_dpo", f"{task}/offline_dpo", m, ">", True),
           Row("C2", "semi-online s = 5 beats offline DPO", f"{task}/semi_s5", f"{task}/offline_dpo", m, ">", True),
           Row("C3", "semi-online s = 20 beats offline DPO", f"{task}/semi_s20", f"{task}/offline_dpo", m, ">", True),
           Row("C4", "semi-online s = 5 is as good as online DPO", f"{task}/semi_s5", f"{task}/online_dpo", m, "≈",
               True),
           Row("C5", "GRPO is as good as online DPO", f"{task}/grpo", f"{task}/online_dpo", m, "≈"),
           Row("C6", "offline DPO beats the seed", f"{task}/offline_dpo", "seed", m, ">")]
    if task == "chat":
        out += [Row("C7", "every regime beats the seed", f"chat/{k}", "seed", m, ">") for k in REGIMES[1:]]
    return out


def secondary_rows() -> list[Row]:
    coll = "the rollouts' entropy collapses in online DPO on math"
    return [Row("F3", "math + chat in one batch is as good on math as math alone", "mix/mix_at_math_lr",
                "math/online_dpo", "accuracy", "≥"),
            Row("F3", "math + chat in one batch is as good on chat as chat alone", "mix/mix_at_chat_lr",
                "chat/online_dpo", "quality", "≥"),
            Row("F4", coll, "math/online_dpo", "", "entropy", "<"),
            Row("F4", "without reference re-sync math DPO collapses to short answers", "math/online_dpo",
                "math/online_dpo_no_ref_sync", "length", ">"),
            Row("F4", "re-syncing the reference keeps math DPO stable", "math/online_dpo",
                "math/online_dpo_no_ref_sync", "accuracy", ">"),
            Row("F5", "an NLL term on the chosen answer does not help", "math/online_dpo",
                "math/online_dpo_nll", "accuracy", "≥"),
            Row("F5", "an NLL term on the chosen answer does not help (s = 5)", "math/semi_s5",
                "math/semi_s5_nll", "accuracy", "≥"),
            Row("A1", "GroupDPO changes little against one random pair", "math/group_dpo",
                "math/online_dpo", "accuracy", "≈"),
            Row("A1", "GroupDPO + 0.01 GRPO changes little", "math/group_dpo_grpo", "math/online_dpo", "accuracy",
                "≈"),
            Row("A2", "an entropy bonus 1e-4 does not stop the collapse", "math/online_dpo_entropy1e-4", "",
                "entropy", "<"),
            Row("A2", "an entropy bonus 5e-4 does not stop the collapse", "math/online_dpo_entropy5e-4", "",
                "entropy", "<"),
            Row("A3", "GRPO: a group of 8 beats 4", "math/grpo", "math/grpo_n4", "accuracy", ">"),
            Row("A3", "GRPO: a group of 12 adds nothing over 8", "math/grpo_n12", "math/grpo", "accuracy", "≈"),
            Row("A4", "length-normalised GRPO is worse", "math/grpo", "math/grpo_seqnorm", "accuracy", ">"),
            Row("A5", "Adam ε 1e-4 stops DPO's sudden divergence on math", "math/online_dpo",
                "math/online_dpo_eps1e-8", "accuracy", ">")]


def secondary_samples(r: Row, runs: dict, seeds) -> tuple[list[float], list[float]]:
    """A secondary row's per-seed figures (A, B). A row without B compares A's rollout entropy in
    the run's last tenth with its first; "length" is the rollouts' length in the last tenth."""
    if r.b == "":
        return tuple([runs[f"{r.a}|{s}"][k] for s in seeds] for k in ("entropy_last", "entropy_first"))
    key = "length_last" if r.measure == "length" else r.measure
    return tuple([runs[f"{i}|{s}"][key] for s in seeds] for i in (r.a, r.b))


def pick(means: dict[float, float]) -> tuple[float, list[float]]:
    """The learning rate with the best mean validation score, and the grid's next point: x3 past
    an edge the pick sits at (none when it sits inside)."""
    best, lrs = max(means, key=means.get), sorted(means)
    if len(lrs) < 2:  # a grid of one point has no edge to look past
        return best, []
    return best, [best / 3] if best == lrs[0] else [best * 3] if best == lrs[-1] else []


def seeds_for(sd: float, margin: float, least: int, most: int) -> tuple[int, dict[int, float]]:
    """The design's power rule: `least` seeds, or the fewest up to `most` that separate a
    difference of `margin` with power >= 0.8 at per-seed SD `sd` (Welch, 5%), or `most`."""
    powers = {n: stats.welch_power(n, sd, margin) for n in range(least, most + 1)}
    return next((n for n, p in powers.items() if p >= 0.8), most), powers


def judge(relation: str, a: list[float], b: list[float], margin: float) -> dict:
    """The design's verdict (`stats.verdict`) for the four relations the rows state."""
    flip = relation == "<"  # "A below B" is judged as "B above A"; the row still shows A, B and d = A - B
    v = stats.verdict("A ≈ B" if relation == "≈" else "A > B", *((b, a) if flip else (a, b)), margin)
    label = v.label
    if relation == "≥":  # "A does at least as well": equivalence or A > B reproduce it
        label = ("reproduced" if v.label == "reproduced" or v.tost_p < 0.05 else
                 "not reproduced" if v.welch.diff < 0 and v.welch.p < 0.05 else "cannot tell")
    ma, mb = statistics.fmean(a), statistics.fmean(b)
    se = lambda x: statistics.stdev(x) / math.sqrt(len(x)) if len(x) > 1 else float("nan")  # noqa: E731
    return {"a_mean": [ma, se(a)], "b_mean": [mb, se(b)], "d": -v.welch.diff if flip else v.welch.diff,
            "se_d": v.welch.se, "df": v.welch.df,
            "p": v.welch.p, "tost_p": v.tost_p, "power": v.power, "verdict": label, "n": [len(a), len(b)]}


# ---------------------------------------------------------------------------------------------
# running and reading runs
# ---------------------------------------------------------------------------------------------
def run(cmd: list[str], tag: str, jobs: int) -> None:
    """Run a script from the repo root on its share of the cores, echoing its progress with `tag`."""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // jobs)))
    proc = subprocess.Popen([sys.executable, *cmd], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    tail = []
    for line in proc.stdout:
        tail = (tail + [line])[-30:]
        if line.startswith(("wrote ", "math ", "chat ", "KL(", "done")) or line.startswith("step ") and "eval" in line:
            print(f"[{tag}] {line.rstrip()[:150]}", flush=True)
    if proc.wait() != 0:
        sys.exit(f"study: {' '.join(cmd)} failed:\n{''.join(tail)}")


def finished(run_dir: str, steps: int) -> bool:
    path = os.path.join(run_dir, "checkpoint", "step.json")
    return os.path.exists(path) and json.load(open(path))["step"] == steps


def metrics_of(run_dir: str) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def run_name(arm: Arm, lr: float, seed: int, steps: int) -> str:
    """A run's folder name under runs_dir, and its record's under out_dir/records."""
    return f"{arm.task}_{arm.key}_lr{lr:g}_steps{steps}_seed{seed}"


def train(args: Args, arm: Arm, lr: float, seed: int, steps: int) -> str:
    """One training run, unless already finished; returns its folder."""
    run_dir = os.path.join(args.runs_dir, run_name(arm, lr, seed, steps))
    if not finished(run_dir, steps):
        shutil.rmtree(run_dir, ignore_errors=True)  # a half-done run starts over (same seed, same result)
        run([*arm.command(lr, args), "--num-steps", str(steps), "--eval-every", str(args.eval_every),
             "--seed", str(seed), "--output-dir", run_dir, "--save-every", str(steps),
             "--log-samples-every", "0"], os.path.basename(run_dir), args.jobs)
    return run_dir


def validation_score(run_dir: str, task: str) -> float:
    """The selection's score: math, the final validation accuracy; chat, the best validation RM
    reward per token over the evaluated steps (the paper's checkpoint pick)."""
    key = TASKS[task][3]
    evals = [m[key] for m in metrics_of(run_dir) if key in m and m["step"] > 0]
    return max(evals) if task == "chat" else evals[-1]


def seed_validation(run_dir: str, task: str) -> float:
    key = TASKS[task][3]
    return next(m[key] for m in metrics_of(run_dir) if key in m and m["step"] == 0)


def tested_checkpoint(run_dir: str, what: str) -> tuple[str, int]:
    """(folder, step) of the checkpoint a task's test evaluates. Chat: the paper's, the evaluated step
    with the best validation reward / length, which the run kept in best-chat/ (a run never
    evaluated on chat: its final step); math: the final checkpoint."""
    best = os.path.join(run_dir, "best-chat")
    if what == "chat" and os.path.isdir(best):
        return best, json.load(open(os.path.join(best, "best.json")))["step"]
    return os.path.join(run_dir, "checkpoint"), json.load(open(os.path.join(run_dir, "checkpoint", "step.json")))["step"]


def test_eval(args: Args, what: str, model: str, out: str, seed: int) -> dict:
    """The test figures of one checkpoint on one task (evaluate.py, not redone once written)."""
    if not os.path.exists(out):
        skip = ["--chat-dataset", ""] if what == "math" else ["--math-datasets", "", "--save-samples"]
        run(["evaluate.py", "--model", model, "--samples", str(args.final_samples), "--seed", str(seed),
             "--output", out, *skip], f"eval {out}", args.jobs)
    r = json.load(open(out))
    if what == "math":
        m = r["math"][f"{DATA}/math_test.jsonl"]
        return {"accuracy": m["accuracy"], "greedy": m["greedy_accuracy"], "per_problem": m["right_per_problem"]}
    c = r["chat"]
    quality = [chat_quality(x["prompt"], t) for x in c["responses"] for t in x["responses"]]
    return {"quality": sum(quality) / len(quality), "reward": c["reward_mean"], "test_length": c["length_mean"],
            "reward_per_token": c["reward_per_token"]}


def drift(args: Args, run_dir: str, task: str, interval: int) -> dict:
    """How far a run's policy moved (study/DESIGN.md's measures): KL from the seed on its own T = 1
    samples of the validation prompts, the relative change of rollout length and entropy (first
    tenth of the steps against the last), and for s > 1 the logprob gap at the last step of each
    window after the first (how off-policy a window's samples end)."""
    out = os.path.join(run_dir, "kl.json")
    if not os.path.exists(out):
        val = TASKS[task][1].split(",")[0]
        which = ["--math-datasets", val, "--chat-dataset", ""] if task == "math" else \
            ["--math-datasets", "", "--chat-dataset", val]
        run(["evaluate.py", "--model", os.path.join(run_dir, "checkpoint"), "--kl-to", SEED_MODEL,
             "--kl-samples", "4", "--samples", "1", "--limit", "100", "--output", out, *which],
            f"kl {run_dir}", args.jobs)
    steps = [m for m in metrics_of(run_dir) if m["step"] > 0 and "rollout/entropy" in m]
    k = max(1, len(steps) // 10)

    def change(key: str) -> float:
        first, last = (statistics.fmean(m[key] for m in part) for part in (steps[:k], steps[-k:]))
        return (last - first) / first

    gaps = [m["rollout/logprob_gap_mean"] for m in steps if interval > 1 and m["step"] % interval == 0
            and m["step"] > interval and "rollout/logprob_gap_mean" in m]  # none: no pair on any rank
    return {"kl": json.load(open(out))["kl"]["nats_per_token"], "length_change": change("rollout/length_mean"),
            "entropy_change": change("rollout/entropy"), "entropy_first": statistics.fmean(
                m["rollout/entropy"] for m in steps[:k]), "entropy_last": statistics.fmean(
                m["rollout/entropy"] for m in steps[-k:]), "length_last": statistics.fmean(
                m["rollout/length_mean"] for m in steps[-k:]),
            "pre_sync_gap": statistics.fmean(gaps) if interval > 1 and gaps else None}


def criterion_d(online: list[dict], semi20: list[dict]) -> dict:
    """Drift criterion D over the online DPO runs and the s = 20 runs (means over their seeds)."""
    kl = statistics.fmean(d["kl"] for d in online)
    change = max(abs(statistics.fmean(d[k] for d in online)) for k in ("length_change", "entropy_change"))
    gap = statistics.fmean(d["pre_sync_gap"] or 0.0 for d in semi20)  # None: no window ended after the first
    return {"online_kl": kl, "online_change": change, "semi20_pre_sync_gap": gap,
            "met": kl >= D_KL and change >= D_CHANGE and gap >= D_GAP}


# ---------------------------------------------------------------------------------------------
# the phases
# ---------------------------------------------------------------------------------------------
class Study:
    def __init__(self, args: Args):
        self.args, self.arms = args, arms(args)
        self.pool = ThreadPoolExecutor(args.jobs)
        os.makedirs(args.out_dir, exist_ok=True)
        os.makedirs(args.runs_dir, exist_ok=True)

    def each(self, fn, items: list) -> list:
        return list(self.pool.map(lambda item: fn(*item), items))

    def path(self, name: str) -> str:
        return os.path.join(self.args.out_dir, name)

    def save(self, name: str, obj: dict) -> None:
        """Written whole or not at all (time.json is rewritten while a reader may open it)."""
        with open(self.path(name) + ".tmp", "w") as f:
            json.dump(obj, f, indent=1)
        os.replace(self.path(name) + ".tmp", self.path(name))

    def interval(self, arm_id: str) -> int:
        flags = dict(self.arms[arm_id].flags)
        return int(flags.get("--sync-interval", 1)) if self.arms[arm_id].script != "offline_dpo.py" else 0

    def record(self, arm_id: str, lr: float, seed: int, steps: int, tests: tuple[str, ...] = ()) -> dict:
        """What the study keeps of one run, trained if need be: its validation score, the seed's
        validation (its step 0), its drift, its rollout curves and the asked-for test figures.
        Kept in out_dir/records/ (committed; git ignores any runs/), so a phase resumes on another
        machine without the run's checkpoint; a run is retrained (same seed, same result) only for
        a test it lacks."""
        arm, a = self.arms[arm_id], self.args
        path = self.path(os.path.join("records", f"{run_name(arm, lr, seed, steps)}.json"))
        rec = json.load(open(path)) if os.path.exists(path) else {}
        need = [w for w in tests if f"test_{w}" not in rec]
        if rec and not need:
            return rec
        run_dir = train(a, arm, lr, seed, steps)
        if not rec:
            task = "math" if arm.task == "mix" else arm.task
            steps_m = [m for m in metrics_of(run_dir) if m["step"] > 0 and "rollout/entropy" in m]
            rec = {"validation": validation_score(run_dir, arm.task) if arm.task != "mix" else None,
                   "seed_validation": seed_validation(run_dir, arm.task) if arm.task != "mix" else None,
                   "drift": drift(a, run_dir, task, self.interval(arm_id) if arm.task != "mix" else 1),
                   "curves": {k: [round(m[k], 4) for m in steps_m] for k in ("rollout/entropy", "rollout/length_mean")}}
        for what in need:
            ckpt, step = tested_checkpoint(run_dir, what)
            rec[f"test_{what}"] = test_eval(a, what, ckpt, os.path.join(run_dir, f"test_{what}_step{step}.json"),
                                            seed) | {"step": step}
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(rec, f)
        return rec

    def select(self, task: str) -> dict:
        """The task's learning rate, steps and number of test seeds, by the design's rules."""
        if os.path.exists(self.path(f"selection_{task}.json")):
            return json.load(open(self.path(f"selection_{task}.json")))
        a, steps = self.args, self.args.steps
        while True:
            recs: dict[float, dict[str, list[dict]]] = {}
            grid = sorted(a.lr_grid)
            for widening in range(3):
                runs = [(r, lr, s) for lr in grid for r in REGIMES for s in a.selection_seeds]
                done = self.each(lambda r, lr, s, steps=steps: self.record(f"{task}/{r}", lr, s, steps), runs)
                for (r, lr, _), rec in zip(runs, done, strict=True):
                    recs.setdefault(lr, {}).setdefault(r, []).append(rec)
                best, grid = pick({lr: statistics.fmean(x["validation"] for v in g.values() for x in v)
                                   for lr, g in recs.items()})
                if not grid or widening == 2:
                    break
            d = criterion_d([x["drift"] for x in recs[best]["online_dpo"]], [x["drift"] for x in recs[best]["semi_s20"]])
            if d["met"] or steps >= a.long_steps:
                break
            print(f"study: {task}: drift criterion D fails at {steps} steps ({d}); the runs are {a.long_steps} steps")
            steps = a.long_steps
        scores = {lr: {r: [x["validation"] for x in v] for r, v in g.items()} for lr, g in sorted(recs.items())}
        seed_val = statistics.fmean(x["seed_validation"] for v in recs[best].values() for x in v)
        # the per-seed SD at the picked rate, pooled over regimes (each regime's own mean removed)
        sd = math.sqrt(statistics.fmean(statistics.variance(scores[best][r]) for r in REGIMES))
        seeds, powers = seeds_for(sd, a.margin, a.seeds, a.max_seeds)
        out = {"task": task, "lr": best, "steps": steps, "seeds": seeds, "per_seed_sd": sd,
               "power": {str(n): p for n, p in powers.items()}, "drift_criterion": d,
               "drift": {f"{r}|{s}": x["drift"] for r, v in recs[best].items()
                         for s, x in zip(a.selection_seeds, v, strict=True)},
               "seed_validation": seed_val,
               "collapsed": [r for r in REGIMES if task == "math" and statistics.fmean(scores[best][r]) < seed_val - 0.05],
               "validation": {f"{lr:g}": g for lr, g in scores.items()},
               "mean_validation": {f"{lr:g}": statistics.fmean(x for v in g.values() for x in v)
                                   for lr, g in scores.items()}}
        self.save(f"selection_{task}.json", out)
        return out

    def test_runs(self, ids: list[str], lr: dict[str, float], steps: int, seeds: int) -> dict:
        """Every (arm, seed) trained, tested on its task(s) and measured: {arm|seed: figures}."""
        def figures(i: str, s: int) -> dict:
            tests = ("math", "chat") if self.arms[i].task == "mix" else (self.arms[i].task,)
            rec = self.record(i, lr[i], s, steps, tests)
            out = rec["drift"] | {"validation": rec["validation"]}
            for what in tests:
                out |= {k if k != "step" else f"{what}_step": v for k, v in rec[f"test_{what}"].items()}
            return out

        jobs = [(i, s) for s in range(1, seeds + 1) for i in ids]
        return {f"{i}|{s}": f for (i, s), f in zip(jobs, self.each(figures, jobs), strict=True)}

    def seed_model(self, seeds: int) -> dict:
        def one(what: str, s: int) -> dict:
            path = self.path(os.path.join("records", f"seed_model_{what}_seed{s}.json"))
            if not os.path.exists(path):
                rec = test_eval(self.args, what, SEED_MODEL, os.path.join(self.args.runs_dir, f"seed_test_{what}_{s}.json"), s)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "w") as f:
                    json.dump(rec, f)
            return json.load(open(path))

        jobs = [(what, s) for what in ("math", "chat") for s in range(1, seeds + 1)]
        return {f"{what}|{s}": r for (what, s), r in zip(jobs, self.each(one, jobs), strict=True)}

    def central(self, task: str) -> dict:
        sel = self.select(task)
        ids = [f"{task}/{r}" for r in REGIMES]
        runs = self.test_runs(ids, dict.fromkeys(ids, sel["lr"]), sel["steps"], sel["seeds"])
        seed = self.seed_model(sel["seeds"])
        seeds = range(1, sel["seeds"] + 1)
        d = criterion_d([runs[f"{task}/online_dpo|{s}"] for s in seeds], [runs[f"{task}/semi_s20|{s}"] for s in seeds])
        def per_seed(i: str, measure: str) -> list[float]:
            return [(seed[f"{task}|{s}"] if i == "seed" else runs[f"{i}|{s}"])[measure] for s in seeds]

        rows = []
        for r in central_rows(task):
            j = judge(r.relation, per_seed(r.a, r.measure), per_seed(r.b, r.measure), self.args.margin)
            if r.s_only and not d["met"]:
                j["verdict"] = "mechanism inactive"
            rows.append(asdict(r) | j)
        out = {"selection": sel, "drift_criterion": d, "runs": runs, "seed_model": seed, "rows": rows}
        self.save(f"central_{task}.json", out)
        return out

    def secondary(self) -> dict:
        lr = {t: self.select(t)["lr"] for t in ("math", "chat")}
        steps = max(self.select(t)["steps"] for t in ("math", "chat"))
        table = secondary_rows()
        ids = sorted({i for r in table for i in (r.a, r.b) if i not in ("", "seed")})
        runs = self.test_runs(ids, {i: lr[self.arms[i].lr_task] for i in ids}, steps, self.args.secondary_seeds)
        seeds = range(1, self.args.secondary_seeds + 1)
        rows = [asdict(r) | judge(r.relation, *secondary_samples(r, runs, seeds), self.args.margin) for r in table]
        out = {"lr": lr, "steps": steps, "runs": runs, "rows": rows}
        self.save("secondary.json", out)
        return out


def timed(study: Study, phase: str, fn, *fn_args, every: float = 60.0) -> None:
    """Run a phase and add its wall time to time.json (a resumed phase adds each part), written
    every `every` seconds while it runs: a killed part (a session's end sends SIGKILL, which no
    `finally` sees) loses at most that much."""
    path = study.path("time.json")
    times = json.load(open(path)) if os.path.exists(path) else {}
    t0, before, done = time.time(), times.get(phase, 0.0), threading.Event()

    def write() -> None:
        times[phase] = before + (time.time() - t0) / 60
        times["cores"], times["jobs"] = os.cpu_count(), study.args.jobs
        study.save("time.json", times)

    def heartbeat() -> None:
        while not done.wait(every):
            write()

    beat = threading.Thread(target=heartbeat, daemon=True)
    beat.start()
    try:
        fn(*fn_args)
    finally:  # an interrupted part counts too: the phase's time is the sum of its parts
        done.set()
        beat.join()  # one writer at a time
        write()
    print(f"study: {phase} done ({times[phase]:.0f} min in all)", flush=True)


def fmt(x: list[float]) -> str:
    return f"{x[0]:.3f} ± {x[1]:.3f}"


def write_findings(study: Study) -> None:
    """Every judged row so far, with its statistics, as markdown (never edited by hand)."""
    out = ["Study version 3 (study/DESIGN.md), generated by `study/run_study.py`. Per row: means ± SE over test "
           "seeds, d = A - B with Welch's df and p, TOST's p for equivalence within ±"
           f"{study.args.margin}, the power to separate a difference of {study.args.margin} at the realised SDs.\n"]
    for task in ("math", "chat"):
        if os.path.exists(study.path(f"selection_{task}.json")):
            s = json.load(open(study.path(f"selection_{task}.json")))
            d = s["drift_criterion"]
            out.append(f"**{task} selection** (seeds {list(study.args.selection_seeds)}): lr {s['lr']:g} (mean "
                       f"validation per lr: {', '.join(f'{k} -> {v:.3f}' for k, v in s['mean_validation'].items())}; "
                       f"seed {s['seed_validation']:.3f}), {s['steps']} steps; drift criterion D "
                       f"{'met' if d['met'] else 'FAILED'} (online DPO KL {d['online_kl']:.3f} nats/token, length "
                       f"or entropy change {d['online_change']:.1%}, s = 20 pre-sync gap "
                       f"{d['semi20_pre_sync_gap']:.4f}); per-seed SD {s['per_seed_sd']:.4f} -> {s['seeds']} "
                       f"test seeds (power {s['power'][str(s['seeds'])]:.2f}); collapsed at this rate: "
                       f"{', '.join(s['collapsed']) or 'none'}.\n")
            out += ["Final validation score per learning rate, mean of the selection seeds (their SD):\n",
                    "| learning rate | " + " | ".join(study.arms[f"{task}/{r}"].label for r in REGIMES) + " | mean |",
                    "|---|" + "---|" * (len(REGIMES) + 1)]
            for lr, g in s["validation"].items():
                cells = [f"{statistics.fmean(g[r]):.3f} ({statistics.stdev(g[r]):.3f})" for r in REGIMES]
                out.append(f"| {lr} | {' | '.join(cells)} | {s['mean_validation'][lr]:.3f} |")
            out.append("")
    rows = []
    for name in ("central_math.json", "central_chat.json", "secondary.json"):
        if os.path.exists(study.path(name)):
            rows += json.load(open(study.path(name)))["rows"]
    if rows:
        out += ["| # | the paper says | measure | A | B | A | B | d [95% CI] | df | p | TOST p | power | verdict |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            label = lambda i: "seed" if i == "seed" else "its first tenth" if i == "" else study.arms[i].label  # noqa: E731
            a_label = label(r["a"]) + (", last tenth" if r["b"] == "" else "")
            half = stats.t_ppf(0.975, r["df"]) * r["se_d"] if math.isfinite(r["df"]) else 0.0
            out.append(f"| {r['id']} | {r['claim']} (A {r['relation']} B) | {r['measure']} | {a_label} | "
                       f"{label(r['b'])} | {fmt(r['a_mean'])} | "
                       f"{fmt(r['b_mean'])} | {r['d']:+.3f} [{r['d'] - half:+.3f}, {r['d'] + half:+.3f}] | "
                       f"{r['df']:.1f} | {r['p']:.3f} | {r['tost_p']:.3f} | {r['power']:.2f} | **{r['verdict']}** |")
    with open(study.path("findings.md"), "w") as f:
        f.write("\n".join(out) + "\n")


def plot(study: Study) -> None:
    """central.png: per task, each regime's test score per seed (its mean a bar, the seed model a
    dashed line), and over the run the policy's entropy on each step's samples and their length
    (mean over test seeds, 10-step running mean; offline DPO's samples are the seed's), from the
    records alone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in ("math", "chat") if os.path.exists(study.path(f"central_{t}.json"))]
    if not tasks:
        return
    fig, axes = plt.subplots(len(tasks), 3, figsize=(15, 3.8 * len(tasks)), squeeze=False)
    for row, task in zip(axes, tasks, strict=True):
        c = json.load(open(study.path(f"central_{task}.json")))
        sel, measure = c["selection"], "accuracy" if task == "math" else "quality"
        seeds = range(1, sel["seeds"] + 1)
        for n, r in enumerate(REGIMES):
            arm = study.arms[f"{task}/{r}"]
            ys = [c["runs"][f"{task}/{r}|{s}"][measure] for s in seeds]
            row[0].scatter([n] * len(ys), ys, color=f"C{n}", s=12)
            row[0].hlines(statistics.fmean(ys), n - 0.3, n + 0.3, color=f"C{n}")
            recs = [study.record(f"{task}/{r}", sel["lr"], s, sel["steps"]) for s in seeds]  # kept by the phase
            for ax, key in zip(row[1:], ("rollout/entropy", "rollout/length_mean"), strict=True):
                per_seed = [rec["curves"][key] for rec in recs]  # one figure per logged step
                mean = [statistics.fmean(x) for x in zip(*per_seed, strict=True)]
                smooth = [statistics.fmean(mean[max(0, t - 9):t + 1]) for t in range(len(mean))]
                ax.plot(range(1, len(smooth) + 1), smooth, color=f"C{n}", label=arm.label)
        seed = statistics.fmean(c["seed_model"][f"{task}|{s}"][measure] for s in seeds)
        row[0].axhline(seed, color="grey", ls="--", label=f"seed model ({seed:.3f})")
        row[0].set(xticks=range(len(REGIMES)), xticklabels=[study.arms[f"{task}/{r}"].label.replace("semi-online DPO", "semi-online")
                                                            .replace(" (", "\n(") for r in REGIMES],
                   title=f"{task}: test {measure} per seed (lr {sel['lr']:g}, {sel['steps']} steps)")
        row[0].legend(fontsize=8)
        row[1].set(title=f"{task}: policy entropy on the samples (nats / token)", xlabel="step")
        row[2].set(title=f"{task}: the samples' length (tokens)", xlabel="step")
        row[2].legend(fontsize=8)
        for ax in row:
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=8)
    fig.tight_layout()
    fig.savefig(study.path("central.png"), dpi=100)
    plt.close(fig)


def main(args: Args) -> None:
    unknown = set(args.phases) - set(PHASES)
    if unknown:
        sys.exit(f"study: unknown phase(s) {sorted(unknown)}; the phases are {', '.join(PHASES)}")
    study = Study(args)
    for phase in (p for p in PHASES if p in args.phases):  # the design's order, whatever the flag's
        kind, _, task = phase.partition("-")
        timed(study, phase, getattr(study, kind), *([task] if task else []))
        write_findings(study)
        plot(study)
    study.pool.shutdown()


if __name__ == "__main__":
    main(tyro.cli(Args))
