"""docs/fork.md's four forks, proven: each diff applies (`git apply`) to a copy of its script, and
the forked script runs a few steps on the embedded default and shows the fork in its metrics."""

import json
import os
import re
import shutil
import subprocess

import pytest

from tests.conftest import EMBEDDED, ROOT, metrics, run_script, write_jsonl

DOC = os.path.join(ROOT, "docs", "fork.md")
RUN = ["--num-steps", "2", "--prompts-per-step", "4", "--eval-every", "2", "--eval-limit", "8",
       "--eval-samples", "2", "--save-every", "2"]


def fork(name, tmp_path):
    """The fork's diff from docs/fork.md applied to a copy of its script in tmp_path; the path of
    the forked script."""
    doc = open(DOC, encoding="utf-8").read()
    block = re.search(rf"<!-- fork:{name} -->\n```diff\n(.*?)```\n<!-- /fork:{name} -->", doc, re.S)
    assert block, name
    diff = block.group(1)
    script = re.match(r"--- a/(\S+)", diff).group(1)
    shutil.copy(os.path.join(ROOT, script), tmp_path / script)
    (tmp_path / "fork.diff").write_text(diff, encoding="utf-8")
    r = subprocess.run(["git", "apply", "fork.diff"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, f"docs/fork.md's {name} diff no longer applies to {script}: {r.stderr}"
    return str(tmp_path / script)


@pytest.mark.slow
def test_fork_length_penalty(tmp_path):
    """grpo.py with a length penalty on the math reward: the rollouts' reward is the share of right
    answers minus 0.002 x their mean length."""
    out = tmp_path / "run"
    run_script(fork("length_penalty", tmp_path), [*RUN, "--output-dir", str(out)])
    steps = [m for m in metrics(out) if m["step"] > 0]
    assert len(steps) == 2
    for m in steps:
        # every row is math: accuracy (here the mean math reward) = reward_mean, below the right share
        assert m["rollout/reward_mean"] == pytest.approx(m["rollout/accuracy"])
        assert m["rollout/reward_mean"] < 1 - 0.002 * m["rollout/length_mean"] + 1e-6
    assert "eval/accuracy" in steps[-1] and 0 <= steps[-1]["eval/accuracy"] <= 1  # still verified only


@pytest.mark.slow
def test_fork_ipo(tmp_path):
    """online_dpo.py with IPO's loss: the reference is re-synced every step on math, so each step's
    loss before its update is (1/2β)² per pair / prompts: 25 per pair at β = 0.1."""
    out = tmp_path / "run"
    run_script(fork("ipo", tmp_path), [*RUN, "--output-dir", str(out)])
    steps = [m for m in metrics(out) if m["step"] > 0]
    assert len(steps) == 2
    for m in steps:
        assert m["train/pairs"] > 0
        assert m["train/loss"] == pytest.approx(25 * m["train/pairs"] / 4, rel=1e-4)


@pytest.mark.slow
def test_fork_own_columns(tmp_path):
    """semi_online_dpo.py reading a dataset with its own columns ({"question", "final"}): the
    embedded math prompts in those columns train and evaluate; rows without "final" are dropped."""
    def own(name, n):
        rows = [json.loads(line) for line in open(os.path.join(EMBEDDED, "data", name))][:n]
        return [{"question": r["prompt"], "final": r["answer"]} for r in rows] + [{"question": "x"}]

    train = write_jsonl(tmp_path / "train.jsonl", own("math_train.jsonl", 64))
    test = write_jsonl(tmp_path / "test.jsonl", own("math_test.jsonl", 16))
    out = tmp_path / "run"
    r = run_script(fork("own_columns", tmp_path), [*RUN, "--sync-interval", "2", "--dataset", train,
                                                   "--eval-dataset", test, "--output-dir", str(out)])
    assert "64 math" in r.stdout and "dropped by the script's read_row" in r.stdout, r.stdout[-2000:]
    steps = [m for m in metrics(out) if m["step"] > 0]
    assert len(steps) == 2 and steps[-1]["eval/problems"] == 8
    assert all(m["rollout/accuracy"] > 0 for m in steps)  # the answers came from the "final" column


@pytest.mark.slow
def test_fork_per_task_reference(tmp_path):
    """online_dpo.py with a reference per task, on two ranks: math prompts no sample can solve (no
    math pair, ever) among few chat prompts, so steps where a rank, or every rank, has no pair run
    padding passes through both references and finish; the chat pairs are scored against the
    fixed seed, so once the policy has moved their log-ratios are not 0."""
    rows = [{"task": "math", "prompt": f"What is {a}+{a}?", "answer": "-999"} for a in range(14)]
    rows += [{"task": "chat", "prompt": "Write abc in capital letters."},
             {"task": "chat", "prompt": "Repeat this word: xyz"}]
    data = write_jsonl(tmp_path / "crafted.jsonl", rows)
    out = tmp_path / "run"
    run_script(fork("per_task_reference", tmp_path), ["--dataset", data, "--prompts-per-step", "4", "--num-steps", "6",
                                                      "--eval-every", "0", "--ref-sync", "per-task",
                                                      "--output-dir", str(out)], nproc=2)
    m = metrics(out)
    assert [x["step"] for x in m] == list(range(1, 7))
    assert all(x.get("train/math/pairs", 0) == 0 for x in m)
    assert any(x["train/pairs"] == 0 for x in m)  # a step with no pair on any rank
    first = next(i for i, x in enumerate(m) if x["train/pairs"] > 0)  # the first update
    moved = [x for x in m[first + 1:] if x["train/pairs"] > 0]
    assert moved and all(x["train/chosen_logratio"] != 0.0 for x in moved)  # against the seed
