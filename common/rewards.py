"""Rewards: Math-Verify for verifiable (math) prompts, a scalar reward model for the rest."""

from __future__ import annotations

import json
import select
import subprocess
import sys
import tempfile
import threading

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from common import verifier
from common.models import check_model_path
from common.utils import UserError

# Bound on one (response, gold) in the helper process: Math-Verify's own timeouts (5 s for each of
# the two parses and the comparison, 2 s for its string conversion) plus slack. Only a hang in C
# code, which SIGALRM cannot interrupt, ever reaches it.
HELPER_TIMEOUT_S = 20


def math_reward(response: str, gold: str) -> float:
    """1.0 if the response's final answer equals `gold` per Math-Verify in the paper's set-up
    (`common/verifier.py`), else 0.0. A plain-text answer without LaTeX scores 0, as in the paper.

    Safe from any thread: off the main thread, where Math-Verify's SIGALRM timeouts cannot work
    (called from a thread, Math-Verify raises on every answer, which naive wrappers turn into a
    silent reward 0 for everything), it scores in a helper process. If that helper cannot run,
    this raises; it never returns a made-up 0."""
    return math_rewards([response], [gold])[0]


def math_rewards(responses: list[str], golds: list[str]) -> list[float]:
    """Batch form of `math_reward` (one round trip to the helper process off the main thread)."""
    pairs = list(zip(responses, golds, strict=True))
    if threading.current_thread() is threading.main_thread():
        return [verifier.paper_math_reward(r, g) for r, g in pairs]
    with _helper_lock:
        try:
            return _helper_score(pairs, bound=HELPER_TIMEOUT_S * len(pairs) + 30)
        except TimeoutError:  # a hang somewhere in the batch: find it, one pair per round trip
            return [_score_one_or_timeout(p) for p in pairs]


_helper: tuple[subprocess.Popen, tempfile.TemporaryFile] | None = None  # (process, its stderr)
_helper_lock = threading.Lock()


def _score_one_or_timeout(pair: tuple[str, str]) -> float:
    try:
        return _helper_score([pair], bound=HELPER_TIMEOUT_S + 30)[0]
    except TimeoutError:
        return 0.0  # the paper's rule: a timeout is reward 0 (the helper was killed and restarts)


