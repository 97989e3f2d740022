"""Prompt and preference loading on small files in the exact layouts of the public datasets people
train on (task, prompt, and a gold that scores the right answer and no other), the drop-and-count
rules, and the one-line errors for bad input."""

import json
import subprocess
import sys

import pytest
import torch

import common
from common import PAPER_MATH_TEMPLATE, UserError, last_boxed, load_pairs, load_prompts, math_reward
from tests.conftest import write_jsonl

ENDING = "The final answer is $\\boxed{{{}}}$. I hope it is correct."

# One row per public layout: (name, raw row, expected task, expected prompt, right answer, wrong answer)
GSM8K = {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
                     "in May. How many clips did Natalia sell altogether in April and May?",
         "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
                   "altogether in April and May.\n#### 72"}
GSM8K_COMMA = {"question": "How many?", "answer": "12*100=<<12*100=1200>>1,200\n#### 1,200"}
MATH500 = {"problem": "Convert the point $(0,3)$ in rectangular coordinates to polar coordinates.",
           "solution": "We have that $r = 3.$ ... Therefore, the polar coordinates are "
                       "$\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}.$",
           "answer": "\\left( 3, \\frac{\\pi}{2} \\right)", "subject": "Precalculus", "level": 2,
           "unique_id": "test/precalculus/807.json"}
MATH500_DOLLAR = {"problem": "What is the total cost?", "solution": "... $\\boxed{\\$18.90}$.",
                  "answer": "\\$18.90", "subject": "Prealgebra", "level": 2, "unique_id": "test/prealgebra/1.json"}
NUMINA = {"source": "cn_k12", "problem": "Given $x+y=5$ and $x-y=1$, find $x$.",
          "solution": "Adding the equations, $2x=6$, so $x=\\boxed{3}$.",
          "messages": [{"content": "Given $x+y=5$ and $x-y=1$, find $x$.", "role": "user"},
                       {"content": "Adding the equations, $2x=6$, so $x=\\boxed{3}$.", "role": "assistant"}]}
NUMINA_PROOF = {"source": "olympiads", "problem": "Prove that $n^3-n$ is divisible by 6 for every integer $n$.",
                "solution": "We have $n^3-n=(n-1)n(n+1)$, a product of three consecutive integers, "
                            "hence divisible by 2 and 3. $\\blacksquare$",
                "messages": [{"content": "Prove that ...", "role": "user"}, {"content": "...", "role": "assistant"}]}
NUMINA_CHOICE = {"source": "cn_k12", "problem": "Which of the following is even?\nA: 1\nB: 3\nC: 4\nD: 5",
                 "solution": "Only 4 is even, so the answer is $\\boxed{C}$.", "messages": []}
NUMINA_SYNTHETIC = {"source": "synthetic_math", "problem": "What is $2+2$?", "solution": "$\\boxed{4}$",
                    "messages": []}
AMC23 = {"id": 0, "question": "How many positive perfect squares less than 2023 are divisible by 5?",
         "answer": 8.0, "url": "https://artofproblemsolving.com/wiki/index.php/2023_AMC_10A_Problems/Problem_3"}
AMC23_PROBLEM = {"problem": "What is $3^3$?", "answer": 27}
DAPO = {"prompt": "Solve the following math problem step by step. The last line of your response should be of "
                  "the form Answer: $Answer.\n\nWhat is $3^3$?\n\nRemember to put your answer on its own line.",
        "solution": "27", "data_source": "math_dapo", "ability": "MATH",
        "reward_model": {"ground_truth": "27", "style": "rule-lighteval/MATH_v2"}, "extra_info": {"index": "x"}}
TRL_PROMPT_ONLY = {"prompt": [{"role": "user", "content": "What color is the sky?"}]}
OPENR1 = {"prompt": [{"role": "system", "content": "Think step by step."},
                     {"role": "user", "content": "What is $6 \\times 7$?"}], "answer": "42"}
DEEPMATH = {"question": "Evaluate $\\lim_{x\\to 0} \\frac{\\sin x}{x}$.", "final_answer": "1", "difficulty": 3.0,
            "topic": "Mathematics -> Calculus", "r1_solution_1": "..."}
WILDCHAT = {"conversation_hash": "abc", "model": "gpt-4-0314", "turn": 1, "language": "English",
            "conversation": [{"content": "Write a haiku about rain.", "country": "US", "hashed_ip": "h",
                              "language": "English", "redacted": False, "role": "user", "toxic": False,
                              "turn_identifier": 1},
                             {"content": "Rain on the rooftop...", "role": "assistant", "language": "English",
                              "redacted": False, "toxic": False, "turn_identifier": 1}],
            "openai_moderation": [{"flagged": False}], "toxic": False, "redacted": False}
