"""Tiny models from transformers configs with random weights: fast, offline, deterministic."""

from __future__ import annotations

import contextlib
import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest
import torch
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from loratune import settings
from loratune.models import resolve_model_path


def load_benchmark(name: str) -> ModuleType:
    """benchmarks/<name>.py as a module (the benchmarks are scripts, not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(seed: int = 0, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert_cls(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=96, max_position_embeddings=64, num_labels=3)
    return BertForSequenceClassification(cfg).eval()


class TinyConvNet(torch.nn.Module):
    """A small CNN with a 3×3 and a 1×1 Conv2d, a Conv1d and a Linear head."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 8, 1)
        self.conv3 = torch.nn.Conv1d(8, 4, 3, stride=2)
        self.head = torch.nn.Linear(4 * 7, 5)

    def forward(self, x):
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))  # (b, 8, 16, 16)
        h = self.conv3(h.mean(-1))  # (b, 4, 7)
        return self.head(h.flatten(1))


def ids(batch: int = 2, seq: int = 8, seed: int = 1, vocab: int = 128) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def gpt2():
    return tiny_gpt2()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer (and chat template), saved as an HF folder."""
    d = tmp_path_factory.mktemp("tiny-model")
    tok = AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m-instruct"))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def save_tiny_bert(d: Path, hidden: int = 32, heads: int = 2, dropout: float = 0.1) -> Path:
    """A tiny random BERT encoder (2 layers, no head) with MiniLM's tokenizer, saved as an HF folder in ``d``."""
    tok = AutoTokenizer.from_pretrained(resolve_model_path("all-minilm-l6-v2"))
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=heads,
                         intermediate_size=2 * hidden, max_position_embeddings=64, hidden_dropout_prob=dropout,
                         attention_probs_dropout_prob=dropout)).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def data_files(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("data")
    rows = [{"prompt": f"What is {i} plus {i + 1}?", "completion": str(2 * i + 1)} for i in range(40)]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:32]))
    (d / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[32:]))
    return d / "train.jsonl", d / "eval.jsonl"


@pytest.fixture
def configure():
    """Change loratune's settings for the rest of one test: ``configure(cache=tmp_path, cc="/bin/false")``."""
    with contextlib.ExitStack() as stack:
        yield lambda **changes: stack.enter_context(settings.override(**changes))


@pytest.fixture(params=["onednn", "torch"])
def gemm_route(request, monkeypatch):
    """Run a test with the products on oneDNN and again on torch.mm (ops/gemm.py): both must be exact."""
    from loratune.ops import gemm

    monkeypatch.setattr(gemm, "MIN_MACS", 0)  # the tests' tiny products would otherwise stay on torch.mm
    with settings.override(onednn=request.param == "onednn"):
        yield request.param


@pytest.fixture(scope="module")
def one_thread():
    """Run a test module on one torch thread (``pytestmark = pytest.mark.usefixtures("one_thread")``): small LAPACK
    calls and tiny convolutions on two threads of a loaded 2-core machine spin many times longer than on one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
