"""The data path at the paper's scale changes the cost, nothing else: the same rows, order, drops,
"data:" lines and token ids as the path it replaced (every prompt rendered by Jinja and tokenized,
parquet read through `datasets`), kept here as the reference, on a file with every case."""

import json
import os

import datasets

import common
import common.data
import common.models
from embedded.tiny import build_tokenizer
from tests.conftest import EMBEDDED, write_jsonl
from tests.test_numerics import llama3_tokenizer

LONG = "word " * 60  # ~300 characters: over the limit below with any frame


def reference_fit(tokenizer, rows, max_prompt_tokens):
    """The path before: Jinja renders every prompt, each is tokenized, the long ones dropped."""
    ids = [tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}]
                                                   if isinstance(r["prompt"], str) else r["prompt"],
                                                   tokenize=False, add_generation_prompt=True),
                     add_special_tokens=False)["input_ids"] for r in rows]
    keep = [i for i, x in enumerate(ids) if len(x) <= max_prompt_tokens]
    return [rows[i] for i in keep], [ids[i] for i in keep]


def every_case():
    """Raw rows in NuminaMath-CoT's layout and others: kept, dropped for each reason, short and too
    long, exactly at the limit, non-ASCII, whitespace at the edges, message lists, chat rows."""
    rows = []
    for i in range(40):
        problem = f"What is {i}+{i}?" + (" é漢 ∑" if i % 5 == 0 else "") + ("  \n" if i % 7 == 0 else "")
        rows.append({"source": "olympiads", "problem": problem, "solution": f"So \\boxed{{{2 * i}}}.",
                     "messages": [{"role": "user", "content": problem}]})
    rows += [
        {"source": "synthetic_math", "problem": "What is 1+1?", "solution": "\\boxed{2}", "messages": []},
        {"source": "olympiads", "problem": "Prove that 2 is prime.", "solution": "\\boxed{2}", "messages": []},
        {"source": "amc_aime", "problem": "Pick: (A) 1 (B) 2 (C) 3", "solution": "\\boxed{B}", "messages": []},
        {"source": "olympiads", "problem": "No gold here.", "solution": "It is two.", "messages": []},
        {"source": "olympiads", "problem": LONG, "solution": "\\boxed{1}", "messages": []},
        {"source": "olympiads", "problem": LONG[:150], "solution": "\\boxed{1}", "messages": []},
        {"source": "cn_k12", "problem": "  What is 3+4?  ", "solution": "\\boxed{7}", "messages": []},
    ]
    rows.append({"source": "cn_k12", "problem": None, "solution": "\\boxed{5}",  # a ready prompt as messages
                 "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+3?"}]})
    return [{"prompt": None, "messages": [], **r} for r in rows]  # one set of columns (parquet's)


def tokenizers(tmp_path):
    """The embedded tokenizer (its template frames a turn as it is), a Llama-3.1-like one (trims the
    turn, adds a dated system turn), the same with the authors' format, and a template that looks at
    the content (the Jinja path)."""
    looks = ("{% for m in messages %}{% if m['content'] | length > 20 %}<|long|>{% endif %}<|user|>"
             "{{ m['content'] }}<|end|>{% endfor %}<|assistant|>")
    build_tokenizer(specials=["<|user|>", "<|end|>", "<|assistant|>", "<|pad|>", "<|long|>"],
                    chat_template=looks).save_pretrained(tmp_path / "looks")
    llama = llama3_tokenizer(tmp_path / "llama")
    return {"embedded": common.load_tokenizer(os.path.join(EMBEDDED, "policy")),
            "llama-3.1": common.load_tokenizer(llama),
            "llama3-no-system": common.load_tokenizer(llama, chat_template="llama3-no-system"),
            "content-dependent": common.load_tokenizer(str(tmp_path / "looks"))}


def reference_read(name, config, split):
    """The parquet path before: the file copied into a `datasets` cache, then iterated."""
    ds = datasets.Dataset.from_parquet(name)
    used = common.data._used_columns(ds.column_names)
    i = 0
    for batch in ds.select_columns(used).iter(batch_size=1024):
        for j in range(len(batch[used[0]])):
            yield f"row {i}", {c: batch[c][j] for c in used}
            i += 1


