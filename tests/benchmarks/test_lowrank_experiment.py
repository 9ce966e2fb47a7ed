"""The low-rank experiment script runs end to end at toy size on a tiny random Llama (so it cannot rot), and its
pieces do what the docs say: the extracted LoRA at full rank is the full fine-tune."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import load_benchmark

lowrank = load_benchmark("lowrank_experiment")


@pytest.mark.slow
def test_runs_at_toy_size(tiny_dir, tmp_path, capsys):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    # hidden size 32: r = 32 is full rank, so that extraction must reproduce the full fine-tune exactly
    assert lowrank.main(["--model", str(tiny_dir), "--ranks", "1,32", "--steps", "2", "--batch-size", "2",
                         "--n-train", "8", "--n-eval", "4", "--max-new-tokens", "4", "--full-lr", "1e-2",
                         "--check-generation", "--json", str(out), "--plot", str(png)]) == 0
    res = json.loads(out.read_text())
    rows = {(x["kind"], x["r"]): x for x in res["rows"]}
    assert set(rows) == {("base", None), ("full", None), ("extracted", 1), ("extracted", 32), ("lora", 1),
                         ("lora", 32)}
    full, ext = rows[("full", None)], rows[("extracted", 32)]
    assert ext["energy_kept_min"] == pytest.approx(1.0, abs=1e-9)
    assert ext["loss"] == pytest.approx(full["loss"], rel=1e-4)
    assert rows[("extracted", 1)]["energy_kept_mean"] < 1
    assert full["loss"] != rows[("base", None)]["loss"]  # it trained
    assert full["loss_eval_loss"] == pytest.approx(full["loss"], rel=1e-4)  # the same loss as eval_loss's
    assert full["exact_match_generated"] == full["exact_match"] == 0.0  # a random model: nothing matches
    assert png.stat().st_size > 1000
    assert "| 32 |" in capsys.readouterr().out


@pytest.mark.parametrize("argv, says", [
    (["--ranks", "1,x"], "--ranks must be whole numbers"),
    (["--ranks", "0"], "--ranks must be whole numbers ≥ 1"),
    (["--layers", "a-b"], "--layers must look like"),
    (["--steps", "0"], "must be at least 1"),
])
def test_bad_arguments(argv, says, capsys):
    with pytest.raises(SystemExit) as e:
        lowrank.parse_args(argv)
    assert e.value.code == 2 and says in capsys.readouterr().err


class Oracle(torch.nn.Module):
    """Logits whose argmax at position t is input_ids[t + 1] (a perfect greedy model), except where ``wrong``
    says: (row, position) -> a different token."""

    def __init__(self, wrong: dict[tuple[int, int], int]):
        super().__init__()
        self.wrong = wrong

    def forward(self, input_ids, attention_mask):
        logits = torch.zeros(*input_ids.shape, 20)
        nxt = torch.cat([input_ids[:, 1:], input_ids[:, :1]], 1)
        logits.scatter_(2, nxt.unsqueeze(-1), 5.0)
        for (row, pos), tok in self.wrong.items():
            logits[row, pos] = 0
            logits[row, pos, tok] = 5.0
        return type("Out", (), {"logits": logits})()


def test_forced_exact_match_is_the_greedy_check():
    """Exact match by teacher forcing: a row counts iff argmax = reference at every response position up to and
    including its first end token (9 here); a wrong token after that end does not matter."""
    from loratune.data import Example

    ignore = -100
    rows = [Example(input_ids=[1, 2, 3, 4, 9, 7], labels=[ignore, ignore, 3, 4, 9, 7]) for _ in range(4)]
    wrong = {(1, 2): 5,   # row 1: the second answer token (predicted at position 2) is wrong -> miss
             (2, 3): 6,   # row 2: the end token is not predicted -> miss (generation would run on)
             (3, 4): 8}   # row 3: wrong only after the end token -> still a match
    res = lowrank.forced_eval(Oracle(wrong), rows, pad_id=0, stops={9}, batch_size=4)
    assert res["exact_match"] == pytest.approx(2 / 4)
    assert res["loss"] > 0
