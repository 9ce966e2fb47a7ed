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
