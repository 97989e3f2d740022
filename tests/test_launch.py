"""What a person sees when a run starts or stops badly: every flag checked before a model loads,
one line per error under python and torchrun, before and after the engine starts; an output
folder owned by one run at a time; Ctrl-C in one line; a quiet console; normal file modes."""

import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import ROOT, SMALL, metrics, run_script, write_jsonl

ENV = dict(os.environ, PYTHONPATH=ROOT)


def one_line(r, message):
    """Exit 2, no traceback, and the last line of stderr says `message`."""
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert message in last, last
    return last


FLAGS = [  # (flags, what the one line says): all refused before any model loads
    (["--learning-rate", "-1e-5"], "--learning-rate must be > 0 (got -1e-05)"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be > 0"),
    (["--max-new-tokens", "300"], "--max-new-tokens (300) must be below --max-model-len (256)"),
    (["--max-model-len", "1024"], "--max-model-len 1024 is longer than embedded/policy was built for (512 positions"),
    (["--num-steps", "0"], "--num-steps must be > 0"),
    (["--eval-temperature", "0"], "--eval-temperature 0 is greedy: one sample per prompt; set --eval-samples 1"),
    (["--top-p", "1.5"], "--top-p must be at most 1"),
    (["--top-p", "0.9"], "--top-p 0.9: the engine's logprobs of a nucleus sample are renormalised over the nucleus"),
    (["--chat-template", "no/such.jinja"], "--chat-template no/such.jinja: neither auto, llama3-no-system nor a Jinja"),
    (["--chat-template", "llama3-no-system"], "--chat-template llama3-no-system: the tokenizer of 'embedded/policy' "
                                              "lacks Llama-3's special tokens"),
    (["--samples-per-prompt", "1"], "--samples-per-prompt must be >= 2"),
    (["--micro-batch-size", "0"], "--micro-batch-size must be > 0"),
    (["--rm-batch-size", "0"], "--rm-batch-size must be > 0"),  # every numeric flag is checked, by default
    (["--rm-max-length", "-1"], "--rm-max-length must be > 0"),
    (["--adam-betas", "0.9", "1.5"], "--adam-betas must each be in [0, 1)"),
    (["--model", "embedded/reward_model"],
     "--model embedded/reward_model is a Qwen2ForSequenceClassification, not a generative language model"),
    (["--reward-model", "embedded/policy"], "reward model 'embedded/policy' (Qwen2ForCausalLM) has no reward head"),
] + ([] if torch.cuda.is_available() else [(["--vllm-sleep"], "--vllm-sleep frees GPU memory while the trainer "
                                            "updates; this machine has no GPU")])


@pytest.mark.parametrize("flags,message", FLAGS, ids=["=".join(f[0]) for f in FLAGS])
def test_bad_flags_are_one_line_before_any_model_loads(tmp_path, flags, message):
    r = subprocess.run([sys.executable, "online_dpo.py", *flags, "--output-dir", str(tmp_path / "o")], cwd=ROOT,
                       env=ENV, capture_output=True, text=True, timeout=300)
    one_line(r, message)
    assert "vllm" not in r.stdout.lower() + r.stderr.lower().replace("--vllm-sleep", "")  # before any model loaded


def test_derived_values_are_not_flags():
    r = subprocess.run([sys.executable, "semi_online_dpo.py", "--help"], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "--sync-interval" in r.stdout
    assert not [f for f in ("--world-size", "--prompts-per-rank", "--ref-synced") if f in r.stdout]


def test_bad_paths_are_one_line(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    r = subprocess.run([sys.executable, "grpo.py", "--output-dir", str(a_file / "run")], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    one_line(r, f"--output-dir {a_file / 'run'} is not writable")
    # a truncated weights file is named
    import shutil

    model = tmp_path / "model"
    shutil.copytree(os.path.join(ROOT, "embedded", "policy"), model)
    weights = model / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    r = subprocess.run([sys.executable, "grpo.py", "--model", str(model), "--output-dir", str(tmp_path / "o")],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    one_line(r, f"model weights file {weights} is unreadable")


@pytest.mark.slow
def test_errors_reach_the_user_under_torchrun(tmp_path):
    """Under torchrun the elastic error handler wraps the entry point: the line must still show,
    from every rank, and torchrun's own summary names it."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "grpo.py",
           "--prompts-per-step", "3", "--output-dir", str(tmp_path / "o")]
    r = subprocess.run(cmd, cwd=ROOT, env=dict(ENV, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert r.returncode != 0
    lines = [x for x in r.stderr.splitlines() if "error: --prompts-per-step 3 must divide by the number of ranks (2)" in x]
    assert any(x.startswith("[rank 0] error:") for x in lines) and any(x.startswith("[rank 1] error:") for x in lines)
    assert "AssertionError" not in r.stderr and "UserError: --prompts-per-step" in r.stderr  # torchrun's summary


@pytest.mark.slow
def test_an_error_after_the_engine_started_is_one_line(tmp_path):
    """offline_dpo.py asked for more steps than its pairs file holds, found after the vLLM engine
    started (for evaluation): vLLM's hooks must not swallow the line."""
    out = tmp_path / "built"
    run_script("offline_dpo.py", ["--num-steps", "2", "--eval-every", "0", "--output-dir", str(out), *SMALL])
    r = subprocess.run([sys.executable, "offline_dpo.py", "--pairs", str(out / "pairs.jsonl"), "--num-steps", "5",
                        "--eval-every", "5", "--eval-limit", "8", "--output-dir", str(tmp_path / "again")],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    one_line(r, "holds the pairs of 2 steps, fewer than --num-steps 5")


def _start(args, out):
    # SIGINT back to its default in the child: a suite started in the background by a shell inherits
    # it ignored (POSIX), and Python then never raises KeyboardInterrupt, as a terminal's Ctrl-C would
    return subprocess.Popen([sys.executable, "grpo.py", *args, "--output-dir", str(out)], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for(path, text, proc, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"{text!r} never appeared in {path}")


@pytest.mark.slow
def test_one_run_per_output_dir_and_ctrl_c_in_one_line(tmp_path):
    out = tmp_path / "run"
    args = ["--num-steps", "50", "--eval-every", "0", "--save-every", "1000", *SMALL]
    first = _start(args, out)
    _wait_for(out / "metrics.jsonl", '"step": 1,', first)
    # a second run into the same folder is refused at once, while the first keeps going
    second = subprocess.run([sys.executable, "grpo.py", *args, "--output-dir", str(out)], cwd=ROOT, env=ENV,
                            capture_output=True, text=True, timeout=300)
    one_line(second, f"{out} is in use by another run (pid {first.pid})")
    # Ctrl-C before the first checkpoint: one line, and the folder can simply be reused
    os.killpg(first.pid, signal.SIGINT)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 130 and "Traceback" not in err, (first.returncode, err[-3000:])
    assert err.strip().splitlines()[-1] == (f"interrupted before the first checkpoint: nothing to resume; the same "
                                            f"command starts over in {out}")
    run_script("grpo.py", ["--num-steps", "2", "--eval-every", "0", "--output-dir", str(out), *SMALL])
    assert [x["step"] for x in metrics(out)] == [1, 2]  # started over: the interrupted run's lines are gone


@pytest.mark.slow
def test_ctrl_c_after_a_checkpoint_says_how_to_resume(tmp_path):
    out = tmp_path / "run"
    proc = _start(["--num-steps", "50", "--eval-every", "0", "--save-every", "1", *SMALL], out)
    _wait_for(out / "metrics.jsonl", '"step": 2,', proc)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    step = json.load(open(out / "checkpoint" / "step.json"))["step"]
    assert proc.returncode == 130 and "Traceback" not in err, (proc.returncode, err[-3000:])
    assert err.strip().splitlines()[-1] == (f"interrupted: {out}/checkpoint holds step {step}; continue with the same "
                                            "command and --resume")
    r = subprocess.run([sys.executable, "grpo.py", "--output-dir", str(out)], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=300)
    one_line(r, "holds a run with a checkpoint; pass --resume to continue it")


@pytest.mark.slow
def test_quiet_console_honest_eta_and_normal_file_modes(tmp_path):
    """No vLLM start-up or per-sync lines, no weight-loading bars: the console shows the frame every
    prompt gets, the data lines, the engine's two lines (starting, ready), the start-up line and one
    line per step. Checkpoint files get the umask's modes."""
    out = tmp_path / "run"
    old = os.umask(0o022)
    try:
        r = run_script("grpo.py", ["--num-steps", "3", "--eval-every", "3", "--log-samples-every", "0",
                                   "--eval-limit", "16", "--output-dir", str(out)])
    finally:
        os.umask(old)
    lines = [x for x in (r.stdout + r.stderr).splitlines() if x.strip()]
    assert len(lines) <= 11, lines  # the prompts' frame, 2 data lines, the engine's 2, the start-up line,
    assert [x for x in lines if x.startswith("generator: ")][:2] == lines[3:5], lines  # step 0 and 3 steps, done
    assert not [x for x in lines if "INFO" in x or "WARNING" in x or "RotaryEmbedding" in x or "%|" in x], lines
    modes = {f: stat.S_IMODE(os.stat(os.path.join(d, f)).st_mode) for d, _, fs in os.walk(out / "checkpoint") for f in fs}
    assert set(modes.values()) == {0o644}, modes
    eta = [float(x.split("eta ")[1].split(" min")[0]) for x in lines if x.startswith("step 1/3")]
    step_s = metrics(out)[1]["perf/step_s"]
    assert eta[0] * 60 < 3 * step_s + 1  # the step-0 evaluation is not counted in the rate


def test_resume_without_a_checkpoint_and_on_another_rank_count(tmp_path):
    r = subprocess.run([sys.executable, "grpo.py", "--resume", "--output-dir", str(tmp_path / "new")], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    one_line(r, "--resume: no checkpoint in")
    ckpt = tmp_path / "old" / "checkpoint"
    ckpt.mkdir(parents=True)
    json.dump({"step": 2, "world_size": 2}, open(ckpt / "step.json", "w"))
    r = subprocess.run([sys.executable, "grpo.py", "--resume", "--output-dir", str(tmp_path / "old")], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    one_line(r, "was written by 2 rank(s); resume with the same number (this run has 1)")


def test_a_truncated_checkpoint_shard_is_one_line_before_any_model_loads(tmp_path):
    import shutil

    ckpt = tmp_path / "run" / "checkpoint"
    (ckpt / "trainer_state").mkdir(parents=True)
    json.dump({"step": 2, "world_size": 1}, open(ckpt / "step.json", "w"))
    shutil.copy(os.path.join(ROOT, "embedded", "policy", "model.safetensors"), ckpt / "model.safetensors")
    shard = ckpt / "trainer_state" / "rank0.safetensors"
    shutil.copy(ckpt / "model.safetensors", shard)
    with open(shard, "r+b") as f:  # a copy cut short
        f.truncate(os.path.getsize(shard) - 1000)
    r = subprocess.run([sys.executable, "grpo.py", "--resume", "--output-dir", str(tmp_path / "run")], cwd=ROOT,
                       env=ENV, capture_output=True, text=True, timeout=300)
    one_line(r, f"--resume: checkpoint file {shard} is unreadable")
    assert "vllm" not in (r.stdout + r.stderr).lower()


def test_semi_online_resumes_only_at_a_window_boundary(tmp_path):
    """s = 3: a checkpoint at step 4 would sample steps 5-6 from newer weights than the window's
    first; refused at the start. A run whose last step (4) ends inside a window cannot be extended."""
    r = subprocess.run([sys.executable, "semi_online_dpo.py", "--sync-interval", "3", "--save-every", "4",
                        "--num-steps", "9", "--output-dir", str(tmp_path / "a")], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    one_line(r, "--save-every 4 is not a multiple of --sync-interval 3: a checkpoint inside a sync window cannot "
                "resume exactly")
    import shutil

    ckpt = tmp_path / "b" / "checkpoint"  # what `--num-steps 4 --save-every 3` leaves at its end
    (ckpt / "trainer_state").mkdir(parents=True)
    json.dump({"step": 4, "world_size": 1}, open(ckpt / "step.json", "w"))
    for f in ("model.safetensors", "trainer_state/rank0.safetensors"):
        shutil.copy(os.path.join(ROOT, "embedded", "policy", "model.safetensors"), ckpt / f)
    base = [sys.executable, "semi_online_dpo.py", "--sync-interval", "3", "--save-every", "3", "--resume",
            "--output-dir", str(tmp_path / "b")]
    r = subprocess.run([*base, "--num-steps", "6"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    one_line(r, "--resume: the checkpoint of step 4 is inside a sync window (--sync-interval 3): the run it came "
                "from stopped there, and this one would sample steps 5-6 from newer weights")


def test_data_errors_are_one_line(tmp_path):
    proofs = write_jsonl(tmp_path / "proofs.jsonl", [{"problem": "Prove it.", "solution": "Long.\nProof."}] * 3)
    r = subprocess.run([sys.executable, "grpo.py", "--dataset", proofs, "--output-dir", str(tmp_path / "o")], cwd=ROOT,
                       env=ENV, capture_output=True, text=True, timeout=300)
    one_line(r, "no usable row in 3 (3 math row without a gold answer (line 1, line 2, line 3))")


def test_the_run_folder_records_its_flags_and_resume_compares_them(tmp_path):
    """`args.json` holds the flags a run started with (derived values aside); `--resume` refuses, in
    one line before any model loads, the flags the replay depends on, names the others it accepts,
    and a tracked run continues its W&B run (offline W&B here: no network)."""
    out = tmp_path / "run"
    env = dict(ENV, WANDB_MODE="offline", WANDB_DIR=str(tmp_path), WANDB_SILENT="true")
    base = [sys.executable, "grpo.py", "--eval-every", "0", "--save-every", "2", "--output-dir", str(out), "--track",
            "--completions-every", "2"]
    r = subprocess.run([*base, "--num-steps", "2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    record = json.load(open(out / "args.json"))
    assert record["learning_rate"] == 5e-5 and record["samples_per_prompt"] == 8 and record["num_steps"] == 2
    assert "world_size" not in record and "prompts_per_rank" not in record  # derived, not flags
    run_id = (out / "wandb_id").read_text()
    r = subprocess.run([*base, "--num-steps", "3", "--resume", "--learning-rate", "1e-3", "--samples-per-prompt", "4"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    last = one_line(r, "--resume: --learning-rate 5e-05 -> 0.001, --samples-per-prompt 8 -> 4 changed since the run "
                       "started: the resumed run would not replay it")
    assert f"{out}/args.json" in last and "vllm" not in r.stdout.lower()  # refused before any model loaded
    r = subprocess.run([*base, "--num-steps", "3", "--resume", "--log-samples-every", "5"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert ("resume: changed since the run started (the replay does not depend on them): --log-samples-every 25 -> 5, "
            "--num-steps 2 -> 3") in r.stdout
    assert [x["step"] for x in metrics(out)] == [1, 2, 3]
    assert (out / "wandb_id").read_text() == run_id and json.load(open(out / "args.json"))["num_steps"] == 3
    runs = [d for d in os.listdir(tmp_path / "wandb") if d.startswith("offline-run-")]
    assert len(runs) == 2 and all(run_id in d for d in runs), runs  # the resumed run logs to the same W&B run
    tables = [json.load(open(f)) for f in (tmp_path / "wandb").glob("offline-run-*/files/media/table/completions_*.json")]
    assert len(tables) == 1 and len(tables[0]["data"]) == 8 * 8  # step 2's: 8 prompts x 8 completions
    assert tables[0]["columns"][:5] == ["step", "task", "prompt", "completion", "reward"]


def test_an_incomplete_model_folder_is_one_line(tmp_path):
    """An empty folder (transformers: a traceback ending in "Unrecognized model") or one with only its
    config.json (the tokenizer's loader: "no chat template") is named with what it lacks."""
    import shutil

    empty, config_only = tmp_path / "empty", tmp_path / "config_only"
    empty.mkdir()
    config_only.mkdir()
    shutil.copy(os.path.join(ROOT, "embedded", "policy", "config.json"), config_only)
    for folder, lacks in ((empty, "has no config.json and no weights"),
                          (config_only, "has no weights (*.safetensors) and no tokenizer files")):
        r = subprocess.run([sys.executable, "grpo.py", "--model", str(folder), "--output-dir", str(tmp_path / "o")],
                           cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
        one_line(r, f"model folder '{folder}' {lacks}")
    r = subprocess.run([sys.executable, "evaluate.py", "--baseline", str(config_only), "--output", str(tmp_path / "e.json")],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    one_line(r, f"baseline model folder '{config_only}' has no weights (*.safetensors):")  # a baseline needs no tokenizer
    r = subprocess.run([sys.executable, "evaluate.py", "--kl-to", str(config_only), "--output", str(tmp_path / "e.json")],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    one_line(r, f"--kl-to model folder '{config_only}' has no weights (*.safetensors):")  # before any engine starts


def test_the_embedded_defaults_are_found_from_any_folder(tmp_path):
    """Run from another folder, `embedded/...` is the project's (it was tried as a hub id: 26 s of
    retries, then "not a reachable hub id"): here the first error is the flag's own, at once."""
    t0 = time.time()
    r = subprocess.run([sys.executable, os.path.join(ROOT, "grpo.py"), "--num-steps", "0"], cwd=tmp_path, env=ENV,
                       capture_output=True, text=True, timeout=300)
    one_line(r, "--num-steps must be > 0 (got 0)")
    assert time.time() - t0 < 20 and "hub" not in r.stdout + r.stderr


def test_an_unreachable_hub_is_one_line_without_retry_noise(tmp_path):
    """The hub's client retries a failed request 5 times (~25 s), logging two lines each time: the
    user sees one line saying it retries, then the error."""
    env = dict(ENV, HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_DISABLE_TELEMETRY="1")  # nothing listens there
    r = subprocess.run([sys.executable, "grpo.py", "--model", "nobody/no-such-model"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    one_line(r, "model 'nobody/no-such-model' is not a local folder and not a reachable hub id")
    out = (r.stdout + r.stderr).splitlines()
    assert out[0] == "model 'nobody/no-such-model': the hub does not answer; retrying for up to ~25 s ..."
    assert len(out) == 2 and "Retrying" not in r.stdout + r.stderr, out


def test_evaluate_a_model_unlike_its_baseline_is_one_line(tmp_path):
    """evaluate.py loads the baseline's weights into the model's engine (the chat win rate): a model of
    another architecture or size than the default baseline was an 85-line vLLM traceback."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(os.path.join(ROOT, "embedded", "policy"))
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    r = subprocess.run([sys.executable, "evaluate.py", "--model", str(tmp_path / "llama")], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    one_line(r, "--baseline embedded/policy (Qwen2ForCausalLM, 4 layers, hidden 128) is not shaped as --model")
    assert "vllm" not in (r.stdout + r.stderr).lower()


def test_importing_common_keeps_hub_download_bars():
    """`import common` silences transformers' bars at every load and save, not a hub download's."""
    import huggingface_hub.utils
    import transformers

    import common  # noqa: F401

    assert not huggingface_hub.utils.are_progress_bars_disabled()
    assert not transformers.utils.logging.is_progress_bar_enabled()
