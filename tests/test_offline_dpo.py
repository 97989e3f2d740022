"""offline_dpo.py as s = ∞ of the same run: it samples, from the seed and before training, the
rollouts the online scripts would sample at each step, and trains each step on its own pairs;
`semi_online_dpo.py` with a sync interval past the run's end and a fixed reference reproduces it
step for step. Also: the saved pairs as an ordinary `datasets` dataset, `--pairs` reuse without
generation, two processes, an existing conversational preference dataset, resume."""

import json
import math
import subprocess
import sys

import pytest
import torch

import offline_dpo
import online_dpo
from common import load_prompts, math_reward, shuffled_indices
from tests.conftest import DETERMINISTIC, ROOT, SMALL, metrics, run_script, write_jsonl

TRAIN_KEYS = ["step", "train/loss", "train/kl_k1", "train/grad_norm", "train/lr", "train/pairs", "train/pair_accuracy",
              "train/chosen_logratio", "train/rejected_logratio", "train/nll", "train/reward_margin", "rollout/entropy",
              "rollout/policy_lag", "rollout/reward_mean", "rollout/accuracy", "rollout/length_mean",
              "perf/train_s", "perf/step_s", "perf/train_tokens", "perf/train_tokens_per_s", "perf/peak_memory_gb"]
# 10 problems the seed solves about half the time, and 4 whose "gold answer" no sample can match:
# those give all-wrong groups, which must not yield a pair.
EASY = [{"task": "math", "prompt": f"What is {a}+{b}?", "answer": str(a + b)}
        for a, b in [(10, 16), (20, 0), (23, 21), (15, 22), (29, 4), (7, 8), (12, 30), (3, 19), (25, 25), (14, 6)]]
