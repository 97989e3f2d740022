"""`common.math_reward`: Math-Verify with the paper's set-up, bounded and thread-safe."""

import threading
import time

import pytest
from math_verify import parse, verify

from common import math_reward, math_rewards
from common.rewards import MATH_TIMEOUT_S

PAPER_ENDING = "The final answer is $\\boxed{{{}}}$. I hope it is correct."

CASES = [
    # (response, gold, expected)
    (PAPER_ENDING.format("\\frac{1}{2}"), "0.5", 1.0),
    (PAPER_ENDING.format("0.5"), "\\frac{1}{2}", 1.0),
    (PAPER_ENDING.format("\\dfrac{3}{4}"), "\\frac34", 1.0),
    ("We get \\boxed{19}.", "19", 1.0),
    ("3+4=7, so the answer is \\boxed{7}.", "7", 1.0),
    (PAPER_ENDING.format("2\\sqrt{2}"), "\\sqrt{8}", 1.0),
    (PAPER_ENDING.format("x^2+2x+1"), "(x+1)^2", 1.0),
    (PAPER_ENDING.format("(1, 2)"), "(1,2)", 1.0),
    ("first \\boxed{3} then corrected: \\boxed{4}", "4", 1.0),  # the last boxed answer counts
    ("We get \\boxed{18}.", "19", 0.0),
    (PAPER_ENDING.format("\\frac{1}{3}"), "0.5", 0.0),
    ("first \\boxed{4} then corrected: \\boxed{3}", "4", 0.0),
    ("", "7", 0.0),
    ("I do not know.", "7", 0.0),
    ("\\boxed{", "7", 0.0),
    ("}}}}{{{{\\boxed{\\frac{}{}}", "7", 0.0),
    ("\\boxed{7}", "", 0.0),  # unparsable gold
    ("\\boxed{7}", "\\frac{", 0.0),  # malformed gold LaTeX
    ("\\boxed{7}", "}}{{", 0.0),
]


@pytest.mark.parametrize("response,gold,expected", CASES)
def test_table(response, gold, expected):
    assert math_reward(response, gold) == expected


ADVERSARIAL = [
    "\\boxed{2^{10^{100}}}",
    "\\boxed{9^{9^{9^{9}}}}",
    "\\boxed{10!!!!!!}",
    "\\boxed{" + "(" * 400 + "1" + ")" * 400 + "}",
    "\\boxed{" + "\\frac{1}{" * 200 + "2" + "}" * 200 + "}",
    "x" * 200_000,
    "\\boxed{1}" * 5_000,
    "\\boxed{\\int_0^\\infty e^{-x^{99999}} dx}",
]


@pytest.mark.parametrize("response", ADVERSARIAL, ids=range(len(ADVERSARIAL)))
def test_adversarial_is_zero_and_bounded(response):
    t = time.time()
    assert math_reward(response, "3") == 0.0
    assert time.time() - t < 3 * MATH_TIMEOUT_S + 1


def test_agrees_with_math_verify_on_unseen_cases():
    """Our wrapper vs Math-Verify called directly, on answers not in the table above."""
    golds = ["42", "\\frac{5}{7}", "3\\pi", "-2", "\\sqrt{3}/3", "1000", "0.25", "2x+1"]
    preds = ["42.0", "\\frac{10}{14}", "3\\pi", "2", "\\frac{1}{\\sqrt{3}}", "10^3", "\\frac{1}{5}", "1+2x"]
    for g in golds:
        for p in preds:
            direct = verify(parse(f"${g}$"), parse(f"$\\boxed{{{p}}}$"))
            assert math_reward(f"so \\boxed{{{p}}}", g) == float(direct), (g, p)


def test_from_worker_thread_scores_like_main_thread():
    """Math-Verify's SIGALRM timeouts fail off the main thread; ours must still score 1."""
    responses = [r for r, _, _ in CASES] + ["\\boxed{2^{10^{100}}}"]
    golds = [g for _, g, _ in CASES] + ["3"]
    expected = [e for _, _, e in CASES] + [0.0]
    results = {}
    th = threading.Thread(target=lambda: results.update(out=math_rewards(responses, golds)))
    th.start()
    th.join(timeout=120)
    assert results["out"] == expected
    assert sum(results["out"]) > 0  # a correct answer really scores 1 from a thread
