#!/usr/bin/env python3
"""The baseline a federation is measured against: the same start model
fine-tuned on all the clients' data pooled in one place, one epoch per
"round" with the clients' batch size and learning rate, evaluated after
each round as the server evaluates the global model.

    python fleet/centralized.py --model START.svpm --rounds 10 [--data DIR] [--method svp]
"""

import argparse
import json
import sys
import time
from pathlib import Path

import svp


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--data", default="", help="IDX data folder (default: svp's embedded subset)")
    ap.add_argument("--method", choices=["svp", "bp"], default="svp")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args()
    model = svp.Model.load(args.model)
    (x, y), (x_test, y_test) = svp.load_data(args.data or None)
    rounds = [{"round": 0, "test-acc": model.evaluate(x_test, y_test)["accuracy"]}]
    started = time.perf_counter()
    for r in range(1, args.rounds + 1):
        model.finetune(x, y, epochs=1, method=args.method, batch_size=args.batch_size, lr=args.lr)
        rounds.append({"round": r, "test-acc": model.evaluate(x_test, y_test)["accuracy"],
                       "seconds": time.perf_counter() - started})
        print(f"round {r:3d}  test_acc {100 * rounds[-1]['test-acc']:.2f}%", file=sys.stderr)
    print(json.dumps({"method": args.method, "rounds": rounds}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
