"""study/run_study.py (version 3): the design's rules by hand, every arm's command is one its
script accepts, and a run's drift read from what a run writes."""

import importlib
import json
import math
import os
import shutil
import sys
import time

import pytest
import tyro

from tests.conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "study"))
import run_study  # noqa: E402


def test_judge_applies_the_design_rule_to_each_relation():
    clear_a, clear_b = [0.50, 0.52, 0.54, 0.51, 0.53, 0.52], [0.40, 0.41, 0.39, 0.40, 0.42, 0.38]
    row = run_study.judge(">", clear_a, clear_b, 0.02)
    assert row["verdict"] == "reproduced" and row["d"] == pytest.approx(0.12) and row["p"] < 0.001
    assert row["n"] == [6, 6] and row["a_mean"][0] == pytest.approx(0.52)
    assert run_study.judge(">", clear_b, clear_a, 0.02)["verdict"] == "not reproduced"
    assert run_study.judge("≈", clear_a, clear_b, 0.02)["verdict"] == "not reproduced"
    # equal within ±0.02 with 6 tight seeds: "≈" and "≥" reproduced, "A > B" refuted by equivalence
    same_a, same_b = [0.400, 0.402, 0.398, 0.401, 0.399, 0.400], [0.401, 0.399, 0.400, 0.402, 0.398, 0.400]
    assert run_study.judge("≈", same_a, same_b, 0.02)["verdict"] == "reproduced"
    assert run_study.judge("≥", same_a, same_b, 0.02)["verdict"] == "reproduced"
    assert run_study.judge(">", same_a, same_b, 0.02)["verdict"] == "not reproduced"
    assert run_study.judge("≥", clear_b, clear_a, 0.02)["verdict"] == "not reproduced"
    # two noisy seeds each: neither a difference nor equivalence can be shown
    assert run_study.judge(">", [0.45, 0.38], [0.40, 0.41], 0.02)["verdict"] == "cannot tell"
    # an entropy row: A's last tenth below its first tenth (B) is the claimed collapse
    low = run_study.judge("<", [0.10, 0.12, 0.11], [0.50, 0.52, 0.51], 0.02)
    assert low["verdict"] == "reproduced" and low["a_mean"][0] == pytest.approx(0.11) and low["d"] == pytest.approx(-0.40)
    assert run_study.judge("<", [0.50, 0.52, 0.51], [0.10, 0.12, 0.11], 0.02)["verdict"] == "not reproduced"


def test_pick_widens_past_an_edge_and_seeds_follow_the_power_rule():
    assert run_study.pick({2e-5: 0.30, 6e-5: 0.35, 2e-4: 0.32}) == (6e-5, [])
    assert run_study.pick({2e-5: 0.30, 6e-5: 0.35, 2e-4: 0.40}) == (2e-4, [pytest.approx(6e-4)])
    assert run_study.pick({2e-5: 0.40, 6e-5: 0.35, 2e-4: 0.32}) == (2e-5, [pytest.approx(2e-5 / 3)])
    # the design's table: SD 0.008 -> 6 seeds (power 0.97); 0.013 -> more; 0.02 -> the cap
    n, powers = run_study.seeds_for(0.008, 0.02, 6, 10)
    assert n == 6 and powers[6] >= 0.9
    n, powers = run_study.seeds_for(0.013, 0.02, 6, 10)
    assert 6 < n < 10 and powers[n] >= 0.8 > powers[n - 1]
    assert run_study.seeds_for(0.02, 0.02, 6, 10)[0] == 10


def test_every_arm_parses_with_its_script():
    """Each arm's command line (the paper's flags plus the arm's own) is accepted by its script's
    `Args`, and sets what the arm says: a typo in a flag would otherwise cost a study run."""
    args = run_study.Args()
    arms = run_study.arms(args)
    rows = run_study.central_rows("math") + run_study.central_rows("chat") + run_study.secondary_rows()
    assert {i for r in rows for i in (r.a, r.b)} - {"", "seed"} <= set(arms)
    for arm in arms.values():
        module = importlib.import_module(arm.script.removesuffix(".py"))
        cmd = arm.command(3e-5, args)
        parsed = tyro.cli(module.Args, args=cmd[1:])
        assert parsed.learning_rate == 3e-5 and parsed.dataset == run_study.TASKS[arm.task][0]
        assert parsed.run.eval_samples == args.eval_samples
        for flag, value in arm.flags:
            name = flag.removeprefix("--").replace("-", "_")
            got = getattr(parsed.run if hasattr(parsed.run, name) else parsed, name)
            assert got is True if value == "" else str(got) == value or float(got) == float(value), (arm, flag)


