"""The ``serve`` subcommand's parser and server construction (without starting uvicorn)."""

from __future__ import annotations

import argparse

import pytest
from serving_fixtures import make_adapters

from loratune.cli.serve import add_parser, build_server
from loratune.errors import LoraTuneError


def _parse(argv):
    p = argparse.ArgumentParser(prog="loratune")
    add_parser(p.add_subparsers(dest="command"))
    return p.parse_args(argv)


def test_parser_and_build(tiny_dir, tmp_path):
    root = make_adapters(tiny_dir, tmp_path / "a", names=("alpha",))
    args = _parse(["serve", "--model", str(tiny_dir), "--adapters", str(root), "--adapter", f"extra={root / 'alpha'}",
                   "--max-loras", "2", "--max-cpu-loras", "4", "--port", "0"])
    assert args.adapter == [("extra", str(root / "alpha"))] and args.max_loras == 2
    server = build_server(args)
    assert server.registry.names() == ["alpha", "extra"] and server.registry.max_cpu_loras == 4
    assert server.design == "v3" and server.scheduler.loader is not None and server.scheduler.loader.workers == 1
    args = _parse(["serve", "--model", str(tiny_dir), "--adapters", str(root), "--adapter-loaders", "0"])
    assert build_server(args).scheduler.loader is None  # read on the scheduler's thread, as the second design
    with pytest.raises(SystemExit):
        _parse(["serve", "--adapter-loaders", "-1"])
    with pytest.raises(SystemExit):
        _parse(["serve", "--max-loras", "0"])
    with pytest.raises(SystemExit):
        _parse(["serve", "--adapter", "no-equals-sign"])
    with pytest.raises(LoraTuneError, match="not a directory"):
        build_server(_parse(["serve", "--model", str(tiny_dir), "--adapters", str(tmp_path / "missing")]))


def test_an_adapter_root_without_adapters_is_noted_and_served(tiny_dir, tmp_path, monkeypatch, capsys):
    import uvicorn

    from loratune.cli.serve import cmd_serve

    ran = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: ran.append(kw))
    (tmp_path / "empty").mkdir()
    assert cmd_serve(_parse(["serve", "--model", str(tiny_dir), "--adapters", str(tmp_path / "empty")])) == 0
    out = capsys.readouterr()
    assert ran and "with 0 adapter(s)" in out.out
    assert "note: no adapter under" in out.err and "/v1/load_lora_adapter" in out.err
    root = make_adapters(tiny_dir, tmp_path / "a", names=("alpha",))
    assert cmd_serve(_parse(["serve", "--model", str(tiny_dir), "--adapters", str(root)])) == 0
    assert "note" not in capsys.readouterr().err
