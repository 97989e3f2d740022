"""offline_dpo.py: pair building on a crafted set; the saved pairs as an ordinary `datasets`
dataset; end-to-end on one process and two (the same pairs either way); `--pairs` reuse without
generation; an existing conversational preference dataset; resume."""

import json
import math
import random
import subprocess
import sys

import pytest
import torch

import offline_dpo
import online_dpo
from common import math_reward
from tests.conftest import ROOT, run_script, write_jsonl
from tests.test_grpo import SMALL, metrics

TRAIN_KEYS = ["step", "train/loss", "train/kl", "train/grad_norm", "train/lr", "train/pairs", "train/pair_accuracy",
              "train/chosen_logratio", "train/rejected_logratio", "train/nll", "train/epoch", "rollout/entropy",
              "rollout/policy_lag", "perf/train_s", "perf/step_s", "perf/train_tokens",
              "perf/train_tokens_per_s", "perf/peak_memory_gb"]
BUILD_KEYS = ["rollout/reward_mean", "rollout/reward_std", "rollout/accuracy", "rollout/zero_std_frac",
              "rollout/length_mean", "rollout/truncated_frac", "rollout/prompts", "perf/generate_s", "perf/score_s",
              "perf/rollout_tokens", "perf/rollout_tokens_per_s"]
# 10 problems the seed solves about half the time, and 4 whose "gold answer" no sample can match:
# those give all-wrong groups, which must not yield a pair.
EASY = [{"task": "math", "prompt": f"What is {a}+{b}?", "answer": str(a + b)}
        for a, b in [(10, 16), (20, 0), (23, 21), (15, 22), (29, 4), (7, 8), (12, 30), (3, 19), (25, 25), (14, 6)]]
