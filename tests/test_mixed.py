"""Math (Math-Verify) and chat (reward model) prompts in one batch, in all four scripts: per-task
metrics present and consistent with the rows, per-task evaluation, a task with no valid pair,
and two FSDP ranks with two references and padding passes."""

import json
import math

import pytest

from tests.conftest import metrics, run_script, write_jsonl

MIX = ["--dataset", "embedded/data/mix_train.jsonl", "--eval-dataset",
       "embedded/data/math_test.jsonl,embedded/data/chat_test.jsonl", "--eval-limit", "8", "--eval-samples", "2"]
EVAL_KEYS = ["eval/accuracy", "eval/accuracy_se", "eval/chat/reward_mean", "eval/chat/reward_mean_se",
             "eval/chat/length_mean", "eval/chat/reward_per_token"]


def check_task_split(x, n_samples):
    """The per-task means must recombine into the batch means: with f the math share of the step's
    samples, length = f·L_math + (1-f)·L_chat and reward = f·acc + (1-f)·R_chat, f a whole number
    of prompts."""
    assert x["rollout/accuracy"] == x["rollout/math/accuracy"]
    assert x["rollout/chat/reward_per_token"] == pytest.approx(x["rollout/chat/reward_mean"] / x["rollout/chat/length_mean"])
    lm, lc = x["rollout/math/length_mean"], x["rollout/chat/length_mean"]
    f = (x["rollout/length_mean"] - lc) / (lm - lc)
    assert 0 < f < 1 and f * n_samples == pytest.approx(round(f * n_samples), abs=1e-6)
    f = round(f * n_samples) / n_samples
    assert x["rollout/reward_mean"] == pytest.approx(f * x["rollout/math/accuracy"] + (1 - f) * x["rollout/chat/reward_mean"], abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("script", ["grpo.py", "online_dpo.py", "semi_online_dpo.py"])
def test_mixed_batches_end_to_end(tmp_path, script):
    out = tmp_path / "run"
    extra = ["--sync-interval", "2"] if script == "semi_online_dpo.py" else []
    run_script(script, ["--num-steps", "3", "--eval-every", "3", "--rm-offload", "--rm-max-length", "32",
                        "--output-dir", str(out), *MIX, *extra])
    m = metrics(out)
    assert set(EVAL_KEYS) <= set(m[0]) and set(EVAL_KEYS) <= set(m[-1])
    cut = [x["rollout/chat/rm_truncated"] for x in m[1:] if "rollout/chat/rm_truncated" in x]
    assert cut and cut == sorted(cut) and cut[-1] > 0  # rows cut to 32 tokens, counted since the start
    both = [x for x in m[1:] if "rollout/math/accuracy" in x and "rollout/chat/reward_mean" in x]
    assert both, "mix_train alternates tasks: a step of 8 shuffled prompts holds both"
    for x in both:
        check_task_split(x, 8 * 8)
        if script != "grpo.py":
            assert x["train/pairs"] == x["train/math/pairs"] + x["train/chat/pairs"]
            assert math.isfinite(x["train/loss"])


@pytest.mark.slow
def test_offline_mixed(tmp_path):
    out = tmp_path / "run"
    run_script("offline_dpo.py", ["--num-steps", "3", "--eval-every", "3", "--output-dir", str(out), *MIX])
    m = metrics(out)
    assert set(EVAL_KEYS) <= set(m[0]) and set(EVAL_KEYS) <= set(m[-1])
    pairs = [json.loads(line) for line in open(out / "pairs.jsonl")]
    chat = [p for p in pairs if p["task"] == "chat"]
    assert chat and all(p["chosen_reward"] > p["rejected_reward"] for p in chat)  # RM's highest vs lowest
    assert all(p["answer"] is None for p in chat) and all(p["answer"] for p in pairs if p["task"] == "math")
    for x in m[1:]:  # each step's own rollouts, scored by task
        if "rollout/math/accuracy" in x and "rollout/chat/reward_mean" in x:
            check_task_split(x, 8 * 8)
        assert x["train/pairs"] == x.get("train/math/pairs", 0) + x.get("train/chat/pairs", 0)


@pytest.mark.slow
def test_a_task_without_pairs_on_two_ranks(tmp_path):
    """Math prompts no sample can solve (no math pair, ever) among few chat prompts, on two FSDP
    ranks: steps where a rank, or every rank, has no pair run padding passes and finish; the math
    reward shows 0 and the chat pairs carry the step."""
    rows = [{"task": "math", "prompt": f"What is {a}+{a}?", "answer": "-999"} for a in range(14)]
    rows += [{"task": "chat", "prompt": "Write abc in capital letters."}, {"task": "chat", "prompt": "Repeat this word: xyz"}]
    data = tmp_path / "crafted.jsonl"
    write_jsonl(data, rows)
    out = tmp_path / "run"
    run_script("online_dpo.py", ["--dataset", str(data), "--prompts-per-step", "4", "--num-steps", "6", "--eval-every", "0",
                                 "--output-dir", str(out)], nproc=2)
    m = metrics(out)
    assert [x["step"] for x in m] == list(range(1, 7))
    assert all(x["train/math/pairs"] == 0 and x["rollout/math/accuracy"] == 0.0 for x in m if "train/math/pairs" in x)
    assert any(x.get("train/chat/pairs", 0) > 0 for x in m)
    assert any(x["train/pairs"] == 0 for x in m)  # a step with no pair on any rank (4 steps of 6 hold no chat row)
    assert all(math.isfinite(x["train/loss"]) for x in m)
