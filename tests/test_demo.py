"""`python -m common.demo`, the one-minute tour of the plumbing: it samples, scores and syncs."""

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import FP32_GAP

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_demo_samples_scores_and_syncs():
    r = subprocess.run([sys.executable, "-m", "common.demo"], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert "[math] What is" in out and "[chat]" in out
    gaps = [float(x) for x in re.findall(r"(?:same weights|before sync|after sync_weights):\s+([0-9.e+-]+)", out)]
    same, stale, synced = gaps
    assert same < FP32_GAP and synced < FP32_GAP  # the engine holds the trainer's weights
    assert stale > 1e-3  # ...and really did not before the sync
    rewards = [float(x) for x in re.findall(r"reward ([+-][0-9.]+)", out)]
    assert len(rewards) == 8 * 4
