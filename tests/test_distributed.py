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


def test_resume_repair_takes_one_barrier_on_every_rank(tmp_path):
    """`find_checkpoint` repairs a checkpoint left between a save's two renames; a rank that looks
    after rank 0's repair must still take the barrier rank 0 takes (it once skipped it: a hang)."""
    old = tmp_path / "checkpoint.old"
    old.mkdir()
    json.dump({"step": 2, "world_size": 2}, open(old / "step.json", "w"))
    run_script(os.path.join(HERE, "dist", "find_checkpoint_race.py"), [str(tmp_path / "checkpoint")], nproc=2,
               timeout=120)
    assert [json.load(open(tmp_path / f"rank{r}.json"))["found"] for r in (0, 1)] == [True, True]
    assert (tmp_path / "checkpoint" / "step.json").exists() and not old.exists()


def test_lockstep_rules_two_ranks(tmp_path):
    """What keeps FSDP ranks in step, with two real processes: `common.micro_batches` pads the rank
    with fewer sequences to the other's count of passes; `common.all_reduce` refuses a key one rank
    lacks (an error on both ranks, not a hang); `common.fsdp_wrap` shards Llama's and GPT-2's
    decoder layers (found by `_no_split_modules`, not `model.model.layers`) and trains a step."""
    run_script(os.path.join(HERE, "dist", "lockstep.py"), [str(tmp_path)], nproc=2, timeout=300)
    res = [json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1)]
    assert res[0]["micro_batches"] == [[0, 2], [2, 4], [4, 6]]
    assert res[1]["micro_batches"] == [[0, 2], [2, 4], [4, 6]]  # slices past its 1 sequence: padding
    for r in res:
        assert "ranks hold different keys" in r["mismatch"] and "extra" in r["mismatch"], r["mismatch"]
        assert r["matched"] == 3.0  # the collectives after the refusal still pair up
        assert r["llama_sharded_layers"] == 2 and r["gpt2_sharded_layers"] == 3, r
