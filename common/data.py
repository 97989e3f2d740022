"""Data: local files or hub datasets, each row mapped to one shape; a row that cannot be read
right is dropped, counted and named, never guessed into something else.

A dataset spec (`--dataset`, `--eval-dataset`, `--pairs`) is one or more comma-separated parts
    [math:|chat:]NAME[@CONFIG][:WEIGHT]
NAME is a hub id, a local copy of a hub dataset (a folder), or a `.jsonl` / `.json` (a list or
JSON lines) / `.parquet` file; `@CONFIG` a hub config name (`openai/gsm8k@main`); a `math:` /
`chat:` prefix forces the task of that part's rows (a row whose own `task` column says otherwise
is dropped; default: routed row by row, below); `:WEIGHT` mixes parts (see `load_prompts`).

Prompt rows become `{"task": "math" | "chat", "prompt": str | list[dict], "answer": str | None}`:
`prompt` is what the policy sees before its chat template (a user turn, or a list of messages),
`answer` the gold answer of a math row. Column names are read case-insensitively.

Task routing, row by row (unless forced by the prefix):
- a `task` column (`math` / `chat`) decides;
- else a row with a `problem`, `question`, `solution`, `answer` or `final_answer` value is math,
  and is kept only if it yields a gold answer: it is never handed to the reward model;
- else a row with a prompt (`prompt`, `messages`, `conversation`) is chat.

Gold answer of a math row: `answer` (or DeepMath's `final_answer`), read as GSM8K's `... #### N`
(-> N, commas dropped), or the last `\\boxed{}` of a worked answer, or the value itself when it
is a bare answer (one line, at most 200 characters); else the last `\\boxed{}` of `solution`, or,
in a row without `problem` / `question` (open-r1's DAPO layout: `prompt` + `solution`), a bare
`solution`. Prompt of a math row: `prompt` (a string or messages, verbatim), else `problem` /
`question` wrapped in `math_template` (by default the paper's), else the first user turn.
Prompt of a chat row: `prompt` (a string or messages), else the first user turn of `messages` /
`conversation` (WildChat's layout; the paper trains on first turns), else (forced to chat) a
`problem` / `question` verbatim.

Preference rows (`load_pairs`) become `{"task", "prompt", "chosen", "rejected", "chosen_eos",
"rejected_eos"}` plus any token-id columns the file carries. Accepted: `prompt` + `chosen` /
`rejected` strings; `chosen` / `rejected` message lists ending with the assistant's reply, the
prompt from `prompt` or else the shared messages before the reply (UltraFeedback-binarized, TRL's
conversational and implicit-prompt layouts); Anthropic HH-RLHF strings
(`\\n\\nHuman: ... \\n\\nAssistant: ...`), split into the shared conversation and the last reply.
docs/data.md has the table of public datasets and how each is read.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import re
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

from common.generation import request_seed
from common.utils import UserError

# The paper's math prompt (user turn).
PAPER_MATH_TEMPLATE = (
    "Given the following problem, reason and give a final answer to the problem.\n"
    "Problem: {problem}\n"
    "Your response should end with 'The final answer is $\\boxed{{[answer]}}$. I hope it is "
    "correct.' where [answer] is the response to the problem."
)
_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
MATH_COLUMNS = ("problem", "question", "solution", "answer", "final_answer")
_READ_COLUMNS = {"task", "prompt", "messages", "conversation", "source", *MATH_COLUMNS}
_PAIR_COLUMNS = ("chosen", "rejected", "chosen_eos", "rejected_eos",  # + offline_dpo.py's own:
                 "step", "position", "chosen_ids", "rejected_ids", "chosen_reward", "rejected_reward", "answer",
                 "chosen_advantage", "rejected_advantage", "weight")
_BARE_ANSWER_CHARS = 200
# The paper's NuminaMath-CoT filter (261,440 problems of ~860k): no synthetic subsets, no proofs,
# no multiple choice.
_SYNTHETIC_SOURCES = {"orca_math", "synthetic_amc", "synthetic_math"}
_PROOF = re.compile(r"\b(prove|proof|show that|demonstrate that)\b", re.IGNORECASE)
_CHOICE = re.compile(r"(\(\s*[A-E]\s*\)|\\textbf\{\s*\(?[A-E]\)?|(^|\n)\s*[A-E]\s*[:.)．：])")
_LETTER = re.compile(r"^\W*(\\text(bf)?\{)?\W*[A-E]\W*\}?\W*$")


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` in `text` (balanced braces), or None."""
    i = text.rfind("\\boxed")
    if i < 0:
        return None
    j = text.find("{", i)
    if j < 0:
        return None
    depth = 0
    for k in range(j, len(text)):
        depth += {"{": 1, "}": -1}.get(text[k], 0)
        if depth == 0:
            return text[j + 1 : k]
    return None


