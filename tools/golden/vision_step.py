#!/usr/bin/env python3
"""Golden values for one SVP+ step of a small ViT and of a small CNN, from PyTorch.

The networks are svp's, built from PyTorch's own pieces in float64:

* ViT: a patch embedding (a stride-p Conv2d, class token first, learned
  positions), pre-norm transformer blocks (torch.nn.MultiheadAttention,
  LayerNorm, exact GELU), LayerNorm of the class token, a linear head.
* CNN: conv blocks Conv2d(3x3, padding 1) -> BatchNorm2d (batch statistics,
  running statistics updated) -> ReLU [-> MaxPool2d(2)], a linear head.

The parameters are random (drawn here in float32, so svp starts from the
same values exactly) and written flat in svp's layout; the projections R_l
and their dropout masks come from the seed through tools/rng_reference.py,
as in svp_step.py. One step of blockwise SVP (SVP+) then runs as svp's
`units()` groups the layers: backprop inside a unit, the local loss
CE(v) + lambda * FA(v, sg(v_prev)) on the unit's output read out (the class
token, or a 2x2 adaptive average pooling) and projected by R_l; the first
target is R_0 x. Every layer's gradient, its parameters after the optimizer
step (AdamW for the ViT, Adam for the CNN; BatchNorm's running statistics
included) and each unit's losses are written, and the head's loss over three
steps.

    pip install torch
    python3 tools/golden/vision_step.py vit > tests/golden/vit_svp_plus_step.json
    python3 tools/golden/vision_step.py cnn > tests/golden/cnn_svp_plus_step.json

tests/golden.rs reads the JSON; the tests never need PyTorch.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from svp_step import fa_loss, flat, projection_of, write_fixture  # noqa: E402

f32, f64 = torch.float32, torch.float64
F = torch.nn.functional

SEED = 7
ROWS, CLASSES, DPRIME = 4, 3, 3
LAMBDA, PROJ_DROPOUT = 1.0, 0.25
STEPS = 3


def param(*shape, scale=0.5, offset=0.0):
    """A random float32 parameter, held in float64 for the computation."""
    return (offset + scale * torch.randn(*shape, dtype=f32)).to(f64).requires_grad_()


class PatchEmbed:
    def __init__(self, h, w, p, dim):
        self.p, self.h, self.w = p, h, w
        self.params = [param(dim, 1 * p * p), param(dim), param(dim, scale=0.1), param((h // p) * (w // p) + 1, dim, scale=0.1)]

    def __call__(self, x):
        w, b, cls, pos = self.params
        img = x.reshape(-1, 1, self.h, self.w)
        patches = F.conv2d(img, w.reshape(-1, 1, self.p, self.p), b, stride=self.p).flatten(2).transpose(1, 2)
        tokens = torch.cat([cls.expand(img.shape[0], 1, -1), patches], dim=1)
        return tokens + pos


class Block:
    def __init__(self, dim, heads, mlp):
        self.heads = heads
        self.params = [
            param(dim, scale=0.1, offset=1.0), param(dim, scale=0.1),  # ln1
            param(3 * dim, dim), param(3 * dim, scale=0.1),  # Wqkv, bqkv
            param(dim, dim), param(dim, scale=0.1),  # Wo, bo
            param(dim, scale=0.1, offset=1.0), param(dim, scale=0.1),  # ln2
            param(mlp, dim), param(mlp, scale=0.1),  # W1, b1
            param(dim, mlp, scale=0.3), param(dim, scale=0.1),  # W2, b2
        ]

    def __call__(self, x):
        g1, c1, wqkv, bqkv, wo, bo, g2, c2, w1, b1, w2, b2 = self.params
        d = x.shape[-1]
        h = F.layer_norm(x, (d,), g1, c1, eps=1e-5)
        attn = F.multi_head_attention_forward(
            h.transpose(0, 1), h.transpose(0, 1), h.transpose(0, 1), d, self.heads, wqkv, bqkv,
            None, None, False, 0.0, wo, bo, training=True, need_weights=False,
        )[0].transpose(0, 1)
        x1 = x + attn
        return x1 + F.linear(F.gelu(F.linear(F.layer_norm(x1, (d,), g2, c2, eps=1e-5), w1, b1)), w2, b2)


class TokenHead:
    def __init__(self, dim):
        self.params = [param(dim, scale=0.1, offset=1.0), param(dim, scale=0.1)]

    def __call__(self, x):
        return F.layer_norm(x[:, 0, :], (x.shape[-1],), *self.params, eps=1e-5)


class ConvBlock:
    def __init__(self, c_in, c_out, pool):
        self.pool = pool
        self.params = [param(c_out, c_in, 3, 3), param(c_out, scale=0.1), param(c_out, scale=0.2, offset=1.0), param(c_out, scale=0.2)]
        self.running = [(0.1 * torch.randn(c_out, dtype=f32)).to(f64), (1.0 + 0.1 * torch.rand(c_out, dtype=f32)).to(f64)]

    def __call__(self, x):
        w, b, gamma, beta = self.params
        z = F.batch_norm(F.conv2d(x, w, b, padding=1), *self.running, gamma, beta, training=True, momentum=0.1, eps=1e-5)
        z = torch.relu(z)
        return F.max_pool2d(z, 2) if self.pool else z

    def state(self):
        return self.params + self.running


class Linear:
    def __init__(self, d_in, d_out):
        self.params = [param(d_out, d_in), param(d_out, scale=0.1)]

    def __call__(self, x):
        return F.linear(x.flatten(1), *self.params)


def token_readout(h):
    return h[:, 0, :]


def pool_readout(h):
    return F.adaptive_avg_pool2d(h, (min(2, h.shape[2]), min(2, h.shape[3]))).flatten(1)


def vit():
    """4x4 images, 2x2 patches (5 tokens), width 8, 2 heads, MLP 12, depth 4,
    units of 2 blocks: [patch, block, block], [block, block], [token head, head]."""
    h = w = 4
    layers = [PatchEmbed(h, w, 2, 8)] + [Block(8, 2, 12) for _ in range(4)] + [TokenHead(8), Linear(8, CLASSES)]
    units = [([0, 1, 2], token_readout), ([3, 4], token_readout), ([5, 6], None)]
    config = {"kind": "vit", "image": [h, w], "patch": 2, "dim": 8, "depth": 4, "heads": 2, "mlp": 12}
    opt = {"kind": "adamw", "lr": 1e-2, "weight_decay": 0.05}
    return layers, units, config, opt, h * w


def cnn():
    """8x8 images, conv [2, 3, "M", 4, "M"], readout 2x2, units of 2 blocks:
    [conv 2, conv 3 + pool], [conv 4 + pool], [head]."""
    h = w = 8
    layers = [ConvBlock(1, 2, False), ConvBlock(2, 3, True), ConvBlock(3, 4, True), Linear(4 * 2 * 2, CLASSES)]
    units = [([0, 1], pool_readout), ([2], pool_readout), ([3], None)]
    config = {"kind": "cnn", "image": [h, w], "conv": [2, 3, "M", 4, "M"], "conv_readout": 2}
    opt = {"kind": "adam", "lr": 1e-2, "weight_decay": 0.0}
    return layers, units, config, opt, h * w


def optimizer(params, opt):
    if opt["kind"] == "adamw":
        return torch.optim.AdamW(params, lr=opt["lr"], betas=(0.9, 0.999), eps=1e-8, weight_decay=opt["weight_decay"])
    return torch.optim.Adam(params, lr=opt["lr"], betas=(0.9, 0.999), eps=1e-8)


def state(layer):
    return layer.state() if isinstance(layer, ConvBlock) else layer.params


def projection(layer, width, step):
    return projection_of(SEED, layer, width, DPRIME, PROJ_DROPOUT, step).to(f64)


def step(layers, units, opts, x, y, t, record):
    """One SVP+ step; appends each layer's gradient and state after the update to `record`."""
    pixels = x.flatten(1)
    v_prev = (pixels @ projection(0, pixels.shape[1], None).t()).detach()
    h = x
    ce = None
    for members, readout in units:
        for l in members:
            for p in layers[l].params:
                p.grad = None
        out = h
        for l in members:
            out = layers[l](out)
        if readout is None:
            v = out
        else:
            read = readout(out)
            v = read @ projection(members[-1] + 1, read.shape[1], t).t()
        ce = F.cross_entropy(v, y)
        fa = fa_loss(v, v_prev)
        (ce + LAMBDA * fa).backward()
        for l in members:
            opts[l].step()
            if record is not None:
                last = l == members[-1]
                record.append({
                    "ce": float(ce.detach()) if last else None,
                    "fa": float(fa.detach()) if last else None,
                    "grad": flat([p.grad for p in layers[l].params]),
                    "params_after": flat(state(layers[l])),
                })
        v_prev = v.detach()
        h = out.detach()
    return float(ce.detach())


def main():
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("network", choices=["vit", "cnn"])
    a = args.parse_args()
    torch.manual_seed(11)
    layers, units, config, opt, input_len = vit() if a.network == "vit" else cnn()
    h, w = config["image"]
    x32 = torch.randn(ROWS, input_len, dtype=f32)
    x = x32.to(f64).reshape(ROWS, 1, h, w)
    y = torch.tensor([i % CLASSES for i in range(ROWS)])
    params_before = [flat(state(layer)) for layer in layers]
    opts = [optimizer(layer.params, opt) for layer in layers]
    record = []
    losses = [step(layers, units, opts, x, y, t, record if t == 0 else None) for t in range(STEPS)]
    write_fixture(
        {
            "about": "one SVP+ step, from tools/golden/vision_step.py %s (PyTorch %s, float64)" % (a.network, torch.__version__),
            "seed": SEED,
            "model": config,
            "classes": CLASSES,
            "projection_dim": DPRIME,
            "lambda": LAMBDA,
            "projection_dropout": PROJ_DROPOUT,
            "layers_per_unit": 2,
            "optimizer": opt,
            "units": [members for members, _ in units],
        },
        x32, y, params_before, record, losses,
    )


if __name__ == "__main__":
    main()
