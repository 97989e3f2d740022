"""Prompt loading (local files, column mapping) and the one-line errors for bad input."""

import json
import subprocess
import sys

import pytest
import torch

import common
from common import PAPER_MATH_TEMPLATE, UserError, last_boxed, load_prompts
from tests.conftest import write_jsonl


def test_shapes_are_normalised(tmp_path):
    rows = load_prompts(write_jsonl(tmp_path / "d.jsonl", [
        {"problem": "1+1?", "answer": "2"},  # math, templated
        {"prompt": "What is 3+4?", "answer": 7},  # math, verbatim prompt, int answer
        {"problem": "Area?", "solution": "... so \\boxed{\\frac{1}{2}}."},  # NuminaMath shape
        {"prompt": "Write a haiku."},  # chat
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "Hi!"},
                      {"role": "assistant", "content": "x"}]},  # WildChat shape
        {"task": "chat", "prompt": "Explain 2+2.", "answer": "4"},  # explicit task wins
    ]))
    assert rows[0] == {"task": "math", "prompt": PAPER_MATH_TEMPLATE.format(problem="1+1?"), "answer": "2"}
    assert rows[1] == {"task": "math", "prompt": "What is 3+4?", "answer": "7"}
    assert rows[2]["answer"] == "\\frac{1}{2}"
    assert rows[3] == {"task": "chat", "prompt": "Write a haiku.", "answer": None}
    assert rows[4]["prompt"] == "Hi!"
    assert rows[5]["task"] == "chat" and rows[5]["answer"] is None


def test_paper_template_is_the_papers():
    t = PAPER_MATH_TEMPLATE.format(problem="P")
    assert t.startswith("Given the following problem, reason and give a final answer to the problem.\nProblem: P\n")
    assert t.endswith("'The final answer is $\\boxed{[answer]}$. I hope it is correct.' where [answer] is the response to the problem.")


def test_last_boxed_balances_braces():
    assert last_boxed("a \\boxed{1} b \\boxed{\\frac{1}{2}} c") == "\\frac{1}{2}"
    assert last_boxed("no answer") is None
    assert last_boxed("\\boxed{unclosed") is None


def test_json_and_parquet(tmp_path):
    import datasets

    (tmp_path / "d.json").write_text(json.dumps([{"prompt": "Hi"}]))
    assert load_prompts(str(tmp_path / "d.json"))[0]["task"] == "chat"
    datasets.Dataset.from_list([{"problem": "p", "answer": "1"}]).to_parquet(str(tmp_path / "d.parquet"))
    assert load_prompts(str(tmp_path / "d.parquet"))[0]["answer"] == "1"


@pytest.mark.parametrize("rows,match", [
    ([{"prompt": "ok"}, {"text": "no prompt"}], r"row 1: no prompt column .*\['text'\]"),
    ([{"problem": "p"}], r"row 0: no prompt column"),
    ([{"task": "math", "prompt": "p"}], r"row 0: math row without a gold answer"),
    ([{"prompt": "   "}], r"row 0: the prompt is empty"),
    ([{"task": "code", "prompt": "p"}], r"row 0: column 'task' is 'code'"),
    ([], r"has no rows"),
])
def test_bad_rows_name_row_and_column(tmp_path, rows, match):
    with pytest.raises(UserError, match=match):
        load_prompts(write_jsonl(tmp_path / "d.jsonl", rows))


def test_bad_files(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "ok"}\n{not json\n')
    with pytest.raises(UserError, match="line 2 is not valid JSON"):
        load_prompts(str(p))
    with pytest.raises(UserError, match="does not exist"):
        load_prompts(str(tmp_path / "missing.jsonl"))
    (tmp_path / "d.csv").write_text("prompt\nhi\n")
    with pytest.raises(UserError, match="unknown format '.csv'"):
        load_prompts(str(tmp_path / "d.csv"))


def test_bad_models(tmp_path, tiny_model_dir):
    with pytest.raises(UserError, match="does not exist"):
        common.load_model(str(tmp_path / "nope"), torch.device("cpu"))
    with pytest.raises(UserError, match="does not exist"):
        common.load_tokenizer("./no/such/model")
    # a tokenizer without a chat template
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(tiny_model_dir, bare)
    (bare / "chat_template.jinja").unlink()
    with pytest.raises(UserError, match="no chat template"):
        common.load_tokenizer(str(bare))


def test_user_error_is_one_line_without_traceback():
    r = subprocess.run([sys.executable, "-c", "import common; common.load_prompts('missing.jsonl')"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr == "error: dataset file 'missing.jsonl' does not exist\n"


def test_preference_shapes_are_normalised(tmp_path):
    from common import load_pairs

    user = {"role": "user", "content": "Hi"}
    pairs = load_pairs(write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "Hi", "chosen": "a", "rejected": "b"},  # standard
        {"chosen": [user, {"role": "assistant", "content": "a"}], "rejected": [user, {"role": "assistant", "content": "b"}]},
        {"prompt": [user], "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]},
        {"task": "math", "prompt": "1+1?", "chosen": "2", "rejected": "3", "chosen_eos": True, "rejected_eos": False},
    ]))
    assert pairs[0] == {"task": "chat", "prompt": "Hi", "chosen": "a", "rejected": "b", "chosen_eos": True, "rejected_eos": True}
    assert pairs[1]["prompt"] == [user] and pairs[1]["chosen"] == "a" and pairs[1]["rejected"] == "b"
    assert pairs[2]["prompt"] == [user] and pairs[2]["chosen"] == "a"
    assert pairs[3]["task"] == "math" and pairs[3]["rejected_eos"] is False
    for bad, msg in [({"prompt": "Hi", "chosen": "a"}, "needs 'chosen' and 'rejected'"),
                     ({"chosen": "a", "rejected": "b"}, "no prompt"),
                     ({"prompt": "Hi", "chosen": 3, "rejected": "b"}, "must be a string or a list of messages")]:
        with pytest.raises(UserError, match=msg):
            load_pairs(write_jsonl(tmp_path / "bad.jsonl", [bad]))


def test_dataset_mixtures(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"What is {i}+1?", "answer": str(i + 1)} for i in range(30)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"Say {i}."} for i in range(10)])
    assert [r["task"] for r in load_prompts(f"{a},{b}")] == ["math"] * 30 + ["chat"] * 10  # concatenated
    mixed = load_prompts(f"{a}:1,{b}:3")  # shares 1:3 of the concatenation's 40 rows
    assert len(mixed) == 40 and sum(r["task"] == "chat" for r in mixed) == 30
    assert len({r["prompt"] for r in mixed if r["task"] == "chat"}) == 10  # the small one repeats, all rows used
    assert mixed == load_prompts(f"{a}:1,{b}:3")  # a fixed order
    assert len(load_prompts(f"{a}:1,{b}:0")) == 40 and all(r["task"] == "math" for r in load_prompts(f"{a}:1,{b}:0"))
    with pytest.raises(UserError, match="give every dataset a weight"):
        load_prompts(f"{a}:1,{b}")
    assert load_prompts(f"{a}", limit=5)[-1]["answer"] == "5"
    # AMC23's shape: `question` + `answer`
    assert load_prompts(write_jsonl(tmp_path / "amc.jsonl", [{"question": "Q?", "answer": 3}]))[0]["prompt"] == \
        PAPER_MATH_TEMPLATE.format(problem="Q?")
