"""The generator really gets the trainer's weights: vLLM's sampled-token logprobs equal the
trainer's recomputed ones after a sync, and differ without it (real vLLM CPU engine)."""

import os

import pytest
import torch

import common
from common.demo import logprob_gap as _max_gap  # max |vLLM - trainer| over sampled tokens
from tests.conftest import FP32_GAP, run_script


def _prompts(tok):
    msgs = ["What is 3+4?", "Repeat this word: abc", "Hello"]
    return [tok(tok.apply_chat_template([{"role": "user", "content": m}], tokenize=False,
                                        add_generation_prompt=True), add_special_tokens=False)["input_ids"]
            for m in msgs]


def test_generate_returns_tokens_text_logprobs(generator, tiny_model_dir):
    tok = common.load_tokenizer(tiny_model_dir)
    prompts = _prompts(tok)
    outs = generator.generate(prompts, n=3, temperature=1.0, top_p=1.0, max_tokens=12, seed=1)
    assert [len(o) for o in outs] == [3, 3, 3]
    for o in outs:
        for c in o:
            assert len(c.token_ids) == len(c.logprobs) > 0
            assert c.finish_reason in ("stop", "length")
            # vLLM holds back an incomplete UTF-8 tail (random weights emit stray bytes)
            assert tok.decode(c.token_ids, skip_special_tokens=True).startswith(c.text)
    # per-request seeds: same seed reproduces, another seed differs
    again = generator.generate(prompts, n=3, temperature=1.0, top_p=1.0, max_tokens=12, seed=1)
    other = generator.generate(prompts, n=3, temperature=1.0, top_p=1.0, max_tokens=12, seed=2)
    ids = lambda outs: [[c.token_ids for c in o] for o in outs]
    assert ids(again) == ids(outs)
    assert ids(other) != ids(outs)


def test_sync_after_optimizer_step_matches_trainer(generator, tiny_model_dir):
    tok = common.load_tokenizer(tiny_model_dir)
    model = common.load_model(tiny_model_dir, torch.device("cpu"))
    generator.sync_weights(model)  # the shared engine may hold another test's weights
    prompts = _prompts(tok)
    T = 0.7  # a non-1 temperature proves both sides apply it
    outs = generator.generate(prompts, n=4, temperature=T, top_p=1.0, max_tokens=16, seed=3)
    assert _max_gap(model, tok, prompts, outs, T) < FP32_GAP

    # One real optimizer step (big lr so the change is visible) on the sampled completions.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    flat_p = [p for p, o in zip(prompts, outs) for _ in o]
    logps, mask, _ = common.completion_logprobs(model, flat_p, [c.token_ids for o in outs for c in o], T,
                                                tok.pad_token_id)
    (-(logps * mask).sum()).backward()
    opt.step()

    # Without a sync the engine still samples from the old weights: the gap is large.
    stale = generator.generate(prompts, n=4, temperature=T, top_p=1.0, max_tokens=16, seed=4)
    assert _max_gap(model, tok, prompts, stale, T) > 1e-2
    # After the sync it matches the updated trainer again.
    generator.sync_weights(model)
    fresh = generator.generate(prompts, n=4, temperature=T, top_p=1.0, max_tokens=16, seed=4)
    assert _max_gap(model, tok, prompts, fresh, T) < FP32_GAP


