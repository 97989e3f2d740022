"""Pieces of the embedded default that tests reuse: the byte-level tokenizer, the tiny Qwen2
shapes, and the two synthetic tasks (math and instruction following) with their quality scores.
`embedded/build.py` uses these to train the shipped seed policy and reward model."""

from __future__ import annotations

import random

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config

SPECIALS = ["<|pad|>", "<|user|>", "<|assistant|>", "<|end|>"]
# A minimal ChatML-like template: one special token per role switch keeps prompts short.
# System turns are dropped (the tiny models never saw one).
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}<|end|>"
    "{% elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}<|end|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer(specials: list[str] = SPECIALS, chat_template: str = CHAT_TEMPLATE,
                    eos: str = "<|end|>", pad: str = "<|pad|>") -> PreTrainedTokenizerFast:
    """A character-level tokenizer that survives `AutoTokenizer` and vLLM: byte-level BPE whose
    vocabulary is the 256 bytes (no merges) plus the special tokens. (A `WordLevel` tokenizer
    comes back from `AutoTokenizer` with its spaces and newlines dropped.)"""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=pad,
                                   chat_template=chat_template, model_max_length=512)


def tiny_config(tokenizer, hidden: int = 128, layers: int = 4, heads: int = 2,
                intermediate: int = 512, max_len: int = 512, **kw) -> Qwen2Config:
    """Qwen2 shapes vLLM's CPU kernels accept: head_dim = hidden / heads = 64 (16 is rejected)."""
    return Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=max_len, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None, **kw)


# ---------------------------------------------------------------------------------------------
# Synthetic math: "What is a+b?" with a gold answer, scored by the real Math-Verify path.
# ---------------------------------------------------------------------------------------------
MATH_MAX = 29


def math_problems() -> list[tuple[int, int]]:
    return [(a, b) for a in range(MATH_MAX + 1) for b in range(MATH_MAX + 1)]


def math_row(a: int, b: int) -> dict:
    return {"task": "math", "prompt": f"What is {a}+{b}?", "answer": str(a + b)}


def math_solution(a: int, b: int) -> str:
    return f"{a}+{b}={a + b}, so the answer is \\boxed{{{a + b}}}."


# ---------------------------------------------------------------------------------------------
# Synthetic instruction following with graded quality: copy or capitalise a word. A response's
# true quality is its edit similarity to the ideal one; the reward model learns to rank by it.
# ---------------------------------------------------------------------------------------------
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def chat_prompt(rng: random.Random) -> str:
    word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 7)))
    return rng.choice([f"Repeat this word: {word}", f"Write {word} in capital letters."])


def chat_ideal(prompt: str) -> str:
    if prompt.startswith("Repeat this word: "):
        return prompt.removeprefix("Repeat this word: ")
    return prompt.removeprefix("Write ").removesuffix(" in capital letters.").upper()


def edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def chat_quality(prompt: str, response: str) -> float:
    """True quality in [0, 1]: 1 - edit distance / max length, against the ideal response."""
    ideal = chat_ideal(prompt)
    return 1.0 - edit_distance(ideal, response) / max(len(ideal), len(response), 1)


def corrupt(text: str, rng: random.Random, edits: int) -> str:
    """`edits` random substitutions, deletions or duplications: graded-quality responses."""
    chars = list(text)
    pool = LETTERS + LETTERS.upper()
    for _ in range(edits):
        if not chars:
            break
        i = rng.randrange(len(chars))
        op = rng.choice(["sub", "del", "dup"])
        if op == "sub":
            chars[i] = rng.choice(pool)
        elif op == "del" and len(chars) > 1:
            del chars[i]
        else:
            chars.insert(i, chars[i])
    return "".join(chars)
