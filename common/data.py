"""Prompt data: local jsonl / json / parquet files or hub datasets, normalised to one row shape.

Every row becomes `{"task": "math" | "chat", "prompt": str, "answer": str | None}`, where
`prompt` is the user turn exactly as the policy will see it (before its chat template).

Column mapping (first match wins):
- task: a `task` column (`math` or `chat`); otherwise `math` when the row has a gold answer.
  Several datasets mix into one list (comma-separated, optional weights: see `load_prompts`), so
  a batch can hold both tasks, each scored by its own reward.
- math rows: `prompt` (used verbatim) or `problem` / `question` (wrapped in `math_template`, by
  default the paper's), and `answer`; without `answer`, the last `\\boxed{...}` of `solution` (NuminaMath's
  shape: `problem`, `solution`).
- chat rows: `prompt` (a string), or the first user turn of `messages` / `conversation` (a list
  of `{"role", "content"}`: WildChat's shape).

Preference data (`load_pairs`, for offline DPO) becomes `{"task", "prompt", "chosen", "rejected",
"chosen_eos", "rejected_eos"}`: `prompt` a user turn (str) or a list of messages; `chosen` /
`rejected` the assistant's reply text; `*_eos` whether the reply ended (False for a reply cut at
max_new_tokens, so the trainer does not teach the model to stop where it was cut). Accepted:
- the standard shape: `prompt`, `chosen`, `rejected` strings (what offline_dpo.py writes);
- the conversational shape: `chosen` / `rejected` lists of messages ending with the assistant's
  reply, the prompt from `prompt` (a string or messages) or else the messages before the reply
  (HuggingFaceH4/ultrafeedback_binarized, Anthropic-style chat pairs).
"""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path

from common.utils import UserError

# The paper's math prompt (user turn).
PAPER_MATH_TEMPLATE = (
    "Given the following problem, reason and give a final answer to the problem.\n"
    "Problem: {problem}\n"
    "Your response should end with 'The final answer is $\\boxed{{[answer]}}$. I hope it is "
    "correct.' where [answer] is the response to the problem."
)


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


def _read_raw(spec: str, split: str) -> list[dict]:
    path = Path(spec).expanduser()
    if path.suffix in (".jsonl", ".json", ".parquet") or spec.startswith((".", "/", "~")):
        if not path.is_file():
            raise UserError(f"dataset file '{spec}' does not exist")
        if path.suffix == ".jsonl":
            rows = []
            with path.open() as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise UserError(f"{spec}: line {n} is not valid JSON ({e.msg})") from None
            return rows
        if path.suffix == ".json":
            rows = json.loads(path.read_text())
            if not isinstance(rows, list):
                raise UserError(f"{spec}: expected a JSON list of objects")
            return rows
        if path.suffix == ".parquet":
            import datasets

            return list(datasets.Dataset.from_parquet(str(path)))
        raise UserError(f"dataset '{spec}': unknown format '{path.suffix}' "
                        "(use .jsonl, .json, .parquet or a hub dataset id)")
    import datasets

    try:
        return list(datasets.load_dataset(spec, split=split))
    except Exception as e:  # noqa: BLE001 -- hub errors come in many types; all mean "not loadable"
        raise UserError(f"cannot load dataset '{spec}' (split '{split}'): "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _first_user_turn(messages) -> str | None:
    if isinstance(messages, list):
        for m in messages:
            if isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), str):
                return m["content"]
    return None


def normalize_row(raw: dict, where: str, math_template: str = PAPER_MATH_TEMPLATE) -> dict:
    """Map one raw row to {task, prompt, answer}; `where` names the row in error messages."""
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected an object, got {type(raw).__name__}")
    answer = raw.get("answer")
    if answer is None and isinstance(raw.get("solution"), str):
        answer = last_boxed(raw["solution"])
    task = raw.get("task") or ("math" if answer is not None else "chat")
    if task not in ("math", "chat"):
        raise UserError(f"{where}: column 'task' is '{task}', expected 'math' or 'chat'")
    if isinstance(raw.get("prompt"), str):
        prompt = raw["prompt"]
    elif task == "math" and isinstance(raw.get("problem", raw.get("question")), str):  # AMC23: `question`
        prompt = math_template.format(problem=raw.get("problem", raw.get("question")))
    else:
        prompt = _first_user_turn(raw.get("messages") or raw.get("conversation"))
    if prompt is None:
        need = "'prompt' or 'problem'" if task == "math" else "'prompt' or 'messages'"
        raise UserError(f"{where}: no prompt column (need {need}; row has {sorted(raw)})")
    if not prompt.strip():
        raise UserError(f"{where}: the prompt is empty")
    if task == "math":
        if answer is None or not str(answer).strip():
            raise UserError(f"{where}: math row without a gold answer (need 'answer', or a "
                            f"'solution' with a \\boxed{{}} answer; row has {sorted(raw)})")
        answer = str(answer)
    return {"task": task, "prompt": prompt, "answer": answer if task == "math" else None}


