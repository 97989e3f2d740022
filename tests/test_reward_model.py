"""`common.RewardModel` on tiny sequence-classification RMs, including one whose tokenizer and
chat template differ from the policy's."""

import pytest
import torch
from transformers import Qwen2ForSequenceClassification

from common import RewardModel, UserError
from embedded.tiny import build_tokenizer, tiny_config

OTHER_TEMPLATE = (
    "{% for m in messages %}<<{{ m['role'] }}>> {{ m['content'] }} <</{{ m['role'] }}>>{% endfor %}"
)


def _make_rm(path, tokenizer, seed):
    torch.manual_seed(seed)
    rm = Qwen2ForSequenceClassification(tiny_config(tokenizer, layers=2, num_labels=1))
    rm.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def rm_dirs(tmp_path_factory):
    same = _make_rm(tmp_path_factory.mktemp("rm_same"), build_tokenizer(), seed=1)
    other_tok = build_tokenizer(specials=["[PAD]", "[EOS]"], chat_template=OTHER_TEMPLATE,
                                eos="[EOS]", pad="[PAD]")
    other = _make_rm(tmp_path_factory.mktemp("rm_other"), other_tok, seed=2)
    return same, other


PROMPTS = ["Repeat this word: abc", "Write hello in capital letters.", "What is 2+2?", "Hi"]
RESPONSES = ["abc", "HELO", "2+2=4, so the answer is \\boxed{4}.", "a much longer reply " * 5]


def _direct(rm_dir, prompt, response):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(rm_dir)
    model = Qwen2ForSequenceClassification.from_pretrained(rm_dir, dtype=torch.float32).eval()
    text = tok.apply_chat_template([{"role": "user", "content": prompt},
                                    {"role": "assistant", "content": response}], tokenize=False)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits[0, 0].item(), text


@pytest.mark.parametrize("which", [0, 1], ids=["same_tokenizer", "other_tokenizer"])
def test_scores_equal_direct_forward(rm_dirs, which):
    rm_dir = rm_dirs[which]
    rm = RewardModel(rm_dir, torch.device("cpu"), batch_size=3)
    batched = rm.score(PROMPTS, RESPONSES)
    one_by_one = [rm.score([p], [r])[0] for p, r in zip(PROMPTS, RESPONSES)]
    direct = [_direct(rm_dir, p, r)[0] for p, r in zip(PROMPTS, RESPONSES)]
    assert batched == pytest.approx(one_by_one, abs=1e-5)
    assert batched == pytest.approx(direct, abs=1e-5)
    assert len(set(round(s, 6) for s in batched)) > 1  # a real model, not a constant


def test_other_tokenizer_sees_its_own_template(rm_dirs):
    _, text = _direct(rm_dirs[1], "Hi", "there")
    assert text.startswith("<<user>> Hi <</user>>")  # the RM's template, not the policy's
    # the two RMs differ in tokenizer and weights, so their scores differ
    a = RewardModel(rm_dirs[0], torch.device("cpu")).score(["Hi"], ["there"])[0]
    b = RewardModel(rm_dirs[1], torch.device("cpu")).score(["Hi"], ["there"])[0]
    assert a != b


def test_truncation(rm_dirs):
    rm = RewardModel(rm_dirs[0], torch.device("cpu"), max_length=32)
    s = rm.score(["Hi"], ["x" * 1000])  # would exceed the model's 512 positions untruncated
    assert len(s) == 1 and s[0] == s[0]


def test_missing_rm_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        RewardModel(str(tmp_path / "nope"), torch.device("cpu"))


def test_offload_scores_the_same(rm_dirs):
    """`offload=True` keeps the RM in CPU memory between calls and moves it only to score
    (on this CPU machine the move is trivial; the scores and the resting place are checked)."""
    kept = RewardModel(rm_dirs[0], torch.device("cpu"))
    parked = RewardModel(rm_dirs[0], torch.device("cpu"), offload=True)
    assert parked.score(PROMPTS, RESPONSES) == kept.score(PROMPTS, RESPONSES)
    assert next(parked.model.parameters()).device.type == "cpu"
