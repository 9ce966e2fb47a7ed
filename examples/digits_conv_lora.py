"""Conv2d LoRA on a real (small) task, no downloads: a CNN learns scikit-learn's bundled 8×8 digits, then LoRA on its
three convolutions adapts it to rotated digits (90°, or inverted with --shift invert); full fine-tuning of the same
net on the same data is the yardstick.

    python3 examples/digits_conv_lora.py                      # rotated digits, r=4
    python3 examples/digits_conv_lora.py --shift invert --save runs/digits-lora

Prints held-out accuracy of the base on plain and shifted digits, after LoRA and after full fine-tuning, the
trainable parameters of each, and checks that the merged LoRA net gives the unmerged one's logits. Everything is
seeded: the same command prints the same numbers on the same machine.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

from loratune import LoraConfig, get_lora_model

SHIFTS = {
    "rotate": lambda x: torch.rot90(x, 1, (2, 3)),  # a quarter turn: the strokes move, the base misreads them
    "invert": lambda x: 1.0 - x,  # white digits become black on white
}
SHIFTED = {"rotate": "rotated", "invert": "inverted"}


class SmallCNN(nn.Module):
    """Three 3×3 convolutions (SiLU, one 2×2 pool) and a linear head: ~66k parameters at width 32."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.head = nn.Linear(2 * width * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.conv1(x))
        x = F.max_pool2d(F.silu(self.conv2(x)), 2)
        return self.head(F.silu(self.conv3(x)).flatten(1))


def load_digits_split(seed: int = 0, n_train: int = 1200) -> tuple[torch.Tensor, ...]:
    """scikit-learn's 1,797 bundled 8×8 digits, scaled to [0, 1], as (N, 1, 8, 8): a seeded train/held-out split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    tr, te = perm[:n_train], perm[n_train:]
    return x[tr], y[tr], x[te], y[te]


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, seed: int = 0,
          batch_size: int = 64) -> None:
    """Adam on the parameters that require grad (all of a plain net; only the adapters of a LoRA one), gradients
    clipped at norm 1; the model ends in eval mode."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(batch_size):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
    model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (model(x).argmax(1) == y).float().mean().item()


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def run(shift: str = "rotate", r: int = 4, epochs: int = 10, adapt_epochs: int = 10, width: int = 32,
        lora_lr: float = 3e-3, full_lr: float = 1e-3, seed: int = 0, full: bool = True,
        save: str | None = None) -> dict:
    """Train the base, adapt it with Conv2d LoRA (and, if ``full``, fine-tune a copy in full); the figures as a
    dict. ``save``: write the adapter there (PEFT format)."""
    torch.manual_seed(seed)
    x_tr, y_tr, x_te, y_te = load_digits_split(seed)
    s_tr, s_te = SHIFTS[shift](x_tr), SHIFTS[shift](x_te)
    t0 = time.perf_counter()
    base = SmallCNN(width)
    train(base, x_tr, y_tr, epochs, 3e-3, seed)
    out = {"base_plain": accuracy(base, x_te, y_te), "base_shifted": accuracy(base, s_te, y_te),
           "full_params": sum(p.numel() for p in base.parameters())}

    lm = get_lora_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=2 * r, target_modules=["conv1", "conv2",
                                                                                               "conv3"]))
    train(lm, s_tr, y_tr, adapt_epochs, lora_lr, seed + 1)
    with torch.no_grad():
        unmerged = lm(s_te)
        with lm.disable_adapter():
            out["lora_disabled_plain"] = accuracy(lm, x_te, y_te)  # the base is untouched under the adapter
    out.update(lora_shifted=accuracy(lm, s_te, y_te), lora_plain=accuracy(lm, x_te, y_te),
               lora_params=trainable(lm))
    if save:
        lm.save_pretrained(save)
    merged = lm.merge_and_unload()
    with torch.no_grad():
        out["merge_max_abs_diff"] = (merged(s_te) - unmerged).abs().max().item()
    out["merged_shifted"] = accuracy(merged, s_te, y_te)

    if full:
        ft = copy.deepcopy(base)
        train(ft, s_tr, y_tr, adapt_epochs, full_lr, seed + 1)
        out.update(full_shifted=accuracy(ft, s_te, y_te), full_plain=accuracy(ft, x_te, y_te),
                   full_trainable=trainable(ft))
    out["share"] = out["lora_params"] / out["full_params"]
    out["seconds"] = time.perf_counter() - t0
    return out


def report(res: dict, shift: str, r: int) -> str:
    rows = [f"held-out digits: accuracy on plain / {SHIFTED[shift]} ones",
            f"  base CNN                   {res['base_plain']:6.1%} / {res['base_shifted']:6.1%}   "
            f"({res['full_params']:,} params)",
            f"  + Conv2d LoRA r={r:<2}         {res['lora_plain']:6.1%} / {res['lora_shifted']:6.1%}   "
            f"({res['lora_params']:,} trainable = {res['share']:.1%} of full fine-tuning)"]
    if "full_shifted" in res:
        rows.append(f"  full fine-tuning           {res['full_plain']:6.1%} / {res['full_shifted']:6.1%}   "
                    f"({res['full_trainable']:,} trainable)")
    rows.append(f"  merged LoRA: max |logit difference| vs unmerged = {res['merge_max_abs_diff']:.2e}, "
                f"accuracy {res['merged_shifted']:.1%}; {res['seconds']:.1f} s in all")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shift", choices=sorted(SHIFTS), default="rotate")
    ap.add_argument("--r", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=10, help="base training epochs")
    ap.add_argument("--adapt-epochs", type=int, default=10)
    ap.add_argument("--lr", type=float, default=3e-3, help="LoRA learning rate")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-full", action="store_true", help="skip the full fine-tuning comparison")
    ap.add_argument("--save", help="write the LoRA adapter here (PEFT format)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)  # tiny convolutions: one thread is fastest, and much faster on a busy machine
    res = run(a.shift, a.r, a.epochs, a.adapt_epochs, lora_lr=a.lr, seed=a.seed, full=not a.no_full, save=a.save)
    print(report(res, a.shift, a.r))
    return res


if __name__ == "__main__":
    main()