def load_prompts(spec: str, split: str = "train", math_template: str = PAPER_MATH_TEMPLATE,
                 limit: int | None = None) -> list[dict]:
    """Load and normalise a prompt dataset (see the module docstring for the accepted shapes).

    `spec` may name several datasets, comma-separated, each with an optional mixing weight:
    `a.jsonl,b.jsonl` concatenates them; `AI-MO/NuminaMath-CoT:2,allenai/WildChat-1M:1` gives each
    a share of the mixture proportional to its weight (the mixture keeps the concatenation's size;
    a dataset is subsampled, or repeated, in a fixed seeded order). `limit` applies per dataset."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    weighted = []
    for part in parts:
        name, _, weight = part.rpartition(":")
        try:
            weighted.append((name, float(weight)) if name else (part, None))
        except ValueError:  # a colon that is not a weight
            weighted.append((part, None))
    loaded = []
    for name, _ in weighted:
        raw = _read_raw(name, split)
        if not raw:
            raise UserError(f"dataset '{name}' has no rows")
        loaded.append([normalize_row(r, f"{name} row {i}", math_template) for i, r in enumerate(raw[:limit])])
    if all(w is None for _, w in weighted):
        return [r for rows in loaded for r in rows]
    if any(w is None or w < 0 for _, w in weighted) or not sum(w for _, w in weighted):
        raise UserError(f"dataset '{spec}': give every dataset a weight >= 0 (name:weight), or none")
    total, weight_sum = sum(len(rows) for rows in loaded), sum(w for _, w in weighted)
    mixed = []
    for i, (rows, (_, w)) in enumerate(zip(loaded, weighted, strict=True)):
        order = shuffled_indices(len(rows), 0, i)
        mixed += [rows[order[j % len(rows)]] for j in range(round(total * w / weight_sum))]
    return mixed


def _reply(x, where: str, col: str) -> tuple[str, list | None]:
    """(reply text, the messages before it or None) of a `chosen` / `rejected` cell."""
    if isinstance(x, str):
        return x, None
    if isinstance(x, list) and x and isinstance(x[-1], dict) and x[-1].get("role") == "assistant" \
            and isinstance(x[-1].get("content"), str):
        return x[-1]["content"], x[:-1]
    raise UserError(f"{where}: column '{col}' must be a string or a list of messages ending with "
                    "the assistant's reply")


def normalize_pair(raw: dict, where: str) -> dict:
    """Map one raw preference row to {task, prompt, chosen, rejected, chosen_eos, rejected_eos}."""
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected an object, got {type(raw).__name__}")
    if "chosen" not in raw or "rejected" not in raw:
        raise UserError(f"{where}: a preference row needs 'chosen' and 'rejected' columns (row has {sorted(raw)})")
    chosen, context = _reply(raw["chosen"], where, "chosen")
    rejected, _ = _reply(raw["rejected"], where, "rejected")
    prompt = raw.get("prompt")
    if isinstance(prompt, list):  # conversational prompt: keep every turn
        prompt = prompt if all(isinstance(m, dict) and "role" in m for m in prompt) else None
    elif not isinstance(prompt, str):
        prompt = context or None
    if not prompt or (isinstance(prompt, str) and not prompt.strip()):
        raise UserError(f"{where}: no prompt (need a 'prompt' column or 'chosen' given as messages)")
    task = raw.get("task") or "chat"
    if task not in ("math", "chat"):
        raise UserError(f"{where}: column 'task' is '{task}', expected 'math' or 'chat'")
    return {"task": task, "prompt": prompt, "chosen": chosen, "rejected": rejected,
            "chosen_eos": bool(raw.get("chosen_eos", True)), "rejected_eos": bool(raw.get("rejected_eos", True))}


def load_pairs(spec: str, split: str = "train", limit: int | None = None) -> list[dict]:
    """Load and normalise a preference dataset (see the module docstring for the accepted shapes)."""
    raw = _read_raw(spec, split)
    if not raw:
        raise UserError(f"dataset '{spec}' has no rows")
    return [normalize_pair(r, f"{spec} row {i}") for i, r in enumerate(raw[:limit])]


@functools.lru_cache(maxsize=4)
def shuffled_indices(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    """The dataset order for one epoch: a pure function of (seed, epoch), so a resumed run
    replays exactly the same order and can skip what it has already consumed. Cached: the
    scripts ask for it once per prompt, and a shuffle of 261k rows is not free."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return tuple(order)