def test_no_two_prompts_share_a_sampling_stream(generator, tiny_model_dir):
    """vLLM seeds sample i of a request with seed + i. One prompt repeated through two consecutive
    steps of StepOrder, and through an evaluation, on random weights (near-uniform over the
    vocabulary: a chance match of 12 tokens is impossible): no sample equals any other, in place or
    shifted, while the same run seed reproduces the same rollouts."""
    tok = common.load_tokenizer(tiny_model_dir)
    generator.sync_weights(common.load_model(tiny_model_dir, torch.device("cpu")))  # random weights
    prompt = _prompts(tok)[:1]
    order = common.StepOrder(100, seed=1, per_step=4, rank=0, world_size=1)
    seeds = order.seeds(1) + order.seeds(2) + common.eval_seeds(1, 0, range(4)) + common.eval_seeds(1, 1, range(4))
    gen = lambda s: [[tuple(c.token_ids) for c in o] for o in generator.generate(
        prompt * len(s), n=8, temperature=1.0, top_p=1.0, max_tokens=12, seed=s)]
    samples = gen(seeds)
    flat = [x for o in samples for x in o]
    assert len(set(flat)) == len(flat) == 16 * 8  # 16 requests x 8 samples, all distinct
    assert gen(order.seeds(1)) == samples[:4]  # the same run seed reproduces
    other = common.StepOrder(100, seed=2, per_step=4, rank=0, world_size=1)
    assert not set(x for o in gen(other.seeds(1)) for x in o) & set(flat)  # another run seed: other samples
    # two ranks of the same step draw what one rank draws, prompt for prompt
    ranks = [common.StepOrder(100, seed=1, per_step=4, rank=r, world_size=2).seeds(1) for r in (0, 1)]
    assert ranks[0] + ranks[1] == order.seeds(1)


@pytest.mark.slow
@pytest.mark.parametrize("script", ["online_dpo.py", "semi_online_dpo.py", "offline_dpo.py"])  # grpo.py: as online
def test_engine_asleep_at_every_update_with_vllm_sleep(script, tmp_path):
    """--vllm-sleep: the engine's weights and KV cache are off the GPU whenever the trainer updates
    and whenever the reward model scores (training rollouts, offline DPO's sampling, chat
    evaluations: with --rm-offload that memory is the reward model's). The real engine and script
    (tests/dist/counted_sleep.py, in its own process); vLLM's CPU build has no sleep mode, so its
    sleep / wake_up calls are counted instead of run, and the optimizer's steps, the checkpoint
    save and every reward-model call record whether the engine was asleep."""
    import json

    events = tmp_path / "events.json"
    chat = ["--dataset", "embedded/data/chat_train.jsonl", "--eval-dataset", "embedded/data/chat_test.jsonl"]
    run_script(os.path.join(os.path.dirname(__file__), "dist", "counted_sleep.py"), [
        str(events), script, "--num-steps", "3", "--eval-every", "1", "--vllm-sleep", "--eval-limit", "4",
        "--eval-samples", "1", "--save-every", "100", "--output-dir", str(tmp_path / "o"),
        *(["--sync-interval", "2"] if script == "semi_online_dpo.py" else []),
        *(chat if script != "online_dpo.py" else [])])
    events = json.load(open(events))
    assert events.count("update") == 3 and events.count("save") == 1
    assert (events.count("score") > 0) == (script != "online_dpo.py")
    asleep = False
    for e in events:
        asleep = {"sleep": True, "wake": False}.get(e, asleep)
        assert e not in ("update", "save", "score") or asleep, events


def test_a_kv_cache_too_small_is_said_once(generator, tiny_model_dir, capsys):
    """The engine's real capacity is read at start-up; a run whose sequences cannot all fit at full
    length gets one line naming both numbers and the flag (here the capacity is lowered by hand), at
    the first call that needs more, not only at the first call (a small step-0 evaluation)."""
    assert generator.kv_tokens >= 16 * 256  # read from the engine: blocks x block size
    tok = common.load_tokenizer(tiny_model_dir)
    saved = generator.kv_tokens, generator.kv_warned
    generator.kv_tokens, generator.kv_warned = 100, False
    try:
        generator.generate(_prompts(tok)[:1], n=1, temperature=1.0, top_p=1.0, max_tokens=1, seed=0)
        assert not capsys.readouterr().out  # it fits: nothing said
        for _ in range(2):
            generator.generate(_prompts(tok), n=4, temperature=1.0, top_p=1.0, max_tokens=8, seed=0)
    finally:
        generator.kv_tokens, generator.kv_warned = saved
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("generator:")]
    assert len(lines) == 1 and "holds 100 tokens per rank; the 12 sequences it runs at once need up to" in lines[0]
    assert "--gpu-memory-utilization (now 0.15)" in lines[0]
