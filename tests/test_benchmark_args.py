"""The train-step benchmark refuses bad arguments at once, with one line, before loading any model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "train_step", Path(__file__).resolve().parents[1] / "benchmarks" / "train_step.py")
train_step = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_step)


@pytest.mark.parametrize("argv, says", [
    (["--configs", "nope"], "invalid choice: 'nope'"),
    (["--repeats", "0"], "--repeats must be at least 1"),
    (["--json", "/nonexistent-dir/out.json"], "its directory does not exist"),
    (["--malloc", "fast"], "invalid choice: 'fast'"),
])
def test_bad_arguments_are_one_line_errors(argv, says, capsys, monkeypatch):
    monkeypatch.setattr(train_step, "bench_config", lambda *a: pytest.fail("ran a benchmark"))
    with pytest.raises(SystemExit) as e:
        train_step.main(argv)
    assert e.value.code == 2
    assert says in capsys.readouterr().err


@pytest.mark.bundled
def test_contestants_share_one_copy_of_the_weights():
    """The benchmark's models run on the same weight storage (placement alone moved timings by up to 15 %)."""
    floor, other = train_step.base_models(2)
    pairs = list(zip(floor.named_parameters(), other.named_parameters(), strict=True))
    assert pairs and all(p.data_ptr() == q.data_ptr() for (_, p), (_, q) in pairs)
    assert not any(p.requires_grad for p in floor.parameters())


def test_paired_ratio_and_its_quartiles():
    a, b = [2.0, 3.0, 4.0, 10.0, 6.0], [1.0, 1.0, 2.0, 5.0, 1.0]  # per-repeat ratios 2, 3, 2, 2, 6
    assert train_step.paired_ratio(a, b) == 2.0
    assert train_step.ratio_spread(a, b) == [2.0, 3.0]
    assert train_step.ratio_spread([3.0], [2.0]) == [1.5, 1.5]  # one repeat: no spread to show
