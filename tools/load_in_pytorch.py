#!/usr/bin/env python3
"""Load a model `svp export --format safetensors` wrote into PyTorch, and
predict the test images of an IDX data folder (or of svp's embedded subset).

The file's metadata says the architecture (svp's [model] table), the image
shape and the preprocessing; this builds the matching nn.Sequential, or for
a vision transformer a module with timm's VisionTransformer names (svp's
canonical layouts: see crates/svp-model/src/pytorch.rs), loads the state
dict strictly, and prints one line per image: index, predicted class. With
--accuracy it prints the test accuracy instead.

    pip install torch safetensors
    svp export model.svpm --format safetensors --out model.safetensors
    python3 tools/load_in_pytorch.py model.safetensors [--data DIR] [--accuracy]
"""
import argparse
import gzip
import json
import os
import struct

import torch
from safetensors import safe_open
from safetensors.torch import load_file

EMBEDDED = os.path.join(os.path.dirname(__file__), "..", "crates", "svp-data", "embedded")


def idx(folder, stem):
    for name in (stem + ".gz", stem):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            opener = gzip.open if name.endswith(".gz") else open
            with opener(path, "rb") as f:
                data = f.read()
            dims = data[3]
            shape = struct.unpack(">" + "I" * dims, data[4 : 4 + 4 * dims])
            return torch.frombuffer(bytearray(data[4 + 4 * dims :]), dtype=torch.uint8).reshape(shape)
    raise SystemExit("no %s in %s" % (stem, folder))


class Attention(torch.nn.Module):
    """timm's multi-head self-attention: queries, keys and values from one
    Linear, each head a slice of dim/heads."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-2, -1) / (d // self.heads) ** 0.5, dim=-1)
        return self.proj((a @ v).transpose(1, 2).reshape(b, n, d))


class Block(torch.nn.Module):
    """timm's pre-norm block: x + attn(norm1(x)), then + mlp(norm2(x))."""

    def __init__(self, dim, heads, hidden, eps):
        super().__init__()
        self.norm1 = torch.nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads)
        self.norm2 = torch.nn.LayerNorm(dim, eps=eps)
        self.mlp = torch.nn.Module()
        self.mlp.fc1, self.mlp.fc2 = torch.nn.Linear(dim, hidden), torch.nn.Linear(hidden, dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp.fc2(torch.nn.functional.gelu(self.mlp.fc1(self.norm2(x))))


class ViT(torch.nn.Module):
    """timm's VisionTransformer with a class token, under its names."""

    def __init__(self, vit, image, classes):
        super().__init__()
        dim, patch, eps = vit["dim"], vit["patch"], vit.get("norm_eps", 1e-5)
        tokens = (image[0] // patch) * (image[1] // patch) + 1
        self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = torch.nn.Parameter(torch.zeros(1, tokens, dim))
        self.patch_embed = torch.nn.Module()
        self.patch_embed.proj = torch.nn.Conv2d(1, dim, patch, stride=patch)
        self.blocks = torch.nn.ModuleList(Block(dim, vit["heads"], vit["mlp"], eps) for _ in range(vit["depth"]))
        self.norm = torch.nn.LayerNorm(dim, eps=eps)
        self.head = torch.nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


def build(model, image, classes):
    """svp's canonical nn.Sequential for a [model] table, or its ViT."""
    if model.get("vit"):
        return ViT(model["vit"], image, classes)
    layers, channels, (h, w) = [], 1, image
    blocks = []
    for item in model.get("conv", []):
        if item == "M":
            blocks[-1][1] = True
        else:
            blocks.append([item, False])
    for out, pool in blocks:
        layers += [torch.nn.Conv2d(channels, out, 3, padding=1), torch.nn.BatchNorm2d(out), torch.nn.ReLU()]
        if pool:
            layers.append(torch.nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        channels = out
    layers.append(torch.nn.Flatten())
    width = channels * h * w
    act = {"relu": torch.nn.ReLU, "gelu": torch.nn.GELU}[model.get("activation", "relu")]
    for hidden in model["hidden"]:
        layers.append(torch.nn.Linear(width, hidden))
        if model.get("norm", "layernorm") == "layernorm":
            layers.append(torch.nn.LayerNorm(hidden))
        layers.append(act())
        if model.get("dropout", 0.0) > 0:
            layers.append(torch.nn.Dropout(model["dropout"]))
        width = hidden
    layers.append(torch.nn.Linear(width, classes))
    return torch.nn.Sequential(*layers)


def main():
    a = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a.add_argument("weights")
    a.add_argument("--data", default=EMBEDDED, help="IDX folder (default: svp's embedded subset)")
    a.add_argument("--accuracy", action="store_true")
    args = a.parse_args()
    with safe_open(args.weights, "pt") as f:
        meta = f.metadata()
    model = json.loads(meta["svp.model"])
    image = tuple(int(v) for v in meta["svp.image_shape"].split("x"))
    classes = len(json.loads(meta["svp.class_names"]))
    net = build(model, image, classes)
    net.load_state_dict(load_file(args.weights), strict=False)
    missing = [k for k in net.state_dict() if not k.endswith("num_batches_tracked") and k not in load_file(args.weights)]
    if missing:
        raise SystemExit("tensors missing from the file: %s" % ", ".join(missing))
    net.eval()
    mean, std = float(meta["svp.input_mean"]), float(meta["svp.input_std"])
    x = ((idx(args.data, "t10k-images-idx3-ubyte").to(torch.float32) / 255.0 - mean) / std).unsqueeze(1)
    with torch.no_grad():
        predicted = net(x).argmax(1)
    if args.accuracy:
        labels = idx(args.data, "t10k-labels-idx1-ubyte").long()
        print("%.4f" % (predicted == labels).float().mean().item())
    else:
        for i, c in enumerate(predicted.tolist()):
            print("%d\t%d" % (i, c))


if __name__ == "__main__":
    main()
