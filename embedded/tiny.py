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
    """The canonical direct solution (one of `math_target`'s routes, always right)."""
    return f"{a}+{b}={a + b}, so the answer is \\boxed{{{a + b}}}."


# How a seed answer ends: a few phrasings, so the seed's answers differ in more than the sum.
TAILS = (", so the answer is \\boxed{{{c}}}.", ". \\boxed{{{c}}}", ", so \\boxed{{{c}}}.",
         ". Answer: \\boxed{{{c}}}", " and the answer is \\boxed{{{c}}}")
OPENERS = ("", "", "Sum: ", "Adding: ", "We add. ")
ROUTES = ("bare", "direct", "split", "tens_ones")
MAX_TARGET_CHARS = 46  # leaves room under the scripts' default 48 new tokens (one token per char)


def math_steps(a: int, b: int, route: str, c: int) -> str:
    """The working of one route, ending in the sum c (which a wrong answer changes).
    direct: `17+25=42`; split (the second operand's tens, then its ones): `17+20=37, 37+5=42`;
    tens_ones (tens and ones apart, then together): `10+20=30, 7+5=12, 30+12=42`."""
    if route == "direct":
        return f"{a}+{b}={c}"
    if route == "split":
        return f"{a}+{b - b % 10}={a + b - b % 10}, {a + b - b % 10}+{b % 10}={c}"
    tens, ones = a - a % 10 + b - b % 10, a % 10 + b % 10
    return f"{a - a % 10}+{b - b % 10}={tens}, {a % 10}+{b % 10}={ones}, {tens}+{ones}={c}"


def math_target(a: int, b: int, rng: random.Random, wrong_frac: float) -> str:
    """One supervised answer to "What is a+b?", drawn from a spread of routes so the seed's
    answers vary in length and route as a real model's do: bare (`\\boxed{42}`), direct,
    split or tens-and-ones working, the operands in either order, one of several openings and
    endings. A
    `wrong_frac` share of them get the sum wrong (off by 1 or by 10, the usual slips), in the
    last step and the box alike: the seed learns to be unsure where a sum is unsure, so its
    rollouts carry entropy an RL run can spend (or collapse)."""
    c = a + b
    if rng.random() < wrong_frac:
        c = max(0, c + rng.choice([-10, -1, 1, 10]))
    while True:
        route = rng.choice(ROUTES)
        if route == "bare":
            return f"\\boxed{{{c}}}"
        x, y = (a, b) if rng.random() < 0.5 else (b, a)
        if route == "split" and y % 10 == 0 or route == "tens_ones" and min(x, y) < 10:
            route = "direct"  # nothing to split
        text = rng.choice(OPENERS) + math_steps(x, y, route, c) + rng.choice(TAILS).format(c=c)
        if len(text) <= MAX_TARGET_CHARS:
            return text


def math_route(text: str) -> str:
    """Which route an answer took, by the number of `=` in its working (0 bare, 1 direct,
    2 split, 3 or more tens and ones)."""
    return ROUTES[min(text.split("\\boxed")[0].count("="), 3)]


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


LENGTH_BIAS = 0.04  # preference per character of response, on top of true quality


def chat_preference(prompt: str, response: str) -> float:
    """What the reward model is trained to prefer: true quality plus LENGTH_BIAS per character.
    Like Athene-RM-8B's in the paper, its preferences favour longer answers beyond their true
    quality, so a policy can raise its reward by growing its answers (which lowers their true
    quality): what the paper's length-normalised checkpoint choice guards against."""
    return chat_quality(prompt, response) + LENGTH_BIAS * len(response)


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
