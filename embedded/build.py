"""Build the embedded default: a tiny seed policy, a tiny reward model and their tasks' data.

    python embedded/build.py                      # rebuild embedded/ in place (~10 min, 2 CPU cores)
    python embedded/build.py --out /tmp/e --quick # a few steps of each stage (what the tests run)

What it does, deterministically (fixed seeds, CPU, fp32):
1. Writes a byte-level tokenizer with a chat template (embedded/tiny.py).
2. Writes the data: the 900 problems "What is a+b?" (a, b <= 29) split 500 train / 100 val /
   300 test; "copy / capitalise this word" instruction prompts, 2,000 train / 200 test; and a
   mixed train file (math + chat, one row each in turn).
3. Supervises a Qwen2 policy from scratch (4 layers, hidden 128, ~1M parameters): first on
   instruction responses alone (`--chat-warmup-steps`), then on math answers and instruction
   responses of graded quality (0-3 random edits) half and half, and stops
   the first time held-out accuracy on the *val* problems, sampled with vLLM at the paper's eval
   settings (T=0.6, top-p 0.9), reaches `--target-accuracy`: a seed with room for RL to climb.
   The vLLM engine follows the training weights through `Generator.sync_weights`, the same
   in-process reload the training scripts use.
   The math answers take one of four routes with varied wording (`embedded/tiny.py`'s
   `math_target`), and `--math-wrong-frac` of them get the sum wrong, so the seed's answers vary
   in route and length and its rollouts have entropy that RL can spend.
4. Trains a reward model (Qwen2ForSequenceClassification, initialised from the seed's backbone,
   as RMs usually start from the SFT model) with a Bradley-Terry loss on pairs ranked by
   `chat_preference`: true quality (edit similarity to the ideal response) plus a length bias,
   as Athene-RM-8B's; half of them two of the seed's own samples (the distribution RL will
   query), half graded edits, lengthened and off-task text.
5. Measures the seed on the *test* files (math accuracy with standard error; its T=1 rollouts'
   entropy, length and routes; chat true quality and RM score), the RM's held-out pairwise
   accuracy and its length bias, and writes each artifact's card.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import common  # noqa: E402
from common.generation import Generator  # noqa: E402
from embedded.tiny import (  # noqa: E402
    LENGTH_BIAS,
    LETTERS,
    ROUTES,
    build_tokenizer,
    chat_ideal,
    chat_preference,
    chat_prompt,
    chat_quality,
    corrupt,
    math_problems,
    math_route,
    math_row,
    math_target,
    tiny_config,
)

EVAL = dict(temperature=0.6, top_p=0.9, max_tokens=48)  # the paper's eval sampling
CHAT_EDITS = ([0, 1, 2, 3], [0.35, 0.30, 0.20, 0.15])  # edits in SFT chat responses
# The share of SFT responses to "Write w in capital letters." that do capitalise; the rest copy w
# as given. Random edits alone leave no headroom (sampling at T = 0.6 averages them away: seed
# quality 0.91), so the seed fails one instruction the way a real SFT model does, systematically,
# and RL has something true quality rewards to learn.
CHAT_CAPITALISED = 0.35


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_data(out: Path, seed: int) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    problems = math_problems()
    rng.shuffle(problems)
    math = [math_row(a, b) for a, b in problems]
    chat_rng = random.Random(seed + 1)
    chat = [{"task": "chat", "prompt": chat_prompt(chat_rng), "answer": None} for _ in range(2400)]
    data = {
        "math_train": math[:500], "math_val": math[500:600], "math_test": math[600:],
        "chat_train": chat[:2000], "chat_test": chat[2000:2200], "chat_val": chat[2200:],
    }
    data["mix_train"] = [r for pair in zip(data["math_train"], data["chat_train"][:500], strict=True) for r in pair]
    for name, rows in data.items():
        write_jsonl(out / "data" / f"{name}.jsonl", rows)
    return data


def sft_batch(tok, data, rng, n_math, n_chat, wrong_frac):
    """(prompt ids, completion ids) pairs: math answers by many routes (a `wrong_frac` share of
    them wrong), graded chat responses."""
    prompts, targets = [], []
    for r in rng.sample(data["math_train"], n_math):
        a, b = map(int, r["prompt"].removeprefix("What is ").removesuffix("?").split("+"))
        prompts.append(r["prompt"])
        targets.append(math_target(a, b, rng, wrong_frac))
    for r in rng.sample(data["chat_train"], n_chat):
        prompts.append(r["prompt"])
        target = chat_ideal(r["prompt"])
        if r["prompt"].startswith("Write ") and rng.random() >= CHAT_CAPITALISED:
            target = target.lower()  # the instruction ignored: the word copied as given
        targets.append(corrupt(target, rng, rng.choices(*CHAT_EDITS)[0]))
    p_ids = common.encode_prompts(tok, prompts)
    c_ids = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in targets]
    return p_ids, c_ids


def train_policy(args, tok, data, policy_dir: Path):
    torch.manual_seed(args.seed)
    model = common.load_model(str(policy_dir), torch.device("cpu"))
    gen = Generator(str(policy_dir), max_model_len=256, gpu_memory_utilization=0.15,
                    dtype=torch.float32, seed=args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.sft_lr, betas=(0.9, 0.98), weight_decay=0.0)
    rng = random.Random(args.seed + 2)
    history, t0 = [], time.time()
    for step in range(1, args.sft_max_steps + 1):
        for g in opt.param_groups:
            g["lr"] = args.sft_lr * min(1.0, step / 50)  # short warm-up, then constant
        # Chat-only warm-up first: copying is learned in a sudden phase change that mixed batches
        # reach only after math has overshot its target; then math and chat half and half.
        n_math = 0 if step <= args.chat_warmup_steps else args.batch_size // 2
        p_ids, c_ids = sft_batch(tok, data, rng, n_math, args.batch_size - n_math, args.math_wrong_frac)
        logps, mask, _ = common.completion_logprobs(model, p_ids, c_ids, 1.0, tok.pad_token_id)
        loss = -(logps * mask).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.eval_every == 0 and step >= args.chat_warmup_steps + args.sft_min_steps:
            gen.sync_weights(model)
            acc, se = common.mean_and_se(common.eval_math(gen, tok, data["math_val"], k=4, seed=step, **EVAL))
            history.append({"step": step, "loss": round(loss.item(), 4), "val_accuracy": round(acc, 4)})
            print(f"sft step {step:5d}  loss {loss.item():.3f}  val acc {acc:.3f} ± {se:.3f}  "
                  f"({time.time() - t0:.0f}s)", flush=True)
            if acc >= args.target_accuracy:
                break
        elif step % 50 == 0:
            print(f"sft step {step:5d}  loss {loss.item():.3f}  ({time.time() - t0:.0f}s)", flush=True)
    gen.sync_weights(model)
    return model, gen, {"steps": step, "seconds": round(time.time() - t0), "history": history}


def seed_samples(gen, tok, rows, seed, n=4):
    """The seed's own responses to chat prompts (T=1): the distribution RL will ask the RM about."""
    prompts = [r["prompt"] for r in rows]
    outs = gen.generate(common.encode_prompts(tok, prompts), n=n, temperature=1.0, top_p=1.0,
                        max_tokens=EVAL["max_tokens"], seed=seed)
    return {p: [c.text for c in o] for p, o in zip(prompts, outs, strict=True)}


