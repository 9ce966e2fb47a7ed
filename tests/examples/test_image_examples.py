"""The image examples, run small: the digits CNN adapted by Conv2d LoRA really improves on shifted digits (and its
merged net equals the unmerged one); the diffusers LoRA loop lowers the held-out noise-prediction loss and its file
loads in diffusers with the same outputs."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")  # the examples' own setting: tiny convolutions

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module




@pytest.mark.slow
def test_digits_conv_lora_improves_accuracy_on_rotated_digits():
    pytest.importorskip("sklearn")
    ex = load_example("digits_conv_lora")
    res = ex.run(shift="rotate", r=4, epochs=5, adapt_epochs=5, width=16, full=False, seed=0)
    assert res["base_plain"] > 0.9  # the base learned the digits
    assert res["base_shifted"] < 0.4  # and the shift breaks it
    # LoRA on the convolutions alone wins back a large part (10 classes: chance is 0.1)
    assert res["lora_shifted"] > res["base_shifted"] + 0.25, res
    assert res["lora_disabled_plain"] == res["base_plain"]  # the base weights were not touched
    assert res["merge_max_abs_diff"] < 1e-4 and res["merged_shifted"] == res["lora_shifted"]
    assert res["lora_params"] == 2084 and res["share"] < 0.12  # A (4,cin,3,3) + B (cout,4,1,1) per conv


def test_digits_example_prints_its_table(capsys, monkeypatch):
    """main() wires the flags to run() and prints every row (run() stubbed: the figures are tested above)."""
    ex = load_example("digits_conv_lora")
    seen = {}

    def fake_run(*args, **kwargs):
        seen.update(args=args, kwargs=kwargs)
        return {"base_plain": 0.97, "base_shifted": 0.2, "full_params": 100, "lora_plain": 0.5, "lora_shifted": 0.9,
                "lora_params": 10, "share": 0.1, "full_plain": 0.5, "full_shifted": 0.95, "full_trainable": 100,
                "merge_max_abs_diff": 1e-6, "merged_shifted": 0.9, "seconds": 1.0}

    monkeypatch.setattr(ex, "run", fake_run)
    ex.main(["--shift", "invert", "--r", "2", "--lr", "0.01", "--no-full"])
    out = capsys.readouterr().out
    assert seen["args"][:2] == ("invert", 2) and seen["kwargs"]["lora_lr"] == 0.01 and seen["kwargs"]["full"] is False
    assert "inverted" in out and "LoRA r=2" in out and "full fine-tuning" in out


@pytest.mark.slow
def test_diffusers_lora_example_lowers_the_loss_and_loads_in_diffusers(tmp_path):
    pytest.importorskip("diffusers")
    ex = load_example("diffusers_lora")
    res = ex.train(steps=12, r=4, lr=2e-3, seed=0, out=str(tmp_path), log_every=0)
    assert all(math.isfinite(v) for v in res["curve"])
    assert res["held_out_after"] < 0.9 * res["held_out_before"], res  # same noise and timesteps before and after
    assert res["diffusers_max_abs_diff"] < 1e-5 and res["reload_max_abs_diff"] < 1e-5
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()
