"""Failures end in a one-line message or a counted skip, and a killed run resumes without losing
or repeating work: checkpoints (atomic, pickle-free) round-trip and survive a crash mid-save; a
SIGKILLed run resumes to the same metrics as an uninterrupted one; two-rank resume; a reward
model that returns NaN; one-line errors from every script."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Qwen2ForSequenceClassification

import common
import grpo
from embedded.tiny import build_tokenizer, tiny_config
from tests.conftest import (
    DETERMINISTIC,
    ROOT,
    SMALL,
    make_tiny_model,
    metrics,
    run_script,
    write_jsonl,
)

SCRIPTS = ["grpo.py", "online_dpo.py", "semi_online_dpo.py", "offline_dpo.py"]


def _trained(path, seed=0):
    """A tiny policy with one AdamW step taken (so the optimizer has state), and its optimizer
    (fused, as the scripts make it)."""
    model = AutoModelForCausalLM.from_pretrained(make_tiny_model(path, seed=seed, layers=2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    model(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    opt.step()
    return model, opt


def test_checkpoint_round_trip_without_pickle(tmp_path, monkeypatch):
    model, opt = _trained(tmp_path / "m")
    ckpt = str(tmp_path / "checkpoint")
    common.save_checkpoint(ckpt, 7, model, opt, build_tokenizer())
    want = {n: p.detach().clone() for n, p in model.named_parameters()}
    want_opt = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in model.named_parameters()}
    fresh, fresh_opt = _trained(tmp_path / "other", seed=1)  # different weights and moments
    assert not torch.equal(next(fresh.parameters()), next(model.parameters()))
    # CRUCIAL: resuming unpickles nothing
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("pickle.load on resume"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load on resume"))
    assert common.load_checkpoint(ckpt, fresh, fresh_opt) == 7
    for n, p in fresh.named_parameters():
        assert torch.equal(p, want[n])
        for k, v in fresh_opt.state[p].items():
            assert torch.equal(v, want_opt[n][k]), (n, k)
    fresh(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    fresh_opt.step()  # the restored state is one the fused step accepts (its `step` on the device)
    files = {f for _, _, fs in os.walk(ckpt) for f in fs}
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pkl", ".metadata", ".distcp"))], files
    AutoModelForCausalLM.from_pretrained(ckpt)  # and the folder is a plain HF model


def test_a_bf16_checkpoint_says_bfloat16(tmp_path):
    """A GPU run saves the model folder in bf16 from fp32 masters; config.json must say so, or
    transformers and vLLM (dtype auto) load it in fp32 at twice the memory."""
    model, opt = _trained(tmp_path / "m")
    ckpt = str(tmp_path / "checkpoint")
    common.save_checkpoint(ckpt, 1, model, opt, build_tokenizer(), torch.bfloat16)
    assert json.load(open(os.path.join(ckpt, "config.json")))["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(ckpt, dtype="auto").dtype == torch.bfloat16
    from vllm.config import ModelConfig

    assert ModelConfig(model=ckpt, dtype="auto").dtype == torch.bfloat16  # what the engine would load
    assert str(model.config.dtype).removeprefix("torch.") == "float32"  # the trainer's own config keeps its master dtype


def test_checkpoint_survives_a_crash_mid_save(tmp_path):
    model, opt = _trained(tmp_path / "m")
    ckpt = str(tmp_path / "checkpoint")
    common.save_checkpoint(ckpt, 2, model, opt, build_tokenizer())
    # killed while writing the next one: a half-written checkpoint.tmp is ignored, then replaced
    os.makedirs(ckpt + ".tmp/trainer_state")
    open(ckpt + ".tmp/trainer_state/rank0.safetensors", "wb").write(b"\0" * 10)
    assert common.find_checkpoint(ckpt) and common.load_checkpoint(ckpt, model, opt) == 2
    common.save_checkpoint(ckpt, 4, model, opt, build_tokenizer())
    assert not os.path.exists(ckpt + ".tmp") and common.load_checkpoint(ckpt, model, opt) == 4
    # killed between the two renames: the previous checkpoint is put back
    os.rename(ckpt, ckpt + ".old")
    assert common.find_checkpoint(ckpt) and common.load_checkpoint(ckpt, model, opt) == 4
    # a checkpoint written by another number of ranks is refused in one line
    meta = json.load(open(os.path.join(ckpt, "step.json")))
    json.dump({**meta, "world_size": 2}, open(os.path.join(ckpt, "step.json"), "w"))
    with pytest.raises(common.UserError, match="written by 2 rank"):
        common.load_checkpoint(ckpt, model, opt)


@pytest.mark.slow
@pytest.mark.skipif(not DETERMINISTIC, reason="compares two runs number for number: vLLM on a GPU is not deterministic")
def test_sigkill_then_resume_loses_nothing(tmp_path):
    """Deterministic mode (CPU, fp32, fixed --seed): the data order and every vLLM sampling seed
    are functions of (seed, step), and the optimizer state is restored, so a run killed with
    SIGKILL and resumed logs, step for step, what an uninterrupted run logs: each step once, on
    the same prompts (same rewards and lengths) with the same loss."""
    args = ["--num-steps", "6", "--eval-every", "0", "--save-every", "2", "--completions-every", "1", *SMALL]
    run_script("grpo.py", [*args, "--output-dir", str(tmp_path / "straight")])
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "grpo.py", *args, "--output-dir", str(out)], cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:  # kill once step 3 is logged: mid-way to the next save
        if (out / "metrics.jsonl").exists() and '"step": 3,' in (out / "metrics.jsonl").read_text():
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # killed mid-run, not finished
    assert json.load(open(out / "checkpoint" / "step.json"))["step"] in (2, 4)
    run_script("grpo.py", [*args, "--output-dir", str(out), "--resume"])
    a, b = metrics(tmp_path / "straight"), metrics(out)
    assert [x["step"] for x in b] == [1, 2, 3, 4, 5, 6]  # nothing lost, nothing twice
    for x, y in zip(a, b):
        assert x["rollout/reward_mean"] == y["rollout/reward_mean"]  # the same prompts and samples
        assert x["rollout/length_mean"] == y["rollout/length_mean"]
        assert x["train/loss"] == pytest.approx(y["train/loss"], abs=1e-5)
    # the completions file too: each step's records once, the killed run's redone steps not twice
    assert (out / "completions.jsonl").read_text() == (tmp_path / "straight" / "completions.jsonl").read_text()
    records = [json.loads(line) for line in open(out / "completions.jsonl")]
    assert [r["step"] for r in records] == [s for s in range(1, 7) for _ in range(8)]
    for r in records:  # GRPO's advantages, as the update used them: the group's rewards, normalised
        rewards = torch.tensor([r["rewards"]])
        assert r["advantages"] == pytest.approx(grpo.group_advantages(rewards, True, 1e-6)[0].tolist(), abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("script,extra", [("grpo.py", []), ("semi_online_dpo.py", ["--sync-interval", "2"]),
                                          ("offline_dpo.py", [])], ids=["grpo", "semi-online", "offline"])
@pytest.mark.skipif(not DETERMINISTIC, reason="compares two runs number for number: vLLM on a GPU is not deterministic")
def test_resume_replays_exactly(tmp_path, script, extra):
    """4 steps straight vs 2 steps + resume to 4: identical metrics for steps 3-4 (CPU, fixed seeds:
    data order, sampling seeds and optimizer state are all restored or derived). Offline DPO's
    second run trains on the first run's pairs (a run samples the pairs of its own steps)."""
    args = ["--eval-every", "0", "--save-every", "2", *SMALL, *extra]
    run_script(script, ["--num-steps", "4", "--output-dir", str(tmp_path / "a"), *args])
    if script == "offline_dpo.py":
        args += ["--pairs", str(tmp_path / "a" / "pairs.jsonl")]
    run_script(script, ["--num-steps", "2", "--output-dir", str(tmp_path / "b"), *args])
    run_script(script, ["--num-steps", "4", "--output-dir", str(tmp_path / "b"), "--resume", *args])
    a, b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert [x["step"] for x in b] == [1, 2, 3, 4]  # nothing lost, nothing repeated
    for x, y in zip(a[-2:], b[2:], strict=True):
        assert x["rollout/reward_mean"] == y["rollout/reward_mean"]  # the same prompts and samples
        assert x["rollout/length_mean"] == y["rollout/length_mean"]
        assert x["train/loss"] == pytest.approx(y["train/loss"], abs=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(not DETERMINISTIC, reason="compares two runs number for number: vLLM on a GPU is not deterministic")
def test_resume_on_two_ranks(tmp_path):
    """FSDP2 shards and AdamW moments come back on each rank (per-rank safetensors). The record
    holds both ranks' rows, and the best validation model is gathered from both ranks' shards."""
    args = ["--eval-every", "1", "--save-every", "2", "--completions-every", "2", *SMALL]
    run_script("grpo.py", ["--num-steps", "4", "--output-dir", str(tmp_path / "a"), *args], nproc=2)
    run_script("grpo.py", ["--num-steps", "2", "--output-dir", str(tmp_path / "b"), *args], nproc=2)
    assert sorted(os.listdir(tmp_path / "b" / "checkpoint" / "trainer_state")) == ["rank0.safetensors", "rank1.safetensors"]
    run_script("grpo.py", ["--num-steps", "4", "--output-dir", str(tmp_path / "b"), "--resume", *args], nproc=2)
    a, b = ([x for x in metrics(tmp_path / d) if x["step"] >= 1] for d in "ab")  # not the step-0 evaluation
    assert [x["step"] for x in b] == [1, 2, 3, 4]
    for x, y in zip(a[2:], b[2:]):
        assert x["rollout/reward_mean"] == y["rollout/reward_mean"]
        assert x["train/loss"] == pytest.approx(y["train/loss"], abs=1e-5)
    records = [json.loads(line) for line in open(tmp_path / "b" / "completions.jsonl")]
    assert [r["step"] for r in records] == [2] * 8 + [4] * 8  # 8 prompts a step, 4 from each rank
    for step in (2, 4):  # the file's rewards are the ones the step logged
        rewards = [x for r in records if r["step"] == step for x in r["rewards"]]
        assert sum(rewards) / len(rewards) == pytest.approx(b[step - 1]["rollout/reward_mean"], abs=1e-9)
    best = json.load(open(tmp_path / "b" / "best-math" / "best.json"))
    scores = [(x["eval/accuracy"], -x["step"]) for x in b]
    assert (best["score"], -best["step"]) == max(scores)  # the best step, the first of a tie
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "b" / "best-math")  # whole, and loads
    assert sum(p.numel() for p in model.parameters()) > 0
    best_w, final_w = (load_file(tmp_path / "b" / d / "model.safetensors") for d in ("best-math", "checkpoint"))
    assert all(torch.equal(best_w[k], final_w[k]) for k in final_w) == (best["step"] == 4)  # that step's weights
    assert not (tmp_path / "b" / "best-math" / "trainer_state").exists()


