#!/usr/bin/env python3
"""Golden values for one SVP step and a short loss trajectory, from PyTorch.

Everything is rebuilt from the seed exactly as svp does it (weights, the
projections R_l and their dropout masks come from tools/rng_reference.py, an
independent Python implementation of svp-rng), then one step of Algorithm 1
runs with PyTorch autograd: per layer, local loss CE(v_l) + lambda * FA(v_l,
sg(v_{l-1})), gradients of that layer only, Adam update. With
--layers-per-unit K it is blockwise SVP+: backprop inside each unit of K
hidden layers, the local loss on the unit's output (the head is its own unit,
or with --head-joins-last-unit part of the last one).

    pip install torch
    python3 tools/golden/svp_step.py > tests/golden/svp_step.json
    python3 tools/golden/svp_step.py --hidden 5,4,4,3 --layers-per-unit 2 > tests/golden/svp_plus_step.json
    python3 tools/golden/svp_step.py --hidden 5,4,4,3 --layers-per-unit 2 --head-joins-last-unit \
        > tests/golden/svp_plus_head_step.json

tests/golden.rs reads the JSON; the tests never need PyTorch.
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import rng_reference as rr  # noqa: E402

PROJECTION, PROJECTION_DROPOUT, WEIGHT_INIT = 1, 2, 4

SEED = 5
INPUT, HIDDEN, CLASSES, BATCH = 6, [5, 4], 3, 4
DPRIME = CLASSES
LAMBDA = 1.0
PROJ_DROPOUT = 0.25
LR, BETAS, EPS = 1e-2, (0.9, 0.999), 1e-8
STEPS = 5
LAYERS_PER_UNIT = 1
HEAD_JOINS = False
f32 = torch.float32


def init_linear(layer, d_in, d_out):
    st = rr.Stream(SEED, WEIGHT_INIT, layer, 0, 0)
    bound = 1.0 / (d_in ** 0.5)
    vals = [(2.0 * st.uniform() - 1.0) * bound for _ in range(d_out * d_in + d_out)]
    w = torch.tensor(vals[: d_out * d_in], dtype=f32).reshape(d_out, d_in)
    b = torch.tensor(vals[d_out * d_in :], dtype=f32)
    return w, b


def projection(layer, width, step):
    """R_l (d' x width) with the dropout mask of `step` (None: no dropout)."""
    return projection_of(SEED, layer, width, DPRIME, PROJ_DROPOUT, step)


def projection_of(seed, layer, width, dprime, dropout, step):
    """R_l of a model seeded `seed`, as svp-nn's Projection draws it (f32)."""
    sigma = torch.tensor(1.0, dtype=f32) / torch.sqrt(torch.tensor(float(width), dtype=f32))
    rows = []
    threshold = min(int(dropout * 4294967296.0), 0xFFFFFFFF)
    keep_scale = torch.tensor(1.0, dtype=f32) / (torch.tensor(1.0, dtype=f32) - torch.tensor(dropout, dtype=f32))
    for r in range(dprime):
        st = rr.Stream(seed, PROJECTION, layer, r, 0)
        row = torch.tensor([rr.gaussian(st) for _ in range(width)], dtype=f32) * sigma
        if step is not None and dropout > 0:
            ms = rr.Stream(seed, PROJECTION_DROPOUT, layer, r, step)
            draws = []
            while len(draws) < width:
                bits = ms.next_u64()
                draws += [bits & 0xFFFFFFFF, bits >> 32]
            keep = torch.tensor([u >= threshold for u in draws[:width]])
            row = torch.where(keep, row * keep_scale, torch.zeros_like(row))
        rows.append(row)
    return torch.stack(rows)


def fa_loss(v, v_prev):
    def sim(m):
        n = m / (m.norm(dim=1, keepdim=True) + 1e-8)
        return n @ n.t()

    d = sim(v) - sim(v_prev)
    return (d * d).sum() / (v.shape[0] ** 2)


def batch():
    x = torch.tensor([[((i * 7 + j * 3) % 11) / 5.0 - 1.0 for j in range(INPUT)] for i in range(BATCH)], dtype=f32)
    y = torch.tensor([i % CLASSES for i in range(BATCH)])
    return x, y


def build():
    widths = [INPUT] + HIDDEN
    layers = []
    for l, (d_in, d_out) in enumerate(zip(widths, widths[1:]), start=1):
        w, b = init_linear(l, d_in, d_out)
        p = [w.requires_grad_(), b.requires_grad_(), torch.ones(d_out).requires_grad_(), torch.zeros(d_out).requires_grad_()]
        layers.append(p)
    w, b = init_linear(len(HIDDEN) + 1, HIDDEN[-1], CLASSES)
    layers.append([w.requires_grad_(), b.requires_grad_()])
    opts = [torch.optim.Adam(p, lr=LR, betas=BETAS, eps=EPS) for p in layers]
    return layers, opts


def flat(tensors):
    return [float(v) for t in tensors for v in t.detach().reshape(-1)]


def forward(p, h, head):
    if head:
        return h @ p[0].t() + p[1]
    z = h @ p[0].t() + p[1]
    return torch.relu(torch.nn.functional.layer_norm(z, (z.shape[1],), p[2], p[3], eps=1e-5))


def step(layers, opts, x, y, t, record):
    v_prev = (x @ projection(0, INPUT, None).t()).detach()
    h = x
    hidden = len(layers) - 1
    first = 0
    while first < len(layers):
        # A unit: LAYERS_PER_UNIT hidden layers, or the classifier head alone.
        end = len(layers) if first == hidden else min(first + LAYERS_PER_UNIT, hidden)
        if end == hidden and HEAD_JOINS:
            end = len(layers)
        head = end == len(layers)
        out = h
        for l in range(first, end):
            for o in layers[l]:
                o.grad = None
            out = forward(layers[l], out, l == len(layers) - 1)
        v = out if head else out @ projection(end, out.shape[1], t).t()
        ce = torch.nn.functional.cross_entropy(v, y)
        fa = fa_loss(v, v_prev)
        (ce + LAMBDA * fa).backward()
        for l in range(first, end):
            if record is not None:
                last = l == end - 1
                record.append(
                    {
                        "v": flat([v]) if last else None,
                        "ce": float(ce.detach()) if last else None,
                        "fa": float(fa.detach()) if last else None,
                        "grad": flat([o.grad for o in layers[l]]),
                    }
                )
            opts[l].step()
            if record is not None:
                record[-1]["params_after"] = flat(layers[l])
        v_prev = v.detach()
        h = out.detach()
        first = end
    return float(ce.detach())


def main():
    global HIDDEN, LAYERS_PER_UNIT, HEAD_JOINS
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--hidden", default=",".join(map(str, HIDDEN)), help="hidden widths, comma-separated")
    args.add_argument("--layers-per-unit", type=int, default=1, help="SVP+ unit size (1 = plain SVP)")
    args.add_argument("--head-joins-last-unit", action="store_true", help="train the head inside the last unit")
    a = args.parse_args()
    HEAD_JOINS = a.head_joins_last_unit
    HIDDEN = [int(w) for w in a.hidden.split(",")]
    LAYERS_PER_UNIT = a.layers_per_unit
    torch.manual_seed(0)
    x, y = batch()
    layers, opts = build()
    params_before = [flat(p) for p in layers]
    record = []
    losses = [step(layers, opts, x, y, 0, record)]
    for t in range(1, STEPS):
        losses.append(step(layers, opts, x, y, t, None))
    write_fixture(
        {
            "about": "one SVP step (Adam) and a loss trajectory, from tools/golden/svp_step.py (PyTorch %s)" % torch.__version__,
            "seed": SEED,
            "input": INPUT,
            "hidden": HIDDEN,
            "layers_per_unit": LAYERS_PER_UNIT,
            "head_joins_last_unit": HEAD_JOINS,
            "classes": CLASSES,
            "lambda": LAMBDA,
            "projection_dropout": PROJ_DROPOUT,
            "lr": LR,
        },
        x, y, params_before, record, losses,
    )


def write_fixture(run, x, y, params_before, record, losses):
    """Writes a golden step as JSON to stdout: `run` (what was run), then the
    batch, the parameters before the step, the per-layer record and the
    head's loss per step."""
    run.update({
        "x": flat([x]),
        "y": [int(v) for v in y],
        "params_before": params_before,
        "layers": record,
        "head_loss_per_step": losses,
    })
    json.dump(run, sys.stdout)
    print()


if __name__ == "__main__":
    main()
