"""The combine, analyze, extract and resize commands (cli/compose.py), run through their own parser: outputs in
PEFT format, the --out rules, and bad input as one-line LoraTuneErrors."""

from __future__ import annotations

import argparse
import json

import pytest
from compose_fixtures import (
    adapters_of,
    deltas,
    max_rel,
    model_with,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

from loratune import LoraConfig
from loratune.cli import compose as cli
from loratune.compose import combine_adapters, load_adapter
from loratune.compose.io import MARKER
from loratune.errors import LoraTuneError

pytestmark = pytest.mark.usefixtures("one_thread")


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="loratune")
    sub = parser.add_subparsers(dest="command", required=True)
    cli.add_parsers(sub)
    args = parser.parse_args([str(a) for a in argv])
    return cli.COMMAND_FUNCTIONS[args.command](args)


@pytest.fixture(scope="module")
def saved(tiny_dir, tmp_path_factory):
    """Two adapters of the tiny model saved as `loratune train` would (one with a system-prompt file beside it)."""
    d = tmp_path_factory.mktemp("adapters")
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], base_model_name_or_path=str(tiny_dir))
    lm = model_with(base, {"default": cfg, "b": cfg})
    lm.save_pretrained(d / "a", selected_adapters=["default"])
    lm.save_pretrained(d / "bb", selected_adapters=["b"])
    (d / "a" / "loratune_prompt.json").write_text('{"system_prompt": "be brief"}')
    return d / "a", d / "bb" / "b", adapters_of(lm, ["default", "b"]), lm


