"""Evaluate a checkpoint or hub model with vLLM, the way the paper does.

math: accuracy averaged over `samples` samples per problem at T = 0.6, top-p 0.9 (the paper: 50
samples), with its standard error over problems, plus greedy accuracy; each of `math_datasets`
separately (MATH-500, AMC23 and NuminaMath test shapes: `problem` or `question`, with `answer`
or a `\\boxed{}` in `solution`; or the embedded test file).
chat: the reward model's mean score, the mean length in tokens, the length-normalised score
(mean score / mean length: the paper picked chat checkpoints by it, because the RM rewards
length) and the win rate against a baseline model's responses on the same prompts, judged by
the reward model (each of the `samples` responses against the baseline's response with the same
index; a tie counts half). The baseline must share the model's architecture: its weights are
pushed into the same engine.

Writes a JSON result (`--output`, default `<model>/eval.json` for a local folder) and prints a
markdown table. Under torchrun the prompts are sharded over ranks and the sums reduced.

Run:
    python evaluate.py --model runs/grpo__1/checkpoint          # embedded math + chat test sets
    torchrun --standalone --nproc_per_node=8 evaluate.py --model runs/online_dpo__1/checkpoint \\
        --math-datasets HuggingFaceH4/MATH-500 math-ai/amc23 --chat-dataset '' --samples 50 \\
        --max-new-tokens 2048 --max-model-len 4096
"""

import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.distributed as dist
import tyro

import common


@dataclass
class Args:
    model: str = "embedded/policy"
    """the model to evaluate: a checkpoint folder (e.g. runs/grpo__1/checkpoint) or a hub id"""
    math_datasets: tuple[str, ...] = ("embedded/data/math_test.jsonl",)
    """math test sets, each reported on its own (hub ids or local files; '' to skip math)"""
    chat_dataset: str = "embedded/data/chat_test.jsonl"
    """chat test prompts ('' to skip)"""
    split: str = "test"
    """split of the hub datasets"""
    reward_model: str = "embedded/reward_model"
    """reward model that scores the chat responses"""
    baseline: str = "embedded/policy"
    """model whose chat responses the win rate is against ('' to skip)"""
    samples: int = 8
    """samples per prompt (the paper: 50)"""
    temperature: float = 0.6
    """sampling temperature (the paper: 0.6)"""
    top_p: float = 0.9
    """nucleus sampling (the paper: 0.9)"""
    max_new_tokens: int = 48
    """completion length limit"""
    max_model_len: int = 256
    """prompt + completion limit of the engine"""
    limit: int = 0
    """at most this many prompts per dataset (0: all)"""
    seed: int = 1
    """sampling seed"""
    math_template: str = common.PAPER_MATH_TEMPLATE
    """user turn for rows that give a `problem`"""
    output: str = ""
    """JSON result path (default: <model>/eval.json for a local folder, else eval.json)"""
    kl_to: str = ""
    """a model to measure this one's drift from (e.g. the seed it was trained from): KL(model || it)
    in nats per token, the mean log-ratio (k1) on the model's own samples at T = 1 and top-p 1 of the
    first math dataset's problems (or the chat prompts); both scored by the trainer's own logprob
    code in --compute-dtype ('' to skip)"""
    kl_samples: int = 4
    """samples per prompt for --kl-to"""
    save_samples: bool = False
    """also write every chat prompt with its sampled responses to the JSON (to score them with
    another judge: the study scores the embedded task's true quality)"""
    gpu_memory_utilization: float = 0.0
    """GPU memory fraction vLLM takes (0: 0.5); on CPU, 0 sizes its KV cache to 256 sequences at once"""
    compute_dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """the reward model's precision, and the engine's under --generator-dtype auto (auto: bf16 on a
    GPU; on the CPU bf16 for a 10M+ parameter --model with AMX / AVX512-BF16, fp32 otherwise)"""
    generator_dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """the engine's precision (auto: --compute-dtype's)"""
    chat_template: str = "auto"
    """what renders the prompts: auto (the tokenizer's own; a checkpoint keeps the one it trained
    with), llama3-no-system (the authors' format), or a Jinja file"""
    trust_remote_code: bool = False
    """allow model repos to run their own code"""


