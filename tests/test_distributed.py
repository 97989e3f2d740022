"""Two real processes under torchrun: FSDP2 + one vLLM engine per rank + weight sync."""

import json
import os

import pytest

from tests.conftest import FP32_GAP, make_tiny_model, run_script

HERE = os.path.dirname(__file__)


@pytest.mark.slow
def test_fsdp2_sync_two_ranks(tmp_path):
    model_dir = make_tiny_model(tmp_path / "policy")
    run_script(os.path.join(HERE, "dist", "reload_fsdp.py"), [model_dir, str(tmp_path)], nproc=2)
    for rank in (0, 1):
        res = json.load(open(tmp_path / f"rank{rank}.json"))
        assert res["world"] == 2
        assert res["before"] < FP32_GAP, res  # engine loaded the same init as the trainer
        assert res["stale"] > 1e-2, res  # the step changed the trainer, not the engine
        assert res["after"] < FP32_GAP, res  # the sync brought the engine up to date
