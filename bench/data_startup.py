"""Start-up at the paper's data scale: `common.load_data` on NuminaMath-CoT's size and layout.

    python bench/data_startup.py                 # 860k rows, 1 and 2 ranks, ~3 min; writes bench/results/data_startup.md
    python bench/data_startup.py --rows 100000   # a smaller file

Builds (once, in --workdir) a synthetic file in NuminaMath-CoT's exact layout: the columns
`source`, `problem`, `solution`, `messages` (user problem, assistant solution), its sources in the
real set's proportions (orca_math, synthetic_math and synthetic_amc: the subsets the paper's filter
drops), problems of 40 to 3,000 characters with LaTeX, some proofs and some multiple-choice, and
worked solutions, most ending in a `\\boxed{}` answer. No download: the text is random words.
Then times what a training script does before its first step, with the paper's math flags
(`--paper-math-filter`, `--max-model-len 4096`, `--max-new-tokens 2048`, 64 prompts a step) and the
embedded tokenizer: `load_data` (read, filter, render and measure every prompt), in its own
process per rank (`torchrun` for two), each reporting its wall time and the resident memory it
added at its peak. Also times reading a step's prompts' token ids. Benchmarks, not tests: nothing
here asserts.
"""

import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import date

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import tyro  # noqa: E402

# NuminaMath-CoT's sources and their row counts (859,494 rows in all).
SOURCES = {"cn_k12": 276_554, "synthetic_math": 167_874, "orca_math": 153_334, "olympiads": 150_563,
           "synthetic_amc": 62_111, "aops_forum": 30_192, "math": 7_477, "gsm8k": 7_345, "amc_aime": 4_044}
WORDS = ("the of a number is let find and in to we that for if then value sum triangle circle point "
         "area function real integer prime given equation solution angle side length positive").split()
LATEX = ["$x^2 + y^2 = 1$", "$\\frac{a}{b}$", "$\\sqrt{2}$", "$f(x) = 3x - 7$", "$\\angle ABC = 60^\\circ$",
         "$n \\geq 1$", "$\\sum_{k=1}^{n} k$", "$a_1, a_2, \\ldots, a_n$", "$\\pi r^2$", "$\\log_2 8$"]


@dataclass
class Args:
    rows: int = 860_000
    """rows in the synthetic file (NuminaMath-CoT: ~860k)"""
    workdir: str = "/tmp/bridging_rl_bench"
    """where the synthetic file is built (once; reused if present)"""
    ranks: tuple[int, ...] = (1, 2)
    """numbers of ranks to time (each rank its own process)"""
    out: str = os.path.join(ROOT, "bench", "results", "data_startup.md")
    """where the table goes"""
    child: bool = False
    """(internal) time load_data in this process"""
    path: str = ""
    """(internal) the file the child reads"""


def text(rng: random.Random, chars: int) -> str:
    words, n = [], 0
    while n < chars:
        w = rng.choice(LATEX) if rng.random() < 0.08 else rng.choice(WORDS)
        words.append(w)
        n += len(w) + 1
    return " ".join(words)


def synthetic_row(rng: random.Random, source: str) -> dict:
    problem = text(rng, int(min(3000, max(40, rng.lognormvariate(5.6, 0.6)))))
    kind = rng.random()
    if kind < 0.06:
        problem = "Prove that " + problem
    elif kind < 0.12 or source in ("synthetic_amc", "amc_aime"):
        problem += " " + " ".join(f"({c}) {rng.randint(1, 99)}" for c in "ABCDE")
    answer = rng.choice([str(rng.randint(0, 999)), f"\\frac{{{rng.randint(1, 9)}}}{{{rng.randint(2, 9)}}}",
                         f"{rng.randint(2, 9)}\\sqrt{{{rng.randint(2, 7)}}}", "(B)"])
    solution = text(rng, int(min(6000, max(100, rng.lognormvariate(6.9, 0.5)))))
    if rng.random() < 0.97:
        solution += f" Therefore, the answer is $\\boxed{{{answer}}}$."
    return {"source": source, "problem": problem, "solution": solution,
            "messages": [{"content": problem, "role": "user"}, {"content": solution, "role": "assistant"}]}


