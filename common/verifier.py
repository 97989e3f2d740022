"""The paper's math verifier: Math-Verify configured exactly as in the authors' code.

The authors (fairseq2, branch `online_training`, `_online_finetune/_rewards.py`, `MathVerifyVerifier`)
build one `math_metric` and call it on (gold, completion):
- gold: wrapped in `$...$` unless it already starts with `$`, parsed with `LatexExtractionConfig`
  only, normalisation `basic_latex`, `units`, `malformed_operators`, `nits`, `boxed="none"`,
  `equations=False`;
- completion: the whole text, parsed with `LatexExtractionConfig(boxed_match_priority=0)` only
  (the last `\\boxed{}` first, then other LaTeX such as `$...$`); no `ExprExtractionConfig`, so a
  plain-text answer ("The answer is 26") scores 0;
- `verify` with precision 6, `max` over candidates; Math-Verify's own timeouts (5 s per parse and
  per comparison); any exception or timeout is reward 0.

This file imports Math-Verify and nothing of the project, because it doubles as the helper
process that scores off the main thread (run as a script: see `common.rewards`): Math-Verify's
timeouts use SIGALRM, which only the main thread of a process may set.
"""

from __future__ import annotations

import json
import logging
import sys

from math_verify.errors import TimeoutException
from math_verify.metric import math_metric
from math_verify.parser import LatexExtractionConfig, NormalizationConfig

# Math-Verify logs every unparsable answer and timeout at WARNING/ERROR; in RL that is the common
# case (a wrong or garbled answer), not an error. Rewards are reported as metrics instead.
logging.getLogger("math_verify").setLevel(logging.CRITICAL)

_GOLD_NORMALIZATION = NormalizationConfig(basic_latex=True, units=True, malformed_operators=True,
                                          nits=True, boxed="none", equations=False)
_PAPER_METRIC = math_metric(
    gold_extraction_target=(LatexExtractionConfig(normalization_config=_GOLD_NORMALIZATION),),
    pred_extraction_target=(LatexExtractionConfig(boxed_match_priority=0),),
    aggregation_function=max,
    precision=6,
)


def paper_math_reward(response: str, gold: str) -> float:
    """1.0 if `response`'s final answer equals `gold` per the authors' Math-Verify set-up, else 0.0.
    Main thread only (Math-Verify's timeouts use SIGALRM)."""
    gold = gold if gold.startswith("$") else f"${gold}$"  # the authors: "so that LatexExtractor works"
    try:
        grade, _ = _PAPER_METRIC([gold], [response])
    except (Exception, TimeoutException):  # the authors: any exception is 0 (timeouts, sympy errors, no gold)
        return 0.0  # (not KeyboardInterrupt: a Ctrl-C while scoring must stop the run, not score 0)
    return 1.0 if grade == 1 else 0.0


def _serve() -> None:
    """Helper-process loop: one JSON list of [response, gold] pairs per input line, one JSON list
    of rewards per output line."""
    for line in sys.stdin:
        pairs = json.loads(line)
        print(json.dumps([paper_math_reward(r, g) for r, g in pairs]), flush=True)


if __name__ == "__main__":
    _serve()
