"""Rewards: Math-Verify for verifiable (math) prompts, a scalar reward model for the rest."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import select
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from common import verifier
from common.models import _looks_local, check_model_path
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
            [
                sys.executable,
                "-u",
                "-c",
                "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')",
                verifier.__file__,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
        )
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
        raise RuntimeError(
            f"the Math-Verify helper process ({sys.executable} {verifier.__file__}) failed "
            f"with exit code {proc.returncode}: {lines[-1] if lines else 'no message'}"
        )
    return json.loads(line)


# The reward-model layouts this project reads (docs/reward_models.md), recognised by the tensor
# names in the checkpoint itself, never by its hub name: layout -> (head tensors, how it is read).
LAYOUTS = {
    "athene": (("v_head.weight",), "v_head at the last CLS token appended to the chat (Athene-RM)"),
    "trl-value-head": (
        ("v_head.summary.weight", "v_head.summary.bias"),
        "TRL value head at the last token",
    ),
    "openrlhf": (("value_head.weight",), "OpenRLHF value_head at the EOS token closing the chat"),
    "score": (
        ("score.weight", "score.bias"),
        "sequence-classification score head at the last token",
    ),
}


@functools.lru_cache(maxsize=8)
def checkpoint_tensor_names(name: str) -> dict[str, str]:
    """{tensor name: file holding it} of a checkpoint, read from its safetensors headers (a local
    folder) or the hub's safetensors metadata (no weights downloaded). Empty without safetensors.
    Cached: the flag check, the layout and the head's load all ask (do not mutate the result)."""
    if not _looks_local(name):
        from huggingface_hub import get_safetensors_metadata

        try:
            return dict(get_safetensors_metadata(name).weight_map)
        except Exception:  # noqa: BLE001 -- no safetensors on the hub: transformers' load report decides
            return {}
    path = Path(name).expanduser()
    if (path / "model.safetensors.index.json").is_file():
        return json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            out |= dict.fromkeys(sf.keys(), f.name)
    return out


def reward_model_layout(name: str, trust_remote_code: bool = False) -> str:
    """Which layout `name` is (a key of LAYOUTS, or "custom": a model with its own code), from its
    own tensors. A checkpoint without a reward head is refused: transformers would load it with a
    randomly initialised head and every run on it would train on noise."""
    from transformers import AutoConfig

    names = checkpoint_tensor_names(name)
    config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    if f"{getattr(config, 'value_head_prefix', '')}.weight" in names:  # OpenRLHF names its head in
        return "openrlhf"  # config.json ("value_head" before 2025, "score" since), a plain name too
    layout = next((layout for layout, (head, _) in LAYOUTS.items() if head[0] in names), None)
    if layout is None and "AutoModelForSequenceClassification" in (
        getattr(config, "auto_map", None) or {}
    ):
        if not trust_remote_code:
            raise UserError(
                f"reward model '{name}' ships its own model code (auto_map); pass "
                "--trust-remote-code to run it"
            )
        return "custom"
    if (
        layout is None
        and not names
        and any(a.endswith("ForSequenceClassification") for a in config.architectures or [])
    ):
        layout = (
            "score"  # weights without safetensors headers to read: the load's missing keys decide
        )
    if layout is None:
        kind = ", ".join(config.architectures or ["no architectures in config.json"])
        raise UserError(
            f"reward model '{name}' ({kind}) has no reward head in its checkpoint (none of "
            f"{', '.join(h[0] for h, _ in LAYOUTS.values())}): it would score with random "
            "weights. Pass a trained reward model (docs/reward_models.md)"
        )
    if layout == "score" and config.num_labels != 1:
        raise UserError(
            f"reward model '{name}' has a {config.num_labels}-label classifier head; a scalar "
            "reward model has one output (a preference classifier is not one)"
        )
    return layout


