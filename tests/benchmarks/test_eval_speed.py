"""benchmarks/eval_speed.py at toy size: the three paths run, give the same answers, and the report is written."""

from __future__ import annotations

import json

from conftest import load_benchmark

eval_speed = load_benchmark("eval_speed")


def test_eval_speed_runs_at_toy_size(tiny_dir, tmp_path, capsys):
    out = tmp_path / "res.json"
    assert eval_speed.main(["--model", str(tiny_dir), "--rows", "6", "--batch-size", "4", "--max-new-tokens", "4",
                            "--r", "2", "--repeats", "1", "--warmup", "0", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["rows"] == 6 and set(res["median_s"]) == {"exact_match", "merged_generate", "unmerged_exact_match"}
    assert res["answers_equal_to_merged_generate"] and res["answers_equal_unmerged"]
    assert res["ratio_exact_match_vs_merged_generate"] > 0
    assert "target ≤ 1.1" in capsys.readouterr().out
