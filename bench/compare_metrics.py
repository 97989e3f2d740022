"""compare_metrics.py BEFORE AFTER [NAME ...]: each run's metrics.jsonl (and offline DPO's
rollouts.jsonl) in BEFORE and AFTER (bench/same_metrics.sh's folders) equal value for value, but
for the timings and the memory (perf/*_s, perf/*_per_s, perf/peak_memory_gb). Exits 1 on any
difference, printing the first few."""

import json
import os
import sys


def volatile(key: str) -> bool:
    return key.startswith("perf/") and (key.endswith("_s") or "per_s" in key or "memory" in key)


def lines(path: str) -> list[dict]:
    return [{k: v for k, v in json.loads(x).items() if not volatile(k)} for x in open(path)] if os.path.exists(path) else []


def main() -> int:
    a, b, *names = sys.argv[1:]
    names = names or sorted(d for d in os.listdir(a) if os.path.isdir(os.path.join(a, d)))
    bad = 0
    for name in names:
        diffs, values = [], 0
        for file in ("metrics.jsonl", "rollouts.jsonl"):
            la, lb = lines(os.path.join(a, name, file)), lines(os.path.join(b, name, file))
            if len(la) != len(lb):
                diffs.append(f"{file}: {len(la)} vs {len(lb)} lines")
            for x, y in zip(la, lb, strict=False):  # a length difference is reported above
                values += len(x)
                if x.keys() != y.keys():
                    diffs.append(f"{file} step {x.get('step')}: keys {sorted(set(x) ^ set(y))}")
                diffs += [f"{file} step {x['step']} {k}: {x[k]!r} vs {y[k]!r}" for k in x.keys() & y.keys()
                          if x[k] != y[k] and not (x[k] != x[k] and y[k] != y[k])]  # NaN == NaN here
        print(f"{name}: {'identical' if not diffs else 'DIFFERENT'} ({values} values)")
        for d in diffs[:8]:
            print("   ", d)
        bad += bool(diffs)
    return int(bad > 0)


if __name__ == "__main__":
    sys.exit(main())