class RewardModel:
    """A scalar reward model scoring (prompt, response) chats, read the way it was trained:

    - `athene` (Athene-RM-8B, the paper's): a backbone + `v_head` (hidden -> 1, no bias), the
      tokenizer's `cls_token` appended to the chat-templated text, tokenized with the tokenizer's
      own special tokens and truncated to `max_length` as the model card and the authors' code do;
      the score is `v_head` at the last CLS token, 0 if truncation cut it off (counted in
      `truncated`, as the authors' code scores it);
    - `score`: `*ForSequenceClassification` with a `score` head (Skywork-Reward, the RewardBench 2
      models, the embedded one), at the last token of the chat;
    - `trl-value-head` (`v_head.summary.*`): at the last token of the chat;
    - `openrlhf` (`value_head.*`): EOS appended as its training does (the last token is EOS even
      when truncated), read there, then `(r - mean) / std` when its config says `normalize_reward`;
    - `custom` (`--trust-remote-code`, e.g. ArmoRM): its own forward, its `score` (or logits[:, 0]).

    CRUCIAL: the position is computed here from each row's length, never from a pad token: with
    pad = EOS, transformers' pooling at the last non-pad token would score the token before a
    template's closing EOS. And the RM may use another tokenizer and chat template than the policy,
    so it takes text: the policy's tokens are decoded by the caller and re-encoded here.
    """

    def __init__(
        self,
        name: str,
        device: torch.device,
        dtype: torch.dtype | None = None,
        max_length: int = 4096,
        batch_size: int = 8,
        offload: bool = False,
        trust_remote_code: bool = False,
        verbose: bool = False,
    ):
        check_model_path(name, "reward model")
        self.name, self.layout = name, reward_model_layout(name, trust_remote_code)
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(
                name, trust_remote_code=trust_remote_code
            )
            auto = (
                AutoModelForSequenceClassification
                if self.layout in ("score", "custom")
                else AutoModel
            )
            kwargs = {"num_labels": 1} if self.layout == "score" else {}
            with (
                _quiet_load_report()
            ):  # decided below from the missing keys, never by a scrolling table
                self.model, info = auto.from_pretrained(
                    name,
                    dtype=dtype,
                    trust_remote_code=trust_remote_code,
                    output_loading_info=True,
                    **kwargs,
                )
        except OSError as e:
            raise UserError(
                f"cannot load reward model '{name}' ({str(e).splitlines()[0]})"
            ) from None
        if info["missing_keys"]:  # CRUCIAL: never score with weights transformers made up
            missing = sorted(info["missing_keys"])
            raise UserError(
                f"reward model '{name}' ({self.layout}): {len(missing)} weight(s) missing from its "
                f"checkpoint, e.g. {', '.join(missing[:3])}; transformers would initialise them "
                "at random"
            )
        if not self.tokenizer.chat_template:
            raise UserError(f"reward model '{name}' has no chat template in its tokenizer")
        self.head = None
        names = checkpoint_tensor_names(name)
        if self.layout in LAYOUTS and self.layout != "score":  # a value head beside the backbone
            prefix = getattr(
                self.model.config, "value_head_prefix", "value_head"
            )  # OpenRLHF's own name
            heads = (f"{prefix}.weight",) if self.layout == "openrlhf" else LAYOUTS[self.layout][0]
            keys = [k for k in heads if k in names]
            tensors = _read_tensors(name, keys)
            w = tensors[keys[0]]
            self.head = torch.nn.Linear(w.shape[1], w.shape[0], bias=len(keys) > 1, dtype=dtype)
            self.head.weight.data.copy_(w)
            if len(keys) > 1:
                self.head.bias.data.copy_(tensors[keys[1]])
        if self.layout == "score" and not isinstance(
            getattr(self.model, "score", None), torch.nn.Linear
        ):
            heads = [n for n, m in self.model.named_children() if n != self.model.base_model_prefix]
            raise UserError(
                f"reward model '{name}' ({type(self.model).__name__}) has no `score` head (it has "
                f"{', '.join(heads) or 'none'}): not a layout read here (docs/reward_models.md)"
            )
        if self.layout == "score" and self.model.score.bias is None and "score.bias" in names:
            # transformers' decoder classifiers have no bias and would drop a checkpoint's: it is
            # added back
            self.model.score.bias = torch.nn.Parameter(
                _read_tensors(name, ["score.bias"])["score.bias"].to(dtype)
            )
        if self.layout == "athene" and self.tokenizer.cls_token_id is None:
            raise UserError(
                f"reward model '{name}' has a v_head (the Athene layout) but its tokenizer has no "
                "cls_token to score at"
            )
        if self.layout == "score" and self.model.config.num_labels != 1:
            raise UserError(
                f"reward model '{name}' has {self.model.config.num_labels} labels; a scalar reward "
                "model has one"
            )
        self.norm = (0.0, 1.0)  # OpenRLHF's reward normalisation, when its config asks for it
        if self.layout == "openrlhf" and getattr(self.model.config, "normalize_reward", False):
            self.norm = (float(self.model.config.mean), float(self.model.config.std))
        self.model.config.use_cache = False  # frozen: a KV cache would only cost memory
        self.model.eval().requires_grad_(False)
        self.device, self.max_length, self.batch_size = device, max_length, batch_size
        self.truncated = 0  # rows cut to max_length (Athene: scored 0, its CLS cut off)
        if verbose:
            print(self.describe(), flush=True)
        # --rm-offload: one pinned host copy made once; moving to the device is an asynchronous
        # copy, moving back drops the device copy (the weights never change)
        self._host = None
        if offload:
            pin = device.type == "cuda"
            self._host = [p.data.pin_memory() if pin else p.data for p in self._params()]
        else:
            self.model.to(device)
            if self.head is not None:
                self.head.to(device)

    def describe(self) -> str:
        """One line: which model, head and position are scored (printed at the start of a run)."""
        how = LAYOUTS[self.layout][1] if self.layout in LAYOUTS else "its own forward's score"
        return (f"reward model: {self.name} ({self.layout} layout): {how}, truncated to "
                f"{self.max_length} tokens")

    def _params(self):
        return list(self.model.parameters()) + (
            list(self.head.parameters()) if self.head is not None else []
        )

    def _move(self, to_device: bool) -> None:
        for p, host in zip(self._params(), self._host, strict=True):
            p.data = host.to(self.device, non_blocking=True) if to_device else host

    def _encode(self, text: str) -> list[int]:
        """Token ids the model scores, its score position last (see the class docstring)."""
        tok = self.tokenizer
        if (
            self.layout == "athene"
        ):  # as the model card and the authors' code: default special tokens
            return tok(text + tok.cls_token, truncation=True, max_length=self.max_length)[
                "input_ids"
            ]
        if self.layout == "openrlhf":
            text = text.rstrip("\n")
            text = text if text.endswith(tok.eos_token) else text + " " + tok.eos_token
        ids = tok(text, add_special_tokens=False, truncation=True, max_length=self.max_length)[
            "input_ids"
        ]
        if self.layout == "openrlhf":
            ids[-1] = (
                tok.eos_token_id
            )  # OpenRLHF's collate: the last token is EOS, truncated or not
        return ids

    @torch.no_grad()
    def _forward(self, rows: list[list[int]]) -> list[float]:
        device = self.device
        lengths = torch.tensor([len(r) for r in rows], device=device)
        ids = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        ids = ids.to(device)
        mask = (
            torch.arange(ids.shape[1], device=device) < lengths[:, None]
        ).long()  # right padding
        if self.layout == "custom":
            out = self.model(input_ids=ids, attention_mask=mask, use_cache=False)
            return getattr(out, "score", out.logits[:, :1]).float().view(-1).tolist()
        hidden = self.model.base_model(
            input_ids=ids, attention_mask=mask, use_cache=False
        ).last_hidden_state
        if self.layout == "athene":  # the last CLS of each row (0 if truncation cut it off)
            is_cls = ids == self.tokenizer.cls_token_id
            pos = torch.where(
                is_cls.any(1), (is_cls * torch.arange(ids.shape[1], device=device)).argmax(1), 0
            )
        else:
            pos = lengths - 1
        head = self.model.score if self.layout == "score" else self.head
        scores = head(hidden[torch.arange(len(rows), device=device), pos]).float()[:, 0]  # (B,)
        if self.layout == "athene":
            scores = torch.where(is_cls.any(1), scores, 0.0)
        return ((scores - self.norm[0]) / self.norm[1]).tolist()

    def score(self, prompts: list[str | list[dict]], responses: list[str]) -> list[float]:
        """One float per (prompt, response): the RM's scalar on the chat [user, assistant] (or the
        prompt's messages, then the assistant's reply)."""
        texts = [
            self.tokenizer.apply_chat_template(
                ([{"role": "user", "content": p}] if isinstance(p, str) else p)
                + [{"role": "assistant", "content": r}],
                tokenize=False,
            )
            for p, r in zip(prompts, responses, strict=True)
        ]
        enc = [self._encode(t) for t in texts]
        cut = sum(len(e) >= self.max_length for e in enc)
        if cut and not self.truncated:  # said once per process; `truncated` keeps counting
            rank = os.environ.get("RANK")
            print(
                f"{f'[rank {rank}] ' if rank else ''}reward model: {cut} of {len(enc)} "
                "(prompt, response) rows "
                f"were cut to --rm-max-length {self.max_length} tokens"
                + (
                    ": Athene's CLS token is cut off with them and such a row scores 0 (as the "
                    "authors' code scores it); raise --rm-max-length to score them"
                    if self.layout == "athene"
                    else " (scored on their first tokens)"
                ),
                flush=True,
            )
        self.truncated += cut
        order = sorted(range(len(enc)), key=lambda i: len(enc[i]))  # similar lengths, less padding
        scores = [0.0] * len(enc)
        if self._host is not None:  # `offload=True`: on the device only while scoring
            self._move(to_device=True)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            for i, s in zip(idx, self._forward([enc[i] for i in idx]), strict=True):
                scores[i] = s
        if self._host is not None:
            self._move(to_device=False)
        return scores


