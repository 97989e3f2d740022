"""The study's statistics, in plain Python (no SciPy in the project): Student's t distribution,
Welch's two-sample t-test, the two one-sided tests (TOST) of equivalence within a margin, and the
power of Welch's test, so that every verdict and every power figure in study/DESIGN.md is computed.

    python study/stats.py --sd 0.008 --diff 0.02 --seeds 3 6 10     # the power table of a design
"""

import math
import random
import statistics
from dataclasses import dataclass


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularized incomplete beta function (Lentz's method)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularized incomplete beta function."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom (df may be fractional: Welch)."""
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_ppf(q: float, df: float) -> float:
    """The q-quantile of Student's t (bisection on `t_cdf`)."""
    lo, hi = -1e3, 1e3
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < q else (lo, mid)
    return (lo + hi) / 2


@dataclass
class Welch:
    diff: float  # mean(a) - mean(b)
    se: float  # its standard error
    df: float  # Welch-Satterthwaite degrees of freedom
    p: float  # two-sided p-value of diff = 0


def welch(a: list[float], b: list[float]) -> Welch:
    """Welch's two-sample t-test of mean(a) = mean(b) (unequal variances), two-sided."""
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    diff, se = statistics.fmean(a) - statistics.fmean(b), math.sqrt(va + vb)
    if se == 0:
        return Welch(diff, 0.0, float("inf"), 1.0 if diff == 0 else 0.0)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return Welch(diff, se, df, 2.0 * (1.0 - t_cdf(abs(diff) / se, df)))


def tost(a: list[float], b: list[float], margin: float) -> float:
    """The p-value of equivalence, |mean(a) - mean(b)| < margin, by two one-sided Welch tests: the
    larger of the two one-sided p-values (equivalence is shown when it is below alpha)."""
    w = welch(a, b)
    if w.se == 0:
        return 0.0 if abs(w.diff) < margin else 1.0
    p_low = 1.0 - t_cdf((w.diff + margin) / w.se, w.df)  # H0: diff <= -margin
    p_high = t_cdf((w.diff - margin) / w.se, w.df)  # H0: diff >= +margin
    return max(p_low, p_high)


def welch_power(n: int, sd: float, diff: float, alpha: float = 0.05, sims: int = 20000, seed: int = 0) -> float:
    """The chance that Welch's two-sided test at `alpha` separates two arms of `n` seeds each whose
    per-seed values have standard deviation `sd` and whose means differ by `diff` (Monte Carlo
    over `sims` simulated studies of normal per-seed values, seeded: the same figure every run)."""
    rng = random.Random(seed)
    hits = 0
    for _ in range(sims):
        a = [rng.gauss(diff, sd) for _ in range(n)]
        b = [rng.gauss(0.0, sd) for _ in range(n)]
        hits += welch(a, b).p < alpha
    return hits / sims


def tost_power(n: int, sd: float, margin: float, alpha: float = 0.05, sims: int = 20000, seed: int = 0) -> float:
    """The chance that TOST at `alpha` shows equivalence within `margin` when the arms are truly equal."""
    rng = random.Random(seed)
    hits = 0
    for _ in range(sims):
        hits += tost([rng.gauss(0.0, sd) for _ in range(n)], [rng.gauss(0.0, sd) for _ in range(n)], margin) < alpha
    return hits / sims


@dataclass
class Verdict:
    label: str  # "reproduced", "not reproduced" or "cannot tell"
    welch: Welch
    tost_p: float  # equivalence within the margin
    power: float  # of Welch's test for a difference of `margin` at the realised pooled SD


def verdict(claim: str, a: list[float], b: list[float], margin: float, alpha: float = 0.05) -> Verdict:
    """study/DESIGN.md's rule for a claim about arms A and B (per-seed values): "A > B" is
    reproduced by d > 0 with Welch p < alpha, not reproduced by d < 0 with p < alpha or by
    equivalence within `margin` (TOST p < alpha); "A ≈ B" is reproduced by equivalence, not
    reproduced by p < alpha without it; anything else: this miniature cannot tell."""
    w, t = welch(a, b), tost(a, b, margin)
    sd = math.sqrt((statistics.variance(a) + statistics.variance(b)) / 2)
    power = welch_power(min(len(a), len(b)), sd, margin, alpha, sims=4000) if sd > 0 else 1.0
    if claim == "A > B":
        label = ("reproduced" if w.diff > 0 and w.p < alpha else
                 "not reproduced" if (w.diff < 0 and w.p < alpha) or t < alpha else "cannot tell")
    elif claim == "A ≈ B":
        label = "reproduced" if t < alpha else "not reproduced" if w.p < alpha else "cannot tell"
    else:
        raise ValueError(f"claim {claim!r}: 'A > B' or 'A ≈ B'")
    return Verdict(label, w, t, power)


def sampling_sd(per_problem: list[float], samples: int) -> float:
    """The standard deviation, from test sampling alone, of a mean accuracy over problems each
    answered `samples` times, given each problem's probability of a right answer."""
    return math.sqrt(sum(p * (1 - p) for p in per_problem) / samples) / len(per_problem)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sd", type=float, nargs="+", required=True, help="per-seed standard deviations")
    ap.add_argument("--diff", type=float, default=0.02, help="the difference to detect (and the TOST margin)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[3, 6, 10])
    a = ap.parse_args()
    print("| per-seed SD | seeds per arm | power to separate a difference of "
          f"{a.diff} (Welch, 5%) | power to show equivalence within ±{a.diff} when equal (TOST, 5%) |")
    print("|---|---|---|---|")
    for sd in a.sd:
        for n in a.seeds:
            print(f"| {sd} | {n} | {welch_power(n, sd, a.diff):.2f} | {tost_power(n, sd, a.diff):.2f} |")