WILDCHAT_EMPTY = {**WILDCHAT, "conversation": [{"content": "", "role": "user", "toxic": False},
                                               {"content": "How can I help?", "role": "assistant"}]}


@pytest.mark.parametrize("raw,right,wrong", [
    (GSM8K, "72", "73"), (GSM8K_COMMA, "1200", "120"), (MATH500, "(3, \\frac{\\pi}{2})", "(3, \\pi)"),
    (MATH500_DOLLAR, "18.90", "18.80"), (NUMINA, "3", "2"), (AMC23, "8", "7"), (AMC23_PROBLEM, "27", "26"),
    (DAPO, "27", "28"), (OPENR1, "42", "24"), (DEEPMATH, "1", "0"),
], ids=["gsm8k", "gsm8k-comma", "math500", "math500-dollar", "numina", "amc23", "amc23-problem", "dapo",
        "openr1-messages", "deepmath"])
def test_math_layouts_route_to_math_with_a_gold_that_scores(tmp_path, raw, right, wrong):
    (row,) = load_prompts(write_jsonl(tmp_path / "d.jsonl", [raw]))
    assert row["task"] == "math"
    assert math_reward(ENDING.format(right), row["answer"]) == 1.0
    assert math_reward(ENDING.format(wrong), row["answer"]) == 0.0


def test_math_prompts():
    rows = {name: common.data.read_prompt_row(raw)[0] for name, raw in
            [("gsm8k", GSM8K), ("math500", MATH500), ("amc23", AMC23), ("dapo", DAPO), ("openr1", OPENR1)]}
    assert rows["gsm8k"]["prompt"] == PAPER_MATH_TEMPLATE.format(problem=GSM8K["question"])
    assert rows["math500"]["prompt"] == PAPER_MATH_TEMPLATE.format(problem=MATH500["problem"])
    assert rows["amc23"]["prompt"] == PAPER_MATH_TEMPLATE.format(problem=AMC23["question"])
    assert rows["dapo"]["prompt"] == DAPO["prompt"]  # a ready prompt is used verbatim
    assert rows["openr1"]["prompt"] == OPENR1["prompt"]  # messages, system turn kept


def test_chat_layouts():
    trl = common.data.read_prompt_row(TRL_PROMPT_ONLY)[0]
    assert trl == {"task": "chat", "prompt": "What color is the sky?", "answer": None}
    wild = common.data.read_prompt_row(WILDCHAT)[0]
    assert wild == {"task": "chat", "prompt": "Write a haiku about rain.", "answer": None}  # first turn only


def test_rows_that_cannot_be_read_right_are_dropped_and_counted(tmp_path, capsys):
    numina_like = [NUMINA, NUMINA_PROOF, {"problem": "Show it.", "solution": "A long argument.\nDone."},
                   {"prompt": "Find x.", "answer": "A worked answer\nover two lines, no box."}]
    rows = load_prompts(write_jsonl(tmp_path / "numina.jsonl", numina_like), verbose=True)
    assert [r["task"] for r in rows] == ["math"]  # never handed to the reward model as chat
    out = capsys.readouterr().out
    assert "4 rows read -> 1 math, 0 chat; dropped 3 math row without a gold answer (line 2, line 3, line 4)" in out
    chat = load_prompts(write_jsonl(tmp_path / "wild.jsonl", [WILDCHAT, WILDCHAT_EMPTY, {"text": "x"}, WILDCHAT]),
                        verbose=True)
    assert len(chat) == 2
    out = capsys.readouterr().out
    assert "1 empty prompt or turn (line 2)" in out and "1 no prompt column (line 3)" in out
    with pytest.raises(UserError, match=r"no usable row in 2 \(2 math row without a gold answer"):
        load_prompts(write_jsonl(tmp_path / "proofs.jsonl", [NUMINA_PROOF, NUMINA_PROOF]))


def test_paper_math_filter(tmp_path, capsys):
    rows = [NUMINA, NUMINA_PROOF, NUMINA_CHOICE, NUMINA_SYNTHETIC, {**NUMINA, "source": "olympiads"}]
    path = write_jsonl(tmp_path / "numina.jsonl", rows)
    assert len(load_prompts(path)) == 4  # proof dropped (no gold); choice and synthetic kept
    kept = load_prompts(path, paper_math_filter=True, verbose=True)
    assert [r["answer"] for r in kept] == ["3", "3"]
    out = capsys.readouterr().out
    assert "1 paper filter: multiple choice (line 3)" in out and "1 paper filter: synthetic subset (line 4)" in out


