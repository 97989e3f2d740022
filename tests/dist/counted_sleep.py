"""Run a training script's `main` in this process with vLLM's sleep / wake_up counted instead of run
(vLLM's CPU build has no sleep mode) and every optimizer step, checkpoint save and reward-model call recorded, so a
test can check that the engine was asleep at each. Usage: counted_sleep.py EVENTS.json SCRIPT ARGS..."""

import importlib
import json
import os
import sys

import torch
import tyro

import common
from common.generation import Generator

events_path, script, *args = sys.argv[1:]
events = []


class Counting(Generator):
    def __init__(self, *a, enable_sleep_mode=False, **k):
        super().__init__(*a, enable_sleep_mode=False, **k)
        self.enable_sleep_mode = enable_sleep_mode  # the scripts' own calls decide; vLLM's are counted
        self.llm.sleep = lambda level: events.append("sleep")
        self.llm.wake_up = lambda: events.append("wake")


common.Generator = common.generation.Generator = Counting  # the scripts build it via common.generator_for
step, save = torch.optim.AdamW.step, common.save_checkpoint
torch.optim.AdamW.step = lambda self, *a, **k: (events.append("update"), step(self, *a, **k))[1]
common.save_checkpoint = lambda *a, **k: (events.append("save"), save(*a, **k))[1]
score = common.RewardModel.score
common.RewardModel.score = lambda self, *a, **k: (events.append("score"), score(self, *a, **k))[1]
common.check_args = lambda *a, **k: None  # --vllm-sleep is refused without a GPU
module = importlib.import_module(os.path.basename(script).removesuffix(".py"))
module.main(tyro.cli(module.Args, args=args))
json.dump(events, open(events_path, "w"))
