"""Rewards: Math-Verify for verifiable (math) prompts, a scalar reward model for the rest."""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing as mp
import threading

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from common.models import check_model_path
from common.utils import UserError

# Math-Verify logs every timeout and unparsable answer at ERROR/WARNING; in RL that is the
# common case (a wrong or garbled answer), not an error. Rewards are logged as metrics instead.
logging.getLogger("math_verify").setLevel(logging.CRITICAL)

MATH_TIMEOUT_S = 2  # per parse and per comparison (Math-Verify's unit is whole seconds)
_MAX_RESPONSE_CHARS = 4000  # only the tail can hold the final answer; parse no more than that


def _is_latex(s: str) -> bool:
    return "$" in s or "\\(" in s or "\\[" in s or "\\boxed" in s


def _math_reward_main_thread(response: str, gold: str) -> float:
    """Math-Verify with the paper's set-up. Its timeouts use SIGALRM: main thread only."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    try:
        # The paper wraps a bare gold answer in $...$ so Math-Verify reads it as LaTeX.
        gold_parsed = parse(gold if _is_latex(gold) else f"${gold}$",
                            extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
                            parsing_timeout=MATH_TIMEOUT_S)
        if not gold_parsed:
            return 0.0
        i = response.rfind("\\boxed")
        tail = response[i:] if i >= 0 else response
        pred = parse(tail[-_MAX_RESPONSE_CHARS:],
                     extraction_config=[LatexExtractionConfig(boxed_match_priority=0),
                                        ExprExtractionConfig()],
                     parsing_timeout=MATH_TIMEOUT_S)
        if not pred:
            return 0.0
        return 1.0 if verify(gold_parsed, pred, timeout_seconds=MATH_TIMEOUT_S) else 0.0
    except BaseException:  # noqa: BLE001 -- Math-Verify's TimeoutException, sympy errors, recursion
        return 0.0


def _math_rewards_worker(pairs: list[tuple[str, str]]) -> list[float]:
    return [_math_reward_main_thread(r, g) for r, g in pairs]


_pool: cf.ProcessPoolExecutor | None = None
_pool_lock = threading.Lock()


def _score_in_subprocess(pairs: list[tuple[str, str]]) -> list[float]:
    """Score in a helper process, where Math-Verify runs in a main thread and its SIGALRM
    timeouts work. A hard hang (C code that never returns to Python) kills the pool: 0 reward."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = cf.ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn"))
        pool = _pool
    try:
        bound = (3 * MATH_TIMEOUT_S + 1) * len(pairs) + 30  # + process start-up on first use
        return pool.submit(_math_rewards_worker, pairs).result(timeout=bound)
    except Exception:  # noqa: BLE001 -- timeout or dead worker
        with _pool_lock:
            for p in list(getattr(pool, "_processes", {}).values()):
                p.kill()
            pool.shutdown(wait=False, cancel_futures=True)
            if _pool is pool:
                _pool = None
        return [0.0] * len(pairs)


def math_reward(response: str, gold: str) -> float:
    """1.0 if the response's final answer equals `gold` per Math-Verify, else 0.0.

    Never raises; bounded time (a few seconds on adversarial input). Safe from any thread: off
    the main thread, where SIGALRM cannot be used, it runs in a helper process. (Called from a
    thread, Math-Verify itself raises on its timeout, which naive wrappers turn into reward 0 for
    every answer.)"""
    return math_rewards([response], [gold])[0]


def math_rewards(responses: list[str], golds: list[str]) -> list[float]:
    """Batch form of `math_reward` (one round trip to the helper process off the main thread)."""
    pairs = list(zip(responses, golds, strict=True))
    if threading.current_thread() is threading.main_thread():
        return _math_rewards_worker(pairs)
    return _score_in_subprocess(pairs)


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
        if not offload:
            self.model.to(device)

    def offload(self) -> None:
        """Park the weights in CPU memory (an 8B RM frees ~16 GB of GPU memory between uses)."""
        self.model.to("cpu")

    def onload(self) -> None:
        self.model.to(self.device)

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        """One float per (prompt, response): the RM's scalar on the chat [user, assistant]."""
        texts = [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": p}, {"role": "assistant", "content": r}],
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