def test_forced_task(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "Tell me a joke."}, {"question": "Why?"}])
    with pytest.raises(UserError, match="math row without a gold answer"):
        load_prompts(path)  # looks like math, has no gold: refused, never scored as chat
    assert load_prompts(f"chat:{path}")[1] == {"task": "chat", "prompt": "Why?", "answer": None}  # forced: verbatim
    mixed = write_jsonl(tmp_path / "m.jsonl", [{"task": "math", "prompt": "1+1?", "answer": "2"},
                                               {"task": "chat", "prompt": "Hi"}])
    assert [r["task"] for r in load_prompts(f"math:{mixed}")] == ["math"]  # the chat row is dropped, not converted
    assert [r["task"] for r in load_prompts(mixed, task="chat")] == ["chat"]


def test_spec_grammar():
    parse = common.data._parse_spec
    assert parse("openai/gsm8k@main") == [(None, "openai/gsm8k", "main", None)]
    assert parse("math:openai/gsm8k@main:2, chat:allenai/WildChat-1M:1") == [
        ("math", "openai/gsm8k", "main", 2.0), ("chat", "allenai/WildChat-1M", None, 1.0)]
    assert parse("./data/a@b.jsonl:0.5") == [(None, "./data/a@b.jsonl", None, 0.5)]  # files keep their '@'


def test_hub_config_reaches_datasets(tmp_path):
    """A local copy of a hub dataset with configs (GSM8K's `main` / `socratic` layout): the config
    given after '@' is the one loaded."""
    for config, answer in (("main", "#### 72"), ("socratic", "#### 99")):
        (tmp_path / config).mkdir()
        write_jsonl(tmp_path / config / "test.jsonl", [{"question": "Q?", "answer": answer}])
    (tmp_path / "README.md").write_text(
        "---\nconfigs:\n- config_name: main\n  data_files:\n  - split: test\n    path: main/test.jsonl\n"
        "- config_name: socratic\n  data_files:\n  - split: test\n    path: socratic/test.jsonl\n---\n")
    assert load_prompts(f"{tmp_path}@main", split="test")[0]["answer"] == "72"
    assert load_prompts(f"{tmp_path}@socratic", split="test")[0]["answer"] == "99"


def test_json_files(tmp_path):
    import datasets

    (tmp_path / "list.json").write_text(json.dumps([{"prompt": "Hi"}]))
    assert load_prompts(str(tmp_path / "list.json"))[0]["task"] == "chat"
    (tmp_path / "lines.json").write_text(json.dumps(GSM8K) + "\n" + json.dumps(AMC23) + "\n")  # JSON lines
    assert [r["answer"] for r in load_prompts(str(tmp_path / "lines.json"))] == ["72", "8.0"]
    datasets.Dataset.from_list([MATH500] * 3).to_parquet(str(tmp_path / "d.parquet"))
    assert load_prompts(str(tmp_path / "d.parquet"), limit=2)[1]["answer"] == MATH500["answer"]


def test_preference_layouts(tmp_path):
    user = {"role": "user", "content": "What color is the sky?"}
    blue, green = {"role": "assistant", "content": "It is blue."}, {"role": "assistant", "content": "It is green."}
    ultrafeedback = {"prompt": "What color is the sky?", "prompt_id": "p1", "chosen": [user, blue],
                     "rejected": [user, green], "messages": [user, blue], "score_chosen": 8.0, "score_rejected": 4.0}
    trl_explicit = {"prompt": [user], "chosen": [blue], "rejected": [green]}
    trl_implicit = {"chosen": [user, blue], "rejected": [user, green]}
    trl_standard = {"prompt": "What color is the sky?", "chosen": "It is blue.", "rejected": "It is green."}
    hh = {"chosen": "\n\nHuman: What color is the sky?\n\nAssistant: Why?\n\nHuman: Just tell me.\n\nAssistant: It is blue.",
          "rejected": "\n\nHuman: What color is the sky?\n\nAssistant: Why?\n\nHuman: Just tell me.\n\nAssistant: It is green."}
    pairs = load_pairs(write_jsonl(tmp_path / "p.jsonl", [ultrafeedback, trl_explicit, trl_implicit, trl_standard, hh]))
    for p in pairs[:4]:
        assert (p["task"], p["prompt"], p["chosen"], p["rejected"]) == ("chat", "What color is the sky?", "It is blue.", "It is green.")
    assert pairs[4]["prompt"] == [user, {"role": "assistant", "content": "Why?"}, {"role": "user", "content": "Just tell me."}]
    assert (pairs[4]["chosen"], pairs[4]["rejected"]) == ("It is blue.", "It is green.")


