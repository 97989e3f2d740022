"""The embedded default: shipped artifacts load everywhere they must, and match their cards."""

import json
import os
import random
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import common
from embedded.build import EVAL, rm_pairs, rm_prefers_appended, rollout_figures, seed_samples
from embedded.tiny import chat_preference, math_solution
from tests.conftest import EMBEDDED

REPORT = json.load(open(os.path.join(EMBEDDED, "build_report.json")))
POLICY, RM, DATA = (os.path.join(EMBEDDED, p) for p in ("policy", "reward_model", "data"))


def test_sizes_are_small():
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(EMBEDDED) for f in fs
                if "__pycache__" not in d)
    assert total < 20 * 2**20


def test_data_files_load_and_gold_answers_verify():
    math_test = common.load_prompts(os.path.join(DATA, "math_test.jsonl"))
    assert len(math_test) == 300 and {r["task"] for r in math_test} == {"math"}
    # the format the seed was taught scores 1 through the real Math-Verify path
    for r in math_test[:50]:
        a, b = map(int, r["prompt"].removeprefix("What is ").removesuffix("?").split("+"))
        assert common.math_reward(math_solution(a, b), r["answer"]) == 1.0
        assert common.math_reward(math_solution(a, b + 1), r["answer"]) == 0.0
    mix = common.load_prompts(os.path.join(DATA, "mix_train.jsonl"))
    assert {r["task"] for r in mix} == {"math", "chat"}
    train = {r["prompt"] for r in common.load_prompts(os.path.join(DATA, "math_train.jsonl"))}
    assert not train & {r["prompt"] for r in math_test}  # held out


def test_shipped_policy_loads_in_transformers():
    tok = common.load_tokenizer(POLICY)
    model = AutoModelForCausalLM.from_pretrained(POLICY)
    ids = common.encode_prompts(tok, ["What is 2+3?"])[0]
    assert tok.decode(ids) == "<|user|>What is 2+3?<|end|><|assistant|>"  # spaces survive the round trip
    out = model.generate(torch.tensor([ids]), max_new_tokens=48, do_sample=False)
    assert "\\boxed{" in tok.decode(out[0, len(ids):])


def test_shipped_seed_matches_its_card(generator):
    """Re-measure the card's figure with vLLM (the engine loaded the shipped policy from disk)."""
    tok = common.load_tokenizer(POLICY)
    generator.sync_weights(common.load_model(POLICY, torch.device("cpu")))  # other tests swap weights
    seed = REPORT["seed"]
    acc, se = common.mean_and_se(common.eval_math(
        generator, tok, common.load_prompts(os.path.join(DATA, "math_test.jsonl")),
        k=seed["math_eval"]["k"], seed=0, **EVAL))
    assert abs(acc - seed["math_test_accuracy"]) <= 2 * seed["math_test_accuracy_se"], (acc, seed)
    assert 0.20 <= acc <= 0.45  # RL has room to climb


def test_shipped_seed_has_entropy_and_routes_to_spend(generator):
    """The seed's math rollouts at T = 1 carry >= 0.3 nats per token (there is entropy for an
    online run to collapse) and take several routes of different lengths (there is length to
    change), re-measured here with other sampling seeds than the card's."""
    tok = common.load_tokenizer(POLICY)
    model = common.load_model(POLICY, torch.device("cpu"))
    generator.sync_weights(model)
    rows = common.load_prompts(os.path.join(DATA, "math_test.jsonl"))
    fig = rollout_figures(generator, tok, rows, model, seed=321, n=2)
    measured = fig["math_rollout_entropy"]
    assert measured >= 0.3 and abs(measured - REPORT["seed"]["math_rollout_entropy"]) < 0.03, measured
    routes = fig["math_routes"]
    assert sum(r["share"] >= 0.1 for r in routes.values()) >= 3, routes  # bare, direct, split at least
    assert routes["bare"]["length"] + 10 < routes["direct"]["length"] < routes["split"]["length"], routes


