"""A LoRA for a diffusers UNet, trained with loratune on the noise-prediction loss, saved in diffusers' format and
loaded back by diffusers itself. Offline: the UNet is tiny and built from a config (random weights), the "images" are
a handful of generated 16×16 pictures of one concept (a coloured disc on a plain background), and the "prompt" is a
fixed random embedding standing in for a text encoder's output.

    pip install diffusers                       # the UNet, the DDPM scheduler and the loader checked against
    python3 examples/diffusers_lora.py --out runs/unet-lora

Prints the held-out noise-prediction loss (fixed noise and timesteps) before and after training and the training
loss curve's first and last steps, writes ``pytorch_lora_weights.safetensors`` to --out, loads it into a fresh copy
of the base UNet with ``UNet2DConditionModel.load_lora_adapter`` and prints the largest difference between that
UNet's outputs and loratune's. The same loop runs on a real Stable Diffusion UNet (latents from its VAE, embeddings
from its text encoder) with only the model loading changed.
"""

from __future__ import annotations

import argparse
import copy
import math
import tempfile
import time

import torch
import torch.nn.functional as F

from loratune.formats.diffusers import load_diffusers_lora, save_diffusers_lora, unet_lora_config

SIZE, CHANNELS, CROSS_DIM, PROMPT_TOKENS = 16, 3, 32, 4


def tiny_unet(seed: int = 0):
    """A two-level UNet2DConditionModel on 16×16 RGB pixels (no VAE), cross-attention on a 32-wide prompt."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=SIZE, in_channels=CHANNELS, out_channels=CHANNELS, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=CROSS_DIM, attention_head_dim=8,
        norm_num_groups=8)


def make_images(n: int = 8, seed: int = 0) -> torch.Tensor:
    """``n`` pictures of the concept: a warm-coloured disc of random centre and radius on a dark plain background,
    (n, 3, 16, 16) in [-1, 1] as diffusion models take them."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(SIZE, dtype=torch.float32), torch.arange(SIZE, dtype=torch.float32),
                            indexing="ij")
    out = []
    for _ in range(n):
        cy, cx = (torch.rand(2, generator=g) * 8 + 4).tolist()
        radius = float(torch.rand(1, generator=g)) * 3 + 3
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2).float()
        colour = torch.tensor([0.9, 0.3 + 0.4 * float(torch.rand(1, generator=g)), 0.1])
        background = torch.full((3,), -0.8) + 0.2 * torch.rand(3, generator=g)
        img = background[:, None, None] * (1 - disc) + (colour * 2 - 1)[:, None, None] * disc
        out.append(img)
    return torch.stack(out)


def noise_loss(unet, scheduler, images, prompt, noise, timesteps) -> torch.Tensor:
    """DDPM's objective: predict the noise added at each timestep (MSE)."""
    noisy = scheduler.add_noise(images, noise, timesteps)
    pred = unet(noisy, timesteps, prompt.expand(len(images), -1, -1)).sample
    return F.mse_loss(pred, noise)


def train(steps: int = 40, r: int = 8, lr: float = 2e-3, batch: int = 8, seed: int = 0, out: str | None = None,
          log_every: int = 10) -> dict:
    """Train a LoRA (attention + ResNet convs + conv_in/conv_out) on the generated images; the figures as a dict.
    ``out``: where to save the diffusers file (default: a temporary directory, removed afterwards)."""
    from diffusers import DDPMScheduler

    from loratune import get_lora_model

    t0 = time.perf_counter()
    scheduler = DDPMScheduler(num_train_timesteps=1000, clip_sample=False)
    images = make_images(batch, seed)
    g = torch.Generator().manual_seed(seed + 1)
    prompt = torch.randn(1, PROMPT_TOKENS, CROSS_DIM, generator=g)  # "a photo of sks disc", as an embedding
    held_noise = torch.randn(4 * batch, CHANNELS, SIZE, SIZE, generator=g)  # held-out draws: fixed noise and steps
    held_t = torch.linspace(50, 950, 4 * batch).long()
    held_images = images.repeat(4, 1, 1, 1)

    base = tiny_unet(seed).eval()
    fresh = copy.deepcopy(base)  # what diffusers will load the file into
    lm = get_lora_model(base, unet_lora_config(r=r, lora_alpha=r, conv=True, extra_targets=["conv_in", "conv_out"]))
    params = [p for p in lm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def held_out() -> float:
        with torch.no_grad():
            return noise_loss(lm, scheduler, held_images, prompt, held_noise, held_t).item()

    before = held_out()
    zero = held_noise.pow(2).mean().item()  # the loss of predicting no noise at all: what "learned something" beats
    curve = []
    lm.train()
    for step in range(steps):
        noise = torch.randn(images.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(images),), generator=g)
        loss = noise_loss(lm, scheduler, images, prompt, noise, t)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        curve.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1:3d}  loss {sum(curve[-log_every:]) / log_every:.4f}")
    lm.eval()
    after = held_out()
    trainable, total = lm.get_nb_trainable_parameters()

    with tempfile.TemporaryDirectory() as tmp:
        directory = out or tmp
        path = save_diffusers_lora(lm, directory)
        fresh.load_lora_adapter(directory, prefix="unet", use_safetensors=True)  # diffusers' own loader
        back = load_diffusers_lora(tiny_unet(seed).eval(), directory)  # and loratune's
        x = scheduler.add_noise(held_images[:4], held_noise[:4], held_t[:4])
        with torch.no_grad():
            ours = lm(x, held_t[:4], prompt.expand(4, -1, -1)).sample
            theirs = fresh(x, held_t[:4], prompt.expand(4, -1, -1)).sample
            again = back(x, held_t[:4], prompt.expand(4, -1, -1)).sample
    k = max(1, min(5, steps // 4))
    return {"held_out_before": before, "held_out_after": after, "held_out_zero": zero,
            "train_first": sum(curve[:k]) / k, "train_last": sum(curve[-k:]) / k, "curve": curve,
            "trainable": trainable, "total": total,
            "diffusers_max_abs_diff": (ours - theirs).abs().max().item(),
            "reload_max_abs_diff": (ours - again).abs().max().item(), "file": str(path) if out else None,
            "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="directory for pytorch_lora_weights.safetensors (default: a temporary one)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)  # a tiny UNet: one thread is as fast, and many times faster on a busy machine
    res = train(a.steps, a.r, a.lr, seed=a.seed, out=a.out)
    k = max(1, min(5, a.steps // 4))
    print(f"held-out noise-prediction loss: {res['held_out_before']:.4f} -> {res['held_out_after']:.4f} "
          f"({res['held_out_after'] / res['held_out_before'] - 1:+.1%}; predicting no noise: "
          f"{res['held_out_zero']:.4f}); training loss, mean of the first / last {k} steps: "
          f"{res['train_first']:.4f} -> {res['train_last']:.4f}")
    print(f"LoRA r={a.r}: {res['trainable']:,} trainable of {res['total']:,} parameters "
          f"({100 * res['trainable'] / res['total']:.2f}%); {a.steps} steps in {res['seconds']:.1f} s")
    print(f"diffusers' load_lora_adapter vs loratune: max |output difference| {res['diffusers_max_abs_diff']:.2e}; "
          f"reloaded by loratune: {res['reload_max_abs_diff']:.2e}" + (f"; saved {res['file']}" if res["file"] else ""))
    if not math.isfinite(res["held_out_after"]):
        raise SystemExit("training diverged (non-finite loss); lower --lr")
    return res


if __name__ == "__main__":
    main()
