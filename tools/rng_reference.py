#!/usr/bin/env python3
"""Independent reference for svp-rng: SplitMix64 key hashing, xoshiro256++ and
the 128-layer ziggurat, written from the papers in plain Python.

Prints the golden values pinned in crates/svp-rng/src/lib.rs:
    python3 tools/rng_reference.py
"""
import math
import struct

M64 = (1 << 64) - 1


def splitmix(z):
    z = (z + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def rotl(x, k):
    return ((x << k) | (x >> (64 - k))) & M64


class Stream:
    def __init__(self, seed, purpose, a, b, c):
        h = splitmix(seed)
        for w in (purpose, a, b, c):
            h = splitmix(h ^ w)
        s = []
        for i in range(4):
            h = splitmix(h ^ (i + 1))
            s.append(h)
        self.s = s

    def next_u64(self):
        s = self.s
        result = (rotl((s[0] + s[3]) & M64, 23) + s[0]) & M64
        t = (s[1] << 17) & M64
        s[2] ^= s[0]
        s[3] ^= s[1]
        s[1] ^= s[2]
        s[0] ^= s[3]
        s[2] ^= t
        s[3] = rotl(s[3], 45)
        return result

    def uniform(self):
        return (self.next_u64() >> 11) * (1.0 / (1 << 53))

    def uniform_open0(self):
        return ((self.next_u64() >> 11) + 1) * (1.0 / (1 << 53))


R = 3.442619855899
V = 9.91256303526217e-3
N = 128
X = [0.0] * (N + 1)
f = math.exp(-0.5 * R * R)
X[0] = V / f
X[1] = R
for i in range(2, N):
    X[i] = math.sqrt(-2.0 * math.log(V / X[i - 1] + f))
    f = math.exp(-0.5 * X[i] * X[i])
X[N] = 0.0
RATIO = [X[i + 1] / X[i] for i in range(N)]


def gaussian(st):
    while True:
        bits = st.next_u64()
        layer = bits & 0x7F
        u = 2.0 * ((bits >> 11) * (1.0 / (1 << 53))) - 1.0
        if abs(u) < RATIO[layer]:
            return u * X[layer]
        if layer == 0:
            neg = u < 0.0
            while True:
                x = math.log(st.uniform_open0()) / R
                y = math.log(st.uniform_open0())
                if -2.0 * y >= x * x:
                    return x - R if neg else R - x
        x = u * X[layer]
        f0 = math.exp(-0.5 * (X[layer] * X[layer] - x * x))
        f1 = math.exp(-0.5 * (X[layer + 1] * X[layer + 1] - x * x))
        if f1 + st.uniform() * (f0 - f1) < 1.0:
            return x


def f32_bits(v):
    return struct.unpack("<I", struct.pack("<f", v))[0]


if __name__ == "__main__":
    PROJECTION = 1
    st = Stream(42, PROJECTION, 1, 0, 0)
    print("raw", [st.next_u64() for _ in range(3)])
    st = Stream(42, PROJECTION, 1, 0, 0)
    g = [gaussian(st) for _ in range(6)]
    print("gauss", g)
    print("gauss f32 bits", [hex(f32_bits(v)) for v in g])
