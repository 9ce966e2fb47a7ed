"""The compile-step benchmark refuses bad arguments at once, with one line, and its ratio is the median of the
within-repeat ratios."""

from __future__ import annotations

import pytest

from conftest import load_benchmark

compile_step = load_benchmark("compile_step")


@pytest.mark.parametrize("argv, says", [
    (["--configs", "nope"], "invalid choice: 'nope'"),
    (["--repeats", "0"], "--repeats must be at least 1"),
    (["--json", "/nonexistent-dir/out.json"], "its directory does not exist"),
    (["--model", "/nonexistent-model-dir"], "--model: model '/nonexistent-model-dir' not found"),
])
def test_bad_arguments_are_one_line_errors(argv, says, capsys, monkeypatch):
    monkeypatch.setattr(compile_step, "bench", lambda *a: pytest.fail("ran a benchmark"))
    with pytest.raises(SystemExit) as e:
        compile_step.main(argv)
    assert e.value.code == 2
    assert says in capsys.readouterr().err


def test_the_ratio_is_paired_within_repeats():
    # compiled [1, 4, 3], eager [2, 2, 3]: within-repeat ratios 0.5, 2, 1 -> median 1 (the ratio of medians is 1.5)
    median, quartiles = compile_step.paired([1.0, 4.0, 3.0], [2.0, 2.0, 3.0])
    assert median == pytest.approx(1.0)
    assert quartiles == pytest.approx([0.75, 1.5])
