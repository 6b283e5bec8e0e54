#!/usr/bin/env python3
"""Write a shifted copy of an IDX data folder (a sensor that sees the world
differently), for measuring `svp finetune`:

    python3 tools/shift_dataset.py /usr/share/datasets/fashion-mnist /tmp/inverted --invert

--invert: dark on light instead of light on dark (pixel -> 255 - pixel).
Labels are copied unchanged. Standard library only.
"""
import argparse
import gzip
import os
import shutil


def main():
    a = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a.add_argument("source")
    a.add_argument("target")
    a.add_argument("--invert", action="store_true", help="pixel -> 255 - pixel")
    args = a.parse_args()
    os.makedirs(args.target, exist_ok=True)
    for stem in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte"):
        name = next(n for n in (stem + ".gz", stem) if os.path.exists(os.path.join(args.source, n)))
        src = os.path.join(args.source, name)
        if "labels" in stem or not args.invert:
            shutil.copy(src, os.path.join(args.target, name))
            continue
        opener = gzip.open if name.endswith(".gz") else open
        with opener(src, "rb") as f:
            data = bytearray(f.read())
        header = 4 + 4 * data[3]
        data[header:] = bytes(255 - p for p in data[header:])
        with gzip.open(os.path.join(args.target, stem + ".gz"), "wb") as f:
            f.write(bytes(data))


if __name__ == "__main__":
    main()