def _bare(text: str) -> str | None:
    """`text` stripped if it reads as a bare final answer (one line, short), else None."""
    text = text.strip()
    return text if text and "\n" not in text and len(text) <= _BARE_ANSWER_CHARS else None


def gold_answer(raw: dict) -> str | None:
    """The gold answer of a math row (see the module docstring), or None."""
    answer = raw.get("answer", raw.get("final_answer"))  # final_answer: DeepMath
    if answer is not None and str(answer).strip():
        answer = str(answer)
        if "####" in answer:  # GSM8K: the worked solution, then `#### 72`
            return answer.rsplit("####", 1)[1].strip().replace(",", "") or None
        if "\\boxed" in answer:
            return last_boxed(answer) or None
        return _bare(answer)
    solution = raw.get("solution")
    if isinstance(solution, str) and solution.strip():
        if raw.get("problem") is not None or raw.get("question") is not None:
            return last_boxed(solution) or None  # beside a problem, `solution` is a worked solution
        return last_boxed(solution) or _bare(solution)  # beside a ready prompt, it is the answer (DAPO)
    return None


def _messages(x) -> list[dict] | None:
    """`x` as a list of {"role", "content"} messages with text content, or None."""
    if isinstance(x, list) and x and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                         and isinstance(m.get("content"), str) for m in x):
        return [{"role": m["role"], "content": m["content"]} for m in x]  # drop extra keys (WildChat)
    return None


def _first_user_turn(x) -> str | None:
    for m in x if isinstance(x, list) else []:
        if isinstance(m, dict) and m.get("role") == "user":
            return m.get("content") if isinstance(m.get("content"), str) else ""
    return None


def _simplify(prompt):
    """A single user message is the same prompt as its text: keep the text (it prints and scores
    as the user turn)."""
    if isinstance(prompt, list) and len(prompt) == 1 and prompt[0]["role"] == "user":
        return prompt[0]["content"]
    return prompt


def _is_empty(prompt) -> bool:
    if isinstance(prompt, str):
        return not prompt.strip()
    return any(not m["content"].strip() for m in prompt)


def read_prompt_row(raw: dict, task: str | None = None, math_template: str = PAPER_MATH_TEMPLATE,
                    paper_math_filter: bool = False) -> tuple[dict | None, str | None]:
    """(row, None) for a usable raw row, or (None, why it was dropped). `task` forces the task."""
    if not isinstance(raw, dict):
        return None, "not an object"
    raw = {str(k).lower(): v for k, v in raw.items()}
    if task and raw.get("task") and raw["task"] != task:  # never turn a row into the other task
        return None, f"row's own task is {raw['task']}, not {task}"
    task = task or raw.get("task") or None
    if task is None:
        task = "math" if any(raw.get(c) is not None for c in MATH_COLUMNS) else "chat"
    if task not in ("math", "chat"):
        return None, f"task '{task}' is not math or chat"
    prompt = raw.get("prompt")
    prompt = prompt if isinstance(prompt, str) else _messages(prompt)
    answer = None
    if task == "math":
        answer = gold_answer(raw)
        if answer is None:
            return None, "math row without a gold answer"
        problem = raw.get("problem") if isinstance(raw.get("problem"), str) else raw.get("question")
        if prompt is None and isinstance(problem, str):
            prompt = math_template.format(problem=problem)
        if paper_math_filter:
            text = problem if isinstance(problem, str) else str(prompt)
            if raw.get("source") in _SYNTHETIC_SOURCES:
                return None, "paper filter: synthetic subset"
            if _PROOF.search(text):
                return None, "paper filter: proof"
            if len(_CHOICE.findall(text)) >= 2 or _LETTER.match(answer):
                return None, "paper filter: multiple choice"
    if prompt is None:
        prompt = _first_user_turn(raw.get("messages") or raw.get("conversation"))
    if prompt is None and task == "chat":  # a question-style set forced to chat: the question is the turn
        prompt = next((raw[c] for c in ("problem", "question") if isinstance(raw.get(c), str)), None)
    if prompt is None:
        return None, "no prompt column"
    prompt = _simplify(prompt)
    if _is_empty(prompt):
        return None, "empty prompt or turn"
    return {"task": task, "prompt": prompt, "answer": answer}, None