def test_rows_order_drops_and_ids_are_the_reference_paths(tmp_path, capsys, monkeypatch):
    raw = every_case()
    path = str(tmp_path / "data.parquet")
    datasets.Dataset.from_list(raw).to_parquet(path)
    rows = common.load_prompts(path, paper_math_filter=True, verbose=True)
    line = capsys.readouterr().out
    with monkeypatch.context() as m:
        m.setattr(common.data, "_read_raw", reference_read)
        assert common.load_prompts(path, paper_math_filter=True, verbose=True) == rows
        assert capsys.readouterr().out == line  # the same "data:" line
    assert "multiple choice" in line and "without a gold answer" in line and "(row 40)" in line
    assert common.load_prompts(write_jsonl(tmp_path / "data.jsonl", raw), paper_math_filter=True) == rows
    frames = {}
    for name, tok in tokenizers(tmp_path).items():
        frames[name] = common.models._user_frame(tok)
        lengths = sorted(len(x) for x in reference_fit(tok, rows, 10**9)[1])
        for limit in (lengths[len(lengths) * 2 // 3], lengths[0], lengths[-1]):  # a prompt exactly at each
            want_rows, want_ids = reference_fit(tok, rows, limit)
            got_rows, got_ids, dropped = common.fit_prompts(tok, rows, limit, 1, "--dataset")
            assert got_rows == want_rows and dropped == len(rows) - len(want_rows), (name, limit)
            assert len(got_ids) == len(want_ids) and [got_ids[i] for i in range(len(got_ids))] == want_ids, name
            assert common.fit_prompts(tok, rows, limit - 1, 0, "x")[2] > dropped  # one token less: dropped
    assert frames["embedded"][2] is False and frames["llama-3.1"][2] is True  # frame as it is / trimmed
    assert "Cutting Knowledge" in frames["llama-3.1"][0] and frames["content-dependent"] is None


def test_a_bound_below_a_real_count_falls_back_to_counting_every_prompt(tmp_path, monkeypatch):
    tok = common.load_tokenizer(os.path.join(EMBEDDED, "policy"))
    rows = common.load_prompts(write_jsonl(tmp_path / "d.jsonl", every_case()))
    want_rows, want_ids = reference_fit(tok, rows, 320)
    monkeypatch.setattr(common.models, "prompt_token_bounds", lambda tokenizer, prompts: [1] * len(prompts))
    got_rows, got_ids, _ = common.fit_prompts(tok, rows, 320, 1, "--dataset")
    assert got_rows == want_rows and [got_ids[i] for i in range(len(got_ids))] == want_ids


def test_the_bound_holds_on_real_text(tmp_path):
    """Token counts never exceed `prompt_token_bounds` (bytes of the normalised text + 1), framed or
    rendered by Jinja, on ASCII, accented (composed and not), CJK and emoji text."""
    texts = ["plain ascii text", "é" * 50, "漢字かな交じり文" * 10, "🙂 emoji 🙂" * 7, "  \n\t spaces  ", "e\u0301" * 20]
    for name, tok in tokenizers(tmp_path).items():
        bounds = common.models.prompt_token_bounds(tok, texts)
        counts = [len(x) for x in common.encode_prompts(tok, texts)]
        assert all(c <= b for c, b in zip(counts, bounds, strict=True)), (name, counts, bounds)


def test_a_fork_with_its_own_read_row_still_reads(tmp_path):
    """`read_row` (docs/fork.md) goes through the same reader: its rows, fitted the same way."""
    path = write_jsonl(tmp_path / "own.jsonl", [{"q": f"What is {i}+1?", "a": str(i + 1)} for i in range(20)])
    rows = common.load_prompts(path, read_row=lambda raw: {"task": "math", "prompt": raw["q"], "answer": raw["a"]})
    assert [r["answer"] for r in rows] == [str(i + 1) for i in range(20)]
    tok = common.load_tokenizer(os.path.join(EMBEDDED, "policy"))
    assert common.fit_prompts(tok, rows, 320, 8, "x")[0] == reference_fit(tok, rows, 320)[0]
    json.dumps(rows)  # plain rows, as before