def test_shipped_reward_model_ranks_held_out_pairs(generator):
    """Re-measure the RM's card figure on fresh held-out pairs: half of them two of the seed's
    own samples (drawn here with vLLM), half graded edits, the length-biased preference it was
    trained on differing by >= min_gap."""
    card = REPORT["reward_model"]
    assert card["pairwise_accuracy"] >= 0.9
    tok = common.load_tokenizer(RM)
    generator.sync_weights(common.load_model(POLICY, torch.device("cpu")))
    chat_test = common.load_prompts(os.path.join(DATA, "chat_test.jsonl"))
    samples = seed_samples(generator, tok, chat_test, seed=123)  # not the builder's seed
    prompts, chosen, rejected = rm_pairs(tok, chat_test, random.Random(123), 400, samples, card["min_gap"])
    assert all(chat_preference(p, c) >= chat_preference(p, r) + card["min_gap"]
               for p, c, r in zip(prompts, chosen, rejected, strict=True))
    rm = common.RewardModel(RM, torch.device("cpu"), batch_size=64)
    sc, sr = rm.score(prompts, chosen), rm.score(prompts, rejected)
    acc = sum(a > b for a, b in zip(sc, sr)) / len(sc)
    se = (acc * (1 - acc) / len(sc)) ** 0.5
    assert abs(acc - card["pairwise_accuracy"]) <= 3 * se + 0.01, (acc, card)
    # a length bias it was taught (0.02 per character) but that never beats true quality by much:
    # the ideal answer with 8 letters appended (true quality ~0.4) rarely outscores the ideal one
    ps = [r["prompt"] for r in chat_test]
    assert rm_prefers_appended(rm, ps, random.Random(7), 8) < 0.5


def test_shipped_world_meets_the_study_criteria(generator):
    """study/DESIGN.md's answer-blind criteria, re-measured on the validation files with other
    sampling seeds than the card's: the seed has headroom on both tasks, the RM agrees with true
    quality on the seed's own pairs and prefers length at equal quality, but a character is worth
    little; and the figures agree with the card's."""
    sys.path.insert(0, os.path.join(os.path.dirname(EMBEDDED), "study"))
    from world_check import measure

    generator.sync_weights(common.load_model(POLICY, torch.device("cpu")))  # other tests swap weights
    card = REPORT["world"]
    got = measure(generator, POLICY, RM, common.load_prompts(os.path.join(DATA, "chat_val.jsonl")),
                  common.load_prompts(os.path.join(DATA, "math_val.jsonl")), samples=8, seed=11)
    assert all(got["criteria"].values()), got
    for key, tolerance in (("seed_true_quality", 0.03), ("rm_agreement", 0.03), ("math_val_accuracy", 0.04),
                           ("math_val_entropy", 0.03), ("rm_char_in_quality_units", 0.01)):
        assert abs(got[key] - card[key]) <= tolerance, (key, got[key], card[key])


@pytest.mark.slow
def test_builder_quick_mode(tmp_path, generator):
    r = subprocess.run([sys.executable, os.path.join(EMBEDDED, "build.py"), "--out", str(tmp_path), "--quick"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    for f in ("math_train", "math_val", "math_test", "chat_train", "chat_test", "mix_train"):
        assert common.load_prompts(str(tmp_path / "data" / f"{f}.jsonl"))
    report = json.load(open(tmp_path / "build_report.json"))
    assert report["sft"]["steps"] == 4 and report["reward_model"]["steps"] == 2
    assert len(report["world"]["criteria"]) == 6  # the study's criteria measured (a 4-step seed fails them)
    # loads in transformers, through the RM path, and into vLLM (same shapes as the shipped seed)
    model = common.load_model(str(tmp_path / "policy"), torch.device("cpu"))
    common.RewardModel(str(tmp_path / "reward_model"), torch.device("cpu")).score(["Hi"], ["there"])
    generator.sync_weights(model)
    tok = common.load_tokenizer(str(tmp_path / "policy"))
    out = generator.generate(common.encode_prompts(tok, ["What is 1+1?"]), n=2, temperature=1.0,
                             top_p=1.0, max_tokens=8, seed=0)
    assert len(out[0]) == 2
    assert (tmp_path / "policy" / "README.md").read_text().startswith("# Embedded seed policy")