IMPOSSIBLE = [{"task": "math", "prompt": f"What is {a}+{b}?", "answer": "-999"} for a, b in [(1, 2), (5, 5), (9, 2), (4, 17)]]
ARGS = ["--samples-per-prompt", "8", "--prompts-per-step", "4", "--num-steps", "3", "--save-every", "2", *SMALL]
# the online metrics that s = ∞ must reproduce step for step
SAME = ["train/loss", "train/pairs", "train/pair_accuracy", "train/chosen_logratio", "train/rejected_logratio",
        "train/reward_margin", "train/kl_k1", "train/nll", "train/grad_norm", "rollout/entropy", "rollout/reward_mean",
        "rollout/accuracy", "rollout/length_mean", "rollout/zero_std_frac", "rollout/policy_lag"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One single-process run that samples its pairs from the crafted set and trains on them."""
    tmp = tmp_path_factory.mktemp("offline")
    data = write_jsonl(tmp / "crafted.jsonl", [r for pair in zip(EASY[:4], IMPOSSIBLE) for r in pair] + EASY[4:])
    out = tmp / "run"
    r = run_script("offline_dpo.py", ["--dataset", data, "--eval-every", "3", "--output-dir", str(out), *ARGS])
    return {"data": data, "out": out, "stdout": r.stdout, "tmp": tmp}


def test_shared_functions_are_online_dpos():
    """Offline builds its pairs with the online rules and the same loss: same choices, same values."""
    rewards = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.3, 2.0, -1.0, 2.0], [0.5, 0.5, 0.5, 0.5]])
    tasks = ["math", "math", "chat", "chat"]
    for s in range(20):
        seeds = [s, s + 1, s + 2, s + 3]
        assert offline_dpo.select_pairs(rewards, tasks, seeds) == online_dpo.select_pairs(rewards, tasks, seeds)
    x = torch.tensor([[-3.0, -1.0], [-2.0, 0.5]])
    kw = dict(logps=x, ref_logps=x + 1, mask=torch.ones(2, 2), token_entropy=x.abs(), pair_weights=torch.tensor([0.5]),
              advantages=torch.tensor([1.0, -1.0]), beta=0.1, nll_scale=0.5, nll_pooling=0.2, entropy_coef=0.1,
              grpo_coef=0.01, length_norm="none", num_prompts=4, group_size=8)
    assert offline_dpo.dpo_loss(**kw) == online_dpo.dpo_loss(**kw)
    assert offline_dpo.group_terms([(0, 0, 1), (0, 2, 1)], rewards) == online_dpo.group_terms([(0, 0, 1), (0, 2, 1)], rewards)


@pytest.mark.slow
def test_samples_the_runs_own_prompts_and_pairs(built):
    import datasets

    pairs = datasets.load_dataset("json", data_files=str(built["out"] / "pairs.jsonl"), split="train")
    assert {"prompt", "chosen", "rejected", "chosen_reward", "rejected_reward", "task", "answer", "step", "position",
            "chosen_ids", "rejected_ids"} <= set(pairs.column_names)
    # step t, position g is the prompt online_dpo.py consumes there: the run's seeded order, no reuse
    rows = load_prompts(built["data"])
    order = shuffled_indices(len(rows), 1, 0)
    assert all(p["prompt"] == rows[order[(p["step"] - 1) * 4 + p["position"]]]["prompt"] for p in pairs)
    assert len({(p["step"], p["position"]) for p in pairs}) == len(pairs) <= 12  # one pair per prompt at most
    assert not {r["prompt"] for r in IMPOSSIBLE} & set(pairs["prompt"])  # all-wrong groups give no pair
    for p in pairs:  # the saved rewards are Math-Verify's verdicts on the saved texts
        assert math_reward(p["chosen"], p["answer"]) == 1.0 == p["chosen_reward"]
        assert math_reward(p["rejected"], p["answer"]) == 0.0 == p["rejected_reward"]
    m = metrics(built["out"])
    assert [x["step"] for x in m] == [0, 1, 2, 3] and "eval/accuracy" in m[0] and "eval/accuracy" in m[-1]
    assert m[0]["perf/rollout_tokens"] > 0 and "perf/generate_s" in m[0]  # the sampling, before training
    rollouts = [json.loads(line) for line in open(built["out"] / "rollouts.jsonl")]
    for x, r in zip(m[1:], rollouts, strict=True):
        assert set(TRAIN_KEYS) <= set(x), set(TRAIN_KEYS) - set(x)
        assert x["rollout/policy_lag"] == x["step"] - 1 and x["train/pairs"] == sum(p["step"] == x["step"] for p in pairs)
        assert x["rollout/reward_mean"] == r["rollout/reward_mean"]
    # policy == reference at the first step: each pair's loss is log 2, divided by all the step's prompts
    assert m[1]["train/kl_k1"] == 0.0 and m[1]["train/loss"] == pytest.approx(m[1]["train/pairs"] * math.log(2) / 4, abs=1e-6)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(built["out"] / "checkpoint"))


@pytest.mark.slow
@pytest.mark.skipif(not DETERMINISTIC, reason="compares two runs number for number: vLLM on a GPU is not deterministic")
def test_is_semi_online_with_a_sync_interval_past_the_end(built, tmp_path):
    """s = ∞ is the same run as semi-online DPO whose only sync is the first one, with the fixed
    reference: the same rollouts, pairs, losses and updates, step for step."""
    out = tmp_path / "semi"
    run_script("semi_online_dpo.py", ["--dataset", built["data"], "--sync-interval", "1000", "--ref-sync", "no",
                                      "--eval-every", "3", "--output-dir", str(out), *ARGS, "--save-every", "1000"])
    off, semi = metrics(built["out"]), metrics(out)
    assert [x["step"] for x in off] == [x["step"] for x in semi]
    # not vacuous: pairs were formed and trained on (a verifier scoring everything 0 would give none)
    assert sum(x["train/pairs"] for x in off[1:]) > 0 and max(x["train/loss"] for x in off[1:]) > 0
    for x, y in zip(off[1:], semi[1:], strict=True):
        for k in SAME:
            assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-6), (x["step"], k, x[k], y[k])
    assert off[-1]["eval/accuracy"] == pytest.approx(semi[-1]["eval/accuracy"], abs=1e-9)


@pytest.mark.slow
@pytest.mark.skipif(not DETERMINISTIC, reason="compares two runs number for number: vLLM on a GPU is not deterministic")
def test_pairs_reuse_skips_generation(built, tmp_path):
    out = tmp_path / "again"
    r = run_script("offline_dpo.py", ["--pairs", str(built["out"] / "pairs.jsonl"), "--eval-every", "0",
                                      "--output-dir", str(out), *ARGS])
    assert "sampling from the seed" in built["stdout"] and "sampling from the seed" not in r.stdout
    a, b = metrics(built["out"]), metrics(out)
    assert [x["step"] for x in b] == [1, 2, 3]
    for x, y in zip(a[1:], b):  # the same pairs per step, the same init: the same training and rollout metrics
        assert x["train/loss"] == pytest.approx(y["train/loss"], abs=1e-6)
        assert x["rollout/reward_mean"] == y["rollout/reward_mean"]


@pytest.mark.slow
@pytest.mark.skipif(not DETERMINISTIC, reason="compares two runs number for number: vLLM on a GPU is not deterministic")
def test_torchrun_two_processes(built, tmp_path):
    """Two ranks sample the same rollouts as one (the seeds are a function of the prompt's place in
    the step, not of the rank), each trains on the pairs of its own prompts."""
    out = tmp_path / "run2"
    run_script("offline_dpo.py", ["--dataset", built["data"], "--eval-every", "3", "--output-dir", str(out), *ARGS], nproc=2)
    one = [json.loads(line) for line in open(built["out"] / "pairs.jsonl")]
    two = [json.loads(line) for line in open(out / "pairs.jsonl")]
    assert [(p["step"], p["position"], p["chosen"], p["rejected"]) for p in one] == \
           [(p["step"], p["position"], p["chosen"], p["rejected"]) for p in two]
    for x, y in zip(metrics(built["out"])[1:], metrics(out)[1:], strict=True):
        assert x["train/loss"] == pytest.approx(y["train/loss"], abs=1e-5)


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
    run_script("offline_dpo.py", ["--pairs", data, "--eval-every", "0", "--prompts-per-step", "4", "--epochs", "2",
                                  "--learning-rate", "1e-3", "--output-dir", str(out)])
    m = metrics(out)
    assert [x["step"] for x in m] == [1, 2, 3, 4] and m[-1]["train/epoch"] == pytest.approx(2.0)
    assert m[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert m[-1]["train/chosen_logratio"] > m[-1]["train/rejected_logratio"]  # it learns the preference


def test_bad_pairs_file_is_one_line(tmp_path):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "hi", "response": "x"}])
    r = subprocess.run([sys.executable, "offline_dpo.py", "--pairs", data, "--output-dir", str(tmp_path / "o")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "no 'chosen' and 'rejected' columns (line 1)" in r.stderr.strip().splitlines()[-1]
    assert "Traceback" not in r.stderr