@pytest.mark.slow
def test_reward_model_nan_is_counted_never_trained_on(tmp_path):
    """An RM whose every score is NaN: each chat group is counted in rollout/nonfinite_groups and
    yields no pair; the run finishes with finite losses. A prompt longer than the engine allows is
    dropped and counted at start."""
    tok = build_tokenizer()
    rm = Qwen2ForSequenceClassification(tiny_config(tok, layers=2, num_labels=1))
    with torch.no_grad():
        rm.score.weight.fill_(float("nan"))
    rm.save_pretrained(tmp_path / "nan_rm")
    tok.save_pretrained(tmp_path / "nan_rm")
    rows = [{"task": "chat", "prompt": f"Repeat this word: {w}"} for w in ["ab", "cd", "ef", "gh", "ij", "kl", "mn", "op"]]
    rows.append({"task": "chat", "prompt": "".join(chr(97 + i * 7 % 26) for i in range(2000))})  # > max_model_len tokens
    data = tmp_path / "chat.jsonl"
    write_jsonl(data, rows)
    out = tmp_path / "run"
    r = run_script("online_dpo.py", ["--dataset", str(data), "--reward-model", str(tmp_path / "nan_rm"), "--num-steps", "2",
                                     "--eval-every", "0", "--output-dir", str(out)])
    assert "data: 1 of 9 training prompts too long" in r.stdout and "online_dpo: 8 prompts" in r.stdout
    for x in metrics(out):
        assert x["rollout/nonfinite_groups"] == 8 and x["train/pairs"] == 0 and x["train/loss"] == 0.0
        assert x["rollout/chat/reward_mean"] == 0.0


ONE_LINE = [
    (["--model", "./no/such/model"], "model folder './no/such/model' does not exist"),
    (["--dataset", "./no/such.jsonl"], "dataset file './no/such.jsonl' does not exist"),
    (["--samples-per-prompt", "1"], "--samples-per-prompt must be >= 2"),
]


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("args,message", ONE_LINE, ids=["model", "dataset", "group-of-one"])
def test_bad_input_is_one_line(tmp_path, script, args, message):
    r = subprocess.run([sys.executable, script, *args, "--output-dir", str(tmp_path / "o")], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert message in r.stderr.strip().splitlines()[-1]
    assert "Traceback" not in r.stderr
