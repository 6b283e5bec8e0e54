#!/usr/bin/env python3
"""PyTorch's backprop step on svp's reference MLP (models/mlp-fmnist.toml:
784-1024-1024-1024-10, LayerNorm + ReLU in each hidden block, Adam 3e-4), on
a CUDA GPU: the peer svp's GPU path is measured against (issue 21).

Random inputs (samples/s does not depend on the data); forward, loss,
backward and the optimizer step are timed after warm-up, with the device
synchronized before the clock stops; the fastest of several rounds counts.

    python3 tools/torch_mlp_gpu_bench.py --batch 128 --steps 200 --rounds 3

prints one JSON line: {"device", "batch", "ms_per_step", "samples_per_s"}.
"""

import argparse
import json
import time

import torch
from torch import nn


def mlp():
    layers, width = [], 784
    for _ in range(3):
        layers += [nn.Linear(width, 1024), nn.LayerNorm(1024), nn.ReLU()]
        width = 1024
    return nn.Sequential(*layers, nn.Linear(width, 10))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("torch_mlp_gpu_bench: PyTorch sees no CUDA device")
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False  # svp computes in f32
    model = mlp().to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=3e-4)
    x = torch.randn(args.batch, 784, device=dev)
    y = torch.randint(0, 10, (args.batch,), device=dev)

    def step():
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(20):
        step()
    best = float("inf")
    for _ in range(args.rounds):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t) / args.steps)
    print(json.dumps({"device": torch.cuda.get_device_name(0), "batch": args.batch,
                      "ms_per_step": round(best * 1e3, 4), "samples_per_s": round(args.batch / best, 1)}))


if __name__ == "__main__":
    main()
