"""Nothing at run time touches the network: every data format read and prepared, a tiny run trained and
evaluated through the CLI, with every socket connection and name lookup refused (and recorded)."""

from __future__ import annotations

import json
import socket
import urllib.request

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from loratune.cli import main
from loratune.data import DataConfig, prepare


@pytest.fixture
def offline(monkeypatch):
    """Refuse every connection and name lookup; the attempts, which the test and the teardown require empty."""
    attempts: list[str] = []

    def refuse(what: str, *args):
        attempts.append(f"{what}{args[:2]!r}")
        raise OSError(f"the network is off in this test ({what})")

    def loopback(address) -> bool:
        """This machine's own sockets (a Unix path, 127.0.0.1, ::1): local IPC, such as a tracker's service that
        an earlier test left running, not the network."""
        host = address if isinstance(address, (str, bytes)) else address[0]
        return isinstance(address, (str, bytes)) or host in ("127.0.0.1", "::1", "localhost")

    connect, connect_ex, create = socket.socket.connect, socket.socket.connect_ex, socket.create_connection
    monkeypatch.setattr(socket.socket, "connect", lambda self, address: connect(self, address) if loopback(address)
                        else refuse("connect", address))
    monkeypatch.setattr(socket.socket, "connect_ex", lambda self, address: connect_ex(self, address)
                        if loopback(address) else refuse("connect_ex", address))
    monkeypatch.setattr(socket, "create_connection", lambda address, *a, **k: create(address, *a, **k)
                        if loopback(address) else refuse("create_connection", address))
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: refuse("getaddrinfo", *a))
    yield attempts
    assert not attempts, f"something tried the network: {attempts}"


def test_the_block_catches_an_http_request(offline):
    with pytest.raises(OSError):
        urllib.request.urlopen("http://example.com", timeout=5)
    assert offline and offline[0].startswith(("create_connection", "getaddrinfo"))
    offline.clear()


def make_rows(start: int, n: int) -> list[dict[str, str]]:
    return [{"prompt": f"What is {i} plus {i + 1}?", "completion": str(2 * i + 1)} for i in range(start, start + n)]


ROWS, HELD_OUT = make_rows(0, 12), make_rows(100, 4)


def write_all_formats(d, rows: list[dict[str, str]] = ROWS, stem: str = "data") -> dict[str, str]:
    """The same rows as .jsonl, .json (messages), .csv and .parquet."""
    files = {fmt: d / f"{stem}.{fmt}" for fmt in ("jsonl", "json", "csv", "parquet")}
    files["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    files["json"].write_text(json.dumps([{"messages": [{"role": "user", "content": r["prompt"]},
                                                       {"role": "assistant", "content": r["completion"]}]}
                                         for r in rows]))
    files["csv"].write_text("prompt,completion\n" + "".join(f'"{r["prompt"]}",{r["completion"]}\n' for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), files["parquet"])
    return {fmt: str(f) for fmt, f in files.items()}


def test_every_format_is_read_and_prepared_offline(offline, tmp_path):
    from transformers import AutoTokenizer

    from loratune.models import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m-instruct"))
    files = write_all_formats(tmp_path)
    prepared = {fmt: prepare(DataConfig(train=f, max_seq_len=64), tok) for fmt, f in files.items()}
    assert {fmt: p.format for fmt, p in prepared.items()} == {"jsonl": "prompt_completion", "json": "messages",
                                                              "csv": "prompt_completion",
                                                              "parquet": "prompt_completion"}
    ids = {fmt: [e.input_ids for e in p.train] for fmt, p in prepared.items()}
    assert len(ids["jsonl"]) == len(ROWS) and all(v == ids["jsonl"] for v in ids.values())  # the same examples
    assert offline == []


def test_train_and_eval_run_offline(offline, tiny_dir, tmp_path, capsys):
    files, held_out = write_all_formats(tmp_path), write_all_formats(tmp_path, HELD_OUT, "held-out")
    config = tmp_path / "run.yaml"
    config.write_text("train:\n  seed: 0\n")
    out = tmp_path / "run"
    assert main(["train", str(config), f"model={tiny_dir}", f"data.train={files['parquet']}",
                 f"data.eval={held_out['csv']}", f"output_dir={out}", "train.max_steps=2", "train.batch_size=4",
                 "lora.r=4", "data.max_seq_len=64", "--no-progress"]) == 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    capsys.readouterr()
    assert main(["eval", "--adapter", str(out / "adapter"), "--data", held_out["json"], "--max-new-tokens", "2",
                 "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["adapter"]["n"] == len(HELD_OUT)
    assert offline == []