def _parse_spec(spec: str) -> list[tuple[str | None, str, str | None, float | None]]:
    """(task, name, config, weight) of each comma-separated part of a dataset spec."""
    parts = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        task = None
        if part.startswith(("math:", "chat:")):
            task, part = part[:4], part[5:]
        name, weight = part, None
        head, _, tail = part.rpartition(":")
        if head and re.fullmatch(r"\d+(\.\d*)?|\.\d+", tail):
            name, weight = head, float(tail)
        config = None
        if "@" in name and Path(name).suffix not in _FILE_SUFFIXES and not Path(name).expanduser().exists():
            name, config = name.rsplit("@", 1)
        parts.append((task, name, config, weight))
    if not parts:
        raise UserError("empty dataset spec")
    return parts


def _is_file_spec(name: str) -> bool:
    """A local file (a local folder, e.g. a cloned hub dataset, loads like a hub id)."""
    path = Path(name).expanduser()
    return path.suffix in _FILE_SUFFIXES or (name.startswith((".", "/", "~")) and not path.is_dir())


def _read_raw(name: str, config: str | None, split: str) -> Iterator[tuple[str, dict]]:
    """Yield (where, raw row) lazily: a 860k-row hub set is never held as Python objects."""
    path = Path(name).expanduser()
    if _is_file_spec(name):
        if not path.is_file():
            raise UserError(f"dataset file '{name}' does not exist")
        if path.suffix not in _FILE_SUFFIXES:
            raise UserError(f"dataset '{name}': unknown format '{path.suffix}' "
                            "(use .jsonl, .json, .parquet or a hub dataset id)")
    if path.suffix == ".json" and path.is_file():
        try:
            rows = json.loads(path.read_text())
        except json.JSONDecodeError:
            rows = None  # JSON lines in a .json file: read below as .jsonl
        if rows is not None:
            if not isinstance(rows, list):
                raise UserError(f"{name}: expected a JSON list of objects or JSON lines")
            yield from ((f"row {i}", r) for i, r in enumerate(rows))
            return
    if path.suffix in (".jsonl", ".json") and path.is_file():
        with path.open() as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield f"line {n}", json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{name}: line {n} is not valid JSON ({e.msg})") from None
        return
    if path.suffix == ".parquet":  # read with pyarrow, a batch at a time: no copy into a datasets cache
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(str(path))
        except Exception as e:  # noqa: BLE001 -- pyarrow's errors for a bad file come in several types
            raise UserError(f"cannot load dataset '{name}' ({str(e).splitlines()[0]})") from None
        used = _used_columns(parquet.schema_arrow.names)
        batches = (b.to_pydict() for b in parquet.iter_batches(batch_size=1024, columns=used)) if used else ()
    else:
        import datasets

        try:
            ds = datasets.load_dataset(name, config, split=split)
        except Exception as e:  # noqa: BLE001 -- hub errors come in many types; all mean "not loadable"
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"cannot load dataset '{name}'" + (f" config '{config}'" if config else "")
                            + f" (split '{split}'): {msg}") from None
        used = _used_columns(ds.column_names)
        batches = ds.select_columns(used).iter(batch_size=1024) if used else ()  # Arrow, memory-mapped
    i, batch = 0, None
    for batch in batches:
        for values in zip(*(batch[c] for c in used), strict=True):
            yield f"row {i}", dict(zip(used, values, strict=True))
            i += 1
    if path.suffix == ".parquet":  # pyarrow's allocator keeps the pages it read (~0.4 GB) until told
        import pyarrow

        del batch, batches, parquet
        pyarrow.default_memory_pool().release_unused()