IMPOSSIBLE = [{"task": "math", "prompt": f"What is {a}+{b}?", "answer": "-999"} for a, b in [(1, 2), (5, 5), (9, 2), (4, 17)]]
ARGS = ["--samples-per-prompt", "8", "--pairs-per-step", "2", "--epochs", "2", "--save-every", "2", *SMALL]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One single-process run that builds pairs from the crafted set and trains on them."""
    tmp = tmp_path_factory.mktemp("offline")
    data = write_jsonl(tmp / "crafted.jsonl", [r for pair in zip(EASY[:4], IMPOSSIBLE) for r in pair] + EASY[4:])
    out = tmp / "run"
    r = run_script("offline_dpo.py", ["--dataset", data, "--eval-every", "4", "--output-dir", str(out), *ARGS])
    return {"data": data, "out": out, "stdout": r.stdout}


def test_select_pairs_is_online_dpos():
    """Offline builds its pairs with the online rules: same function body, same choices."""
    rewards = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.3, 2.0, -1.0, 2.0], [0.5, 0.5, 0.5, 0.5]])
    tasks = ["math", "math", "chat", "chat"]
    for s in range(20):
        assert offline_dpo.select_pairs(rewards, tasks, random.Random(s)) == online_dpo.select_pairs(rewards, tasks, random.Random(s))


@pytest.mark.slow
def test_builds_pairs_from_a_crafted_set(built):
    import datasets

    pairs = datasets.load_dataset("json", data_files=str(built["out"] / "pairs.jsonl"), split="train")
    assert {"prompt", "chosen", "rejected", "chosen_reward", "rejected_reward", "task", "answer"} <= set(pairs.column_names)
    assert 4 <= len(pairs) <= len(EASY)  # at most one pair per prompt; the seed gets about half right
    impossible = {r["prompt"] for r in IMPOSSIBLE}
    easy_order = [r["prompt"] for r in EASY]
    assert not impossible & set(pairs["prompt"])  # all-wrong groups are skipped
    assert pairs["prompt"] == sorted(pairs["prompt"], key=easy_order.index)  # prompt order
    for p in pairs:  # the saved rewards are Math-Verify's verdicts on the saved texts
        assert math_reward(p["chosen"], p["answer"]) == 1.0 == p["chosen_reward"]
        assert math_reward(p["rejected"], p["answer"]) == 0.0 == p["rejected_reward"]
    m = metrics(built["out"])
    assert set(BUILD_KEYS) <= set(m[0]) and "eval/accuracy" in m[0]
    assert m[0]["rollout/prompts"] == len(EASY) + len(IMPOSSIBLE)
    steps = math.ceil(2 * len(pairs) / 2)
    assert [x["step"] for x in m] == list(range(0, steps + 1))
    for x in m[1:]:
        assert set(TRAIN_KEYS) <= set(x), set(TRAIN_KEYS) - set(x)
        assert x["rollout/policy_lag"] == x["step"] - 1 and x["train/pairs"] == 2
    assert m[1]["train/kl"] == 0.0 and m[1]["train/loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference
    assert m[-1]["train/epoch"] == pytest.approx(2.0) and "eval/accuracy" in m[-1]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(built["out"] / "checkpoint"))


@pytest.mark.slow
def test_pairs_reuse_skips_generation(built, tmp_path):
    out = tmp_path / "again"
    r = run_script("offline_dpo.py", ["--pairs", str(built["out"] / "pairs.jsonl"), "--eval-every", "0",
                                      "--output-dir", str(out), *ARGS])
    assert "building pairs" in built["stdout"] and "building pairs" not in r.stdout
    a, b = metrics(built["out"]), metrics(out)
    assert b[0]["step"] == 1 and not any(k.startswith("rollout/reward") for x in b for k in x)  # no rollouts
    for x, y in zip(a[1:], b):  # same pairs, same order, same init: the same training
        assert x["train/loss"] == pytest.approx(y["train/loss"], abs=1e-6)


@pytest.mark.slow
def test_torchrun_two_processes_builds_the_same_pairs(built, tmp_path):
    out = tmp_path / "run2"
    run_script("offline_dpo.py", ["--dataset", built["data"], "--eval-every", "4", "--output-dir", str(out), *ARGS], nproc=2)
    one = [json.loads(line) for line in open(built["out"] / "pairs.jsonl")]
    two = [json.loads(line) for line in open(out / "pairs.jsonl")]
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in one] == [(p["prompt"], p["chosen"], p["rejected"]) for p in two]
    for x, y in zip(metrics(built["out"])[1:], metrics(out)[1:]):
        assert x["train/loss"] == pytest.approx(y["train/loss"], abs=1e-5)


@pytest.mark.slow
def test_resume_replays_exactly(built, tmp_path):
    args = ["--pairs", str(built["out"] / "pairs.jsonl"), "--eval-every", "0", *ARGS]
    run_script("offline_dpo.py", ["--num-steps", "4", "--output-dir", str(tmp_path / "a"), *args])
    run_script("offline_dpo.py", ["--num-steps", "2", "--output-dir", str(tmp_path / "b"), *args])
    run_script("offline_dpo.py", ["--num-steps", "4", "--output-dir", str(tmp_path / "b"), "--resume", *args])
    a, b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert [x["step"] for x in b] == [1, 2, 3, 4]
    for x, y in zip(a[2:], b[2:]):
        assert x["train/loss"] == pytest.approx(y["train/loss"], abs=1e-6)
        assert x["train/chosen_logratio"] == pytest.approx(y["train/chosen_logratio"], abs=1e-5)


@pytest.mark.slow
def test_trains_on_an_existing_conversational_dataset(tmp_path):
    """The hub's conversational shape (ultrafeedback_binarized-like: chosen / rejected as message
    lists) and the plain string shape, mixed in one local file; no generation needed."""
    rows = []
    for word in ["abc", "xyz", "hello", "tiny"]:
        user = {"role": "user", "content": f"Write {word} in capital letters."}
        rows.append({"chosen": [user, {"role": "assistant", "content": word.upper()}],
                     "rejected": [user, {"role": "assistant", "content": word}]})
        rows.append({"prompt": f"Repeat this word: {word}", "chosen": word, "rejected": word[::-1]})
    data = write_jsonl(tmp_path / "prefs.jsonl", rows)
    out = tmp_path / "run"
    run_script("offline_dpo.py", ["--pairs", data, "--eval-every", "0", "--pairs-per-step", "4", "--epochs", "2",
                                  "--learning-rate", "1e-3", "--output-dir", str(out)])
    m = metrics(out)
    assert [x["step"] for x in m] == [1, 2, 3, 4] and m[-1]["train/epoch"] == pytest.approx(2.0)
    assert m[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert m[-1]["train/chosen_logratio"] > m[-1]["train/rejected_logratio"]  # it learns the preference


def test_bad_pairs_file_is_one_line(tmp_path):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "hi", "response": "x"}])
    r = subprocess.run([sys.executable, "offline_dpo.py", "--pairs", data, "--output-dir", str(tmp_path / "o")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "needs 'chosen' and 'rejected' columns" in r.stderr.strip().splitlines()[-1]
    assert "Traceback" not in r.stderr