def test_combine(saved, tmp_path, capsys):
    a, b, adapters, _ = saved
    out = tmp_path / "mix"
    assert run("combine", "--adapter", a, "--adapter", b, "--weights", "0.7,0.3", "--method", "ties",
               "--density", "0.5", "--out", out) == 0
    assert "combined adapter written to" in capsys.readouterr().out
    expect, _ = combine_adapters(adapters, [0.7, 0.3], "ties", density=0.5)
    assert max_rel(deltas(load_adapter(out)), deltas(expect)) < 1e-6
    assert (out / "loratune_prompt.json").read_text() == '{"system_prompt": "be brief"}'
    assert json.loads((out / MARKER).read_text())["method"] == "ties"
    # an earlier compose output may be replaced; the default weights are equal
    assert run("combine", "--adapter", a, "--adapter", b, "--method", "cat", "--out", out, "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["weights"] == [0.5, 0.5] and set(report["ranks"].values()) == {8}


def test_out_rules(saved, tmp_path):
    a, b, _, _ = saved
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(LoraTuneError, match="--overwrite") as e:
        run("combine", "--adapter", a, "--adapter", b, "--out", foreign)
    assert (foreign / "notes.txt").read_text() == "keep me" and "\n" not in str(e.value)
    run("combine", "--adapter", a, "--adapter", b, "--out", foreign, "--overwrite")
    assert not (foreign / "notes.txt").exists() and (foreign / "adapter_model.safetensors").is_file()
    with pytest.raises(LoraTuneError, match="must not be replaced"):
        run("combine", "--adapter", a, "--adapter", b, "--out", a)
    with pytest.raises(LoraTuneError, match="is a file"):
        run("combine", "--adapter", a, "--adapter", b, "--out", foreign / "adapter_model.safetensors")


def test_combine_bad_input(saved, tmp_path):
    a, b, _, _ = saved
    for extra, match in ((["--weights", "0.7;0.3"], "comma-separated"), (["--weights", "1"], "one weight per"),
                         (["--method", "dare_ties", "--density", "2"], r"\(0, 1\]"),
                         (["--method", "dare_ties"], "needs density")):
        with pytest.raises(LoraTuneError, match=match):
            run("combine", "--adapter", a, "--adapter", b, "--out", tmp_path / "x", *extra)
    with pytest.raises(LoraTuneError, match="does not exist"):
        run("combine", "--adapter", a, "--adapter", tmp_path / "nope", "--out", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_analyze(saved, tiny_dir, tmp_path, capsys):
    a, _, adapters, _ = saved
    assert run("analyze", "--adapter", a, "--plot", tmp_path / "s.png") == 0
    text = capsys.readouterr().out
    assert "recommended r =" in text and (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    assert run("analyze", "--adapter", a, "--base", tiny_dir, "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["modules"]) == 4 and all(m["relative_norm"] > 0 for m in report["modules"])
    with pytest.raises(LoraTuneError, match="is a directory"):
        run("analyze", "--adapter", a, "--plot", tmp_path)


def test_resize(saved, tmp_path, capsys):
    a, _, adapters, _ = saved
    assert run("resize", "--adapter", a, "--r", "6", "--out", tmp_path / "r6") == 0
    assert max_rel(deltas(load_adapter(tmp_path / "r6")), deltas(adapters[0])) < 1e-6
    assert run("resize", "--adapter", a, "--r", "2", "--rank-pattern", '{"v_proj": 1}', "--out", tmp_path / "r2") == 0
    small = load_adapter(tmp_path / "r2")
    assert small.config.r == 2 and small.config.alpha_pattern == {}
    ranks = {k.split(".")[-3]: v.shape[0] for k, v in small.tensors.items() if k.endswith("lora_A.weight")}
    assert ranks == {"q_proj": 2, "v_proj": 1}  # each module's rank in rank_pattern, by its full path
    with pytest.raises(LoraTuneError, match="rank-pattern"):
        run("resize", "--adapter", a, "--r", "2", "--rank-pattern", "v_proj=1", "--out", tmp_path / "r3")


def test_extract(saved, tiny_dir, tmp_path, capsys):
    import copy

    _, _, adapters, lm = saved
    merged_dir = tmp_path / "merged"
    lm = copy.deepcopy(lm)
    merged = lm.merge_and_unload(adapter_names=["default"])
    merged.save_pretrained(merged_dir)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(merged_dir)
    assert run("extract", "--base", tiny_dir, "--tuned", merged_dir, "--r", "4", "--out", tmp_path / "x") == 0
    out = load_adapter(tmp_path / "x")
    assert max_rel(deltas(out), deltas(adapters[0])) < 1e-4
    assert out.config.base_model_name_or_path and (tmp_path / "x" / "tokenizer_config.json").is_file()
    assert "4 modules extracted" in capsys.readouterr().out
    with pytest.raises(LoraTuneError, match="no targeted module differs"):
        run("extract", "--base", tiny_dir, "--tuned", tiny_dir, "--r", "4", "--out", tmp_path / "y")
    assert not (tmp_path / "y").exists()


def test_through_the_loratune_command(saved, tmp_path, capsys):
    """The commands are registered in `loratune` itself; bad input is one line on stderr and exit code 2."""
    from loratune.cli import main

    a, b, adapters, _ = saved
    out = tmp_path / "via-main"
    assert main(["combine", "--adapter", str(a), "--adapter", str(b), "--weights", "0.7,0.3", "--method", "ties",
                 "--density", "0.5", "--out", str(out)]) == 0
    expect, _ = combine_adapters(adapters, [0.7, 0.3], "ties", density=0.5)
    assert max_rel(deltas(load_adapter(out)), deltas(expect)) < 1e-6
    capsys.readouterr()
    for argv, says in ((["combine", "--adapter", str(a), "--adapter", str(b), "--weights", "1", "--out",
                         str(tmp_path / "x")], "1 weight(s) for 2 adapter(s)"),
                       (["combine", "--adapter", str(a), "--adapter", str(b), "--method", "ties", "--density", "0",
                         "--out", str(tmp_path / "x")], "density must be in (0, 1]"),
                       (["combine", "--adapter", str(a), "--adapter", str(b), "--svd-rank", "99", "--out",
                         str(tmp_path / "x")], "svd_rank=99 is more than module"),
                       (["resize", "--adapter", str(a), "--r", "99", "--out", str(tmp_path / "x")], "rank 99 is more")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert says in err and "\n" not in err and "Traceback" not in err, err
    assert not (tmp_path / "x").exists()
