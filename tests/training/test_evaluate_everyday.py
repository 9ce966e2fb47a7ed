"""Batched, cached exact-match generation (issue 22): left padding changes no row's answer, merging for the
duration changes no answer and restores the weights, misses come first, the progress bar has an ETA."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from loratune import LoraConfig, get_lora_model
from loratune.training.evaluate import exact_match, generate_batch, merged_for_generation


@pytest.fixture(scope="module")
def lm_tok(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    torch.manual_seed(3)
    lm = get_lora_model(AutoModelForCausalLM.from_pretrained(tiny_dir),
                        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights="gaussian"))
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)  # a visible change of every answer
    return lm.eval(), tok


def _prompts(tok, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, len(tok), (int(k),), generator=g).tolist()
            for k in torch.randint(3, 15, (n,), generator=g)]


def test_batched_left_padded_generation_equals_one_row_at_a_time(lm_tok):
    lm, tok = lm_tok
    prompts = _prompts(tok)
    batched = generate_batch(lm, tok, prompts, max_new_tokens=6)
    assert batched == [generate_batch(lm, tok, [p], max_new_tokens=6)[0] for p in prompts]


def test_merged_generation_gives_the_same_answers_and_restores_the_weights(lm_tok):
    lm, tok = lm_tok
    prompts = _prompts(tok, seed=1)
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    unmerged = generate_batch(lm, tok, prompts, max_new_tokens=6)
    with merged_for_generation(lm) as merged:
        assert merged and all(layer.merged == ["default"] for _, layer in lm.lora_layers())
        assert generate_batch(lm, tok, prompts, max_new_tokens=6) == unmerged
    assert all(not layer.merged for _, layer in lm.lora_layers())
    after = lm.state_dict()
    assert max((after[k] - v).abs().max().item() for k, v in before.items()) < 1e-6
    with lm.disable_adapter(), merged_for_generation(lm) as merged:
        assert not merged  # the base alone: nothing folded in


def test_exact_match_counts_hits_and_lists_misses_first(lm_tok, capsys):
    lm, tok = lm_tok
    prompts = _prompts(tok, n=6, seed=2)
    answers = [a.strip() for a in generate_batch(lm, tok, prompts, max_new_tokens=5)]
    refs = [a if i % 3 == 0 else a + " wrong" for i, a in enumerate(answers)]  # rows 0 and 3 hit
    rows = [SimpleNamespace(prompt_ids=p, reference=r) for p, r in zip(prompts, refs)]
    rows.append(SimpleNamespace(prompt_ids=prompts[0], reference=None))  # no reference: not counted
    em = exact_match(lm, tok, rows, batch_size=4, max_new_tokens=5, progress=True, desc="em")
    assert em["n"] == 6 and em["exact_match"] == pytest.approx(2 / 6)
    assert [e["match"] for e in em["examples"]] == [False] * 4 + [True] * 2
    assert [e["reference"] for e in em["examples"]] == [refs[i] for i in (1, 2, 4, 5, 0, 3)]
    err = capsys.readouterr().err
    assert "em" in err and "6/6" in err and "<" in err  # tqdm: count and elapsed<remaining
    assert exact_match(lm, tok, rows[-1:])["exact_match"] is None


def test_exact_match_merges_only_when_the_pass_is_long_enough(lm_tok, monkeypatch):
    """merge=None: the adapters are merged for a pass of rows × new tokens ≥ MERGE_AT (the merge then pays), left
    unmerged below it; an explicit merge= wins; the answers are the same either way."""
    from loratune.training import evaluate

    lm, tok = lm_tok
    rows = [SimpleNamespace(prompt_ids=p, reference="x") for p in _prompts(tok, n=3, seed=4)]
    seen = []

    def merged_during_generation(model, *a, **kw):
        seen.append(any(layer.merged for _, layer in model.lora_layers()))
        return real(model, *a, **kw)

    real = evaluate.generate_batch
    monkeypatch.setattr(evaluate, "generate_batch", merged_during_generation)
    monkeypatch.setattr(evaluate, "MERGE_AT", 12)
    short = exact_match(lm, tok, rows, max_new_tokens=3)  # 3 × 3 = 9 < 12
    exact_match(lm, tok, rows, max_new_tokens=4)           # 3 × 4 = 12
    forced = exact_match(lm, tok, rows, max_new_tokens=3, merge=True)
    assert seen == [False, True, True]
    assert [e["prediction"] for e in forced["examples"]] == [e["prediction"] for e in short["examples"]]
    assert all(not layer.merged for _, layer in lm.lora_layers())