def _used_columns(names: list[str]) -> list[str]:
    """The columns a row is read from (never a worked solution's neighbours nobody reads)."""
    used = [c for c in names if c.lower() in _READ_COLUMNS | set(_PAIR_COLUMNS)]
    if any(c.lower() in ("prompt", "problem", "question") for c in used):  # messages would only repeat them
        used = [c for c in used if c.lower() not in ("messages", "conversation")]
    return used


class _Drops:
    """Rows dropped per reason, with the first few places named."""

    def __init__(self):
        self.count, self.where = Counter(), defaultdict(list)

    def add(self, reason: str, where: str) -> None:
        self.count[reason] += 1
        if len(self.where[reason]) < 3:
            self.where[reason].append(where)

    def __str__(self) -> str:
        return "; ".join(f"{n:,} {reason} ({', '.join(self.where[reason])}{', ...' if n > 3 else ''})"
                         for reason, n in self.count.most_common())


def load_prompts(spec: str, split: str = "train", math_template: str = PAPER_MATH_TEMPLATE,
                 limit: int | None = None, paper_math_filter: bool = False, task: str | None = None,
                 verbose: bool = False, seed: int = 0, read_row=None) -> list[dict]:
    """Load and normalise a prompt dataset spec (module docstring): every part's usable rows, in
    order, at most `limit` per part; `task` forces the task of parts without a prefix. With `verbose`, one line per part says how many rows of each
    task were read and how many were dropped, why, and where. A part with no usable row is refused.

    Parts with weights (`AI-MO/NuminaMath-CoT:2,allenai/WildChat-1M:1`) are mixed: each gets a share
    of the concatenation's size proportional to its weight, subsampled or repeated in an order
    fixed by `seed` (the run's: two seeds draw two mixtures); without weights the parts are concatenated.
    `read_row(raw) -> {task, prompt, answer} | None` replaces the column rules (docs/fork.md)."""
    parts = _parse_spec(spec)
    loaded = []
    for part_task, name, config, _ in parts:
        rows, drops, n = [], _Drops(), 0
        for where, raw in _read_raw(name, config, split):
            n += 1
            if read_row is None:
                row, reason = read_prompt_row(raw, part_task or task, math_template, paper_math_filter)
            else:  # a script's own columns: raw row -> {task, prompt, answer}, or None to drop it
                row, reason = read_row(raw), "dropped by the script's read_row"
            if row is None:
                drops.add(reason, where)
                continue
            rows.append(row)
            if limit and len(rows) >= limit:
                break
        label = f"{name}" + (f"@{config}" if config else "") + ("" if _is_file_spec(name) else f" ({split})")
        if not rows:
            raise UserError(f"dataset '{label}': no usable row in {n:,}" + (f" ({drops})" if n else ""))
        if verbose:
            tasks = Counter(r["task"] for r in rows)
            print(f"data: {label}: {n:,} rows read -> {tasks['math']:,} math, {tasks['chat']:,} chat"
                  + (f"; dropped {drops}" if drops.count else "") + (f" (stopped at limit {limit:,})" if limit and len(rows) >= limit else ""),
                  flush=True)
        loaded.append(rows)
    weights = [w for *_, w in parts]
    if all(w is None for w in weights):
        return [r for rows in loaded for r in rows]
    if any(w is None for w in weights) or not sum(weights):
        raise UserError(f"dataset '{spec}': give every dataset a weight (name:weight, not all 0), or none")
    total, weight_sum = sum(len(rows) for rows in loaded), sum(weights)
    mixed = []
    for i, (rows, w) in enumerate(zip(loaded, weights, strict=True)):
        order = shuffled_indices(len(rows), seed, i)
        mixed += [rows[order[j % len(rows)]] for j in range(round(total * w / weight_sum))]
    return mixed


