"""The four scripts stay siblings: what they share is byte-identical, and a diff between two of
them shows the regime, within budgets on changed lines (docstrings included)."""

import ast
import difflib
import os

import pytest

from tests.conftest import ROOT

SCRIPTS = ["grpo.py", "online_dpo.py", "semi_online_dpo.py", "offline_dpo.py"]
# grpo <-> online: 320 since the paper's ablation flags (each regime's own loss lines and Args) landed;
# the reshape of the scripts (Args plumbing into common/, metrics after the update) is to bring it
# back to the style's 160.
BUDGETS = [("online_dpo.py", "semi_online_dpo.py", 60), ("grpo.py", "online_dpo.py", 320),
           ("online_dpo.py", "offline_dpo.py", 220)]


def source(script):
    return open(os.path.join(ROOT, script)).read()


def changed_lines(a, b):
    """What `diff a b | grep -c '^[<>]'` counts."""
    return sum(1 for line in difflib.ndiff(source(a).splitlines(), source(b).splitlines()) if line[:2] in ("- ", "+ "))


@pytest.mark.parametrize("a,b,budget", BUDGETS, ids=[f"{a}-{b}" for a, b, _ in BUDGETS])
def test_sibling_diffs_show_only_the_regime(a, b, budget):
    assert changed_lines(a, b) <= budget


def functions(script):
    tree = ast.parse(source(script))
    return {n.name: ast.get_source_segment(source(script), n) for n in tree.body if isinstance(n, ast.FunctionDef)}


def test_shared_functions_are_byte_identical():
    dpo = [functions(s) for s in ("online_dpo.py", "semi_online_dpo.py", "offline_dpo.py")]
    for name in ("select_pairs", "dpo_loss", "group_terms"):
        assert dpo[0][name] == dpo[1][name] == dpo[2][name], name


def test_shared_args_are_identical():
    """The shared block of Args (every field up to the algorithm's own) reads the same in all four,
    but for the lines the regime changes."""
    def shared(script):
        s = source(script)
        return s[s.index("class Args:"):s.index("    # Algorithm specific arguments")].splitlines()

    base = shared("online_dpo.py")
    for script in SCRIPTS:
        differing = [line for line in difflib.ndiff(base, shared(script)) if line[:2] in ("- ", "+ ")]
        allowed = ("temperature", "top_p", "vllm_sleep", "GPU: free vLLM", "rollouts (the paper")  # offline: the seed's rollouts, no engine sleep
        assert all(any(k in line for k in allowed) for line in differing), (script, differing)