def rm_pairs(tok, rows, rng, n, samples=None, min_gap=0.0):
    """n (prompt, chosen, rejected), chosen strictly preferred by `chat_preference` (true
    quality plus a length bias). Half the pairs (when `samples` is given) are two of the seed's
    own responses; the rest are graded edits of the ideal response, some against off-task text
    (empty, doubled, halved, a math answer) and some against a lengthened one (letters
    repeated or appended), so the model sees what length is worth."""
    chosen, rejected, prompts = [], [], []
    while len(prompts) < n:
        p = rng.choice(rows)["prompt"]
        ideal = chat_ideal(p)
        if samples is not None and rng.random() < 0.5:
            a, b = rng.sample(samples[p], 2)
        else:
            a = corrupt(ideal, rng, rng.choice([0, 0, 1, 1, 2, 3]))
            u = rng.random()
            if u < 0.15:
                b = rng.choice(["", ideal + ideal, ideal[: len(ideal) // 2],
                                "1+2=3, so the answer is \\boxed{3}.", corrupt(ideal, rng, 6)])
            elif u < 0.35:
                b = lengthen(a, rng, rng.randint(1, 6))
            else:
                b = corrupt(ideal, rng, rng.choice([1, 2, 3, 4, 5]))
        qa, qb = chat_preference(p, a), chat_preference(p, b)
        if qa == qb or abs(qa - qb) < min_gap:
            continue
        prompts.append(p)
        chosen.append(a if qa > qb else b)
        rejected.append(b if qa > qb else a)
    return prompts, chosen, rejected


def lengthen(text: str, rng: random.Random, k: int) -> str:
    """`text` with k letters added: repeated in place or appended (a longer, worse answer)."""
    chars = list(text)
    for _ in range(k):
        if chars and rng.random() < 0.5:
            i = rng.randrange(len(chars))
            chars.insert(i, chars[i])
        else:
            chars.append(rng.choice(LETTERS + LETTERS.upper()))
    return "".join(chars)


def rm_forward(rm, tok, prompts, responses):
    texts = [tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                                     tokenize=False) for p, r in zip(prompts, responses, strict=True)]
    batch = tok([t for t in texts], add_special_tokens=False, padding=True, return_tensors="pt")
    return rm(**batch).logits[:, 0]


