#!/usr/bin/env python3
"""PyTorch models for `svp import`'s golden test.

Builds two networks of svp's layer kinds as plain nn.Sequential models (an
MLP: Flatten, Linear, LayerNorm, ReLU, ..., Linear; a small CNN: Conv2d,
BatchNorm2d, ReLU, MaxPool2d, ..., Flatten, Linear) and a small timm
VisionTransformer as timm makes it (patch 7, width 32, 2 blocks of 2 heads,
MLP 64, class token, LayerNorm epsilon 1e-6), trains each
for one epoch on the Fashion-MNIST subset embedded in svp
(crates/svp-data/embedded) with the preprocessing x = (pixel/255 - mean)/std,
and writes

* crates/svp-model/tests/fixtures/torch-{mlp,cnn,vit}.safetensors: the state dicts;
* crates/svp-model/tests/fixtures/torch-import.json: the preprocessing, the
  logits of the first 8 embedded test images and the test accuracy on the
  1,000 embedded test images, per model, in eval mode.

    pip install torch safetensors timm
    python3 tools/golden/import_models.py

crates/svp-model/tests/import.rs reads them; the tests never need PyTorch.
"""
import gzip
import json
import os
import struct

import torch
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
EMBEDDED = os.path.join(ROOT, "crates", "svp-data", "embedded")
OUT = os.path.join(ROOT, "crates", "svp-model", "tests", "fixtures")
MEAN, STD = 0.2860, 0.3530


def idx(name):
    with gzip.open(os.path.join(EMBEDDED, name), "rb") as f:
        data = f.read()
    dims = data[3]
    shape = struct.unpack(">" + "I" * dims, data[4 : 4 + 4 * dims])
    return torch.frombuffer(bytearray(data[4 + 4 * dims :]), dtype=torch.uint8).reshape(shape)


def images(name):
    x = idx(name).to(torch.float32) / 255.0
    return ((x - MEAN) / STD).unsqueeze(1)  # N x 1 x 28 x 28


def models():
    mlp = torch.nn.Sequential(
        torch.nn.Flatten(),
        torch.nn.Linear(784, 64),
        torch.nn.LayerNorm(64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 32),
        torch.nn.LayerNorm(32),
        torch.nn.ReLU(),
        torch.nn.Linear(32, 10),
    )
    cnn = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(4, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 7 * 7, 10),
    )
    return {"mlp": mlp, "cnn": cnn}


def vit():
    """timm's ViT in svp's shape; built after the others are trained, from its
    own seed, so that adding it left their fixtures as they were."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(1)
    return VisionTransformer(
        img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=2,
        mlp_ratio=2.0, global_pool="token",
    )


def main():
    torch.manual_seed(0)
    x_train, y_train = images("train-images-idx3-ubyte.gz"), idx("train-labels-idx1-ubyte.gz").long()
    x_test, y_test = images("t10k-images-idx3-ubyte.gz"), idx("t10k-labels-idx1-ubyte.gz").long()
    report = {"about": "tools/golden/import_models.py, PyTorch %s" % torch.__version__, "mean": MEAN, "std": STD}
    built = models()  # the MLP and the CNN are built first, as they always were
    for name, make in [("mlp", lambda: built["mlp"]), ("cnn", lambda: built["cnn"]), ("vit", vit)]:
        model = make()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        model.train()
        order = torch.randperm(len(y_train))
        for start in range(0, len(order), 64):
            b = order[start : start + 64]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x_train[b]), y_train[b]).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            logits = model(x_test)
        accuracy = (logits.argmax(1) == y_test).float().mean().item()
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, os.path.join(OUT, "torch-%s.safetensors" % name))
        report[name] = {
            "logits": [[float(v) for v in row] for row in logits[:8]],
            "test_acc": accuracy,
        }
        print("%s: embedded test accuracy %.4f" % (name, accuracy))
    with open(os.path.join(OUT, "torch-import.json"), "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
