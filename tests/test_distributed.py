"""Two real processes under torchrun: FSDP2 + one vLLM engine per rank + weight sync."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import make_tiny_model

HERE = os.path.dirname(__file__)


def torchrun(args, nproc=2, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.path.dirname(HERE))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_fsdp2_sync_two_ranks(tmp_path):
    model_dir = make_tiny_model(tmp_path / "policy")
    r = torchrun([os.path.join(HERE, "dist", "reload_fsdp.py"), model_dir, str(tmp_path)])
    assert r.returncode == 0, r.stderr[-3000:]
    for rank in (0, 1):
        res = json.load(open(tmp_path / f"rank{rank}.json"))
        assert res["world"] == 2
        assert res["before"] < 1e-4, res  # engine loaded the same init as the trainer
        assert res["stale"] > 1e-2, res  # the step changed the trainer, not the engine
        assert res["after"] < 1e-4, res  # the sync brought the engine up to date