def load_data(args, tokenizer, verbose: bool, train: bool = True, read_row=None):
    """A script's training prompts (`--dataset`, unless not `train`) and held-out prompts
    (`--eval-dataset`, when evaluating), each prompt short enough to answer in full:
    (rows, prompt_ids, eval_rows). Says how many of each were too long, if any."""
    from common.models import describe_template

    if verbose:  # what the model sees around every prompt, before anything is read
        print(describe_template(tokenizer, args.run.chat_template), flush=True)
    max_prompt = args.run.max_model_len - args.max_new_tokens  # room to answer in full
    rows, prompt_ids, eval_rows = [], [], []
    if train:
        rows = load_prompts(args.dataset, args.run.dataset_split, args.run.math_template,
                            paper_math_filter=args.paper_math_filter, verbose=verbose,
                            seed=args.seed, read_row=read_row)
        rows, prompt_ids, dropped = fit_prompts(tokenizer, rows, max_prompt, args.prompts_per_step,
                                                "--dataset")
        if verbose and dropped:
            print(f"data: {dropped} of {len(rows) + dropped} training prompts too long to answer "
                  f"in full (max_model_len - max_new_tokens), dropped", flush=True)
    if args.eval_dataset and args.run.eval_every > 0:
        eval_rows = load_prompts(args.eval_dataset, args.run.eval_split, args.run.math_template,
                                 verbose=verbose, read_row=read_row)
        eval_rows, _, dropped = fit_prompts(tokenizer, eval_rows, max_prompt, 1, "--eval-dataset")
        if verbose and dropped:
            print(f"data: {dropped} of {len(eval_rows) + dropped} held-out prompts too long, "
                  "dropped", flush=True)
    return rows, prompt_ids, eval_rows


