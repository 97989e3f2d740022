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


# ---------------------------------------------------------------------------------------------
# Reward-model layouts (docs/reward_models.md), each built on the spot in its library's exact
# tensor names and scored against a hand computation of the head at the position its training used.
# ---------------------------------------------------------------------------------------------
def _llama_config(tok, **kw):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=512,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None, **kw)


def _athene(path):
    """A tiny model in Athene-RM-8B's layout: `model.*` (a LlamaModel) + `v_head.weight` (no bias),
    and a tokenizer with a `cls_token`, as the model card's class writes them."""
    from transformers import LlamaModel, LlamaPreTrainedModel

    class Athene(LlamaPreTrainedModel):
        def __init__(self, config):
            super().__init__(config)
            self.model = LlamaModel(config)
            self.v_head = torch.nn.Linear(config.hidden_size, 1, bias=False)
            self.post_init()

    tok = build_tokenizer(specials=["<|pad|>", "<|user|>", "<|assistant|>", "<|end|>", "<|cls|>"])
    tok.add_special_tokens({"cls_token": "<|cls|>"})
    torch.manual_seed(3)
    model = Athene(_llama_config(tok))
    model.config.architectures = ["LlamaForSequenceClassification"]  # as Athene-RM-8B's config.json says
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model.eval(), tok


def _athene_by_hand(model, tok, prompt, response, max_length=4096):
    """The authors' scoring (fairseq2 `third_party/athene.py`): template + cls_token, tokenized with
    the tokenizer's defaults and truncated, v_head on the last hidden state at the last CLS, 0 if none."""
    text = tok.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
                                   tokenize=False) + tok.cls_token
    ids = tok(text, return_tensors="pt", max_length=max_length, truncation=True)["input_ids"]
    with torch.no_grad():
        hidden = model.model(ids, output_hidden_states=True).hidden_states[-1]
        rewards = model.v_head(hidden).squeeze(-1)
    c = (ids[0] == tok.cls_token_id).nonzero()
    return 0.0 if len(c) == 0 else rewards[0, c[-1].item()].item()


def test_athene_layout_scored_as_its_authors_score_it(tmp_path):
    model, tok = _athene(tmp_path / "athene")
    rm = RewardModel(str(tmp_path / "athene"), torch.device("cpu"), batch_size=3)
    assert rm.layout == "athene" and "last CLS" in rm.describe()
    want = [_athene_by_hand(model, tok, p, r) for p, r in zip(PROMPTS, RESPONSES)]
    assert rm.score(PROMPTS, RESPONSES) == pytest.approx(want, abs=1e-5)
    assert len(set(round(s, 6) for s in want)) == len(want)
    # truncation as the authors': a chat past max_length loses its CLS and scores 0
    short = RewardModel(str(tmp_path / "athene"), torch.device("cpu"), max_length=40)
    got = short.score(["Hi", "Hi"], ["x" * 100, "ok"])
    assert got == pytest.approx([_athene_by_hand(model, tok, "Hi", "x" * 100, 40),
                                 _athene_by_hand(model, tok, "Hi", "ok", 40)], abs=1e-5)
    assert got[0] == 0.0 and got[1] != 0.0 and short.truncated == 1
    # loaded as a stock sequence classifier, the same checkpoint scores with a random head
    from transformers import AutoModelForSequenceClassification

    stock = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "athene"), num_labels=1)
    ids = tok(tok.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "ok"}],
                                      tokenize=False), return_tensors="pt")["input_ids"]
    assert stock(input_ids=ids).logits[0, 0].item() != pytest.approx(got[1], abs=1e-3)


def _backbone_plus(path, head_names, seed, causal=False, **config):
    """A Qwen2 backbone (`model.*`, plus `lm_head` for a causal LM) and extra head tensors saved
    beside it, as TRL's value-head models and OpenRLHF's reward models write them."""
    from safetensors.torch import load_file, save_file
    from transformers import Qwen2ForCausalLM, Qwen2Model

    tok = build_tokenizer()
    torch.manual_seed(seed)
    cls = Qwen2ForCausalLM if causal else Qwen2Model
    model = cls(tiny_config(tok, layers=2, **config)).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    f = path / "model.safetensors"
    tensors = load_file(str(f))
    if not causal:  # OpenRLHF's LLMForSequenceRegression keeps the backbone under `model.`
        tensors = {f"model.{k}": v for k, v in tensors.items()}
    heads = {name: torch.randn(shape) for name, shape in head_names.items()}
    save_file(tensors | heads, str(f), metadata={"format": "pt"})
    backbone = model.model if causal else model
    return backbone, tok, heads


def _last_hidden(backbone, tok, prompt, response, suffix=""):
    text = tok.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
                                   tokenize=False) + suffix
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return backbone(input_ids=ids).last_hidden_state[0, -1]


def test_trl_value_head_layout(tmp_path):
    backbone, tok, h = _backbone_plus(tmp_path / "trl", {"v_head.summary.weight": (1, 128),
                                                         "v_head.summary.bias": (1,)}, seed=4, causal=True)
    rm = RewardModel(str(tmp_path / "trl"), torch.device("cpu"))
    assert rm.layout == "trl-value-head"
    want = [(h["v_head.summary.weight"] @ _last_hidden(backbone, tok, p, r) + h["v_head.summary.bias"]).item()
            for p, r in zip(PROMPTS, RESPONSES)]
    assert rm.score(PROMPTS, RESPONSES) == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize("head,config", [("value_head", {}), ("score", {"value_head_prefix": "score"})],
                         ids=["value_head", "head_named_in_config"])