def test_bad_preference_rows_are_dropped_and_counted(tmp_path, capsys):
    good = {"prompt": "Hi", "chosen": "a", "rejected": "b"}
    rows = [good, {"prompt": "Hi", "chosen": "a"}, {"chosen": "a", "rejected": "b"},
            {"prompt": "Hi", "chosen": 3, "rejected": "b"},
            {"chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a"}],
             "rejected": [{"role": "user", "content": "y"}, {"role": "assistant", "content": "b"}]},
            {"task": "math", "prompt": "1+1?", "chosen": "2", "rejected": "3", "chosen_eos": True, "rejected_eos": False}]
    pairs = load_pairs(write_jsonl(tmp_path / "p.jsonl", rows), verbose=True)
    assert len(pairs) == 2 and pairs[1]["task"] == "math" and pairs[1]["rejected_eos"] is False
    out = capsys.readouterr().out
    assert "6 rows read -> 2 pairs; dropped" in out and "2 no prompt" in out and "(line 3, line 5)" in out
    with pytest.raises(UserError, match="no usable row in 1"):
        load_pairs(write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "Hi", "chosen": "a"}]))


def test_paper_template_is_the_papers():
    t = PAPER_MATH_TEMPLATE.format(problem="P")
    assert t.startswith("Given the following problem, reason and give a final answer to the problem.\nProblem: P\n")
    assert t.endswith("'The final answer is $\\boxed{[answer]}$. I hope it is correct.' where [answer] is the response to the problem.")


def test_last_boxed_balances_braces():
    assert last_boxed("a \\boxed{1} b \\boxed{\\frac{1}{2}} c") == "\\frac{1}{2}"
    assert last_boxed("no answer") is None
    assert last_boxed("\\boxed{unclosed") is None


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
    with pytest.raises(UserError, match="no usable row in 0"):
        load_prompts(write_jsonl(tmp_path / "empty.jsonl", []))
    with pytest.raises(UserError, match=r"task 'code' is not math or chat \(line 1\)"):
        load_prompts(write_jsonl(tmp_path / "t.jsonl", [{"task": "code", "prompt": "p"}]))


def test_fit_prompts_names_the_cause(tiny_model_dir):
    tok = common.load_tokenizer(tiny_model_dir)
    rows = [{"task": "chat", "prompt": "x" * n, "answer": None} for n in (10, 20, 200)]
    kept, ids, dropped = common.fit_prompts(tok, rows, 60, need=2, what="--dataset")
    assert len(kept) == 2 and dropped == 1 and all(len(i) <= 60 for i in ids)
    with pytest.raises(UserError, match=r"--dataset has 3 usable prompts, fewer than one step needs \(8\)"):
        common.fit_prompts(tok, rows, 60, need=8, what="--dataset")
    with pytest.raises(UserError, match=r"only 0 of 3 prompts fit .* = 5 tokens \(the shortest has \d+ .*--max-model-len"):
        common.fit_prompts(tok, rows, 5, need=1, what="--eval-dataset")


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


def test_dataset_mixtures(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"What is {i}+1?", "answer": str(i + 1)} for i in range(30)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"Say {i}."} for i in range(10)])
    assert [r["task"] for r in load_prompts(f"{a},{b}")] == ["math"] * 30 + ["chat"] * 10  # concatenated
    mixed = load_prompts(f"{a}:1,{b}:3")  # shares 1:3 of the concatenation's 40 rows
    assert len(mixed) == 40 and sum(r["task"] == "chat" for r in mixed) == 30
    assert len({r["prompt"] for r in mixed if r["task"] == "chat"}) == 10  # the small one repeats, all rows used
    assert mixed == load_prompts(f"{a}:1,{b}:3")  # a fixed order
    assert load_prompts(f"{a}:1,{b}:3", seed=2) == load_prompts(f"{a}:1,{b}:3", seed=2) != mixed  # the run's seed draws it
    assert len(load_prompts(f"{a}:1,{b}:0")) == 40 and all(r["task"] == "math" for r in load_prompts(f"{a}:1,{b}:0"))
    with pytest.raises(UserError, match="give every dataset a weight"):
        load_prompts(f"{a}:1,{b}")
    assert load_prompts(f"{a}", limit=5)[-1]["answer"] == "5"