def test_chat_is_tested_at_the_best_checkpoint_the_run_kept(tmp_path):
    """The study tests chat at the run's own `best-chat/` (the paper's pick, kept by the run while
    it trained) and math, or a run never evaluated on chat, at its final checkpoint."""
    run = tmp_path / "run"
    (run / "checkpoint").mkdir(parents=True)
    json.dump({"step": 40, "world_size": 1}, open(run / "checkpoint" / "step.json", "w"))
    assert run_study.tested_checkpoint(str(run), "chat") == (str(run / "checkpoint"), 40)
    (run / "best-chat").mkdir()
    json.dump({"step": 20, "score": 0.1}, open(run / "best-chat" / "best.json", "w"))
    assert run_study.tested_checkpoint(str(run), "chat") == (str(run / "best-chat"), 20)
    assert run_study.tested_checkpoint(str(run), "math") == (str(run / "checkpoint"), 40)


def test_drift_and_criterion_d_from_a_runs_metrics(tmp_path):
    """A semi-online run of 40 steps, s = 10: the changes compare the first and last 4 steps, the
    pre-sync gap reads steps 20, 30, 40 (window ends after the first), KL is evaluate.py's."""
    run = tmp_path / "run"
    run.mkdir()
    with open(run / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"step": 0, "eval/accuracy": 0.3}) + "\n")
        for t in range(1, 41):
            f.write(json.dumps({"step": t, "rollout/entropy": 0.5 if t <= 4 else 0.4, "rollout/length_mean":
                                20.0 if t <= 36 else 30.0, "rollout/logprob_gap_mean": 0.02 * (t % 10 == 0)}) + "\n")
    json.dump({"kl": {"nats_per_token": 0.07}}, open(run / "kl.json", "w"))
    d = run_study.drift(run_study.Args(), str(run), "math", 10)
    assert d["kl"] == 0.07 and d["length_change"] == pytest.approx(0.5) and d["entropy_change"] == pytest.approx(-0.2)
    assert d["pre_sync_gap"] == pytest.approx(0.02) and d["entropy_first"] == 0.5 and d["length_last"] == 30.0
    assert run_study.seed_validation(str(run), "math") == 0.3
    assert run_study.criterion_d([d, d], [d, d])["met"]
    weak = d | {"kl": 0.01}
    assert not run_study.criterion_d([weak, d], [d, d])["met"]  # mean KL 0.04 < 0.05
    assert not run_study.criterion_d([d], [d | {"pre_sync_gap": 0.005}])["met"]


def test_a_phases_time_is_written_while_it_runs_and_adds_up_over_parts(tmp_path):
    """time.json holds each phase's time as it runs (a session's end kills the study with SIGKILL,
    which no `finally` sees), and a resumed or interrupted part adds to the parts before it."""
    args = run_study.Args(out_dir=str(tmp_path / "out"), runs_dir=str(tmp_path / "runs"), jobs=1)
    study = run_study.Study(args)
    path = tmp_path / "out" / "time.json"
    json.dump({"select-chat": 55.0}, open(path, "w"))

    def phase() -> None:
        for _ in range(200):  # up to 10 s: the heartbeat's first write, made while the phase runs
            if json.load(open(path))["select-chat"] > 55.0:
                raise KeyboardInterrupt  # the part is interrupted; its time still counts
            time.sleep(0.05)
        pytest.fail("time.json was not written while the phase ran")

    with pytest.raises(KeyboardInterrupt):
        run_study.timed(study, "select-chat", phase, every=0.1)
    times = json.load(open(path))
    assert 55.0 < times["select-chat"] < 55.0 + 10 / 60 and times["jobs"] == 1
    run_study.timed(study, "select-chat", lambda: None)
    assert json.load(open(path))["select-chat"] >= times["select-chat"]
    study.pool.shutdown()


def test_the_committed_tables_recompute_from_the_committed_records(tmp_path, monkeypatch):
    """The central and secondary tables (and findings.md) come from the per-run records alone:
    with the committed selections and records and no training allowed, each phase recomputes the
    committed rows, and every secondary row (each kind of measure) is judged."""
    v3 = os.path.join(ROOT, "study", "results", "v3")
    out = tmp_path / "v3"
    shutil.copytree(os.path.join(v3, "records"), out / "records")
    for name in ("selection_math.json", "selection_chat.json"):
        shutil.copy(os.path.join(v3, name), out / name)

    def no_training(*_):
        raise AssertionError("a record is missing: the phase would train")

    monkeypatch.setattr(run_study, "train", no_training)
    study = run_study.Study(run_study.Args(out_dir=str(out), runs_dir=str(tmp_path / "runs"), jobs=1))
    for name, phase in (("central_math.json", lambda: study.central("math")),
                        ("central_chat.json", lambda: study.central("chat")), ("secondary.json", study.secondary)):
        rows, committed = phase()["rows"], json.load(open(os.path.join(v3, name)))["rows"]
        assert len(rows) == len(committed) and all(math.isfinite(r["d"]) and math.isfinite(r["p"]) for r in rows)
        for r, c in zip(rows, committed, strict=True):
            assert (r["id"], r["verdict"]) == (c["id"], c["verdict"]) and r["d"] == pytest.approx(c["d"])
    run_study.write_findings(study)
    assert (out / "findings.md").read_text() == open(os.path.join(v3, "findings.md")).read()
    run_study.plot(study)
    assert (out / "central.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    study.pool.shutdown()