def build(path: str, rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(0)
    total = sum(SOURCES.values())
    sources = [s for s, n in SOURCES.items() for _ in range(round(n * rows / total))][:rows]
    sources += ["cn_k12"] * (rows - len(sources))
    rng.shuffle(sources)
    writer = None
    for start in range(0, rows, 50_000):
        table = pa.Table.from_pylist([synthetic_row(rng, s) for s in sources[start : start + 50_000]])
        writer = writer or pq.ParquetWriter(path + ".tmp", table.schema)
        writer.write_table(table)
    writer.close()
    os.replace(path + ".tmp", path)


def memory_gb() -> tuple[float, float]:
    """(resident, anonymous) memory of this process in GiB: resident counts the file pages a memory-
    mapped dataset touched (shared by a node's ranks and reclaimable), anonymous what is its own."""
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(fields["VmRSS"].split()[0]) / 2**20, int(fields["RssAnon"].split()[0]) / 2**20


class PeakMemory:
    """The peak of `memory_gb` while a block runs, sampled every 20 ms."""

    def __enter__(self):
        import threading

        self.peak, self.done = memory_gb(), threading.Event()

        def sample():
            while not self.done.wait(0.02):
                self.peak = tuple(max(a, b) for a, b in zip(self.peak, memory_gb(), strict=True))

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()


def child(path: str) -> None:
    """One rank: load_data as grpo.py calls it with the paper's math flags; print one JSON line."""
    import common
    import grpo

    rank = int(os.environ.get("RANK", 0))
    args = grpo.Args(dataset=path, eval_dataset="", paper_math_filter=True, prompts_per_step=64,
                     max_new_tokens=2048, run=common.RunArgs(max_model_len=4096))
    tokenizer = common.load_tokenizer(os.path.join(ROOT, "embedded", "policy"))
    before = memory_gb()
    t0 = time.time()
    with PeakMemory() as peak:
        rows, prompt_ids, _ = common.load_data(args, tokenizer, verbose=rank == 0)
    seconds = time.time() - t0
    after = memory_gb()
    order = common.StepOrder(len(rows), 1, 64, 0, 1)
    t1 = time.time()
    ids = [prompt_ids[i] for i in order.indices(1)]
    step_ms = (time.time() - t1) * 1e3
    print(json.dumps({"rank": rank, "seconds": seconds, "rss_peak": peak.peak[0] - before[0],
                      "anon_peak": peak.peak[1] - before[1], "anon_after": after[1] - before[1],
                      "rows": len(rows), "step_ids_ms": step_ms, "step_tokens": sum(map(len, ids))}), flush=True)


def main(args: Args) -> None:
    if args.child:
        return child(args.path)
    os.makedirs(args.workdir, exist_ok=True)
    path = os.path.join(args.workdir, f"numinamath_cot_synthetic_{args.rows}.parquet")
    if not os.path.exists(path):
        t0 = time.time()
        build(path, args.rows)
        print(f"built {path} ({os.path.getsize(path) / 2**20:.0f} MiB) in {time.time() - t0:.0f} s", flush=True)
    hub = os.path.join(args.workdir, f"hub_layout_{args.rows}")  # a clone of a hub dataset: data/train-*.parquet
    os.makedirs(os.path.join(hub, "data"), exist_ok=True)
    if not os.path.exists(os.path.join(hub, "data", "train-00000-of-00001.parquet")):
        os.symlink(path, os.path.join(hub, "data", "train-00000-of-00001.parquet"))
    import datasets

    datasets.load_dataset(hub, split="train")  # its Arrow cache built once, as a second start finds it
    results = []
    env = dict(os.environ, PYTHONPATH=ROOT, TOKENIZERS_PARALLELISM="false")
    for layout, where in (("parquet file", path), ("hub layout folder (datasets' cache)", hub)):
        for ranks in args.ranks:
            cmd = [sys.executable, __file__, "--child", "--path", where]
            if ranks > 1:
                env["OMP_NUM_THREADS"] = "1"
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                       __file__, "--child", "--path", where]
            r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            if r.returncode:
                sys.exit(r.stdout[-2000:] + r.stderr[-3000:])
            print("\n".join(x for x in r.stdout.splitlines() if x.startswith("data:")))
            for x in sorted((json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")), key=lambda x: x["rank"]):
                results.append((layout, ranks, x))
                print(f"{layout}, {ranks} rank(s), rank {x['rank']}: load_data {x['seconds']:.1f} s, at peak "
                      f"+{x['rss_peak']:.2f} GiB resident / +{x['anon_peak']:.2f} anonymous (+{x['anon_after']:.2f} "
                      f"after), {x['rows']:,} prompts; a step's ids {x['step_ids_ms']:.0f} ms", flush=True)
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if ln.startswith("Model name")), "?")
    table = [f"# `load_data` at NuminaMath-CoT's scale ({date.today()}, {os.cpu_count()} cores, {model})", "",
             f"A synthetic {args.rows:,}-row parquet file in NuminaMath-CoT's layout (`bench/data_startup.py`), read as "
             "a file and as a hub-layout folder (`datasets.load_dataset`, its Arrow cache already built); the paper's "
             "math flags, the embedded tokenizer. Per rank: wall time of `load_data`, the memory it added at its peak "
             "(resident: with the file pages a memory-mapped cache touched, which a node's ranks share and the kernel "
             "can reclaim; anonymous: the process's own) and after, and the time to read one step's 64 prompts' ids.",
             "", "| data | ranks | rank | load_data (s) | added at peak, resident (GiB) | added at peak, anonymous (GiB) | "
             "added after, anonymous (GiB) | prompts kept | a step's ids (ms) |", "|---|---|---|---|---|---|---|---|---|"]
    for layout, ranks, x in results:
        table.append(f"| {layout} | {ranks} | {x['rank']} | {x['seconds']:.1f} | {x['rss_peak']:.2f} | {x['anon_peak']:.2f} "
                     f"| {x['anon_after']:.2f} | {x['rows']:,} | {x['step_ids_ms']:.0f} |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(table) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main(tyro.cli(Args))