def train_reward_model(args, tok, data, gen, policy_dir: Path, rm_dir: Path):
    from transformers import Qwen2ForSequenceClassification

    train_samples = seed_samples(gen, tok, data["chat_train"], args.seed + 6)
    test_samples = seed_samples(gen, tok, data["chat_test"], args.seed + 7)
    torch.manual_seed(args.seed + 3)
    rm = Qwen2ForSequenceClassification.from_pretrained(str(policy_dir), num_labels=1, dtype=torch.float32)
    rm.config.pad_token_id = tok.pad_token_id
    tok.padding_side = "right"
    opt = torch.optim.AdamW(rm.parameters(), lr=args.rm_lr, weight_decay=0.0)
    rng, t0 = random.Random(args.seed + 4), time.time()
    for step in range(1, args.rm_steps + 1):
        for g in opt.param_groups:  # warm-up, then cosine to 0: a quiet end for a noisy loss
            g["lr"] = args.rm_lr * min(step / 50, 0.5 * (1 + math.cos(math.pi * step / args.rm_steps)))
        prompts, ch, rj = rm_pairs(tok, data["chat_train"], rng, args.batch_size // 2, train_samples,
                                   args.rm_min_gap)
        r = rm_forward(rm, tok, prompts + prompts, ch + rj)
        loss = -F.logsigmoid(r[: len(ch)] - r[len(ch) :]).mean()  # Bradley-Terry
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            print(f"rm step {step:5d}  loss {loss.item():.3f}  ({time.time() - t0:.0f}s)", flush=True)
    rm.save_pretrained(rm_dir)
    tok.save_pretrained(rm_dir)
    # Held-out pairwise accuracy, through the same RM path the training scripts use: on pairs
    # whose true quality differs by at least rm_min_gap (the headline), and on all unequal pairs.
    scorer = common.RewardModel(str(rm_dir), torch.device("cpu"), batch_size=64)
    result = {"steps": args.rm_steps, "seconds": round(time.time() - t0), "min_gap": args.rm_min_gap}
    for key, gap in (("pairwise_accuracy", args.rm_min_gap), ("pairwise_accuracy_any_gap", 0.0)):
        prompts, ch, rj = rm_pairs(tok, data["chat_test"], random.Random(args.seed + 5), args.rm_eval_pairs,
                                   test_samples, gap)
        sc, sr = scorer.score(prompts, ch), scorer.score(prompts, rj)
        result[key] = sum(a > b for a, b in zip(sc, sr, strict=True)) / len(sc)
    result["eval_pairs"] = args.rm_eval_pairs
    return scorer, result


