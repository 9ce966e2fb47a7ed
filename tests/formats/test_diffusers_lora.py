"""diffusers' LoRA format (loratune.formats.diffusers), checked against diffusers' own loaders on a tiny
UNet2DConditionModel built from a config with random weights (no download): same UNet outputs both ways, fp32."""

from __future__ import annotations

import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convolutions: one thread is fastest

from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from loratune import AdapterFileError, LoraConfig, LoraTuneError, get_lora_model  # noqa: E402
from loratune.formats import diffusers as fd  # noqa: E402

TOL = 2e-5  # fp32; the two sides run the same products, in orders that may differ


def tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    """Two resolutions, cross-attention in both directions, ResNet convs with and without 1×1 shortcuts, a stride-2
    downsampler: every kind of module an SD UNet has LoRA on, at 8×8×4 latents."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8).eval()


def tiny_pipeline(unet: UNet2DConditionModel) -> StableDiffusionPipeline:
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    text = CLIPTextModel(CLIPTextConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                        num_hidden_layers=1, vocab_size=100, projection_dim=16))
    return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=None, unet=unet,
                                   scheduler=DDPMScheduler(clip_sample=False), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def inputs(seed: int = 1) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([17, 613]), torch.randn(2, 5, 16, generator=g))


def run(unet, args) -> torch.Tensor:
    with torch.no_grad():
        return unet(*args).sample


def lora_modules(unet) -> set[str]:
    """Module paths that carry a LoRA A factor in a PEFT-injected (diffusers) or loratune model."""
    found = set()
    for name, _ in unet.named_parameters():
        for marker in (".lora_A.", ".adapters."):
            if marker in name:
                found.add(name.split(marker)[0])
    return found


def random_adapter(unet, **kw):
    """A LoRA with random A and B (init_lora_weights=False): the UNet's output really changes."""
    cfg = fd.unet_lora_config(init_lora_weights=False, **kw)
    torch.manual_seed(3)
    return get_lora_model(unet, cfg)


@pytest.fixture(scope="module")
def args():
    return inputs()




def test_unet_lora_loads_in_diffusers_pipeline_with_the_same_outputs(tmp_path, args):
    """Attention, ResNet convs, a stride-2 downsampler and conv_in, with a rank and an alpha pattern and rsLoRA:
    pipe.load_lora_weights reads the file and its UNet gives loratune's outputs."""
    base = tiny_unet()
    reference = copy.deepcopy(base)
    lm = random_adapter(base, r=4, lora_alpha=6, conv=True, use_rslora=True,
                        extra_targets=["proj_in", "conv_in", "downsamplers.0.conv"],
                        rank_pattern={"conv_in": 2}, alpha_pattern={"to_k": 3.0})
    ours = run(lm, args)
    plain = run(reference, args)
    assert (ours - plain).abs().max() > 1e-2  # the adapter matters, so equality below means something

    path = fd.save_diffusers_lora(lm, tmp_path)
    assert path == tmp_path / fd.WEIGHT_NAME
    pipe = tiny_pipeline(reference)
    pipe.load_lora_weights(str(tmp_path), adapter_name="mine")
    assert lora_modules(pipe.unet) == lora_modules(lm.model)  # the same modules adapted, not more
    assert pipe.unet.peft_config["mine"].use_rslora
    torch.testing.assert_close(run(pipe.unet, args), ours, atol=TOL, rtol=0)


def test_component_file_loads_with_load_lora_adapter(tmp_path, args):
    """prefix=None writes UNet2DConditionModel.save_lora_adapter's layout (no "unet." prefix), which
    unet.load_lora_adapter(prefix=None) reads."""
    base = tiny_unet(seed=5)
    reference = copy.deepcopy(base)
    lm = random_adapter(base, r=3, lora_alpha=12)
    fd.save_diffusers_lora(lm, tmp_path, prefix=None, weight_name="unet_lora.safetensors")
    reference.load_lora_adapter(str(tmp_path), prefix=None, weight_name="unet_lora.safetensors")
    torch.testing.assert_close(run(reference, args), run(lm, args), atol=TOL, rtol=0)


def _diffusers_adapted(seed: int, alpha: float) -> UNet2DConditionModel:
    unet = tiny_unet(seed)
    torch.manual_seed(seed + 100)
    unet.add_adapter(peft.LoraConfig(r=4, lora_alpha=alpha, init_lora_weights=False,
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]))
    return unet


def _save_as_training_script(unet, directory, metadata: bool) -> None:
    """What diffusers' train_text_to_image_lora.py writes: its own key layout (to_q.lora.down.weight ...), through
    the pipeline's save_lora_weights."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    extra = {"unet_lora_adapter_metadata": unet.peft_config["default"].to_dict()} if metadata else {}
    StableDiffusionPipeline.save_lora_weights(str(directory), unet_lora_layers=layers, **extra)


def test_lora_saved_by_diffusers_loads_in_loratune(tmp_path, args):
    """The reverse direction: a file written by diffusers (its training script's key layout, with the config
    header) loaded by loratune gives the diffusers UNet's outputs."""
    source = _diffusers_adapted(seed=7, alpha=10)
    _save_as_training_script(source, tmp_path, metadata=True)
    expected = run(source, args)

    lm = fd.load_diffusers_lora(tiny_unet(seed=7), tmp_path)
    assert lm.peft_config["default"].lora_alpha == 10
    assert not any(p.requires_grad for p in lm.parameters())  # loaded for inference
    torch.testing.assert_close(run(lm, args), expected, atol=TOL, rtol=0)
    assert (expected - run(tiny_unet(seed=7), args)).abs().max() > 1e-2


