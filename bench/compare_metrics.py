"""compare_metrics.py BEFORE AFTER [NAME ...] [--rename OLD=NEW ...] [--rtol R]: each run's
metrics.jsonl (and offline DPO's rollouts.jsonl) in BEFORE and AFTER (bench/same_metrics.sh's
folders) equal value for value, but for the timings and the memory (perf/*_s, perf/*_per_s,
perf/peak_memory_gb). `--rename` reads BEFORE's key OLD as NEW (a metric renamed); `--rtol`
accepts values within that relative difference (a change of float rounding, named as such) and
prints the largest one seen. Exits 1 on any difference, printing the first few."""

import json
import os
import sys


def volatile(key: str) -> bool:
    return key.startswith("perf/") and (key.endswith("_s") or "per_s" in key or "memory" in key)


def lines(path: str, rename: dict[str, str] | None = None) -> list[dict]:
    rename = rename or {}
    return ([{rename.get(k, k): v for k, v in json.loads(x).items() if not volatile(k)} for x in open(path)]
            if os.path.exists(path) else [])


def close(x, y, rtol: float) -> bool:
    if x == y or (x != x and y != y):  # NaN == NaN here
        return True
    numbers = isinstance(x, (int, float)) and isinstance(y, (int, float))
    return numbers and abs(x - y) <= rtol * max(abs(x), abs(y))


def main() -> int:
    argv, rename, rtol = sys.argv[1:], {}, 0.0
    while "--rename" in argv:
        i = argv.index("--rename")
        old, new = argv[i + 1].split("=")
        rename[old] = new
        del argv[i : i + 2]
    if "--rtol" in argv:
        i = argv.index("--rtol")
        rtol = float(argv[i + 1])
        del argv[i : i + 2]
    a, b, *names = argv
    names = names or sorted(d for d in os.listdir(a) if os.path.isdir(os.path.join(a, d)))
    bad = 0
    for name in names:
        diffs, values, worst = [], 0, 0.0
        for file in ("metrics.jsonl", "rollouts.jsonl"):
            la, lb = lines(os.path.join(a, name, file), rename), lines(os.path.join(b, name, file))
            if len(la) != len(lb):
                diffs.append(f"{file}: {len(la)} vs {len(lb)} lines")
            for x, y in zip(la, lb, strict=False):  # a length difference is reported above
                values += len(x)
                if x.keys() != y.keys():
                    diffs.append(f"{file} step {x.get('step')}: keys {sorted(set(x) ^ set(y))}")
                for k in x.keys() & y.keys():
                    if not close(x[k], y[k], rtol):
                        diffs.append(f"{file} step {x['step']} {k}: {x[k]!r} vs {y[k]!r}")
                    elif x[k] != y[k] and x[k] == x[k]:
                        worst = max(worst, abs(x[k] - y[k]) / max(abs(x[k]), abs(y[k])))
        same = "identical" if not worst else f"equal within rtol (largest relative difference {worst:.1e})"
        print(f"{name}: {same if not diffs else 'DIFFERENT'} ({values} values)")
        for d in diffs[:8]:
            print("   ", d)
        bad += bool(diffs)
    return int(bad > 0)


if __name__ == "__main__":
    sys.exit(main())