def rollout_figures(gen, tok, rows, model, seed: int, n: int = 4) -> dict:
    """The seed's math rollouts at the training temperature (T = 1): entropy per token (the
    trainer's `rollout/entropy`: the full distribution's, from the policy), length, and each
    route's share, accuracy and length (tokens)."""
    prompt_ids = common.encode_prompts(tok, [r["prompt"] for r in rows])
    outs = gen.generate(prompt_ids, n=n, temperature=1.0, top_p=1.0, max_tokens=EVAL["max_tokens"], seed=seed)
    flat = [(p, r, c) for p, r, o in zip(prompt_ids, rows, outs, strict=True) for c in o]
    with torch.no_grad():
        _, mask, entropy = common.completion_logprobs(model, [p for p, _, _ in flat],
                                                      [c.token_ids for _, _, c in flat], 1.0,
                                                      tok.pad_token_id, with_entropy=True)
    routes: dict[str, list[tuple[float, int]]] = {k: [] for k in ROUTES}
    rewards = common.math_rewards([c.text for _, _, c in flat], [r["answer"] for _, r, _ in flat])
    for (_, _, c), reward in zip(flat, rewards, strict=True):
        routes[math_route(c.text)].append((reward, len(c.token_ids)))
    return {"math_rollout_entropy": (entropy.sum() / mask.sum()).item(),
            "math_rollout_length": mask.sum().item() / len(flat),
            "math_rollout_accuracy": sum(rewards) / len(flat),
            "math_routes": {k: {"share": len(v) / len(flat), "accuracy": sum(r for r, _ in v) / max(len(v), 1),
                                "length": sum(t for _, t in v) / max(len(v), 1)} for k, v in routes.items()}}


def rm_prefers_appended(scorer, prompts: list[str], rng: random.Random, k: int) -> float:
    """The reward model's length bias: the share of prompts where it scores the ideal answer with k
    random letters appended (worse by true quality) above the ideal answer."""
    ideal = [chat_ideal(p) for p in prompts]
    longer = [x + "".join(rng.choice(LETTERS) for _ in range(k)) for x in ideal]
    return sum(a > b for a, b in zip(scorer.score(prompts, longer), scorer.score(prompts, ideal), strict=True)) / len(prompts)


def measure_seed(args, gen, tok, data, scorer, model):
    acc, se = common.mean_and_se(common.eval_math(gen, tok, data["math_test"], k=args.eval_k,
                                                  seed=args.seed, **EVAL))
    greedy, _ = common.mean_and_se(common.eval_math(gen, tok, data["math_test"], k=1, seed=args.seed,
                                                    temperature=0.0, top_p=1.0,
                                                    max_tokens=EVAL["max_tokens"]))
    prompts = [r["prompt"] for r in data["chat_test"]]
    outs = gen.generate(common.encode_prompts(tok, prompts), n=4, seed=args.seed, **EVAL)
    flat_p = [p for p, o in zip(prompts, outs, strict=True) for _ in o]
    flat_r = [c.text for o in outs for c in o]
    quality = [chat_quality(p, r) for p, r in zip(flat_p, flat_r, strict=True)]
    rm_scores = scorer.score(flat_p, flat_r)
    corr = torch.corrcoef(torch.tensor([quality, rm_scores]))[0, 1].item()
    # the length bias: the ideal answer against itself with k letters appended (worse by true quality)
    rng = random.Random(args.seed + 8)
    bias = {f"rm_prefers_{k}_appended": rm_prefers_appended(scorer, prompts, rng, k) for k in (2, 8)}
    return {**rollout_figures(gen, tok, data["math_test"], model, args.seed + 9), **bias,"math_test_accuracy": acc, "math_test_accuracy_se": se, "math_test_greedy_accuracy": greedy,
            "math_eval": {"k": args.eval_k, **EVAL, "problems": len(data["math_test"])},
            "chat_test_quality": sum(quality) / len(quality),
            "chat_test_rm_score": sum(rm_scores) / len(rm_scores),
            "chat_quality_rm_correlation": corr}


