"""The study's statistics (study/stats.py) against closed forms and against their own definition."""

import math
import os
import random
import sys

import pytest

from tests.conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "study"))
from stats import t_cdf, t_ppf, tost, welch, welch_power  # noqa: E402


def test_t_cdf_matches_closed_forms():
    for t in (-7.0, -1.3, -0.2, 0.0, 0.4, 2.1, 9.0):
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)  # Cauchy
        assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
        assert t_cdf(t, 1e7) == pytest.approx(0.5 * (1 + math.erf(t / math.sqrt(2))), abs=1e-6)
        assert t_cdf(-t, 7.3) == pytest.approx(1 - t_cdf(t, 7.3), abs=1e-12)
    for q in (0.025, 0.5, 0.95):
        assert t_cdf(t_ppf(q, 4.5), 4.5) == pytest.approx(q, abs=1e-9)


def test_welch_holds_its_level_and_tost_its_meaning():
    rng = random.Random(1)
    # under the null (unequal variances, Welch's case) a 5% test rejects ~5% of the time
    rejections = sum(welch([rng.gauss(0, 1) for _ in range(6)], [rng.gauss(0, 3) for _ in range(4)]).p < 0.05
                     for _ in range(4000))
    assert abs(rejections / 4000 - 0.05) < 0.015  # 4.5 binomial SEs
    a, b = [0.50 + 0.001 * i for i in range(6)], [0.501 + 0.001 * i for i in range(6)]
    assert tost(a, b, margin=0.02) < 0.001  # equal within a tight spread: equivalent
    assert tost([x + 0.1 for x in a], b, margin=0.02) > 0.99  # 0.1 apart: not within 0.02
    w = welch([1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0, 5.0])
    assert w.diff == -1.0 and w.se == math.sqrt(1 / 3 + 2.5 / 5) and 0 < w.p < 1


def test_power_grows_with_seeds_and_shrinks_with_noise():
    few, many, noisy = welch_power(3, 0.01, 0.02, sims=3000), welch_power(8, 0.01, 0.02, sims=3000), \
        welch_power(8, 0.03, 0.02, sims=3000)
    assert few < many and noisy < many
    assert abs(welch_power(6, 0.01, 0.0, sims=3000) - 0.05) < 0.02  # no difference: the test's level


def test_world_check_slopes_recover_known_coefficients():
    """study/world_check.py's regression: score = 7 x quality + 0.5 x length + a per-prompt offset
    + noise; the within-prompt fit recovers both slopes, and the length slope's SE covers its error."""
    import torch
    from world_check import slopes

    g = torch.Generator().manual_seed(0)
    quality, length = torch.rand(200, 8, generator=g), torch.randint(3, 30, (200, 8), generator=g).float()
    offset = torch.randn(200, 1, generator=g) * 5  # prompts differ: the fit must not care
    scores = 7 * quality + 0.5 * length + offset + torch.randn(200, 8, generator=g) * 0.3
    per_quality, per_char, se = slopes(scores, quality, length)
    assert abs(per_quality - 7) < 0.2 and abs(per_char - 0.5) < 4 * se and 0 < se < 0.01


def test_the_verdict_rule_says_cannot_tell_without_power():
    """The design's rule on clear cases and on an underpowered one."""
    from stats import verdict

    rng = random.Random(3)
    high = [0.42 + rng.gauss(0, 0.004) for _ in range(6)]
    low = [0.38 + rng.gauss(0, 0.004) for _ in range(6)]
    same = [0.40 + rng.gauss(0, 0.004) for _ in range(6)]
    assert verdict("A > B", high, low, 0.02).label == "reproduced"
    assert verdict("A > B", low, high, 0.02).label == "not reproduced"  # the other way round
    assert verdict("A > B", same, [x + 0.001 for x in same], 0.02).label == "not reproduced"  # equal within 0.02
    assert verdict("A ≈ B", same, [x + 0.001 for x in same], 0.02).label == "reproduced"
    assert verdict("A ≈ B", high, low, 0.02).label == "not reproduced"
    noisy = verdict("A > B", [0.40, 0.45, 0.37], [0.39, 0.36, 0.43], 0.02)  # 3 seeds, SD ~0.04
    assert noisy.label == "cannot tell" and noisy.power < 0.2