def fit_prompts(tokenizer, rows: list[dict], max_prompt_tokens: int, need: int, what: str):
    """Keep the rows whose prompt, chat template applied, has at most `max_prompt_tokens` tokens
    (max_model_len - max_new_tokens: room to answer in full). Returns (rows, prompt_ids, dropped),
    `prompt_ids` encoding a row's prompt when read (`models.PromptIds`). Refuses, naming the cause,
    when fewer than `need` remain.

    Speed at the paper's scale (~860k rows): a prompt is tokenized only when its upper bound
    (`models.prompt_token_bounds`: its bytes) exceeds the limit, so a typical dataset tokenizes
    almost nothing here. The bound is first checked against real counts on a sample (the longest
    prompts and an even spread); if any count exceeds it, every prompt is tokenized instead."""
    from common.models import PromptIds, encode_prompts, prompt_token_bounds

    if len(rows) < need:
        raise UserError(f"{what} has {len(rows)} usable prompts, fewer than one step needs ({need})")
    prompts = [r["prompt"] for r in rows]
    bounds = prompt_token_bounds(tokenizer, prompts)
    by_length = sorted(range(len(prompts)), key=bounds.__getitem__)
    sample = sorted(set(by_length[-32:] + by_length[:: max(1, len(by_length) // 32)]))
    counts = encode_prompts(tokenizer, [prompts[i] for i in sample])
    if any(len(ids) > bounds[i] for i, ids in zip(sample, counts, strict=True)):
        bounds = [len(ids) for ids in encode_prompts(tokenizer, prompts)]  # the bound fails: count all
    over = [i for i, b in enumerate(bounds) if b > max_prompt_tokens]  # only these need their count
    for i, ids in zip(over, encode_prompts(tokenizer, [prompts[i] for i in over]), strict=True):
        bounds[i] = len(ids)
    keep = [i for i, n in enumerate(bounds) if n <= max_prompt_tokens]
    if len(keep) < need:
        shortest = min(map(len, encode_prompts(tokenizer, prompts)))
        raise UserError(f"{what}: only {len(keep)} of {len(rows)} prompts fit in max_model_len - max_new_tokens "
                        f"= {max_prompt_tokens} tokens (the shortest has {shortest} with the chat "
                        f"template; {need} needed): raise --max-model-len or lower --max-new-tokens")
    return [rows[i] for i in keep], PromptIds(tokenizer, [prompts[i] for i in keep]), len(rows) - len(keep)


def _hh_split(text: str) -> tuple[list[dict], str] | None:
    """An Anthropic HH-RLHF transcript -> (the messages before the last reply, the last reply)."""
    i = text.rfind("\n\nAssistant:")
    if i < 0 or "\n\nHuman:" not in text[:i]:
        return None
    turns = re.split(r"\n\n(Human|Assistant): ?", text[:i])
    messages = [{"role": "user" if who == "Human" else "assistant", "content": said.strip()}
                for who, said in zip(turns[1::2], turns[2::2], strict=True)]
    return messages, text[i + len("\n\nAssistant:") :].strip()


def _reply(x) -> tuple[str | None, list[dict] | None]:
    """(reply text, the messages before it) of a `chosen` / `rejected` cell; (None, None) if unreadable."""
    if isinstance(x, str):
        hh = _hh_split(x)
        return (hh[1], hh[0]) if hh else (x, None)
    msgs = _messages(x)
    if msgs and msgs[-1]["role"] == "assistant":
        return msgs[-1]["content"], msgs[:-1] or None
    return None, None


def read_pair_row(raw: dict) -> tuple[dict | None, str | None]:
    """(pair, None) for a usable preference row, or (None, why it was dropped)."""
    if not isinstance(raw, dict):
        return None, "not an object"
    raw = {str(k).lower(): v for k, v in raw.items()}
    if "chosen" not in raw or "rejected" not in raw:
        return None, "no 'chosen' and 'rejected' columns"
    (chosen, c_ctx), (rejected, r_ctx) = _reply(raw["chosen"]), _reply(raw["rejected"])
    if chosen is None or rejected is None:
        return None, "'chosen' / 'rejected' not a string or messages ending with the assistant's reply"
    prompt = raw.get("prompt")
    prompt = prompt if isinstance(prompt, str) and prompt.strip() else _messages(prompt)
    if prompt is None:  # implicit prompt: the conversation both replies continue
        if c_ctx is None or c_ctx != r_ctx:
            return None, "no prompt (no 'prompt' column, and chosen / rejected share no conversation)"
        prompt = c_ctx
    prompt = _simplify(prompt)
    if _is_empty(prompt):
        return None, "empty prompt or turn"
    task = raw.get("task") or "chat"
    if task not in ("math", "chat"):
        return None, f"task '{task}' is not math or chat"
    pair = {"task": task, "prompt": prompt, "chosen": chosen, "rejected": rejected,
            "chosen_eos": bool(raw.get("chosen_eos", True)), "rejected_eos": bool(raw.get("rejected_eos", True))}
    for key in _PAIR_COLUMNS[4:]:
        if raw.get(key) is not None:  # written by offline_dpo.py: train on exactly the sampled tokens
            pair[key] = raw[key]
    return pair, None


def load_pairs(spec: str, split: str = "train", verbose: bool = False) -> list[dict]:
    """Load and normalise a preference dataset (module docstring); bad rows are dropped and
    counted, and a dataset with no usable row is refused."""
    (_, name, config, _), *rest = _parse_spec(spec)
    if rest:
        raise UserError(f"preference data '{spec}': give one dataset")
    pairs, drops, n = [], _Drops(), 0
    for where, raw in _read_raw(name, config, split):
        n += 1
        pair, reason = read_pair_row(raw)
        if pair is None:
            drops.add(reason, where)
        else:
            pairs.append(pair)
    if not pairs:
        raise UserError(f"preference data '{spec}': no usable row in {n:,}" + (f" ({drops})" if n else ""))
    if verbose:
        print(f"data: {spec}: {n:,} rows read -> {len(pairs):,} pairs" + (f"; dropped {drops}" if drops.count else ""),
              flush=True)
    return pairs


def save_pairs(built: list[dict], step_sums: dict[int, dict], pairs_path: str, timer) -> dict:
    """offline_dpo.py's sampled pairs, gathered from every rank, to `pairs_path` (sorted by step and
    place in the step) and each step's `rollout/*` metrics, reduced over ranks, to `rollouts.jsonl`
    beside it; written aside and renamed (a crash never leaves half a file). Collective. Returns the
    sampling's perf/* metrics (its `timer`'s). A run whose rollouts gave no pair is refused."""
    import torch.distributed as dist

    from common.metrics import rollout_metrics
    from common.utils import all_reduce

    gathered = [built]
    if dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, built)
    built = sorted((p for part in gathered for p in part), key=lambda p: (p["step"], p["position"]))
    s = all_reduce({f"{t}:{k}": v for t, sums in step_sums.items() for k, v in sums.items()})  # one collective
    if not built:
        raise UserError("the seed's rollouts gave no pair: every prompt's samples were all correct, all wrong or all "
                        "equal; sample more (--samples-per-prompt) or use other prompts")
    if not dist.is_initialized() or dist.get_rank() == 0:
        steps = [{"step": t, **rollout_metrics({k: s[f"{t}:{k}"] for k in sums})} for t, sums in step_sums.items()]
        for path, lines in ((pairs_path, built), (os.path.join(os.path.dirname(pairs_path), "rollouts.jsonl"), steps)):
            with open(path + ".tmp", "w") as f:
                f.writelines(json.dumps(x) + "\n" for x in lines)
            os.rename(path + ".tmp", path)
    if dist.is_initialized():
        dist.barrier()
    tokens = sum(v for k, v in s.items() if k.endswith(":completion_tokens"))
    return {"perf/generate_s": timer.s["generate"], "perf/score_s": timer.s["score"],
            "perf/rollout_tokens": tokens, "perf/rollout_tokens_per_s": tokens / timer.s["generate"]}


def pair_record(step: int, position: int, row: dict, outs: list, pair: tuple[int, int], rewards,
                advantages: list[float], weight: float) -> dict:
    """One line of offline_dpo.py's pairs.jsonl: the prompt's row and place in the step, the
    pair's (chosen, rejected) completions of the prompt's `outs` (text, token ids, EOS), their
    rewards (of the prompt's (n,) `rewards`) and GRPO advantages, and the pair's loss weight
    (GroupDPO: 1 / the prompt's pairs)."""
    out = {"step": step, "position": position, **row, "weight": weight}
    for side, i, advantage in zip(("chosen", "rejected"), pair, advantages, strict=True):
        c = outs[i]
        out |= {side: c.text, f"{side}_reward": rewards[i].item(), f"{side}_advantage": advantage,
                f"{side}_eos": c.finish_reason == "stop", f"{side}_ids": c.token_ids}
    return out


def pair_rewards(batch: list[dict]):
    """(P, 2) rewards of offline_dpo.py's pairs (chosen, rejected), as sampled (NaN if unknown)."""
    import torch

    return torch.tensor([[p.get(f"{side}_reward", math.nan) for side in ("chosen", "rejected")]
                         for p in batch])


def pair_terms(batch: list[dict], pairs: list[tuple[int, int, int]]):
    """offline_dpo.py's (K,) pair weights and (2K,) completion advantages (chosen, rejected, ...),
    as its pairs file saved them (an existing preference dataset: weight 1, advantage 0)."""
    return ([batch[j].get("weight", 1.0) for j, _, _ in pairs],
            [batch[j].get(f"{side}_advantage", 0.0) for j, _, _ in pairs
             for side in ("chosen", "rejected")])


def pairs_by_step(data: list[dict], path: str, args, rank: int):
    """Which pairs each step of offline_dpo.py trains on: pairs sampled for the run's steps ->
    (this rank's pair indices of each step, each step's rollout metrics from rollouts.jsonl); an
    existing preference dataset -> (None, {}): `prompts_per_step` pairs a step in a seeded order."""
    if "step" not in data[0]:
        return None, {}
    by_step = defaultdict(list)
    for i, p in enumerate(data):
        if p["position"] // args.prompts_per_rank == rank:  # CRUCIAL: each rank its own prompts'
            by_step[p["step"]].append(i)
    rollout_log = load_rollout_log(path)
    if args.num_steps > max([p["step"] for p in data] + list(rollout_log)):
        raise UserError(f"{path} holds the pairs of {max(p['step'] for p in data)} steps, fewer "
                        f"than --num-steps {args.num_steps}; train fewer steps, or start a run "
                        "that samples more")
    return by_step, rollout_log


def load_rollout_log(pairs_path: str) -> dict[int, dict]:
    """Each step's `rollout/*` metrics saved beside a pairs file by offline_dpo.py ({} if none)."""
    path = os.path.join(os.path.dirname(pairs_path), "rollouts.jsonl")
    return {x.pop("step"): x for x in map(json.loads, open(path))} if os.path.exists(path) else {}


def encode_pairs(tokenizer, pairs: list[dict], max_model_len: int):
    """Token ids of each pair: (pairs, prompt_ids, completions, dropped), `completions[i]` the
    (chosen, rejected) `Completion`s. A file written by offline_dpo.py carries the token ids the
    generator sampled, used as they are (re-tokenising a sampled text can give other tokens); other
    datasets are tokenised from text, with the tokenizer's EOS appended only to a reply that ended
    (`*_eos`: a reply cut at max_new_tokens is not taught to stop there). Pairs longer than
    `max_model_len` are dropped and counted."""
    from common.generation import Completion
    from common.models import encode_prompts

    prompt_ids = encode_prompts(tokenizer, [p["prompt"] for p in pairs])
    completions = []
    for p in pairs:
        pair = []
        for side in ("chosen", "rejected"):
            ids = p.get(f"{side}_ids")
            if ids is None:
                ids = tokenizer(p[side], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] * p[f"{side}_eos"]
            elif tokenizer.decode(ids, skip_special_tokens=True) != p[side]:
                raise UserError(f"the token ids in the pairs file do not decode to its texts with this tokenizer "
                                f"(step {p.get('step')}): it was built with another --model")
            pair.append(Completion(token_ids=list(ids), text=p[side], logprobs=[],
                                   finish_reason="stop" if p[f"{side}_eos"] else "length"))
        completions.append(tuple(pair))
    keep = [i for i, (p, (c, r)) in enumerate(zip(prompt_ids, completions, strict=True))
            if len(p) + max(len(c.token_ids), len(r.token_ids)) <= max_model_len]
    if not keep:
        raise UserError(f"no pair fits in --max-model-len {max_model_len}")
    return [pairs[i] for i in keep], [prompt_ids[i] for i in keep], [completions[i] for i in keep], len(pairs) - len(keep)


class StepOrder:
    """Which rows each step trains on, and each prompt's vLLM sampling seed: the same in every
    regime, so offline, semi-online and online runs with one `--seed` see the same prompts in the
    same order.

    Step t (1-based) takes the next `per_step` rows of a seeded per-epoch permutation, so a resumed
    run replays exactly the rows it had not trained on yet; rank r takes its slice. CRUCIAL: every
    prompt gets its own sampling seed, a function of (run seed, step, the prompt's place in the
    step): ranks never draw the same samples, two run seeds differ, and one rank or eight sample
    the same rollouts."""

    def __init__(self, size: int, seed: int, per_step: int, rank: int, world_size: int):
        self.size, self.seed, self.per_step = size, seed, per_step
        self.per_rank = per_step // world_size
        self.first = rank * self.per_rank  # this rank's place in each step

    def indices(self, *steps: int) -> list[int]:
        """This rank's row indices of each of `steps`, in order."""
        out = []
        for step in steps:
            start = (step - 1) * self.per_step + self.first
            for j in range(start, start + self.per_rank):
                epoch, pos = divmod(j, self.size)
                out.append(shuffled_indices(self.size, self.seed, epoch)[pos])
        return out

    def seeds(self, *steps: int) -> list[int]:
        """This rank's prompts' sampling seeds of each of `steps`, in order."""
        # CRUCIAL: a key per (run seed, step, place in the step), even (evaluation's are odd), each
        # a request seed of its own: no two prompts, ranks or steps share a sampling stream
        out = []
        for step in steps:
            base = (self.seed * 1_000_003 + step) * self.per_step + self.first
            out += [request_seed(2 * (base + j)) for j in range(self.per_rank)]
        return out


@functools.lru_cache(maxsize=4)
def shuffled_indices(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    """The dataset order for one epoch: a pure function of (seed, epoch), so a resumed run
    replays exactly the same order and can skip what it has already consumed. Cached: a step
    asks for it once per prompt, and a shuffle of 261k rows is not free."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return tuple(order)
