"""benchmarks/serving.py runs end to end at a tiny size (so it cannot rot), and refuses bad arguments in one line."""

from __future__ import annotations

import json

import pytest

from conftest import load_benchmark

serving = load_benchmark("serving")


@pytest.mark.parametrize("argv, says", [
    (["--parts", "nope"], "--parts: unknown ['nope']"),
    (["--scenarios", "7"], "--scenarios: choose from"),
    (["--shapes", "4by4"], "--shapes is ROWSxTOKENS"),
    (["--clients", "0"], "--clients must be at least 1"),
])
def test_bad_arguments_are_one_line_errors(argv, says, capsys, monkeypatch):
    monkeypatch.setattr(serving, "make_adapters", lambda *a: pytest.fail("made adapters"))
    with pytest.raises(SystemExit) as e:
        serving.main(argv)
    assert e.value.code == 2
    assert says in capsys.readouterr().err


@pytest.mark.slow
def test_tiny_run_measures_every_part(tiny_dir, tmp_path):
    out = tmp_path / "serving.json"
    assert serving.main(["--model", str(tiny_dir), "--rank", "4", "--shapes", "4x3", "--adapters", "1,3",
                         "--repeats", "1", "--requests", "6", "--clients", "3", "--max-tokens", "3",
                         "--scenarios", "8,sequential", "--designs", "v1,v2", "--max-loras", "4",
                         "--max-cpu-loras", "4",
                         "--work", str(tmp_path / "work"), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    forward = result["forward"]
    assert [(r["rows"], r["tokens"], r["adapters"]) for r in forward] == [(4, 3, 1), (4, 3, 3)]
    for r in forward:
        assert set(r["ms"]) == {"base", "floor", "peft", "mixed", "v1"} and all(v > 0 for v in r["ms"].values())
        assert r["peft_vs_mixed_rel_err"] < 1e-5  # PEFT's mixed batch and loratune's compute the same function
        assert r["v1_vs_mixed_rel_err"] < 1e-5  # and so do the first design's paths
    assert result["swap"]["load_ms"] > 0 and result["swap"]["swap_ms"] > 0
    assert [r["design"] for r in result["load"]] == ["v1", "v2", "v2", "v1"]  # the order alternates
    load = {(r["scenario"], r["design"]): r for r in result["load"]}
    assert set(load) == {(s, d) for s in ("8 adapters", "sequential") for d in ("v1", "v2")}
    for r in load.values():
        assert r["sent"] == r["ok"] == 6 and r["errors"] == 0 and r["differ_from_offline"] == 0
        assert r["req_per_s"] > 0 and r["p99_ms"] >= r["p50_ms"] > 0 and r["tokens"] > 0
    eight = [load["8 adapters", d]["adapter_loads"] for d in ("v1", "v2")]
    assert eight == [6, 6]  # six requests over six of the eight adapters, each read once