def test_openrlhf_layout_reads_at_the_eos_it_appends_and_normalises(tmp_path, head, config):
    """OpenRLHF's reward model, its head `value_head` or (since 2025) named in config.json
    (`value_head_prefix`: "score"): read as OpenRLHF reads it (its EOS position, its normalisation),
    not as a generic classifier."""
    backbone, tok, h = _backbone_plus(tmp_path / "orlhf", {f"{head}.weight": (1, 128)}, seed=5,
                                      normalize_reward=True, mean=0.5, std=2.0, **config)
    rm = RewardModel(str(tmp_path / "orlhf"), torch.device("cpu"))
    assert rm.layout == "openrlhf"
    # the embedded template already ends each turn with EOS (<|end|>), so nothing is appended
    want = [((h[f"{head}.weight"] @ _last_hidden(backbone, tok, p, r)).item() - 0.5) / 2.0
            for p, r in zip(PROMPTS, RESPONSES)]
    assert rm.score(PROMPTS, RESPONSES) == pytest.approx(want, abs=1e-5)


def test_score_head_reads_the_last_token_even_when_pad_is_eos(tmp_path, rm_dirs):
    """A template that closes with EOS and a tokenizer whose pad is EOS: transformers' own pooling
    (last non-pad token) would score the token before the EOS; the RM is read at the EOS."""
    import json
    import shutil

    path = tmp_path / "pad_is_eos"
    shutil.copytree(rm_dirs[0], path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["pad_token_id"] = cfg["eos_token_id"]
    (path / "config.json").write_text(json.dumps(cfg))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.pad_token = tok.eos_token
    tok.save_pretrained(path)
    rm = RewardModel(str(path), torch.device("cpu"))
    assert rm.tokenizer.pad_token_id == rm.tokenizer.eos_token_id
    assert rm.score(PROMPTS, RESPONSES) == pytest.approx([_direct(rm_dirs[0], p, r)[0] for p, r in zip(PROMPTS, RESPONSES)],
                                                         abs=1e-5)


def test_no_random_heads(tmp_path, tiny_model_dir, rm_dirs):
    import json
    import shutil

    with pytest.raises(UserError, match=r"\(Qwen2ForCausalLM\) has no reward head in its checkpoint"):
        RewardModel(tiny_model_dir, torch.device("cpu"))  # a causal LM as the reward model
    # a model with its own code, without --trust-remote-code
    custom = tmp_path / "custom"
    shutil.copytree(tiny_model_dir, custom)
    cfg = json.loads((custom / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForSequenceClassification": "modeling_rm.RM"}
    (custom / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="pass --trust-remote-code"):
        RewardModel(str(custom), torch.device("cpu"))
    # a score head whose weights are absent from the checkpoint (a shard lost)
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(rm_dirs[0], broken)
    t = load_file(str(broken / "model.safetensors"))
    save_file({k: v for k, v in t.items() if not k.startswith("model.norm")} | {"score.weight": t["score.weight"]},
              str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"weight\(s\) missing from its checkpoint, e.g. model.norm.weight"):
        RewardModel(str(broken), torch.device("cpu"))


def test_frozen_models_build_no_kv_cache(rm_dirs, tiny_model_dir):
    """The reference and the reward model never decode: a KV cache per forward would only cost
    memory (~1 GiB per reference micro-batch at 8B)."""
    import common

    assert RewardModel(rm_dirs[0], torch.device("cpu")).model.config.use_cache is False
    reference = common.load_model(tiny_model_dir, torch.device("cpu"), trainable=False)
    assert reference.config.use_cache is False
    seen = []
    reference.register_forward_hook(lambda m, a, kw, out: seen.append(out.past_key_values), with_kwargs=True)
    common.completion_logprobs(reference, [[1, 2, 3]], [[4, 5]])
    assert seen == [None]


def test_a_score_bias_in_the_checkpoint_is_kept(tmp_path, rm_dirs):
    """transformers' decoder classifiers have a bias-free `score`; a checkpoint that has one keeps it."""
    import shutil

    from safetensors.torch import load_file, save_file

    path = tmp_path / "with_bias"
    shutil.copytree(rm_dirs[0], path)
    tensors = load_file(str(path / "model.safetensors"))
    save_file(tensors | {"score.bias": torch.tensor([0.75])}, str(path / "model.safetensors"), metadata={"format": "pt"})
    got = RewardModel(str(path), torch.device("cpu")).score(PROMPTS, RESPONSES)
    assert got == pytest.approx([_direct(rm_dirs[0], p, r)[0] + 0.75 for p, r in zip(PROMPTS, RESPONSES)], abs=1e-5)


def test_classifiers_that_are_not_scalar_reward_models_are_one_line(tmp_path):
    """Two labels (a preference classifier), and a classifier whose head is not `score` saved as
    .bin (no tensor names to read before the load): one line each, not a traceback at the load or
    at the first score."""
    from transformers import BertConfig, BertForSequenceClassification

    tok = build_tokenizer()
    two = tmp_path / "two_labels"
    Qwen2ForSequenceClassification(tiny_config(tok, layers=1, num_labels=2)).save_pretrained(two)
    tok.save_pretrained(two)
    with pytest.raises(UserError, match="has a 2-label classifier head; a scalar reward model has one output"):
        RewardModel(str(two), torch.device("cpu"))
    bert = tmp_path / "bert_bin"
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, num_labels=1)
    model = BertForSequenceClassification(config)
    model.save_pretrained(bert)
    (bert / "model.safetensors").unlink()  # as older tools wrote it: a pickled state dict
    torch.save(model.state_dict(), bert / "pytorch_model.bin")
    tok.save_pretrained(bert)
    with pytest.raises(UserError, match=r"\(BertForSequenceClassification\) has no `score` head \(it has .*classifier"):
        RewardModel(str(bert), torch.device("cpu"))
