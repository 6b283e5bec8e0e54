#!/usr/bin/env python3
"""svp's SVP+ and BP training steps against PyTorch's BP, on the CNN, ViT and
MobileNet of models/, in one sitting, alternating.

    cargo build --release -p svp-benches --example step_profile
    python3 tools/vision_side_by_side.py --threads 2 1 --repeats 3
    python3 tools/vision_side_by_side.py --nets mobilenet

Each repeat runs, for each network and thread count, svp's SVP+ step, svp's
BP step and PyTorch's BP step (tools/torch_vision_bench.py) one after the
other, each reporting its fastest round; the table keeps each one's best over
the repeats, in samples per second at batch 128, with svp's ratios to
PyTorch. The hosts are shared and their speed drifts, so only figures from
the same sitting compare. Needs PyTorch (pip install torch); svp's own
benches run without it.
"""

import argparse
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BATCH = 128


def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def svp_ms(binary, net, method, threads, steps, rounds):
    env = dict(os.environ, NET=net, RAYON_NUM_THREADS=str(threads))
    out = subprocess.run([str(binary), method, str(steps), str(rounds)], env=env, check=True,
                         capture_output=True, text=True, cwd=ROOT / "benches").stdout
    m = re.search(r"([0-9.]+) ms per step", out)
    if not m:
        sys.exit(f"step_profile printed no time: {out!r}")
    return float(m.group(1))


def torch_ms(net, threads, steps, rounds):
    out = subprocess.run([sys.executable, str(ROOT / "tools/torch_vision_bench.py"), net, "--threads", str(threads),
                          "--steps", str(steps), "--rounds", str(rounds)], check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["ms_per_step"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    ap.add_argument("--nets", nargs="+", default=["cnn", "vit"], choices=["cnn", "vit", "mobilenet"])
    ap.add_argument("--repeats", type=int, default=3, help="alternations of the three runs")
    ap.add_argument("--steps", type=int, default=10, help="steps per round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per run (the fastest counts)")
    ap.add_argument("--step-profile", type=Path, default=ROOT / "target/release/examples/step_profile")
    args = ap.parse_args()
    if not args.step_profile.exists():
        sys.exit(f"{args.step_profile} is missing: cargo build --release -p svp-benches --example step_profile")
    try:
        import torch  # noqa: F401
    except ImportError:
        sys.exit("PyTorch is not installed (pip install torch): nothing to compare against")

    runs = [("svp SVP+", lambda n, t: svp_ms(args.step_profile, n, "svp", t, args.steps, args.rounds)),
            ("svp BP", lambda n, t: svp_ms(args.step_profile, n, "bp", t, args.steps, args.rounds)),
            ("PyTorch BP", lambda n, t: torch_ms(n, t, args.steps, args.rounds))]
    best = {}
    for r in range(args.repeats):
        for net in args.nets:
            for threads in args.threads:
                for name, run in runs:
                    ms = run(net, threads)
                    key = (net, threads, name)
                    best[key] = min(best.get(key, float("inf")), ms)
                    print(f"repeat {r + 1}: {net} {threads} thread(s) {name}: {ms:.2f} ms/step", file=sys.stderr)

    print(f"{cpu_name()}, batch {BATCH}, best of {args.repeats} alternating repeats (samples/s)")
    print("| net | threads | svp SVP+ | svp BP | PyTorch BP | SVP+ / PyTorch | BP / PyTorch |")
    print("|---|---|---|---|---|---|---|")
    for net in args.nets:
        for threads in args.threads:
            sps = {name: BATCH / best[(net, threads, name)] * 1e3 for name, _ in runs}
            torch_sps = sps["PyTorch BP"]
            print(f"| {net} | {threads} | {sps['svp SVP+']:.0f} | {sps['svp BP']:.0f} | {torch_sps:.0f} "
                  f"| {sps['svp SVP+'] / torch_sps:.2f}x | {sps['svp BP'] / torch_sps:.2f}x |")


if __name__ == "__main__":
    main()