def main(args: Args) -> None:
    rank, world_size, device = common.setup_distributed()
    common.check_args(args, world_size)  # every flag and local path, before any model loads
    args.gpu_memory_utilization = args.gpu_memory_utilization or (0.5 if device.type == "cuda" else 0.0)
    args.output = args.output or (os.path.join(args.model, "eval.json") if os.path.isdir(args.model) else "eval.json")
    dtype = common.compute_dtype(args.compute_dtype, device, args.model)
    tokenizer = common.load_tokenizer(args.model, args.trust_remote_code, args.chat_template)
    if rank == 0:
        print(common.describe_template(tokenizer, args.chat_template), flush=True)
    limit = args.limit or None
    math_sets = {}
    max_prompt = args.max_model_len - args.max_new_tokens
    for spec in (s for s in args.math_datasets if s):  # '' skips math
        rows = common.load_prompts(spec, args.split, args.math_template, limit, task="math", verbose=rank == 0)
        math_sets[spec], _, dropped = common.fit_prompts(tokenizer, rows, max_prompt, need=1, what=spec)
        if rank == 0 and dropped:
            print(f"{spec}: {dropped} prompts too long for max_model_len - max_new_tokens, dropped")
    chat_rows = []
    if args.chat_dataset:
        chat_rows = common.load_prompts(args.chat_dataset, args.split, limit=limit, task="chat", verbose=rank == 0)
        chat_rows, _, dropped = common.fit_prompts(tokenizer, chat_rows, max_prompt, need=1, what=args.chat_dataset)
        if rank == 0 and dropped:
            print(f"{args.chat_dataset}: {dropped} prompts too long for max_model_len - max_new_tokens, dropped")
    reward_model = common.RewardModel(args.reward_model, device, dtype, trust_remote_code=args.trust_remote_code,
                                      verbose=rank == 0) \
        if chat_rows else None
    generator = common.Generator(args.model, max_model_len=args.max_model_len,
                                 max_num_seqs=256,
                                 gpu_memory_utilization=args.gpu_memory_utilization,
                                 dtype=common.engine_dtype(args.generator_dtype, dtype), seed=args.seed,
                                 trust_remote_code=args.trust_remote_code)
    result = {"args": asdict(args), "math": {}, "chat": {}}
    t0 = time.time()

    def in_order(mine: list, n: int) -> list:
        """Every rank's share of a dataset's per-row values (rank r holds rows r, r + world, ...),
        back in the dataset's order."""
        shards = [mine]
        if dist.is_initialized():
            shards = [None] * world_size
            dist.all_gather_object(shards, mine)
        return [shards[i % world_size][i // world_size] for i in range(n)]

    def save() -> None:
        """Write what is measured so far: a later failure (say, an unreachable baseline) loses nothing."""
        if rank == 0:
            os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
            with open(args.output + ".tmp", "w") as f:
                json.dump(result, f, indent=2)
            os.replace(args.output + ".tmp", args.output)

    # ---- math: k samples per problem, and greedy
    for spec, rows in math_sets.items():
        if rank == 0:
            print(f"math {spec}: {len(rows)} problems x {args.samples} samples, then greedy", flush=True)
        mine, seeds = rows[rank::world_size], common.eval_seeds(args.seed, 0, range(rank, len(rows), world_size))
        scores, answers = common.math_samples(generator, tokenizer, mine, k=args.samples, temperature=args.temperature,
                                              top_p=args.top_p, max_tokens=args.max_new_tokens, seed=seeds,
                                              label=f"math {spec}")
        accs = [sum(x) / len(x) for x in scores]  # mean@k = pass@1
        greedy = common.eval_math(generator, tokenizer, mine, k=1, temperature=0.0, top_p=1.0,
                                  max_tokens=args.max_new_tokens, seed=seeds, label=f"math {spec} greedy")
        k = args.samples
        s = common.all_reduce({"n": len(accs), "sum": sum(accs), "sq": sum(a * a for a in accs), "greedy": sum(greedy),
                               "pass": sum(common.pass_at_k(k, int(sum(x)), k) for x in scores),
                               "maj": sum(common.majority_correct(x, a) for x, a in zip(scores, answers, strict=True))})
        acc, se = common.mean_se_from_sums(s["n"], s["sum"], s["sq"])
        result["math"][spec] = {"accuracy": acc, "accuracy_se": se, "greedy_accuracy": s["greedy"] / s["n"],
                                f"pass@{k}": s["pass"] / s["n"], f"maj@{k}": s["maj"] / s["n"],
                                "problems": int(s["n"]), "samples": k,
                                # per problem, in the dataset's order: comparisons can be paired by problem
                                "right_per_problem": in_order([int(sum(x)) for x in scores], len(rows))}
        if rank == 0:
            print(f"math {spec}: accuracy (mean@{k}) {acc:.3f} ± {se:.3f}, pass@{k} {s['pass'] / s['n']:.3f}, "
                  f"maj@{k} {s['maj'] / s['n']:.3f}, greedy {s['greedy'] / s['n']:.3f} "
                  f"({int(s['n'])} problems, {time.time() - t0:.0f} s)", flush=True)
        save()

    # ---- drift: KL(model || --kl-to) per token, on the model's own samples (the engine holds the model)
    if args.kl_to:
        rows = next(iter(math_sets.values()), chat_rows)
        mine, indices = rows[rank::world_size], range(rank, len(rows), world_size)
        prompts = common.encode_prompts(tokenizer, [r["prompt"] for r in mine])
        outs = generator.generate(prompts, n=args.kl_samples, temperature=1.0, top_p=1.0, max_tokens=args.max_new_tokens,
                                  seed=common.eval_seeds(args.seed, 3, indices), label="kl")
        flat_prompts = [p for p, o in zip(prompts, outs, strict=True) for _ in o]
        flat_completions = [c.token_ids for o in outs for c in o]
        totals = []
        for name in (args.model, args.kl_to):  # one at a time: two 8B models need not fit together
            model = common.load_model(name, device, dtype, trainable=False, trust_remote_code=args.trust_remote_code)
            total, tokens = 0.0, 0.0
            for i in range(0, len(flat_completions), 32):  # each rank its own rows: no collective
                mb = slice(i, i + 32)
                with torch.no_grad(), common.autocast(device, dtype):
                    logps, mask, _ = common.completion_logprobs(model, flat_prompts[mb], flat_completions[mb],
                                                                1.0, tokenizer.pad_token_id)
                total, tokens = total + (logps * mask).sum().item(), tokens + mask.sum().item()
            totals.append(total)
            del model
        s = common.all_reduce({"log_ratio": totals[0] - totals[1], "tokens": tokens, "samples": len(flat_completions)})
        result["kl"] = {"to": args.kl_to, "nats_per_token": s["log_ratio"] / max(s["tokens"], 1),
                        "tokens": int(s["tokens"]), "samples": int(s["samples"])}
        if rank == 0:
            print(f"KL(model || {args.kl_to}): {result['kl']['nats_per_token']:.4f} nats per token "
                  f"({int(s['samples'])} samples at T = 1, {int(s['tokens'])} tokens)", flush=True)
        save()

    # ---- chat: reward-model score, length, length-normalised score, win rate vs the baseline
    if chat_rows:
        mine, indices = chat_rows[rank::world_size], range(rank, len(chat_rows), world_size)
        sampling = {"k": args.samples, "temperature": args.temperature, "top_p": args.top_p,
                    "max_tokens": args.max_new_tokens, "label": "chat"}
        if rank == 0:
            print(f"chat {args.chat_dataset}: {len(chat_rows)} prompts x {args.samples} samples"
                  + (f", then the baseline's {args.baseline}" if args.baseline else ""), flush=True)
        scores, lengths, texts = common.eval_chat(generator, tokenizer, reward_model, mine,
                                                  seed=common.eval_seeds(args.seed, 1, indices), **sampling)
        per_prompt = scores.mean(dim=1)
        s = common.all_reduce({"n": len(mine), "sum": per_prompt.sum().item(), "sq": (per_prompt**2).sum().item(),
                               "tokens": lengths.mean(dim=1).sum().item(), "cut": reward_model.truncated})
        reward, reward_se = common.mean_se_from_sums(s["n"], s["sum"], s["sq"])
        length = s["tokens"] / s["n"]
        result["chat"] = {"dataset": args.chat_dataset, "reward_mean": reward, "reward_se": reward_se,
                          "length_mean": length, "reward_per_token": reward / max(length, 1), "prompts": int(s["n"]),
                          "samples": args.samples, "rm_truncated": int(s["cut"])}  # rows cut to --rm-max-length
        if args.save_samples:  # every rank's share, in the dataset's order
            rows = in_order(list(zip([r["prompt"] for r in mine], texts, strict=True)), len(chat_rows))
            result["chat"]["responses"] = [{"prompt": p, "responses": t} for p, t in rows]
        if rank == 0:
            print(f"chat {args.chat_dataset}: reward {reward:.3f} ± {reward_se:.3f}, length {length:.1f} "
                  f"({int(s['n'])} prompts, {time.time() - t0:.0f} s)", flush=True)
        save()
        if args.baseline:
            base = common.load_model(args.baseline, torch.device("cpu"), dtype,
                                     trainable=False, trust_remote_code=args.trust_remote_code)
            generator.sync_weights(base)  # same architecture: the baseline's weights, same engine
            del base
            base_scores, _, _ = common.eval_chat(generator, tokenizer, reward_model, mine,
                                                 seed=common.eval_seeds(args.seed, 2, indices), **sampling)
            wins = (scores > base_scores).float() + 0.5 * (scores == base_scores).float()  # (P, k)
            w = common.all_reduce({"wins": wins.sum().item(), "pairs": wins.numel()})
            result["chat"] |= {"win_rate": w["wins"] / w["pairs"], "baseline": args.baseline}
            save()

    # ---- report
    if rank == 0:
        print(f"\n{args.model}\n")
        if result["math"]:
            k = args.samples
            print(f"| math dataset | accuracy (mean@{k}, T={args.temperature}) | pass@{k} | maj@{k} | greedy | problems |")
            print("|---|---|---|---|---|---|")
            for spec, m in result["math"].items():
                print(f"| {spec} | {m['accuracy']:.3f} ± {m['accuracy_se']:.3f} | {m[f'pass@{k}']:.3f} | "
                      f"{m[f'maj@{k}']:.3f} | {m['greedy_accuracy']:.3f} | {m['problems']} |")
        if result["chat"]:
            c = result["chat"]
            win = f"{c['win_rate']:.3f}" if "win_rate" in c else "-"
            print("\n| chat dataset | RM reward | length | reward / length | win rate vs baseline |")
            print("|---|---|---|---|---|")
            print(f"| {c['dataset']} | {c['reward_mean']:.3f} ± {c['reward_se']:.3f} | {c['length_mean']:.1f} | "
                  f"{c['reward_per_token']:.4f} | {win} |")
        print(f"\nwrote {args.output}")
    generator.shutdown()  # CRUCIAL: before destroy_process_group
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    common.run(main, tyro.cli(Args))