def test_headerless_file_is_read_as_diffusers_reads_it(tmp_path, args):
    """Without the config header diffusers takes alpha = r; loratune does the same, so both give one output."""
    _save_as_training_script(_diffusers_adapted(seed=9, alpha=4), tmp_path, metadata=False)
    cfg, tensors = fd.read_diffusers_lora(tmp_path)
    assert (cfg.r, cfg.lora_alpha) == (4, 4)
    assert all(k.startswith("base_model.model.") and ".lora_" in k for k in tensors)

    pipe = tiny_pipeline(tiny_unet(seed=9))
    pipe.load_lora_weights(str(tmp_path))
    lm = fd.load_diffusers_lora(tiny_unet(seed=9), tmp_path / fd.WEIGHT_NAME)  # the file itself works too
    torch.testing.assert_close(run(lm, args), run(pipe.unet, args), atol=TOL, rtol=0)


def test_round_trip_through_loratune_keeps_ranks_and_alphas(tmp_path, args):
    lm = random_adapter(tiny_unet(seed=11), r=4, lora_alpha=8, conv=True, rank_pattern={"conv2": 2},
                        alpha_pattern={"to_v": 1.5})
    fd.save_diffusers_lora(lm, tmp_path)
    again = fd.load_diffusers_lora(tiny_unet(seed=11), tmp_path)
    layers = dict(again.lora_layers())
    assert {p: (m.adapters["default"].r, m.adapters["default"].lora_alpha) for p, m in layers.items()} == \
        {p: (m.adapters["default"].r, m.adapters["default"].lora_alpha) for p, m in lm.lora_layers()}
    torch.testing.assert_close(run(again, args), run(lm, args), atol=0, rtol=0)


def test_conv_lora_merge_equals_unmerged_on_the_unet(args):
    """Merged conv LoRA (3×3, 1×1 and stride 2) gives the unmerged outputs; unmerging restores the base exactly."""
    base = tiny_unet(seed=13)
    plain = run(base, args)
    lm = random_adapter(base, r=4, lora_alpha=4, conv=True, extra_targets=["downsamplers.0.conv", "conv_out"])
    unmerged = run(lm, args)
    lm.merge_adapter()
    torch.testing.assert_close(run(lm, args), unmerged, atol=1e-5, rtol=1e-5)
    lm.unmerge_adapter()
    with lm.disable_adapter():
        torch.testing.assert_close(run(lm, args), plain, atol=1e-6, rtol=1e-6)


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_modules_to_save_cannot_go_to_a_diffusers_file(tmp_path):
    lm = get_lora_model(tiny_unet(), LoraConfig(r=2, target_modules=["to_q"], modules_to_save=["conv_out"]))
    with pytest.raises(LoraTuneError) as e:
        fd.save_diffusers_lora(lm, tmp_path)
    assert "modules_to_save" in _one_line(e)
    assert not (tmp_path / fd.WEIGHT_NAME).exists()


def test_bad_files_are_one_line_errors(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(AdapterFileError) as e:
        fd.read_diffusers_lora(tmp_path)
    assert fd.WEIGHT_NAME in _one_line(e)
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 16, 1, 1)},
              str(tmp_path / fd.WEIGHT_NAME))
    with pytest.raises(AdapterFileError) as e:
        fd.read_diffusers_lora(tmp_path)
    assert "kohya" in _one_line(e)
    (tmp_path / "x.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterFileError):
        fd.read_diffusers_lora(tmp_path / "x.safetensors")


def test_a_file_for_another_unet_leaves_the_model_unchanged(tmp_path, args):
    lm = random_adapter(tiny_unet(), r=2, lora_alpha=2)
    fd.save_diffusers_lora(lm, tmp_path)
    other = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=4).eval()
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(AdapterFileError) as e:
        fd.load_diffusers_lora(other, tmp_path)
    assert "needs" in _one_line(e)
    assert other.state_dict().keys() == before.keys()
    assert all(torch.equal(other.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize("change", [{"use_dora": True}, {"init_lora_weights": "pissa"}])
def test_adapters_a_diffusers_file_cannot_carry_are_refused(tmp_path, change):
    """DoRA magnitudes are not written, and PiSSA-style inits change the base itself: refused, nothing written.
    (The config is swapped after injection so that the check is tested apart from those variants' own code.)"""
    import dataclasses

    lm = get_lora_model(tiny_unet(), LoraConfig(r=2, target_modules=["to_q"]))
    lm.peft_config["default"] = dataclasses.replace(lm.peft_config["default"], **change)
    with pytest.raises(LoraTuneError) as e:
        fd.save_diffusers_lora(lm, tmp_path)
    assert "plain LoRA" in _one_line(e)
    assert not (tmp_path / fd.WEIGHT_NAME).exists()
