"""study/run_study.py: the verdict rule by hand, and every arm's command is one its script accepts."""

import importlib
import math
import os
import sys

import pytest
import tyro

from tests.conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "study"))
import run_study  # noqa: E402


def test_verdict_rule_by_hand():
    # A = (0.50, 0.52, 0.54): mean 0.52, SE 0.02 / sqrt(3); B = (0.40, 0.40, 0.40): SE 0
    a, b = [0.50, 0.52, 0.54], [0.40, 0.40, 0.40]
    d, se, shown, v = run_study.verdict(a, b, ">")
    assert d == pytest.approx(0.12) and se == pytest.approx(0.02 / math.sqrt(3))
    assert (shown, v) == (">", "reproduced")
    assert run_study.verdict(b, a, ">")[2:] == ("<", "not reproduced")
    assert run_study.verdict(a, b, "≈")[3] == "not reproduced"
    assert run_study.verdict(a, b, "≥")[3] == "reproduced" and run_study.verdict(b, a, "≥")[3] == "not reproduced"
    # within two standard errors of the difference: not separable, which an "≈" claim reproduces
    near = [0.41, 0.40, 0.39]
    d, se, shown, v = run_study.verdict(near, [0.40, 0.42, 0.38], ">")
    assert abs(d) < 2 * se and (shown, v) == ("≈", "not separable")
    assert run_study.verdict(near, [0.40, 0.42, 0.38], "≈")[3] == "reproduced"
    assert run_study.verdict(near, [0.40, 0.42, 0.38], "≥")[3] == "reproduced"
    # an entropy row: the last fifth against the first, "<" is a collapse
    assert run_study.verdict([0.1, 0.12, 0.11], [0.5, 0.52, 0.51], "<")[2:] == ("<", "reproduced")


def test_every_arm_parses_with_its_script():
    """Each arm's command line (the paper's flags plus the arm's own) is accepted by its script's
    `Args`, and sets what the arm says: a typo in a flag would otherwise cost a study run."""
    args = run_study.Args()
    arms = run_study.arms(args)
    used = {i for r in run_study.rows(args) for i in (r.a, r.b)} - {"", "seed"}
    assert used <= set(arms)
    for arm in arms.values():
        module = importlib.import_module(arm.script.removesuffix(".py"))
        cmd = arm.command(3e-5)
        parsed = tyro.cli(module.Args, args=cmd[1:])
        assert parsed.learning_rate == 3e-5 and parsed.dataset == run_study.TASKS[arm.task][0]
        for flag, value in arm.flags:
            name = flag.removeprefix("--").replace("-", "_")
            got = getattr(parsed.run if hasattr(parsed.run, name) else parsed, name)
            assert got is True if value == "" else str(got) == value or float(got) == float(value), (arm, flag)


def test_chat_is_tested_at_the_best_checkpoint_the_run_kept(tmp_path):
    """The study tests chat at the run's own `best-chat/` (the paper's pick, kept by the run while
    it trained) and math, or a run never evaluated on chat, at its final checkpoint."""
    import json

    run = tmp_path / "run"
    (run / "checkpoint").mkdir(parents=True)
    json.dump({"step": 40, "world_size": 1}, open(run / "checkpoint" / "step.json", "w"))
    assert run_study.tested_checkpoint(str(run), "chat") == (str(run / "checkpoint"), 40)
    (run / "best-chat").mkdir()
    json.dump({"step": 20, "score": 0.1}, open(run / "best-chat" / "best.json", "w"))
    assert run_study.tested_checkpoint(str(run), "chat") == (str(run / "best-chat"), 20)
    assert run_study.tested_checkpoint(str(run), "math") == (str(run / "checkpoint"), 40)

