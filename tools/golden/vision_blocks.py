#!/usr/bin/env python3
"""Golden values for svp's vision blocks, from PyTorch's own modules.

* A transformer block, pre-norm, with torch.nn.MultiheadAttention (so svp's
  q/k/v layout and head split are checked against PyTorch's convention), its
  LayerNorms and an exact-GELU MLP: the output for a batch of token
  sequences, and the gradients of sum(output * probe) for every parameter and
  the input.
* A conv block in training mode, Conv2d(3x3, padding 1) -> BatchNorm2d (batch
  statistics) -> ReLU -> MaxPool2d(2): the output, the gradients of
  sum(output * probe), and the running statistics after the step.

Parameters are written flat in svp's layout, so the test feeds them straight
to svp's blocks.

    pip install torch
    python3 tools/golden/vision_blocks.py > tests/golden/vision_blocks.json

tests/golden.rs reads the JSON; the tests never need PyTorch.
"""
import json
import sys

import torch

f64 = torch.float64


def flat(*tensors):
    return [float(v) for t in tensors for v in t.detach().reshape(-1)]


def transformer(rows=3, tokens=5, dim=8, heads=2, mlp=12):
    ln1, ln2 = torch.nn.LayerNorm(dim, dtype=f64), torch.nn.LayerNorm(dim, dtype=f64)
    attn = torch.nn.MultiheadAttention(dim, heads, batch_first=True, dtype=f64)
    fc1, fc2 = torch.nn.Linear(dim, mlp, dtype=f64), torch.nn.Linear(mlp, dim, dtype=f64)
    with torch.no_grad():
        for p in [*ln1.parameters(), *ln2.parameters(), *attn.parameters(), *fc1.parameters(), *fc2.parameters()]:
            p.copy_(torch.randn_like(p) * 0.5)
    x = torch.randn(rows, tokens, dim, dtype=f64, requires_grad=True)
    probe = torch.randn(rows, tokens, dim, dtype=f64)
    h = ln1(x)
    x1 = x + attn(h, h, h, need_weights=False)[0]
    out = x1 + fc2(torch.nn.functional.gelu(fc1(ln2(x1))))
    (out * probe).sum().backward()
    # svp's layout: ln1 gain, bias; Wqkv (3d x d), bqkv; Wo, bo; ln2 gain, bias; W1, b1; W2, b2.
    order = [ln1.weight, ln1.bias, attn.in_proj_weight, attn.in_proj_bias, attn.out_proj.weight, attn.out_proj.bias,
             ln2.weight, ln2.bias, fc1.weight, fc1.bias, fc2.weight, fc2.bias]
    return {
        "rows": rows, "tokens": tokens, "dim": dim, "heads": heads, "mlp": mlp,
        "params": flat(*order), "x": flat(x), "probe": flat(probe), "out": flat(out),
        "grad": flat(*[p.grad for p in order]), "dx": flat(x.grad),
    }


def conv_block(rows=4, c_in=2, h=6, w=6, c_out=3):
    conv = torch.nn.Conv2d(c_in, c_out, 3, padding=1, dtype=f64)
    bn = torch.nn.BatchNorm2d(c_out, dtype=f64)
    with torch.no_grad():
        for p in conv.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
        bn.weight.copy_(1.0 + 0.3 * torch.randn_like(bn.weight))
        bn.bias.copy_(0.3 * torch.randn_like(bn.bias))
        bn.running_mean.copy_(0.1 * torch.randn_like(bn.running_mean))
        bn.running_var.copy_(1.0 + 0.1 * torch.rand_like(bn.running_var))
    before = flat(conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
    bn.train()
    x = torch.randn(rows, c_in, h, w, dtype=f64, requires_grad=True)
    out = torch.nn.functional.max_pool2d(torch.relu(bn(conv(x))), 2)
    probe = torch.randn_like(out)
    (out * probe).sum().backward()
    return {
        "rows": rows, "in_channels": c_in, "h": h, "w": w, "out_channels": c_out,
        "params": before, "x": flat(x), "probe": flat(probe), "out": flat(out),
        "grad": flat(conv.weight.grad, conv.bias.grad, bn.weight.grad, bn.bias.grad),
        "dx": flat(x.grad), "running_after": flat(bn.running_mean, bn.running_var),
    }


def main():
    torch.manual_seed(3)
    json.dump(
        {
            "about": "tools/golden/vision_blocks.py, PyTorch %s, float64" % torch.__version__,
            "transformer": transformer(),
            "conv_block": conv_block(),
        },
        sys.stdout,
    )
    print()


if __name__ == "__main__":
    main()
