"""The train-step benchmark refuses bad arguments at once, with one line, before loading any model."""

from __future__ import annotations

import pytest

from conftest import load_benchmark

train_step = load_benchmark("train_step")


@pytest.mark.parametrize("argv, says", [
    (["--configs", "nope"], "invalid choice: 'nope'"),
    (["--repeats", "0"], "--repeats must be at least 1"),
    (["--json", "/nonexistent-dir/out.json"], "its directory does not exist"),
    (["--malloc", "fast"], "invalid choice: 'fast'"),
    (["--device", "nope"], "--device nope: not a device name"),
    (["--dtype", "int8"], "invalid choice: 'int8'"),
    (["--inner", "0"], "--inner must be at least 1"),
    (["--model", "/nonexistent-model-dir", "--random-weights"], "--model: model '/nonexistent-model-dir' not found"),
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


def test_the_routed_floor_computes_what_the_floor_does():
    """floor_onednn (the frozen model on loratune's kernels) must be the same function with the same input
    gradient, or loratune/floor_onednn would compare different work."""
    import torch

    from conftest import rel_err, tiny_llama

    plain, routed = tiny_llama(), train_step.route_frozen_linears(tiny_llama())
    kinds = {name: type(m) for name, m in routed.named_modules()}
    assert kinds["model.layers.0.self_attn.q_proj"] is train_step._RoutedFrozenLinear
    assert kinds["lm_head"] is torch.nn.Linear  # loratune's loss makes the logits itself
    only = train_step.route_frozen_linears(tiny_llama(), {"model.layers.1.mlp.up_proj"})
    assert [n for n, m in only.named_modules() if type(m) is train_step._RoutedFrozenLinear] == [
        "model.layers.1.mlp.up_proj"]
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    grads = []
    for model in (plain, routed):
        model.requires_grad_(False)
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        loss = model(inputs_embeds=embeds, labels=ids).loss
        loss.backward()
        grads.append((loss, embeds.grad))
    assert rel_err(grads[1][0], grads[0][0]) <= 1e-5 and rel_err(grads[1][1], grads[0][1]) <= 1e-5


def test_on_route_runs_on_the_named_library_and_restores_the_default():
    """loratune_onednn / loratune_mkl are loratune's step on one library each; the other contestants keep the
    CPU's default, so the switch must not outlive the call."""
    from loratune.ops import gemm

    before = gemm.routing_on()
    seen = {r: train_step.on_route(gemm.routing_on, r)() for r in ("onednn", "mkl")}
    assert seen == {"onednn": gemm.onednn_available(), "mkl": False}
    assert gemm.routing_on() is before
    assert {train_step.default_route(), train_step.other_route()} == {"onednn", "mkl"}


def test_a_model_folder_with_a_broken_config_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(SystemExit) as e:
        train_step.main(["--model", str(tmp_path), "--random-weights"])
    assert e.value.code == 2 and "its config.json cannot be read" in capsys.readouterr().err


def test_a_gpu_that_is_not_there_is_a_one_line_error(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit):
        train_step.main(["--device", "cuda"])
    assert "sees no CUDA GPU" in capsys.readouterr().err


def test_peak_memory_counts_what_loratune_keeps_between_steps(monkeypatch):
    """The step whose peak is measured must allocate loratune's kept buffers (the last input's x*mask, the loss's
    chunk buffer) itself: kept from an earlier step they would be missing from its peak."""
    import torch

    from loratune import ops

    released = []
    monkeypatch.setattr(ops, "clear_mask_cache", lambda: released.append("mask"))
    monkeypatch.setattr(ops, "release_workspace", lambda: released.append("loss"))
    seen = []
    batch = (torch.zeros(1, 2, dtype=torch.long),)
    train_step.peak_step_memory_mb(lambda model, b: seen.append(list(released)), torch.nn.Linear(2, 2), batch)
    assert seen == [["mask", "loss"]]


@pytest.mark.parametrize("dtype, grad_tol", [("float32", 1e-4), ("bfloat16", 5e-2)])
def test_a_whole_run_on_a_tiny_random_model(dtype, grad_tol, tmp_path, capsys):
    """The benchmark end to end (--model DIR --random-weights, as on a GPU machine, here on the CPU): every
    contestant runs, loratune's A/B gradients equal PEFT's without dropout, and the JSON says what ran."""
    import json

    from conftest import tiny_llama

    tiny_llama().config.save_pretrained(tmp_path)
    out = tmp_path / "out.json"
    argv = ["--model", str(tmp_path), "--random-weights", "--dtype", dtype, "--batch", "2", "--seq", "8",
            "--repeats", "2", "--inner", "2", "--mem-batch", "2", "--mem-seq", "8", "--json", str(out),
            "--configs", "all-linear r16 dropout0.05", "q,v r8 dropout0"]
    assert train_step.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["dtype"] == dtype and report["random_weights"] and report["inner"] == 2
    for r in report["results"]:
        assert r["grad_rel_diff_vs_peft"] <= grad_tol and r["loss_diff_vs_peft"] <= 10 * grad_tol
        if dtype == "float32":
            assert "loratune_vs_fp32" not in r
        else:  # both against the same models in fp32: loratune's rounding is no worse than PEFT's, give or take
            ours, theirs = r["loratune_vs_fp32"], r["peft_vs_fp32"]
            assert 0 < ours["grad_rel_err_max"] <= 3 * theirs["grad_rel_err_max"] <= 0.3
        kernels = set(train_step.KERNEL_CONTESTANTS)  # each compiled kernel's worth, timed and measured
        assert {"floor", "floor_chunked", "floor_onednn", "loratune", "peft"} | kernels <= set(r["median_s"])
        assert all(f"loratune_over_{k}" in r for k in kernels)
        assert all(len(v) == 2 and min(v) > 0 for v in r["all_s"].values())
        assert set(r["peak_mb"]) == {"floor", "floor_chunked", "loratune", "peft"} | kernels
    assert set(report["inference"]) == {"all-linear r16 dropout0.05", "q,v r8 dropout0"}
    assert "lt/floor" in capsys.readouterr().out


def test_the_device_check_compares_with_float64():
    """benchmarks/check_fused_device.py (run on a GPU machine) computes real errors: small where the arithmetic is
    right, large where it is not."""
    import torch

    check = load_benchmark("check_fused_device")
    small = dict(tokens=64, n_in=32, n_out=48, r=4)
    fp32 = check.check("cpu", torch.float32, 0.05, seed=0, **small)
    bf16 = check.check("cpu", torch.bfloat16, 0.05, seed=0, **small)
    assert max(fp32.values()) <= 1e-5 and max(bf16["grad_A"], bf16["grad_B"]) <= 1e-5
    assert 1e-4 < bf16["out"] <= torch.finfo(torch.bfloat16).eps  # the output really is bf16