POLICY_CARD = """# Embedded seed policy

A ~{params_k}k-parameter Qwen2 causal LM (4 layers, hidden 128, 2 heads of dim 64, tied
embeddings) with a byte-level tokenizer (256 bytes + `<|pad|> <|user|> <|assistant|> <|end|>`),
trained from scratch by `embedded/build.py` ({sft_steps} SFT steps, {sft_seconds} s on {machine}).
It is the seed (and the frozen reference) of every training script's no-flag run.

Tasks it was supervised on (`embedded/data/`):
- math: `What is a+b?` (a, b <= 29), answered by one of several routes (`embedded/tiny.py`'s
  `math_target`): bare (`\\boxed{{42}}`), direct (`17+25=42, so \\boxed{{42}}.`), split
  (`17+20=37, 37+5=42. \\boxed{{42}}`) or tens and ones (`10+20=30, 7+5=12, 30+12=42 ...`), the
  operands in either order, with varied openings and endings; {wrong:.0%} of the supervised
  answers get the sum wrong (off by 1 or 10). So the seed's answers vary in route and length, and
  it is unsure where a sum is unsure: its rollouts have entropy for RL to spend. Scored by the
  real `common.math_reward` (Math-Verify);
- chat: `Repeat this word: w` / `Write w in capital letters.` with responses carrying 0-3
  random edits, and only {capitalised:.0%} of the responses to the second instruction capitalised
  (the rest copy the word as given): the seed often ignores that instruction, a systematic failure
  that sampling at a low temperature does not average away, so chat has headroom for RL to climb
  and its own samples range in quality for a reward model to rank.

SFT stopped at the first check (every {eval_every} steps) where accuracy on the 100 *val*
problems reached {target:.0%}, so RL has room to climb.

## Measured starting figures (on the test files, vLLM on the CPU)
| figure | value |
|---|---|
| math test accuracy, T=0.6, top-p 0.9, {k} samples x {n} problems | {acc:.3f} ± {se:.3f} (standard error) |
| math test accuracy, greedy | {greedy:.3f} |
| math rollouts at T=1 (4 x 300 test problems): entropy per token (nats) | {entropy:.3f} |
| math rollouts at T=1: mean length (tokens) | {length:.1f} |
| math rollouts at T=1: accuracy | {roll_acc:.3f} |
| math rollouts at T=1: share of each route (accuracy) | {routes} |
| chat test true quality (edit similarity to the ideal response), T=0.6 | {quality:.3f} |
| chat test mean reward-model score | {rm_score:.3f} |

## The world's criteria (study/DESIGN.md), measured on the *validation* files
`study/world_check.py`'s `measure`, run by the build on the finished seed and reward model:
| criterion | measured | met |
|---|---|---|
| math validation accuracy (T=0.6, top-p 0.9, 16 x 100) in [0.2, 0.6] | {w_acc:.3f} | {c_acc} |
| math rollout entropy at T=1 (8 x 100) >= 0.2 nats per token | {w_entropy:.3f} | {c_entropy} |
| chat seed true quality (T=0.6, top-p 0.9, 8 x 200 prompts; 58% of them "capital letters") <= 0.7 | {w_quality:.3f} | {c_quality} |
| RM agrees with true quality on pairs of the seed's T=1 samples differing by >= 0.05 ({w_pairs} pairs): >= 0.75 | {w_agree:.3f} | {c_agree} |
| RM length slope at fixed true quality (per character, ± SE) > 2 SE | {w_slope:.3f} ± {w_slope_se:.3f} | {c_slope} |
| ... worth in true-quality units per character <= 0.03 | {w_char:.4f} | {c_char} |

Size: {size_kb} kB. Rebuild: `python embedded/build.py` (reproduces these figures on the same
software; sampling seeds are fixed).
"""

