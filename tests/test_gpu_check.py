"""bench/gpu_check.sh --trainer-only and bench/gpu_trainer_check.py, on the CPU: every step's logic
at toy sizes with nothing but torch, transformers and the pure-Python wheels importable (no vLLM,
datasets, pyarrow or wandb), each step's skip reason on a machine without a GPU, and the wheel list
pinned to what the tests here run with."""

import json
import os
import subprocess
import sys
from importlib.metadata import version

import pytest

from tests.conftest import ROOT

ENV = dict(os.environ, PYTHONPATH=ROOT)
# What a GPU image without vLLM lacks, refused when imported: the trainer side must never import it
# (found, as here, so that transformers' optional-package probes see what they see here).
BLOCK = ("import importlib.machinery, runpy, sys\n"
         "class Refuse:\n"
         "    def create_module(self, spec): return None\n"
         "    def exec_module(self, module): raise ImportError(f'{module.__name__} is not on the GPU image')\n"
         "class Block:\n"
         "    def find_spec(self, name, path=None, target=None):\n"
         "        if name.split('.')[0] in ('vllm', 'datasets', 'pyarrow', 'wandb'):\n"
         "            return importlib.machinery.ModuleSpec(name, Refuse())\n"
         "sys.meta_path.insert(0, Block())\n"
         "sys.argv = sys.argv[1:]\n"
         "runpy.run_path(sys.argv[0], run_name='__main__')\n")


@pytest.mark.slow
def test_every_step_runs_at_toy_sizes_without_engine_data_or_tracking(tmp_path):
    out = tmp_path / "summary.md"
    r = subprocess.run([sys.executable, "-c", BLOCK, "bench/gpu_trainer_check.py", "--smoke", "--out", str(out)],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    steps = {s["step"]: s for s in json.load(open(tmp_path / "summary.json"))["steps"]}
    assert {name: s["status"] for name, s in steps.items()} == {
        "device": "ok", "gemm-peak": "ok", "references": "ok", "fsdp2-mixed-precision": "ok", "logprob-head": "ok",
        "bf16-checkpoint": "ok", "update-mfu": "ok", "engine": "skipped"}
    assert "the full check's (bash bench/gpu_check.sh)" in steps["engine"]["why"]
    assert max(steps["references"]["figures"]["re-synced_ratio_per_segment"]) <= 2
    assert steps["fsdp2-mixed-precision"]["figures"]["gradients"] == "float32"
    assert steps["update-mfu"]["figures"]["tflops"] >= 0 and steps["gemm-peak"]["figures"]["bfloat16_tflops"] > 0
    lines = out.read_text().splitlines()
    assert lines[0].startswith("# GPU trainer check: CPU") and sum(line.startswith("| ") for line in lines) == 9


@pytest.mark.slow
def test_trainer_only_on_a_machine_without_a_gpu_says_why_each_step_skips(tmp_path):
    env = dict(ENV, PY=os.path.join(ROOT, ".venv", "bin", "python"), GPU_CHECK_SUMMARY=str(tmp_path / "summary.txt"))
    r = subprocess.run(["bash", "bench/gpu_check.sh", "--trainer-only", "--out", str(tmp_path / "s.md")], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    assert [x.split()[0] for x in summary] == ["ok", "ok", "ok", "ok", "skipped"], summary
    steps = json.load(open(tmp_path / "s.json"))["steps"]
    assert all(s["status"] == "skipped" and s["why"] for s in steps), steps
    assert [s["why"].split(" (")[0] for s in steps[:-1]] == ["no CUDA GPU on this machine"] * (len(steps) - 1)


def test_a_failed_step_fails_the_command(tmp_path):
    """An interpreter that cannot run anything: setup fails, the rest is skipped, the exit status is 1."""
    env = dict(ENV, PY="/bin/false", GPU_CHECK_SUMMARY=str(tmp_path / "summary.txt"))
    r = subprocess.run(["bash", "bench/gpu_check.sh", "--trainer-only"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=60)
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    assert r.returncode == 1 and summary[0].startswith("failed   setup"), (summary, r.stdout[-2000:])
    assert all(x.startswith("skipped") for x in summary[1:]), summary


def test_the_wheel_list_pins_what_the_tests_run_with():
    lines = [x for x in open(os.path.join(ROOT, "bench", "trainer_wheels.txt")).read().splitlines()
             if x.strip() and not x.startswith("#")]
    pins = dict(x.split("==") for x in lines)
    assert {"tyro", "math-verify"} <= set(pins)
    for name, pinned in pins.items():
        assert version(name) == pinned, name