@contextlib.contextmanager
def _quiet_load_report():
    """transformers prints a load report of missing / unexpected weights; the backbone of a
    value-head layout always has unexpected ones (the head, an LM head). Missing ones are refused
    by the caller."""
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(level)


def _read_tensors(name: str, keys: list[str]) -> dict[str, torch.Tensor]:
    """The named tensors of a checkpoint (a local folder or, already in the cache once the model
    has loaded, a hub id), in fp32; only those tensors are read from their files."""
    files = checkpoint_tensor_names(name)
    out = {}
    for key in keys:
        if _looks_local(name):
            path = str(Path(name).expanduser() / files[key])
        else:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(name, files[key])
        with safe_open(path, "pt") as f:
            out[key] = f.get_tensor(key).float()
    return out


def score(
    rewards_by_task: dict, batch: list[dict], outs, reward_model
) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, n) rewards of each prompt's n completions, each row by its own task's function in
    `rewards_by_task` (a script's `REWARDS`: task -> f(rows, outs, reward_model) -> (rows, n)),
    called once per task on all of its rows (one batched reward-model pass, one move with
    --rm-offload). Also returns the (P,) mask of groups that held a NaN / inf reward.
    CRUCIAL: such a group is never trained on: it is set to 0 (all-equal: no pair, no advantage)
    and counted in `rollout/nonfinite_groups`."""
    n = len(outs[0]) if outs else 0
    rewards = torch.zeros(len(batch), n)  # (P, n)
    for task in sorted({row["task"] for row in batch}):
        if task not in rewards_by_task:
            raise UserError(
                f"rows of task '{task}' but no reward for it (the script's REWARDS: "
                f"{', '.join(rewards_by_task)})"
            )
        idx = [j for j, row in enumerate(batch) if row["task"] == task]
        rewards[idx] = rewards_by_task[task](
            [batch[j] for j in idx], [outs[j] for j in idx], reward_model
        )
    nonfinite = ~torch.isfinite(rewards).all(dim=1)  # (P,)
    rewards[nonfinite] = 0.0
    return rewards, nonfinite