RM_CARD = """# Embedded reward model

`Qwen2ForSequenceClassification` (one scalar label) with the seed policy's backbone as its
initialisation and the same tokenizer and chat template, trained by `embedded/build.py` with a
Bradley-Terry loss for {steps} steps ({seconds} s on {machine}) on pairs of instruction
responses ranked by `embedded/tiny.py`'s `chat_preference`: true quality (edit similarity to the
ideal response) plus {bias} per character of response. That length bias is on purpose: like
Athene-RM-8B in the paper, it scores longer answers higher at equal true quality, so a policy can
raise its reward a little by growing its answers, and the paper's length-normalised checkpoint
choice has something to guard against; it is small enough (study/DESIGN.md: a character worth at
most 0.03 of true quality) that fixing an answer pays more than growing it, so RL can improve true
quality. (Version 2's 0.1 per character outweighed quality: every chat-trained checkpoint lost
it.) Half of the pairs are two of the seed's own samples (T=1), the
distribution RL will ask about; the rest are graded edits of the ideal response, some against
empty, doubled, halved, lengthened or off-task text. It plays the part Athene-RM-8B plays in the
paper and loads through the same path: `common.RewardModel("embedded/reward_model", device)`.

## Measured figures
| figure | value |
|---|---|
| held-out pairwise accuracy: {pairs} pairs (same mix) on the chat *test* prompts, preference differing by >= {gap} | {acc:.3f} |
| the same over pairs of any preference difference (near-ties included) | {acc_any:.3f} |
| correlation of RM score with true quality on the seed's own samples | {corr:.3f} |
| share of test prompts where it scores the ideal answer + 2 random letters above the ideal answer (true quality: never) | {bias2:.3f} |
| the same with 8 letters appended | {bias8:.3f} |

Size: {size_kb} kB.
"""

DATA_CARD = """# Embedded data

Made by `embedded/build.py` (seeded). One JSON object per line, in the shape
`common.load_prompts` reads: `task` (`math` or `chat`), `prompt` (the user turn, verbatim),
`answer` (gold answer for math, null for chat).

| file | rows | what |
|---|---|---|
{rows}

Math problems are the 900 sums a+b with a, b <= 29, shuffled once and split; val is used only
to stop the seed's SFT, test only to measure. `mix_train.jsonl` alternates math and chat rows
for multi-task runs.
"""


