"""evaluate.py on the shipped seed: the JSON it writes, the table it prints, and the same greedy
accuracy on one process and under torchrun with two (greedy decoding does not depend on sharding),
and the same per-problem math results and saved chat responses (every prompt samples with its own
seeds, whatever the shard)."""

import json

import pytest

from tests.conftest import ROOT, make_tiny_model, run_script

ARGS = ["--limit", "16", "--samples", "2"]


@pytest.mark.slow
def test_evaluate_one_and_two_processes(tmp_path):
    r = run_script("evaluate.py", [*ARGS, "--save-samples", "--kl-to", "embedded/policy",
                                   "--output", str(tmp_path / "one.json")])
    one = json.load(open(tmp_path / "one.json"))
    m = one["math"]["embedded/data/math_test.jsonl"]
    assert m["problems"] == 16 and 0 <= m["accuracy"] <= 1 and 0 <= m["greedy_accuracy"] <= 1 and m["accuracy_se"] > 0
    assert m["accuracy"] <= m["pass@2"] <= 1 and 0 <= m["maj@2"] <= 1 and "| pass@2 | maj@2 |" in r.stdout
    c = one["chat"]
    assert c["prompts"] == 16 and c["length_mean"] > 0
    assert c["reward_per_token"] == pytest.approx(c["reward_mean"] / c["length_mean"])
    assert 0.2 < c["win_rate"] < 0.8  # the seed against itself, with other sampling seeds
    assert "| embedded/data/math_test.jsonl |" in r.stdout and "win rate vs baseline" in r.stdout
    assert one["kl"]["nats_per_token"] == 0.0 and one["kl"]["samples"] == 16 * 4  # the model against itself
    other = make_tiny_model(tmp_path / "random")  # the seed's shapes, random weights
    run_script("evaluate.py", [*ARGS, "--baseline", "", "--save-samples", "--kl-to", other,
                               "--output", str(tmp_path / "two.json")], nproc=2)
    two = json.load(open(tmp_path / "two.json"))
    assert two["math"]["embedded/data/math_test.jsonl"]["greedy_accuracy"] == m["greedy_accuracy"]
    right = m["right_per_problem"]  # per problem in the dataset's order: the accuracy's own counts
    assert len(right) == 16 and sum(right) / (16 * 2) == pytest.approx(m["accuracy"])
    assert two["math"]["embedded/data/math_test.jsonl"]["right_per_problem"] == right  # same samples, two shards
    assert two["chat"]["prompts"] == 16 and "win_rate" not in two["chat"]
    assert two["kl"]["nats_per_token"] > 1.0 and two["kl"]["tokens"] > 0  # a random model is far from the seed
    saved = one["chat"]["responses"]
    assert len(saved) == 16 and all(len(x["responses"]) == 2 for x in saved)
    prompts = [json.loads(line)["prompt"] for line in open(f"{ROOT}/embedded/data/chat_test.jsonl")][:16]
    assert [x["prompt"] for x in saved] == prompts  # the dataset's order
    assert two["chat"]["responses"] == saved  # gathered from two shards in that order, same samples


@pytest.mark.slow
def test_kl_with_ranks_holding_different_numbers_of_rows(tmp_path):
    """17 problems on two ranks (9 and 8, so 36 and 32 samples: two micro-batches and one): each
    rank scores its own rows, no rank waits for another."""
    run_script("evaluate.py", ["--limit", "17", "--samples", "1", "--chat-dataset", "", "--kl-to", "embedded/policy",
                               "--output", str(tmp_path / "kl.json")], nproc=2)
    kl = json.load(open(tmp_path / "kl.json"))["kl"]
    assert kl["samples"] == 17 * 4 and kl["nats_per_token"] == 0.0


def test_pass_at_k_and_majority_by_hand():
    """pass@k, unbiased from n samples with c correct: 1 - C(n-c, k) / C(n, k); maj@k: the score of
    the most frequent final answer (ties: the first seen; no answer: no vote)."""
    from common import majority_correct, pass_at_k

    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 1, 4) == 1.0 and pass_at_k(4, 4, 1) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25) and pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)
    assert majority_correct([0.0, 1.0, 1.0, 0.0], ["7", "5", "5", "7"]) == 0.0  # a tie: the first seen, "7"
    assert majority_correct([0.0, 1.0, 1.0, 0.0], ["7", "5", "5", None]) == 1.0
    assert majority_correct([0.0, 0.0], [None, None]) == 0.0
