"""The low-rank experiment script runs end to end at toy size on a tiny random Llama (so it cannot rot), and its
pieces do what the docs say: the extracted LoRA at full rank is the full fine-tune."""

from __future__ import annotations

import json

import pytest

from conftest import load_benchmark

lowrank = load_benchmark("lowrank_experiment")


@pytest.mark.slow
def test_runs_at_toy_size(tiny_dir, tmp_path, capsys):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    # hidden size 32: r = 32 is full rank, so that extraction must reproduce the full fine-tune exactly
    assert lowrank.main(["--model", str(tiny_dir), "--ranks", "1,32", "--steps", "2", "--batch-size", "2",
                         "--n-train", "8", "--n-eval", "4", "--max-new-tokens", "4", "--full-lr", "1e-2",
                         "--json", str(out), "--plot", str(png)]) == 0
    res = json.loads(out.read_text())
    rows = {(x["kind"], x["r"]): x for x in res["rows"]}
    assert set(rows) == {("base", None), ("full", None), ("extracted", 1), ("extracted", 32), ("lora", 1),
                         ("lora", 32)}
    full, ext = rows[("full", None)], rows[("extracted", 32)]
    assert ext["energy_kept_min"] == pytest.approx(1.0, abs=1e-9)
    assert ext["loss"] == pytest.approx(full["loss"], rel=1e-4)
    assert rows[("extracted", 1)]["energy_kept_mean"] < 1
    assert full["loss"] != rows[("base", None)]["loss"]  # it trained
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