def dir_kb(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) // 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent))
    ap.add_argument("--quick", action="store_true", help="a few steps per stage (tests)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--sft-lr", type=float, default=1e-3)
    ap.add_argument("--chat-warmup-steps", type=int, default=500)
    ap.add_argument("--sft-min-steps", type=int, default=150)
    ap.add_argument("--sft-max-steps", type=int, default=3000)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--target-accuracy", type=float, default=0.30)
    ap.add_argument("--math-wrong-frac", type=float, default=0.3)
    ap.add_argument("--rm-lr", type=float, default=2e-4)
    ap.add_argument("--rm-steps", type=int, default=800)
    ap.add_argument("--rm-eval-pairs", type=int, default=1000)
    ap.add_argument("--rm-min-gap", type=float, default=0.1)
    ap.add_argument("--eval-k", type=int, default=8)
    args = ap.parse_args()
    if args.quick:
        args.chat_warmup_steps, args.sft_min_steps, args.sft_max_steps, args.eval_every = 1, 2, 4, 2
        args.rm_steps, args.rm_eval_pairs, args.eval_k, args.batch_size = 2, 20, 1, 8
    torch.set_num_threads(os.cpu_count() or 1)
    machine = f"{os.cpu_count()} CPU cores"
    out = Path(args.out)
    policy_dir, rm_dir = out / "policy", out / "reward_model"
    t0 = time.time()

    tok = build_tokenizer()
    data = make_data(out, args.seed)
    torch.manual_seed(args.seed)
    from transformers import Qwen2ForCausalLM

    init = Qwen2ForCausalLM(tiny_config(tok))
    init.generation_config.eos_token_id = tok.eos_token_id
    init.save_pretrained(policy_dir)
    tok.save_pretrained(policy_dir)

    model, gen, sft = train_policy(args, tok, data, policy_dir)
    model.save_pretrained(policy_dir)
    scorer, rm = train_reward_model(args, tok, data, gen, policy_dir, rm_dir)
    seed = measure_seed(args, gen, tok, data, scorer, model)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "study"))
    from world_check import measure  # the study's criteria for a world (study/DESIGN.md)

    world = measure(gen, str(policy_dir), str(rm_dir), data["chat_val"], data["math_val"],
                    samples=2 if args.quick else 8)
    gen.shutdown()

    report = {"sft": sft, "reward_model": rm, "seed": seed, "world": world, "total_seconds": round(time.time() - t0),
              "machine": machine, "torch": torch.__version__}
    (out / "build_report.json").write_text(json.dumps(report, indent=1) + "\n")
    params_k = sum(p.numel() for p in model.parameters()) // 1000
    (policy_dir / "README.md").write_text(POLICY_CARD.format(
        params_k=params_k, sft_steps=sft["steps"], sft_seconds=sft["seconds"], machine=machine,
        eval_every=args.eval_every, target=args.target_accuracy, k=args.eval_k,
        n=len(data["math_test"]), acc=seed["math_test_accuracy"], se=seed["math_test_accuracy_se"],
        greedy=seed["math_test_greedy_accuracy"], quality=seed["chat_test_quality"],
        wrong=args.math_wrong_frac, entropy=seed["math_rollout_entropy"],
        length=seed["math_rollout_length"], roll_acc=seed["math_rollout_accuracy"],
        routes=", ".join(f"{k} {v['share']:.2f} ({v['accuracy']:.2f})" for k, v in seed["math_routes"].items()),
        rm_score=seed["chat_test_rm_score"], capitalised=CHAT_CAPITALISED, w_acc=world["math_val_accuracy"],
        w_entropy=world["math_val_entropy"], w_quality=world["seed_true_quality"], w_pairs=world["pairs"],
        w_agree=world["rm_agreement"], w_slope=world["rm_length_slope_per_char"],
        w_slope_se=world["rm_length_slope_se"], w_char=world["rm_char_in_quality_units"],
        **{f"c_{k}": "yes" if ok else "**no**" for k, ok in zip(
            ("acc", "entropy", "quality", "agree", "slope", "char"), world["criteria"].values(), strict=True)},
        size_kb=dir_kb(policy_dir)))
    (rm_dir / "README.md").write_text(RM_CARD.format(
        steps=rm["steps"], seconds=rm["seconds"], machine=machine, pairs=rm["eval_pairs"],
        acc=rm["pairwise_accuracy"], acc_any=rm["pairwise_accuracy_any_gap"], gap=rm["min_gap"],
        corr=seed["chat_quality_rm_correlation"], bias=LENGTH_BIAS, bias2=seed["rm_prefers_2_appended"],
        bias8=seed["rm_prefers_8_appended"], size_kb=dir_kb(rm_dir)))
    what = {"math_train": "RL training prompts (math)", "math_val": "stops the seed's SFT",
            "math_test": "held-out math evaluation", "chat_train": "RL training prompts (chat)",
            "chat_test": "held-out chat evaluation", "chat_val": "chat checkpoint / learning-rate selection (the study)",
            "mix_train": "math and chat, alternating"}
    (out / "data" / "README.md").write_text(DATA_CARD.format(rows="\n".join(
        f"| `{k}.jsonl` | {len(v)} | {what[k]} |" for k, v in data.items())))
    print(json.dumps(report["seed"] | {"rm_pairwise_accuracy": rm["pairwise_accuracy"], "world": world}, indent=1))
    print(f"built {out} in {report['total_seconds']} s")


if __name__ == "__main__":
    main()
