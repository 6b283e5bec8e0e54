#!/usr/bin/env python3
"""PyTorch's backprop training step on svp's vision architectures, timed.

The networks are those of models/cnn-fmnist.toml, models/vit-fmnist.toml and
models/mobilenet-fmnist.toml, built from PyTorch's own layers: the same
shapes, layer kinds and arithmetic (conv 3x3 + BatchNorm + ReLU blocks with
2x2 max pooling and a linear head; a pre-norm ViT with patch 7, width 128, 6
blocks of 4 heads and a GELU MLP of 256, LayerNorm of the class token, a
linear head; a conv stem and MobileNetV2 inverted residual blocks with a
linear head), trained with the configs' optimizers (Adam 1e-3; AdamW 1e-3,
weight decay 0.05) on random 28x28 inputs
at batch 128. Only the step is timed (forward, loss, backward, optimizer),
after warm-up steps; the fastest of several rounds is reported, as svp's
step_profile does, because the hosts are shared.

    python3 tools/torch_vision_bench.py cnn --threads 2 --steps 20 --rounds 3

prints one JSON line: {"net", "threads", "batch", "ms_per_step", "samples_per_s"}.
tools/vision_side_by_side.py runs it alternately with svp's own runs.
"""

import argparse
import json
import time

import torch
from torch import nn


def cnn():
    layers, c = [], 1
    for item in [32, 32, "M", 64, 64, "M", 128, 128, "M"]:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(c, item, 3, padding=1), nn.BatchNorm2d(item), nn.ReLU()]
            c = item
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(128 * 3 * 3, 10))


class InvertedResidual(nn.Module):
    """MobileNetV2's block as svp's MobileBlock: 1x1 expand + BN + ReLU6 (none
    at expansion 1), depthwise 3x3 + BN + ReLU6, 1x1 project + BN, the input
    added back at stride 1 with equal channels. Convolutions keep their bias,
    as svp's do."""

    def __init__(self, c_in, c_out, expansion, stride):
        super().__init__()
        hidden = c_in * expansion
        layers = []
        if expansion != 1:
            layers += [nn.Conv2d(c_in, hidden, 1), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden),
                   nn.BatchNorm2d(hidden), nn.ReLU6(),
                   nn.Conv2d(hidden, c_out, 1), nn.BatchNorm2d(c_out)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        y = self.body(x)
        return x + y if self.residual else y


# models/mobilenet-fmnist.toml: a conv [16] stem, then (channels, expansion, stride).
MOBILE_STEM = 16
MOBILE_BLOCKS = [(16, 1, 1), (24, 6, 2), (24, 6, 1), (32, 6, 2), (32, 6, 1), (64, 6, 1)]


def mobilenet():
    layers = [nn.Conv2d(1, MOBILE_STEM, 3, padding=1), nn.BatchNorm2d(MOBILE_STEM), nn.ReLU()]
    c, side = MOBILE_STEM, 28
    for channels, expansion, stride in MOBILE_BLOCKS:
        layers.append(InvertedResidual(c, channels, expansion, stride))
        c, side = channels, (side - 1) // stride + 1
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(c * side * side, 10))


class Block(nn.Module):
    """x1 = x + Attn(LN1(x)); out = x1 + W2 GELU(W1 LN2(x1))."""

    def __init__(self, dim, heads, mlp):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class ViT(nn.Module):
    def __init__(self, patch=7, dim=128, depth=6, heads=4, mlp=256, classes=10):
        super().__init__()
        tokens = (28 // patch) ** 2
        self.patch = patch
        self.embed = nn.Linear(patch * patch, dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        p = self.patch
        b = x.shape[0]
        x = x.unfold(2, p, p).unfold(3, p, p).reshape(b, -1, p * p)
        x = torch.cat([self.cls.expand(b, -1, -1), self.embed(x)], dim=1) + self.pos
        x = self.blocks(x)
        return self.head(self.norm(x[:, 0]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("net", choices=["cnn", "vit", "mobilenet"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20, help="steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(1)
    model = {"cnn": cnn, "vit": ViT, "mobilenet": mobilenet}[args.net]()
    if args.net != "vit":
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    x = torch.randn(args.batch, 1, 28, 28)
    y = torch.randint(0, 10, (args.batch,))
    loss_fn = nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    model.train()
    for _ in range(3):
        step()
    best = float("inf")
    for _ in range(args.rounds):
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        best = min(best, (time.perf_counter() - start) / args.steps)
    print(json.dumps({
        "net": args.net,
        "threads": args.threads,
        "batch": args.batch,
        "ms_per_step": round(best * 1e3, 3),
        "samples_per_s": round(args.batch / best, 1),
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