def _helper_score(pairs: list[tuple[str, str]], bound: float) -> list[float]:
    """Score `pairs` in the helper process (started on first use). The helper runs
    `common/verifier.py` as a script with this interpreter: it imports Math-Verify only, never the
    caller's main module (a `multiprocessing` spawn would re-run the caller's top-level code, and
    fails outright for a script read from standard input)."""
    global _helper
    if _helper is None or _helper[0].poll() is not None:
        err = tempfile.TemporaryFile()  # a file, not a pipe: a full pipe would block the helper
        # the file by path, not `-m common.verifier`, which would import the whole `common` package
        proc = subprocess.Popen(
            [sys.executable, "-u", "-c", "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')",
             verifier.__file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
        _helper = (proc, err)
    proc, err = _helper
    try:
        proc.stdin.write((json.dumps(pairs) + "\n").encode())
        proc.stdin.flush()
        ready, _, _ = select.select([proc.stdout], [], [], bound)
        line = proc.stdout.readline() if ready else None
    except BrokenPipeError:
        line = b""
    if line is None:
        proc.kill()
        proc.wait()
        raise TimeoutError
    if not line:  # the helper died: say why, never score it as 0
        proc.wait()
        err.seek(0)
        lines = err.read().decode(errors="replace").strip().splitlines()
        raise RuntimeError(f"the Math-Verify helper process ({sys.executable} {verifier.__file__}) failed "
                           f"with exit code {proc.returncode}: {lines[-1] if lines else 'no message'}")
    return json.loads(line)


class RewardModel:
    """A scalar reward model (`AutoModelForSequenceClassification` with one label), e.g.
    Athene-RM-8B or Skywork-Reward, scoring (prompt, response) chats.

    CRUCIAL: the RM may use another tokenizer and chat template than the policy, so it takes
    text: the policy's tokens are decoded by the caller and re-encoded here with the RM's own
    tokenizer and template.
    """

    def __init__(self, name: str, device: torch.device, dtype: torch.dtype | None = None,
                 max_length: int = 4096, batch_size: int = 8, offload: bool = False,
                 trust_remote_code: bool = False):
        check_model_path(name, "reward model")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
            self.model = AutoModelForSequenceClassification.from_pretrained(
                name, num_labels=1, trust_remote_code=trust_remote_code,
                dtype=dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32))
        except OSError as e:
            raise UserError(f"cannot load reward model '{name}' ({str(e).splitlines()[0]})") from None
        if not self.tokenizer.chat_template:
            raise UserError(f"reward model '{name}' has no chat template in its tokenizer")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # The sequence-classification head reads the last non-pad token of each row.
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.tokenizer.padding_side = "right"
        self.model.eval().requires_grad_(False)
        self.device, self.max_length, self.batch_size, self.offload_between = device, max_length, batch_size, offload
        if offload:
            self.offload()
        else:
            self.model.to(device)

    def offload(self) -> None:
        """Park the weights in pinned CPU memory (an 8B RM frees ~16 GB of GPU memory between uses;
        pinned, the next move back is a fast asynchronous copy rather than a pageable one)."""
        self.model.to("cpu")
        if self.device.type == "cuda":
            for p in self.model.parameters():
                p.data = p.data.pin_memory()

    def onload(self) -> None:
        self.model.to(self.device, non_blocking=True)

    @torch.no_grad()
    def score(self, prompts: list[str | list[dict]], responses: list[str]) -> list[float]:
        """One float per (prompt, response): the RM's scalar on the chat [user, assistant] (or the
        prompt's messages, then the assistant's reply)."""
        texts = [
            self.tokenizer.apply_chat_template(
                ([{"role": "user", "content": p}] if isinstance(p, str) else p) + [{"role": "assistant", "content": r}],
                tokenize=False)
            for p, r in zip(prompts, responses, strict=True)
        ]
        # The template already holds any BOS; truncation keeps the first max_length tokens.
        enc = [self.tokenizer(t, add_special_tokens=False, truncation=True,
                              max_length=self.max_length)["input_ids"] for t in texts]
        order = sorted(range(len(enc)), key=lambda i: len(enc[i]))  # similar lengths, less padding
        scores = [0.0] * len(enc)
        if self.offload_between:  # `offload=True`: on the device only while scoring
            self.onload()
        device = next(self.model.parameters()).device
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            batch = self.tokenizer.pad({"input_ids": [enc[i] for i in idx]}, return_tensors="pt")
            out = self.model(input_ids=batch["input_ids"].to(device),
                             attention_mask=batch["attention_mask"].to(device)).logits
            for i, s in zip(idx, out[:, 0].float().tolist(), strict=True):
                scores[i] = s
        if self.offload_between:
            self.offload()
        return scores


def score(reward_model: RewardModel | None, batch: list[dict], outs) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, n) rewards of each prompt's n completions, each row by its own task's reward:
    Math-Verify (0 / 1) for math, the reward model's scalar for chat; each task in one call (one
    batched reward-model pass, one move with --rm-offload). Also returns the (P,) mask of groups
    that held a NaN / inf reward. CRUCIAL: such a group is never trained on: it is set to 0
    (all-equal: no pair, no advantage) and counted in `rollout/nonfinite_groups`."""
    n = len(outs[0]) if outs else 0
    rewards = torch.zeros(len(batch), n)  # (P, n)
    math_idx = [j for j, row in enumerate(batch) if row["task"] == "math"]
    chat_idx = [j for j, row in enumerate(batch) if row["task"] == "chat"]
    if math_idx:
        texts = [c.text for j in math_idx for c in outs[j]]
        rewards[math_idx] = torch.tensor(math_rewards(texts, [batch[j]["answer"] for j in math_idx for _ in range(n)])).view(-1, n)
    if chat_idx:
        texts = [c.text for j in chat_idx for c in outs[j]]
        rewards[chat_idx] = torch.tensor(reward_model.score([batch[j]["prompt"] for j in chat_idx for _ in range(n)], texts)).view(-1, n)
    nonfinite = ~torch.isfinite(rewards).all(dim=1)  # (P,)
    rewards[nonfinite] = 0.0
    return rewards, nonfinite
