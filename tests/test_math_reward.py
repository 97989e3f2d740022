"""`common.math_reward`: Math-Verify exactly as the authors configured it, bounded and thread-safe."""

import subprocess
import sys
import threading
import time

import pytest
from math_verify.metric import math_metric
from math_verify.parser import LatexExtractionConfig, NormalizationConfig

import common.rewards
from common import math_reward, math_rewards

PAPER_ENDING = "The final answer is $\\boxed{{{}}}$. I hope it is correct."

CASES = [
    # (response, gold, expected): what the paper's verifier accepts ...
    (PAPER_ENDING.format("\\frac{1}{2}"), "0.5", 1.0),
    (PAPER_ENDING.format("0.5"), "\\frac{1}{2}", 1.0),
    (PAPER_ENDING.format("\\dfrac{3}{4}"), "\\frac34", 1.0),
    ("We get \\boxed{19}.", "19", 1.0),
    ("3+4=7, so the answer is \\boxed{7}.", "7", 1.0),
    ("The answer is $7$.", "7", 1.0),  # LaTeX without a box still counts
    (PAPER_ENDING.format("2\\sqrt{2}"), "\\sqrt{8}", 1.0),
    (PAPER_ENDING.format("x^2+2x+1"), "(x+1)^2", 1.0),
    (PAPER_ENDING.format("(1, 2)"), "(1,2)", 1.0),
    ("first \\boxed{3} then corrected: \\boxed{4}", "4", 1.0),  # the last boxed answer counts
    # ... and rejects: plain-text answers score 0 (no ExprExtractionConfig on the prediction)
    ("The answer is 26", "26", 0.0),
    ("Thus x = 7.", "7", 0.0),
    ("so 26.", "26", 0.0),
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

# MATH-500's gold shapes (\$, \%, ^\circ, \text{}, units, tuples, intervals, bases): the right
# answer scores 1, a wrong one 0
MATH500_GOLDS = [
    ("\\$32,348", "32348", "32347"),
    ("\\$18.90", "\\$18.90", "18.91"),
    ("\\$18.90", "18.9", "19.80"),
    ("10\\%", "10\\%", "11\\%"),
    ("90^\\circ", "90", "45"),
    ("\\text{Evelyn}", "\\text{Evelyn}", "\\text{Bob}"),
    ("\\text{(C)}", "C", "B"),
    ("5\\text{ cm}", "5", "6"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\frac{\\pi}{2})", "(3, \\pi)"),
    ("x \\in [-2,7]", "[-2,7]", "[-2,8]"),
    ("4210_{5}", "4210_{5}", "4211_{5}"),
    ("6 - 5i", "6-5i", "6+5i"),
    ("1,\\!000", "1000", "100"),
]


@pytest.mark.parametrize("response,gold,expected", CASES)
def test_table(response, gold, expected):
    assert math_reward(response, gold) == expected


@pytest.mark.parametrize("gold,right,wrong", MATH500_GOLDS)
def test_math500_gold_shapes(gold, right, wrong):
    assert math_reward(PAPER_ENDING.format(right), gold) == 1.0
    assert math_reward(PAPER_ENDING.format(wrong), gold) == 0.0


ADVERSARIAL = [
    "\\boxed{2^{10^{100}}}",  # hits Math-Verify's 5 s timeout
    "\\boxed{" + "\\frac{1}{" * 200 + "2" + "}" * 200 + "}",
    "x" * 200_000,
    "\\boxed{1}" * 5_000,
]


@pytest.mark.parametrize("response", ADVERSARIAL, ids=range(len(ADVERSARIAL)))
def test_adversarial_is_zero_and_bounded(response):
    t = time.time()
    assert math_reward(response, "3") == 0.0
    assert time.time() - t < common.rewards.HELPER_TIMEOUT_S


def test_is_the_authors_math_metric():
    """Our wrapper vs the authors' construction written out here (fairseq2 `MathVerifyVerifier`), on
    a grid of answers not in the tables above, in plain and LaTeX form."""
    norm = NormalizationConfig(basic_latex=True, units=True, malformed_operators=True, nits=True,
                               boxed="none", equations=False)
    authors = math_metric(gold_extraction_target=(LatexExtractionConfig(normalization_config=norm),),
                          pred_extraction_target=(LatexExtractionConfig(boxed_match_priority=0),),
                          aggregation_function=max, precision=6)
    golds = ["42", "\\frac{5}{7}", "3\\pi", "-2", "\\sqrt{3}/3", "1000", "0.25", "2x+1", "$7$"]
    preds = ["42.0", "\\frac{10}{14}", "3\\pi", "2", "\\frac{1}{\\sqrt{3}}", "10^3", "\\frac{1}{5}", "1+2x", "7"]
    agree = 0
    for g in golds:
        for p in preds:
            for response in (f"so \\boxed{{{p}}}", f"so ${p}$", f"so {p}"):
                expected = authors([g if g.startswith("$") else f"${g}$"], [response])[0]
                assert math_reward(response, g) == expected, (g, response)
                agree += expected
    assert agree >= 15  # the grid holds real matches, not only zeros


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


def test_off_main_thread_never_reruns_the_callers_code():
    """A caller read from standard input, with unguarded top-level code: the helper must neither
    fail on it nor run it again (a multiprocessing spawn does both)."""
    code = ("import threading\nprint('top-level ran', flush=True)\nfrom common import math_rewards\nout = {}\n"
            "t = threading.Thread(target=lambda: out.update(r=math_rewards(['so \\\\boxed{7}', 'so 7'], ['7', '7'])))\n"
            "t.start(); t.join()\nprint(out['r'])\n")
    r = subprocess.run([sys.executable, "-"], input=code, capture_output=True, text=True, timeout=120,
                       cwd=common.rewards.__file__.rsplit("/common/", 1)[0])
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines() == ["top-level ran", "[1.0, 0.0]"]


def test_off_main_thread_helper_failure_raises(monkeypatch):
    """If the helper cannot run, the caller gets an error, never a reward of 0."""
    monkeypatch.setattr(common.rewards, "_helper", None)
    monkeypatch.setattr(sys, "executable", "/bin/false")
    caught = {}

    def call():
        try:
            math_rewards(["so \\boxed{7}"], ["7"])
        except RuntimeError as e:
            caught["e"] = e

    th = threading.Thread(target=call)
    th.start()
    th.join(timeout=60)
    assert "Math-Verify helper process" in str(caught["e"])
