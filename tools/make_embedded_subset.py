#!/usr/bin/env python3
"""Writes the embedded default data set: the first N training and M test
samples of Fashion-MNIST (MIT licence, Zalando Research), as gzipped IDX files.

    python3 tools/make_embedded_subset.py /usr/share/datasets/fashion-mnist 6000 1000

The source is Debian's `dataset-fashion-mnist` package. Output goes to
crates/svp-data/embedded/, which `svp` compiles into the binary.
"""
import gzip
import os
import struct
import sys

src, n_train, n_test = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
out = os.path.join(os.path.dirname(__file__), "..", "crates", "svp-data", "embedded")


def subset(name, count, out_name):
    with gzip.open(os.path.join(src, name), "rb") as f:
        data = f.read()
    magic = struct.unpack(">I", data[:4])[0]
    ndim = magic & 0xFF
    dims = list(struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim]))
    item = 1
    for d in dims[1:]:
        item *= d
    header = 4 + 4 * ndim
    dims[0] = count
    body = data[header : header + count * item]
    payload = struct.pack(">I", magic) + struct.pack(">" + "I" * ndim, *dims) + body
    # mtime=0: the same bytes on every run.
    with open(os.path.join(out, out_name), "wb") as f:
        f.write(gzip.compress(payload, compresslevel=9, mtime=0))


subset("train-images-idx3-ubyte.gz", n_train, "train-images-idx3-ubyte.gz")
subset("train-labels-idx1-ubyte.gz", n_train, "train-labels-idx1-ubyte.gz")
subset("t10k-images-idx3-ubyte.gz", n_test, "t10k-images-idx3-ubyte.gz")
subset("t10k-labels-idx1-ubyte.gz", n_test, "t10k-labels-idx1-ubyte.gz")
